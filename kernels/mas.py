"""Monotonic alignment search (VITS ``maximum_path``) on the GPU, without host synchronisation.

What is fused and why
---------------------
Upstream copies ``neg_cent`` to the host every training step (a device sync), runs Cython there, and copies an
int32 path back and casts it. The published GPU version (super-monotonic-align) runs one program per item but
re-reads the previous DP column from global memory with strided loads at every frame, overwrites its input and
only takes the Glow-TTS layout. Here, in VITS layout ``[b, t_y (frames), t_x (text)]``:

* ``_mas_fwd_kernel``, one program per batch item (the DP is serial over frames):
  - forward: the DP row over text positions is one register vector of ``BLOCK_X`` lanes; ``v[y-1, x-1]`` is a
    lane shift (``tl.gather``), never a memory round trip. Each frame's scores are one coalesced row read,
    prefetched two frames ahead. The decision of every cell ("the backtrack steps to ``x-1`` before frame
    ``y``") is one bit: each lane ORs its bit into a per-lane int32 accumulator, flushed every 32 frames as
    one coalesced row of words (scratch ``[b, ceil(T_y/32), BLOCK_X]``, bit ``y % 32`` of word
    ``[y // 32, x]``) - no cross-lane packing work per frame.
  - backtrack (after a block barrier): a scalar walk from ``(t_y-1, t_x-1)``, one word load per frame (the
    index moves by at most one per frame, so the 32 frames of a group mostly read the same 128-byte line of
    words, just written by this SM), writing the text index of each frame (``[b, T_y]`` int32).
* ``_mas_path_kernel``, grid ``(item, block of text positions)``: expands the indices into the dense 0/1 path
  in the requested dtype and counts the durations ``w[x]`` of its columns. It writes every element of both
  outputs (zeros outside the lengths) and runs on the whole GPU instead of one SM per item.

The fusion boundary is the serial DP + backtrack (one program per item) versus the parallel dense expansion.

Bytes moved per cell (``s`` = element size of ``neg_cent``): fused: read ``s`` once + write ``s`` (path) +
1/8 (decision bits written once) + the backtrack's one word per frame and index traffic (``~12/T_x``).
Not timed: this task had no GPU (the performance targets of issue 5 are unmeasured). Upstream: device-to-host
``s``, float32 copy and the DP table updated in place on the host, int32 path host-to-device 4 + cast
``4 + s``, and a host sync per step.

Semantics are bit-identical to the CPU path (``vits_fast/monotonic_align``): float32 accumulation, the same
``-1e9`` sentinel, ``max(left, up) = up if up > left else left``, a step when ``up < left`` (ties stay). An
item whose lengths are not ``1 <= t_x <= t_y``, ``t_x <= T_x``, ``t_y <= T_y`` gets an all-zero path and zero
durations (the kernel cannot raise without a sync). Supported sizes: ``T_x <= MAX_TEXT`` (2048) text positions
and ``T_y <= MAX_FRAMES`` (65536) frames; larger tensors raise ``ValueError`` before any launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import cast_for, fused_op, launch

MAX_TEXT = 2048
MAX_FRAMES = 65536
MIN_BLOCK_X = 128  # narrowest DP row: one warp, 4 lanes per thread
PATH_BLOCK_Y = 32  # frames per step of the expansion kernel
PATH_BLOCK_X = 128  # text positions per program of the expansion kernel
PATH_WARPS = 4
NEG = tl.constexpr(-1e9)  # upstream's max_neg_val, exact in float32

# --------------------------------------------------------------------------------------------------------------
# Triton kernels (pointer comments give shapes)
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _mas_fwd_kernel(
    nc_ptr,  # *fp32|bf16|fp16 [b, T_y, T_x] scores, text axis contiguous (strides stride_nc_batch, stride_nc_frame, 1)
    xlen_ptr,  # *i32 [b] text lengths
    ylen_ptr,  # *i32 [b] frame counts
    bits_ptr,  # *i32 [b, cdiv(T_y, 32), BLOCK_X] scratch: decision bits, groups < cdiv(t_y, 32) written
    idx_ptr,  # *i32 [b, T_y] out: text index of each frame (rows < t_y of valid items only)
    T_y,
    T_x,
    stride_nc_batch,
    stride_nc_frame,
    BLOCK_X: tl.constexpr,
):
    pid = tl.program_id(0)
    pid64 = pid.to(tl.int64)
    tx = tl.load(xlen_ptr + pid)
    ty = tl.load(ylen_ptr + pid)
    ok = (tx >= 1) & (tx <= ty) & (tx <= T_x) & (ty <= T_y)
    n_rows = tl.where(ok, ty, 0)  # frames to process; 0 leaves an undefined item all zero
    tx = tl.where(ok, tx, 0)  # 0: no lane loads anything

    offs = tl.arange(0, BLOCK_X)
    in_tx = offs < tx
    is_first = offs == 0
    not_first = offs > 0
    shift_src = tl.maximum(offs - 1, 0)
    nc_lanes = nc_ptr + pid64 * stride_nc_batch + offs  # row 0 of this item
    bits_item = bits_ptr + pid64 * tl.cdiv(T_y, 32) * BLOCK_X
    last_off = tl.maximum(n_rows - 1, 0).to(tl.int64) * stride_nc_frame  # prefetches past the end re-read this row

    # Lanes outside the band [max(0, tx + y - ty), min(tx, y + 1)) hold values that no in-band cell ever reads
    # (an in-band cell's predecessors lie in the previous row's band), so they are left unmasked.
    # Row 0: v[0, 0] = value[0, 0] + max(0, -1e9); it has no decisions (acc starts at 0).
    v = tl.load(nc_lanes, mask=in_tx, other=0.0).to(tl.float32) + 0.0
    ahead_off = tl.minimum(last_off, stride_nc_frame)
    val_a = tl.load(nc_lanes + ahead_off, mask=in_tx, other=0.0)  # row 1, kept in the input dtype
    ahead_off = tl.minimum(ahead_off + stride_nc_frame, last_off)
    val_b = tl.load(nc_lanes + ahead_off, mask=in_tx, other=0.0)  # row 2
    acc = tl.zeros([BLOCK_X], tl.int32)  # decision bits of the current group of 32 frames
    for y in range(1, n_rows):
        val = val_a.to(tl.float32)  # row y; rows y + 1 and y + 2 are in flight
        val_a = val_b
        ahead_off = tl.minimum(ahead_off + stride_nc_frame, last_off)
        val_b = tl.load(nc_lanes + ahead_off, mask=in_tx, other=0.0)
        left = tl.where(is_first, NEG, tl.gather(v, shift_src, 0))  # v[y-1, x-1]
        diag = offs == y
        up = tl.where(diag, NEG, v)  # v[y-1, x]
        v = val + tl.where(up > left, up, left)
        step = not_first & (diag | (up < left))  # the backtrack moves to x - 1 before frame y
        slot = y & 31
        acc = acc | tl.where(step, 1 << slot, 0)
        if slot == 31:
            tl.store(bits_item + (y >> 5) * BLOCK_X + offs, acc)
            acc = tl.zeros([BLOCK_X], tl.int32)
    if (n_rows & 31) != 0:  # last, partial group (also the lone group of a one-frame item)
        tl.store(bits_item + ((n_rows - 1) >> 5) * BLOCK_X + offs, acc)

    # Make every thread's decision words visible to the whole program before the backtrack reads them.
    tl.debug_barrier()

    # Backtrack from (t_y - 1, t_x - 1): one word per frame, bit y % 32 of word [y // 32, index].
    index = tx - 1
    y = n_rows - 1
    idx_item = idx_ptr + pid64 * T_y
    for _ in range(0, n_rows):
        word = tl.load(bits_item + (y >> 5) * BLOCK_X + index)
        tl.store(idx_item + y, index)
        index -= (word >> (y & 31)) & 1
        y -= 1


@triton.jit
def _mas_path_kernel(
    idx_ptr,  # *i32 [b, T_y] text index per frame (read for rows < t_y of valid items)
    xlen_ptr,  # *i32 [b] text lengths
    ylen_ptr,  # *i32 [b] frame counts
    path_ptr,  # *fp32|bf16|fp16 [b, T_y, T_x] out: 0/1 path, contiguous, every element written
    dur_ptr,  # *fp32|bf16|fp16 [b, T_x] out: frames per text position, every element written
    T_y,
    T_x,
    BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_x = tl.program_id(1)
    tx = tl.load(xlen_ptr + pid_b)
    ty = tl.load(ylen_ptr + pid_b)
    ok = (tx >= 1) & (tx <= ty) & (tx <= T_x) & (ty <= T_y)
    n_rows = tl.where(ok, ty, 0)
    xs = pid_x * BLOCK_X + tl.arange(0, BLOCK_X)
    x_ok = xs[None, :] < T_x
    rows = tl.arange(0, BLOCK_Y)
    idx_item = idx_ptr + pid_b * T_y
    out_item = path_ptr + pid_b * T_y * T_x  # offsets inside one item fit in int32 (T_y * T_x < 2**28)
    count = tl.zeros([BLOCK_Y, BLOCK_X], tl.int32)
    for y0 in range(0, T_y, BLOCK_Y):
        ys = y0 + rows
        idx = tl.load(idx_item + ys, mask=ys < n_rows, other=-1)
        hit = xs[None, :] == idx[:, None]
        # via float32: the interpreter mis-converts integers straight to bf16
        tl.store(out_item + (ys[:, None] * T_x + xs[None, :]), cast_for(hit.to(tl.float32), path_ptr),
                 mask=(ys[:, None] < T_y) & x_ok)
        count += hit.to(tl.int32)
    dur = tl.sum(count, axis=0)
    tl.store(dur_ptr + pid_b * T_x + xs, cast_for(dur.to(tl.float32), dur_ptr), mask=xs < T_x)


def block_x_for(t_x: int) -> int:
    """DP row width (lanes) used for ``t_x`` text positions."""
    return max(MIN_BLOCK_X, triton.next_power_of_2(max(int(t_x), 1)))


# Warps of the forward kernel per row width: 2-4 lanes per thread. Picked with the compile check on triton 3.6
# and 3.9 for sm_80/sm_90: ptxas spills a few bytes with other counts (e.g. 1024 lanes x 4 warps bf16 on sm_80,
# 256 lanes x 2 warps and 512 x 4 fp32 on sm_90 with triton 3.6).
_FWD_WARPS = {128: 1, 256: 4, 512: 8, 1024: 8, 2048: 16}


def fwd_warps(block_x: int) -> int:
    """Warps of the forward kernel for a ``block_x``-lane DP row."""
    return _FWD_WARPS[block_x]


def _compile_configs():
    fwd_sig = {"nc_ptr": None, "xlen_ptr": "*i32", "ylen_ptr": "*i32", "bits_ptr": "*i32", "idx_ptr": "*i32",
               "T_y": "i32", "T_x": "i32", "stride_nc_batch": "i32", "stride_nc_frame": "i32",
               "BLOCK_X": "constexpr"}
    path_sig = {"idx_ptr": "*i32", "xlen_ptr": "*i32", "ylen_ptr": "*i32", "path_ptr": None, "dur_ptr": None,
                "T_y": "i32", "T_x": "i32", "BLOCK_Y": "constexpr", "BLOCK_X": "constexpr"}
    configs = []
    for ty in ("fp32", "bf16", "fp16"):
        block = MIN_BLOCK_X
        while block <= MAX_TEXT:
            configs.append(dict(fn=_mas_fwd_kernel, signature={**fwd_sig, "nc_ptr": f"*{ty}"},
                                constexprs={"BLOCK_X": block}, num_warps=fwd_warps(block),
                                name=f"mas fwd {ty} BLOCK_X={block}"))
            block *= 2
        configs.append(dict(fn=_mas_path_kernel,
                            signature={**path_sig, "path_ptr": f"*{ty}", "dur_ptr": f"*{ty}"},
                            constexprs={"BLOCK_Y": PATH_BLOCK_Y, "BLOCK_X": PATH_BLOCK_X},
                            num_warps=PATH_WARPS, name=f"mas path {ty}"))
    return configs


# Every launch configuration the launcher uses (see tests/test_kernel_compile.py).
COMPILE_CONFIGS = _compile_configs()


# --------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_sizes(neg_cent: torch.Tensor) -> None:
    """Raise ``ValueError`` when ``neg_cent`` ``[b, T_y, T_x]`` is beyond what the kernel supports."""
    if neg_cent.dim() != 3:
        raise ValueError(f"neg_cent must be 3-D [b, t_y, t_x], got shape {tuple(neg_cent.shape)}")
    _, t_y, t_x = neg_cent.shape
    if t_x > MAX_TEXT:
        raise ValueError(f"neg_cent: the Triton alignment search supports at most {MAX_TEXT} text positions "
                         f"(last dim), got {t_x}; use the CPU path (backend 'reference')")
    if t_y > MAX_FRAMES:
        raise ValueError(f"neg_cent: the Triton alignment search supports at most {MAX_FRAMES} frames "
                         f"(dim 1), got {t_y}; use the CPU path (backend 'reference')")


@fused_op
@torch.library.custom_op("vits_fast::maximum_path", mutates_args=())
def _maximum_path_op(neg_cent: torch.Tensor, x_lengths: torch.Tensor,
                     y_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The search and the dense expansion (arguments checked by :func:`maximum_path_triton`)."""
    b, t_y, t_x = neg_cent.shape
    dtype = neg_cent.dtype
    if dtype not in _KERNEL_DTYPES:  # float64: searched on float32 scores, as the CPU path does
        neg_cent = neg_cent.to(torch.float32)
    if neg_cent.stride(2) != 1:
        neg_cent = neg_cent.contiguous()
    dev = neg_cent.device
    path = _common.empty((b, t_y, t_x), neg_cent.dtype, dev)
    dur = _common.empty((b, t_x), neg_cent.dtype, dev)
    if b == 0 or t_y == 0 or t_x == 0:
        return path.zero_().to(dtype), dur.zero_().to(dtype)
    xl = x_lengths.to(device=dev, dtype=torch.int32)
    yl = y_lengths.to(device=dev, dtype=torch.int32)
    block_x = block_x_for(t_x)
    bits = _common.empty((b, _common.cdiv(t_y, 32), block_x), torch.int32, dev)
    idx = _common.empty((b, t_y), torch.int32, dev)
    launch(_mas_fwd_kernel, (b,), neg_cent, neg_cent, xl, yl, bits, idx, t_y, t_x, neg_cent.stride(0),
           neg_cent.stride(1), BLOCK_X=block_x, num_warps=fwd_warps(block_x), num_stages=1)
    launch(_mas_path_kernel, (b, _common.cdiv(t_x, PATH_BLOCK_X)), neg_cent, idx, xl, yl, path, dur, t_y, t_x,
           BLOCK_Y=PATH_BLOCK_Y, BLOCK_X=PATH_BLOCK_X, num_warps=PATH_WARPS)
    return path.to(dtype), dur.to(dtype)


# --------------------------------------------------------------------------------------------------------------
# Custom-op registration: fake tensors (shapes and dtypes for torch.compile and opcheck) and autograd
# --------------------------------------------------------------------------------------------------------------


@_maximum_path_op.register_fake
def _(neg_cent, x_lengths, y_lengths):
    b, t_y, t_x = neg_cent.shape
    return neg_cent.new_empty((b, t_y, t_x)), neg_cent.new_empty((b, t_x))


def _maximum_path_setup(ctx, inputs, output):
    # The path is piecewise constant in the scores (zero derivative wherever one exists): like upstream's
    # detached path, the outputs do not require grad.
    ctx.mark_non_differentiable(*output)


def _maximum_path_grads(ctx, grad_path, grad_dur):
    return None, None, None


_maximum_path_op.register_autograd(_maximum_path_grads, setup_context=_maximum_path_setup)


# --------------------------------------------------------------------------------------------------------------
# Module entry points
# --------------------------------------------------------------------------------------------------------------


def maximum_path_triton(neg_cent: torch.Tensor, x_lengths: torch.Tensor,
                        y_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best monotonic alignment of each item, on the device of ``neg_cent``, with no host synchronisation.

    Args:
        neg_cent: ``[b, T_y, T_x]`` floating scores (fp32/bf16/fp16; fp64 is searched in float32), read only.
        x_lengths: integer ``[b]`` text lengths on ``neg_cent``'s device.
        y_lengths: integer ``[b]`` frame counts on ``neg_cent``'s device.

    Returns:
        ``(path, durations)``: ``path`` ``[b, T_y, T_x]`` 0/1 in ``neg_cent.dtype`` and ``durations``
        ``[b, T_x]`` (frames per text position, same dtype). Items with lengths outside
        ``1 <= t_x <= t_y``, ``t_x <= T_x``, ``t_y <= T_y`` get zeros (lengths on the device are not checked).

    Raises:
        ValueError: ``neg_cent`` is not 3-D, or has more than ``MAX_TEXT`` text positions or ``MAX_FRAMES``
        frames; lengths not of shape ``[b]``.
        TypeError: non-floating ``neg_cent`` or non-integer lengths.
    """
    check_sizes(neg_cent)
    if not neg_cent.is_floating_point():
        raise TypeError(f"neg_cent must be a floating tensor, got {neg_cent.dtype}")
    b = neg_cent.shape[0]
    for name, t in (("x_lengths", x_lengths), ("y_lengths", y_lengths)):
        if t.shape != (b,):
            raise ValueError(f"{name} must have shape [{b}] (one length per item), got {tuple(t.shape)}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    return _maximum_path_op(neg_cent, x_lengths, y_lengths)
