"""Triton alignment search (``vits_fast.kernels.mas``): bit-exact with the CPU search, ties and ragged lengths
included; input untouched; every output element written; limits; custom-op registration.

Without a GPU the kernels run in the Triton interpreter (``tests/conftest.py``); the CUDA tests at the end run
when a device is present, with ``torch.cuda.set_sync_debug_mode("error")`` around the calls.
"""

from __future__ import annotations

import contextlib
import warnings
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vits_fast.backend import backend
from vits_fast.kernels import mas
from vits_fast.monotonic_align import MonotonicAlignWarning, maximum_path, maximum_path_cpu

TIE_VALUES = [-1.0, 0.0, 0.5, 2.0]
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.usefixtures("poisoned_outputs")  # NaN / bit-pattern scratch and outputs


def _cpu_reference(neg: torch.Tensor, t_xs, t_ys):
    """Path and durations from the Cython search, in neg's dtype."""
    vals = neg.detach().to("cpu", torch.float32).numpy()
    p = maximum_path_cpu(vals, np.asarray(t_ys), np.asarray(t_xs))
    return torch.from_numpy(p).to(neg.dtype), torch.from_numpy(p.sum(1)).to(neg.dtype)


def _run_triton(neg, t_xs, t_ys):
    with backend("triton"), warnings.catch_warnings():
        warnings.simplefilter("ignore", MonotonicAlignWarning)
        return maximum_path(neg, x_lengths=torch.as_tensor(t_xs, device=neg.device),
                            y_lengths=torch.as_tensor(t_ys, device=neg.device), return_durations=True)


def _assert_same(neg, t_xs, t_ys):
    keep = neg.clone()
    path, dur = _run_triton(neg, t_xs, t_ys)
    assert torch.equal(neg, keep), "neg_cent was modified"
    ref_path, ref_dur = _cpu_reference(neg, t_xs, t_ys)
    assert path.dtype == neg.dtype and dur.dtype == neg.dtype
    assert path.shape == neg.shape and dur.shape == (neg.shape[0], neg.shape[2])
    assert torch.equal(path.cpu(), ref_path), "path differs from the CPU search"
    assert torch.equal(dur.cpu(), ref_dur), "durations differ from path.sum(1)"
    return path


@st.composite
def batches(draw, max_b=3, max_tx=12, max_ty=40):
    b = draw(st.integers(1, max_b))
    t_x_max = draw(st.integers(1, max_tx))
    t_y_max = draw(st.integers(1, max_ty))
    t_xs = [draw(st.integers(1, t_x_max)) for _ in range(b)]
    t_ys = [draw(st.integers(1, t_y_max)) for _ in range(b)]  # t_x > t_y items included
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    if draw(st.booleans()):
        values = rng.choice(np.asarray(TIE_VALUES, np.float32), size=(b, t_y_max, t_x_max))
    else:
        values = rng.standard_normal((b, t_y_max, t_x_max)).astype(np.float32)
    return torch.from_numpy(values).to(DEV), t_xs, t_ys


@settings(max_examples=20)
@given(batches())
def test_bit_exact_with_cpu_search(batch):
    neg, t_xs, t_ys = batch
    _assert_same(neg, t_xs, t_ys)


def test_every_element_written_poisoned_buffers():
    rng = np.random.default_rng(11)
    neg = torch.from_numpy(rng.choice(np.asarray(TIE_VALUES, np.float32), size=(4, 37, 9))).to(DEV)
    _assert_same(neg, [9, 4, 9, 2], [37, 20, 5, 1])  # item 2: t_x > t_y, item 3: one frame


@pytest.mark.parametrize("t_y", [31, 32, 33, 64, 65])
def test_decision_word_group_boundaries(t_y):
    rng = np.random.default_rng(t_y)
    neg = torch.from_numpy(rng.choice(np.asarray(TIE_VALUES, np.float32), size=(2, t_y, 7))).to(DEV)
    path = _assert_same(neg, [7, 5], [t_y, t_y - 1])
    assert path[0, :t_y, :7].sum() == t_y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dtypes_and_ragged(dtype):
    rng = np.random.default_rng(5)
    neg = torch.from_numpy((rng.standard_normal((3, 26, 11)) * 8).astype(np.float32)).to(device=DEV, dtype=dtype)
    _assert_same(neg, [11, 6, 1], [26, 13, 9])


#: Named shapes: (batch, T_x, T_y, text lengths, frame lengths). The search is exact in every dtype (it compares
#: the input rounded to float32, as the CPU search does), so each case is checked bit for bit. Boundaries: the DP
#: row is 128 lanes up to t_x = 128 and 256 lanes above; decision bits go in 32-frame words; the path expansion
#: runs 128 text positions per program, 32 frames per step.
SHAPES = {
    "piper-utterance": (2, 40, 180, [40, 23], [180, 97]),  # ~40 phonemes, ~2 s at Piper's 86 frames/s
    "odd": (3, 7, 13, [7, 5, 1], [13, 9, 4]),
    "row-127": (1, 127, 140, [127], [140]),
    "row-128": (1, 128, 133, [128], [133]),
    "row-129-two-path-programs": (2, 129, 161, [129, 64], [161, 96]),
    "frames-31-32-33": (3, 9, 33, [9, 9, 9], [31, 32, 33]),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(SHAPES))
def test_shape_grid(name, dtype):
    b, t_x, t_y, t_xs, t_ys = SHAPES[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))  # the same values in every run
    neg = torch.from_numpy((rng.standard_normal((b, t_y, t_x)) * 4).astype(np.float32)).to(DEV, dtype)
    path = _assert_same(neg, t_xs, t_ys)
    assert [int(path[i].sum()) for i in range(b)] == t_ys  # one text position per frame of every item


def test_ties_from_float32_rounding():
    rng = np.random.default_rng(7)
    vals = rng.integers(-3, 4, size=(2, 40, 12)) * 1e7 + rng.choice([0.25, 0.5, 1.0], size=(2, 40, 12))
    _assert_same(torch.from_numpy(vals.astype(np.float32)).to(DEV), [12, 9], [40, 33])


def test_wide_rows_two_block_sizes():
    # t_x = 129 -> a 256-lane row; frames span several 32-frame decision groups
    rng = np.random.default_rng(8)
    neg = torch.from_numpy(rng.standard_normal((2, 150, 129)).astype(np.float32)).to(DEV)
    _assert_same(neg, [129, 100], [150, 140])


def test_large_block_path():
    # 300 text positions -> a 512-lane row; ragged second item
    rng = np.random.default_rng(9)
    neg = torch.from_numpy(rng.standard_normal((2, 900, 300)).astype(np.float32)).to(DEV)
    path = _assert_same(neg, [300, 211], [900, 700])
    assert path[1, 700:].sum() == 0 and path[1, :, 211:].sum() == 0


def test_noncontiguous_input_and_mask():
    rng = np.random.default_rng(10)
    base = torch.from_numpy(rng.standard_normal((2, 9, 21)).astype(np.float32)).to(DEV)
    neg = base.transpose(1, 2)  # [2, 21, 9], text axis strided
    t_xs, t_ys = [9, 4], [21, 15]
    mask = ((torch.arange(21, device=DEV)[None, :, None] < torch.tensor(t_ys, device=DEV)[:, None, None])
            & (torch.arange(9, device=DEV)[None, None, :] < torch.tensor(t_xs, device=DEV)[:, None, None])).float()
    with backend("triton"):
        by_mask = maximum_path(neg, mask)
        full = maximum_path(neg)
    with backend("reference"):
        assert torch.equal(by_mask, maximum_path(neg, mask))
        assert torch.equal(full, maximum_path(neg))
    _assert_same(neg, t_xs, t_ys)


def test_host_lengths_warn_on_triton_path():
    neg = torch.randn(3, 4, 6, device=DEV)
    with backend("triton"), pytest.warns(MonotonicAlignWarning, match=r"items \[0, 2\]"):
        path = maximum_path(neg, x_lengths=[6, 3, 5], y_lengths=[4, 4, 4])
    assert not path[0].any() and not path[2].any() and path[1].sum() == 4


def test_device_lengths_out_of_range_give_zero_items():
    # The kernel cannot raise without a sync: undefined items (zero, negative, too long, t_x > t_y) are zero.
    rng = np.random.default_rng(12)
    neg = torch.from_numpy(rng.standard_normal((6, 10, 5)).astype(np.float32)).to(DEV)
    xl = torch.tensor([5, 0, 6, 3, -2, 4], device=DEV)
    yl = torch.tensor([10, 5, 10, 11, 4, 3], device=DEV)
    path, dur = mas.maximum_path_triton(neg, xl, yl)
    ref, _ = _cpu_reference(neg, [5, 0, 6, 3, -2, 4], [10, 5, 10, 11, 4, 3])
    assert torch.equal(path.cpu(), ref)
    assert path[1:].sum() == 0 and dur[1:].sum() == 0 and path[0].sum() == 10


def test_beyond_supported_sizes_raise_before_launch():
    with backend("triton"):
        with pytest.raises(ValueError, match=f"at most {mas.MAX_TEXT} text positions"):
            maximum_path(torch.zeros(1, 4, mas.MAX_TEXT + 1, device=DEV))
        with pytest.raises(ValueError, match=f"at most {mas.MAX_FRAMES} frames"):
            maximum_path(torch.zeros(1, mas.MAX_FRAMES + 1, 1, device=DEV))
    with pytest.raises(ValueError, match="neg_cent must be 3-D"):
        mas.maximum_path_triton(torch.zeros(4, 4, device=DEV), torch.ones(4), torch.ones(4))
    with pytest.raises(TypeError, match="x_lengths must be an integer"):
        mas.maximum_path_triton(torch.zeros(1, 4, 4, device=DEV), torch.ones(1), torch.ones(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"y_lengths must have shape \[1\]"):
        mas.maximum_path_triton(torch.zeros(1, 4, 4, device=DEV), torch.ones(1, dtype=torch.long),
                                torch.ones(2, dtype=torch.long))


def test_block_size_rule_and_compile_configs_cover_launches():
    listed = {(c["fn"].__name__, c["signature"]["nc_ptr"], c["constexprs"]["BLOCK_X"], c["num_warps"])
              for c in mas.COMPILE_CONFIGS if c["fn"] is mas._mas_fwd_kernel}
    for t_x in (1, 127, 128, 129, 256, 300, 512, 513, 1000, 1024, 2048):
        block = mas.block_x_for(t_x)
        assert block >= t_x and block >= 128 and block & (block - 1) == 0
        for ty in ("*fp32", "*bf16", "*fp16"):
            assert ("_mas_fwd_kernel", ty, block, mas.fwd_warps(block)) in listed
    paths = {c["signature"]["path_ptr"] for c in mas.COMPILE_CONFIGS if c["fn"] is mas._mas_path_kernel}
    assert paths == {"*fp32", "*bf16", "*fp16"}


def test_opcheck():
    neg = torch.randn(2, 9, 5, device=DEV, requires_grad=True)
    xl = torch.tensor([5, 3], device=DEV)
    yl = torch.tensor([9, 4], device=DEV)
    torch.library.opcheck(torch.ops.vits_fast.maximum_path.default, (neg, xl, yl))


def test_outputs_are_not_differentiable():
    neg = torch.randn(1, 6, 3, device=DEV, requires_grad=True)
    path, dur = mas.maximum_path_triton(neg, torch.tensor([3], device=DEV), torch.tensor([6], device=DEV))
    assert not path.requires_grad and not dur.requires_grad


# ---------------------------------------------------------------------------------------------------------------
# CUDA only
# ---------------------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@contextlib.contextmanager
def no_host_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("how", ["mask", "lengths", "none"])
def test_cuda_front_door_never_syncs(how):
    rng = np.random.default_rng(13)
    neg = torch.from_numpy(rng.standard_normal((4, 120, 40)).astype(np.float32)).cuda()
    t_xs, t_ys = [40, 17, 33, 1], [120, 60, 33, 7]
    xl, yl = torch.tensor(t_xs, device="cuda"), torch.tensor(t_ys, device="cuda")
    mask = ((torch.arange(120, device="cuda")[None, :, None] < yl[:, None, None])
            & (torch.arange(40, device="cuda")[None, None, :] < xl[:, None, None])).float()
    with no_host_sync(), backend("auto"):
        if how == "mask":
            path, dur = maximum_path(neg, mask, return_durations=True)
        elif how == "lengths":
            path, dur = maximum_path(neg, x_lengths=xl, y_lengths=yl, return_durations=True)
        else:
            path, dur = maximum_path(neg, return_durations=True)
            t_xs, t_ys = [40] * 4, [120] * 4
    ref_path, ref_dur = _cpu_reference(neg, t_xs, t_ys)
    assert path.is_cuda and torch.equal(path.cpu(), ref_path) and torch.equal(dur.cpu(), ref_dur)


@needs_cuda
@pytest.mark.parametrize("b, t_x, t_y", [(16, 128, 512), (4, 512, 4096), (2, 1024, 4096), (2, 2048, 2600)])
def test_cuda_large_bit_exact(b, t_x, t_y):
    g = torch.Generator(device="cuda").manual_seed(t_x)
    neg = torch.randn(b, t_y, t_x, device="cuda", generator=g) * 3
    t_xs = [t_x] + [max(1, t_x - 37 * i) for i in range(1, b)]
    t_ys = [t_y] + [max(t_xs[i], t_y - 101 * i) for i in range(1, b)]
    _assert_same(neg, t_xs, t_ys)
    _assert_same(neg.bfloat16(), t_xs, t_ys)


@needs_cuda
def test_cuda_ties_and_poison():
    rng = np.random.default_rng(14)
    neg = torch.from_numpy(rng.choice(np.asarray(TIE_VALUES, np.float32), size=(8, 333, 77))).cuda()
    _assert_same(neg, [77, 50, 77, 3, 76, 12, 77, 1], [333, 200, 77, 3, 100, 300, 90, 1])


@needs_cuda
def test_cuda_auto_falls_back_beyond_limits():
    neg = torch.randn(1, 2100, mas.MAX_TEXT + 1, device="cuda")
    with backend("auto"):
        path = maximum_path(neg)
    ref, _ = _cpu_reference(neg, [mas.MAX_TEXT + 1], [2100])
    assert torch.equal(path.cpu(), ref)
