"""vits_fast: a drop-in, faster VITS/Piper text-to-speech library.

``from vits_fast import SynthesizerTrn`` replaces Piper's/VITS's class exactly (constructor, submodule names,
state_dict keys, outputs). Fused Triton kernels take over the WaveNet, coupling-flow, spline and alignment
work on CUDA tensors; choose the path with :func:`backend` or ``VITS_FAST_BACKEND``.
"""

from .backend import BackendError, backend, current_backend, set_module_backend
from .config import AudioConfig, PRESETS, QUALITIES, model_kwargs, tiny_model_kwargs
from .models import (
    DiscriminatorP,
    DiscriminatorS,
    DurationPredictor,
    Generator,
    MultiPeriodDiscriminator,
    PosteriorEncoder,
    ResidualCouplingBlock,
    StochasticDurationPredictor,
    SynthesizerTrn,
    TextEncoder,
)
from .monotonic_align import maximum_path

__version__ = "0.1.0"

__all__ = [
    "AudioConfig",
    "BackendError",
    "DiscriminatorP",
    "DiscriminatorS",
    "DurationPredictor",
    "Generator",
    "MultiPeriodDiscriminator",
    "PRESETS",
    "PosteriorEncoder",
    "QUALITIES",
    "ResidualCouplingBlock",
    "StochasticDurationPredictor",
    "SynthesizerTrn",
    "TextEncoder",
    "backend",
    "current_backend",
    "maximum_path",
    "model_kwargs",
    "set_module_backend",
    "tiny_model_kwargs",
]
