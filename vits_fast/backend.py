"""Backend switch: the reference PyTorch path or the fused Triton kernels.

The backend is resolved at call time, most specific first:

1. a per-module override (``module.backend = "triton"`` or :func:`set_module_backend`),
2. the innermost ``with vits_fast.backend(name):`` block (thread-local),
3. the ``VITS_FAST_BACKEND`` environment variable,
4. ``"auto"``.

``auto`` uses Triton only when every tensor involved is on CUDA and Triton imports, and then, in eager
execution, only for the kernel families that pay there (:data:`AUTO_FUSED_FROM`: measured on a GPU, or estimated
by the cost model where no measurement exists yet). ``reference`` never uses it. ``triton`` insists on every
family: where Triton cannot run it raises :class:`BackendError` instead of falling back silently. CPU tensors
run Triton only under the interpreter (``TRITON_INTERPRET=1``, set before Triton is imported), which is how the
test-suite checks kernels on machines without a GPU. ONNX export, TorchScript and tracing always take the
reference path.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import nn

BACKENDS = ("auto", "reference", "triton")
ENV_VAR = "VITS_FAST_BACKEND"

_local = threading.local()


class BackendError(RuntimeError):
    """The requested backend cannot run here (Triton missing, or tensors it cannot handle)."""


def _check(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}: backend must be one of {BACKENDS}, got {name!r}")
    return name


def current_backend() -> str:
    """The backend set by the innermost context manager, else ``$VITS_FAST_BACKEND``, else ``"auto"``."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    return _check(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Run the enclosed code with backend ``name`` (``auto``, ``reference`` or ``triton``)."""
    _check(name, "vits_fast.backend")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def set_module_backend(module: nn.Module, name: Optional[str]) -> nn.Module:
    """Pin ``module`` and all its submodules to backend ``name`` (``None`` clears the override)."""
    if name is not None:
        _check(name, "set_module_backend")
    for m in module.modules():
        m.backend = name
    return module


_TRITON_IMPORTABLE: Optional[bool] = None


def triton_importable() -> bool:
    """True when ``import triton`` works (checked once)."""
    global _TRITON_IMPORTABLE
    if _TRITON_IMPORTABLE is None:
        try:
            import triton  # noqa: F401
        except Exception:
            _TRITON_IMPORTABLE = False
        else:
            _TRITON_IMPORTABLE = True
    return _TRITON_IMPORTABLE


#: Set by :mod:`vits_fast.audit` while it records: CPU tensors then count as device tensors (see :func:`on_host`).
_AUDIT_AS_DEVICE = False


def on_host(t: torch.Tensor) -> bool:
    """True when ``t``'s values can be read without waiting for a device (it lives in host memory). Value checks
    that would synchronise with a GPU run only where this holds; the sync audit turns it off so that a CPU run
    takes the branches a GPU run takes."""
    return t.device.type == "cpu" and not _AUDIT_AS_DEVICE


@contextlib.contextmanager
def host_as_device() -> Iterator[None]:
    """For the sync audit and the cost model: within the block, :func:`on_host` is False for CPU tensors too, and
    ``auto`` treats them as device tensors where the Triton interpreter is on."""
    global _AUDIT_AS_DEVICE
    before, _AUDIT_AS_DEVICE = _AUDIT_AS_DEVICE, True
    try:
        yield
    finally:
        _AUDIT_AS_DEVICE = before


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _exporting() -> bool:
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    onnx = getattr(torch, "onnx", None)
    return bool(onnx is not None and onnx.is_in_onnx_export())


def eager() -> bool:
    """True in plain eager execution: not tracing, scripting, exporting or compiling (code may then branch on
    tensor values, which a trace or a graph would freeze)."""
    return not (_exporting() or torch.compiler.is_compiling())


#: What ``auto`` runs fused in eager execution, per kernel family (a module's ``fused_family``): from how many
#: frames (batch x time of the module's input) the family's kernels run, (without autograd, with autograd
#: recording, i.e. synthesis and training); ``None``: never (backend ``triton`` still forces every family). The
#: kernels move their bytes at 90-117 % of the copy ceiling (H200), but each call costs host time (~0.15 ms per
#: call on the measured host, estimated for the eager fast path), so a family pays where it removes host
#: synchronisations, or where the device time it saves is not hidden behind the host: in a training step's
#: backward (device-bound) or on large batches. Sources: ``benchmarks/RESULTS.md`` (GPU run 1: H200, medium, fp32)
#: and the cost model (``benchmarks/ESTIMATES.md``, "The default backend"), H100 estimates, medium.
AUTO_FUSED_FROM: Dict[str, Tuple[Optional[int], Optional[int]]] = {
    "mas": (0, 0),         # alignment search: 19-83x the NumPy search, 1.4-9.8x the Cython one (measured)
    "spline": (0, 0),      # duration predictor's splines: 2.3x forward + backward, no host syncs (measured)
    # WaveNet stack and coupling flows: alone they measured 0.65x / 0.76x forward + backward (B=32, T=800, through
    # the dispatcher: host-bound). ESTIMATE: inside a training step each saves ~3 ms (the backward is device-bound),
    # in synthesis each costs (host-bound forward).
    "wn": (None, 0),
    "coupling": (None, 0),
    # HiFi-GAN decoder (the Generator), ESTIMATE: fused is better from 8 x 320 frames of synthesis (21.82 vs 21.97
    # ms), the reference at 7 x 320 (21.46 vs 21.82) and at a training window (32 x 32 frames: -1.2 ms per step).
    "hifigan": (2400, 2400),
    "resblock": (None, None),  # a ResBlock on its own; in a fused Generator its work is fused with the Generator's
    # Period discriminators as 1-D convolutions (a layout, not a Triton kernel). ESTIMATE: -36 ms per medium
    # training step, because the model rates folded convolutions at the 1-D efficiency; unmeasured, so off until
    # the GPU suite's ``test_period_layout`` shows it.
    "period": (None, None),
}


def _auto_fuses(family: Optional[str], x: torch.Tensor) -> bool:
    """``auto``'s choice for a call of ``family`` on ``x`` [B, ..., T] (tensors already on a device)."""
    if family is None or not eager():
        return True  # no family rule; or compiled code, which keeps every family (its graphs hold the fused ops)
    start = AUTO_FUSED_FROM[family][torch.is_grad_enabled()]
    return start is not None and x.shape[0] * x.shape[-1] >= start


def describe(device: torch.device, training: bool) -> str:
    """One line on what the current backend runs fused on ``device`` (for run logs)."""
    name = current_backend()
    if name == "reference" or (device.type != "cuda" and not interpreter_enabled()) or not triton_importable():
        return f"backend {name}: the reference path"
    if name == "triton":
        return "backend triton: every fused family"
    rules = {f: r[training] for f, r in AUTO_FUSED_FROM.items()}
    always = [f for f, r in rules.items() if r == 0]
    sized = [f"{f} from {r} frames" for f, r in rules.items() if r]
    never = [f for f, r in rules.items() if r is None]
    return (f"backend auto ({'training' if training else 'synthesis'}): fused {', '.join(always) or 'none'}"
            + (f"; {', '.join(sized)}" if sized else "") + f"; reference {', '.join(never) or 'none'}")


def use_triton(*tensors: torch.Tensor, module: Optional[nn.Module] = None, family: Optional[str] = None) -> bool:
    """Decide whether a fused op runs its Triton kernel for these tensors.

    ``family`` (default: ``module.fused_family``) selects ``auto``'s rule in :data:`AUTO_FUSED_FROM`. Returns
    ``False`` for the reference path. Raises :class:`BackendError` when ``triton`` was asked for and cannot run
    (Triton not importable, or CPU tensors without the interpreter).
    """
    name = getattr(module, "backend", None) if module is not None else None
    name = _check(name, f"{type(module).__name__}.backend") if name is not None else current_backend()
    if name == "reference" or _exporting():
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if name == "auto":
        on_device = on_cuda or (_AUDIT_AS_DEVICE and interpreter_enabled())
        return (on_device and triton_importable()
                and _auto_fuses(family or getattr(module, "fused_family", None), tensors[0]))
    if not triton_importable():
        raise BackendError("backend 'triton' was requested but `import triton` fails; install triton "
                           "or use backend 'auto'/'reference'")
    if not on_cuda and not interpreter_enabled():
        devices = sorted({str(t.device) for t in tensors})
        raise BackendError(f"backend 'triton' needs CUDA tensors, got tensors on {devices}; move the model "
                           "to a GPU, set TRITON_INTERPRET=1 (slow, for testing) or use backend 'auto'")
    return True
