"""Reference rational-quadratic spline (``vits_fast.transforms``), float64, no Triton.

Checks against an independent scalar formulation (plain Python floats, a linear bin scan, and bisection for the
inverse), plus the flow identities: inverse(forward(x)) == x, log|det| equals the autograd derivative, the slope is
positive, identity with log|det| 0 outside the tail bound, the exact knot values at knots and at the tail bound.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vits_fast import transforms as T

K = 10
B = 5.0  # Piper's tail bound
F64 = torch.float64


def _params(n: int, scale: float, seed: int, k: int = K, n_deriv: int | None = None):
    g = torch.Generator().manual_seed(seed)
    n_deriv = k - 1 if n_deriv is None else n_deriv
    uw = torch.randn(n, k, generator=g, dtype=F64) * scale
    uh = torch.randn(n, k, generator=g, dtype=F64) * scale
    ud = torch.randn(n, n_deriv, generator=g, dtype=F64) * scale
    return uw, uh, ud


def _scalar_spline(x: float, uw, uh, ud, inverse: bool, tail: float = B):
    """Independent scalar evaluation of the linear-tailed spline for one element (Python floats)."""
    if not -tail <= x <= tail:
        return x, 0.0

    def knots(logits, min_size):
        mx = max(logits)
        e = [math.exp(v - mx) for v in logits]
        tot = sum(e)
        sizes = [min_size + (1 - min_size * len(e)) * v / tot for v in e]
        out = [-tail]
        acc = 0.0
        for s in sizes[:-1]:
            acc += s
            out.append(-tail + 2 * tail * acc)
        return out + [tail]

    xs = knots(list(uw), T.DEFAULT_MIN_BIN_WIDTH)
    ys = knots(list(uh), T.DEFAULT_MIN_BIN_HEIGHT)
    ds = [1.0] + [T.DEFAULT_MIN_DERIVATIVE + math.log1p(math.exp(v)) for v in ud] + [1.0]

    def bin_of(knots_, v):
        k = 0
        while k < len(knots_) - 2 and v >= knots_[k + 1]:
            k += 1
        return k

    def fwd(v, k):
        w, hgt = xs[k + 1] - xs[k], ys[k + 1] - ys[k]
        s = hgt / w
        t = (v - xs[k]) / w
        y = ys[k] + hgt * (s * t * t + ds[k] * t * (1 - t)) / (s + (ds[k] + ds[k + 1] - 2 * s) * t * (1 - t))
        slope = s * s * (ds[k + 1] * t * t + 2 * s * t * (1 - t) + ds[k] * (1 - t) ** 2) / (
            s + (ds[k] + ds[k + 1] - 2 * s) * t * (1 - t)) ** 2
        return y, math.log(slope)

    if not inverse:
        return fwd(x, bin_of(xs, x))
    k = bin_of(ys, x)
    lo, hi = xs[k], xs[k + 1]
    for _ in range(80):  # bisection (to float64 resolution): the map is increasing on the bin
        mid = 0.5 * (lo + hi)
        if fwd(mid, k)[0] < x:
            lo = mid
        else:
            hi = mid
    xin = 0.5 * (lo + hi)
    return xin, -fwd(xin, k)[1]


def _apply(x, uw, uh, ud, inverse=False, tail=B):
    return T.piecewise_rational_quadratic_transform(x, uw, uh, ud, inverse=inverse, tails="linear",
                                                    tail_bound=tail)


@settings(max_examples=20)
@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([0.1, 1.0, 3.0, 10.0]), inverse=st.booleans())
def test_matches_independent_scalar_formulation(seed, scale, inverse):
    n = 27
    uw, uh, ud = _params(n, scale, seed)
    x = torch.linspace(-6.5, 6.5, n, dtype=F64)
    y, lad = _apply(x, uw, uh, ud, inverse)
    for i in range(n):
        ey, elad = _scalar_spline(x[i].item(), uw[i].tolist(), uh[i].tolist(), ud[i].tolist(), inverse)
        assert y[i].item() == pytest.approx(ey, rel=1e-9, abs=1e-9)
        assert lad[i].item() == pytest.approx(elad, rel=1e-7, abs=1e-7)


@settings(max_examples=25)
@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([0.01, 1.0, 5.0, 30.0]),
       xscale=st.sampled_from([0.5, 3.0, 8.0]))
def test_inverse_undoes_forward_and_logdets_cancel(seed, scale, xscale):
    n = 200
    uw, uh, ud = _params(n, scale, seed)
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1), dtype=F64) * xscale
    xg = x.clone().requires_grad_()
    y, lad = _apply(xg, uw, uh, ud)
    (dlad,) = torch.autograd.grad(lad.sum(), xg)
    y, lad, dlad = y.detach(), lad.detach(), dlad.abs()
    x2, lad_inv = _apply(y, uw, uh, ud, inverse=True)
    # Undoing a slope s amplifies y's rounding by 1/s (up to ~1e4 for the steepest parameters here); the
    # recovered log|det| is off by that x error times its own sensitivity d log|det| / dx.
    x_tol = 1e-11 * (1 + x.abs()) * (1.0 + torch.exp(-lad))
    assert ((x2 - x).abs() <= x_tol).all(), (x2 - x).abs().max()
    assert ((lad_inv + lad).abs() <= 1e-9 * (1 + lad.abs()) + dlad * x_tol).all(), (lad_inv + lad).abs().max()


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("scale", [0.5, 4.0])
def test_logabsdet_is_autograd_log_slope_and_slope_positive(inverse, scale):
    n = 300
    uw, uh, ud = _params(n, scale, 7)
    x = torch.linspace(-5.5, 5.5, n, dtype=F64).requires_grad_()
    y, lad = _apply(x, uw, uh, ud, inverse)
    (slope,) = torch.autograd.grad(y.sum(), x)  # elementwise map: the Jacobian is diagonal
    assert (slope > 0).all()
    torch.testing.assert_close(lad.detach(), slope.log(), rtol=1e-9, atol=1e-9)


def test_identity_outside_the_tail_bound():
    n = 6
    uw, uh, ud = _params(n, 3.0, 1)
    x = torch.tensor([-1e6, -5.000001, -7.25, 5.0000001, 9.0, 123.0], dtype=F64)
    for inverse in (False, True):
        y, lad = _apply(x, uw, uh, ud, inverse)
        assert torch.equal(y, x)
        assert torch.equal(lad, torch.zeros_like(x))


def test_tail_bound_and_knots_are_hit_exactly():
    n = 4
    uw, uh, ud = _params(n, 2.0, 3)
    # The tail bound maps to itself with slope 1 (the pinned outer derivative).
    for edge in (-B, B):
        x = torch.full((n,), edge, dtype=F64)
        for inverse in (False, True):
            y, lad = _apply(x, uw, uh, ud, inverse)
            torch.testing.assert_close(y, x, rtol=0, atol=1e-12)
            torch.testing.assert_close(lad, torch.zeros_like(x), rtol=0, atol=1e-9)
    # Every interior knot x_k maps to y_k with slope d_k, and y_k maps back to x_k.
    xk, _ = T._knots(uw, -B, B, T.DEFAULT_MIN_BIN_WIDTH)
    yk, _ = T._knots(uh, -B, B, T.DEFAULT_MIN_BIN_HEIGHT)
    dk = T.DEFAULT_MIN_DERIVATIVE + torch.nn.functional.softplus(ud)
    for k in range(1, K):
        y, lad = _apply(xk[:, k], uw, uh, ud)
        torch.testing.assert_close(y, yk[:, k], rtol=0, atol=1e-12)
        torch.testing.assert_close(lad, dk[:, k - 1].log(), rtol=1e-9, atol=1e-9)
        x, lad_inv = _apply(yk[:, k], uw, uh, ud, inverse=True)
        torch.testing.assert_close(x, xk[:, k], rtol=0, atol=1e-12)
        torch.testing.assert_close(lad_inv, -dk[:, k - 1].log(), rtol=1e-9, atol=1e-9)


def test_searchsorted_semantics_and_no_mutation():
    knots = torch.tensor([[-1.0, 0.0, 0.5, 1.0]], dtype=F64).expand(7, 4).contiguous()
    before = knots.clone()
    v = torch.tensor([-1.0, -0.5, 0.0, 0.25, 0.5, 0.99, 1.0], dtype=F64)
    idx = T.searchsorted(knots, v)
    assert idx.tolist() == [0, 0, 1, 1, 2, 2, 2]  # a knot starts its bin; the right edge is in the last bin
    assert torch.equal(knots, before)


def test_caller_tensors_are_not_modified():
    uw, uh, ud = _params(50, 2.0, 5)
    x = torch.linspace(-7, 7, 50, dtype=F64)
    copies = [t.clone() for t in (x, uw, uh, ud)]
    for inverse in (False, True):
        _apply(x, uw, uh, ud, inverse)
    for a, b in zip((x, uw, uh, ud), copies):
        assert torch.equal(a, b)


def test_unit_interval_spline_without_tails():
    uw, uh, ud = _params(100, 2.0, 11, n_deriv=K + 1)
    x = torch.rand(100, generator=torch.Generator().manual_seed(0), dtype=F64)
    y, lad = T.piecewise_rational_quadratic_transform(x, uw, uh, ud)
    assert ((y >= 0) & (y <= 1)).all()
    x2, lad_inv = T.piecewise_rational_quadratic_transform(y, uw, uh, ud, inverse=True)
    torch.testing.assert_close(x2, x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lad_inv, -lad, rtol=1e-7, atol=1e-7)


def test_gradients_flow_to_all_parameters_but_not_from_the_tails():
    uw, uh, ud = _params(3, 1.0, 2)
    for t in (uw, uh, ud):
        t.requires_grad_()
    x = torch.tensor([0.3, -2.0, 7.0], dtype=F64)
    y, lad = _apply(x, uw, uh, ud)
    grads = torch.autograd.grad((y + lad).sum(), [uw, uh, ud])
    for g in grads:
        assert g[:2].abs().sum() > 0  # inside: depends on every parameter group
        assert torch.equal(g[2], torch.zeros_like(g[2]))  # tail: parameters unused


def test_unknown_tails_rejected():
    uw, uh, ud = _params(2, 1.0, 0)
    with pytest.raises(RuntimeError, match="tails"):
        T.piecewise_rational_quadratic_transform(torch.zeros(2, dtype=F64), uw, uh, ud, tails="quadratic")
