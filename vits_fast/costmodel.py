"""Estimated GPU time of a VITS workload, from a CPU: ``python -m vits_fast.profile --estimate h100``.

Every number this module prints is an **estimate**, not a measurement.

How
---
The workload (:class:`vits_fast.profile.TrainStep` or :class:`vits_fast.profile.InferStep`, the same builders the
profiler and the benchmarks run) is built on the CPU and then run once under ``FakeTensorMode`` (from
``torch._subclasses.fake_tensor``, with ``allow_non_fake_inputs=True``): every computation on parameters becomes a
fake tensor (shapes, no data), so a Piper-medium training step at batch 32 takes seconds; small computations on the
batch alone (ids, lengths, masks, noise) stay real (see below). The fused path is forced with
``vits_fast.backend("triton")`` (the custom ``vits_fast::*`` ops then run their registered fake implementations;
the CPU tensors pass the backend check through ``TRITON_INTERPRET=1``, which is set only while the fake run lasts
and launches nothing); the reference path with ``"reference"``. A ``TorchDispatchMode`` records every operator that
reaches the dispatcher:

* **bytes**: the sizes of its tensor inputs and outputs (broadcast dimensions count once); for a fused
  ``vits_fast::*`` operator its own formula, :func:`vits_fast.profile.min_bytes` (inputs read once, outputs
  written once), which the first GPU run measured at ~100 % of copy bandwidth for the WaveNet kernels;
* **FLOPs**: ``torch.utils.flop_counter``'s formulas (convolutions, matrix products, attention);
* **stage**: the innermost active ``vits.<stage>`` range (:func:`vits_fast.commons.stage`);
* **module**: the innermost module (``torch.utils.module_tracker`` in the forward; a backward op gets the module
  recorded, during the forward, on the autograd node that runs it).

Views (``view``, ``as_strided``, ``unsqueeze``, ``detach``...) and allocations move no bytes and launch nothing and
are not counted. Each remaining operator is estimated as

    device = max(bytes / copy bandwidth, FLOPs / peak(dtype, op kind)) + kernels x device launch floor
    host   = dispatch + launch cost of its kind (aten op from Python, aten op from the autograd engine, aten op
             under inference_mode, custom op + Triton launch) + further kernels x a C++ launch

and every stage as ``max(device, host)``: the GPU runs asynchronously, so a stage costs whichever side is slower
(a host-bound stage leaves the GPU idle). A host synchronisation cuts a stage in two (the host waits there until
the device has drained its queue): each piece costs ``max(device, host)`` of its ops. The step is the sum of its
stages.

Op-specific costs
~~~~~~~~~~~~~~~~~
* cuDNN's fp32/TF32 1-D and 2-D convolutions with a kernel wider than 1 run in NHWC: each convolution pass (forward,
  input gradient, weight gradient) adds layout transposes of its operands (``CONV_LAYOUT_KERNELS`` launches, one
  read + write of input, weight and output). The first GPU profile shows them: 618 + 2558 ``nchwToNhwc`` and 1563
  ``nhwcToNchw`` launches per medium training step, ~21 ms of device time.
* ``vits_fast::maximum_path`` is a wavefront over frames, latency-bound: ``t_y x MAS_STEP_S`` (0.37-0.46 us per
  frame measured: 295 us at t_y = 800, 936 us at t_y = 2048).
* ``_foreach_*`` and ``_fused_adam*`` ops launch one kernel per ``FOREACH_TENSORS_PER_LAUNCH`` tensors. A
  non-fused AdamW is switched to its foreach implementation, what it picks on CUDA (on a CPU it would loop over
  the parameters).
* Data-dependent reads (``.item()``, ``nonzero``, boolean indexing) are host synchronisations: counted per stage.
  Inputs that come from the batch (ids, lengths) stay real tensors, so reads of them get their true values;
  reads of computed values are answered by assumption and listed: a boolean mask is all true, and an integer read
  (synthesis' output length) is ``frames_per_id x`` the text length. The model's input value checks, which
  the fused path skips for CUDA tensors, run here on CPU tensors: a few small ops in ``SynthesizerTrn (no
  range)``.
* The reference alignment search (Cython on the host) is counted as a device-to-host copy, a host search of
  ``HOST_MAS_CELL_S`` per cell, and a host-to-device copy.

Constants and their sources
~~~~~~~~~~~~~~~~~~~~~~~~~~~
H200 (``--estimate h200``): measured on an H200 (SXM, 132 SMs), torch 2.11, CUDA 13.0, 2026-11-30, by
``benchmarks/calibrate.py`` (:data:`H200_CALIBRATION`; ``benchmarks/RESULTS.md``, GPU run 1): copy 4.24 TB/s
(read + write), matmul fp32 51.3 / TF32 364 / bf16 687 / fp16 679 TFLOP/s, 1-D convolution fp32 42.7 / TF32 261 / bf16 419 / fp16 408
TFLOP/s; host: 10.9 us per PyTorch op launch, 13.9 us per Triton launch.

H100 and A100: **datasheet numbers scaled by the fraction the H200 achieved of its own datasheet** (not measured):
H200 datasheet 4.8 TB/s, fp32 67, TF32 495, bf16/fp16 989 TFLOP/s (dense) -> achieved fractions copy 0.884, matmul
0.766 / 0.735 / 0.695 / 0.686, conv 0.638 / 0.528 / 0.424 / 0.413. H100 SXM: 3.35 TB/s, same compute as the H200
(same GH100 chip). A100 SXM 80 GB: 2.039 TB/s, fp32 19.5, TF32 156, bf16/fp16 312 TFLOP/s. The host constants of
all three are the H200 host's.

The constants the GPU run did not measure directly, and why they are what they are:

* ``kernel_floor_s`` = 3 us: the shortest kernels of the H200 profile take 2.5-4 us per launch (tiny reductions
  and elementwise kernels of the alignment-search subject);
* ``extra_launch_s`` = 3 us: host time of each further kernel one op launches from C++ (cuDNN's transposes,
  multi-tensor chunks); an assumption (no measurement isolates it);
* ``conv_efficiency``: see :data:`CONV_EFFICIENCY` (from the profile's kernel table);
* the host cost per op of each kind, **fitted** to H200 benchmarks that are host-bound (their estimated device time
  is well below the measured time), with the op counts the fake run records:

  =====================  ========  ===============================================================================
  constant               value     fit
  =====================  ========  ===============================================================================
  ``aten_op_s``          33.9 us   reference WaveNet forward (medium, B=32, T=800): 6.66 ms = 192 ops (+ 48 extra
                                   launches)
  ``custom_op_s``        146 us    fused WaveNet forward: 11.73 ms = 64 aten ops + 32 custom ops x (280 + 13.9 us)
                                   through the dispatcher, x 0.52 for the eager fast path (see below)
  ``autograd_op_s``      17.6 us   fused WaveNet backward: 12.94 ms = 176 autograd ops + 32 custom ops
  ``inference_op_s``     26.2 us   reference synthesis, medium, batch 1: 27.31 ms = 1019 ops under inference_mode
  =====================  ========  ===============================================================================

  Through ``torch.library``'s dispatcher a custom op cost ~8 aten ops of host time on that host: the Python
  dispatch and autograd wrapper, the kernel wrapper's checks and ``torch.cuda.device`` context, and Triton's
  argument binding, on a host whose bare PyTorch launch takes 10.9 us. Since then plain eager calls skip the
  dispatcher (``kernels._common.FusedOp``); ``benchmarks/test_bench_dispatch.py`` measured the host time of a fused
  call, forward + backward, at 0.52 of the dispatcher path's on a 2-core CPU (24.9 vs 47.9 us per call, median of
  three runs, launches excluded), so ``custom_op_s`` is the fitted 280 us x 0.52 = 146 us: **an estimate** until a
  GPU run measures it (``--custom-op-us 280`` gives the dispatcher path; the fake run itself always goes through
  the dispatcher, which records the ops). ``--calibration`` scales all four by the file's ``launch_s.torch`` /
  10.9 us.

``--calibration FILE`` (the JSON ``benchmarks/calibrate.py`` writes) replaces the device rates and launch costs; the
other constants have their own flags (see :func:`add_arguments`).

Notes: the estimate against the H200 measurements (first GPU run, 2026-11-30)
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Measured: device median of the benchmark suite (``benchmarks/RESULTS.md``, GPU run 1, "All entries"); estimated: ``--estimate
h200`` with the dispatcher path's ``--custom-op-us 280`` (the code measured then had no eager fast path). The fit points above are not validations; these are (ms per step or call; ratio = reference / fused):

==================================  ================  ================  ==============
workload                            reference         fused             ratio
                                    est. / measured   est. / measured   est. / meas.
==================================  ================  ================  ==============
train-step medium fp32, B=32        229.3 / 303.8     178.5 / 238.8     1.28 / 1.27
train-step x-low fp32, B=32         218.3 / 310.1     169.1 / 224.0     1.29 / 1.38
train-step high fp32, B=32          247.7 / 317.3     196.9 / 226.7     1.26 / 1.40
train-step medium bf16, B=32        226.6 / 297.1     193.2 / 325.1     1.17 / 0.91
synthesis medium, batch 32          37.0 / 45.06      36.3 / 42.31      1.02 / 1.07
synthesis medium, batch 1           (fit) / 27.31     26.2 / 24.64      1.04 / 1.11
WaveNet fwd + bwd, B=32, T=800      15.3 / 17.32      24.7 / 26.59      0.62 / 0.65
==================================  ================  ================  ==============

Known gaps, in order of size:

* **bf16 training**: measured, the fused step is *slower* than the reference (325 vs 297 ms); the estimate has it
  faster. Nothing in the model produces that; a bf16 profile is needed (candidates: the fused kernels' mixed-dtype
  paths under autocast, extra casts around the custom ops, which autocast does not see through). The fake run
  also uses CPU autocast, whose lists of ops cast to bf16 differ from CUDA's in a few ops.
* **fp32 training is estimated 25-30 % short on both paths** (all three presets alike), while the ratio is close.
  The forward stages' device estimates agree with the profile's per-stage device times (discriminator 19.0 vs 17.3
  ms, text encoder 2.8 vs 3.6, posterior encoder 3.1 vs 4.6, optimizer 1.4 vs 2.4), so the missing time is host
  time and backward device time, which the profile does not split (backward kernels run on autograd's thread,
  outside the stage range). Candidates: Python work between ops that is no op (under the profiler the text encoder
  costs ~2x the host time per op of the losses; one constant per op kind averages that out), and the 2-D
  convolutions' backward efficiency, fitted from a 15-row kernel table. (That table also lists ``AdamW.step`` at
  18.9 ms: that is the CPU-side range's total, not kernels; the optimizer stage's device time is 2.4 ms.)
* Synthesis at batch 32 is estimated 8-14 % short (decoder device time).
* Host constants belong to one host (a VM with a slow 10.9 us bare launch); on another host the host columns move
  with it (``--calibration`` with that host's ``launch_s``).
* Reference-path syncs (boolean indexing in the duration predictor's spline: 48 forward, 56 backward) are modelled
  as queue drains, the reference alignment search as a host Cython search plus PCIe copies; neither was measured
  alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

# --------------------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------------------

#: Launches cuDNN adds per NHWC convolution pass (two nchwToNhwc, one nhwcToNchw).
CONV_LAYOUT_KERNELS = 3
#: Host time of a fused-op call through the eager fast path over the dispatcher path, forward + backward,
#: measured by ``benchmarks/test_bench_dispatch.py`` on a 2-core CPU (24.9 / 47.9 us, medians of three runs,
#: 2026-12-01).
EAGER_OP_RATIO = 0.52
#: Seconds per frame of the fused alignment search's wavefront (H200 profile: 295 us / 800, 936 us / 2048 frames).
MAS_STEP_S = 0.4e-6
#: Host seconds per cell of the Cython alignment search (H200 host: 9.5 ms for 16 x 512 x 2048 cells).
HOST_MAS_CELL_S = 0.57e-9
#: Tensors per launch of a multi-tensor-apply (``_foreach_*``) kernel (PyTorch's limit for 3-4 tensor lists).
FOREACH_TENSORS_PER_LAUNCH = 48
#: Inputs and outputs at most this many elements, made from real (batch) tensors only, are computed for real.
REAL_LIMIT = 1 << 16
#: Host-to-device / device-to-host copy bandwidth (pageable memory, PCIe 5 / NVLink-C2C hosts), bytes/s.
HOST_COPY_BYTES_PER_S = 20e9

#: Fraction of the calibrated 1-D convolution rate each convolution class achieves, fitted to the H200 profile of
#: 2026-11-30 (kernel table of ``--workload kernel:wn`` and ``train-step``, medium, B = 32): the WaveNet's dilated
#: k=5 convolutions ran forward at 192 TFLOP/s (0.74 of 261), input + weight gradients at 176 TFLOP/s (0.67); the
#: discriminators' 2-D (k, 1) convolutions, for which cuDNN's heuristics pick non-tensor-core kernels
#: (``wgrad_alg1_engine``, ``implicit_convolve_sgemm``), at roughly 85 TFLOP/s forward (0.32) and 26 TFLOP/s
#: backward (0.10).
CONV_EFFICIENCY = {"conv1d": 0.74, "conv1d_bwd": 0.67, "conv2d": 0.32, "conv2d_bwd": 0.10}

_DTYPES = ("fp32", "tf32", "bf16", "fp16")
#: Dense datasheet numbers (bytes/s; FLOP/s per dtype) of the supported GPUs.
DATASHEET = {
    "h200": dict(bandwidth=4.8e12, flops=dict(fp32=67e12, tf32=494.7e12, bf16=989e12, fp16=989e12)),
    "h100": dict(bandwidth=3.35e12, flops=dict(fp32=67e12, tf32=494.7e12, bf16=989e12, fp16=989e12)),
    "a100": dict(bandwidth=2.039e12, flops=dict(fp32=19.5e12, tf32=156e12, bf16=312e12, fp16=312e12)),
}

#: The H200 calibration of the first GPU run (``benchmarks/calibrate.py``, 2026-11-30; rounded to 3 digits).
H200_CALIBRATION = {
    "device": "NVIDIA H200 (measured 2026-11-30, torch 2.11, CUDA 13.0)",
    "copy_bytes_per_s": 4.244e12,
    "matmul_flops_per_s": {"fp32": 51.30e12, "tf32": 363.7e12, "bf16": 687.2e12, "fp16": 678.7e12},
    "conv1d_flops_per_s": {"fp32": 42.72e12, "tf32": 261.0e12, "bf16": 418.9e12, "fp16": 408.2e12},
    "launch_s": {"torch": 10.89e-6, "triton": 13.86e-6},
}


@dataclass(frozen=True)
class Constants:
    """Everything an estimate depends on. Rates in bytes/s and FLOP/s, times in seconds."""

    device: str
    source: str
    copy_bytes_per_s: float
    matmul_flops: Dict[str, float]
    conv_flops: Dict[str, float]
    #: Achieved fraction of ``conv_flops`` per convolution class (see the module docstring, "Constants").
    conv_efficiency: Dict[str, float] = field(default_factory=lambda: dict(CONV_EFFICIENCY))
    kernel_floor_s: float = 3e-6
    aten_op_s: float = 33.9e-6
    autograd_op_s: float = 17.6e-6
    inference_op_s: float = 26.2e-6
    #: host time of each further kernel one op launches from C++ (cuDNN's layout transposes, foreach chunks)
    extra_launch_s: float = 3e-6
    #: the dispatcher path's fitted 280 us x the eager fast path's measured CPU ratio 0.52 (module docstring)
    custom_op_s: float = 280e-6 * EAGER_OP_RATIO
    triton_launch_s: float = H200_CALIBRATION["launch_s"]["triton"]
    mas_step_s: float = MAS_STEP_S
    host_mas_cell_s: float = HOST_MAS_CELL_S
    host_copy_bytes_per_s: float = HOST_COPY_BYTES_PER_S
    host_scalar_s: float = 1e-6


def _scaled(gpu: str) -> Constants:
    """Datasheet numbers of ``gpu`` times the fraction of its datasheet the H200 achieved (labelled as such)."""
    h200, sheet = DATASHEET["h200"], DATASHEET[gpu]
    bw = sheet["bandwidth"] * H200_CALIBRATION["copy_bytes_per_s"] / h200["bandwidth"]
    mm = {d: sheet["flops"][d] * H200_CALIBRATION["matmul_flops_per_s"][d] / h200["flops"][d] for d in _DTYPES}
    cv = {d: sheet["flops"][d] * H200_CALIBRATION["conv1d_flops_per_s"][d] / h200["flops"][d] for d in _DTYPES}
    return Constants(gpu.upper(), f"{gpu.upper()} datasheet scaled by the H200's achieved fraction (not measured)",
                     bw, mm, cv)


def device_constants(gpu: str) -> Constants:
    """Default constants of ``gpu`` (``h100``, ``h200`` or ``a100``)."""
    if gpu not in DATASHEET:
        raise ValueError(f"--estimate must be one of {tuple(DATASHEET)}, got {gpu!r}")
    if gpu == "h200":
        c = H200_CALIBRATION
        return Constants("H200", "measured on an H200, benchmarks/calibrate.py 2026-11-30", c["copy_bytes_per_s"],
                         dict(c["matmul_flops_per_s"]), dict(c["conv1d_flops_per_s"]))
    return _scaled(gpu)


def load_calibration(path: str, base: Constants) -> Constants:
    """``base`` with the device and launch numbers of a ``benchmarks/calibrate.py`` JSON file replaced."""
    with open(path) as f:
        cal = json.load(f)
    try:
        mm, cv = cal["matmul_flops_per_s"], cal["conv1d_flops_per_s"]
        rates = [float(cal["copy_bytes_per_s"])] + [float(mm[d]) for d in _DTYPES] + [float(cv[d]) for d in _DTYPES]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a benchmarks/calibrate.py file (need copy_bytes_per_s and "
                         f"matmul/conv1d_flops_per_s for {_DTYPES}): {exc!r}") from None
    if not all(math.isfinite(r) and r > 0 for r in rates):
        raise ValueError(f"{path}: rates must be finite and positive, got {rates}")
    launch = cal.get("launch_s", {})
    kw = {}
    torch_launch, triton_launch = launch.get("torch"), launch.get("triton")
    if isinstance(torch_launch, (int, float)) and 0 < torch_launch < 1:
        # the fitted host costs scale with the host's bare launch time (H200 host: 10.9 us)
        f = torch_launch / H200_CALIBRATION["launch_s"]["torch"]
        kw.update(aten_op_s=base.aten_op_s * f, autograd_op_s=base.autograd_op_s * f,
                  inference_op_s=base.inference_op_s * f, custom_op_s=base.custom_op_s * f)
    if isinstance(triton_launch, (int, float)) and 0 < triton_launch < 1:
        kw["triton_launch_s"] = float(triton_launch)
    return replace(base, device=str(cal.get("device", base.device)), source=f"calibration file {path}",
                   copy_bytes_per_s=rates[0], matmul_flops={d: float(mm[d]) for d in _DTYPES},
                   conv_flops={d: float(cv[d]) for d in _DTYPES}, **kw)


# --------------------------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------------------------

@dataclass
class Op:
    """One recorded operator (one dispatcher call) and its estimate."""

    name: str                # e.g. "aten.convolution", "vits_fast.wn_gate"
    family: str              # conv, matmul, elementwise, reduction, memory, spectral, fused, optimizer, sync, host
    stage: str
    module: str              # innermost module path ("" outside any)
    nbytes: float
    flops: float
    peak_kind: str           # "matmul", "conv1d", "conv1d_bwd", "conv2d", "conv2d_bwd" or "" (memory-bound)
    dtype: str               # fp32/tf32/bf16/fp16 for the peak
    kernels: int             # device launches
    host_kind: str           # "aten", "autograd", "inference", "custom", "host", "scalar"
    sync: bool = False
    mas_frames: int = 0      # frames of a fused alignment search (latency-bound wavefront)
    host_cells: int = 0      # cells of a reference alignment search (host copy + Cython search)
    reads: Tuple[Tuple[int, int], ...] = ()   # (tensor id, bytes) of the inputs, for elementwise chains
    writes: Tuple[Tuple[int, int], ...] = ()  # (tensor id, bytes) of the outputs
    device_s: float = 0.0
    host_s: float = 0.0


_NO_KERNEL = {
    "aten.detach", "aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty", "aten.new_empty_strided",
    "aten.lift_fresh", "aten.lift_fresh_copy", "aten.alias", "aten._unsafe_view", "aten.resize_", "aten.set_",
    "prim.device", "aten.is_same_size", "aten.sym_size", "aten.sym_stride", "aten.sym_numel", "aten.result_type",
}
_CONV = {"aten.convolution", "aten._convolution", "aten.convolution_backward", "aten.cudnn_convolution",
         "aten.convolution_overrideable"}
_MATMUL = {"aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm"}
_SPECTRAL = {"aten._fft_r2c", "aten._fft_c2r", "aten._fft_c2c", "aten.stft"}
_REDUCTION = {"aten._softmax", "aten._log_softmax", "aten._softmax_backward_data", "aten._log_softmax_backward_data",
              "aten.native_layer_norm", "aten.native_layer_norm_backward", "aten._weight_norm_interface",
              "aten._weight_norm_interface_backward", "aten.cumsum", "aten.sort", "aten.searchsorted",
              "aten.linalg_vector_norm", "aten.norm"}
_SYNC = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.item"}


def _op_name(func) -> str:
    return f"{func.namespace}.{func._schema.name.split('::')[-1]}"


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches for ``t``: its elements, broadcast (stride 0) dimensions counted once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _dtype_name(dtype: torch.dtype, kind: str) -> str:
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    tf32 = (torch.backends.cudnn.allow_tf32 if kind == "conv" else torch.backends.cuda.matmul.allow_tf32)
    return "tf32" if tf32 else "fp32"


def _family(name: str, func, stage: str) -> str:
    if name.startswith("vits_fast."):
        return "fused"
    if name.startswith("aten._foreach") or name.startswith("aten._fused_adam") or stage == "optimizer":
        return "optimizer"
    if name in _CONV:
        return "conv"
    if name in _MATMUL or name.startswith("aten._scaled_dot_product"):
        return "matmul"
    if name in _SPECTRAL:
        return "spectral"
    if name in _SYNC:
        return "sync"
    if name in _REDUCTION or torch.Tag.reduction in func.tags:
        return "reduction"
    if torch.Tag.pointwise in func.tags:
        return "elementwise"
    return "memory"


def _is_fake(t: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


_NODE_KEY = "vits_fast.costmodel.module"


class _NodeTagger(TorchFunctionMode):
    """Tags the autograd node of every forward result with the module that computed it, so that backward ops
    (run by the autograd engine, outside any module call) are attributed to their module."""

    def __init__(self, recorder: "_Recorder"):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch.is_grad_enabled() and torch._C._current_autograd_node() is None:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.grad_fn is not None and _NODE_KEY not in t.grad_fn.metadata:
                    t.grad_fn.metadata[_NODE_KEY] = self.recorder._module()
        return out


class _Recorder(TorchDispatchMode):
    """Records every operator (see :class:`Op`); keeps small computations on real batch tensors real."""

    def __init__(self, tracker, frames_per_id: float, text_len: int):
        super().__init__()
        self.tracker = tracker
        self.ops: List[Op] = []
        self.assumptions: List[str] = []
        self.frames_per_id, self.text_len = frames_per_id, text_len
        self._ranges: List[str] = []  # open record_function ranges, innermost last
        self._alive: List[torch.Tensor] = []

    # -- context ---------------------------------------------------------------------------------------------
    def _stage(self) -> str:
        return next((r[len("vits."):] for r in reversed(self._ranges) if r.startswith("vits.")), "other")

    def _module(self) -> str:
        node = torch._C._current_autograd_node()
        if node is not None and _NODE_KEY in node.metadata:  # backward: the module that made this node
            return node.metadata[_NODE_KEY]
        parents = [p for p in self.tracker.parents if p != "Global"]
        return max(parents, key=lambda p: p.count("."), default="")

    def add(self, op: Op, *tensors: torch.Tensor) -> None:
        self.ops.append(op)
        self._alive.extend(tensors)  # keeps ids unique for the chain analysis (fake tensors hold no data)

    # -- dispatch ----------------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _op_name(func)
        if name == "profiler._record_function_enter_new":
            self._ranges.append(str(args[0]))  # ranges nest: every exit closes the innermost one
            return func(*args, **kwargs)
        if name == "profiler._record_function_exit":
            if self._ranges:
                self._ranges.pop()
            return func(*args, **kwargs)
        if func.namespace == "aten" and torch._C._dispatch_has_kernel_for_dispatch_key(
                func.name(), "CompositeImplicitAutograd"):
            # composite ops reach this mode undecomposed under inference_mode: record what they run
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        if name in ("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]) and any(
                _is_fake(t) for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)):
            args = (args[0], self._bool_indices(name, args[1])) + tuple(args[2:])
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        real = not name.startswith("vits_fast.") and all(
            not _is_fake(t) and not t.requires_grad and t.numel() <= REAL_LIMIT for t in tensors)
        if name in _SYNC and not real:
            out = self._assume(name, func, tensors[0])
        elif name == "aten.max" and len(args) == 1 and _is_fake(args[0]) and not args[0].is_floating_point():
            # the longest computed length (synthesis' frame count): an assumed real value, so shapes can follow it
            func(*args, **kwargs)
            value = self._assumed_length()
            with _disable_current_modes():
                out = torch.tensor(value, dtype=args[0].dtype)
            self.assumptions.append(f"{self._stage()}: {name} of computed lengths {tuple(args[0].shape)} -> {value}")
        elif real and tensors:  # small computations on batch inputs (lengths, ids, masks, noise): real values
            with _disable_current_modes():
                out = func(*args, **kwargs)
        else:
            out = func(*args, **kwargs)  # fake
            if real and all(t.numel() <= REAL_LIMIT for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)):
                with _disable_current_modes():  # a small factory (arange, rand...): real
                    out = func(*args, **kwargs)
        if name in _NO_KERNEL or getattr(func, "is_view", False):
            return out
        self._record(name, func, args, kwargs, tensors, out, real)
        return out

    def _assume(self, name: str, func, t: torch.Tensor):
        """Answer a data-dependent read of a fake tensor (see the module docstring) and note the assumption."""
        where = f"{self._stage()}: {name} of {tuple(t.shape)} {t.dtype}"
        if name == "aten._local_scalar_dense":
            if t.dtype == torch.bool:
                value: Any = True
            elif t.dtype.is_floating_point:
                value = 0.0
            else:
                value = self._assumed_length()
            self.assumptions.append(f"{where} -> {value}")
            return value
        n = t.numel()  # nonzero / masked_select: every element selected
        self.assumptions.append(f"{where} -> all {n} selected")
        if name == "aten.nonzero":
            return torch.empty((n, t.dim()), dtype=torch.long)
        return torch.empty((n,), dtype=t.dtype)

    def _assumed_length(self) -> int:
        return max(1, int(round(self.frames_per_id * self.text_len)))

    def _bool_indices(self, name: str, indices) -> list:
        """Boolean-mask indices as integer ones, every element selected (the mask's ``nonzero`` is a sync)."""
        out = []
        for i in indices:
            if not (isinstance(i, torch.Tensor) and i.dtype == torch.bool):
                out.append(i)
                continue
            self._record("aten.nonzero", aten.nonzero.default, (i,), {}, [i], None, not _is_fake(i))
            if _is_fake(i):
                self.assumptions.append(f"{self._stage()}: {name} by a mask of {tuple(i.shape)} -> all selected")
                out += [torch.empty((i.numel(),), dtype=torch.long)] * i.dim()
            else:
                with _disable_current_modes():
                    out += list(i.nonzero().unbind(1))
        return out

    def _record(self, name, func, args, kwargs, tensors, out, real: bool = False) -> None:
        from torch.utils.flop_counter import flop_registry

        from .profile import min_bytes

        stage, module = self._stage(), self._module()
        if stage == "other" and module:  # e.g. batch-1 synthesis calls model.dec (a Generator) directly
            stage = f"{module.split('.')[0]} (no range)"
        family = _family(name, func, stage)
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        ref = (tensors or outs or [torch.empty(0)])[0]
        nbytes = float(sum(_tensor_bytes(t) for t in tensors) + sum(_tensor_bytes(t) for t in outs))
        kernels, frames = 1, 0
        host_kind = ("autograd" if stage == "backward" else
                     "inference" if torch.is_inference_mode_enabled() else "aten")
        if family == "fused":
            op = name.split(".", 1)[1]
            shapes = [list(a.shape) if isinstance(a, torch.Tensor) else [] for a in args]
            dtypes = [_PROFILER_DTYPE.get(a.dtype, "float") if isinstance(a, torch.Tensor) else "" for a in args]
            fb = min_bytes(op, shapes, dtypes)
            nbytes = float(fb) if fb is not None else nbytes
            host_kind = "custom"
            if op == "maximum_path":
                kernels, frames = 2, args[0].shape[1]
        elif name.startswith(("aten._foreach", "aten._fused_adam")):
            n = max((len(a) for a in args if isinstance(a, (list, tuple))), default=1)
            kernels = max(1, math.ceil(n / FOREACH_TENSORS_PER_LAUNCH))
        flops, peak_kind = 0.0, ""
        if func.overloadpacket in flop_registry:
            flops = float(flop_registry[func.overloadpacket](*args, **kwargs, out_val=out))
            peak_kind = "matmul"
        if family == "conv":
            weight = args[1] if name != "aten.convolution_backward" else args[2]
            peak_kind = f"conv{weight.dim() - 2}d" + ("_bwd" if name == "aten.convolution_backward" else "")
            if math.prod(weight.shape[2:]) > 1 and weight.dtype == torch.float32:
                passes = len(outs) if name == "aten.convolution_backward" else 1
                kernels += passes * CONV_LAYOUT_KERNELS
                nbytes *= 2  # cuDNN's NHWC layout transposes read and write every operand once more
        sync = name in _SYNC
        if sync:
            kernels, family = 0, "sync"
            if real and stage == "optimizer":
                host_kind, sync = "scalar", False  # AdamW's step counters live on the host: no device sync
        self.add(Op(name, family, stage, module, nbytes, flops, peak_kind,
                    _dtype_name(ref.dtype, "conv" if family == "conv" else peak_kind), kernels, host_kind, sync=sync,
                    mas_frames=frames, reads=tuple((id(t), _tensor_bytes(t)) for t in tensors),
                    writes=tuple((id(t), _tensor_bytes(t)) for t in outs)), *tensors, *outs)


#: torch dtype -> the dtype name ``torch.profiler`` records, which :func:`vits_fast.profile.min_bytes` reads.
_PROFILER_DTYPE = {torch.float32: "float", torch.bfloat16: "c10::bfloat16", torch.float16: "c10::half",
                   torch.float64: "double", torch.int32: "int", torch.int64: "long int", torch.bool: "bool"}


# --------------------------------------------------------------------------------------------------------
# Running a workload on fake tensors
# --------------------------------------------------------------------------------------------------------

def _host_mas_stub(recorder: _Recorder):
    """The reference (Cython, host) alignment search as a cost record: D2H copy, host search, H2D copy."""
    from . import monotonic_align

    original = monotonic_align._maximum_path

    def stub(neg_cent, mask, x_lengths, y_lengths, return_durations):
        from .backend import current_backend

        if current_backend() != "reference":
            return original(neg_cent, mask, x_lengths, y_lengths, return_durations)
        b, t_y, t_x = neg_cent.shape
        recorder.add(Op("host.maximum_path", "host", recorder._stage(), recorder._module(), 0.0, 0.0, "", "fp32", 0,
                        "host", sync=True, host_cells=b * t_y * t_x))
        path = torch.zeros_like(neg_cent)
        return (path, path.sum(1)) if return_durations else path

    @contextlib.contextmanager
    def patched():
        monotonic_align._maximum_path = stub
        try:
            yield
        finally:
            monotonic_align._maximum_path = original

    return patched()


#: Workloads the cost model runs (``kernel:mas`` checks its CPU mask's values on the host, which fake data cannot).
ESTIMATE_WORKLOADS = ("train-step", "infer", "kernel:wn", "kernel:coupling", "kernel:spline")

#: The paths a workload is traced on and the backend each runs: the reference, every fused family (``triton``),
#: and the default (``auto``: the families :data:`vits_fast.backend.AUTO_FUSED_FROM` picks for these shapes).
PATHS = {"reference": "reference", "fused": "triton", "default": "auto"}


def _init_optimizer_state(*optimizers: torch.optim.Optimizer) -> None:
    """Create the optimizers' lazy state (first-step only work) before recording: one step on zero gradients."""
    for opt in optimizers:
        params = [p for g in opt.param_groups for p in g["params"]]
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)


@dataclass
class Trace:
    """The recorded ops of one fake run of a workload on one path."""

    workload: str
    path: str            # a key of PATHS
    ops: List[Op]
    assumptions: List[str]
    stages: Tuple[str, ...]


def trace_workload(workload: str, config: str, sizes, path: str, precision: str = "fp32",
                   frames_per_id: float = 2.0) -> Trace:
    """Run ``workload`` (one of :data:`ESTIMATE_WORKLOADS`) once on fake CPU tensors and record its ops.

    ``path``: a key of :data:`PATHS`. ``sizes``: :class:`vits_fast.profile.Sizes`.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.module_tracker import ModuleTracker

    from . import profile as prof

    if path not in PATHS:
        raise ValueError(f"path must be one of {tuple(PATHS)}, got {path!r}")
    if workload not in ESTIMATE_WORKLOADS:
        raise ValueError(f"--estimate supports the workloads {ESTIMATE_WORKLOADS}, got {workload!r}")
    backend = PATHS[path]
    step, stages = prof.build_workload(workload, config, sizes, torch.device("cpu"), backend=backend,
                                       precision=precision)
    optimizers = [o for o in vars(step).values() if isinstance(o, torch.optim.Optimizer)] if hasattr(
        step, "__dict__") else []
    for opt in optimizers:
        for group in opt.param_groups:
            if not group.get("fused"):
                group["foreach"] = True  # what AdamW picks on CUDA (on a CPU it would loop over parameters)
    tracker = ModuleTracker()
    recorder = _Recorder(tracker, frames_per_id, sizes.text_len)
    try:  # where vits_fast.backend offers it, CPU tensors count as device tensors: the code takes its GPU branches
        from .backend import host_as_device as as_device
    except ImportError:
        as_device = contextlib.nullcontext
    with contextlib.suppress(ImportError):
        import triton  # noqa: F401 -- imported before TRITON_INTERPRET is set, so the process keeps its mode
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # lets the backend accept CPU tensors; fake ops launch nothing
    try:
        with as_device(), FakeTensorMode(allow_non_fake_inputs=True), _host_mas_stub(recorder), tracker, \
                recorder, _NodeTagger(recorder):
            if optimizers:
                _init_optimizer_state(*optimizers)
                del recorder.ops[:]
            step()
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
    return Trace(workload, path, recorder.ops, recorder.assumptions, stages)


# --------------------------------------------------------------------------------------------------------
# Estimating
# --------------------------------------------------------------------------------------------------------

def estimate_op(op: Op, c: Constants) -> Op:
    """Fill ``op.device_s`` and ``op.host_s`` from constants ``c`` (returns ``op``)."""
    t_flop = 0.0
    if op.peak_kind == "matmul":
        t_flop = op.flops / c.matmul_flops[op.dtype]
    elif op.peak_kind:
        t_flop = op.flops / (c.conv_flops[op.dtype] * c.conv_efficiency[op.peak_kind])
    op.device_s = (max(op.nbytes / c.copy_bytes_per_s, t_flop) + op.kernels * c.kernel_floor_s
                   + op.mas_frames * c.mas_step_s)
    if op.host_kind == "custom":
        op.host_s = c.custom_op_s + op.kernels * c.triton_launch_s
    elif op.host_kind == "host":
        op.host_s = op.host_cells * (c.host_mas_cell_s + 8 / c.host_copy_bytes_per_s)
    elif op.host_kind == "scalar":
        op.host_s = c.host_scalar_s
    else:
        per = {"autograd": c.autograd_op_s, "inference": c.inference_op_s}.get(op.host_kind, c.aten_op_s)
        op.host_s = per + max(0, op.kernels - 1) * c.extra_launch_s
    return op


# --------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------

@dataclass
class StageEstimate:
    """One stage of one path (seconds). ``time_s``: see :func:`overlapped_s`."""

    name: str
    ops: int
    kernels: int
    syncs: int
    device_s: float
    host_s: float
    time_s: float


def overlapped_s(ops: Iterable[Op]) -> float:
    """Time of an op sequence with host and device overlapping: the sequence is cut after every host
    synchronisation (the host waits there until the device has drained its queue), and each piece costs
    ``max(device, host)`` of its ops."""
    total = device = host = 0.0
    for op in ops:
        device += op.device_s
        host += op.host_s
        if op.sync:
            total += max(device, host)
            device = host = 0.0
    return total + max(device, host)


def stage_estimates(trace: Trace) -> List[StageEstimate]:
    """Per-stage sums of an estimated trace, in the workload's stage order (stages with no op left out)."""
    by_stage: Dict[str, List[Op]] = defaultdict(list)
    for op in trace.ops:
        by_stage[op.stage].append(op)
    order = list(trace.stages) + sorted(k for k in by_stage if k not in trace.stages)
    return [StageEstimate(k, len(ops), sum(op.kernels for op in ops), sum(op.sync for op in ops),
                          sum(op.device_s for op in ops), sum(op.host_s for op in ops), overlapped_s(ops))
            for k, ops in ((k, by_stage[k]) for k in order if k in by_stage)]


def step_s(trace: Trace) -> float:
    """Estimated step: the sum of the stage times."""
    return sum(s.time_s for s in stage_estimates(trace))


def family_device_s(trace: Trace) -> Dict[str, float]:
    """Device seconds per op family."""
    acc: Dict[str, float] = defaultdict(float)
    for op in trace.ops:
        acc[op.family] += op.device_s
    return dict(acc)


def fused_scopes(fused: Trace) -> List[Tuple[str, str]]:
    """(stage, module) scopes of the fused ops: the innermost module around each; a fused op called by the model
    itself (not by a submodule, e.g. the alignment search) gets its stage as scope (module "")."""
    scopes = set()
    for op in fused.ops:
        if op.family == "fused" and op.stage != "backward":
            scopes.add(("", op.module) if op.module.count(".") >= 1 else (op.stage, ""))
    return sorted(scopes)


def touched(op: Op, scopes: Sequence[Tuple[str, str]]) -> bool:
    """Whether a reference op lies in a fused family's scope and is one the fused kernels replace (not a
    convolution or matrix product, which stay in cuDNN/cuBLAS on both paths)."""
    if op.family in ("conv", "matmul"):
        return False
    for stage, module in scopes:
        if module and (op.module == module or op.module.startswith(module + ".")):
            return True
        if stage and op.stage == stage:
            return True
    return False


def amdahl(reference: Trace, fused: Trace) -> Tuple[float, float]:
    """(share of the reference step the fused families touch, ceiling on the step ratio) -- if the touched ops
    cost nothing, each stage would still cost max(device, host) of the rest."""
    scopes = fused_scopes(fused)
    rest: Dict[str, List[Op]] = defaultdict(list)
    for op in reference.ops:
        if not touched(op, scopes):
            rest[op.stage].append(op)
    total = step_s(reference)
    remaining = sum(overlapped_s(ops) for ops in rest.values())
    return 1.0 - remaining / total, total / remaining if remaining else math.inf


def module_group(module: str) -> str:
    """``Root.child.name`` (plus the index of a module list): ``SynthesizerTrn.dec.resblocks.3``,
    ``MultiPeriodDiscriminator.discriminators.0``."""
    parts = module.split(".")
    keep = 4 if len(parts) > 3 and parts[3].isdigit() else 3
    return ".".join(parts[:keep])


@dataclass
class ModuleRow:
    """Estimated cost of one module group; chains are runs of consecutive elementwise ops."""

    module: str
    ops: int = 0
    device_s: float = 0.0
    host_s: float = 0.0
    elementwise_s: float = 0.0
    chains: int = 0
    chain_bytes: float = 0.0       # bytes the chains' ops move, op by op
    chain_floor_bytes: float = 0.0  # bytes if each chain were one kernel: outside inputs + outputs not used inside


def _chain_floor(chain: Sequence[Op]) -> float:
    produced = {i for op in chain for i, _ in op.writes}
    consumed = {i for op in chain for i, _ in op.reads}
    inputs = {i: b for op in chain for i, b in op.reads if i not in produced}
    outputs = {i: b for op in chain for i, b in op.writes if i not in consumed or op is chain[-1]}
    return float(sum(inputs.values()) + sum(outputs.values()))


def module_rows(trace: Trace, prefixes: Sequence[str]) -> List[ModuleRow]:
    """Per module group under ``prefixes`` (module paths), forward and backward ops together."""
    rows: Dict[str, ModuleRow] = {}
    chain: List[Op] = []

    def close():
        if chain:
            row = rows[module_group(chain[0].module)]
            row.chains += 1
            row.chain_bytes += sum(op.nbytes for op in chain)
            row.chain_floor_bytes += _chain_floor(chain)
            chain.clear()

    for op in trace.ops:
        inside = any(op.module == p or op.module.startswith(p + ".") for p in prefixes)
        group = module_group(op.module) if inside else None
        if chain and (op.family != "elementwise" or group != module_group(chain[0].module)
                      or (op.stage == "backward") != (chain[0].stage == "backward")):
            close()
        if not inside:
            continue
        row = rows.setdefault(group, ModuleRow(group))
        row.ops += 1
        row.device_s += op.device_s
        row.host_s += op.host_s
        if op.family == "elementwise":
            row.elementwise_s += op.device_s
            chain.append(op)
    close()
    return sorted(rows.values(), key=lambda r: r.module)


# --------------------------------------------------------------------------------------------------------
# Report and command line
# --------------------------------------------------------------------------------------------------------

EST = "estimate"
#: Module paths of the module table: the decoder and the discriminators.
MODULE_TABLE_PREFIXES = ("SynthesizerTrn.dec", "Generator", "MultiPeriodDiscriminator")


def _pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:5.1f}%" if whole else "    -"


def format_estimate(reference: Trace, fused: Trace, c: Constants, title: str, default: Optional[Trace] = None) -> str:
    """The printed report of :func:`estimate` (every number labelled as an estimate); the per-stage table and the
    step line include ``default`` when given."""
    ms = 1e3
    lines = [f"vits_fast cost model -- ESTIMATE, not a measurement: {title}",
             f"constants: {c.device} ({c.source}); copy {c.copy_bytes_per_s / 1e12:.2f} TB/s; matmul TFLOP/s "
             + " / ".join(f"{d} {c.matmul_flops[d] / 1e12:.0f}" for d in _DTYPES) + "; conv1d TFLOP/s "
             + " / ".join(f"{d} {c.conv_flops[d] / 1e12:.0f}" for d in _DTYPES),
             f"conv efficiency " + ", ".join(f"{k} {v:.2f}" for k, v in c.conv_efficiency.items())
             + f"; device floor {c.kernel_floor_s * 1e6:.1f} us/kernel; host: aten op {c.aten_op_s * 1e6:.1f} us, "
             f"autograd op {c.autograd_op_s * 1e6:.1f} us, inference-mode op {c.inference_op_s * 1e6:.1f} us, "
             f"custom op {c.custom_op_s * 1e6:.1f} us + Triton launch {c.triton_launch_s * 1e6:.1f} us", ""]
    traces = [reference, fused] + ([default] if default is not None else [])
    per_path = [{s.name: s for s in stage_estimates(t)} for t in traces]
    order = [n for n in dict.fromkeys(list(reference.stages) + sorted(set().union(*per_path)))
             if any(n in st for st in per_path)]
    totals = [step_s(t) for t in traces]
    lines.append(f"Per stage ({EST}, ms per call of the workload; device = kernel time, host = dispatch + launch "
                 "time; stage = max(device, host) between host syncs)")
    lines.append("paths: reference = backend 'reference'; fused = every fused family (backend 'triton')"
                 + ("; default = backend 'auto' (the families vits_fast.backend.AUTO_FUSED_FROM picks)"
                    if default is not None else ""))
    side = f"{'ops':>6}{'syncs':>6}{'device':>9}{'host':>9}{'stage':>9}{'share':>7}"
    head = f"{'stage':<26}" + "".join(f"|{t.path:^46}" for t in traces)
    sub = f"{'':<26}" + f"|{side}" * len(traces)
    lines += [head, sub, "-" * len(sub)]
    empty = StageEstimate("", 0, 0, 0, 0.0, 0.0, 0.0)

    def cells(s: StageEstimate, total: float) -> str:
        return (f"{s.ops:>6}{s.syncs:>6}{s.device_s * ms:>9.2f}{s.host_s * ms:>9.2f}{s.time_s * ms:>9.2f}"
                f"{_pct(s.time_s, total):>7}")

    for name in order:
        lines.append(f"{name:<26}" + "".join(f"|{cells(st.get(name, empty), t)}" for st, t in zip(per_path, totals)))
    lines.append("-" * len(sub))
    sums = [StageEstimate("", sum(s.ops for s in st.values()), 0, sum(s.syncs for s in st.values()),
                          sum(s.device_s for s in st.values()), sum(s.host_s for s in st.values()), t)
            for st, t in zip(per_path, totals)]
    lines.append(f"{'sum (estimate)':<26}" + "".join(
        f"|{s.ops:>6}{s.syncs:>6}{s.device_s * ms:>9.2f}{s.host_s * ms:>9.2f}{s.time_s * ms:>9.2f}{'':>7}"
        for s in sums))
    t_ref = totals[0]
    share, ceiling = amdahl(reference, fused)
    lines += ["", "Estimated step: " + ", ".join(f"{t.path} {v * ms:.2f} ms" for t, v in zip(traces, totals))
              + "; estimated step ratio " + ", ".join(f"reference / {t.path} = {t_ref / v:.2f}x"
                                                     for t, v in zip(traces[1:], totals[1:])) + " (estimate)",
              f"Amdahl ceiling (estimate): the ops the fused families replace (non-GEMM ops inside the modules and "
              f"stages that call a vits_fast:: op) take {100 * share:.1f}% of the reference step; fusing them away "
              f"entirely could give at most {ceiling:.2f}x.", ""]

    fr, ff = family_device_s(reference), family_device_s(fused)
    dr, df = sum(fr.values()), sum(ff.values())
    lines.append(f"By op family ({EST}, device ms per call)")
    head = f"{'family':<14}{'reference':>11}{'share':>8}{'fused':>11}{'share':>8}"
    lines += [head, "-" * len(head)]
    for fam in sorted(set(fr) | set(ff), key=lambda k: -fr.get(k, 0.0) - ff.get(k, 0.0)):
        lines.append(f"{fam:<14}{fr.get(fam, 0.0) * ms:>11.2f}{_pct(fr.get(fam, 0.0), dr):>8}"
                     f"{ff.get(fam, 0.0) * ms:>11.2f}{_pct(ff.get(fam, 0.0), df):>8}")
    lines.append(f"{'sum (estimate)':<14}{dr * ms:>11.2f}{'':>8}{df * ms:>11.2f}")

    rows = module_rows(fused, MODULE_TABLE_PREFIXES)
    if rows:
        lines += ["", f"By module: decoder and discriminators ({EST}, fused path, ms per call, backward included "
                  "when training; a chain is a run of consecutive elementwise ops; 'if fused' = its outside inputs "
                  "read once and its outputs written once)"]
        head = (f"{'module':<44}{'ops':>6}{'device ms':>11}{'host ms':>9}{'eltwise ms':>11}{'chains':>7}"
                f"{'chain MB':>10}{'if fused':>10}")
        lines += [head, "-" * len(head)]
        for r in rows:
            lines.append(f"{r.module:<44}{r.ops:>6}{r.device_s * ms:>11.2f}{r.host_s * ms:>9.2f}"
                         f"{r.elementwise_s * ms:>11.2f}{r.chains:>7}{r.chain_bytes / 1e6:>10.1f}"
                         f"{r.chain_floor_bytes / 1e6:>10.1f}")
    notes = sorted(set(reference.assumptions) | set(fused.assumptions))
    if notes:
        lines += ["", f"Data-dependent reads answered by assumption ({len(notes)} distinct):"]
        lines += [f"  {a}" for a in notes[:12]] + ([f"  ... {len(notes) - 12} more"] if len(notes) > 12 else [])
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``--estimate`` options of ``python -m vits_fast.profile``."""
    g = p.add_argument_group("cost model (--estimate: an estimate from fake tensors, no GPU needed)")
    g.add_argument("--estimate", choices=tuple(DATASHEET), help="estimate the workload's GPU time on this GPU")
    g.add_argument("--calibration", metavar="FILE", help="benchmarks/calibrate.py JSON: replaces the device rates "
                   "and launch costs")
    g.add_argument("--bandwidth-tbs", type=float, help="copy bandwidth, TB/s (read + write)")
    g.add_argument("--kernel-floor-us", type=float, help="device time floor per kernel, us")
    g.add_argument("--aten-op-us", type=float, help="host time per PyTorch op launched from Python, us")
    g.add_argument("--autograd-op-us", type=float, help="host time per op launched by the autograd engine, us")
    g.add_argument("--inference-op-us", type=float, help="host time per PyTorch op under inference_mode, us")
    g.add_argument("--custom-op-us", type=float, help="host time per vits_fast custom-op call (without the "
                   "Triton launch), us")
    g.add_argument("--triton-launch-us", type=float, help="host time per Triton kernel launch, us")
    g.add_argument("--frames-per-id", type=float, default=2.0,
                   help="infer: assumed frames per phoneme id for the output length (default 2.0, what the "
                        "random-weight medium model gave on the H200 run)")


_OVERRIDES = (("bandwidth_tbs", "copy_bytes_per_s", 1e12), ("kernel_floor_us", "kernel_floor_s", 1e-6),
              ("aten_op_us", "aten_op_s", 1e-6), ("autograd_op_us", "autograd_op_s", 1e-6),
              ("inference_op_us", "inference_op_s", 1e-6),
              ("custom_op_us", "custom_op_s", 1e-6), ("triton_launch_us", "triton_launch_s", 1e-6))


def constants_from_args(args: argparse.Namespace) -> Constants:
    """Constants of ``--estimate``, then ``--calibration``, then the single-constant flags."""
    c = device_constants(args.estimate)
    if args.calibration:
        c = load_calibration(args.calibration, c)
    kw = {}
    for flag, name, scale in _OVERRIDES:
        value = getattr(args, flag, None)
        if value is not None:
            if not (math.isfinite(value) and 0 < value < 1e9):
                raise SystemExit(f"--{flag.replace('_', '-')} must be positive and finite, got {value}")
            kw[name] = value * scale
    return replace(c, **kw)


def estimate(workload: str, config: str, sizes, c: Constants, precision: str = "fp32",
             frames_per_id: float = 2.0) -> Tuple[Trace, Trace, Trace]:
    """(reference, fused, default) traces of ``workload`` (see :data:`PATHS`), every op estimated with ``c``."""
    traces = []
    for path in PATHS:
        t = trace_workload(workload, config, sizes, path, precision, frames_per_id)
        for op in t.ops:
            estimate_op(op, c)
        traces.append(t)
    return traces[0], traces[1], traces[2]


def main(args: argparse.Namespace) -> str:
    """Run ``--estimate`` for parsed ``python -m vits_fast.profile`` arguments; prints and returns the report."""
    from .profile import Sizes, default_sizes

    if args.workload not in ESTIMATE_WORKLOADS:
        raise SystemExit(f"--estimate supports the workloads {', '.join(ESTIMATE_WORKLOADS)}; got {args.workload}")
    if not (0 < args.frames_per_id <= 100):
        raise SystemExit(f"--frames-per-id must be in (0, 100], got {args.frames_per_id}")
    c = constants_from_args(args)
    base = default_sizes(args.workload, torch.device("cuda"))
    sizes = Sizes(args.batch or base.batch, args.text_len or base.text_len, args.frames or base.frames,
                  args.segment_frames)
    reference, fused, default = estimate(args.workload, args.config, sizes, c, args.precision, args.frames_per_id)
    title = (f"{args.workload}, config {args.config}, batch {sizes.batch}, t_x <= {sizes.text_len}"
             + (f", t_y <= {sizes.frames}" if sizes.frames else "") + f", {args.precision}, on {c.device}")
    report = format_estimate(reference, fused, c, title, default)
    print(report)
    return report
