"""Fused elementwise kernels of the WaveNet stack (``vits_fast.modules.WN``).

What is fused
-------------
Per WN layer ``i`` (``h`` hidden channels; ``x_in = in_layers[i](x)`` is ``[b, 2h, t]``, ``rs =
res_skip_layers[i](acts)`` is ``[b, 2h, t]``, or ``[b, h, t]`` on the last layer):

* the gate ``acts = tanh(x_in[:, :h] + g_a) * sigmoid(x_in[:, h:] + g_b)`` (``g_a``/``g_b``: this layer's
  slice of the ``[b, 2h*n_layers, 1]`` conditioning, broadcast over time; with no conditioning nothing is
  added and no zero tensor is made)                                            -> ``wn_gate`` / ``wn_gate_bwd``
* the residual/skip epilogue ``x = (x + rs[:, :h]) * mask; skip = skip + rs[:, h:]`` (the first layer
  starts the skip sum, no ``zeros_like``)                                      -> ``wn_res_skip`` / ``_bwd``
* the last layer's ``out = (skip + rs) * mask``                                -> ``wn_out`` / ``wn_out_bwd``

Bytes moved per element of the ``[b, h, t]`` activation, fp32 (bf16/fp16 halve them; the ``[b, 1, t]``
mask and ``[b, 2h, 1]`` conditioning are ~0 per element). r = read, w = write.

=======================  =========================================================  =============
stage                    eager reference                                            fused
=======================  =========================================================  =============
gate fwd, no cond        zeros_like w8, add r16 w8, tanh r4 w4, sigmoid r4 w4,       r8 w4 = 12
                         mul r8 w4 = 60
gate fwd, cond           add r8 w8, tanh/sigmoid/mul 24 = 40                        12
residual/skip fwd        x+res r8 w4, *mask r4 w4, skip+rs r8 w4 = 32               r16 w8 = 24
                         (+ zeros_like w4 once per stack)                            (first layer 20)
last layer fwd           skip+rs r8 w4, *mask r4 w4 = 20                            r8 w4 = 12
gate bwd                 mul bwd r16 w8, tanh/sigmoid bwd r16 w8, two slice bwds     r12 w8 = 20
                         (zeros w8 + copy r4 w4 each), sum of both r16 w8 = 104      (cond: same,
                         (cond: + sum over t r8 = 112)                               sum on chip)
residual/skip bwd        *mask bwd r4 w4, two slice bwds 32, sum r16 w8 = 64        r8 w12 = 20
last layer bwd           *mask bwd r4 w4 = 8                                        r4 w4 = 8
=======================  =========================================================  =============

Per middle layer that is ~92 B (fwd) + ~168 B (bwd) eager against 36 B + 40 B fused; the convolutions and
autograd's sum of the two gradients of ``x`` (conv input and residual) are the same on both sides.

Why the boundary is here
------------------------
The dilated ``in_layers`` conv and the 1x1 ``res_skip_layers`` conv stay in PyTorch (cuDNN/cuBLAS): they
are GEMM-shaped, carry legacy weight norm (``weight_g``/``weight_v`` pre-forward hooks whose backward
autograd already handles), and their outputs have to exist in memory anyway (the next conv reads ``x``;
the 1x1 conv's weight gradient reads ``acts``). Everything between two convolutions is elementwise and
memory-bound, so each stretch becomes one pass: read the conv output once, write the next conv's input
once. Fusing into the conv epilogues would mean re-writing the convolutions and weight-norm backward for
a further saving of one write+read per stretch.

Backward of the gate: ``x_in`` is saved and ``tanh``/``sigmoid`` recomputed. Eager saves the ``tanh`` and
``sigmoid`` outputs instead, the same 2h values per position, so memory is equal; recomputing costs ALU
only (the kernel is memory-bound) and spares the forward writing two extra tensors.

Conditioning gradient: with ``g`` the gate backward runs one program per (batch item, 4 channels) that
walks the whole time axis in [4, 128] tiles, so the time-sum for ``dg`` is done on chip, deterministically
(no atomics), in the same pass that writes ``dx_in``.

Dropout: ``WN.drop`` is applied to ``acts`` between the fused gate and the 1x1 conv exactly as the
reference does (``nn.Dropout`` is the identity for p = 0 or in eval mode; for p > 0 in training it is
PyTorch's own dropout, same random stream as the reference), so dropout is never silently skipped; it is
simply not fused (Piper's WN uses p = 0).

Dtypes: fp16/bf16/fp32 (and fp64) pointers; math in fp32 (fp64 for fp64 inputs); outputs in the dtype
PyTorch's type promotion gives the reference (mixed dtypes occur under autocast: ``x``/skip in fp32, conv
outputs in bf16).

Autograd: first derivatives only (the ``*_bwd`` ops have no autograd formula of their own, so a double
backward through them raises instead of returning wrong values). A mask that requires grad gets its
gradient from PyTorch ops in the backward (never the case in VITS, where masks come from lengths).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (acc_dtype, cast_for, config_collector, flat_block, flat_block_mask, flat_grid, fused_op, launch,
                      load_as, mask_arg, promote, sum_to)
BLOCK = 1024  # elements per program of the flattened kernels (4 warps: 8 per thread)
COND_BLOCK_C, COND_BLOCK_T = 4, 128  # tile of the conditioned gate backward (4 warps: 4 per thread)

# --------------------------------------------------------------------------------------------------------------
# Triton kernels. Tensors are addressed per batch item as a flat [H*T] (or [2H*T]) block, which is
# contiguous inside every batch item; the batch index is program axis 1.
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _tanh(z):
    # tanh(z) = sign(z) * (1 - e) / (1 + e), e = exp(-2|z|) <= 1: no overflow for any z.
    e = tl.exp(-2.0 * tl.abs(z))
    r = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -r, r)


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _gate_fwd_kernel(
    xin_ptr,  # [B, 2H, T] in_layer output, contiguous
    g_ptr,  # [B, 2H, 1] this layer's conditioning (strides stride_g_batch, stride_g_chan); unused unless HAS_G
    acts_ptr,  # [B, H, T] output, contiguous
    H, T, stride_g_batch, stride_g_chan,
    HAS_G: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    ht = H * T
    bi, j, inb = flat_block(ht, BLOCK)  # batch item bi, flat offsets j into its [H, T]
    pa = xin_ptr + bi * 2 * ht + j
    za = load_as(pa, inb, ACC)
    zb = load_as(pa + ht, inb, ACC)
    if HAS_G:
        c = j // T
        pg = g_ptr + bi * stride_g_batch + c * stride_g_chan
        za += load_as(pg, inb, ACC)
        zb += load_as(pg + H * stride_g_chan, inb, ACC)
    acts = _tanh(za) * _sigmoid(zb)
    tl.store(acts_ptr + bi * ht + j, cast_for(acts, acts_ptr), mask=inb)


@triton.jit
def _gate_bwd_kernel(
    dacts_ptr,  # [B, H, T] gradient of acts, contiguous
    xin_ptr,  # [B, 2H, T] in_layer output (saved), contiguous
    dxin_ptr,  # [B, 2H, T] output: gradient of x_in, contiguous
    H, T,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    ht = H * T
    bi, j, inb = flat_block(ht, BLOCK)  # batch item bi, flat offsets j into its [H, T]
    pa = xin_ptr + bi * 2 * ht + j
    th = _tanh(load_as(pa, inb, ACC))
    sg = _sigmoid(load_as(pa + ht, inb, ACC))
    d = load_as(dacts_ptr + bi * ht + j, inb, ACC)
    da = d * sg * (1.0 - th * th)
    db = d * th * sg * (1.0 - sg)
    po = dxin_ptr + bi * 2 * ht + j
    tl.store(po, cast_for(da, dxin_ptr), mask=inb)
    tl.store(po + ht, cast_for(db, dxin_ptr), mask=inb)


@triton.jit
def _gate_cond_bwd_kernel(
    dacts_ptr,  # [B, H, T] gradient of acts, contiguous
    xin_ptr,  # [B, 2H, T] in_layer output (saved), contiguous
    g_ptr,  # [B, 2H, 1] this layer's conditioning (strides stride_g_batch, stride_g_chan)
    dxin_ptr,  # [B, 2H, T] output: gradient of x_in, contiguous
    dg_ptr,  # [B, 2H, 1] output: gradient of g (sum over time), contiguous
    H, T, stride_g_batch, stride_g_chan,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # One program per (batch item, BLOCK_C gate channels); it walks the whole time axis, so the time-sum
    # for dg stays on chip (deterministic, no atomics).
    bi = tl.program_id(1).to(tl.int64)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C] gate channels (< H)
    c_ok = c < H
    pg = g_ptr + bi * stride_g_batch + c * stride_g_chan
    ga = load_as(pg, c_ok, ACC)[:, None]
    gb = load_as(pg + H * stride_g_chan, c_ok, ACC)[:, None]
    row_a = bi * 2 * H * T + c[:, None] * T  # [BLOCK_C, 1] row starts in x_in / dx_in (b half: + H*T)
    row_d = bi * H * T + c[:, None] * T
    sum_a = tl.zeros([BLOCK_C, BLOCK_T], dtype=ACC)
    sum_b = tl.zeros([BLOCK_C, BLOCK_T], dtype=ACC)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)[None, :]
        inb = c_ok[:, None] & (t < T)
        th = _tanh(load_as(xin_ptr + row_a + t, inb, ACC) + ga)
        sg = _sigmoid(load_as(xin_ptr + row_a + H * T + t, inb, ACC) + gb)
        d = load_as(dacts_ptr + row_d + t, inb, ACC)
        da = d * sg * (1.0 - th * th)
        db = d * th * sg * (1.0 - sg)
        tl.store(dxin_ptr + row_a + t, cast_for(da, dxin_ptr), mask=inb)
        tl.store(dxin_ptr + row_a + H * T + t, cast_for(db, dxin_ptr), mask=inb)
        sum_a += tl.where(inb, da, 0.0)
        sum_b += tl.where(inb, db, 0.0)
    pdg = dg_ptr + bi * 2 * H + c
    tl.store(pdg, cast_for(tl.sum(sum_a, axis=1), dg_ptr), mask=c_ok)
    tl.store(pdg + H, cast_for(tl.sum(sum_b, axis=1), dg_ptr), mask=c_ok)


@triton.jit
def _res_skip_fwd_kernel(
    x_ptr,  # [B, H, T] residual stream, contiguous
    rs_ptr,  # [B, 2H, T] res_skip conv output (res = rows :H, skip = rows H:), contiguous
    skip_ptr,  # [B, H, T] running skip sum, contiguous; unused unless HAS_SKIP
    mask_ptr,  # [B, 1, T] sequence mask (batch stride stride_mask_batch, may be 0), time-contiguous
    xo_ptr,  # [B, H, T] output: (x + res) * mask
    so_ptr,  # [B, H, T] output: skip + rs[:, H:] (or rs[:, H:] on the first layer)
    H, T, stride_mask_batch,
    HAS_SKIP: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    ht = H * T
    bi, j, inb, m = flat_block_mask(mask_ptr, stride_mask_batch, ht, T, ACC, BLOCK)
    x = load_as(x_ptr + bi * ht + j, inb, ACC)
    prs = rs_ptr + bi * 2 * ht + j
    res = load_as(prs, inb, ACC)
    skp = load_as(prs + ht, inb, ACC)
    if HAS_SKIP:
        skp += load_as(skip_ptr + bi * ht + j, inb, ACC)
    tl.store(xo_ptr + bi * ht + j, cast_for((x + res) * m, xo_ptr), mask=inb)
    tl.store(so_ptr + bi * ht + j, cast_for(skp, so_ptr), mask=inb)


@triton.jit
def _res_skip_bwd_kernel(
    dxo_ptr,  # [B, H, T] gradient of the new residual stream, contiguous
    dso_ptr,  # [B, H, T] gradient of the new skip sum, contiguous
    mask_ptr,  # [B, 1, T] sequence mask (batch stride stride_mask_batch), time-contiguous
    dx_ptr,  # [B, H, T] output: gradient of x (= dxo * mask)
    drs_ptr,  # [B, 2H, T] output: gradient of rs (rows :H = dxo * mask, rows H: = dso)
    H, T, stride_mask_batch,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    ht = H * T
    bi, j, inb, m = flat_block_mask(mask_ptr, stride_mask_batch, ht, T, ACC, BLOCK)
    dres = load_as(dxo_ptr + bi * ht + j, inb, ACC) * m
    dskp = tl.load(dso_ptr + bi * ht + j, mask=inb, other=0.0)
    tl.store(dx_ptr + bi * ht + j, cast_for(dres, dx_ptr), mask=inb)
    pd = drs_ptr + bi * 2 * ht + j
    tl.store(pd, cast_for(dres, drs_ptr), mask=inb)
    tl.store(pd + ht, cast_for(dskp, drs_ptr), mask=inb)


@triton.jit
def _out_fwd_kernel(
    rs_ptr,  # [B, H, T] last res_skip conv output, contiguous
    skip_ptr,  # [B, H, T] running skip sum, contiguous; unused unless HAS_SKIP
    mask_ptr,  # [B, 1, T] sequence mask (batch stride stride_mask_batch), time-contiguous
    out_ptr,  # [B, H, T] output: (skip + rs) * mask
    H, T, stride_mask_batch,
    HAS_SKIP: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    ht = H * T
    bi, j, inb, m = flat_block_mask(mask_ptr, stride_mask_batch, ht, T, ACC, BLOCK)
    v = load_as(rs_ptr + bi * ht + j, inb, ACC)
    if HAS_SKIP:
        v += load_as(skip_ptr + bi * ht + j, inb, ACC)
    tl.store(out_ptr + bi * ht + j, cast_for(v * m, out_ptr), mask=inb)


@triton.jit
def _out_bwd_kernel(
    d_ptr,  # [B, H, T] gradient of the WN output, contiguous
    mask_ptr,  # [B, 1, T] sequence mask (batch stride stride_mask_batch), time-contiguous
    o_ptr,  # [B, H, T] output: d * mask (gradient of both rs and skip)
    H, T, stride_mask_batch,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    ht = H * T
    bi, j, inb, m = flat_block_mask(mask_ptr, stride_mask_batch, ht, T, ACC, BLOCK)
    d = load_as(d_ptr + bi * ht + j, inb, ACC)
    tl.store(o_ptr + bi * ht + j, cast_for(d * m, o_ptr), mask=inb)


# --------------------------------------------------------------------------------------------------------------
# Launch configurations (read by tests/test_kernel_compile.py): every (kernel, dtypes, constexprs) the
# launchers below use. Same-dtype runs for fp32/bf16/fp16/fp64, plus the autocast mix where x, the skip
# sum and the mask are fp32 while conv outputs are bf16/fp16.
# --------------------------------------------------------------------------------------------------------------

def _compile_configs():
    cfgs, add = config_collector()
    ints = {"H": "i32", "T": "i32"}
    for dt in ("fp32", "bf16", "fp16", "fp64"):
        p, acc = f"*{dt}", tl.float64 if dt == "fp64" else tl.float32
        for has_g in (False, True):
            add(_gate_fwd_kernel, dict(xin_ptr=p, g_ptr=p, acts_ptr=p, **ints, stride_g_batch="i32",
                                       stride_g_chan="i32"),
                {"HAS_G": has_g, "ACC": acc, "BLOCK": BLOCK}, f"wn gate fwd {dt} cond={has_g}")
        add(_gate_bwd_kernel, dict(dacts_ptr=p, xin_ptr=p, dxin_ptr=p, **ints), {"ACC": acc, "BLOCK": BLOCK},
            f"wn gate bwd {dt}")
        add(_gate_cond_bwd_kernel, dict(dacts_ptr=p, xin_ptr=p, g_ptr=p, dxin_ptr=p, dg_ptr=p, **ints,
                                        stride_g_batch="i32", stride_g_chan="i32"),
            {"ACC": acc, "BLOCK_C": COND_BLOCK_C, "BLOCK_T": COND_BLOCK_T}, f"wn gate cond bwd {dt}")
    # (stream dtype: x, skip, mask, grads of the stream; conv dtype: rs and its grad)
    for sdt, cdt in (("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("fp64", "fp64"), ("fp32", "bf16"),
                     ("fp32", "fp16")):
        s, c, acc = f"*{sdt}", f"*{cdt}", tl.float64 if sdt == "fp64" else tl.float32
        ints_m = dict(ints, stride_mask_batch="i32")
        for has_skip in (False, True):
            add(_res_skip_fwd_kernel, dict(x_ptr=s, rs_ptr=c, skip_ptr=s, mask_ptr=s, xo_ptr=s, so_ptr=s,
                                           **ints_m),
                {"HAS_SKIP": has_skip, "ACC": acc, "BLOCK": BLOCK}, f"wn res/skip fwd {sdt}/{cdt} skip={has_skip}")
            # last layer; HAS_SKIP=False is a one-layer stack (out = rs * mask)
            add(_out_fwd_kernel, dict(rs_ptr=c, skip_ptr=s, mask_ptr=s, out_ptr=s, **ints_m),
                {"HAS_SKIP": has_skip, "ACC": acc, "BLOCK": BLOCK}, f"wn out fwd {sdt}/{cdt} skip={has_skip}")
        add(_res_skip_bwd_kernel, dict(dxo_ptr=s, dso_ptr=s, mask_ptr=s, dx_ptr=s, drs_ptr=c, **ints_m),
            {"ACC": acc, "BLOCK": BLOCK}, f"wn res/skip bwd {sdt}/{cdt}")
        if sdt == cdt:  # the gradient is made in the stream dtype, then cast for rs
            add(_out_bwd_kernel, dict(d_ptr=s, mask_ptr=s, o_ptr=s, **ints_m), {"ACC": acc, "BLOCK": BLOCK},
                f"wn out bwd {sdt}")
    return cfgs


COMPILE_CONFIGS = _compile_configs()

# --------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------


# ---- gate -------------------------------------------------------------------------------------------------


@fused_op
@torch.library.custom_op("vits_fast::wn_gate", mutates_args=())
def wn_gate(x_in: torch.Tensor, g: Optional[torch.Tensor]) -> torch.Tensor:
    """``tanh(x_in[:, :h] + g[:, :h]) * sigmoid(x_in[:, h:] + g[:, h:])``.

    x_in: [b, 2h, t]; g: [b, 2h, 1] (broadcast over time) or None. Returns acts [b, h, t].
    """
    b, h2, t = x_in.shape
    h = h2 // 2
    x_in = x_in.contiguous()
    acts = _common.empty((b, h, t), promote(x_in.dtype, g.dtype) if g is not None else x_in.dtype, x_in.device)
    if acts.numel():
        gp = g if g is not None else x_in
        g_sb, g_sc = (g.stride(0), g.stride(1)) if g is not None else (0, 0)
        launch(_gate_fwd_kernel, flat_grid(h * t, b, BLOCK), x_in, x_in, gp, acts, h, t, g_sb, g_sc,
               HAS_G=g is not None, ACC=acc_dtype(x_in, g), BLOCK=BLOCK)
    return acts


@fused_op
@torch.library.custom_op("vits_fast::wn_gate_bwd", mutates_args=())
def wn_gate_bwd(dacts: torch.Tensor, x_in: torch.Tensor,
                g: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`wn_gate`: returns (dx_in [b, 2h, t], dg [b, 2h, 1]); dg is [b, 2h, 0] when g is None."""
    b, h2, t = x_in.shape
    h = h2 // 2
    x_in, dacts = x_in.contiguous(), dacts.contiguous()
    dx = _common.empty((b, h2, t), x_in.dtype, x_in.device)
    if g is None:
        dg = _common.empty((b, h2, 0), x_in.dtype, x_in.device)
        if dx.numel():
            launch(_gate_bwd_kernel, flat_grid(h * t, b, BLOCK), x_in, dacts, x_in, dx, h, t,
                   ACC=acc_dtype(x_in, dacts), BLOCK=BLOCK)
    else:
        dg = _common.empty((b, h2, 1), g.dtype, g.device)
        if b * h:
            launch(_gate_cond_bwd_kernel, (_common.cdiv(h, COND_BLOCK_C), b), x_in, dacts, x_in, g, dx, dg, h, t,
                   g.stride(0), g.stride(1), ACC=acc_dtype(x_in, dacts, g), BLOCK_C=COND_BLOCK_C,
                   BLOCK_T=COND_BLOCK_T)
    return dx, dg


# ---- residual / skip epilogue -------------------------------------------------------------------------------


@fused_op
@torch.library.custom_op("vits_fast::wn_res_skip", mutates_args=())
def wn_res_skip(x: torch.Tensor, rs: torch.Tensor, skip: Optional[torch.Tensor],
                mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """One middle WN layer's epilogue.

    x: [b, h, t]; rs: [b, 2h, t]; skip: [b, h, t] or None (first layer); mask: [b, 1, t].
    Returns ``((x + rs[:, :h]) * mask, skip + rs[:, h:])`` (the skip sum starts at ``rs[:, h:]`` when
    ``skip`` is None), dtypes as PyTorch promotes them (a missing skip counts as ``x``'s dtype).
    """
    b, h, t = x.shape
    x, rs = x.contiguous(), rs.contiguous()
    skip = skip.contiguous() if skip is not None else None
    m, m_sb = mask_arg(mask, b, t)
    xo = _common.empty((b, h, t), promote(x.dtype, rs.dtype, mask.dtype), x.device)
    so = _common.empty((b, h, t), promote(skip.dtype if skip is not None else x.dtype, rs.dtype), x.device)
    if xo.numel():
        launch(_res_skip_fwd_kernel, flat_grid(h * t, b, BLOCK), x, x, rs, skip if skip is not None else x, m, xo, so,
               h, t, m_sb, HAS_SKIP=skip is not None, ACC=acc_dtype(x, rs, skip, m), BLOCK=BLOCK)
    return xo, so


@fused_op
@torch.library.custom_op("vits_fast::wn_res_skip_bwd", mutates_args=())
def wn_res_skip_bwd(dxo: torch.Tensor, dso: torch.Tensor, mask: torch.Tensor, x_dtype: torch.dtype,
                    rs_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`wn_res_skip`: returns (dx = dxo * mask [b, h, t], drs = [dxo * mask, dso] [b, 2h, t])."""
    b, h, t = dxo.shape
    dxo, dso = dxo.contiguous(), dso.contiguous()
    m, m_sb = mask_arg(mask, b, t)
    dx = _common.empty((b, h, t), x_dtype, dxo.device)
    drs = _common.empty((b, 2 * h, t), rs_dtype, dxo.device)
    if dx.numel():
        launch(_res_skip_bwd_kernel, flat_grid(h * t, b, BLOCK), dxo, dxo, dso, m, dx, drs, h, t, m_sb,
               ACC=acc_dtype(dxo, dso, m), BLOCK=BLOCK)
    return dx, drs


# ---- last layer -----------------------------------------------------------------------------------------------


@fused_op
@torch.library.custom_op("vits_fast::wn_out", mutates_args=())
def wn_out(rs: torch.Tensor, skip: Optional[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """The WN output: ``(skip + rs) * mask`` (``rs * mask`` when skip is None).

    rs: [b, h, t]; skip: [b, h, t] or None; mask: [b, 1, t]. Returns [b, h, t].
    """
    b, h, t = rs.shape
    rs = rs.contiguous()
    skip = skip.contiguous() if skip is not None else None
    m, m_sb = mask_arg(mask, b, t)
    dt = promote(rs.dtype, mask.dtype, *((skip.dtype,) if skip is not None else ()))
    out = _common.empty((b, h, t), dt, rs.device)
    if out.numel():
        launch(_out_fwd_kernel, flat_grid(h * t, b, BLOCK), rs, rs, skip if skip is not None else rs, m, out, h, t,
               m_sb, HAS_SKIP=skip is not None, ACC=acc_dtype(rs, skip, m), BLOCK=BLOCK)
    return out


@fused_op
@torch.library.custom_op("vits_fast::wn_out_bwd", mutates_args=())
def wn_out_bwd(dout: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`wn_out` for rs and skip alike: ``dout * mask`` ([b, h, t], dout's dtype)."""
    b, h, t = dout.shape
    dout = dout.contiguous()
    m, m_sb = mask_arg(mask, b, t)
    o = _common.empty((b, h, t), dout.dtype, dout.device)
    if o.numel():
        launch(_out_bwd_kernel, flat_grid(h * t, b, BLOCK), dout, dout, m, o, h, t, m_sb, ACC=acc_dtype(dout, m),
               BLOCK=BLOCK)
    return o


# --------------------------------------------------------------------------------------------------------------
# Custom-op registration: fake tensors (shapes and dtypes for torch.compile and opcheck) and autograd
# --------------------------------------------------------------------------------------------------------------


@wn_gate.register_fake
def _(x_in, g):
    b, h2, t = x_in.shape
    return x_in.new_empty((b, h2 // 2, t), dtype=promote(x_in.dtype, g.dtype) if g is not None else x_in.dtype)


@wn_gate_bwd.register_fake
def _(dacts, x_in, g):
    b, h2, t = x_in.shape
    dg = x_in.new_empty((b, h2, 0)) if g is None else g.new_empty((b, h2, 1))
    return x_in.new_empty((b, h2, t)), dg


def _gate_setup(ctx, inputs, output):
    x_in, g = inputs
    ctx.has_g = g is not None
    ctx.save_for_backward(x_in, g)


def _gate_grads(ctx, dacts):
    x_in, g = ctx.saved_tensors
    dx, dg = wn_gate_bwd(dacts, x_in, g)
    return dx, (dg if ctx.has_g else None)


wn_gate.register_autograd(_gate_grads, setup_context=_gate_setup)


@wn_res_skip.register_fake
def _(x, rs, skip, mask):
    xo = x.new_empty(x.shape, dtype=promote(x.dtype, rs.dtype, mask.dtype))
    so = x.new_empty(x.shape, dtype=promote(skip.dtype if skip is not None else x.dtype, rs.dtype))
    return xo, so


@wn_res_skip_bwd.register_fake
def _(dxo, dso, mask, x_dtype, rs_dtype):
    b, h, t = dxo.shape
    return dxo.new_empty((b, h, t), dtype=x_dtype), dxo.new_empty((b, 2 * h, t), dtype=rs_dtype)


def _res_skip_setup(ctx, inputs, output):
    x, rs, skip, mask = inputs
    ctx.dtypes = (x.dtype, rs.dtype, skip.dtype if skip is not None else None, mask.dtype)
    ctx.has_skip = skip is not None
    ctx.mask_grad = mask.requires_grad  # rare: then x and rs are kept for d(mask) = sum_c dxo * (x + res)
    ctx.save_for_backward(mask, *((x, rs) if ctx.mask_grad else ()))


def _res_skip_grads(ctx, dxo, dso):
    mask = ctx.saved_tensors[0]
    x_dt, rs_dt, skip_dt, mask_dt = ctx.dtypes
    dx, drs = wn_res_skip_bwd(dxo, dso, mask, x_dt, rs_dt)
    dskip = dso.to(skip_dt) if ctx.has_skip else None
    dmask = None
    if ctx.mask_grad:
        x, rs = ctx.saved_tensors[1:]
        h = x.shape[1]
        dmask = sum_to(dxo * (x + rs[:, :h]), mask.shape).to(mask_dt)
    return dx, drs, dskip, dmask


wn_res_skip.register_autograd(_res_skip_grads, setup_context=_res_skip_setup)


@wn_out.register_fake
def _(rs, skip, mask):
    dt = promote(rs.dtype, mask.dtype, *((skip.dtype,) if skip is not None else ()))
    return rs.new_empty(rs.shape, dtype=dt)


@wn_out_bwd.register_fake
def _(dout, mask):
    return torch.empty_like(dout, memory_format=torch.contiguous_format)


def _out_setup(ctx, inputs, output):
    rs, skip, mask = inputs
    ctx.dtypes = (rs.dtype, skip.dtype if skip is not None else None, mask.dtype)
    ctx.mask_grad = mask.requires_grad  # rare: then rs and skip are kept for d(mask) = sum_c dout * (skip + rs)
    ctx.save_for_backward(mask, *((rs, skip) if ctx.mask_grad else ()))


def _out_grads(ctx, dout):
    mask = ctx.saved_tensors[0]
    rs_dt, skip_dt, mask_dt = ctx.dtypes
    d = wn_out_bwd(dout, mask)
    dmask = None
    if ctx.mask_grad:
        rs, skip = ctx.saved_tensors[1:]
        v = rs if skip is None else skip + rs
        dmask = sum_to(dout * v, mask.shape).to(mask_dt)
    return d.to(rs_dt), (d.to(skip_dt) if skip_dt is not None else None), dmask


wn_out.register_autograd(_out_grads, setup_context=_out_setup)


# --------------------------------------------------------------------------------------------------------------
# Module entry points
# --------------------------------------------------------------------------------------------------------------


def wn_forward(module: torch.nn.Module, x: torch.Tensor, x_mask: torch.Tensor,
               g: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``WN.forward`` with the elementwise work fused (same result and gradients as the reference).

    module: a ``vits_fast.modules.WN`` (uses ``in_layers``, ``res_skip_layers``, ``cond_layer``, ``drop``,
    ``hidden_channels``, ``n_layers``); x: [b, h, t]; x_mask: [b, 1, t]; g: [b, gin, 1] or None.
    Returns [b, h, t]. The convolutions are the module's own (weight-norm hooks run as usual).
    """
    h, n_layers = module.hidden_channels, module.n_layers
    if not x_mask.is_floating_point():
        x_mask = x_mask.to(x.dtype)
    if g is not None:
        g = module.cond_layer(g)
    skip = None
    for i in range(n_layers):
        x_in = module.in_layers[i](x)
        g_l = g[:, 2 * h * i: 2 * h * (i + 1)] if g is not None else None
        if g_l is not None and g_l.shape[-1] != 1:
            # conditioning that varies over time: add it unfused, the gate sees no broadcast term
            x_in, g_l = x_in + g_l, None
        acts = module.drop(wn_gate(x_in, g_l))
        rs = module.res_skip_layers[i](acts)
        if i < n_layers - 1:
            x, skip = wn_res_skip(x, rs, skip, x_mask)
        else:
            out = wn_out(rs, skip, x_mask)
            if skip is None:  # one-layer stack: the reference's zeros_like(x) joins the type promotion
                out = out.to(promote(out.dtype, x.dtype))
            return out
    raise ValueError("WN needs n_layers >= 1")
