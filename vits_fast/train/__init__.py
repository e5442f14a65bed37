"""Train or fine-tune a Piper-compatible VITS voice: ``python -m vits_fast.train``.

With no arguments it trains a tiny model on the speech corpus shipped in ``vits_fast/corpus`` on the CPU for a
few minutes, printing the falling losses and writing ``runs/default/checkpoints/last.ckpt`` and sample WAVs.
Real voices::

    python -m vits_fast.train --dataset my_ljspeech_folder --quality medium --batch-size 32 --precision bf16
    python -m vits_fast.train --dataset my_data --init-from en_US-lessac-medium.ckpt      # fine-tune
    torchrun --nproc_per_node 8 -m vits_fast.train --dataset my_data ...                  # DDP

One training step is Piper's: the generator pass (text/posterior encoders, flow, alignment search, duration
model, decoder on a random ``segment_size`` window), mel L1 x45 + KL + duration + LSGAN generator +
feature-matching losses; then the discriminator on the real window and the detached generated one. AdamW
(2e-4, betas 0.8/0.99, eps 1e-9) for each, ExponentialLR(0.999875) stepped once per epoch. Spectrograms, mels
and losses are float32 under every ``--precision``; the model forward runs under autocast for bf16/fp16 (fp16
with a gradient scaler). A non-finite loss is reported with its step and either skips the update or stops
(``--on-nonfinite``); it is never trained on.

Outputs in ``--output-dir``: ``checkpoints/epoch=E-step=S.ckpt`` and ``last.ckpt`` (Piper/Lightning layout,
see :mod:`vits_fast.checkpoint`), ``config.json`` (Piper voice config), ``train_log.jsonl`` (every logged
scalar), ``samples/step-S/*.wav``, ``bad_items.tsv`` when data was skipped, TensorBoard events when
``tensorboard`` is installed.

The package: :mod:`~vits_fast.train.cli` (command line), :mod:`~vits_fast.train.trainer` (the loop, checkpoints,
validation), :mod:`~vits_fast.train.step` (one training step, shared with the profiler and the benchmarks) and
:mod:`~vits_fast.train.log` (the run log).
"""

from .cli import build_parser, main
from .trainer import NonFiniteLossError, Trainer

__all__ = ["NonFiniteLossError", "Trainer", "build_parser", "main"]
