"""Fused rational-quadratic spline epilogue of ``ConvFlow`` (the stochastic duration predictor's coupling flow).

What is fused. Everything ``ConvFlow.forward`` does after ``proj``: the mask on the projection, the reshape/permute
into per-element parameters, the ``1/sqrt(filter_channels)`` scaling, both softmaxes with the minimum-bin
adjustment, the cumulative knots, softplus derivatives with the pinned outer slopes, the bin search, the forward or
inverse rational-quadratic map with identity tails, log|det|, the output mask and the concatenation with ``x0``,
and the masked log|det| sum (as one partial sum per program; PyTorch adds the ``B x C x ceil(T/BLOCK_T)`` partials
to ``[B]``, which keeps the result deterministic and costs no extra pass over memory). The backward kernel recomputes
the spline from the same inputs and writes the gradients for ``x`` and for all ``3K - 1`` parameter rows of ``h``;
it handles both directions (the inverse through the implicit-function derivative of the bin's quadratic).

Fusion boundary. ``pre``, ``DDSConv`` and ``proj`` stay PyTorch convolutions; the kernel starts at the raw ``proj``
output ``h [B, C(3K-1), T]`` and writes ``out [B, 2C, T]`` directly.

Bytes per spline element (fp32, K = 10, 29 parameters): the reference reads and writes the parameters about ten
times (mask, scaling copies, pad, boolean gathers, two softmaxes, min-size affine, cumsum, pad, rescale, differences,
softplus, searchsorted, ``gather`` of six quantities) and then ~30 per-element temporaries, roughly 3 KB per element
in 40-60 launches, with host synchronisations from the boolean indexing. Forward here: read ``h`` once (116 B),
``x`` (8 B) and the mask (4 B), write ``out`` (8 B) - about 136 B in one launch. Backward: read ``h``, ``x``,
``grad_out``, mask (~140 B), write ``grad_x`` and ``grad_h`` (~124 B). No host synchronisation: no boolean
indexing, no ``.item()``; the bin index is a count of knots. The log|det| partial sums are per program, not per
element: writing a ``[B, C, T]`` log|det| and summing it in PyTorch would cost 8 B per element and a launch.

Layout: one program per (BLOCK_T time steps, channel c, batch item b); the K bin parameters of a time step live in
the second axis of a ``[BLOCK_T, KP]`` tile (``KP`` = K rounded up to a power of two), so loads along time stay
coalesced.

Precision. Math runs in fp32 (fp64 for fp64 inputs), except the knot construction (logits, both softmaxes,
cumulative sums, knots and the offsets of x inside its bin), which runs in fp64: bins can be 1e-3 of the range,
so knots rounded to fp32 near +-tail_bound put ~1e-3 relative error into a bin's size and offset, which steep bins
magnify (PyTorch's fp32 reference has that error: ~1e-4 on log|det|, ~1e-3 on gradients of magnitude ~100). That
costs 2K fp64 exponentials per element, negligible beside the memory traffic at the SDP's C = 1. Further, t and
1 - t are each formed from the nearer bin edge (the inverse solves its quadratic from both ends and keeps the
smaller root), and the softmax backward is written with the probability mass before/at/after the bin, so that no
result comes from the difference of two nearly equal terms. The fp32 kernel is 10-100x closer to the float64
reference than PyTorch's fp32 spline on log|det| and gradients.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (FLOW_DTYPE_PAIRS, FLOW_SUPPORTED, acc_dtype, cast_for, check_flow_args, compute_dtype,
                      flow_grad_buffers, flow_inputs, fused_op, launch, load_as, register_flow_autograd)

from ..transforms import DEFAULT_MIN_BIN_HEIGHT, DEFAULT_MIN_BIN_WIDTH, DEFAULT_MIN_DERIVATIVE

BLOCK_T = 64
NUM_WARPS = 4

# --------------------------------------------------------------------------------------------------------------
# Triton kernels: @triton.jit helpers, then the kernels (pointer comments give shapes)
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _softplus(x):
    # log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)); log1p(y) = log(u) * y / (u - 1) with u = 1 + y keeps full
    # precision for tiny y (and gives y when u rounds to 1).
    y = tl.exp(-tl.abs(x))
    u = 1.0 + y
    small = u == 1.0
    l1p = tl.where(small, y, tl.log(u) * (y / tl.where(small, 1.0, u - 1.0)))
    return tl.maximum(x, 0.0) + l1p


@triton.jit
def _pick(vals, sel):
    # vals [BT, KP], sel [BT, KP] one-hot (or empty) -> [BT]
    return tl.sum(tl.where(sel, vals, 0.0), axis=1)


@triton.jit
def _knots(u, j, lo, hi, min_size, ACC: tl.constexpr, K: tl.constexpr):
    # u [BT, KP] fp64 bin logits (lanes j >= K ignored) -> softmax p [BT, KP] in ACC (0 beyond K) and the right knot
    # of every bin [BT, KP] in fp64 (knot j + 1; the last one pinned to hi).
    # The knots are built in fp64: a bin's size and the offset of x inside it are differences of knots near
    # +-tail_bound, and a bin can be 1e-3 of the range, so fp32 knots (as in PyTorch's fp32 reference) carry ~1e-3
    # relative error into those offsets, which a steep bin's quadratic magnifies further. 2K fp64 exps per element
    # are negligible beside the memory traffic.
    valid = j < K
    u64 = tl.where(valid, u, float("-inf"))
    e = tl.exp(u64 - tl.max(u64, axis=1)[:, None])
    e = tl.where(valid, e, 0.0)
    p = e / tl.sum(e, axis=1)[:, None]
    frac = tl.where(valid, min_size + (1.0 - min_size * K) * p, 0.0)
    right = (hi - lo) * tl.cumsum(frac, axis=1) + lo
    right = tl.where(j == K - 1, hi, right)
    return p.to(ACC), right


@triton.jit
def _load_params(h_row, offs_t, m, T, div, ACC: tl.constexpr, K: tl.constexpr, KP: tl.constexpr):
    # h_row: pointer to h[b, c * (3K - 1), 0] of h [B, C * (3K - 1), T]; returns the masked, scaled logits
    # uw, uh [BT, KP] (fp64, see _knots: one rounding of h / div would already move steep knots) and the masked
    # raw interior derivatives ud [BT, KP] in ACC (valid lanes j < K - 1).
    j = tl.arange(0, KP)[None, :]
    tmask = (offs_t < T)[:, None]
    ptr = h_row + j * T + offs_t[:, None]
    mm = m[:, None].to(tl.float64)
    uw = tl.load(ptr, mask=tmask & (j < K), other=0.0).to(tl.float64) * mm / div
    uh = tl.load(ptr + K * T, mask=tmask & (j < K), other=0.0).to(tl.float64) * mm / div
    ud = load_as(ptr + 2 * K * T, tmask & (j < K - 1), ACC) * m[:, None]
    return uw, uh, ud


@triton.jit
def _locate(v, kw, kh, dint, j, inverse, lo, K: tl.constexpr):
    # Bin of every v [BT] (a count of the interior knots <= v; searched among height knots when inverting), the
    # bin's edges (fp64) and end derivatives (the outer derivatives are exactly 1).
    kn = tl.where(inverse != 0, kh, kw)
    idx = tl.sum(tl.where((j < K - 1) & (v[:, None] >= kn), 1, 0), axis=1)
    sel = j == idx[:, None]
    prev = j == (idx[:, None] - 1)
    first = idx == 0
    xl = tl.where(first, lo, _pick(kw, prev))
    yl = tl.where(first, lo, _pick(kh, prev))
    xr = _pick(kw, sel)
    yr = _pick(kh, sel)
    dl = tl.where(first, 1.0, _pick(dint, prev))
    dr = tl.where(idx == K - 1, 1.0, _pick(dint, sel))
    return idx, xl, xr, yl, yr, dl, dr


@triton.jit
def _softmax_grad(p, j, ii, g_left, g_right, K: tl.constexpr):
    # Gradient of the bin logits [BT, KP], up to the factor d fraction / d softmax * d knot / d cumsum, given the
    # gradients of the bin's left and right knots [BT]: fraction i collects g_left [i < idx] + g_right [i <= idx],
    # then the softmax backward p_i (g_i - sum_k p_k g_k).
    # That backward is written with the probability mass before, at and after the bin (Pb, pi, Pa; sums of
    # positives), so a logit with p ~ 1 gets p (g_right Pa - Pb g_left) instead of the difference of two nearly
    # equal terms, which in fp32 would leave ~1e-7 of the larger term where the answer can be 1e-11.
    valid = j < K
    pb = tl.sum(tl.where(j < ii, p, 0.0), axis=1)
    pi = _pick(p, j == ii)
    pa = tl.sum(tl.where(valid & (j > ii), p, 0.0), axis=1)
    c_before = g_left * (pi + pa) + g_right * pa
    c_at = g_right * pa - pb * g_left
    c_after = -(pb * (g_left + g_right) + pi * g_right)
    coef = tl.where(j < ii, c_before[:, None], tl.where(j == ii, c_at[:, None], c_after[:, None]))
    return tl.where(valid, p * coef, 0.0)


@triton.jit
def _root(dy, bh, s, curv, d0):
    # Root in [0, 1] of the bin's quadratic for an offset dy above the bin's bottom (d0 = derivative there), in the
    # form that stays accurate for small roots.
    qa = dy * curv + bh * (s - d0)
    qb = bh * d0 - dy * curv
    qc = -s * dy
    disc = tl.maximum(qb * qb - 4.0 * qa * qc, 0.0)
    return (2.0 * qc) / (-qb - tl.sqrt(disc))


@triton.jit
def _rq(v, inverse, xl, xr, yl, yr, dl, dr, ACC: tl.constexpr):
    # Rational-quadratic map of one bin, forward (v = x) or inverse (v = y); the edges xl, xr, yl, yr are fp64.
    # Returns the mapped value, log|dy/dx| of the forward map at the bin coordinate t, and the intermediates the
    # backward pass reuses (all in ACC). Sizes and offsets are differences of fp64 edges, rounded once.
    # t and u = 1 - t are each formed from the nearer bin edge, never as 1 - (a value near 1): near the top of a
    # bin the log-slope depends on u, which 1 - t would leave with no correct digit in fp32. The inverse solves the
    # quadratic from both ends (from the top it is the same map in u with dl and dr swapped) and keeps the smaller
    # root of the two, which is the accurate one.
    v64 = v.to(tl.float64)
    bw = (xr - xl).to(ACC)
    bh = (yr - yl).to(ACC)
    s = bh / bw
    curv = dl + dr - 2.0 * s
    inv = inverse != 0
    r_lo = _root((v64 - yl).to(ACC), bh, s, curv, dl)
    r_hi = _root((yr - v64).to(ACC), bh, s, curv, dr)
    lo_side = r_lo <= r_hi
    t = tl.where(inv, tl.where(lo_side, r_lo, 1.0 - r_hi), (v64 - xl).to(ACC) / bw)
    u = tl.where(inv, tl.where(lo_side, 1.0 - r_lo, r_hi), (xr - v64).to(ACC) / bw)
    t1 = t * u
    den = s + curv * t1
    num = s * t * t + dl * t1
    q = bh * num / den
    dn = dr * t * t + 2.0 * s * t1 + dl * u * u
    lad = tl.log(s * s * dn) - 2.0 * tl.log(den)
    out = tl.where(inv, tl.where(lo_side, xl + (t * bw).to(tl.float64), xr - (u * bw).to(tl.float64)),
                   yl + q.to(tl.float64))
    return out.to(ACC), lad, t, u, bw, bh, s, curv, t1, den, num, q, dn


@triton.jit
def _row_block(mask_ptr, C, T, ACC: tl.constexpr, BLOCK_T: tl.constexpr):
    # Program (time block, channel c, batch item b): time offsets [BLOCK_T] and in-bounds, the mask there (ACC), and
    # the flat offsets of the x0 and x1 rows of channel c in [B, 2C, T].
    pid_t = tl.program_id(0)
    c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = offs < T
    m = load_as(mask_ptr + b * T + offs, tmask, ACC)
    return pid_t, c, b, offs, tmask, m, (b * 2 * C + c) * T, (b * 2 * C + C + c) * T


@triton.jit
def _spline_at(v, h_row, offs, m, T, inverse, tail, div, min_w, min_h, min_d, ACC: tl.constexpr, K: tl.constexpr,
               KP: tl.constexpr):
    # The spline whose parameters start at h_row (pointer to h[b, c(3K-1), 0]) at v [BT] (x, or y when inverting):
    # the lane index j [1, KP], both softmaxes, the raw interior derivatives, which lanes lie inside the tail bound,
    # the bin index, its edges and end derivatives, then _rq's results (tail lanes evaluate a finite dummy; the caller
    # replaces them).
    j = tl.arange(0, KP)[None, :]
    uw, uh, ud = _load_params(h_row, offs, m, T, div, ACC, K, KP)
    pw, kw = _knots(uw, j, -tail, tail, min_w, ACC, K)
    ph, kh = _knots(uh, j, -tail, tail, min_h, ACC, K)
    dint = min_d + _softplus(ud)
    inside = (v >= -tail) & (v <= tail)
    vs = tl.minimum(tl.maximum(v, -tail), tail)
    idx, xl, xr, yl, yr, dl, dr = _locate(vs, kw, kh, dint, j, inverse, -tail, K)
    y, lad, t, u, bw, bh, s, curv, t1, den, num, q, dn = _rq(vs, inverse, xl, xr, yl, yr, dl, dr, ACC)
    return j, pw, ph, ud, inside, idx, xl, xr, yl, yr, dl, dr, y, lad, t, u, bw, bh, s, curv, t1, den, num, q, dn


@triton.jit
def _spline_fwd_kernel(
    x_ptr,  # [B, 2C, T] input (x0 | x1), contiguous
    h_ptr,  # [B, C * (3K - 1), T] raw proj output (before the mask), contiguous
    mask_ptr,  # [B, 1, T] compute dtype (fp32; fp64 for fp64 inputs)
    out_ptr,  # [B, 2C, T] output (x0 * mask | spline(x1) * mask), dtype of x
    part_ptr,  # [B, C, n_tb] compute dtype: partial sums of log|det| * mask of the map applied
    C, T, n_tb,
    inverse,  # 0: forward map, 1: inverse map
    tail, div, min_w, min_h, min_d,  # tail bound, sqrt(filter_channels), minimum bin width/height/derivative
    ACC: tl.constexpr,  # compute dtype: fp32 (fp64 for fp64 data)
    K: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_t, c, b, offs, tmask, m, row0, row1 = _row_block(mask_ptr, C, T, ACC, BLOCK_T)
    x0 = load_as(x_ptr + row0 + offs, tmask, ACC)
    v = load_as(x_ptr + row1 + offs, tmask, ACC)
    tl.store(out_ptr + row0 + offs, cast_for(x0 * m, out_ptr), mask=tmask)
    h_row = (b * C + c) * (3 * K - 1) * T
    _, _, _, _, inside, _, _, _, _, _, _, _, y, lad, _, _, _, _, _, _, _, _, _, _, _ = _spline_at(
        v, h_ptr + h_row, offs, m, T, inverse, tail, div, min_w, min_h, min_d, ACC, K, KP)

    y = tl.where(inside, y, v)
    lad = tl.where(inverse != 0, -lad, lad)
    lad = tl.where(inside & tmask, lad * m, 0.0)
    tl.store(out_ptr + row1 + offs, cast_for(y * m, out_ptr), mask=tmask)
    tl.store(part_ptr + (b * C + c) * n_tb + pid_t, tl.sum(lad, axis=0))


@triton.jit
def _spline_bwd_kernel(
    x_ptr,  # [B, 2C, T] forward input, contiguous
    h_ptr,  # [B, C * (3K - 1), T] raw proj output, contiguous
    mask_ptr,  # [B, 1, T] compute dtype (fp32; fp64 for fp64 inputs)
    gout_ptr,  # [B, 2C, T] gradient of out, contiguous
    gld_ptr,  # [B] compute dtype: gradient of the log|det| sum
    gx_ptr,  # [B, 2C, T] gradient of x (dtype of x)
    gh_ptr,  # [B, C * (3K - 1), T] gradient of h (dtype of h)
    C, T,
    inverse, tail, div, min_w, min_h, min_d,
    ACC: tl.constexpr,  # compute dtype: fp32 (fp64 for fp64 data)
    K: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_t, c, b, offs, tmask, m, row0, row1 = _row_block(mask_ptr, C, T, ACC, BLOCK_T)
    inv = inverse != 0
    g0 = load_as(gout_ptr + row0 + offs, tmask, ACC)
    g1 = load_as(gout_ptr + row1 + offs, tmask, ACC)
    v = load_as(x_ptr + row1 + offs, tmask, ACC)
    gl = tl.load(gld_ptr + b)
    tl.store(gx_ptr + row0 + offs, cast_for(g0 * m, gx_ptr), mask=tmask)
    h_row = (b * C + c) * (3 * K - 1) * T
    j, pw, ph, ud, inside, idx, xl, xr, yl, yr, dl, dr, y, lad, t, u, bw, bh, s, curv, t1, den, num, q, dn = _spline_at(
        v, h_ptr + h_row, offs, m, T, inverse, tail, div, min_w, min_h, min_d, ACC, K, KP)

    gy = g1 * m  # upstream gradient of the mapped value
    gL = gl * m  # upstream gradient of the per-element log|det|

    # Partial derivatives of the bin's forward map Y(t; s, bh, dl, dr, yl) and of its log-slope L(t; s, dl, dr).
    # (u = 1 - t; bh - q = yr - Y = bh (s u^2 + dr t u) / den, free of cancellation.)
    one_m2t = u - t
    Y_t = bh * s * dn / (den * den)
    Y_s = (bh * t * t - q * (1.0 - 2.0 * t1)) / den
    Y_bh = num / den
    Y_dl = t1 * (bh * (s * u * u + dr * t1) / den) / den
    Y_dr = -q * t1 / den
    L_t = 2.0 * (dr * t + s * one_m2t - dl * u) / dn - 2.0 * curv * one_m2t / den
    L_s = 2.0 / s + 2.0 * t1 / dn - 2.0 * (1.0 - 2.0 * t1) / den
    L_dl = u * u / dn - 2.0 * t1 / den
    L_dr = t * t / dn - 2.0 * t1 / den

    # Forward map: out = Y(t), t = (v - xl) / bw, log|det| = L.
    f_gt = gy * Y_t + gL * L_t
    # Inverse map: out = xl + t bw with Y(t) = v, log|det| = -L; dt = (dv - dY|_t) / Y_t.
    r = (gy * bw - gL * L_t) / Y_t
    g_s = tl.where(inv, -r * Y_s - gL * L_s, gy * Y_s + gL * L_s)
    g_bh = tl.where(inv, -r * Y_bh, gy * Y_bh) + g_s / bw
    g_dl = tl.where(inv, -r * Y_dl - gL * L_dl, gy * Y_dl + gL * L_dl)
    g_dr = tl.where(inv, -r * Y_dr - gL * L_dr, gy * Y_dr + gL * L_dr)
    g_yl = tl.where(inv, -r, gy)
    g_xl = tl.where(inv, gy, -f_gt / bw)
    g_bw = tl.where(inv, gy * t, -f_gt * t / bw) - g_s * s / bw
    g_v = tl.where(inv, r, f_gt / bw)

    g_v = tl.where(inside, g_v, gy)
    tl.store(gx_ptr + row1 + offs, cast_for(g_v, gx_ptr), mask=tmask)

    # Knot gradients: the left knot is xl (interior when idx > 0), the right knot xl + bw (interior when
    # idx < K - 1); knot k = span * cumsum(frac)[k - 1] + lo with frac = min + (1 - K min) softmax(u).
    zero = tl.zeros_like(v)
    g_left_w = tl.where(inside, g_xl - g_bw, zero)
    g_right_w = tl.where(inside & (idx < K - 1), g_bw, zero)
    g_left_h = tl.where(inside, g_yl - g_bh, zero)
    g_right_h = tl.where(inside & (idx < K - 1), g_bh, zero)
    span = 2.0 * tail
    ii = idx[:, None]
    # (scalar factors applied to the tiles here: under the interpreter a derived Python-float scalar passed into a
    # jit helper becomes an fp32 constant, which would cost the fp64 kernels their precision)
    gu_w = _softmax_grad(pw, j, ii, g_left_w, g_right_w, K) * span * (1.0 - min_w * K)
    gu_h = _softmax_grad(ph, j, ii, g_left_h, g_right_h, K) * span * (1.0 - min_h * K)
    # d softplus / d x = sigmoid(x); dl is interior derivative idx - 1, dr interior derivative idx.
    z = tl.exp(-tl.abs(ud))
    sig = tl.where(ud >= 0, 1.0 / (1.0 + z), z / (1.0 + z))
    g_dl = tl.where(inside, g_dl, zero)
    g_dr = tl.where(inside, g_dr, zero)
    gud = sig * (tl.where(j == ii - 1, g_dl[:, None], 0.0) + tl.where(j == ii, g_dr[:, None], 0.0))

    mm = m[:, None]
    gptr = gh_ptr + h_row + j * T + offs[:, None]
    tm2 = tmask[:, None]
    tl.store(gptr, cast_for(gu_w * mm / div, gh_ptr), mask=tm2 & (j < K))
    tl.store(gptr + K * T, cast_for(gu_h * mm / div, gh_ptr), mask=tm2 & (j < K))
    tl.store(gptr + 2 * K * T, cast_for(gud * mm, gh_ptr), mask=tm2 & (j < K - 1))


# --------------------------------------------------------------------------------------------------------------
# Compile-check contract: every configuration the launchers use. num_bins = 10 as in Piper (other values compile on
# demand). (x, h) dtype pairs: same dtype, or fp32 flow state with a bf16/fp16 projection (autocast); the mask,
# partial sums and grad_logdet are fp32 (fp64 with fp64 inputs, which tests use for gradcheck).

_SCALARS = {"inverse": "i32", "tail": "fp32", "div": "fp32", "min_w": "fp32", "min_h": "fp32", "min_d": "fp32"}
_CONST = {"K": 10, "KP": 16, "BLOCK_T": BLOCK_T}


def _compile_configs():
    configs = []
    for xt, ht in FLOW_DTYPE_PAIRS:
        ct = "fp64" if xt == "fp64" else "fp32"
        const = dict(_CONST, ACC=tl.float64 if xt == "fp64" else tl.float32)
        consts = {k: "constexpr" for k in const}
        sig = dict(x_ptr=f"*{xt}", h_ptr=f"*{ht}", mask_ptr=f"*{ct}", out_ptr=f"*{xt}", part_ptr=f"*{ct}",
                   C="i32", T="i32", n_tb="i32", **_SCALARS, **consts)
        configs.append(dict(fn=_spline_fwd_kernel, signature=sig, constexprs=dict(const), num_warps=NUM_WARPS,
                            name=f"spline fwd x={xt} h={ht}"))
        sig = dict(x_ptr=f"*{xt}", h_ptr=f"*{ht}", mask_ptr=f"*{ct}", gout_ptr=f"*{xt}", gld_ptr=f"*{ct}",
                   gx_ptr=f"*{xt}", gh_ptr=f"*{ht}", C="i32", T="i32", **_SCALARS, **consts)
        configs.append(dict(fn=_spline_bwd_kernel, signature=sig, constexprs=dict(const), num_warps=NUM_WARPS,
                            name=f"spline bwd x={xt} h={ht}"))
    return configs


COMPILE_CONFIGS = _compile_configs()


# --------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------


def _check(x: torch.Tensor, h: torch.Tensor, x_mask: torch.Tensor, num_bins: int) -> Tuple[int, int, int]:
    if num_bins < 2:
        raise ValueError(f"num_bins must be >= 2, got {num_bins}")
    return check_flow_args(x, h, x_mask, 3 * num_bins - 1, "h", " (h: [B, C * (3 * num_bins - 1), T])")


def _launch_args(x: torch.Tensor, num_bins: int) -> dict:
    return dict(ACC=acc_dtype(x), K=num_bins, KP=triton.next_power_of_2(num_bins), BLOCK_T=BLOCK_T, num_warps=NUM_WARPS)


@fused_op
@torch.library.custom_op("vits_fast::rq_spline_coupling", mutates_args=())
def rq_spline_coupling(x: torch.Tensor, h: torch.Tensor, x_mask: torch.Tensor, inverse: bool, tail_bound: float,
                       size_divisor: float, num_bins: int, min_bin_width: float, min_bin_height: float,
                       min_derivative: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Spline coupling epilogue of ConvFlow.

    ``x [B, 2C, T]`` (halves x0, x1), ``h [B, C(3K-1), T]`` raw ``proj`` output (row ``c(3K-1) + j``: widths
    ``j < K``, heights ``K <= j < 2K``, interior derivatives ``2K <= j``), ``x_mask [B, 1, T]`` (a constant).
    ``h`` is multiplied by the mask and widths/heights are divided by ``size_divisor``, as ConvFlow does.
    Returns ``out [B, 2C, T] = cat(x0, f(x1)) * x_mask``, ``f`` the spline with identity tails outside
    ``[-tail_bound, tail_bound]`` (its inverse when ``inverse``), and ``logdet [B] = sum(log|f'(x1)| * x_mask)``
    (the slope of the map applied: the negative forward log-slope when inverting; fp32, fp64 for fp64 inputs).
    """
    B, C, T = _check(x, h, x_mask, num_bins)
    x, h, mask, cdt = flow_inputs(x, h, x_mask)
    out = _common.empty(x.shape, x.dtype, x.device)
    n_tb = _common.cdiv(T, BLOCK_T)
    part = _common.empty((B, C, n_tb), cdt, x.device)
    if out.numel():
        launch(_spline_fwd_kernel, (n_tb, C, B), x, x, h, mask, out, part, C, T, n_tb, int(inverse),
               float(tail_bound), float(size_divisor), float(min_bin_width), float(min_bin_height),
               float(min_derivative), **_launch_args(x, num_bins))
    return out, part.sum(dim=(1, 2))


@fused_op
@torch.library.custom_op("vits_fast::rq_spline_coupling_bwd", mutates_args=())
def rq_spline_coupling_bwd(grad_out: torch.Tensor, grad_logdet: torch.Tensor, x: torch.Tensor, h: torch.Tensor,
                                x_mask: torch.Tensor, inverse: bool, tail_bound: float, size_divisor: float,
                                num_bins: int, min_bin_width: float, min_bin_height: float,
                                min_derivative: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``(grad_x [B, 2C, T], grad_h [B, C(3K-1), T])`` of :func:`rq_spline_coupling` given
    ``grad_out [B, 2C, T]`` and ``grad_logdet [B]``."""
    B, C, T = _check(x, h, x_mask, num_bins)
    x, h, mask, grad_out, grad_logdet, grad_x, grad_h = flow_grad_buffers(grad_out, grad_logdet, x, h, x_mask)
    if grad_x.numel():
        launch(_spline_bwd_kernel, (_common.cdiv(T, BLOCK_T), C, B), x, x, h, mask, grad_out, grad_logdet, grad_x,
               grad_h, C, T, int(inverse), float(tail_bound), float(size_divisor), float(min_bin_width),
               float(min_bin_height), float(min_derivative), **_launch_args(x, num_bins))
    return grad_x, grad_h


# --------------------------------------------------------------------------------------------------------------
# Custom-op registration: fake tensors (shapes and dtypes for torch.compile and opcheck) and autograd
# --------------------------------------------------------------------------------------------------------------


@rq_spline_coupling.register_fake
def _(x, h, x_mask, inverse, tail_bound, size_divisor, num_bins, min_bin_width, min_bin_height, min_derivative):
    _check(x, h, x_mask, num_bins)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(x.shape[0], dtype=compute_dtype(x)))


@rq_spline_coupling_bwd.register_fake
def _(grad_out, grad_logdet, x, h, x_mask, inverse, tail_bound, size_divisor, num_bins, min_bin_width,
      min_bin_height, min_derivative):
    _check(x, h, x_mask, num_bins)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(h, memory_format=torch.contiguous_format))


register_flow_autograd(rq_spline_coupling, rq_spline_coupling_bwd, "rq_spline_coupling")


# --------------------------------------------------------------------------------------------------------------
# Module entry points
# --------------------------------------------------------------------------------------------------------------


def conv_flow_forward(flow, x: torch.Tensor, x_mask: torch.Tensor, g: Optional[torch.Tensor] = None,
                      reverse: bool = False):
    """``ConvFlow.forward`` on the fused path.

    ``flow``: a :class:`vits_fast.modules.ConvFlow`; ``x [B, 2C, T]``, ``x_mask [B, 1, T]``,
    ``g [B, filter_channels, T]`` or None. Returns ``(x' [B, 2C, T], logdet [B])``, or ``x'`` when ``reverse``,
    as the reference forward does.
    """
    c = flow.half_channels
    if x.dim() != 3 or x.size(1) != 2 * c:
        raise ValueError(f"ConvFlow: x must be [B, {2 * c}, T], got {tuple(x.shape)}")
    h = flow.convs(flow.pre(x[:, :c]), x_mask, g=g)
    h = flow.proj(h)  # the mask is applied inside the kernel
    # Output dtype as the reference's type promotion gives it (x1' keeps x's dtype, the mask may widen it).
    out_dtype = torch.promote_types(x.dtype, x_mask.dtype)
    xk = x.to(out_dtype)
    if (xk.dtype, h.dtype) not in FLOW_SUPPORTED:
        common = torch.promote_types(xk.dtype, h.dtype)
        xk, h = xk.to(common), h.to(common)
    out, logdet = torch.ops.vits_fast.rq_spline_coupling(
        xk, h, x_mask, bool(reverse), float(flow.tail_bound), math.sqrt(flow.filter_channels), int(flow.num_bins),
        DEFAULT_MIN_BIN_WIDTH, DEFAULT_MIN_BIN_HEIGHT, DEFAULT_MIN_DERIVATIVE)
    out = out.to(out_dtype)
    return out if reverse else (out, logdet.to(out_dtype))
