"""Shared machinery of the benchmark suite (pytest-benchmark).

How to run (from the repository root):

* ``pytest --benchmark-only``: the whole suite (the README's plain ``pytest`` skips it: ``--benchmark-skip`` is
  in pyproject's addopts and ``--benchmark-only`` overrides it);
* ``pytest benchmarks --benchmark-disable``: every entry once, no statistics (CI's check that the suite runs);
* ``pytest --benchmark-only --benchmark-json out.json`` then ``python benchmarks/report.py out.json``.

Every subject is one pytest-benchmark group per shape with one entry per implementation: ``reference`` (eager
PyTorch, ``vits_fast.backend("reference")``), ``compiled`` (``torch.compile`` of the reference) and ``triton`` (the
fused kernels); some subjects add their own (``cython`` for the alignment search, ``graphs`` and ``fast`` for
inference).
On a machine without CUDA the ``triton`` entries skip with a reason, and so do the Piper-sized training and
inference entries (a CPU runs the tiny model and small kernel shapes instead).

Measurement (``measure``): each timed callable ends with ``torch.cuda.synchronize()`` on CUDA, so the
pytest-benchmark numbers are wall-clock latencies. Beside them ``extra_info`` holds

* ``peak_mem_mb``: peak memory allocated during one call above what was allocated before it (CUDA: the caching
  allocator's peak; CPU: allocator events recorded by ``torch.profiler``);
* on CUDA, ``device_ms_median`` / ``device_ms_p20`` / ``device_ms_p80`` from ``triton.testing.do_bench``
  (CUDA events, L2 flushed between runs, no synchronize inside), or from three event-timed runs
  (``device_timing = "events x3"``) when one call is too long for do_bench's fixed repetitions;
* the shapes, the implementation and what each entry measures.

Environment knobs:

* ``VITS_FAST_BENCH_COMPILE``: ``all`` (default on CUDA), ``none`` (default on a CPU, where inductor takes
  minutes per graph here) or a comma list of configs (e.g. ``medium``) for which ``compiled`` entries run;
* ``VITS_FAST_BENCH_DTYPES``: comma list of ``fp32``, ``bf16`` (default ``fp32,bf16`` on CUDA, ``fp32`` on a CPU);
* ``VITS_FAST_BENCH_BUDGET_S``: seconds of timed rounds per entry (default 0.5; at least 3 rounds);
* ``VITS_FAST_BENCH_CPU_THREADS``: intra-op threads on a CPU-only machine (default 1, see ``_bench.py``).
"""

from __future__ import annotations

import datetime
import platform
from collections import OrderedDict
from typing import Any, Callable, Dict

import pytest
import torch

from _bench import CPU_THREADS, DEVICE, ON_CUDA


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # Runs before pytest-benchmark applies its skip marks. ``--benchmark-disable`` asks for every benchmark to
    # run once (CI); pyproject's addopts carry ``--benchmark-skip`` so that the plain test command skips the
    # suite. An explicit --benchmark-disable wins over that.
    session = getattr(config, "_benchmarksession", None)
    if session is not None and session.skip and config.getoption("benchmark_disable", False):
        session.skip = False
    if session is None:
        return
    # The terminal tables: unless asked otherwise, four columns (pytest-benchmark's ten are ~210 characters wide),
    # and on a CPU, where most groups hold a single entry (the others need CUDA), one table per benchmark
    # function. benchmarks/report.py gives the per-shape comparisons from --benchmark-json either way.
    if config.getoption("benchmark_columns") is None:
        session.columns = ["min", "median", "iqr", "rounds"]
    if not ON_CUDA and config.getoption("benchmark_group_by") == "group":
        session.group_by = "func"


def pytest_benchmark_update_machine_info(config, machine_info):
    info: Dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                            "cpu_threads": CPU_THREADS if not ON_CUDA else torch.get_num_threads(),
                            "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if ON_CUDA:
        props = torch.cuda.get_device_properties(DEVICE)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    sm_count=props.multi_processor_count, compute_capability=f"{props.major}.{props.minor}")
    else:
        info["gpu"] = None
    machine_info["vits_fast"] = info


# ----------------------------------------------------------------------------------------------------------
# fixtures


class LastCache:
    """Keeps the most recently built object per slot (building a new key drops the old one, freeing its memory).

    Parametrisations are ordered so that consecutive entries share a key (e.g. fwd, bwd, fwd+bwd of one compiled
    module), which compiles each module once.
    """

    def __init__(self) -> None:
        self._items: "OrderedDict[Any, Any]" = OrderedDict()

    def get(self, key: Any, build: Callable[[], Any]) -> Any:
        if key not in self._items:
            self._items.clear()
            if ON_CUDA:
                torch.cuda.empty_cache()
            self._items[key] = build()
        return self._items[key]

    def clear(self) -> None:
        self._items.clear()


@pytest.fixture(scope="session")
def case_cache():
    cache = LastCache()
    yield cache
    cache.clear()


@pytest.fixture(autouse=True)
def _benchmark_environment():
    """CPU-only machines: ``CPU_THREADS`` intra-op threads during each benchmark (restored after). CUDA: return
    the cached memory of the finished entry."""
    threads = torch.get_num_threads()
    if not ON_CUDA:
        torch.set_num_threads(CPU_THREADS)
    yield
    torch.set_num_threads(threads)
    if ON_CUDA:
        torch.cuda.empty_cache()
