"""Checks against rhasspy Piper's own training code (``piper_train``, pytorch-lightning 1.7), run by hand.

rhasspy Piper cannot be installed from PyPI (its training package is only in the GitHub repository) and pins
pytorch-lightning 1.7, so this script runs in a separate environment and is not part of the test suite. What it
established is kept: ``make`` wrote the skeleton ``tests/data/lightning1_skeleton.json`` that
``tests/test_piper_compat.py`` rebuilds a Lightning-1 checkpoint from, and ``check`` printed the results quoted in
the README ("Checkpoints across trainers").

Environment used (2026-12-01, the 2-core CPU development machine)::

    python3 -m venv rhvenv && . rhvenv/bin/activate
    pip install torch==2.13.0 pytorch-lightning==1.7.7 'torchmetrics<0.11' 'librosa<1' 'numpy<2' cython
    pip install --no-deps 'setuptools<70'          # pytorch-lightning 1.7 imports pkg_resources
    # rhasspy/piper at 73c04d8: src/python, with its Cython alignment module built in place
    PYTHONPATH=PIPER/src/python python tests/interop/rhasspy_piper.py make OUT_DIR
    PYTHONPATH=PIPER/src/python python tests/interop/rhasspy_piper.py check VITS_FAST.ckpt OUT_DIR

``make``: a real ``pytorch_lightning.Trainer.fit`` of upstream's ``VitsModel`` (tiny sizes, one batch of random
data) saves ``OUT_DIR/lightning1.ckpt`` and the skeleton: every non-tensor field as written, each tensor as its
name, shape and dtype (the full-size discriminator and its Adam moments make the real file ~560 MB).
``check``: upstream's strict ``load_from_checkpoint`` and ``export_onnx`` read a vits_fast checkpoint, and a fit
resumed from it starts at the step the file says, with the file's optimizer settings.
"""

import json
import sys
from pathlib import Path

import torch

# pytorch-lightning 1.7 checks schedulers against torch 1.x's ``_LRScheduler``, which torch 2's schedulers no
# longer derive from; the alias restores the check it was written for (no effect on what is checked here).
torch.optim.lr_scheduler._LRScheduler = torch.optim.lr_scheduler.LRScheduler
import pytorch_lightning as pl  # noqa: E402
from piper_train import export_onnx  # noqa: E402
from piper_train.vits.dataset import Batch  # noqa: E402
from piper_train.vits.lightning import VitsModel  # noqa: E402

#: Upstream hyper-parameters at a tiny size: 16 kHz, 2 speakers, 256 symbols (the vits_fast test corpus).
TINY = dict(num_symbols=256, num_speakers=2, batch_size=2, sample_rate=16000, gin_channels=8, resblock="2",
            resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1, 2),), upsample_rates=(4, 4, 4),
            upsample_initial_channel=16, upsample_kernel_sizes=(8, 8, 8), filter_length=256, hop_length=64,
            win_length=256, mel_channels=40, inter_channels=16, hidden_channels=16, filter_channels=32,
            n_layers=1, segment_size=1024)


def batches(hp, n=3):
    """``n`` batches of two random utterances for hyper-parameters ``hp``."""
    g = torch.Generator().manual_seed(0)
    frames, bins, hop = 40, hp["filter_length"] // 2 + 1, hp["hop_length"]
    return [Batch(torch.randint(1, hp["num_symbols"], (2, 12), generator=g), torch.tensor([12, 10]),
                  torch.rand(2, bins, frames, generator=g), torch.tensor([frames, frames - 4]),
                  torch.rand(2, 1, frames * hop, generator=g) * 0.2 - 0.1, torch.tensor([frames, frames - 4]) * hop,
                  torch.tensor([0, 1]) if hp["num_speakers"] > 1 else None) for _ in range(n)]


class Watch(pl.Callback):
    """Step count and discriminator optimizer settings a fit starts from; batches it trains."""

    def on_train_start(self, trainer, module):
        group = trainer.optimizers[1].param_groups[0]
        self.start = {"global_step": trainer.global_step, "lr_d": group["lr"], "betas_d": list(group["betas"])}
        self.batches = 0

    def on_train_batch_end(self, *args, **kwargs):
        self.batches += 1


def fit(out_dir: Path, max_steps: int, ckpt_path=None):
    """Upstream's fit for ``max_steps`` optimizer steps (two per batch); returns (saved checkpoint, watch)."""
    model = VitsModel.load_from_checkpoint(ckpt_path, dataset=None) if ckpt_path else VitsModel(**TINY)
    watch = Watch()
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, default_root_dir=str(out_dir), callbacks=[watch])
    trainer.fit(model, torch.utils.data.DataLoader(batches(model.hparams), batch_size=None), ckpt_path=ckpt_path)
    path = out_dir / f"lightning1-{max_steps}.ckpt"
    trainer.save_checkpoint(path)
    return path, watch


def skeleton(obj):
    """``obj`` with every tensor replaced by ``{"tensor": shape, "dtype": name}``, tuples as lists."""
    if isinstance(obj, torch.Tensor):
        return {"tensor": list(obj.shape), "dtype": str(obj.dtype).replace("torch.", "")}
    if isinstance(obj, dict):
        return {str(k): skeleton(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [skeleton(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot describe {type(obj).__name__}")


def make(out_dir: Path) -> None:
    path, watch = fit(out_dir, 2)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    ckpt["hyper_parameters"] = dict(ckpt["hyper_parameters"])
    data = skeleton(ckpt)
    data["_made_by"] = (f"tests/interop/rhasspy_piper.py make: rhasspy/piper 73c04d8 piper_train, pytorch-lightning "
                        f"{pl.__version__}, torch {torch.__version__}; Trainer.fit(max_steps=2), one batch")
    dest = Path(__file__).resolve().parents[1] / "data" / "lightning1_skeleton.json"
    dest.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"fit from scratch: {watch.batches} batch, global_step {ckpt['global_step']}; wrote {dest}")


def check(ckpt_path: Path, out_dir: Path) -> None:
    model = VitsModel.load_from_checkpoint(ckpt_path, dataset=None)  # strict, as export_onnx does
    print(f"load_from_checkpoint (strict): ok, {sum(p.numel() for p in model.parameters())} parameters")
    onnx_path = out_dir / "upstream.onnx"
    sys.argv = ["export_onnx", str(ckpt_path), str(onnx_path)]
    torch_export = torch.onnx.export
    # torch >= 2.9 defaults to the dynamo exporter; upstream's code was written for the TorchScript one.
    torch.onnx.export = lambda *a, **k: torch_export(*a, **{**k, "dynamo": False})
    export_onnx.main()
    print(f"export_onnx: ok, {onnx_path.stat().st_size} bytes")
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    steps = saved["global_step"]
    _, watch = fit(out_dir, steps + 2, ckpt_path=str(ckpt_path))
    print(f"resume: file global_step {steps}; upstream starts at {watch.start['global_step']}, trains "
          f"{watch.batches} batch, discriminator lr {watch.start['lr_d']} betas {watch.start['betas_d']}")
    assert watch.start["global_step"] == steps and watch.batches == 1, watch.start


if __name__ == "__main__":
    command, *paths = sys.argv[1:]
    if command == "make":
        make(Path(paths[0]))
    elif command == "check":
        check(Path(paths[0]), Path(paths[1]))
    else:
        sys.exit(f"unknown command {command!r}: make OUT_DIR | check CKPT OUT_DIR")
