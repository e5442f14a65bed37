"""Inference: real-time factor at batch 1, 8 and 32, and time to first audio when streaming.

Synthesis through :class:`vits_fast.inference.Synthesizer` (eval copy, weight norm folded, inference mode) of
random phoneme ids (CUDA: up to 160 ids, batches ragged down to 80; CPU: up to 12) with a randomly initialised
model of each preset (the durations, hence the audio length, come from the untrained duration predictor; the
noise is re-seeded every call, so every call makes the same audio). ``extra_info`` holds the audio seconds per
call and, when timed, ``rtf_median`` = median wall time / audio seconds (below 1 is faster than real time).

Entries: ``reference`` (eager, reference backend), ``compiled`` (decoder under ``torch.compile``, no CUDA graphs),
``triton`` (fused kernels, eager decoder), ``graphs`` (fused kernels, the eager decoder captured as CUDA graphs per
(batch, frames) bucket: ``FastDecoder(compile=False)``), ``fast`` (``Synthesizer(fast=True)``: fused kernels and
the compiled decoder replayed as CUDA graphs, the library's fastest path). Time to first audio streams the first
utterance (``Synthesizer.stream``: 16-frame first chunk) and stops at the first chunk on the host.
A CPU runs the tiny model (every batch) and x-low (batches 1 and 8, and time to first audio).
"""

from __future__ import annotations

import pytest
import torch

from _bench import DEVICE, ON_CUDA, measure, median_s, skip_unless_runnable
from vits_fast.profile import InferStep, Sizes

CONFIGS = ("tiny", "x-low", "medium", "high")
CPU_CONFIGS = ("tiny", "x-low")
CUDA_CONFIGS = ("x-low", "medium", "high")
INFER_IMPLS = ("reference", "compiled", "triton", "auto", "graphs", "fast")
WHAT = ("rtf-b1", "rtf-b8", "rtf-b32", "ttfa")
TEXT_LEN = 160 if ON_CUDA else 12
# config -> impl -> what: consecutive entries share one synthesizer (and its compiled decoder / graphs).
CASES = [(c, i, w) for c in CONFIGS for i in INFER_IMPLS for w in WHAT]


def _build(config: str, impl: str) -> InferStep:
    backend = "reference" if impl in ("reference", "compiled") else "auto" if impl == "auto" else "triton"
    decoder = {"reference": "eager", "triton": "eager", "auto": "eager", "compiled": "compiled", "graphs": "graphs",
               "fast": "compiled+graphs"}[impl]
    return InferStep(config, Sizes(1, TEXT_LEN, 0), DEVICE, backend=backend, decoder=decoder)


@pytest.mark.parametrize("config,impl,what", CASES, ids=[f"{c}-{i}-{w}" for c, i, w in CASES])
def test_infer(benchmark, case_cache, config, impl, what):
    skip_unless_runnable(impl, config, cpu_configs=CPU_CONFIGS, cuda_configs=CUDA_CONFIGS)
    step = case_cache.get(("infer", config, impl), lambda: _build(config, impl))
    extra = dict(subject="infer", config=config, text_len=TEXT_LEN, sample_rate=step.sample_rate)
    if what == "ttfa":
        step.set_inputs(Sizes(1, TEXT_LEN, 0))
        chunk = step.first_chunk()
        assert chunk.numel() > 0 and torch.isfinite(chunk).all()
        extra.update(batch=1, first_chunk_samples=int(chunk.numel()))
        measure(benchmark, step.first_chunk, group=f"time-to-first-audio [{config}, t_x={TEXT_LEN}]", impl=impl,
                extra=extra)
        return
    batch = int(what.split("-b")[1])
    if not ON_CUDA and config != "tiny" and batch == 32:
        pytest.skip(f"{config} at batch 32 takes tens of seconds per call on a CPU; the CPU suite runs it for tiny "
                    "only (CUDA runs every batch)")
    step.set_inputs(Sizes(batch, TEXT_LEN, 0))
    audio, lengths = step()
    assert torch.isfinite(audio).all() and int(lengths.min()) > 0
    audio_s = float(lengths.sum()) / step.sample_rate
    extra.update(batch=batch, audio_s=round(audio_s, 4), samples=int(lengths.sum()))
    measure(benchmark, step, group=f"infer RTF [{config}, batch {batch}, t_x<={TEXT_LEN}]", impl=impl, extra=extra)
    t = median_s(benchmark)
    if t is not None:
        benchmark.extra_info["rtf_median"] = t / audio_s
