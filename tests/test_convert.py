"""Importing Piper ONNX voices (``load_voice("VOICE.onnx")``) and converting them to Piper checkpoints.

Voices are exported in the tests, to temporary folders, in two ways:

* by vits_fast's own exporter (:func:`vits_fast.export.export_onnx`: weight norm folded, opset 15);
* with upstream Piper's export settings, reproduced from ``rhasspy/piper`` ``src/python/piper_train/export_onnx.py``:
  ``model_g.dec.remove_weight_norm()`` only (the flows keep weight norm, so the exporter folds
  ``weight_g``/``weight_v`` into anonymous ``onnx::Conv_*`` initializers and ``exp(-logs)`` into ``onnx::Exp_*``),
  ``forward`` replaced by ``infer`` behind ``(input, input_lengths, scales, sid)``, opset 15, the TorchScript
  exporter with its default constant folding, input names ``input``, ``input_lengths``, ``scales``, ``sid`` and
  dynamic axes ``input`` {0, 1}, ``input_lengths`` {0}, ``output`` {0, 1}. One variant turns constant folding off,
  so the weights are computed in the graph (ReduceL2/Div/Mul chains). Ours matches upstream in opset, input and
  output names; it differs only in naming the right output axis (3, samples; upstream marks 1) and marking
  ``sid`` dynamic.

Voices written by upstream's own exporter (piper1-gpl's ``export_onnx``, single- and multi-speaker) are imported
and checked against onnxruntime in ``tests/test_piper_compat.py``, beside upstream's trainer.
"""

import json
import logging
import warnings

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from vits_fast import checkpoint as ckpt_lib  # noqa: E402
from vits_fast import convert, export, synthesize, voice_config  # noqa: E402
from vits_fast import inference as inf  # noqa: E402
from vits_fast.train import step as step_lib  # noqa: E402
from vits_fast.config import model_kwargs, tiny_model_kwargs  # noqa: E402
from vits_fast.models import MultiPeriodDiscriminator, SynthesizerTrn  # noqa: E402

from tests._util import one_thread, randomised  # noqa: E402,F401
from tests.test_train import _args, _trainer, cache_dir, corpus  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")

SDP_FRESH = ["enc_q", "dp.flows.1", "dp.post_pre", "dp.post_proj", "dp.post_convs", "dp.post_flows"]
ZERO = dict(noise_scale=0.0, noise_scale_w=0.0)


def _piper_export(model, path, fold):
    """Export ``model`` as upstream ``piper_train.export_onnx`` does (module docstring)."""
    model = inf.copy_module(model).eval()
    with torch.no_grad():
        model.dec.remove_weight_norm()

    def infer_forward(text, text_lengths, scales, sid=None):
        return model.infer(text, text_lengths, noise_scale=scales[0], length_scale=scales[1],
                           noise_scale_w=scales[2], sid=sid)[0].unsqueeze(1)

    model.forward = infer_forward
    torch.manual_seed(1234)
    ids = torch.randint(0, model.n_vocab, (1, 50))
    sid = torch.LongTensor([0]) if model.n_speakers > 1 else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids, torch.LongTensor([50]), torch.FloatTensor([0.667, 1.0, 0.8]), sid), str(path),
                          opset_version=15, input_names=["input", "input_lengths", "scales", "sid"],
                          output_names=["output"], dynamo=False, do_constant_folding=fold,
                          dynamic_axes={"input": {0: "batch_size", 1: "phonemes"}, "input_lengths": {0: "batch_size"},
                                        "output": {0: "batch_size", 1: "time"}})
    return path


def _tiny(speakers, **overrides):
    return tiny_model_kwargs(num_symbols=256, num_speakers=speakers, **overrides)


# name: (model kwargs, exporter, parameter scale of the random weights)
VARIANTS = {
    "ours-single": (_tiny(1), "ours", 0.2),
    "ours-multi": (_tiny(3), "ours", 0.2),
    # ResBlock1 decoder and the deterministic duration predictor
    "ours-resblock1-dp": (_tiny(2, resblock="1", resblock_kernel_sizes=(3, 5),
                                resblock_dilation_sizes=((1, 3, 5), (1, 3, 5)), use_sdp=False), "ours", 0.2),
    "ours-x-low": (model_kwargs("x-low", 256, 1), "ours", 0.1),
    "ours-opset17": (_tiny(1), "ours-17", 0.2),  # LayerNormalization nodes instead of their decomposition
    "piper-single": (_tiny(1), "piper", 0.2),
    "piper-multi-unfolded": (_tiny(3), "piper-unfolded", 0.2),
}


@pytest.fixture(scope="module")
def voices(tmp_path_factory):
    """Each variant's source model and its exported ``voice.onnx`` + ``voice.onnx.json``, made on first use."""
    made = {}

    def get(name):
        if name not in made:
            kwargs, how, scale = VARIANTS[name]
            model = randomised(SynthesizerTrn(**kwargs), seed=len(made) + 1, scale=scale)
            folder = tmp_path_factory.mktemp(name)
            config = voice_config.make_voice_config(model, sample_rate=16000)
            path = folder / "voice.onnx"
            if how.startswith("ours"):
                export.export_onnx(model, path, config, opset=17 if how == "ours-17" else export.OPSET_VERSION)
            else:
                _piper_export(model, path, fold=how == "piper")
                voice_config.write_voice_config(config, voice_config.onnx_config_path(path))
            made[name] = dict(model=model, path=path, config=config, sess=ort.InferenceSession(str(path)))
        return made[name]

    return get


def _ort_audio(sess, ids, sid, length_scale=1.0):
    feed = {"input": np.asarray([ids], dtype=np.int64), "input_lengths": np.asarray([len(ids)], dtype=np.int64),
            "scales": np.asarray([0.0, length_scale, 0.0], dtype=np.float32)}
    if sid is not None:
        feed["sid"] = np.asarray([sid], dtype=np.int64)
    return sess.run(None, feed)[0].reshape(-1)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_import_has_the_file_weights_and_onnxruntime_audio(voices, name, caplog):
    v = voices(name)
    with caplog.at_level(logging.WARNING, logger="vits_fast.convert"):
        imported = convert.import_onnx_voice(v["path"])
    expected_fresh = SDP_FRESH if v["model"].use_sdp else ["enc_q"]
    assert imported.fresh == expected_fresh
    assert all(part in caplog.text for part in expected_fresh) and "start fresh" in caplog.text
    # Weight for weight, against the source model (weight norm folded on both sides).
    source = inf.prepare_for_inference(v["model"]).state_dict()
    got = inf.prepare_for_inference(imported.model).state_dict()
    assert got.keys() == source.keys()
    compared = 0
    for key, value in source.items():
        if not any(key.startswith(part + ".") for part in expected_fresh):
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
            compared += 1
    assert compared > 50
    # Weight norm as upstream keeps it.
    assert "dec.ups.0.weight_g" in imported.model.state_dict()
    # Audio: the imported model's zero-noise infer equals onnxruntime on the file.
    gen = torch.Generator().manual_seed(7)
    speakers = list(range(v["model"].n_speakers)) if v["model"].n_speakers > 1 else [None]
    for i, (length, scale) in enumerate([(5, 1.0), (23, 1.3), (41, 0.8)]):
        sid = speakers[i % len(speakers)]
        ids = torch.randint(1, 256, (length,), generator=gen).tolist()
        want = _ort_audio(v["sess"], ids, sid, scale)
        with torch.no_grad():
            audio = imported.model.infer(torch.tensor([ids]), torch.tensor([length]),
                                         sid=None if sid is None else torch.tensor([sid]), length_scale=scale,
                                         **ZERO)[0].reshape(-1).numpy()
        assert audio.shape == want.shape and np.abs(want).max() > 1e-2
        assert np.abs(audio - want).max() <= 1e-3


def test_load_voice_reads_onnx_with_its_config(voices):
    v = voices("ours-multi")
    voice = inf.load_voice(v["path"])
    assert isinstance(voice.model, SynthesizerTrn) and voice.num_speakers == 3
    assert voice.config == json.loads(voice_config.onnx_config_path(v["path"]).read_text())
    assert voice.sample_rate == 16000 and voice.config_path == voice_config.onnx_config_path(v["path"])
    assert voice.audio.hop_length == 16  # the product of the decoder's upsampling rates


@pytest.mark.parametrize("name", ["ours-multi", "piper-single"])
def test_convert_round_trip(voices, name, tmp_path, capsys):
    v = voices(name)
    out = tmp_path / "run" / "voice.ckpt"
    assert convert.main([str(v["path"]), str(out)]) == 0
    assert "wrote" in capsys.readouterr().err
    ckpt = ckpt_lib.load_checkpoint(out)
    g, d = ckpt_lib.generator_state(ckpt)
    assert any(k.endswith(".weight_g") for k in g) and any(k.endswith(".weight_v") for k in g)
    assert not any("parametrizations" in k for k in g)
    # Strict loading as Piper's VitsModel does: the model built from the hyper-parameters alone.
    piper_view = {k: v for k, v in ckpt.items() if k != "vits_fast"}
    kwargs, audio, _ = ckpt_lib.model_config_from_checkpoint(piper_view)
    fresh = SynthesizerTrn(**kwargs)
    fresh.load_state_dict(g, strict=True)
    MultiPeriodDiscriminator().load_state_dict(d, strict=True)
    assert audio.sample_rate == 16000 and ckpt["global_step"] == 0
    # The project's own loader gives the imported model back, tensor for tensor.
    from_onnx = inf.load_voice(v["path"]).model.state_dict()
    from_ckpt = inf.load_voice(out)
    assert from_ckpt.config == v["config"]  # config.json was written beside the checkpoint
    for key, value in from_ckpt.model.state_dict().items():
        assert torch.equal(value, from_onnx[key]), key
    # Nothing is overwritten unasked.
    before = out.read_bytes()
    assert convert.main([str(v["path"]), str(out)]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == before
    # Not even with --overwrite when the output is the voice itself.
    voice_bytes = v["path"].read_bytes()
    assert convert.main([str(v["path"]), str(v["path"]), "--overwrite"]) == 1
    assert "input" in capsys.readouterr().err and v["path"].read_bytes() == voice_bytes


def test_synthesize_cli_reads_onnx(voices, tmp_path):
    v = voices("piper-single")
    ids = [1, 0, 20, 0, 18, 0, 24, 0, 2]
    stdout = __import__("io").BytesIO()
    rc = synthesize.main(["--checkpoint", str(v["path"]), "--phoneme-ids", "--output-raw", "--noise-scale", "0",
                          "--noise-w", "0"], stdin=iter([" ".join(map(str, ids)) + "\n"]), stdout=stdout)
    assert rc == 0
    audio = np.frombuffer(stdout.getvalue(), "<i2") / 32767
    want = np.round(np.clip(_ort_audio(v["sess"], ids, None), -1, 1) * 32767) / 32767
    assert audio.shape == want.shape
    assert np.abs(audio - want).max() <= 1e-3


def test_train_init_from_onnx(voices, corpus, cache_dir, tmp_path):  # noqa: F811
    v = voices("ours-multi")
    t = _trainer(_args(corpus, cache_dir, tmp_path / "ft", "--init-from", str(v["path"])))
    imported = convert.import_onnx_voice(v["path"]).model.state_dict()
    own = t.model_g.state_dict()
    assert t.num_speakers == 2  # the corpus has two speakers: emb_g starts fresh, the rest is the voice's
    for key, value in imported.items():
        if not key.startswith("emb_g."):
            assert torch.equal(own[key], value), key
    losses, finite = step_lib.losses_of(t.train_step(next(iter(t._loader(t.train_set, t.sampler, 0)))))
    assert finite and all(np.isfinite(x) for x in losses.values())


# --------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------

def _graph_file(path, table_shape, external=False):
    """A small ONNX file with Piper's inputs whose only weight is an embedding table of ``table_shape``."""
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.zeros(table_shape, dtype=np.float32), "emb")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "input"], ["output"])], "g",
        [helper.make_tensor_value_info("input", TensorProto.INT64, ["b", "t"]),
         helper.make_tensor_value_info("input_lengths", TensorProto.INT64, ["b"]),
         helper.make_tensor_value_info("scales", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)], [table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    onnx.save(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    path.with_name(path.name + ".json").write_text("{}")
    return path


def test_errors_are_clear(voices, tmp_path, capsys):
    v = voices("ours-single")
    # No config beside the file.
    lone = tmp_path / "lone.onnx"
    lone.write_bytes(v["path"].read_bytes())
    with pytest.raises(convert.OnnxVoiceError, match=r"lone\.onnx\.json is missing"):
        inf.load_voice(lone)
    assert convert.main([str(lone), str(tmp_path / "x.ckpt")]) == 1
    assert "lone.onnx.json is missing" in capsys.readouterr().err and not (tmp_path / "x.ckpt").exists()
    # Not ONNX at all, and ONNX that is no Piper voice.
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a model" * 10)
    junk.with_name("junk.onnx.json").write_text("{}")
    with pytest.raises(convert.OnnxVoiceError, match="not an ONNX model"):
        convert.import_onnx_voice(junk)
    from onnx import TensorProto, helper

    add = helper.make_graph([helper.make_node("Add", ["a", "b"], ["c"])], "add",
                            [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in "ab"],
                            [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(add), str(tmp_path / "add.onnx"))
    (tmp_path / "add.onnx.json").write_text("{}")
    with pytest.raises(convert.OnnxVoiceError, match=r"is not a Piper voice: its inputs are \['a', 'b'\]"):
        convert.import_onnx_voice(tmp_path / "add.onnx")
    with pytest.raises(convert.OnnxVoiceError, match="not a Piper voice: expected pairs of relative-position"):
        convert.import_onnx_voice(_graph_file(tmp_path / "emb.onnx", (10, 16)))
    # Sizes read from the file are bounded; weights in external files are refused.
    with pytest.raises(convert.OnnxVoiceError, match=r"hidden_channels=8192 .* outside 1\.\.4096"):
        convert.import_onnx_voice(_graph_file(tmp_path / "wide.onnx", (2, 8192)))
    with pytest.raises(convert.OnnxVoiceError, match="external files"):
        convert.import_onnx_voice(_graph_file(tmp_path / "ext.onnx", (10, 16), external=True))
    with pytest.raises(convert.OnnxVoiceError, match=r"filter_length=1000000000 .* outside 1\.\.65536"):
        convert.import_onnx_voice(v["path"], config=dict(v["config"], audio={"filter_length": 10**9}))
    # The assembled settings pass the checkpoint bounds too (check_model_config).
    with pytest.raises(convert.OnnxVoiceError, match=r"invalid model settings: sample_rate=500 is outside \[1000, "):
        convert.import_onnx_voice(v["path"], config=dict(v["config"], audio={"sample_rate": 500}))
    # A config of another voice.
    with pytest.raises(convert.OnnxVoiceError, match="num_speakers=4, but .* has 1: they do not belong together"):
        convert.import_onnx_voice(v["path"], config=dict(v["config"], num_speakers=4))
    # A weight whose shape does not fit the rest of the graph.
    model = onnx.load(str(v["path"]))
    (post,) = [t for t in model.graph.initializer if t.name == "model.dec.conv_post.weight"]
    post.CopyFrom(onnx.numpy_helper.from_array(np.zeros((1, 8, 5), dtype=np.float32), post.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    bad.with_name("bad.onnx.json").write_text(json.dumps(v["config"]))
    with pytest.raises(convert.OnnxVoiceError, match=r"has shape \(1, 8, 5\), but dec\.conv_post\.weight .* "
                                                     r"needs \(1, 8, 7\)"):
        convert.import_onnx_voice(bad)


def test_weight_norm_parts_rebuild_the_weight():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(6, 4, 5, generator=gen, dtype=torch.float64)
    weight[2] = 0  # an all-zero output channel
    g, v = convert.weight_norm_parts(weight)
    assert g.shape == (6, 1, 1) and v.shape == weight.shape
    torch.testing.assert_close(torch._weight_norm(v, g, 0), weight, rtol=1e-12, atol=0)
