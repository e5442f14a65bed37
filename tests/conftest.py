"""Test configuration shared by every test module.

* Triton runs in its CPU interpreter unless a GPU is present (``TRITON_INTERPRET`` must be set before
  ``import triton``, hence here, first).
* Hypothesis is deterministic: the ``ci`` profile (default) derandomizes and has no deadline; kernel tests
  under the slow interpreter pass ``max_examples`` explicitly with ``settings(...)``.
* On CUDA, TF32 is off: the tests compare against float64 references at fp32 tolerances, and cuDNN's default
  TF32 convolutions would put errors of ~1e-3 into every reference-path convolution.
* ``VITS_FAST_FAILURE_LOG=FILE`` appends each failure to FILE the moment it is reported (the GPU suite's test
  phase can be stopped at its time limit, and pytest-xdist prints failures only at the end of a session).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=25,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Device list for tests that run on every available device.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


_IS_XDIST_WORKER = False


def pytest_configure(config):
    global _IS_XDIST_WORKER
    _IS_XDIST_WORKER = hasattr(config, "workerinput")


def pytest_runtest_logreport(report):
    path = os.environ.get("VITS_FAST_FAILURE_LOG")
    if path and report.failed and not _IS_XDIST_WORKER:  # the controller sees every worker's reports
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"==== {report.nodeid} ({report.when}, {report.duration:.1f} s)\n{report.longreprtext}\n\n")


POISON_INT = -0x5A5A5A5B  # a bit pattern no index or count takes


@pytest.fixture(scope="module")
def poisoned_outputs():
    """Every buffer a kernel launcher allocates (``vits_fast.kernels._common.empty``: outputs and scratch) starts
    as garbage, NaN for floating dtypes and ``POISON_INT`` for integers, so an element a kernel forgets to write
    (or reads before writing) fails the test. Module scope, so that hypothesis tests run under it too; kernel test
    files use it with ``pytestmark = pytest.mark.usefixtures("poisoned_outputs")``."""
    from vits_fast.kernels import _common

    real = _common.empty

    def poisoned(shape, dtype, device):
        t = real(shape, dtype, device)
        if t.is_floating_point():
            return t.fill_(float("nan"))
        return t.fill_(POISON_INT) if t.dtype in (torch.int32, torch.int64) else t

    _common.empty = poisoned
    yield
    _common.empty = real
