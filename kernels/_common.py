"""What every kernel family shares: the interpreter flag, rounding stores, the compute-dtype rule, output
allocation, the device guard, the launch and the custom ops' eager fast path. No kernels of its own.

Rules every kernel file follows (``wn``, ``coupling``, ``spline``, ``mas``, ``hifigan``):

* Sections, in this order: the module docstring (what is fused, bytes moved, why the boundary is there);
  ``@triton.jit`` kernels (with the ``COMPILE_CONFIGS`` they are compiled with, read by
  ``tests/test_kernel_compile.py``); launchers (the ``torch.library.custom_op`` functions that check,
  allocate and launch, each under :func:`fused_op`, which gives plain eager calls a path around the dispatcher);
  custom-op registration (fake tensors and autograd); then the module entry points that
  models call (``*_forward``, named after the ``nn.Module.forward`` they replace).
* Names: kernels ``_<what>_fwd_kernel`` / ``_<what>_bwd_kernel``; a stride argument ``stride_<tensor>_<dim>``
  (``stride_mask_batch``); custom ops ``vits_fast::<what>`` and ``vits_fast::<what>_bwd`` (models,
  ``costmodel``, ``audit``, ``profile`` and the benchmarks look them up by these names).
* Compute dtype: every kernel takes an ``ACC`` constexpr from :func:`acc_dtype` (fp32; fp64 when any input is
  fp64), loads with :func:`load_as` and stores with :func:`cast_for` (one rounding, to nearest even).
* Outputs come from :func:`empty` (looked up at call time, so that tests can NaN-fill every kernel output by
  replacing ``_common.empty`` once) and kernels start through :func:`launch` (device guard and CUDA device).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch._library.custom_ops import CustomOpDef

# The Triton interpreter (TRITON_INTERPRET=1, how the CPU tests run kernels) converts fp32 -> bf16 by truncation,
# GPUs round to nearest even. Interpreted stores round explicitly first so that tests see GPU numerics; compiled
# kernels never contain that code (the flag is a compile-time False there).
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


# ----------------------------------------------------------------------------------------------------------------
# @triton.jit helpers


@triton.jit
def _rne_bf16(v):
    """fp32 ``v`` rounded to the nearest bf16 value (ties to even), still as fp32 (interpreter only)."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))


@triton.jit
def cast_for(v, ptr):
    """``v`` converted for a store through ``ptr`` (round to nearest even, also under the interpreter)."""
    if INTERPRETED:
        if ptr.dtype.element_ty == tl.bfloat16:
            v = _rne_bf16(v.to(tl.float32))
    return v.to(ptr.dtype.element_ty)


@triton.jit
def load_as(ptr, ok, ACC: tl.constexpr):
    """``ptr``'s elements where ``ok`` (0 elsewhere), converted to the compute dtype ``ACC``."""
    return tl.load(ptr, mask=ok, other=0.0).to(ACC)


@triton.jit
def flat_block(n, BLOCK: tl.constexpr):
    """A program over a per-item flat block of ``n`` elements (grid: (cdiv(n, BLOCK), batch)).

    Returns (batch item (int64), offsets [BLOCK] into the item, in-bounds [BLOCK]).
    """
    bi = tl.program_id(1).to(tl.int64)
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return bi, j, j < n


@triton.jit
def flat_block_mask(mask_ptr, stride_mask_batch, n, T, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """:func:`flat_block` over items of ``n = C * T`` elements, plus the ``[B, 1, T]`` mask (time-contiguous rows,
    batch stride ``stride_mask_batch``) at each offset's time step, in ``ACC``: (item, offsets, in-bounds, mask)."""
    bi, j, inb = flat_block(n, BLOCK)
    return bi, j, inb, load_as(mask_ptr + bi * stride_mask_batch + j % T, inb, ACC)


# ----------------------------------------------------------------------------------------------------------------
# host side


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """The dtype kernels compute in when reading ``tensors``: fp64 if any is fp64, else fp32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def acc_dtype(*tensors: Optional[torch.Tensor]):
    """:func:`compute_dtype` as the ``ACC`` constexpr of a kernel (``tl.float32`` or ``tl.float64``)."""
    return tl.float64 if compute_dtype(*tensors) == torch.float64 else tl.float32


def promote(*dtypes: torch.dtype) -> torch.dtype:
    """PyTorch's type promotion over ``dtypes`` (the dtype the reference's arithmetic gives)."""
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output or scratch buffer (tests replace this function to NaN-fill every one)."""
    return torch.empty(shape, dtype=dtype, device=device)


def check_device(t: torch.Tensor) -> None:
    """Raise unless ``t`` is on a GPU, or on the CPU with the Triton interpreter on."""
    if t.is_cuda:
        return
    from vits_fast.backend import interpreter_enabled

    if not interpreter_enabled():
        raise RuntimeError(f"vits_fast Triton kernels need CUDA tensors (got {t.device}); on CPU they run only "
                           "under TRITON_INTERPRET=1")


def launch(kernel, grid, ref: torch.Tensor, *args, **kwargs) -> None:
    """Launch ``kernel[grid](*args, **kwargs)`` on ``ref``'s device (CPU tensors: the interpreter)."""
    check_device(ref)
    if ref.is_cuda:
        with torch.cuda.device(ref.device):
            kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# the eager fast path of the custom ops


#: The eager fast path of :class:`FusedOp`; ``VITS_FAST_EAGER_OPS=0`` turns it off (every call then goes through
#: the dispatcher, as before it existed).
EAGER_OPS = os.environ.get("VITS_FAST_EAGER_OPS", "1").strip() not in ("0", "")


def _needs_dispatcher(args) -> bool:
    """True where a fused op call must go through ``torch.library``'s dispatcher: with :data:`EAGER_OPS` off, while
    compiling, under a dispatch or function mode (fake tensors, the cost model, operator counters), a functorch
    transform or the profiler (its tables name the ``vits_fast::`` ops with their input shapes), or with a tensor
    subclass among ``args``."""
    return bool(not EAGER_OPS or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
                or torch._C._is_torch_function_mode_enabled() or torch._C._autograd._profiler_enabled()
                or torch._C._functorch.peek_interpreter_stack() is not None
                or any(isinstance(a, torch.Tensor) and type(a) is not torch.Tensor for a in args))


class FusedOp(CustomOpDef):
    """A ``vits_fast::`` custom op whose plain eager calls skip the dispatcher.

    Through the dispatcher, a fused call (forward and backward) costs ~48 us of host time on a 2-core CPU
    (argument defaults, redispatch below autograd, Dynamo's disable wrapper), against ~25 us for the same forward,
    ``setup_context`` and backward run as a ``torch.autograd.Function`` (launches excluded;
    ``benchmarks/test_bench_dispatch.py``, 2026-12-01). So a call with
    positional arguments and none of :func:`_needs_dispatcher`'s conditions runs the op's own Python function:
    directly where no input needs a gradient (``*_bwd`` ops inside a backward, inference), as that
    ``autograd.Function`` where one does. Everything else, ``torch.compile``, ``opcheck`` and fake tensors included,
    sees the ordinary custom op.
    """

    _eager_fn = None

    def register_autograd(self, backward, /, *, setup_context=None) -> None:
        super().register_autograd(backward, setup_context=setup_context)
        raw = self._init_fn

        def forward(ctx, *args):  # forward and setup in one: a separate setup_context makes every apply() bind
            out = raw(*args)      # the arguments to forward's signature through inspect (~10 us)
            setup_context(ctx, args, out)
            return out

        self._eager_fn = type(f"{self._name}_eager", (torch.autograd.Function,),
                              {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def __call__(self, *args, **kwargs):
        if kwargs or _needs_dispatcher(args):
            return super().__call__(*args, **kwargs)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            if self._eager_fn is None:
                return super().__call__(*args)  # no autograd formula: the dispatcher's error, as without this path
            return self._eager_fn.apply(*args)
        return self._init_fn(*args)


def fused_op(op: CustomOpDef) -> FusedOp:
    """Give custom op ``op`` the eager fast path of :class:`FusedOp` (a decorator above ``custom_op``)."""
    op.__class__ = FusedOp
    return op


def config_collector():
    """``(configs, add)`` for building a kernel module's ``COMPILE_CONFIGS`` (every launch configuration, read by
    ``tests/test_kernel_compile.py``): ``add(fn, signature, constexprs, name, num_warps=4)`` appends one entry,
    ``signature`` mapping the runtime arguments to Triton types (the constexpr arguments are added to it)."""
    configs = []

    def add(fn, signature: dict, constexprs: dict, name: str, num_warps: int = 4) -> None:
        sig = dict(signature, **{k: "constexpr" for k in constexprs})
        configs.append(dict(fn=fn, signature=sig, constexprs=dict(constexprs), name=name, num_warps=num_warps))

    return configs, add


def mask_arg(mask: torch.Tensor, b: int, t: int) -> Tuple[torch.Tensor, int]:
    """A ``[b or 1, 1, t]`` mask as a ``[b, 1, t]`` view with unit time stride, and its batch stride (0 when
    one row serves the whole batch)."""
    m = mask.expand(b, 1, t)
    if t > 1 and m.stride(2) != 1:
        m = m.contiguous()
    return m, m.stride(0)


def sum_to(t: torch.Tensor, shape) -> torch.Tensor:
    """Sum ``t`` over the dimensions that were broadcast from ``shape``."""
    dims = [i for i, (n, s) in enumerate(zip(t.shape, shape)) if s == 1 and n != 1]
    return t.sum(dim=dims, keepdim=True) if dims else t


def cdiv(n: int, d: int) -> int:
    """``ceil(n / d)`` for host-side grid sizes (``triton.cdiv`` is a constexpr function: ~2.6 us per host call
    on a 2-core CPU, against ~0.05 us for this)."""
    return -(-n // d)


def flat_grid(n: int, b: int, block: int) -> Tuple[int, int]:
    """The grid of a :func:`flat_block` kernel over ``b`` items of ``n`` elements each."""
    return (cdiv(n, block), b)


TL_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
# (flow state x, parameters) dtype pairs of the coupling flows: one dtype, or an fp32 state with bf16/fp16
# convolution outputs (autocast)
FLOW_DTYPE_PAIRS = (("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "bf16"), ("fp32", "fp16"),
                    ("fp64", "fp64"))
FLOW_SUPPORTED = {(a, b) for a in TL_NAMES for b in TL_NAMES if (TL_NAMES[a], TL_NAMES[b]) in FLOW_DTYPE_PAIRS}


def check_flow_args(x: torch.Tensor, params: torch.Tensor, x_mask: torch.Tensor, rows_per_channel: int,
                    name: str, note: str = "") -> Tuple[int, int, int]:
    """Check a coupling flow's ``x [B, 2C, T]``, ``params [B, C * rows_per_channel, T]`` (called ``name``; ``note``
    is added to its error), ``x_mask [B, 1, T]`` and their dtype pair; returns ``(B, C, T)``."""
    if x.dim() != 3 or x.size(1) % 2:
        raise ValueError(f"x must be [B, 2C, T], got {tuple(x.shape)}")
    B, C2, T = x.shape
    C = C2 // 2
    want = (B, C * rows_per_channel, T)
    if tuple(params.shape) != want:
        raise ValueError(f"{name} must be {want}{note}, got {tuple(params.shape)}")
    if tuple(x_mask.shape) != (B, 1, T):
        raise ValueError(f"x_mask must be [B, 1, T] = {(B, 1, T)}, got {tuple(x_mask.shape)}")
    if (x.dtype, params.dtype) not in FLOW_SUPPORTED:
        raise TypeError(f"unsupported dtypes x={x.dtype}, {name}={params.dtype}; supported (x, {name}): "
                        f"{sorted((str(a), str(b)) for a, b in FLOW_SUPPORTED)}")
    return B, C, T


def flow_inputs(x: torch.Tensor, params: torch.Tensor, x_mask: torch.Tensor):
    """A coupling flow's launch inputs: contiguous ``x`` and ``params``, the mask in the compute dtype (contiguous),
    and that dtype."""
    cdt = compute_dtype(x)
    return x.contiguous(), params.contiguous(), x_mask.to(cdt).contiguous(), cdt


def flow_grad_buffers(grad_out: torch.Tensor, grad_logdet: torch.Tensor, x: torch.Tensor, params: torch.Tensor,
                      x_mask: torch.Tensor):
    """A coupling flow's backward launch inputs and outputs: ``x``, ``params``, the mask (as :func:`flow_inputs`),
    ``grad_out`` in x's dtype and ``grad_logdet`` in the compute dtype (contiguous), then the new ``grad_x`` and
    ``grad_params`` buffers."""
    x, params, mask, cdt = flow_inputs(x, params, x_mask)
    grad_x = empty(x.shape, x.dtype, x.device)
    grad_params = empty(params.shape, params.dtype, params.device)
    return (x, params, mask, grad_out.to(x.dtype).contiguous(), grad_logdet.to(cdt).contiguous(), grad_x,
            grad_params)


def register_flow_autograd(op, bwd_op, name: str) -> None:
    """Autograd of a coupling-flow op ``op(x, params, x_mask, *rest) -> (out, logdet)`` through its gradient op
    ``bwd_op(grad_out, grad_logdet, x, params, x_mask, *rest) -> (grad_x, grad_params)``. ``x_mask`` is a
    constant (asking for its gradient is a ``ValueError``); an unused output gets a zero gradient."""

    def setup(ctx, inputs, output):
        x, params, x_mask, *rest = inputs
        ctx.save_for_backward(x, params, x_mask)
        ctx.rest = rest

    def grads(ctx, grad_out, grad_logdet):
        x, params, x_mask = ctx.saved_tensors
        if ctx.needs_input_grad[2]:
            raise ValueError(f"vits_fast::{name}: x_mask is a constant; it cannot require grad")
        if grad_out is None:
            grad_out = torch.zeros_like(x)
        if grad_logdet is None:
            grad_logdet = x.new_zeros(x.shape[0], dtype=compute_dtype(x))
        grad_x, grad_params = bwd_op(grad_out, grad_logdet, x, params, x_mask, *ctx.rest)
        return (grad_x, grad_params) + (None,) * (1 + len(ctx.rest))

    op.register_autograd(grads, setup_context=setup)
