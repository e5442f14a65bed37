"""Test configuration shared by every test module.

* Triton runs in its CPU interpreter unless a GPU is present (``TRITON_INTERPRET`` must be set before
  ``import triton``, hence here, first).
* Hypothesis is deterministic: the ``ci`` profile (default) derandomizes and has no deadline; kernel tests
  under the slow interpreter pass ``max_examples`` explicitly with ``settings(...)``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
