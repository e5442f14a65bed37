"""Safe checkpoint loading, Piper layout helpers and architecture inference."""

import os
import pathlib
import pickle
import sys
import types

import pytest
import torch

from vits_fast import checkpoint as ck
from vits_fast.config import AudioConfig, model_kwargs, tiny_model_kwargs
from vits_fast.models import MultiPeriodDiscriminator, SynthesizerTrn
from vits_fast.config import shrink_discriminator


class _RunsCommand:
    """Pickles as a call to os.system (what a malicious checkpoint does)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _PopenCall:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import subprocess

        return (subprocess.Popen, (["sh", "-c", self.command],))


def _fake_lightning_class():
    """A class pickled as pytorch_lightning.utilities.parsing.AttributeDict, then made unimportable."""
    names = ["pytorch_lightning", "pytorch_lightning.utilities", "pytorch_lightning.utilities.parsing"]
    mods = [types.ModuleType(n) for n in names]

    class AttributeDict(dict):
        pass

    class Unknown:
        def __init__(self, value):
            self.value = value

    AttributeDict.__module__ = Unknown.__module__ = names[-1]
    AttributeDict.__qualname__ = "AttributeDict"
    Unknown.__qualname__ = "SomeLightningThing"
    mods[-1].AttributeDict = AttributeDict
    mods[-1].SomeLightningThing = Unknown
    return names, mods, AttributeDict, Unknown


def test_malicious_zip_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model_g.x": torch.ones(2)}, "hyper_parameters": _RunsCommand(f"touch {marker}")}, path)
    with pytest.raises(ck.UnsafeCheckpointError) as info:
        ck.load_checkpoint(path)
    assert str(path) in str(info.value) and "system" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("fmt", ["legacy", "raw_pickle"])
def test_malicious_legacy_and_raw_pickles_are_refused(tmp_path, fmt):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    payload = {"a": _RunsCommand(f"touch {marker}"), "b": _PopenCall(f"touch {marker}")}
    if fmt == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    with pytest.raises(ck.UnsafeCheckpointError, match="refusing to load"):
        ck.load_checkpoint(path)
    assert not marker.exists()


def test_subprocess_class_is_refused_not_placeholdered(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "popen.ckpt"
    torch.save({"x": _PopenCall(f"touch {marker}")}, path)
    with pytest.raises(ck.UnsafeCheckpointError, match=r"(subprocess|commands)\.Popen"):  # protocol 2 spells it commands
        ck.load_checkpoint(path)
    assert not marker.exists()


def test_truncated_empty_and_missing_checkpoints_give_clear_errors(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"model_g.w": torch.randn(64, 64)}, "epoch": 1}, good)
    data = good.read_bytes()
    for cut in (len(data) // 2, 100):
        bad = tmp_path / f"trunc{cut}.ckpt"
        bad.write_bytes(data[:cut])
        with pytest.raises(ck.CheckpointError, match="truncated or corrupt") as info:
            ck.load_checkpoint(bad)
        assert str(bad) in str(info.value)
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"w": torch.randn(8)}, legacy, _use_new_zipfile_serialization=False)
    cut_legacy = tmp_path / "legacy_cut.ckpt"
    cut_legacy.write_bytes(legacy.read_bytes()[:40])
    with pytest.raises(ck.CheckpointError, match="legacy_cut.ckpt"):
        ck.load_checkpoint(cut_legacy)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(ck.CheckpointError, match="empty"):
        ck.load_checkpoint(empty)
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.load_checkpoint(tmp_path / "nope.ckpt")


def test_lightning_dict_with_posixpath_and_unknown_classes_loads(tmp_path, monkeypatch):
    names, mods, AttributeDict, Unknown = _fake_lightning_class()
    for name, mod in zip(names, mods):
        monkeypatch.setitem(sys.modules, name, mod)
    hp = AttributeDict(num_symbols=256, dataset=[pathlib.PosixPath("/data/dataset.jsonl")], thing=Unknown(7))
    path = tmp_path / "pl.ckpt"
    weights = torch.randn(3, 4)
    torch.save({"state_dict": {"model_g.enc_p.emb.weight": weights}, "hyper_parameters": hp, "epoch": 5,
                "global_step": 100, "callbacks": {"ModelCheckpoint": {"best": pathlib.PosixPath("/x.ckpt")}}}, path)
    for name in names:
        monkeypatch.delitem(sys.modules, name)
    loaded = ck.load_checkpoint(path)
    assert "pytorch_lightning.utilities.parsing" not in sys.modules  # nothing named by the file was imported
    torch.testing.assert_close(loaded["state_dict"]["model_g.enc_p.emb.weight"], weights, rtol=0, atol=0)
    assert loaded["epoch"] == 5 and loaded["callbacks"]["ModelCheckpoint"]["best"] == pathlib.PosixPath("/x.ckpt")
    hp_loaded = loaded["hyper_parameters"]
    assert isinstance(hp_loaded, ck.InertObject) and hp_loaded.inert_qualname.endswith("AttributeDict")
    plain = ck.to_plain(hp_loaded)
    assert plain["num_symbols"] == 256 and plain["dataset"] == ["/data/dataset.jsonl"]
    assert plain["thing"]["__class__"].endswith("SomeLightningThing") and plain["thing"]["state"] == {"value": 7}


def test_plain_checkpoint_loads_in_one_restricted_pass(tmp_path, monkeypatch):
    """One read, always through the restricted unpickler (torch's weights_only reader would call bytearray(n))."""
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"a": torch.ones(1)}, "p": pathlib.PosixPath("/a/b"), "b": b"\x00\xff"}, path)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append((kwargs.get("weights_only"), getattr(kwargs.get("pickle_module"), "Unpickler", None)))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    loaded = ck.load_checkpoint(path)
    assert loaded["p"] == pathlib.PosixPath("/a/b") and loaded["b"] == b"\x00\xff"
    assert len(calls) == 1 and calls[0][0] is False and issubclass(calls[0][1], ck._RestrictedUnpickler)


def test_weight_norm_key_spellings_are_mapped(tmp_path):
    torch.manual_seed(0)
    src = SynthesizerTrn(**tiny_model_kwargs())
    state = src.state_dict()
    renamed = {}
    for k, v in state.items():  # spell every weight-norm pair the parametrization way
        if k.endswith(".weight_g"):
            renamed[k[:-len("weight_g")] + "parametrizations.weight.original0"] = v
        elif k.endswith(".weight_v"):
            renamed[k[:-len("weight_v")] + "parametrizations.weight.original1"] = v
        else:
            renamed[k] = v
    assert renamed.keys() != state.keys()
    torch.manual_seed(1)
    dst = SynthesizerTrn(**tiny_model_kwargs())
    left = ck.load_weights(dst, renamed, "renamed")
    assert left == []
    for k, v in dst.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


def test_load_weights_rejects_shape_mismatch():
    a = SynthesizerTrn(**tiny_model_kwargs(num_symbols=40))
    b = SynthesizerTrn(**tiny_model_kwargs(num_symbols=32))
    with pytest.raises(ck.CheckpointError, match="enc_p.emb.weight"):
        ck.load_weights(b, a.state_dict(), "other vocabulary")


@pytest.mark.parametrize("quality,speakers", [("x-low", 1), ("high", 3)])
def test_infer_architecture_from_shapes(quality, speakers):
    kw = model_kwargs(quality, num_symbols=256, num_speakers=speakers)
    with torch.device("meta"):
        g = SynthesizerTrn(**kw).state_dict()
    arch = ck.infer_architecture(g)
    assert arch["quality"] == quality
    assert arch["num_symbols"] == 256 and arch["num_speakers"] == speakers
    assert arch["gin_channels"] == (512 if speakers > 1 else 0)
    assert arch["hidden_channels"] == kw["hidden_channels"] and arch["spec_channels"] == 513


def _meta_generator(kw):
    """Generator state dict (meta tensors: shapes only) in Lightning's layout."""
    with torch.device("meta"):
        return {"state_dict": {f"model_g.{k}": v for k, v in SynthesizerTrn(**kw).state_dict().items()}}


def _shapes(kw):
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in SynthesizerTrn(**kw).state_dict().items()}


_TINY_AUDIO = AudioConfig(sample_rate=16000, filter_length=128, hop_length=16, win_length=128, mel_channels=40,
                          mel_fmax=7000.0)


def test_model_config_of_our_checkpoint_is_the_recorded_one():
    kw = tiny_model_kwargs(num_symbols=40, num_speakers=3)
    ckpt = _meta_generator(kw)
    # As training saves them: tuples as lists; the recorded values win over the (stale) hyper-parameters.
    ckpt["vits_fast"] = {"model_kwargs": {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()},
                         "audio": _TINY_AUDIO.to_dict(), "quality": "tiny"}
    ckpt["hyper_parameters"] = {"num_symbols": 7, "sample_rate": 8000}
    kwargs, audio, quality = ck.model_config_from_checkpoint(ckpt)
    assert kwargs == kw and isinstance(kwargs["resblock_dilation_sizes"][0], tuple)
    assert audio == _TINY_AUDIO and quality == "tiny"


def test_model_config_from_piper_hyper_parameters():
    kw = tiny_model_kwargs(num_symbols=40, num_speakers=3, spec_channels=_TINY_AUDIO.spec_channels, segment_size=12,
                           n_layers=3)
    ckpt = _meta_generator(kw)
    ckpt["hyper_parameters"] = ck.piper_hyper_parameters(kw, _TINY_AUDIO, num_speakers=3,
                                                         training={"learning_rate": 2e-4})
    kwargs, audio, quality = ck.model_config_from_checkpoint(ckpt)
    assert kwargs == kw and audio == _TINY_AUDIO and quality is None
    # The shapes decide the vocabulary and the speakers whatever the hyper-parameters say.
    ckpt["hyper_parameters"].update(num_symbols=99, num_speakers=1, gin_channels=0)
    assert ck.model_config_from_checkpoint(ckpt)[0] == kw


def test_model_config_fills_missing_hyper_parameters_from_the_shapes_preset():
    kw = model_kwargs("x-low", num_symbols=100, num_speakers=1)
    ckpt = _meta_generator(kw)
    ckpt["hyper_parameters"] = {"num_symbols": 100, "sample_rate": 16000, "n_layers": 6}
    kwargs, audio, quality = ck.model_config_from_checkpoint(ckpt)
    assert quality == "x-low" and audio == AudioConfig(sample_rate=16000)
    assert kwargs == kw and _shapes(kwargs) == _shapes(kw)
    # Multi-speaker Piper model saved with gin_channels=0: Piper built it with 512 (the embedding's width).
    multi = model_kwargs("medium", num_symbols=100, num_speakers=4)
    ckpt = _meta_generator(multi)
    ckpt["hyper_parameters"] = {"num_symbols": 100, "num_speakers": 4, "gin_channels": 0}
    kwargs = ck.model_config_from_checkpoint(ckpt)[0]
    assert kwargs["gin_channels"] == 512 and kwargs == multi


@pytest.mark.parametrize("quality,speakers", [("x-low", 1), ("high", 3)])
def test_model_config_from_shapes_alone(quality, speakers):
    kw = model_kwargs(quality, num_symbols=120, num_speakers=speakers)
    ckpt = _meta_generator(kw)
    kwargs, audio, got_quality = ck.model_config_from_checkpoint(ckpt)
    assert got_quality == quality and kwargs == kw and audio == AudioConfig()
    seen = []
    _, audio, _ = ck.model_config_from_checkpoint(ckpt, default_sample_rate=lambda q: seen.append(q) or 16000)
    assert seen == [quality] and audio.sample_rate == 16000
    # A recorded sample rate is not replaced by the default.
    ckpt["hyper_parameters"] = {"sample_rate": 44100}
    _, audio, _ = ck.model_config_from_checkpoint(ckpt, default_sample_rate=lambda q: 16000)
    assert audio.sample_rate == 44100


def test_model_config_refuses_what_cannot_be_built():
    ckpt = _meta_generator(tiny_model_kwargs())  # no hyper-parameters, no preset has these sizes
    with pytest.raises(ck.CheckpointError, match="bare.pt: cannot tell how to build the model"):
        ck.model_config_from_checkpoint(ckpt, name="bare.pt")
    with pytest.raises(ck.CheckpointError, match="no enc_p.emb.weight"):
        ck.model_config_from_checkpoint({"state_dict": {"model_g.x": torch.zeros(1)}})
    with pytest.raises(ck.CheckpointError, match="x.pt is not a checkpoint"):
        ck.model_config_from_checkpoint([1, 2], name="x.pt")


def test_drop_speaker_conditioning_removes_exactly_the_conditioning():
    g = SynthesizerTrn(**tiny_model_kwargs(num_speakers=3)).state_dict()
    single = SynthesizerTrn(**tiny_model_kwargs(num_speakers=1)).state_dict()
    kept, dropped = ck.drop_speaker_conditioning(g)
    assert "emb_g.weight" in dropped and any(k.startswith("dec.cond.") for k in dropped)
    assert any("cond_layer" in k for k in dropped) and any(k.startswith("dp.cond.") for k in dropped)
    assert set(kept) == set(single)


def test_saved_checkpoint_layout_roundtrips_with_weights_only(tmp_path):
    torch.manual_seed(0)
    g = SynthesizerTrn(**tiny_model_kwargs())
    d = shrink_discriminator(MultiPeriodDiscriminator(), 16)
    opts = [torch.optim.AdamW(g.parameters()), torch.optim.AdamW(d.parameters())]
    scheds = [torch.optim.lr_scheduler.ExponentialLR(o, 0.9) for o in opts]
    path = tmp_path / "ours.ckpt"
    ck.save_checkpoint(path, g, d, opts, scheds, 2, 17, {"num_symbols": 32, "sample_rate": 16000},
                       {"rng": ck.rng_state(), "batch_in_epoch": 3})
    raw = torch.load(path, weights_only=True)  # no allow-list needed for our own files
    assert raw["epoch"] == 2 and raw["global_step"] == 17
    assert set(raw) >= {"state_dict", "optimizer_states", "lr_schedulers", "hyper_parameters",
                        "pytorch-lightning_version"}
    keys = list(raw["state_dict"])
    assert all(k.startswith(("model_g.", "model_d.")) for k in keys)
    assert any(k.endswith(".weight_g") for k in keys)  # Piper's legacy weight-norm names
    assert len(raw["optimizer_states"]) == 2 and len(raw["lr_schedulers"]) == 2
    g_state, d_state = ck.generator_state(raw)
    assert g_state.keys() == g.state_dict().keys() and d_state.keys() == d.state_dict().keys()
    # RNG state restores the exact stream
    before = torch.rand(5)
    ck.set_rng_state(raw["vits_fast"]["rng"])
    torch.manual_seed(123)
    state = ck.rng_state()
    a = torch.rand(4)
    ck.set_rng_state(state)
    torch.testing.assert_close(torch.rand(4), a, rtol=0, atol=0)
    assert before.shape == (5,)


def test_atomic_save_gives_an_ordinary_file_mode(tmp_path):
    """Checkpoints get the mode any new file gets under the umask (mkstemp alone would make them 0600)."""
    import os
    import stat

    umask = os.umask(0o022)
    try:
        ck.atomic_save({"x": 1}, tmp_path / "a.ckpt")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.ckpt").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]  # no temporary file left
