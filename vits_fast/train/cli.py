"""The command line of ``python -m vits_fast.train``: :func:`build_parser` and :func:`main`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch.distributed as dist

from .. import checkpoint as ckpt_lib
from ..config import PRESETS
from ..data import DataError
from ..guards import OverwriteError, number
from .step import COMPILE_MODES
from .trainer import NonFiniteLossError, Trainer, dist_info

_DESCRIPTION = "Train or fine-tune a Piper-compatible VITS voice."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vits_fast.train", description=_DESCRIPTION,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--dataset", "--dataset-dir", dest="dataset", type=Path, default=None,
                   help="LJSpeech folder (metadata.csv + wavs/), Piper preprocessed folder (config.json + "
                        "dataset.jsonl) or one of those files; default: the embedded demo corpus")
    d.add_argument("--output-dir", type=Path, default=Path("runs/default"),
                   help="where the run writes; a folder holding another run's checkpoints is refused unless "
                        "--resume continues that run or --overwrite is given")
    d.add_argument("--cache-dir", type=Path, default=None, help="spectrogram cache (default: OUTPUT/cache)")
    d.add_argument("--sample-rate", type=number(int, low=1000, high=384000), default=None,
                   help="default: the dataset's config.json, else 16000 for x-low/tiny and 22050 otherwise")
    d.add_argument("--single-speaker", action="store_true", help="ignore the speaker column")
    d.add_argument("--phonemizer", choices=("auto", "espeak", "characters"), default="auto",
                   help="auto: piper-tts's espeak-ng if installed, else characters (with a warning)")
    d.add_argument("--espeak-voice", default=None, help="default: the dataset config's, else en-us")
    d.add_argument("--max-phoneme-ids", type=number(int, low=1), default=None, help="leave out longer utterances (logged)")
    d.add_argument("--max-audio-seconds", type=number(float, low=0, high=3600, low_inclusive=False), default=60.0,
                   help="leave out utterances with more audio (logged; read from the file header, so a long file is "
                        "never loaded): the alignment search and the posterior encoder see the whole utterance")
    d.add_argument("--on-bad-item", choices=("skip", "fail"), default="skip",
                   help="missing/corrupt/empty items: skip them (each is logged by name) or stop")
    d.add_argument("--num-workers", type=number(int, low=0), default=None,
                   help="data worker processes (default: min(4, cpus) for caching and for CUDA training, 0 for "
                        "CPU training)")
    d.add_argument("--pin-memory", choices=("auto", "yes", "no"), default="auto")
    d.add_argument("--validation-split", type=number(float, low=0, high=0.9), default=0.05)
    d.add_argument("--num-test-examples", type=number(int, low=0), default=2, help="items synthesised as WAV at validation")
    m = p.add_argument_group("model")
    m.add_argument("--quality", choices=("tiny",) + tuple(PRESETS), default=None,
                   help="Piper preset (default: tiny on the demo corpus, medium otherwise)")
    m.add_argument("--segment-size", type=number(int, low=1), default=None, help="training window in samples (Piper: 8192)")
    m.add_argument("--init-from", type=Path, default=None,
                   help="warm start from a Piper/vits_fast .ckpt or a Piper .onnx voice (weights only; "
                        "architecture from the file)")
    m.add_argument("--resume", default=None, help="continue a run: a .ckpt path, or 'auto' for OUTPUT's last.ckpt")
    m.add_argument("--overwrite", action="store_true",
                   help="start a fresh run in an --output-dir that holds another run's checkpoints (files of the "
                        "same name, such as last.ckpt and config.json, are replaced; its other checkpoints are kept)")
    t = p.add_argument_group("training")
    t.add_argument("--batch-size", type=number(int, low=1), default=None, help="per process (default: 8 tiny, 32 otherwise)")
    t.add_argument("--max-steps", type=number(int, low=0), default=None, help="default: 150 on the demo corpus, unlimited otherwise")
    t.add_argument("--max-epochs", type=number(int, low=0), default=None)
    t.add_argument("--learning-rate", type=number(float, low=0, high=10, low_inclusive=False), default=2e-4)
    t.add_argument("--lr-decay", type=number(float, low=0, high=1, low_inclusive=False), default=0.999875,
                   help="ExponentialLR gamma, stepped per epoch")
    t.add_argument("--grad-clip", type=number(float, low=0, low_inclusive=False), default=None,
                   help="clip each model's gradient norm to this")
    t.add_argument("--precision", choices=("32", "bf16", "16"), default="32")
    t.add_argument("--compile", choices=COMPILE_MODES, default="off",
                   help="torch.compile the decoder and discriminator (fixed-size windows, so they compile once "
                        "per batch size; reduce-overhead also replays them as CUDA graphs). Off by default: "
                        "compiling takes minutes, and no GPU measurement shows the gain yet")
    t.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend for --compile (inductor; aot_eager to debug a compile problem)")
    t.add_argument("--on-nonfinite", choices=("skip", "stop"), default="skip",
                   help="a NaN/inf loss skips that update (logged) or stops training")
    t.add_argument("--max-nonfinite", type=number(int, low=1), default=25,
                   help="stop after this many consecutive steps with a non-finite loss (skipped updates leave "
                        "the weights as they were; NaN/inf weights are never saved)")
    t.add_argument("--seed", type=int, default=1234)
    t.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    t.add_argument("--find-unused-parameters", choices=("auto", "yes", "no"), default="auto",
                   help="DDP: auto probes one batch for parameters without gradient")
    t.add_argument("--dist-timeout-min", type=number(float, low=0, low_inclusive=False), default=120.0,
                   help="collective timeout (rank 0 may build the cache meanwhile)")
    o = p.add_argument_group("output")
    o.add_argument("--log-every", type=number(int, low=1), default=10)
    o.add_argument("--val-every", type=number(int, low=1), default=None,
                   help="steps (default: 50 on the demo, else 1000)")
    o.add_argument("--checkpoint-every", type=number(int, low=1), default=None,
                   help="steps (default: 50 on the demo, else 1000)")
    o.add_argument("--keep-checkpoints", type=number(int, low=1), default=3,
                   help="newest step checkpoints of this run to keep (older ones it wrote are deleted; files it "
                        "did not write never are)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    o.add_argument("--no-samples", action="store_true", help="skip synthesising WAVs at validation")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run training from command-line arguments; returns a summary (steps, loss history, checkpoint path)."""
    args = build_parser().parse_args(argv)
    world, rank, _ = dist_info()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    trainer = Trainer(args)
    try:
        trainer.setup()
        return trainer.fit()
    finally:
        if trainer.distributed and dist.is_initialized() and os.environ.get("VITS_FAST_KEEP_PG") != "1":
            dist.destroy_process_group()


def run(argv: Optional[Sequence[str]] = None) -> None:
    """:func:`main`, with the errors a user can fix (bad data, a non-finite run, an unusable checkpoint, an
    output that would overwrite something) as one message and exit status 1 instead of a traceback."""
    try:
        main(argv)
    except (DataError, NonFiniteLossError, ckpt_lib.CheckpointError, OverwriteError) as exc:
        logging.getLogger("vits_fast.train").error("%s", exc)
        sys.exit(1)
