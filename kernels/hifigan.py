"""Fused elementwise kernels of the HiFi-GAN decoder (``vits_fast.models.Generator``, ``modules.ResBlock1/2``).

What is fused
-------------
Everything between two convolutions of the generator is elementwise: the leaky ReLU in front of every
convolution, the padded-batch mask (``* x_mask``, present when ``x_mask`` is given, i.e. when decoding a padded
batch), the residual adds, the multi-receptive-field (MRF) sum of the ``num_kernels`` blocks of a stage and its
division, the speaker conditioning add, and the final leaky ReLU. Three forward ops cover all of it
(``s``: a residual stream, ``m``: the mask or 1, ``lrelu``: leaky ReLU with the given slope):

* ``hifigan_act(x, bias, m)      = lrelu(x + bias) * m``                     (bias: ``cond(g)`` [b, c, 1] or none)
* ``hifigan_res_act(y, x, m)     = (s = y + x, lrelu(s) * m)``              residual step inside a block
* ``hifigan_mrf(y, x, acc, m)    = acc + (y + x) * m``                       last step of a block: the MRF sum;
  for the last block of a stage ``lrelu((acc + (y + x) * m) / num_kernels) * m``: the stage's output goes
  straight to the next upsampling conv (slope 0.1) or to ``conv_post`` (slope 0.01, upstream's default)

and one backward kernel each (``hifigan_act_bwd`` serves both activations; ``hifigan_mrf_bwd`` the last block).
In the generator the first activation of all ``num_kernels`` blocks of a stage is the same tensor
(``lrelu(x) * m`` of the upsampled ``x``), so it is computed once per stage instead of once per block.

Bytes moved per element of the ``[b, c, t]`` activation, fp32 (bf16/fp16 halve them; the ``[b, 1, t]`` mask and
``[b, c, 1]`` conditioning are ~0 per element). r = read, w = write; "mask" = padded batch (inference),
"none" = no mask (training slices).

=========================  ====================================================  ==================
stage                      eager reference (mask / none)                         fused
=========================  ====================================================  ==================
activation                 lrelu r4 w4, *m r4 w4 = 16 / 8                        r4 w4 = 8
activation + conditioning  + add r4 w4 = 24 / 16                                 8
residual step              add r8 w4, lrelu 8, *m 8 = 28 / 20                    r8 w8 = 16
block end (MRF)            add 12, *m 8, acc add 12 = 32 / 24                    r12 w4 = 16
stage end (last block)     32 / 24 + div r4 w4, lrelu 8, *m 8 = 56 / 40          r12 w4 = 16
activation bwd             *m bwd r4 w4, lrelu bwd r8 w4 = 20 / 12               r8 w4 = 12
residual step bwd          20 / 12 + sum of the two grads of x r8 w4 = 32 / 24  r12 w4 = 16
stage end bwd              *m 8, lrelu bwd 12, div bwd 8 = 28 / 20               r8 w4 = 12
=========================  ====================================================  ==================

The first block of a stage has no ``acc``: eager 20 / 12, fused 12 (unmasked it is the same aten add). The
backward of ``(y + x) * m`` at every block end is the same on both sides (``dout * m``, r4 w4, or nothing
without a mask). Activation backward reads the activation's *output* ``xt`` (its sign is the
pre-activation's wherever ``m > 0``, and where ``m = 0`` the gradient is 0 either way), not its input: ``xt`` is
kept anyway as the next convolution's saved input, so the pre-activation is never kept for backward (eager
keeps it): one ``[b, c, t]`` tensor less per activation. This needs a non-negative mask (sequence masks are
0/1) and a non-negative slope. (In fp16 a pre-activation in (0, 6e-8) stores as 0 and takes the slope branch:
the same as a branch decided on an fp16-rounded input, as the reference's fp16 path does.)

Launches
--------
Each custom-op call costs far more host time than an aten op (first H200 run: ~12 us of custom-op dispatch
plus ~14 us of Triton launch, against ~1.4 us for an aten add), so each op here replaces several aten ops, and
where a fused op would replace a single aten op the aten op stays: an unmasked block end without MRF sum is
a plain ``y + x``, the backward of a block end that is not a stage end is ``dout * m`` (or nothing), the
conditioning gradient is one ``sum`` over time, and the final ``tanh(conv_post(.)) * m`` acts on the
1-channel ``conv_post`` output (1/c of the last stage's bytes) and stays two aten ops.

Elementwise launches (counted with a ``TorchDispatchMode`` on the CPU: every dispatched op except views,
allocations, convolutions and weight norm, whose 44 (medium) / 154 (high) forward calls are the same on both
sides; a fused op is one launch; ``scripts/count_decoder_launches.py`` prints this table), forward / backward,
with a mask / without:

=====================================  =============  =============  =============  =============
module                                 eager, mask    eager, none    fused, mask    fused, none
                                       fwd    bwd     fwd    bwd     fwd    bwd     fwd    bwd
=====================================  =============  =============  =============  =============
ResBlock1 (3 dilation pairs) alone     16     16      9      9       7      8       7      7
ResBlock2 (2 convs) alone              7      7       4      4       3      4       3      3
Generator medium (3 x 3 ResBlock2)     86     83      50     50      28     43      23     32
Generator high (4 x 3 ResBlock1)       221    217     126    126     84     104     78     90
=====================================  =============  =============  =============  =============

(Speaker conditioning adds one launch to each Generator count on both sides.) Of the fused Generator's
launches, 19-22 (medium) / 73-77 (high) forward and 16 / 69 backward are custom ops; the remaining aten ops
are the input mask, the mask upsampling (``repeat_interleave``), the final ``tanh`` (and ``* m``), the
unmasked first ``y + x`` block end of each stage, the ``dout * m`` backward of masked block ends, and
autograd's sums of the gradients of tensors with several consumers (the upsampled ``x`` feeds every block of
its stage), which eager has too.

Estimated effect (estimates from the tables above and the first H200 run's calibration: 4.24 TB/s copy
bandwidth, ~11 us host time per aten op, ~26 us per custom op; not measured on a GPU). Piper medium,
training (no mask, fp32, batch 32 x 8192-sample segments, 13.6 M elements over the three stages): ~116 B per
element less fwd+bwd, ~1.6 GB per step, ~0.4 ms of device time; five ``[b, c, t]`` tensors per stage no longer
kept for backward, ~270 MB. Host time per forward: about equal without a mask (50 aten ops against 19 custom +
4 aten), ~0.3 ms less with one (86 against 22 + 6); under CUDA graphs only the launch count remains (86 -> 28).

Why the boundary is here
------------------------
The convolutions (``ups`` transposed convs, the dilated block convs, all with legacy weight norm) stay in
PyTorch/cuDNN: they are GEMM-shaped, weight norm's backward is autograd's, and their outputs must exist in
memory anyway. Each stretch between two of them becomes one pass that reads the conv output (and the
residual stream) once and writes the next conv's input once.

Dtypes: fp16/bf16/fp32 (and fp64) pointers, math in fp32 (fp64 for fp64 data), one rounding per output;
output dtypes as PyTorch's type promotion gives the reference (under autocast the conv outputs are bf16 while a
given mask is fp32, which promotes the masked outputs to fp32 exactly as the reference does).

Autograd: first derivatives only (the ``*_bwd`` ops have no autograd formula, so a double backward raises).
The mask is a constant: asking for its gradient is a ``ValueError``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (acc_dtype, cast_for, config_collector, flat_block, flat_grid, fused_op, launch, load_as, mask_arg,
                      promote, sum_to)
BLOCK = 1024  # elements of the flattened per-item [C*T] block per program (4 warps: 8 per thread)

# --------------------------------------------------------------------------------------------------------------
# Triton kernels. Tensors are addressed per batch item as a flat [C*T] block (contiguous inside every batch
# item); the batch index is program axis 1. ``mask_ptr`` rows are time-contiguous with batch stride stride_mask_batch (0
# when one mask row serves the whole batch).
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _lrelu(z, slope):
    return tl.where(z > 0, z, z * slope)


@triton.jit
def _masked_lrelu_grad(dout_ptr, out_ptr, mask_ptr, stride_mask_batch, C, T, slope, HAS_MASK: tl.constexpr,
                       ACC: tl.constexpr, BLOCK: tl.constexpr):
    # Gradient through ``lrelu(z, slope) * mask`` for this program's block of the [C, T] item bi, given the output's
    # gradient and the output itself (its sign picks the branch: mask >= 0, slope >= 0). Returns (bi, offsets j,
    # in-bounds, C * T, dout * mask * lrelu'(z)).
    ct = C * T
    bi, j, inb = flat_block(ct, BLOCK)
    d = load_as(dout_ptr + bi * ct + j, inb, ACC)
    if HAS_MASK:
        d = d * load_as(mask_ptr + bi * stride_mask_batch + j % T, inb, ACC)
    o = load_as(out_ptr + bi * ct + j, inb, ACC)
    return bi, j, inb, ct, tl.where(o > 0, d, d * slope)


@triton.jit
def _act_fwd_kernel(
    x_ptr,  # [B, C, T] input, contiguous
    y_ptr,  # [B, C, T] conv output added to x (residual step); unused unless HAS_Y
    bias_ptr,  # [B, C, 1] per-channel bias (strides stride_bias_batch, stride_bias_chan); unused unless HAS_B
    mask_ptr,  # [B, 1, T] mask (batch stride stride_mask_batch); unused unless HAS_MASK
    s_ptr,  # [B, C, T] output: x + y (the new residual stream); unused unless HAS_Y
    xt_ptr,  # [B, C, T] output: lrelu(x (+ y) (+ b), slope) * mask
    C, T, stride_bias_batch, stride_bias_chan, stride_mask_batch, slope,
    HAS_Y: tl.constexpr, HAS_B: tl.constexpr, HAS_MASK: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    ct = C * T
    bi, j, inb = flat_block(ct, BLOCK)  # batch item bi, flat offsets j into its [C, T]
    z = load_as(x_ptr + bi * ct + j, inb, ACC)
    if HAS_Y:
        z = load_as(y_ptr + bi * ct + j, inb, ACC) + z
        tl.store(s_ptr + bi * ct + j, cast_for(z, s_ptr), mask=inb)
    if HAS_B:
        z += load_as(bias_ptr + bi * stride_bias_batch + (j // T) * stride_bias_chan, inb, ACC)
    v = _lrelu(z, slope)
    if HAS_MASK:
        v = v * load_as(mask_ptr + bi * stride_mask_batch + j % T, inb, ACC)
    tl.store(xt_ptr + bi * ct + j, cast_for(v, xt_ptr), mask=inb)


@triton.jit
def _act_bwd_kernel(
    dxt_ptr,  # [B, C, T] gradient of the activation output, contiguous
    xt_ptr,  # [B, C, T] the activation output (its sign picks the lrelu branch), contiguous
    ds_ptr,  # [B, C, T] gradient of the residual stream s; unused unless HAS_DS
    mask_ptr,  # [B, 1, T] mask (batch stride stride_mask_batch); unused unless HAS_MASK
    d_ptr,  # [B, C, T] output: gradient of the pre-activation (ds + dxt * mask * lrelu')
    C, T, stride_mask_batch, slope,
    HAS_DS: tl.constexpr, HAS_MASK: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    bi, j, inb, ct, d = _masked_lrelu_grad(dxt_ptr, xt_ptr, mask_ptr, stride_mask_batch, C, T, slope, HAS_MASK, ACC,
                                           BLOCK)
    if HAS_DS:
        d += load_as(ds_ptr + bi * ct + j, inb, ACC)
    tl.store(d_ptr + bi * ct + j, cast_for(d, d_ptr), mask=inb)


@triton.jit
def _mrf_fwd_kernel(
    y_ptr,  # [B, C, T] the block's last conv output, contiguous
    x_ptr,  # [B, C, T] the block's residual stream, contiguous
    acc_ptr,  # [B, C, T] MRF sum of the previous blocks of this stage; unused unless HAS_ACC
    mask_ptr,  # [B, 1, T] mask (batch stride stride_mask_batch); unused unless HAS_MASK
    out_ptr,  # [B, C, T] output: acc + (y + x) * mask; LAST: lrelu(that / n_div, slope) * mask
    C, T, stride_mask_batch, n_div, slope,
    HAS_ACC: tl.constexpr, HAS_MASK: tl.constexpr, LAST: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    ct = C * T
    bi, j, inb = flat_block(ct, BLOCK)  # batch item bi, flat offsets j into its [C, T]
    v = load_as(y_ptr + bi * ct + j, inb, ACC) + tl.load(x_ptr + bi * ct + j, mask=inb,
                                                                           other=0.0).to(ACC)
    if HAS_MASK:
        m = load_as(mask_ptr + bi * stride_mask_batch + j % T, inb, ACC)
        v = v * m
    if HAS_ACC:
        v = load_as(acc_ptr + bi * ct + j, inb, ACC) + v
    if LAST:
        v = _lrelu(v / n_div, slope)
        if HAS_MASK:
            v = v * m
    tl.store(out_ptr + bi * ct + j, cast_for(v, out_ptr), mask=inb)


@triton.jit
def _mrf_bwd_kernel(
    dout_ptr,  # [B, C, T] gradient of the stage output (the LAST mrf's output), contiguous
    out_ptr,  # [B, C, T] the stage output (its sign picks the lrelu branch), contiguous
    mask_ptr,  # [B, 1, T] mask (batch stride stride_mask_batch); unused unless HAS_MASK
    d_ptr,  # [B, C, T] output: gradient of the MRF sum (= of acc), dout * mask * lrelu' / n_div
    C, T, stride_mask_batch, n_div, slope,
    HAS_MASK: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    bi, j, inb, ct, d = _masked_lrelu_grad(dout_ptr, out_ptr, mask_ptr, stride_mask_batch, C, T, slope, HAS_MASK, ACC,
                                           BLOCK)
    d = d / n_div
    tl.store(d_ptr + bi * ct + j, cast_for(d, d_ptr), mask=inb)


# --------------------------------------------------------------------------------------------------------------
# Launch configurations (read by tests/test_kernel_compile.py): every (kernel, dtypes, constexprs) the
# launchers below use. Dtypes per (data, mask): data = conv outputs and residual streams, mask = the mask; the
# masked outputs (activation, MRF sum) are in promote(data, mask). Same-dtype runs for fp32/bf16/fp16/fp64, plus
# the autocast mix of bf16/fp16 data with an fp32 mask; without a mask only the data dtype matters.
# --------------------------------------------------------------------------------------------------------------

_DTYPE_PAIRS = (("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("fp64", "fp64"), ("bf16", "fp32"),
                ("fp16", "fp32"))


def _compile_configs():
    cfgs, add = config_collector()
    ints = {"C": "i32", "T": "i32"}
    for ddt, mdt in _DTYPE_PAIRS:
        odt = "fp64" if "fp64" in (ddt, mdt) else ("fp32" if "fp32" in (ddt, mdt) else ddt)
        d, m, o = f"*{ddt}", f"*{mdt}", f"*{odt}"
        acc = tl.float64 if ddt == "fp64" else tl.float32
        for has_mask in ((False, True) if ddt == mdt else (True,)):
            od = o if has_mask else d  # output dtype of the masked results
            base = {"ACC": acc, "HAS_MASK": has_mask, "BLOCK": BLOCK}
            tag = f"{ddt}/{mdt if has_mask else '-'}"
            # activation (HAS_Y=False: plain or conditioned; HAS_Y=True: residual step, never with a bias)
            for has_y, has_b in ((False, False), (False, True), (True, False)):
                add(_act_fwd_kernel, dict(x_ptr=d, y_ptr=d, bias_ptr=d, mask_ptr=m, s_ptr=d, xt_ptr=od, **ints,
                                          stride_bias_batch="i32", stride_bias_chan="i32", stride_mask_batch="i32",
                                          slope="fp32"),
                    dict(base, HAS_Y=has_y, HAS_B=has_b), f"hifigan act fwd {tag} y={has_y} b={has_b}")
            for has_ds in (False, True):
                add(_act_bwd_kernel, dict(dxt_ptr=od, xt_ptr=od, ds_ptr=d, mask_ptr=m, d_ptr=d, **ints,
                                          stride_mask_batch="i32", slope="fp32"),
                    dict(base, HAS_DS=has_ds), f"hifigan act bwd {tag} ds={has_ds}")
            for has_acc in (False, True):
                for last in (False, True):
                    if not (has_acc or has_mask or last):
                        continue  # a lone y + x stays an aten add
                    add(_mrf_fwd_kernel, dict(y_ptr=d, x_ptr=d, acc_ptr=od, mask_ptr=m, out_ptr=od, **ints,
                                              stride_mask_batch="i32", n_div="fp32", slope="fp32"),
                        dict(base, HAS_ACC=has_acc, LAST=last), f"hifigan mrf fwd {tag} acc={has_acc} last={last}")
            if ddt == mdt or not has_mask:  # reads/writes only the output dtype: the mixed pairs are fp32's
                add(_mrf_bwd_kernel, dict(dout_ptr=od, out_ptr=od, mask_ptr=m, d_ptr=od, **ints,
                                          stride_mask_batch="i32",
                                          n_div="fp32", slope="fp32"), base, f"hifigan mrf bwd {tag}")
    return cfgs


COMPILE_CONFIGS = _compile_configs()

# --------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------


def _check(name: str, x: torch.Tensor, *others: Optional[torch.Tensor], mask: Optional[torch.Tensor] = None,
           bias: Optional[torch.Tensor] = None, slope: Optional[float] = None,
           num_kernels: Optional[int] = None) -> Tuple[int, int, int]:
    """Shapes: ``x`` and ``others`` [b, c, t], ``mask`` [b or 1, 1, t], ``bias`` [b or 1, c, 1]; all floating;
    ``slope`` >= 0 (the backward reads the lrelu branch off the output's sign)."""
    if slope is not None and not slope >= 0:
        raise ValueError(f"vits_fast::{name}: the leaky ReLU slope must be >= 0, got {slope}")
    if num_kernels is not None and num_kernels < 1:
        raise ValueError(f"vits_fast::{name}: num_kernels must be >= 1, got {num_kernels}")
    if x.dim() != 3:
        raise ValueError(f"vits_fast::{name}: x must be [b, c, t], got {tuple(x.shape)}")
    b, c, t = x.shape
    for o in others:
        if o is not None and o.shape != x.shape:
            raise ValueError(f"vits_fast::{name}: tensors must all be {tuple(x.shape)}, got {tuple(o.shape)}")
    if mask is not None and (mask.dim() != 3 or mask.shape[1:] != (1, t) or mask.shape[0] not in (1, b)):
        raise ValueError(f"vits_fast::{name}: mask must be [{b} or 1, 1, {t}], got {tuple(mask.shape)}")
    if bias is not None and (bias.dim() != 3 or bias.shape[1:] != (c, 1) or bias.shape[0] not in (1, b)):
        raise ValueError(f"vits_fast::{name}: bias must be [{b} or 1, {c}, 1], got {tuple(bias.shape)}")
    for v in (x, *others, mask, bias):
        if v is not None and not v.is_floating_point():
            raise TypeError(f"vits_fast::{name}: tensors must be floating point, got {v.dtype}")
    return b, c, t


def _mask_ptr(mask: Optional[torch.Tensor], b: int, t: int, dummy: torch.Tensor) -> Tuple[torch.Tensor, int]:
    return mask_arg(mask, b, t) if mask is not None else (dummy, 0)


def _dtypes(data: Tuple[torch.Tensor, ...], mask: Optional[torch.Tensor]) -> Tuple[torch.dtype, torch.dtype]:
    """(data dtype D, dtype of the masked results O = promote(D, mask))."""
    d = promote(*(v.dtype for v in data))
    return d, (promote(d, mask.dtype) if mask is not None else d)


# ---- activations ----------------------------------------------------------------------------------------------


@fused_op
@torch.library.custom_op("vits_fast::hifigan_act", mutates_args=())
def hifigan_act(x: torch.Tensor, bias: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                slope: float) -> torch.Tensor:
    """``leaky_relu(x + bias, slope) * mask``.

    x: [b, c, t]; bias: [b, c, 1] (broadcast over time) or None; mask: [b, 1, t] (non-negative) or None.
    Returns [b, c, t] in the dtype PyTorch's promotion gives.
    """
    b, c, t = _check("hifigan_act", x, mask=mask, bias=bias, slope=slope)
    dd, od = _dtypes((x,) if bias is None else (x, bias), mask)
    x = x.to(dd).contiguous()
    xt = _common.empty((b, c, t), od, x.device)
    if xt.numel():
        bp = bias.to(dd) if bias is not None else x
        b_sb, b_sc = (bp.stride(0) if bp.shape[0] > 1 else 0, bp.stride(1)) if bias is not None else (0, 0)
        m, m_sb = _mask_ptr(mask, b, t, x)
        launch(_act_fwd_kernel, flat_grid(c * t, b, BLOCK), x, x, x, bp, m, x, xt, c, t, b_sb, b_sc, m_sb,
               float(slope), HAS_Y=False, HAS_B=bias is not None, HAS_MASK=mask is not None, ACC=acc_dtype(x, m),
               BLOCK=BLOCK)
    return xt


@fused_op
@torch.library.custom_op("vits_fast::hifigan_res_act", mutates_args=())
def hifigan_res_act(y: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor],
                    slope: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """A residual step: ``s = y + x`` and the next conv's input ``leaky_relu(s, slope) * mask``.

    y, x: [b, c, t]; mask: [b, 1, t] (non-negative) or None. Returns (s, xt), both [b, c, t].
    """
    b, c, t = _check("hifigan_res_act", x, y, mask=mask, slope=slope)
    dd, od = _dtypes((y, x), mask)
    y, x = y.to(dd).contiguous(), x.to(dd).contiguous()
    s = _common.empty((b, c, t), dd, x.device)
    xt = _common.empty((b, c, t), od, x.device)
    if xt.numel():
        m, m_sb = _mask_ptr(mask, b, t, x)
        launch(_act_fwd_kernel, flat_grid(c * t, b, BLOCK), x, x, y, x, m, s, xt, c, t, 0, 0, m_sb, float(slope),
               HAS_Y=True, HAS_B=False, HAS_MASK=mask is not None, ACC=acc_dtype(x, m), BLOCK=BLOCK)
    return s, xt


@fused_op
@torch.library.custom_op("vits_fast::hifigan_act_bwd", mutates_args=())
def hifigan_act_bwd(dxt: torch.Tensor, xt: torch.Tensor, ds: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                    slope: float, out_dtype: torch.dtype) -> torch.Tensor:
    """Gradient of the pre-activation of :func:`hifigan_act` / :func:`hifigan_res_act`.

    dxt, xt: [b, c, t] (gradient and value of the activation output); ds: [b, c, t] gradient of the residual
    stream ``s`` or None. Returns ``ds + dxt * mask * (xt > 0 ? 1 : slope)`` [b, c, t] in ``out_dtype``.
    """
    b, c, t = _check("hifigan_act_bwd", xt, dxt, ds, mask=mask, slope=slope)
    dxt, xt = dxt.to(xt.dtype).contiguous(), xt.contiguous()
    ds = ds.contiguous() if ds is not None else None
    d = _common.empty((b, c, t), out_dtype, xt.device)
    if d.numel():
        m, m_sb = _mask_ptr(mask, b, t, xt)
        launch(_act_bwd_kernel, flat_grid(c * t, b, BLOCK), xt, dxt, xt, ds if ds is not None else xt, m, d, c, t,
               m_sb, float(slope), HAS_DS=ds is not None, HAS_MASK=mask is not None, ACC=acc_dtype(xt, m),
               BLOCK=BLOCK)
    return d


# ---- end of a block: MRF sum, and the stage's output activation ----------------------------------------------------


@fused_op
@torch.library.custom_op("vits_fast::hifigan_mrf", mutates_args=())
def hifigan_mrf(y: torch.Tensor, x: torch.Tensor, acc: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                num_kernels: int, slope: Optional[float]) -> torch.Tensor:
    """The end of a block: ``v = acc + (y + x) * mask`` (no ``acc``: ``(y + x) * mask``).

    With ``slope`` (the last block of a stage) returns ``leaky_relu(v / num_kernels, slope) * mask``, else ``v``.
    y, x: [b, c, t] (the block's last conv output and its residual stream); acc: [b, c, t] or None;
    mask: [b, 1, t] (non-negative) or None. Returns [b, c, t].
    """
    b, c, t = _check("hifigan_mrf", x, y, acc, mask=mask, slope=slope, num_kernels=num_kernels)
    dd, od = _dtypes((y, x), mask)
    od = promote(od, acc.dtype) if acc is not None else od
    y, x = y.to(dd).contiguous(), x.to(dd).contiguous()
    acc = acc.to(od).contiguous() if acc is not None else None
    out = _common.empty((b, c, t), od, x.device)
    if out.numel():
        m, m_sb = _mask_ptr(mask, b, t, x)
        launch(_mrf_fwd_kernel, flat_grid(c * t, b, BLOCK), x, y, x, acc if acc is not None else x, m, out, c, t,
               m_sb, float(num_kernels), float(slope) if slope is not None else 0.0, HAS_ACC=acc is not None,
               HAS_MASK=mask is not None, LAST=slope is not None, ACC=acc_dtype(x, m), BLOCK=BLOCK)
    return out


@fused_op
@torch.library.custom_op("vits_fast::hifigan_mrf_bwd", mutates_args=())
def hifigan_mrf_bwd(dout: torch.Tensor, out: torch.Tensor, mask: Optional[torch.Tensor], num_kernels: int,
                    slope: float) -> torch.Tensor:
    """Gradient of the MRF sum of a stage's last :func:`hifigan_mrf` (``slope`` given).

    dout, out: [b, c, t] (gradient and value of the output). Returns
    ``dout * mask * (out > 0 ? 1 : slope) / num_kernels`` [b, c, t] in ``out``'s dtype.
    """
    b, c, t = _check("hifigan_mrf_bwd", out, dout, mask=mask, slope=slope, num_kernels=num_kernels)
    dout, out = dout.to(out.dtype).contiguous(), out.contiguous()
    d = _common.empty((b, c, t), out.dtype, out.device)
    if d.numel():
        m, m_sb = _mask_ptr(mask, b, t, out)
        launch(_mrf_bwd_kernel, flat_grid(c * t, b, BLOCK), out, dout, out, m, d, c, t, m_sb, float(num_kernels),
               float(slope), HAS_MASK=mask is not None, ACC=acc_dtype(out, m), BLOCK=BLOCK)
    return d


# --------------------------------------------------------------------------------------------------------------
# Custom-op registration: fake tensors (shapes and dtypes for torch.compile and opcheck) and autograd
# --------------------------------------------------------------------------------------------------------------


@hifigan_act.register_fake
def _(x, bias, mask, slope):
    _check("hifigan_act", x, mask=mask, bias=bias, slope=slope)
    return x.new_empty(x.shape, dtype=_dtypes((x,) if bias is None else (x, bias), mask)[1])


@hifigan_res_act.register_fake
def _(y, x, mask, slope):
    _check("hifigan_res_act", x, y, mask=mask, slope=slope)
    dd, od = _dtypes((y, x), mask)
    return x.new_empty(x.shape, dtype=dd), x.new_empty(x.shape, dtype=od)


@hifigan_act_bwd.register_fake
def _(dxt, xt, ds, mask, slope, out_dtype):
    _check("hifigan_act_bwd", xt, dxt, ds, mask=mask, slope=slope)
    return xt.new_empty(xt.shape, dtype=out_dtype)


def _constant_mask(ctx, mask_index: int, name: str) -> None:
    if ctx.needs_input_grad[mask_index]:
        raise ValueError(f"vits_fast::{name}: the mask is a constant; it cannot require grad")


def _act_setup(ctx, inputs, output):
    x, bias, mask, slope = inputs
    ctx.slope, ctx.x_dtypes = slope, (x.dtype, promote(x.dtype, *((bias.dtype,) if bias is not None else ())))
    ctx.bias_meta = (bias.shape, bias.dtype) if bias is not None else None
    ctx.save_for_backward(output, mask)


def _act_grads(ctx, dxt):
    _constant_mask(ctx, 2, "hifigan_act")
    xt, mask = ctx.saved_tensors
    x_dt, z_dt = ctx.x_dtypes  # z = x + bias
    d = hifigan_act_bwd(dxt, xt, None, mask, ctx.slope, z_dt)
    dbias = sum_to(d, ctx.bias_meta[0]).to(ctx.bias_meta[1]) if ctx.bias_meta is not None else None
    return d.to(x_dt), dbias, None, None


hifigan_act.register_autograd(_act_grads, setup_context=_act_setup)


def _res_act_setup(ctx, inputs, output):
    y, x, mask, slope = inputs
    ctx.slope, ctx.dtypes = slope, (y.dtype, x.dtype, output[0].dtype)  # output[0]: s = y + x, promoted
    ctx.save_for_backward(output[1], mask)


def _res_act_grads(ctx, ds, dxt):
    _constant_mask(ctx, 2, "hifigan_res_act")
    xt, mask = ctx.saved_tensors
    y_dt, x_dt, s_dt = ctx.dtypes
    d = hifigan_act_bwd(dxt, xt, ds, mask, ctx.slope, s_dt)
    return d.to(y_dt), d.to(x_dt), None, None


hifigan_res_act.register_autograd(_res_act_grads, setup_context=_res_act_setup)


@hifigan_mrf.register_fake
def _(y, x, acc, mask, num_kernels, slope):
    _check("hifigan_mrf", x, y, acc, mask=mask, slope=slope, num_kernels=num_kernels)
    od = _dtypes((y, x), mask)[1]
    return x.new_empty(x.shape, dtype=promote(od, acc.dtype) if acc is not None else od)


@hifigan_mrf_bwd.register_fake
def _(dout, out, mask, num_kernels, slope):
    _check("hifigan_mrf_bwd", out, dout, mask=mask, slope=slope, num_kernels=num_kernels)
    return torch.empty_like(out, memory_format=torch.contiguous_format)


def _mrf_setup(ctx, inputs, output):
    y, x, acc, mask, num_kernels, slope = inputs
    ctx.num_kernels, ctx.slope = num_kernels, slope
    ctx.dtypes = (y.dtype, x.dtype, acc.dtype if acc is not None else None)
    ctx.save_for_backward(output if slope is not None else None, mask)


def _mrf_grads(ctx, dout):
    _constant_mask(ctx, 3, "hifigan_mrf")
    out, mask = ctx.saved_tensors
    y_dt, x_dt, acc_dt = ctx.dtypes
    # gradient of v = acc + (y + x) * mask: dacc = dv, dy = dx = dv * mask
    dv = hifigan_mrf_bwd(dout, out, mask, ctx.num_kernels, ctx.slope) if ctx.slope is not None else dout
    dyx = dv * mask if mask is not None else dv
    return dyx.to(y_dt), dyx.to(x_dt), (dv.to(acc_dt) if acc_dt is not None else None), None, None, None


hifigan_mrf.register_autograd(_mrf_grads, setup_context=_mrf_setup)


# --------------------------------------------------------------------------------------------------------------
# Module entry points
# --------------------------------------------------------------------------------------------------------------


def _float_mask(x_mask: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    # a bool mask multiplies like x's dtype in the reference
    return x_mask.to(x.dtype) if x_mask is not None and not x_mask.is_floating_point() else x_mask


def _block_end(y, x, acc, mask, num_kernels: int, slope: Optional[float]) -> torch.Tensor:
    if acc is None and mask is None and slope is None:
        return y + x  # a lone add: one aten op launches faster than a custom op
    return hifigan_mrf(y, x, acc, mask, num_kernels, slope)


def _block_body(block: torch.nn.Module, x: torch.Tensor, xt: torch.Tensor, mask: Optional[torch.Tensor],
                acc: Optional[torch.Tensor], num_kernels: int, out_slope: Optional[float]) -> torch.Tensor:
    """A ResBlock1/ResBlock2 from its first conv on, given ``xt = leaky_relu(x) * mask``; returns
    ``acc + block(x, mask)``, or with ``out_slope`` ``leaky_relu((acc + block(x, mask)) / num_kernels) * mask``."""
    slope = block.LRELU_SLOPE
    steps = list(zip(block.convs1, block.convs2)) if hasattr(block, "convs1") else [(c,) for c in block.convs]
    for i, convs in enumerate(steps):
        h = xt
        for conv in convs[:-1]:  # ResBlock1: the dilated conv, then an activation in front of the second conv
            h = hifigan_act(conv(h), None, mask, slope)
        y = convs[-1](h)
        if i == len(steps) - 1:
            return _block_end(y, x, acc, mask, num_kernels, out_slope)
        x, xt = hifigan_res_act(y, x, mask, slope)
    raise ValueError(f"{type(block).__name__} has no convolutions")


def resblock_forward(block: torch.nn.Module, x: torch.Tensor, x_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``ResBlock1.forward`` / ``ResBlock2.forward`` with the elementwise work fused.

    block: a ``vits_fast.modules.ResBlock1`` or ``ResBlock2``; x: [b, c, t]; x_mask: [b, 1, t] or None.
    Returns [b, c, t], equal to the reference (the convolutions are the block's own).
    """
    mask = _float_mask(x_mask, x)
    xt = hifigan_act(x, None, mask, block.LRELU_SLOPE)
    return _block_body(block, x, xt, mask, None, 1, None)


def generator_forward(gen: torch.nn.Module, x: torch.Tensor, g: Optional[torch.Tensor] = None,
                      x_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``Generator.forward`` with the elementwise work fused (same result and gradients as the reference).

    gen: a ``vits_fast.models.Generator``; x: [b, c, t] latent; g: [b, gin, 1] or None; x_mask: [b, 1, t] or
    None. Returns audio [b, 1, t * prod(upsample_rates)].
    """
    mask = _float_mask(x_mask, x)
    x = gen.conv_pre(x if mask is None else x * mask)
    bias = gen.cond(g) if g is not None else None
    if bias is not None and bias.shape[-1] != 1:  # conditioning with a time axis: added unfused
        x, bias = x + bias, None
    xt = hifigan_act(x, bias, mask, gen.LRELU_SLOPE)
    nk = gen.num_kernels
    for i, up in enumerate(gen.ups):
        if mask is not None:
            mask = torch.repeat_interleave(mask, up.stride[0], dim=2)
        x = up(xt)
        # every block of the stage starts with leaky_relu(x) * mask: computed once per slope
        first = {}
        out_slope = gen.LRELU_SLOPE if i < gen.num_upsamples - 1 else 0.01  # F.leaky_relu's default, as upstream
        acc = None
        for k, block in enumerate(gen.resblocks[i * nk:(i + 1) * nk]):
            if block.LRELU_SLOPE not in first:
                first[block.LRELU_SLOPE] = hifigan_act(x, None, mask, block.LRELU_SLOPE)
            acc = _block_body(block, x, first[block.LRELU_SLOPE], mask, acc, nk, out_slope if k == nk - 1 else None)
        xt = acc
    y = gen.conv_post(xt)
    return torch.tanh(y) if mask is None else torch.tanh(y) * mask
