"""Checkpoints across trainers: upstream piper1-gpl (Lightning 2) loads strictly, exports and resumes what vits_fast
writes, and vits_fast resumes and fine-tunes what piper1-gpl writes, at the same batch, with the same optimizer
settings and no hyper-parameter lost.

The Lightning-2 checkpoint is written by upstream's own ``VitsModel`` under a real ``lightning.Trainer.fit`` (one
batch of a tiny synthetic dataset, a few seconds) in a temporary folder rather than kept as test data: with Piper's
full-size discriminator and its Adam moments it is ~560 MB whatever the generator's size. piper-tts' wheel does not
build upstream's Cython alignment module; the fits here use vits_fast's compiled one, which has the same
``maximum_path_c(paths, values, t_ys, t_xs)`` signature.
"""

import functools
import json
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("librosa")

from vits_fast import checkpoint as ck  # noqa: E402
from vits_fast.monotonic_align import core as vits_fast_mas  # noqa: E402

from .test_train import _args, _trainer, cache_dir, corpus  # noqa: E402,F401  (fixtures)
from tests._util import one_thread  # noqa: E402,F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

_SHIM = "piper.train.vits.monotonic_align.monotonic_align"
sys.modules.setdefault(_SHIM, types.ModuleType(_SHIM))
sys.modules.setdefault(_SHIM + ".core", vits_fast_mas)
lightning = pytest.importorskip("lightning")
upstream = pytest.importorskip("piper.train.vits.lightning")
from piper.train import export_onnx  # noqa: E402
from piper.train.vits.dataset import Batch  # noqa: E402

#: Upstream hyper-parameters matching the test corpus (16 kHz, 2 speakers, 256 symbols) at a tiny size.
TINY_UPSTREAM = dict(batch_size=2, sample_rate=16000, num_symbols=256, num_speakers=2, gin_channels=8,
                     resblock="2", resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1, 2),),
                     upsample_rates=(4, 4, 4), upsample_initial_channel=16, upsample_kernel_sizes=(8, 8, 8),
                     filter_length=256, hop_length=64, win_length=256, mel_channels=40, inter_channels=16,
                     hidden_channels=16, filter_channels=32, n_layers=1, segment_size=1024, mos_metric=None)
DATA = Path(__file__).parent / "data"
#: Hyper-parameters of piper1-gpl that vits_fast does not use but must keep.
UPSTREAM_ONLY = ("learning_rate_d", "betas_d", "lr_decay_d", "use_mrd", "warmstart_ckpt", "vocoder_warmstart_ckpt",
                 "mos_metric")


def _batches(hp, n=3):
    """``n`` random batches of two items for an upstream model with hyper-parameters ``hp``."""
    g = torch.Generator().manual_seed(0)
    frames, spec = 40, hp["filter_length"] // 2 + 1
    out = []
    for _ in range(n):
        out.append(Batch(torch.randint(1, hp["num_symbols"], (2, 12), generator=g), torch.tensor([12, 10]),
                         torch.rand(2, spec, frames, generator=g), torch.tensor([frames, frames - 4]),
                         torch.rand(2, 1, frames * hp["hop_length"], generator=g) * 0.2 - 0.1,
                         torch.tensor([frames, frames - 4]) * hp["hop_length"],
                         torch.tensor([0, 1]) if hp["num_speakers"] > 1 else None))
    return out


class _Watch(lightning.Callback):
    """Records the step count and discriminator optimizer settings a fit starts from, and batches trained."""

    def on_train_start(self, trainer, module):
        self.start_step = trainer.global_step
        group = trainer.optimizers[1].param_groups[0]
        self.d_settings = (group["lr"], tuple(group["betas"]))
        self.batches = 0

    def on_train_batch_end(self, trainer, *args):
        self.batches += 1


def _upstream_fit(root, max_steps, ckpt_path=None, hp=TINY_UPSTREAM):
    """Upstream's ``Trainer.fit`` for ``max_steps`` optimizer steps (two per batch), fresh or resumed from
    ``ckpt_path``; returns (path of the checkpoint it saves, the :class:`_Watch`)."""
    model = (upstream.VitsModel.load_from_checkpoint(ckpt_path, map_location="cpu") if ckpt_path
             else upstream.VitsModel(**hp))
    watch = _Watch()
    trainer = lightning.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                                num_sanity_val_steps=0, default_root_dir=str(root), callbacks=[watch])
    data = torch.utils.data.DataLoader(_batches(model.hparams), batch_size=None)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    path = root / f"upstream-{max_steps}.ckpt"
    trainer.save_checkpoint(path)
    return path, watch


def _upstream_reads(path, tmp_path, monkeypatch):
    """Upstream's strict loader and ONNX exporter accept ``path``; returns the loaded model."""
    model = upstream.VitsModel.load_from_checkpoint(path, map_location="cpu")  # strict, as Piper does
    out = tmp_path / "upstream.onnx"
    monkeypatch.setattr(sys, "argv", ["export_onnx", "--checkpoint", str(path), "--output-file", str(out)])
    # torch 2.13 defaults to the dynamo exporter, which fails on upstream's model whatever its weights (a
    # data-dependent guard); upstream's code was written for the TorchScript exporter, used here.
    monkeypatch.setattr(torch.onnx, "export", functools.partial(torch.onnx.export, dynamo=False))
    export_onnx.main()
    assert out.stat().st_size > 10_000
    return model


def test_demo_checkpoint_is_read_exported_and_resumed_by_upstream(corpus, cache_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    t = _trainer(_args(corpus, cache_dir, out, "--max-steps", "1"))  # tiny preset: discriminator shrunk 16x
    t.fit()
    path = out / "checkpoints" / "last.ckpt"
    raw = ck.load_checkpoint(path)
    assert raw["global_step"] == 2 and ck.batches_done(raw) == 1
    assert raw["pytorch-lightning_version"] == ck.LIGHTNING_VERSION
    loops = raw["loops"]["fit_loop"]
    assert loops["epoch_loop.manual_optimization.optim_step_progress"]["total"]["completed"] == 2
    assert loops["epoch_loop.batch_progress"]["total"]["completed"] == 1

    model = _upstream_reads(path, tmp_path, monkeypatch)
    for key, value in t.model_g.state_dict().items():
        torch.testing.assert_close(model.model_g.state_dict()[key], value, rtol=0, atol=0)
    assert model.model_d.state_dict().keys() == t._piper_discriminator().state_dict().keys()
    assert raw["state_dict"]["model_d.discriminators.0.convs.0.weight_v"].dtype == torch.float16  # placeholder: half size
    assert (out / "checkpoints" / "last.ckpt").samefile(out / "checkpoints" / "epoch=0-step=1.ckpt")  # one copy
    # Upstream accepts every hyper-parameter the tiny preset writes (its VitsModel took them above).
    assert model.hparams.learning_rate_d == t.optim_d.param_groups[0]["lr"]

    # vits_fast resumes the trained shrunk discriminator and its optimizer, not the fresh Piper-sized one.
    r = _trainer(_args(corpus, cache_dir, out, "--resume", "auto", "--max-steps", "2"))
    assert r.global_step == 1
    for mine, theirs in ((r.model_d, t.model_d), (r.model_g, t.model_g)):
        for key, value in theirs.state_dict().items():
            torch.testing.assert_close(mine.state_dict()[key], value, rtol=0, atol=0)
    assert r.optim_d.state_dict()["state"][0]["exp_avg"].shape == t.optim_d.state_dict()["state"][0]["exp_avg"].shape

    # Upstream resumes it after the batch vits_fast trained (2 optimizer steps), with vits_fast's D settings.
    _, watch = _upstream_fit(tmp_path, 4, ckpt_path=path)
    assert watch.start_step == 2 and watch.batches == 1
    assert watch.d_settings == (t.optim_d.param_groups[0]["lr"], tuple(t.optim_d.param_groups[0]["betas"]))


@pytest.mark.parametrize("how", ["--resume", "--init-from"])
def test_lightning2_checkpoint_round_trip(corpus, cache_dir, tmp_path, monkeypatch, how):
    source, _ = _upstream_fit(tmp_path, 2)  # piper1-gpl's fit: 1 batch, global_step 2
    theirs = ck.load_checkpoint(source)
    assert ck.checkpoint_origin(theirs) == "lightning2" and ck.batches_done(theirs) == 1
    out = tmp_path / "run"
    t = _trainer(_args(corpus, cache_dir, out, how, str(source), "--max-steps", "2"))
    assert t.global_step == (1 if how == "--resume" else 0)
    # piper1-gpl's discriminator optimizer and schedule (Lightning 2 never steps its schedulers).
    group = t.optim_d.param_groups[0]
    assert (group["lr"], tuple(group["betas"]), t.sched_d.gamma) == (1e-4, (0.5, 0.9), 0.9999)
    assert t.lr_schedule == "none"
    t.fit()
    mine = ck.load_checkpoint(out / "checkpoints" / "last.ckpt")
    assert mine["global_step"] == 4 and mine["pytorch-lightning_version"] == theirs["pytorch-lightning_version"]
    assert "discriminator" not in mine["vits_fast"]  # Piper's full-size discriminator was trained as it is
    assert _key_tree(mine["loops"]) == _key_tree(theirs["loops"])  # the layout Lightning 2 writes and reads
    hp_theirs, hp_mine = ck.to_plain(theirs["hyper_parameters"]), ck.to_plain(mine["hyper_parameters"])
    assert set(hp_theirs) <= set(hp_mine)
    for key in UPSTREAM_ONLY:
        assert hp_mine[key] == hp_theirs[key], key
    assert t.optim_d.param_groups[0]["lr"] == 1e-4  # constant, as in piper1-gpl

    model = _upstream_reads(out / "checkpoints" / "last.ckpt", tmp_path, monkeypatch)
    assert model.hparams.lr_decay_d == 0.9999
    _, watch = _upstream_fit(tmp_path, 6, ckpt_path=out / "checkpoints" / "last.ckpt")
    assert watch.start_step == 4 and watch.batches == 1
    assert watch.d_settings == (1e-4, (0.5, 0.9))


def test_lightning2_multi_resolution_discriminator_is_kept_untouched(corpus, cache_dir, tmp_path, monkeypatch):
    source, _ = _upstream_fit(tmp_path, 2, hp={**TINY_UPSTREAM, "use_mrd": True})
    theirs = ck.load_checkpoint(source)
    mrd = {k: v for k, v in theirs["state_dict"].items() if k.startswith("model_mrd.")}
    n_mpd = sum(k.startswith("model_d.") for k in theirs["state_dict"])
    assert mrd and len(theirs["optimizer_states"][1]["param_groups"][0]["params"]) > n_mpd
    out = tmp_path / "run"
    t = _trainer(_args(corpus, cache_dir, out, "--resume", str(source), "--max-steps", "2"))
    t.fit()
    mine = ck.load_checkpoint(out / "checkpoints" / "last.ckpt")
    for key, value in mrd.items():  # weights and Adam moments of model_mrd exactly as upstream left them
        torch.testing.assert_close(mine["state_dict"][key], value, rtol=0, atol=0)
    before, after = theirs["optimizer_states"][1], mine["optimizer_states"][1]
    assert after["param_groups"][0]["params"] == before["param_groups"][0]["params"]
    n_own = len(list(t.model_d.parameters()))
    for i in before["param_groups"][0]["params"][n_own:]:
        torch.testing.assert_close(after["state"][i]["exp_avg"], before["state"][i]["exp_avg"], rtol=0, atol=0)
    assert not torch.equal(after["state"][0]["exp_avg"], before["state"][0]["exp_avg"])  # model_d did train
    assert ck.to_plain(mine["hyper_parameters"])["use_mrd"] is True

    _upstream_reads(out / "checkpoints" / "last.ckpt", tmp_path, monkeypatch)
    _, watch = _upstream_fit(tmp_path, 6, ckpt_path=out / "checkpoints" / "last.ckpt")
    assert watch.start_step == 4 and watch.batches == 1


def _from_skeleton(obj, g, name=""):
    """A checkpoint object rebuilt from ``tests/data/lightning1_skeleton.json``: random tensors of the recorded
    shapes and dtypes (Adam's second moments positive, its step counts 2), every other field as rhasspy Piper's
    trainer wrote it."""
    if isinstance(obj, dict) and set(obj) == {"tensor", "dtype"}:
        dtype = getattr(torch, obj["dtype"])
        if name == "step":
            return torch.full(obj["tensor"], 2, dtype=dtype)
        value = torch.randn(obj["tensor"], generator=g) * 0.1
        return (value.abs() * 1e-3 if name == "exp_avg_sq" else value).to(dtype)
    if isinstance(obj, dict):
        return {(int(k) if k.isdigit() else k): _from_skeleton(v, g, k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_skeleton(v, g, name) for v in obj]
    return obj


def _key_tree(obj):
    """The nested key structure of a dict (what Lightning's loops read), values dropped."""
    return {k: _key_tree(v) for k, v in obj.items()} if isinstance(obj, dict) else None


@pytest.fixture(scope="module")
def lightning1_ckpt(tmp_path_factory):
    """A Lightning-1 (rhasspy Piper) checkpoint after one batch: see tests/interop/rhasspy_piper.py."""
    skeleton = json.loads((DATA / "lightning1_skeleton.json").read_text())
    skeleton.pop("_made_by")
    ckpt = _from_skeleton(skeleton, torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("lightning1") / "lightning1.ckpt"
    torch.save(ckpt, path)
    return path, skeleton


@pytest.mark.parametrize("how", ["--resume", "--init-from"])
def test_lightning1_checkpoint_round_trip(corpus, cache_dir, tmp_path, lightning1_ckpt, how):
    source, skeleton = lightning1_ckpt
    theirs = ck.load_checkpoint(source)
    assert ck.checkpoint_origin(theirs) == "lightning1" and ck.batches_done(theirs) == 1
    out = tmp_path / "run"
    t = _trainer(_args(corpus, cache_dir, out, how, str(source), "--max-steps", "2"))
    assert t.global_step == (1 if how == "--resume" else 0)
    # rhasspy Piper: both optimizers with the generator's settings, both schedules stepped once per epoch.
    for opt, sched in ((t.optim_g, t.sched_g), (t.optim_d, t.sched_d)):
        group = opt.param_groups[0]
        assert (group["lr"], tuple(group["betas"]), sched.gamma) == (2e-4, (0.8, 0.99), 0.999875)
    assert t.lr_schedule == "per_epoch"
    t.fit()
    mine = ck.load_checkpoint(out / "checkpoints" / "last.ckpt")
    assert mine["global_step"] == 4 and mine["pytorch-lightning_version"] == skeleton["pytorch-lightning_version"]
    # The loops in the layout rhasspy Piper's Lightning wrote and reads, counting 2 batches (4 optimizer steps).
    assert _key_tree(mine["loops"]) == _key_tree(skeleton["loops"])
    fit = mine["loops"]["fit_loop"]
    assert fit["epoch_loop.batch_loop.optimizer_loop.optim_progress"]["optimizer"]["step"]["total"]["completed"] == 4
    assert fit["epoch_loop.state_dict"]["_batches_that_stepped"] == 2
    hp_theirs, hp_mine = skeleton["hyper_parameters"], ck.to_plain(mine["hyper_parameters"])
    for key, value in hp_theirs.items():
        if key not in ("learning_rate", "betas", "lr_decay", "batch_size", "num_workers", "num_test_examples",
                       "validation_split", "max_phoneme_ids", "seed", "grad_clip", "dataset"):  # the run's own
            assert json.loads(json.dumps(hp_mine[key])) == value, key  # tuples written, lists in the JSON


@pytest.mark.parametrize("speakers", [1, 2])
def test_voice_exported_by_upstream_imports_with_onnxruntime_audio(tmp_path, monkeypatch, speakers):
    """A voice written by upstream's own exporter (piper1-gpl's ``export_onnx``, from a checkpoint of upstream's
    ``VitsModel``) imports, and with zero noise the imported model's audio equals onnxruntime's on the file."""
    import numpy as np
    import onnxruntime as ort

    from tests._util import randomised
    from vits_fast import convert, voice_config

    model = upstream.VitsModel(**{**TINY_UPSTREAM, "num_speakers": speakers})
    randomised(model.model_g, seed=speakers, scale=0.2)  # upstream's init leaves some projections at zero
    ckpt = tmp_path / "upstream.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": lightning.__version__, "epoch": 0, "global_step": 0}, ckpt)
    onnx_path = tmp_path / "voice.onnx"
    monkeypatch.setattr(sys, "argv", ["export_onnx", "--checkpoint", str(ckpt), "--output-file", str(onnx_path)])
    monkeypatch.setattr(torch.onnx, "export", functools.partial(torch.onnx.export, dynamo=False))
    export_onnx.main()
    config = voice_config.make_voice_config(model.model_g, sample_rate=TINY_UPSTREAM["sample_rate"])
    voice_config.write_voice_config(config, voice_config.onnx_config_path(onnx_path))

    imported = convert.import_onnx_voice(onnx_path).model
    assert imported.n_speakers == speakers
    sess = ort.InferenceSession(str(onnx_path))
    gen = torch.Generator().manual_seed(3)
    for i, (length, scale) in enumerate([(7, 1.0), (19, 1.2)]):
        ids = torch.randint(1, 256, (1, length), generator=gen)
        sid = torch.tensor([i % speakers]) if speakers > 1 else None
        feed = {"input": ids.numpy(), "input_lengths": np.asarray([length]),
                "scales": np.asarray([0.0, scale, 0.0], dtype=np.float32)}
        if sid is not None:
            feed["sid"] = sid.numpy()
        want = sess.run(None, feed)[0].reshape(-1)
        with torch.no_grad():
            got = imported.infer(ids, torch.tensor([length]), sid=sid, noise_scale=0.0, noise_scale_w=0.0,
                                 length_scale=scale)[0].reshape(-1).numpy()
        assert got.shape == want.shape and np.abs(want).max() > 1e-2
        assert np.abs(got - want).max() <= 1e-3


def test_optimizer_state_split_and_join_are_inverse():
    p = [torch.nn.Parameter(torch.randn(3)) for _ in range(5)]
    opt = torch.optim.AdamW(p)
    sum(x.sum() for x in p).backward()
    opt.step()
    state = opt.state_dict()
    head, tail = ck.split_optimizer_state(state, 2)
    assert head["param_groups"][0]["params"] == [0, 1] and set(head["state"]) == {0, 1}
    assert tail["params"] == 3 and set(tail["state"]) == {0, 1, 2}
    torch.optim.AdamW(p[:2]).load_state_dict(head)  # loadable by an optimizer over the head only
    joined = ck.join_optimizer_state(head, tail)
    assert joined["param_groups"] == state["param_groups"]
    for i, one in state["state"].items():
        torch.testing.assert_close(joined["state"][i]["exp_avg"], one["exp_avg"], rtol=0, atol=0)


def test_loops_layouts_follow_the_lightning_version():
    two = ck.lightning_loops("2.6.6", epoch=3, batches=7, batch_in_epoch=2)["fit_loop"]
    assert two["epoch_loop.manual_optimization.optim_step_progress"]["total"]["completed"] == 14
    assert two["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]["step"]["total"]["completed"] == 14
    assert two["epoch_loop.batch_progress"]["current"]["completed"] == 2
    assert two["epoch_progress"]["current"]["completed"] == 3
    one = ck.lightning_loops("1.7.7", epoch=3, batches=7, batch_in_epoch=2)["fit_loop"]
    assert one["epoch_loop.batch_loop.optimizer_loop.optim_progress"]["optimizer"]["step"]["total"]["completed"] == 14
    assert one["epoch_loop.batch_loop.manual_loop.optim_step_progress"]["total"]["completed"] == 14
    assert one["epoch_loop.state_dict"]["_batches_that_stepped"] == 7
    # A vits_fast file from before the convention counted batches; Piper's count optimizer steps.
    assert ck.batches_done({"global_step": 6, "vits_fast": {}}) == 6
    assert ck.batches_done({"global_step": 6, "vits_fast": {"optimizer_steps_per_batch": 2}}) == 3
    assert ck.batches_done({"global_step": 6, "pytorch-lightning_version": "1.7.7"}) == 3
    assert ck.checkpoint_origin({"pytorch-lightning_version": "1.7.7"}) == "lightning1"
