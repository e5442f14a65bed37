"""Measurement helpers and settings of the benchmark suite (see ``conftest.py`` for how to run it)."""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import pytest
import torch

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
IMPLS = ("reference", "compiled", "triton")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _env_list(name: str, default: str) -> List[str]:
    return [v.strip() for v in os.environ.get(name, default).split(",") if v.strip()]


BENCH_DTYPES = _env_list("VITS_FAST_BENCH_DTYPES", "fp32,bf16" if ON_CUDA else "fp32")
BUDGET_S = float(os.environ.get("VITS_FAST_BENCH_BUDGET_S", "0.5"))
_COMPILE = _env_list("VITS_FAST_BENCH_COMPILE", "all" if ON_CUDA else "none")
#: Intra-op threads on a CPU-only machine. The CPU entries are smoke-sized; on a shared CI box two OpenMP
#: threads spin against other jobs and run 10-30x slower than one, so one is the default.
#: (Set around each benchmark by an autouse fixture in ``conftest.py``.)
CPU_THREADS = int(os.environ.get("VITS_FAST_BENCH_CPU_THREADS", "1"))
#: One call longer than this (seconds) is timed with three CUDA-event runs instead of do_bench.
DO_BENCH_MAX_CALL_S = 0.25

for _d in BENCH_DTYPES:
    if _d not in DTYPES:
        raise pytest.UsageError(f"VITS_FAST_BENCH_DTYPES: unknown dtype {_d!r} (use fp32, bf16)")


# ----------------------------------------------------------------------------------------------------------
# skipping


def compile_enabled(config: str) -> bool:
    return "all" in _COMPILE or config in _COMPILE


def skip_reason(impl: str, config: str, *, cpu_configs: Optional[Iterable[str]] = None,
                cuda_configs: Optional[Iterable[str]] = None) -> Optional[str]:
    """Why the entry (implementation ``impl``, model config ``config``) does not run here, or None.

    ``cpu_configs`` / ``cuda_configs``: the configs the subject runs on a CPU-only machine / on CUDA (None: all).
    """
    if not ON_CUDA and impl == "triton":
        return "'triton' needs a CUDA device (the fused Triton kernels do not run on a CPU outside the interpreter)"
    if not ON_CUDA and impl == "auto":
        return "'auto' (the default backend) is the reference path on a CPU; on CUDA it picks the families that pay"
    if not ON_CUDA and impl in ("graphs", "fast"):
        return f"'{impl}' needs a CUDA device (CUDA graphs and the fused Triton kernels)"
    if not ON_CUDA and cpu_configs is not None and config not in cpu_configs:
        return (f"config {config!r} is timed on CUDA only; to stay within CI time the CPU suite runs "
                f"{', '.join(cpu_configs)} at small shapes")
    if ON_CUDA and cuda_configs is not None and config not in cuda_configs:
        return f"config {config!r} is the CPU smoke size; on CUDA the suite times {', '.join(cuda_configs)}"
    if impl in ("compiled", "fast") and not compile_enabled(config):
        where = "on a CPU (inductor takes minutes per graph here)" if not ON_CUDA else "by VITS_FAST_BENCH_COMPILE"
        return f"torch.compile entries are off {where}; set VITS_FAST_BENCH_COMPILE=all (or a config list) to run"
    return None


def skip_unless_runnable(impl: str, config: str, **kwargs) -> None:
    reason = skip_reason(impl, config, **kwargs)
    if reason:
        pytest.skip(reason)


# ----------------------------------------------------------------------------------------------------------
# measurement


def synchronize(device: torch.device = DEVICE) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device = DEVICE) -> Optional[int]:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated before (None if not measurable)."""
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:  # every allocation and free the profiler saw, in time order
        records = [e for e in prof.profiler.kineto_results.events()
                   if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    except AttributeError:
        return None
    records.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in records:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def device_times_ms(fn: Callable[[], Any], call_s: float, grad_to_none: Optional[Sequence[torch.Tensor]] = None
                    ) -> Dict[str, Any]:
    """Device time of ``fn`` on CUDA: do_bench median and 20/80 % quantiles, or 3 event-timed runs for long calls."""
    if call_s <= DO_BENCH_MAX_CALL_S:
        from triton.testing import do_bench

        p20, p50, p80 = do_bench(fn, warmup=25, rep=100, grad_to_none=list(grad_to_none or []) or None,
                                 quantiles=[0.2, 0.5, 0.8])
        return dict(device_ms_median=p50, device_ms_p20=p20, device_ms_p80=p80, device_timing="triton do_bench")
    times = []
    for _ in range(3):
        for t in grad_to_none or []:
            t.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return dict(device_ms_median=times[1], device_ms_p20=times[0], device_ms_p80=times[2], device_timing="events x3")


def measure(benchmark, fn: Callable[[], Any], *, group: str, impl: str, extra: Optional[Dict[str, Any]] = None,
            grad_to_none: Optional[Sequence[torch.Tensor]] = None, device: torch.device = DEVICE) -> Any:
    """Benchmark ``fn`` (which must not synchronise itself) as entry ``impl`` of ``group``.

    Calls: one warm-up (compilation, autotuning, lazy initialisation, allocator growth); one that measures the
    peak memory; one that gives the time estimate; on CUDA the device timing; then the timed rounds
    (``BUDGET_S`` worth, at least 3). Under ``--benchmark-disable`` the single call is the memory measurement.
    Returns what the last call of ``fn`` returned.
    """
    benchmark.group = group
    info = benchmark.extra_info
    info.update(impl=impl, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    info.update(extra or {})

    def timed():
        out = fn()
        synchronize(device)
        return out

    if benchmark.disabled:
        result = []
        peak = peak_memory_bytes(lambda: result.append(timed()), device)
        info["peak_mem_mb"] = None if peak is None else round(peak / 2**20, 3)
        return benchmark.pedantic(lambda: result[-1], rounds=1)
    timed()
    peak = peak_memory_bytes(timed, device)
    info["peak_mem_mb"] = None if peak is None else round(peak / 2**20, 3)
    start = time.perf_counter()  # a plain call sizes the rounds (on a CPU the memory call runs under the
    timed()                      # profiler, several times slower, which left some entries only 3 rounds)
    call_s = time.perf_counter() - start
    if device.type == "cuda":
        info.update(device_times_ms(fn, call_s, grad_to_none))
    rounds = int(max(3, min(200, BUDGET_S / max(call_s, 1e-6))))
    return benchmark.pedantic(timed, rounds=rounds, iterations=1)


def median_s(benchmark) -> Optional[float]:
    """Median wall time (s) of the finished benchmark, None when disabled."""
    stats = getattr(benchmark, "stats", None)
    if benchmark.disabled or stats is None:
        return None
    return stats.stats.median
