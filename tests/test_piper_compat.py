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
import sys
import types

import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("librosa")

from vits_fast import checkpoint as ck  # noqa: E402
from vits_fast.monotonic_align import core as vits_fast_mas  # noqa: E402

from .test_train import _args, _one_thread, _trainer, cache_dir, corpus  # noqa: E402,F401  (fixtures)

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
