"""CPU monotonic alignment search: optimality, path invariants, upstream tie-breaking, Cython == NumPy.

``_oracle`` below restates upstream Piper/VITS ``maximum_path_c`` semantics as plain Python over a full float32
DP table (band limits, ``-1e9``, ``max(left, up)`` and the strict ``<`` of the backtrack). The implementations
keep one DP row and decision bits instead, so agreeing with it bit for bit, ties included, checks that
rewrite. Brute force over every monotonic path checks optimality independently of both.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vits_fast.monotonic_align as ma
from vits_fast.backend import backend
from vits_fast.monotonic_align import MonotonicAlignWarning, maximum_path, maximum_path_cpu, maximum_path_lengths

F32 = np.float32
TIE_VALUES = [-1.0, 0.0, 0.5, 2.0]


# ---------------------------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------------------------


def _oracle_item(value: np.ndarray, t_y: int, t_x: int) -> np.ndarray:
    """Upstream semantics for one valid item (1 <= t_x <= t_y), full float32 table, scalar loops."""
    v = value[:t_y, :t_x].astype(F32).copy()
    neg = F32(-1e9)
    for y in range(t_y):
        for x in range(max(0, t_x + y - t_y), min(t_x, y + 1)):
            up = neg if x == y else v[y - 1, x]
            if x == 0:
                left = F32(0.0) if y == 0 else neg
            else:
                left = v[y - 1, x - 1]
            v[y, x] = F32(v[y, x] + (up if up > left else left))
    path = np.zeros(value.shape, dtype=np.int32)
    index = t_x - 1
    for y in range(t_y - 1, -1, -1):
        path[y, index] = 1
        if index != 0 and (index == y or v[y - 1, index] < v[y - 1, index - 1]):
            index -= 1
    return path


def _oracle(values: np.ndarray, t_ys, t_xs) -> np.ndarray:
    out = np.zeros(values.shape, dtype=np.int32)
    for i, (ty, tx) in enumerate(zip(t_ys, t_xs)):
        if 1 <= tx <= ty:
            out[i] = _oracle_item(values[i], int(ty), int(tx))
    return out


def _all_paths(t_y: int, t_x: int):
    """Every monotonic text index sequence from (0, 0) to (t_y - 1, t_x - 1) with steps 0 or 1."""
    for moves in itertools.combinations(range(1, t_y), t_x - 1):  # frames at which the index steps up
        idx, cur, moves = [], 0, set(moves)
        for y in range(t_y):
            cur += y in moves
            idx.append(cur)
        yield idx


def _path_index(path: np.ndarray, t_y: int, t_x: int) -> np.ndarray:
    """Check the path invariants of one item and return its text index per frame."""
    assert set(np.unique(path)) <= {0, 1}
    assert not path[t_y:].any() and not path[:, t_x:].any(), "ones outside the lengths"
    inside = path[:t_y, :t_x]
    assert (inside.sum(1) == 1).all(), "every frame must sit on exactly one text position"
    idx = inside.argmax(1)
    assert idx[0] == 0 and idx[-1] == t_x - 1, f"path must run from (0, 0) to ({t_y - 1}, {t_x - 1})"
    assert set(np.diff(idx).tolist()) <= {0, 1}, "the text index must advance by 0 or 1 per frame"
    return idx


@st.composite
def batches(draw, max_b=4, max_tx=12, max_ty=24, ties=None, allow_long_text=False):
    """(values [b, T_y, T_x] float32, t_ys [b], t_xs [b]) with ragged lengths; ties from a few repeated values."""
    b = draw(st.integers(1, max_b))
    t_x_max = draw(st.integers(1, max_tx))
    t_y_max = draw(st.integers(t_x_max if not allow_long_text else 1, max_ty))
    t_xs, t_ys = [], []
    for _ in range(b):
        tx = draw(st.integers(1, t_x_max))
        lo = 1 if allow_long_text else tx
        t_ys.append(draw(st.integers(min(lo, t_y_max), t_y_max)))
        t_xs.append(tx)
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    tie = draw(st.booleans()) if ties is None else ties
    if tie:
        values = rng.choice(np.asarray(TIE_VALUES, F32), size=(b, t_y_max, t_x_max))
    else:
        values = rng.standard_normal((b, t_y_max, t_x_max)).astype(F32)
    return values, np.asarray(t_ys), np.asarray(t_xs)


# ---------------------------------------------------------------------------------------------------------------
# Optimality and invariants
# ---------------------------------------------------------------------------------------------------------------


@settings(max_examples=60)
@given(t_x=st.integers(1, 5), extra=st.integers(0, 4), seed=st.integers(0, 10_000), integer=st.booleans())
def test_score_equals_brute_force_best(t_x, extra, seed, integer):
    t_y = t_x + extra
    rng = np.random.default_rng(seed)
    if integer:  # exact in float32: the scores must match exactly
        values = rng.integers(-5, 6, size=(1, t_y + 1, t_x + 2)).astype(F32)
    else:
        values = rng.standard_normal((1, t_y + 1, t_x + 2)).astype(F32)  # padding beyond the lengths
    path = maximum_path_cpu(values, [t_y], [t_x])[0]
    idx = _path_index(path, t_y, t_x)
    score = sum(float(values[0, y, x]) for y, x in enumerate(idx))
    best = max(sum(float(values[0, y, x]) for y, x in enumerate(p)) for p in _all_paths(t_y, t_x))
    if integer:
        assert score == best
    else:
        assert score == pytest.approx(best, abs=1e-4)


@settings(max_examples=40)
@given(batches())
def test_path_invariants_and_oracle_ragged(batch):
    values, t_ys, t_xs = batch
    path = maximum_path_cpu(values, t_ys, t_xs)
    for i, (ty, tx) in enumerate(zip(t_ys, t_xs)):
        _path_index(path[i], int(ty), int(tx))
    np.testing.assert_array_equal(path, _oracle(values, t_ys, t_xs))


@settings(max_examples=40)
@given(batches(ties=True, max_tx=8, max_ty=16))
def test_ties_follow_upstream(batch):
    values, t_ys, t_xs = batch
    for impl in ("cython", "numpy"):
        np.testing.assert_array_equal(maximum_path_cpu(values, t_ys, t_xs, impl), _oracle(values, t_ys, t_xs),
                                      err_msg=impl)


def test_float32_rounding_decides_ties():
    # Large scores whose float32 sums round to equal values: the search must compare float32 sums, as upstream.
    rng = np.random.default_rng(7)
    values = (rng.integers(-3, 4, size=(6, 40, 12)) * 1e7 + rng.choice([0.25, 0.5, 1.0], size=(6, 40, 12)))
    values = values.astype(F32)
    t_ys, t_xs = np.array([40, 33, 12, 25, 40, 18]), np.array([12, 9, 12, 1, 7, 11])
    expected = _oracle(values, t_ys, t_xs)
    for impl in ("cython", "numpy"):
        np.testing.assert_array_equal(maximum_path_cpu(values, t_ys, t_xs, impl), expected, err_msg=impl)
    # float64 search would decide differently somewhere here, otherwise this test checks nothing new
    assert not np.array_equal(expected, _oracle64(values, t_ys, t_xs))


def _oracle64(values, t_ys, t_xs):
    """The same search in float64 (not upstream's semantics; used to show that float32 rounding matters)."""
    out = np.zeros(values.shape, dtype=np.int32)
    for i, (ty, tx) in enumerate(zip(t_ys, t_xs)):
        v = values[i, :ty, :tx].astype(np.float64)
        for y in range(ty):
            for x in range(max(0, tx + y - ty), min(tx, y + 1)):
                up = -1e9 if x == y else v[y - 1, x]
                left = (0.0 if y == 0 else -1e9) if x == 0 else v[y - 1, x - 1]
                v[y, x] += up if up > left else left
        index = tx - 1
        for y in range(ty - 1, -1, -1):
            out[i, y, index] = 1
            if index != 0 and (index == y or v[y - 1, index] < v[y - 1, index - 1]):
                index -= 1
    return out


# ---------------------------------------------------------------------------------------------------------------
# Cython == NumPy, fallback
# ---------------------------------------------------------------------------------------------------------------


def test_cython_extension_is_built():
    assert ma.has_cython(), ("the Cython extension vits_fast.monotonic_align.core is not built "
                             "(pip install -e . --no-build-isolation, or python setup.py build_ext --inplace)")


@settings(max_examples=60)
@given(batches(max_b=6, max_tx=20, max_ty=40, allow_long_text=True))
def test_cython_and_numpy_bit_identical(batch):
    values, t_ys, t_xs = batch
    c = maximum_path_cpu(values, t_ys, t_xs, "cython")
    n = maximum_path_cpu(values, t_ys, t_xs, "numpy")
    np.testing.assert_array_equal(c, n)


def test_cython_and_numpy_bit_identical_large_ragged():
    rng = np.random.default_rng(3)
    values = (rng.standard_normal((5, 300, 90)) * 30).astype(F32)
    t_xs = np.array([90, 1, 45, 77, 90])
    t_ys = np.array([300, 250, 45, 123, 290])
    c = maximum_path_cpu(values, t_ys, t_xs, "cython")
    np.testing.assert_array_equal(c, maximum_path_cpu(values, t_ys, t_xs, "numpy"))
    for i in range(5):
        _path_index(c[i], t_ys[i], t_xs[i])


def test_low_level_writes_every_element_and_keeps_input():
    rng = np.random.default_rng(4)
    values = rng.standard_normal((3, 9, 5)).astype(F32)
    before = values.copy()
    t_ys, t_xs = np.array([9, 4, 3], np.int32), np.array([5, 4, 5], np.int32)  # item 2: t_x > t_y
    for fn in (ma.maximum_path_c, ma.maximum_path_numpy):
        paths = np.full(values.shape, 7, np.int32)
        fn(paths, values, t_ys, t_xs)
        np.testing.assert_array_equal(values, before)
        np.testing.assert_array_equal(paths, _oracle(values, t_ys, t_xs))
        assert not paths[2].any()


def test_fallback_used_with_one_warning(monkeypatch):
    neg = torch.randn(3, 11, 6)
    expected = maximum_path(neg, x_lengths=[6, 3, 5], y_lengths=[11, 7, 5])
    monkeypatch.setattr(ma, "maximum_path_c", None)
    monkeypatch.setattr(ma, "_fallback_warned", False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        first = maximum_path(neg, x_lengths=[6, 3, 5], y_lengths=[11, 7, 5])
        second = maximum_path(neg, x_lengths=[6, 3, 5], y_lengths=[11, 7, 5])
    fallback = [w for w in rec if issubclass(w.category, MonotonicAlignWarning) and "NumPy fallback" in str(w.message)]
    assert len(fallback) == 1, [str(w.message) for w in rec]
    assert torch.equal(first, expected) and torch.equal(second, expected)


_HIDDEN_EXTENSION_SCRIPT = r"""
import json, sys, warnings
sys.modules["vits_fast.monotonic_align.core"] = None  # the extension is not importable
warnings.simplefilter("always")
import torch
with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    from vits_fast.monotonic_align import has_cython, maximum_path
    neg = torch.tensor(json.loads(sys.argv[1]))
    paths = [maximum_path(neg, x_lengths=[4, 2], y_lengths=[7, 5]) for _ in range(3)]
msgs = [str(w.message) for w in rec if "fallback" in str(w.message)]
print(json.dumps({"has_cython": has_cython(), "warnings": msgs, "path": paths[0].tolist(),
                  "same": all(torch.equal(p, paths[0]) for p in paths)}))
"""


def test_hidden_extension_falls_back_with_exactly_one_warning():
    neg = torch.randn(2, 7, 4)
    env = dict(os.environ, PYTHONWARNINGS="always")
    out = subprocess.run([sys.executable, "-c", _HIDDEN_EXTENSION_SCRIPT, json.dumps(neg.tolist())],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["has_cython"] is False
    assert len(res["warnings"]) == 1, res["warnings"]
    assert "Cython extension is not built" in res["warnings"][0]
    assert res["same"]
    expected = maximum_path(neg, x_lengths=[4, 2], y_lengths=[7, 5])
    assert torch.equal(torch.tensor(res["path"]), expected)


# ---------------------------------------------------------------------------------------------------------------
# Front door
# ---------------------------------------------------------------------------------------------------------------


def _mask(t_xs, t_ys, t_x_max, t_y_max, dtype=torch.float32):
    x_mask = (torch.arange(t_x_max)[None, :] < torch.as_tensor(t_xs)[:, None]).to(dtype)
    y_mask = (torch.arange(t_y_max)[None, :] < torch.as_tensor(t_ys)[:, None]).to(dtype)
    return y_mask[:, :, None] * x_mask[:, None, :]  # [b, t_y, t_x], as VITS builds attn_mask


@settings(max_examples=30)
@given(batches(max_b=5, max_tx=10, max_ty=20))
def test_front_door_mask_lengths_and_items_alone_agree(batch):
    values, t_ys, t_xs = batch
    neg = torch.from_numpy(values.copy())
    with backend("reference"):
        by_mask = maximum_path(neg, _mask(t_xs, t_ys, *values.shape[2:0:-1]))
        by_len = maximum_path_lengths(neg, torch.as_tensor(t_xs), torch.as_tensor(t_ys))
        by_kw, dur = maximum_path(neg, x_lengths=t_xs.tolist(), y_lengths=torch.as_tensor(t_ys, dtype=torch.int32),
                                  return_durations=True)
        for i in range(len(t_xs)):  # each item alone, trimmed to its lengths
            alone = maximum_path(neg[i:i + 1, :t_ys[i], :t_xs[i]].contiguous())
            assert torch.equal(alone[0], by_len[i, :t_ys[i], :t_xs[i]])
    np.testing.assert_array_equal(by_len.numpy(), _oracle(values, t_ys, t_xs))
    assert torch.equal(by_mask, by_len) and torch.equal(by_kw, by_len)
    assert torch.equal(dur, by_len.sum(1))
    assert torch.equal(torch.from_numpy(values), neg), "neg_cent was modified"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_front_door_dtype_and_input_unchanged(dtype):
    neg = (torch.randn(3, 17, 8) * 4).to(dtype)
    keep = neg.clone()
    path, dur = maximum_path(neg, x_lengths=[8, 5, 2], y_lengths=[17, 9, 2], return_durations=True)
    assert path.dtype == dtype and dur.dtype == dtype and path.device == neg.device
    assert dur.shape == (3, 8)
    assert torch.equal(neg, keep), "neg_cent was modified"
    expected = _oracle(neg.to(torch.float32).numpy(), [17, 9, 2], [8, 5, 2])
    np.testing.assert_array_equal(path.to(torch.int32).numpy(), expected)
    assert torch.equal(dur, path.sum(1))


def test_float32_cpu_tensor_is_not_mutated():
    # upstream mutates the caller's tensor when it is a contiguous float32 CPU tensor (numpy shares memory)
    neg = torch.randn(2, 30, 10)
    keep = neg.clone()
    maximum_path(neg, torch.ones(2, 30, 10))
    maximum_path(neg)
    assert torch.equal(neg, keep)


def test_no_lengths_means_full_and_noncontiguous_input():
    neg = torch.randn(2, 12, 20).transpose(1, 2)  # [2, 20, 12], text axis not contiguous
    full = maximum_path(neg)
    np.testing.assert_array_equal(full.numpy(), _oracle(neg.contiguous().numpy(), [20, 20], [12, 12]))
    assert torch.equal(maximum_path(neg, torch.ones(2, 20, 12)), full)


def test_more_text_than_frames_gives_zero_path_and_one_warning():
    rng = np.random.default_rng(5)
    values = rng.standard_normal((4, 10, 8)).astype(F32)
    t_xs, t_ys = [8, 6, 3, 5], [10, 4, 3, 2]  # items 1 and 3 have more text than frames
    with pytest.warns(MonotonicAlignWarning, match=r"items \[1, 3\]") as rec:
        path = maximum_path(torch.from_numpy(values), x_lengths=t_xs, y_lengths=t_ys)
    assert len([w for w in rec if "more text positions than frames" in str(w.message)]) == 1
    assert not path[1].any() and not path[3].any()
    np.testing.assert_array_equal(path.numpy(), _oracle(values, t_ys, t_xs))
    _path_index(path[0].to(torch.int32).numpy(), 10, 8)
    # with a mask, and with no lengths at all (t_x > t_y for the whole tensor)
    with pytest.warns(MonotonicAlignWarning, match=r"items \[1, 3\]"):
        assert torch.equal(maximum_path(torch.from_numpy(values), _mask(t_xs, t_ys, 8, 10)), path)
    with pytest.warns(MonotonicAlignWarning, match=r"items \[0, 1\]"):
        assert not maximum_path(torch.randn(2, 3, 5)).any()


def test_empty_batch():
    path, dur = maximum_path(torch.randn(0, 5, 3), return_durations=True)
    assert path.shape == (0, 5, 3) and dur.shape == (0, 3)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: maximum_path(torch.randn(4, 5)), ValueError, "neg_cent must be 3-D"),
    (lambda: maximum_path(torch.randn(1, 4, 5, 6)), ValueError, "neg_cent must be 3-D"),
    (lambda: maximum_path(torch.zeros(2, 4, 3, dtype=torch.long)), TypeError, "neg_cent must be a floating"),
    (lambda: maximum_path(np.zeros((2, 4, 3), F32)), TypeError, "neg_cent must be a torch.Tensor"),
    (lambda: maximum_path(torch.randn(2, 4, 3), torch.ones(2, 3, 4)), ValueError, "mask must have neg_cent's shape"),
    (lambda: maximum_path(torch.randn(2, 4, 3), [[1]]), TypeError, "mask must be a torch.Tensor"),
    (lambda: maximum_path(torch.randn(2, 4, 3), torch.ones(2, 4, 3), x_lengths=[3, 3]), ValueError, "either mask"),
    (lambda: maximum_path(torch.randn(2, 4, 3), x_lengths=[3, 4]), ValueError, "x_lengths: item 1 has length 4"),
    (lambda: maximum_path(torch.randn(2, 4, 3), y_lengths=[5, 4]), ValueError, "y_lengths: item 0 has length 5"),
    (lambda: maximum_path(torch.randn(2, 4, 3), x_lengths=[3, 0]), ValueError, "x_lengths must be positive"),
    (lambda: maximum_path(torch.randn(2, 4, 3), y_lengths=[-1, 2]), ValueError, "y_lengths must be positive"),
    (lambda: maximum_path(torch.randn(2, 4, 3), x_lengths=[3]), ValueError, r"x_lengths must have shape \[2\]"),
    (lambda: maximum_path(torch.randn(2, 4, 3), y_lengths=torch.ones(2, 1, dtype=torch.long)), ValueError,
     r"y_lengths must have shape \[2\]"),
    (lambda: maximum_path(torch.randn(2, 4, 3), x_lengths=torch.ones(2)), TypeError, "x_lengths must be an integer"),
    (lambda: maximum_path(torch.randn(2, 4, 3), y_lengths=[1.5, 2.0]), TypeError, "y_lengths must hold integers"),
    (lambda: maximum_path(torch.randn(2, 4, 3), torch.zeros(2, 4, 3)), ValueError, "mask must be positive"),
    (lambda: maximum_path_cpu(np.zeros((2, 3), F32), [1, 1], [1, 1]), ValueError, "values must be 3-D"),
    (lambda: maximum_path_cpu(np.zeros((1, 2, 2), F32), [1], [1], "fortran"), ValueError, "implementation"),
])
def test_bad_input_errors(call, exc, match):
    with backend("reference"), pytest.raises(exc, match=match):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_on_the_cpu_search():
    neg = torch.randn(3, 40, 12, device="cuda")
    keep = neg.clone()
    with backend("reference"):
        path, dur = maximum_path(neg, x_lengths=torch.tensor([12, 7, 3], device="cuda"),
                                 y_lengths=torch.tensor([40, 21, 3], device="cuda"), return_durations=True)
    assert path.is_cuda and dur.is_cuda and torch.equal(neg, keep)
    np.testing.assert_array_equal(path.cpu().to(torch.int32).numpy(), _oracle(neg.cpu().numpy(), [40, 21, 3], [12, 7, 3]))
