"""ONNX export in Piper's contract: graph signature, onnxruntime == PyTorch ``infer``, config, streaming split.

Each export of a tiny model takes 10-20 s here, so the three exports are module fixtures shared by the tests.
"""

import json

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import vits_fast  # noqa: E402
from vits_fast import checkpoint as ckpt_lib  # noqa: E402
from vits_fast import export, voice_config  # noqa: E402
from vits_fast import inference as inf  # noqa: E402
from vits_fast.config import AudioConfig, tiny_model_kwargs  # noqa: E402
from vits_fast.voice_config import default_phoneme_id_map  # noqa: E402


from tests._util import one_thread, randomised as _randomised  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(num_speakers, seed):
    return _randomised(vits_fast.SynthesizerTrn(**tiny_model_kwargs(num_symbols=256, num_speakers=num_speakers)),
                       seed)


def _batch(lengths, seed, n_vocab=256):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, n_vocab, (len(lengths), max(lengths)), generator=g)
    x = x * vits_fast.commons.sequence_mask(torch.tensor(lengths), max(lengths))
    return x, torch.tensor(lengths)


def _run(sess, x, lengths, scales, sid=None):
    feed = {"input": x.numpy(), "input_lengths": lengths.numpy(), "scales": np.asarray(scales, dtype=np.float32)}
    if sid is not None:
        feed["sid"] = sid.numpy()
    return sess.run(None, feed)[0]


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """A 3-speaker model exported with the API (main graph and the streaming split)."""
    model = _model(3, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folder = tmp_path_factory.mktemp("multi")
    path = export.export_onnx(model, folder / "voice.onnx", voice_config.make_voice_config(model))
    enc, dec = export.export_streaming_onnx(model, folder / "stream")
    return dict(model=model, before=before, path=path, sess=ort.InferenceSession(str(path)),
                enc=ort.InferenceSession(str(enc)), dec=ort.InferenceSession(str(dec)))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """A single-speaker checkpoint + config.json exported with ``python -m vits_fast.export onnx`` (in-process)."""
    folder = tmp_path_factory.mktemp("single")
    kw = tiny_model_kwargs(num_symbols=256)
    model = _model(1, seed=2)
    audio = AudioConfig(sample_rate=16000, filter_length=128, hop_length=16, win_length=128)
    hp = ckpt_lib.piper_hyper_parameters(kw, audio, num_speakers=1, training={})
    ckpt_lib.save_checkpoint(folder / "model.ckpt", model, nn.Module(), [], [], 0, 0, hp)
    config = {"dataset": "tiny", "audio": {"sample_rate": 16000, "quality": "x-low"}, "espeak": {"voice": "de"},
              "language": {"code": "de"}, "inference": {"noise_scale": 0.5, "length_scale": 1.1, "noise_w": 0.7},
              "phoneme_type": "espeak", "phoneme_map": {}, "phoneme_id_map": default_phoneme_id_map(),
              "num_symbols": 256, "num_speakers": 1, "speaker_id_map": {}, "piper_version": "1.0.0"}
    (folder / "config.json").write_text(json.dumps(config))
    out = folder / "out" / "voice.onnx"
    rc = export.main(["onnx", str(folder / "model.ckpt"), str(out)])
    return dict(rc=rc, model=model, config=config, path=out, folder=folder,
                sess=ort.InferenceSession(str(out)) if rc == 0 else None)


def _signature(path):
    m = onnx.load(str(path))

    def info(v):
        t = v.type.tensor_type
        return v.name, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type), len(t.shape.dim)

    return m, [info(i) for i in m.graph.input], [info(o) for o in m.graph.output]


# --- the graph ----------------------------------------------------------------------------------------------------

def test_graph_signature_multi_speaker(multi):
    m, inputs, outputs = _signature(multi["path"])
    assert inputs == [("input", np.int64, 2), ("input_lengths", np.int64, 1), ("scales", np.float32, 1),
                      ("sid", np.int64, 1)]
    assert outputs == [("output", np.float32, 4)]
    assert [d.dim_value for d in m.graph.input[2].type.tensor_type.shape.dim] == [3]
    assert sum(n.op_type == "Ceil" for n in m.graph.node) == 1
    assert [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] == [15]
    assert not any(i.name.endswith(("weight_g", "weight_v")) for i in m.graph.initializer)


def test_graph_signature_single_speaker_via_cli(single):
    assert single["rc"] == 0
    m, inputs, outputs = _signature(single["path"])
    assert [i[0] for i in inputs] == ["input", "input_lengths", "scales"], "no sid for a single speaker"
    assert outputs == [("output", np.float32, 4)]
    assert sum(n.op_type == "Ceil" for n in m.graph.node) == 1


def test_export_leaves_model_untouched(multi):
    model = multi["model"]
    assert not model.training
    assert hasattr(model.dec.ups[0], "weight_g"), "weight norm is removed on a copy only"
    assert model.state_dict().keys() == multi["before"].keys()
    assert all(torch.equal(v, multi["before"][k]) for k, v in model.state_dict().items())


def test_contract_check_catches_violations(multi, tmp_path):
    m = onnx.load(str(multi["path"]))
    m.graph.node.append(onnx.helper.make_node("Ceil", [m.graph.output[0].name], ["extra_ceil"]))
    bad = tmp_path / "two_ceils.onnx"
    onnx.save(m, str(bad))
    with pytest.raises(export.ExportError, match="2 Ceil nodes"):
        export.check_piper_contract(bad, multi_speaker=True)
    with pytest.raises(export.ExportError, match="inputs"):
        export.check_piper_contract(multi["path"], multi_speaker=False)


# --- onnxruntime == PyTorch ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("length_scale", [1.0, 1.3])
def test_onnxruntime_equals_infer_multi_speaker(multi, length_scale):
    model, sess = multi["model"], multi["sess"]
    x, lengths = _batch([17, 6, 11], seed=3)
    sid = torch.tensor([2, 0, 1])
    got = _run(sess, x, lengths, [0.0, length_scale, 0.0], sid)
    with torch.no_grad():
        ref, _, y_mask, _ = model.infer(x, lengths, sid=sid, noise_scale=0.0, length_scale=length_scale,
                                        noise_scale_w=0.0)
    assert got.shape == (3, 1, 1, ref.shape[-1])
    np.testing.assert_allclose(got[:, 0], ref.numpy(), rtol=1e-4, atol=2e-6)
    hop = 16
    for i in range(3):  # batch item == the same utterance alone, padding silent
        n = int(y_mask[i].sum()) * hop
        alone = _run(sess, x[i: i + 1, : lengths[i]], lengths[i: i + 1], [0.0, length_scale, 0.0], sid[i: i + 1])
        assert alone.shape[-1] == n
        np.testing.assert_allclose(got[i, 0, 0, :n], alone[0, 0, 0], rtol=1e-4, atol=2e-6)
        assert np.all(got[i, 0, 0, n:] == 0)


def test_onnxruntime_equals_infer_single_speaker(single):
    x, lengths = _batch([9, 14], seed=4)
    got = _run(single["sess"], x, lengths, [0.0, 1.0, 0.0])
    with torch.no_grad():
        ref = single["model"].infer(x, lengths, noise_scale=0.0, noise_scale_w=0.0)[0]
    np.testing.assert_allclose(got[:, 0], ref.numpy(), rtol=1e-4, atol=2e-6)


def test_scales_order(multi):
    """scales = (noise, length, noise_w): noise changes the audio but never the length; length scales it."""
    x, lengths = _batch([15], seed=5)
    sid = torch.tensor([1])
    base = _run(multi["sess"], x, lengths, [0.0, 1.0, 0.0], sid)
    noisy = _run(multi["sess"], x, lengths, [5.0, 1.0, 0.0], sid)
    longer = _run(multi["sess"], x, lengths, [0.0, 2.0, 0.0], sid)
    assert noisy.shape == base.shape and np.abs(noisy - base).max() > 1e-3
    with torch.no_grad():
        ref = multi["model"].infer(x, lengths, sid=sid, noise_scale=0.0, length_scale=2.0, noise_scale_w=0.0)[0]
    assert longer.shape[-1] == ref.shape[-1] > 1.5 * base.shape[-1]


# --- voice config -------------------------------------------------------------------------------------------------

def test_voice_config_written_by_cli(single):
    written = json.loads(voice_config.onnx_config_path(single["path"]).read_text())
    assert voice_config.onnx_config_path(single["path"]).name == "voice.onnx.json"
    cfg = single["config"]
    for key in ("dataset", "espeak", "language", "inference", "phoneme_type", "phoneme_map", "phoneme_id_map",
                "speaker_id_map", "piper_version"):
        assert written[key] == cfg[key], key
    assert written["audio"]["sample_rate"] == 16000 and written["audio"]["quality"] == "x-low"
    assert written["num_symbols"] == 256 and written["num_speakers"] == 1


def test_make_voice_config_defaults_and_errors():
    model = _model(3, seed=0)
    cfg = voice_config.make_voice_config(model, {"speaker_id_map": {"a": 0, "b": 2}}, sample_rate=22050)
    assert cfg["audio"]["sample_rate"] == 22050 and cfg["espeak"]["voice"] == "en-us"
    assert cfg["inference"] == {"noise_scale": 0.667, "length_scale": 1.0, "noise_w": 0.8}
    assert cfg["phoneme_id_map"] == default_phoneme_id_map() and cfg["phoneme_type"] == "espeak"
    assert cfg["num_speakers"] == 3 and cfg["num_symbols"] == 256 and cfg["piper_version"]
    with pytest.raises(voice_config.VoiceError, match="3"):
        voice_config.make_voice_config(model, {"num_speakers": 1})
    with pytest.raises(voice_config.VoiceError, match="speaker_id_map"):
        voice_config.make_voice_config(model, {"speaker_id_map": {"a": 3}})
    small = _randomised(vits_fast.SynthesizerTrn(**tiny_model_kwargs(num_symbols=32)))
    with pytest.raises(voice_config.VoiceError, match="vocabulary of 32"):
        voice_config.make_voice_config(small)
    # check=False (training writes the config of the model it fits): completed, the model's counts win.
    unchecked = voice_config.make_voice_config(model, {"num_speakers": 1, "speaker_id_map": {"a": 3}}, check=False)
    assert unchecked["num_speakers"] == 3 and unchecked["speaker_id_map"] == {"a": 3}
    assert unchecked["inference"] == cfg["inference"] and unchecked["piper_version"] == cfg["piper_version"]
    assert voice_config.make_voice_config(small, check=False)["num_symbols"] == 32


def test_cli_errors(single, tmp_path, capsys):
    assert export.main(["onnx", str(tmp_path / "missing.ckpt"), str(tmp_path / "x.onnx")]) == 1
    assert "does not exist" in capsys.readouterr().err
    wrong = dict(single["config"], num_speakers=4)
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    rc = export.main(["onnx", str(single["folder"] / "model.ckpt"), str(tmp_path / "x.onnx"), "--config",
                      str(tmp_path / "wrong.json")])
    assert rc == 1 and "4 speaker(s)" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


# --- streaming split ----------------------------------------------------------------------------------------------

def test_streaming_split_equals_infer(multi):
    model, enc, dec = multi["model"], multi["enc"], multi["dec"]
    assert [o.name for o in enc.get_outputs()] == ["z", "y_mask", "g"]
    assert [i.name for i in dec.get_inputs()] == ["z", "y_mask", "g"]
    x, lengths = _batch([13, 7], seed=6)
    sid = torch.tensor([0, 2])
    z, y_mask, g = enc.run(None, {"input": x.numpy(), "input_lengths": lengths.numpy(),
                                  "scales": np.array([0, 1, 0], np.float32), "sid": sid.numpy()})
    whole = dec.run(None, {"z": z, "y_mask": y_mask, "g": g})[0]
    with torch.no_grad():
        ref = model.infer(x, lengths, sid=sid, noise_scale=0.0, noise_scale_w=0.0)[0]
    np.testing.assert_allclose(whole, ref.numpy(), rtol=1e-4, atol=2e-6)

    # chunks of z decoded by the ONNX decoder with the receptive-field overlap give the same audio
    def ort_decoder(zc, gc, mask):
        return torch.from_numpy(dec.run(None, {"z": zc.numpy(), "y_mask": mask.numpy(), "g": gc.numpy()})[0])

    latent = inf.Latent(torch.from_numpy(z), torch.from_numpy(y_mask), torch.from_numpy(g))
    chunks = list(inf.stream_decode(ort_decoder, latent, 16, inf.receptive_field(model.dec), chunk_frames=4,
                                    first_chunk_frames=2))
    assert len(chunks) > 3
    np.testing.assert_allclose(torch.cat(chunks, dim=2).numpy(), whole, rtol=1e-4, atol=2e-6)


def test_export_without_onnx_names_the_extra(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)  # as if the onnx extra were not installed
    out = tmp_path / "voice.onnx"
    assert export.main(["onnx", str(tmp_path / "any.ckpt"), str(out)]) == 1
    assert "pip install 'vits_fast[onnx]'" in capsys.readouterr().err
    assert not out.exists()
