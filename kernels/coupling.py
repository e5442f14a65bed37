"""Fused epilogue of the affine ``ResidualCouplingLayer`` (the VITS prior flow), with ``Flip`` folded in.

What is fused. Everything ``ResidualCouplingLayer.forward`` does after its ``post`` convolution: the mask on the
statistics, the split into ``m`` (and ``logs`` unless ``mean_only``), the affine update of the second half
``x1' = m + x1 exp(logs) mask`` (reverse: ``(x1 - m) exp(-logs) mask``), the concatenation with ``x0`` (written
straight into one output, no ``torch.cat``), and ``logdet = sum(logs * mask)`` as one partial sum per program
(PyTorch adds the ``B x ceil(C T / BLOCK)`` partials; deterministic, no atomics). Optionally the output is written
with its channels reversed, which is exactly the ``Flip`` that follows every coupling layer in
``ResidualCouplingBlock``: :func:`residual_coupling_block_forward` uses that to drop the separate flip pass.

Fusion boundary. ``pre``, the ``WN`` stack (which has its own kernels) and ``post`` stay PyTorch/cuDNN; the kernel
starts at the raw ``post`` output ``stats [B, S, T]`` (``S = C`` mean-only, ``2C`` otherwise).

Bytes moved, fp32, mean-only (Piper's prior flow), per (x0, x1) pair of the ``[B, 2C, T]`` flow state (r = read,
w = write). Reference forward: ``stats * mask`` r4 w4, ``zeros_like(m)`` w4, ``exp(logs)`` r4 w4, ``x1 * exp`` r8
w4, ``* mask`` r4 w4, ``m + ...`` r8 w4, ``cat`` r8 w8, ``sum(logs)`` r4 = 72 B in 8 launches, then the block's
``Flip`` r8 w8 = 88 B. Fused: read x0, x1, m, write both halves = 20 B in one launch, flip included (4.4x less).
Backward, fused: read ``grad_out`` (8 B), write ``grad_x`` and ``grad_m`` (12 B); with ``logs`` the kernels also
read/write the ``logs`` half and ``x1``. The mask ``[B, 1, T]`` is ~0 B per element throughout.

Not folded: ``ElementwiseAffine`` (it only occurs in the SDP, in front of a ConvFlow whose ``pre`` convolution
needs its output in memory anyway) and the SDP's own ``Flip`` modules (``[B, 2, T]``, negligible).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (FLOW_DTYPE_PAIRS, FLOW_SUPPORTED, acc_dtype, cast_for, check_flow_args, compute_dtype, flat_block,
                      flow_grad_buffers, flow_inputs, fused_op, launch, load_as, register_flow_autograd)

BLOCK = 1024  # elements of the flattened [C, T] half per program (4 warps: 8 per thread)
NUM_WARPS = 4

# --------------------------------------------------------------------------------------------------------------
# Triton kernels (pointer comments give shapes)
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _pair_block(mask_ptr, C, T, flip, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # This program's elements of the [C, T] halves of batch item b: flat offsets e [BLOCK] and in-bounds, the mask at
    # their time step (ACC), and the flat offsets o0 / o1 of their x0 / x1 elements in the output, where channel k
    # goes to 2C - 1 - k when the output is flipped; the elements per half n = C * T and the item's offset xb.
    b, e, valid = flat_block(C * T, BLOCK)
    c = e // T
    t = e - c * T
    m = load_as(mask_ptr + b * T + t, valid, ACC)
    o0 = tl.where(flip != 0, (2 * C - 1 - c) * T + t, e)
    o1 = tl.where(flip != 0, (C - 1 - c) * T + t, C * T + e)
    return b, e, valid, m, o0, o1, C * T, b * 2 * C * T


@triton.jit
def _coupling_fwd_kernel(
    x_ptr,  # [B, 2C, T] input (x0 | x1), contiguous
    st_ptr,  # [B, S, T] raw post output: m (S = C, MEAN_ONLY) or m | logs (S = 2C), contiguous
    mask_ptr,  # [B, 1, T] compute dtype
    out_ptr,  # [B, 2C, T] output (x0 | x1'), channels reversed when flip
    part_ptr,  # [B, n_blk] compute dtype: partial sums of +-logs*mask (untouched when MEAN_ONLY)
    C, T, n_blk,
    reverse,  # 0: x1' = m + x1 exp(logs) mask; 1: x1' = (x1 - m) exp(-logs) mask
    flip,  # 1: write the output with its channel order reversed
    MEAN_ONLY: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    b, e, valid, m, o0, o1, n, xb = _pair_block(mask_ptr, C, T, flip, ACC, BLOCK)
    x0 = tl.load(x_ptr + xb + e, mask=valid, other=0.0)
    x1 = load_as(x_ptr + xb + n + e, valid, ACC)
    if MEAN_ONLY:
        sb = b * n
    else:
        sb = b * 2 * n
    mu = load_as(st_ptr + sb + e, valid, ACC) * m
    rev = reverse != 0
    if MEAN_ONLY:  # logs = 0
        y1 = tl.where(rev, (x1 - mu) * m, mu + x1 * m)
    else:
        ls = load_as(st_ptr + sb + n + e, valid, ACC) * m
        ex = tl.exp(tl.where(rev, -ls, ls))
        y1 = tl.where(rev, (x1 - mu) * ex * m, mu + x1 * ex * m)

    tl.store(out_ptr + xb + o0, cast_for(x0, out_ptr), mask=valid)
    tl.store(out_ptr + xb + o1, cast_for(y1, out_ptr), mask=valid)
    if not MEAN_ONLY:
        tl.store(part_ptr + b * n_blk + tl.program_id(0), tl.sum(tl.where(valid, tl.where(rev, -ls, ls), 0.0), axis=0))


@triton.jit
def _coupling_bwd_kernel(
    x_ptr,  # [B, 2C, T] forward input, contiguous
    st_ptr,  # [B, S, T] raw post output, contiguous
    mask_ptr,  # [B, 1, T] compute dtype
    gout_ptr,  # [B, 2C, T] gradient of the output (flipped layout when flip), contiguous
    gld_ptr,  # [B] compute dtype: gradient of logdet
    gx_ptr,  # [B, 2C, T] gradient of x
    gst_ptr,  # [B, S, T] gradient of the raw stats
    C, T, reverse, flip,
    MEAN_ONLY: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    b, e, valid, m, o0, o1, n, xb = _pair_block(mask_ptr, C, T, flip, ACC, BLOCK)
    g0 = tl.load(gout_ptr + xb + o0, mask=valid, other=0.0)
    g1 = load_as(gout_ptr + xb + o1, valid, ACC)
    tl.store(gx_ptr + xb + e, cast_for(g0, gx_ptr), mask=valid)

    rev = reverse != 0
    # forward: d/dm = 1, d/dlogs = x1 exp(logs) mask (+ dlogdet); reverse: d/dm = -exp(-logs) mask,
    # d/dlogs = -x1' (- dlogdet, the reverse log-determinant being -sum(logs)).
    if MEAN_ONLY:  # logs = 0: neither x1 nor the stats are needed
        sb = b * n
        gx1 = g1 * m
        gmu = tl.where(rev, -gx1, g1)
    else:
        sb = b * 2 * n
        x1 = load_as(x_ptr + xb + n + e, valid, ACC)
        mu = load_as(st_ptr + sb + e, valid, ACC) * m
        ls = load_as(st_ptr + sb + n + e, valid, ACC) * m
        ex = tl.exp(tl.where(rev, -ls, ls))
        gld = tl.load(gld_ptr + b)
        gx1 = g1 * ex * m
        gmu = tl.where(rev, -gx1, g1)
        gls = tl.where(rev, -g1 * (x1 - mu) * ex * m - gld, g1 * x1 * ex * m + gld)
        tl.store(gst_ptr + sb + n + e, cast_for(gls * m, gst_ptr), mask=valid)
    tl.store(gx_ptr + xb + n + e, cast_for(gx1, gx_ptr), mask=valid)
    tl.store(gst_ptr + sb + e, cast_for(gmu * m, gst_ptr), mask=valid)


# --------------------------------------------------------------------------------------------------------------
# Compile-check contract: every configuration the launchers use. (x, stats) dtype pairs: same dtype, or an fp32 flow
# state with bf16/fp16 convolutions (autocast); mask, partial sums and grad_logdet in the compute dtype (fp32;
# fp64 with fp64 inputs).



def _compile_configs():
    configs = []
    for xt, st in FLOW_DTYPE_PAIRS:
        ct = "fp64" if xt == "fp64" else "fp32"
        for mean_only in (True, False):
            consts = {"MEAN_ONLY": mean_only, "ACC": tl.float64 if xt == "fp64" else tl.float32, "BLOCK": BLOCK}
            cs = {k: "constexpr" for k in consts}
            sig = dict(x_ptr=f"*{xt}", st_ptr=f"*{st}", mask_ptr=f"*{ct}", out_ptr=f"*{xt}", part_ptr=f"*{ct}",
                       C="i32", T="i32", n_blk="i32", reverse="i32", flip="i32", **cs)
            configs.append(dict(fn=_coupling_fwd_kernel, signature=sig, constexprs=dict(consts),
                                num_warps=NUM_WARPS, name=f"coupling fwd x={xt} stats={st} mean_only={mean_only}"))
            sig = dict(x_ptr=f"*{xt}", st_ptr=f"*{st}", mask_ptr=f"*{ct}", gout_ptr=f"*{xt}", gld_ptr=f"*{ct}",
                       gx_ptr=f"*{xt}", gst_ptr=f"*{st}", C="i32", T="i32", reverse="i32", flip="i32", **cs)
            configs.append(dict(fn=_coupling_bwd_kernel, signature=sig, constexprs=dict(consts),
                                num_warps=NUM_WARPS, name=f"coupling bwd x={xt} stats={st} mean_only={mean_only}"))
    return configs


COMPILE_CONFIGS = _compile_configs()


# --------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------


def _check(x: torch.Tensor, stats: torch.Tensor, x_mask: torch.Tensor, mean_only: bool) -> Tuple[int, int, int]:
    return check_flow_args(x, stats, x_mask, 1 if mean_only else 2, "stats", f" (mean_only={mean_only})")


@fused_op
@torch.library.custom_op("vits_fast::affine_coupling", mutates_args=())
def affine_coupling(x: torch.Tensor, stats: torch.Tensor, x_mask: torch.Tensor, reverse: bool, flip: bool,
                    mean_only: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Affine coupling epilogue of ResidualCouplingLayer.

    ``x [B, 2C, T]`` (halves x0, x1), ``stats [B, S, T]`` the raw ``post`` output (``m``, ``S = C``, when
    ``mean_only``; ``m | logs``, ``S = 2C``, otherwise), ``x_mask [B, 1, T]`` (a constant). With ``m, logs`` the
    masked statistics (``logs = 0`` when ``mean_only``) returns ``out [B, 2C, T] = cat(x0, x1')`` with
    ``x1' = m + x1 exp(logs) mask`` (``reverse``: ``(x1 - m) exp(-logs) mask``), channel order reversed when ``flip``,
    and ``logdet [B] = +-sum(logs)`` (the log-determinant of the map applied; fp32, fp64 for fp64 inputs).
    """
    B, C, T = _check(x, stats, x_mask, mean_only)
    x, stats, mask, cdt = flow_inputs(x, stats, x_mask)
    out = _common.empty(x.shape, x.dtype, x.device)
    n_blk = _common.cdiv(C * T, BLOCK)
    if mean_only:
        part = torch.zeros(B, 1, device=x.device, dtype=cdt)
    else:
        part = _common.empty((B, n_blk), cdt, x.device)
    if out.numel():
        launch(_coupling_fwd_kernel, (n_blk, B), x, x, stats, mask, out, part, C, T, n_blk, int(reverse), int(flip),
               MEAN_ONLY=bool(mean_only), ACC=acc_dtype(x), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out, part.sum(dim=1)


@fused_op
@torch.library.custom_op("vits_fast::affine_coupling_bwd", mutates_args=())
def affine_coupling_bwd(grad_out: torch.Tensor, grad_logdet: torch.Tensor, x: torch.Tensor, stats: torch.Tensor,
                             x_mask: torch.Tensor, reverse: bool, flip: bool,
                             mean_only: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``(grad_x [B, 2C, T], grad_stats [B, S, T])`` of :func:`affine_coupling` given
    ``grad_out [B, 2C, T]`` and ``grad_logdet [B]``."""
    B, C, T = _check(x, stats, x_mask, mean_only)
    x, stats, mask, grad_out, grad_logdet, grad_x, grad_stats = flow_grad_buffers(grad_out, grad_logdet, x, stats,
                                                                                  x_mask)
    if grad_x.numel():
        launch(_coupling_bwd_kernel, (_common.cdiv(C * T, BLOCK), B), x, x, stats, mask, grad_out, grad_logdet, grad_x,
               grad_stats, C, T, int(reverse), int(flip), MEAN_ONLY=bool(mean_only), ACC=acc_dtype(x), BLOCK=BLOCK,
               num_warps=NUM_WARPS)
    return grad_x, grad_stats


# --------------------------------------------------------------------------------------------------------------
# Custom-op registration: fake tensors (shapes and dtypes for torch.compile and opcheck) and autograd
# --------------------------------------------------------------------------------------------------------------


@affine_coupling.register_fake
def _(x, stats, x_mask, reverse, flip, mean_only):
    _check(x, stats, x_mask, mean_only)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(x.shape[0], dtype=compute_dtype(x)))


@affine_coupling_bwd.register_fake
def _(grad_out, grad_logdet, x, stats, x_mask, reverse, flip, mean_only):
    _check(x, stats, x_mask, mean_only)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(stats, memory_format=torch.contiguous_format))


register_flow_autograd(affine_coupling, affine_coupling_bwd, "affine_coupling")


# --------------------------------------------------------------------------------------------------------------
# Module entry points
# --------------------------------------------------------------------------------------------------------------


def _layer_forward(layer, x: torch.Tensor, x_mask: torch.Tensor, g: Optional[torch.Tensor], reverse: bool,
                   flip: bool):
    c = layer.half_channels
    if x.dim() != 3 or x.size(1) != 2 * c:
        raise ValueError(f"ResidualCouplingLayer: x must be [B, {2 * c}, T], got {tuple(x.shape)}")
    h = layer.enc(layer.pre(x[:, :c]) * x_mask, x_mask, g=g)
    stats = layer.post(h)  # the mask is applied inside the kernel
    # Output dtypes as the reference's type promotion gives them.
    out_dtype = torch.promote_types(torch.promote_types(x.dtype, stats.dtype), x_mask.dtype)
    logdet_dtype = torch.promote_types(stats.dtype, x_mask.dtype)
    xk = x.to(out_dtype)
    if (xk.dtype, stats.dtype) not in FLOW_SUPPORTED:
        stats = stats.to(out_dtype)
    out, logdet = torch.ops.vits_fast.affine_coupling(xk, stats, x_mask, bool(reverse), bool(flip),
                                                      bool(layer.mean_only))
    return out, logdet.to(logdet_dtype)


def residual_coupling_forward(layer, x: torch.Tensor, x_mask: torch.Tensor, g: Optional[torch.Tensor] = None,
                              reverse: bool = False):
    """``ResidualCouplingLayer.forward`` on the fused path.

    ``layer``: a :class:`vits_fast.modules.ResidualCouplingLayer`; ``x [B, 2C, T]``, ``x_mask [B, 1, T]``,
    ``g [B, gin, 1]`` or None. Returns ``(x' [B, 2C, T], logdet [B])``, or ``x'`` when ``reverse``, as the
    reference forward does.
    """
    out, logdet = _layer_forward(layer, x, x_mask, g, reverse, flip=False)
    return out if reverse else (out, logdet)


def residual_coupling_block_forward(block, x: torch.Tensor, x_mask: torch.Tensor, g: Optional[torch.Tensor] = None,
                                    reverse: bool = False) -> torch.Tensor:
    """``ResidualCouplingBlock.forward`` with every ``ResidualCouplingLayer`` that is directly followed (in
    execution order) by a ``Flip`` writing its output already flipped, so the flip costs no pass of its own.

    ``block``: a :class:`vits_fast.models.ResidualCouplingBlock` (flows ``[layer, Flip] * n``); ``x [B, C, T]``,
    ``x_mask [B, 1, T]``, ``g [B, gin, 1]`` or None -> ``[B, C, T]``. Forward runs ``layer_i`` then ``Flip_i``
    (all n flips folded); reverse runs ``Flip_n, layer_n, Flip_{n-1}, ..., layer_1`` (n - 1 flips folded). Any
    other module, and any layer whose backend resolves to the reference path, runs through its own forward.
    """
    from vits_fast.backend import use_triton
    from vits_fast.modules import Flip, ResidualCouplingLayer

    flows = list(reversed(block.flows)) if reverse else list(block.flows)
    i = 0
    while i < len(flows):
        flow = flows[i]
        fold = (type(flow) is ResidualCouplingLayer and i + 1 < len(flows) and type(flows[i + 1]) is Flip
                and use_triton(x, module=flow))
        if fold:
            x, _ = _layer_forward(flow, x, x_mask, g, reverse, flip=True)
            i += 2
            continue
        if reverse:
            x = flow(x, x_mask, g=g, reverse=True)
        else:
            x, _ = flow(x, x_mask, g=g, reverse=False)
        i += 1
    return x
