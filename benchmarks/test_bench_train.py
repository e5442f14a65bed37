"""A full Piper training step: generator forward, mels and losses, discriminator, both backward passes, both AdamW
updates (:class:`vits_fast.profile.TrainStep`: :func:`vits_fast.train.step.train_step`, the step the trainer runs).

Shapes (CUDA): batch 32, phoneme ids <= 200, frames <= 800 (ragged), Piper's 8192-sample window, for x-low,
medium and high, fp32 and bf16 autocast. Entries: ``reference`` (eager, reference backend: the alignment search
copies to the host), ``compiled`` (the reference with ``torch.compile`` on the decoder and the discriminator, the
two largest parts, whose window-sized shapes compile once), ``triton`` (the fused kernels everywhere they apply),
``fast`` (the fused kernels, with the decoder and discriminator compiled in ``reduce-overhead`` mode: CUDA graphs,
against the host time per launch the first GPU run found dominant).
A CPU runs the tiny model and x-low (batch 1, 8 ids, 16 frames and a 2048-sample window: a Piper-sized window takes
tens of seconds per step there).
"""

from __future__ import annotations

import pytest

from _bench import BENCH_DTYPES, DEVICE, IMPLS, ON_CUDA, measure, skip_unless_runnable
from vits_fast.profile import Sizes, TrainStep

CONFIGS = ("tiny", "x-low", "medium", "high")
CPU_CONFIGS = ("tiny", "x-low")
CUDA_CONFIGS = ("x-low", "medium", "high")
CUDA_SIZES = Sizes(32, 200, 800)
CPU_SIZES = {"tiny": Sizes(1, 8, 24), "x-low": Sizes(1, 8, 16, segment_frames=8)}
# "auto": the default backend (the fused families vits_fast.backend.AUTO_FUSED_FROM picks); "fast": every family
# fused plus the CUDA-graph-compiled decoder and discriminator
CASES = [(c, p, i) for c in CONFIGS for p in BENCH_DTYPES for i in IMPLS + ("auto", "fast")]


@pytest.mark.parametrize("config,precision,impl", CASES, ids=[f"{c}-{p}-{i}" for c, p, i in CASES])
def test_train_step(benchmark, config, precision, impl):
    skip_unless_runnable(impl, config, cpu_configs=CPU_CONFIGS, cuda_configs=CUDA_CONFIGS)
    sizes = CUDA_SIZES if ON_CUDA else CPU_SIZES[config]
    backend = {"triton": "triton", "fast": "triton", "auto": "auto"}.get(impl, "reference")
    step = TrainStep(config, sizes, DEVICE, backend=backend,
                     precision=precision, compile=impl in ("compiled", "fast"),
                     compile_mode="reduce-overhead" if impl == "fast" else "default")
    out = step()
    assert bool(out.finite), f"non-finite losses {out.values.tolist()}: the timing would be meaningless"
    seg = step.kwargs["segment_size"]
    extra = dict(subject="train-step", config=config, dtype=precision, batch=sizes.batch, text_len=sizes.text_len,
                 frames=sizes.frames, segment_frames=seg, compiled_parts="dec, mpd" if impl in ("compiled", "fast") else "",
                 audio_s_per_step=sizes.batch * seg * step.hop / step.audio.sample_rate)
    measure(benchmark, step, impl=impl, extra=extra,
            group=f"train-step [{config}, {precision}, B={sizes.batch}, t_x<={sizes.text_len}, t_y<={sizes.frames}]")
