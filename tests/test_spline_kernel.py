"""Fused rational-quadratic spline coupling (``vits_fast.kernels.spline``) against the reference ConvFlow math.

* Every kernel output buffer (outputs, gradients, log|det| partial sums) is NaN-poisoned (the ``poisoned_outputs``
  fixture of ``tests/conftest.py``), so an element the kernel forgets to write fails the comparison.
* The reference is ``vits_fast.transforms`` applied exactly as ``ConvFlow`` does (mask, reshape/permute, scale,
  linear tails, ``cat`` and masked log|det| sum), evaluated in float64, and in the kernel's dtype for the
  same-dtype error rule.
* Tolerances, fp64 kernels (which then compute in fp64): 1e-9, widened by the spline's own sensitivity where it
  is ill-conditioned (see ``fp64_tolerances`` and the gradient check), over the whole parameter range.
* Tolerances, fp32/bf16/fp16: the project rule (``tests/_numerics.py``). Steep bins (raw parameters >= 5) make
  the spline ill-conditioned in fp32 - ``t = (x - x_k) / w_k`` with widths down to 1% of the range, slopes up to
  ~1e3, log|det| moving by up to 1e8 per unit of x next to a knot whose derivative is at its 1e-3 minimum, softmax
  gradients of ~0.1 formed from terms of ~100 - and there PyTorch's own fp32 spline misses the fixed 1e-5 rule by
  far (errors ~1e-4 on log|det|, ~1e-3 on gradients of magnitude ~100), while the kernel (fp64 knots, see
  ``kernels/spline.py``) misses it only on the odd element (1 in 60 random cases). There fp32 falls back to the
  same-dtype comparison (``assert_close``, ``assert_logdet_close``): mean error within 2x PyTorch's fp32 mean
  error, maximum within 8x, summed log|det| within 4x the sum of PyTorch's per-element errors.
* Gradients are not compared at inputs sitting on a knot (``kinks``): the log-slope has a kink there.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from tests._numerics import assert_matches_reference
from tests._util import FusedOps, graph_recorder
from vits_fast import transforms
from vits_fast.backend import backend, interpreter_enabled
from vits_fast.kernels import spline  # noqa: F401 (registers the vits_fast::rq_spline_coupling ops)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # the fused path: CUDA, or CPU under the interpreter
pytestmark = pytest.mark.usefixtures("poisoned_outputs")
K = 10
TAIL = 5.0
DIV = math.sqrt(8.0)  # sqrt(filter_channels) of the tests' spline
F64 = torch.float64
# On a GPU Triton passes Python floats (tail bound, 1/sqrt scale, minimum sizes) as fp32 even to fp64 kernels.
F64_TOL = (1e-9, 1e-9) if interpreter_enabled() else (1e-6, 1e-6)
NO_SHRINK = [Phase.explicit, Phase.reuse, Phase.generate]  # shrinking under the interpreter runs for many minutes


# ----------------------------------------------------------------------------------------------------------------
# reference and helpers


def reference(x, h, mask, inverse, div=DIV, tail=TAIL, k=K):
    """ConvFlow's epilogue as the reference module computes it, in the inputs' dtype."""
    b, c2, t = x.shape
    c = c2 // 2
    x0, x1 = x[:, :c], x[:, c:]
    hm = (h * mask).reshape(b, c, -1, t).permute(0, 1, 3, 2)
    y, lad = transforms.piecewise_rational_quadratic_transform(
        x1, hm[..., :k] / div, hm[..., k: 2 * k] / div, hm[..., 2 * k:], inverse=inverse, tails="linear",
        tail_bound=tail)
    return torch.cat([x0, y], 1) * mask, torch.sum(lad * mask, [1, 2])


def _op(x, h, mask, inverse, div=DIV, tail=TAIL, k=K):
    return torch.ops.vits_fast.rq_spline_coupling(x, h, mask, inverse, tail, div, k, transforms.DEFAULT_MIN_BIN_WIDTH,
                                                  transforms.DEFAULT_MIN_BIN_HEIGHT, transforms.DEFAULT_MIN_DERIVATIVE)


def fused(x, h, mask, inverse, div=DIV, tail=TAIL, k=K):
    """The fused op on ``DEVICE``; inputs and results on the CPU (gradients flow through the copies)."""
    out, logdet = _op(x.to(DEVICE), h.to(DEVICE), mask.to(DEVICE), inverse, div, tail, k)
    return out.cpu(), logdet.cpu()


@pytest.fixture
def fused_ops():
    """Counts the fused ops the test dispatches (a ``TorchDispatchMode``), proving that module tests take the fused
    path."""
    with FusedOps() as ops:
        yield ops


def make_case(b, c, t, lengths, hscale, xscale, placement, seed, k=K):
    """float64 ``x [b, 2c, t]``, ``h [b, c(3k-1), t]``, ``mask [b, 1, t]``; ``placement`` puts x1 at random
    points, exactly on the knots (width knots and height knots), or on/around the tail bound."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 2 * c, t, generator=g, dtype=F64) * xscale
    h = torch.randn(b, c * (3 * k - 1), t, generator=g, dtype=F64) * hscale
    mask = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).to(F64)[:, None, :]
    if placement == "knots":
        hp = (h * mask).reshape(b, c, -1, t).permute(0, 1, 3, 2)
        xk, _ = transforms._knots(hp[..., :k] / DIV, -TAIL, TAIL, transforms.DEFAULT_MIN_BIN_WIDTH)
        yk, _ = transforms._knots(hp[..., k: 2 * k] / DIV, -TAIL, TAIL, transforms.DEFAULT_MIN_BIN_HEIGHT)
        j = (torch.arange(t) % (k + 1)).expand(b, c, t)
        on_x = xk.gather(-1, j[..., None])[..., 0]
        on_y = yk.gather(-1, j[..., None])[..., 0]
        x[:, c:] = torch.where(torch.arange(t) % 2 == 0, on_x, on_y)
    elif placement == "tails":
        choices = torch.tensor([-TAIL, TAIL, -TAIL - 1e-6, TAIL + 1e-6, TAIL - 1e-6, -TAIL + 1e-6, 40.0, -7.5],
                               dtype=F64)
        x[:, c:] = choices[torch.randint(0, len(choices), (b, c, t), generator=g)]
    return x, h, mask


def assert_close(out, ref64, same, name):
    """fp64: fixed tolerance. bf16/fp16: the project rule. fp32: the project's fixed rule, or, where the spline's
    conditioning defeats it (PyTorch's own fp32 result then misses it too), the same-dtype comparison of the
    module docstring: mean error within 2x PyTorch's, maximum within 8x (with floors of 1e-6 / 1e-5 of the
    magnitude for tensors of a few elements)."""
    assert out.shape == ref64.shape, name
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    if out.dtype == F64:
        torch.testing.assert_close(out, ref64, rtol=F64_TOL[0], atol=F64_TOL[1], msg=lambda m: f"{name}: {m}")
        return
    if out.dtype != torch.float32:
        assert_matches_reference(out, ref64, same, name)
        return
    err, base = (out.double() - ref64).abs(), (same.double() - ref64).abs()
    if (err <= 1e-5 + 1e-5 * ref64.abs()).all():
        return
    mag = ref64.abs()
    assert err.mean() <= 2 * base.mean() + 1e-6 * mag.mean(), \
        f"{name}: mean error {err.mean():.3g} vs PyTorch's {base.mean():.3g}"
    assert err.max() <= 8 * base.max() + 1e-5 * mag.max(), \
        f"{name}: max error {err.max():.3g} vs PyTorch's {base.max():.3g}"


def assert_logdet_close(logdet, ref_ld, same_ld, x, h, mask64, inverse):
    """Summed log|det|: as :func:`assert_close`, except that in fp32 the fallback bound is 4x the sum of PyTorch's
    per-element fp32 errors (a sum of errors of either sign can beat the mean rule by cancellation on PyTorch's
    side)."""
    if logdet.dtype != torch.float32:
        assert_close(logdet, ref_ld, same_ld, "logdet")
        return
    err = (logdet.double() - ref_ld).abs()
    if (err <= 1e-5 + 1e-5 * ref_ld.abs()).all():
        return
    b, c2, t = x.shape
    c = c2 // 2
    hp = (h.float() * mask64.float()).reshape(b, c, -1, t).permute(0, 1, 3, 2)
    args = (hp[..., :K] / DIV, hp[..., K:2 * K] / DIV, hp[..., 2 * K:])
    _, lad32 = transforms.piecewise_rational_quadratic_transform(x[:, c:].float(), *args, inverse=inverse,
                                                                 tails="linear", tail_bound=TAIL)
    _, lad64 = transforms.piecewise_rational_quadratic_transform(
        x[:, c:].double(), *(a.double() for a in args), inverse=inverse, tails="linear", tail_bound=TAIL)
    bound = 4 * ((lad32.double() - lad64).abs() * mask64).sum([1, 2]) + 1e-6 * (1 + ref_ld.abs())
    assert (err <= bound).all(), f"logdet: error {err.tolist()} > {bound.tolist()}"


def fp64_tolerances(x, h, mask, inverse, ref_out, ref_ld):
    """Elementwise tolerances for fp64 kernels: ``F64_TOL`` plus, for the spline's values, the change that a few
    ulps of x or of a knot (1e-13 relative, a knot being a sum of K rounded terms) cause: the slope for ``out``,
    |d log|det| / dx| for ``logdet`` (next to a knot whose derivative sits at its minimum, log|det| moves by up to
    ~1e8 per unit of x)."""
    c = x.shape[1] // 2
    b, _, t = x.shape
    hp = (h.detach() * mask).reshape(b, c, -1, t).permute(0, 1, 3, 2)
    x1 = x.detach()[:, c:].clone().requires_grad_()
    _, lad = transforms.piecewise_rational_quadratic_transform(
        x1, hp[..., :K] / DIV, hp[..., K:2 * K] / DIV, hp[..., 2 * K:], inverse=inverse, tails="linear",
        tail_bound=TAIL)
    (dlad,) = torch.autograd.grad(lad.sum(), x1)
    ulps = 1e-13 * (1 + x1.detach().abs())
    rtol, atol = F64_TOL
    out_tol = atol + rtol * ref_out.abs()
    out_tol[:, c:] += torch.exp(lad.detach()) * ulps
    ld_tol = atol + rtol * ref_ld.abs() + (dlad.abs() * ulps * mask).sum([1, 2])
    return out_tol, ld_tol


def kinks(x, h, mask, inverse, k=K):
    """``[b, c, t]`` bool: x1 elements within rounding distance of a knot of the direction's bin search (1e-9
    for fp64, 1e-5 otherwise; inputs placed on knots, and, with steep parameters, on knots of the other kind that
    coincide with them on the minimum-width grid). log|det| has a kink at a knot (its derivative jumps from one
    bin to the next), so there the gradient is one-sided and which side depends on the last bits of the knot: the
    gradients of those elements (of x1 and of their own parameter column of h) are left out of the comparison."""
    b, c2, t = x.shape
    c = c2 // 2
    hp = (h.detach().double() * mask).reshape(b, c, -1, t).permute(0, 1, 3, 2)
    logits, min_size = (hp[..., k: 2 * k], transforms.DEFAULT_MIN_BIN_HEIGHT) if inverse else \
        (hp[..., :k], transforms.DEFAULT_MIN_BIN_WIDTH)
    knots, _ = transforms._knots(logits / DIV, -TAIL, TAIL, min_size)
    x1 = x.detach().double()[:, c:]
    tol = 1e-9 if x.dtype == F64 else 1e-5
    return ((x1[..., None] - knots).abs() <= tol * (1 + x1.abs()[..., None])).any(-1)


def check_against_reference(x64, h64, mask64, inverse, dtype, h_dtype=None, grads=True, seed=0):
    """Run the fused op in ``dtype`` and compare outputs, log|det| and (optionally) gradients of x and h
    (except at the elements :func:`kinks` names)."""
    h_dtype = h_dtype or dtype
    x = x64.to(dtype).requires_grad_(grads)
    h = h64.to(h_dtype).requires_grad_(grads)
    mask = mask64.to(torch.float32 if dtype != F64 else F64)
    out, logdet = fused(x, h, mask, inverse)
    assert out.dtype == dtype and logdet.dtype == (F64 if dtype == F64 else torch.float32)

    # references on the values the kernel saw
    xr = x.detach().double().requires_grad_(grads)
    hr = h.detach().double().requires_grad_(grads)
    ref_out, ref_ld = reference(xr, hr, mask64, inverse)
    xs = x.detach().clone().requires_grad_(grads)
    hs = h.detach().to(dtype).clone().requires_grad_(grads)
    same_out, same_ld = reference(xs, hs, mask.to(dtype), inverse)
    if dtype == F64:
        out_tol, ld_tol = fp64_tolerances(x, h, mask64, inverse, ref_out.detach(), ref_ld.detach())
        for name, a, r, tol in (("out", out, ref_out, out_tol), ("logdet", logdet, ref_ld, ld_tol)):
            err = (a.detach() - r.detach()).abs()
            assert torch.isfinite(a).all() and (err <= tol).all(), f"{name}: {(err / tol).max():.3g}x tolerance"
    else:
        assert_close(out, ref_out.detach(), same_out.detach(), "out")
        assert_logdet_close(logdet, ref_ld.detach(), same_ld.detach(), x.detach(), h.detach(), mask64, inverse)
    if not grads:
        return out, logdet
    g = torch.Generator().manual_seed(seed + 7)
    go = torch.randn(out.shape, generator=g, dtype=F64)
    gl = torch.randn(logdet.shape, generator=g, dtype=F64)
    gx, gh = torch.autograd.grad((out * go.to(dtype)).sum() + (logdet * gl.to(logdet.dtype)).sum(), [x, h])
    rgx, rgh = torch.autograd.grad((ref_out * go).sum() + (ref_ld * gl).sum(), [xr, hr])
    sgx, sgh = torch.autograd.grad((same_out * go.to(dtype)).sum() + (same_ld * gl.to(dtype)).sum(), [xs, hs])
    assert gx.dtype == dtype and gh.dtype == h_dtype
    kink = kinks(x, h, mask64, inverse)
    if kink.any():
        c = x.shape[1] // 2
        kx = torch.cat([torch.zeros_like(kink), kink], 1)
        kh = kink.repeat_interleave(h.shape[1] // c, dim=1)
        gx, rgx, sgx = (a.masked_fill(kx, 0) for a in (gx, rgx, sgx))
        gh, rgh, sgh = (a.masked_fill(kh, 0) for a in (gh, rgh, sgh))
    if dtype == F64:
        # A gradient moves by its own derivative (the spline's second derivative, ~1e15 next to the steepest
        # knots) times the ulps in which kernel and reference differ: up to ~3e-7 relative was measured there;
        # the softmax backward's sums cancel terms as large as the largest gradient (up to ~1e7) into small ones.
        for name, a, r in (("grad x", gx, rgx), ("grad h", gh, rgh)):
            atol = F64_TOL[1] + 1e-13 * r.abs().max().item()
            torch.testing.assert_close(a, r, rtol=max(F64_TOL[0], 1e-6), atol=atol, msg=lambda m: f"{name}: {m}")
        return out, logdet
    assert_close(gx, rgx, sgx, "grad x")
    assert_close(gh, rgh, sgh.to(h_dtype), "grad h")
    return out, logdet


shapes = st.tuples(st.integers(1, 3), st.sampled_from([1, 2, 3]), st.sampled_from([1, 2, 5, 13, 31, 64, 67]))


@st.composite
def cases(draw):
    """Shapes, ragged lengths, parameter scale (0.05: nearly uniform bins; 50: bins at their minimum width,
    derivatives at their minimum or huge), input scale, and placement (random, on knots, around the tail bound)."""
    b, c, t = draw(shapes)
    lengths = [draw(st.integers(1, t)) for _ in range(b)]
    return dict(b=b, c=c, t=t, lengths=lengths, hscale=draw(st.sampled_from([0.05, 1.0, 5.0, 50.0])),
                xscale=draw(st.sampled_from([0.3, 2.0, 6.0])),
                placement=draw(st.sampled_from(["random", "knots", "tails"])), seed=draw(st.integers(0, 2**20)))


# ----------------------------------------------------------------------------------------------------------------
# values and gradients


@settings(max_examples=12, phases=NO_SHRINK)
@given(case=cases(), inverse=st.booleans())
def test_fp32_matches_reference(case, inverse):
    x, h, mask = make_case(**case)
    check_against_reference(x, h, mask, inverse, torch.float32, seed=case["seed"])


@settings(max_examples=8, phases=NO_SHRINK)
@given(case=cases(), inverse=st.booleans())
def test_fp64_matches_reference_and_inverse_undoes_forward(case, inverse):
    x, h, mask = make_case(**case)
    out, logdet = check_against_reference(x, h, mask, inverse, F64, seed=case["seed"])
    back, back_ld = fused(out.detach(), h, mask, not inverse)
    c, t = case["c"], case["t"]
    # x1 comes back where the mask is 1 (the output mask zeroes the rest). Undoing a slope s amplifies the
    # rounding of the output by 1/s, and log|det| moves by that error times its own sensitivity d log|det| / dx,
    # so the tolerances follow both (from the float64 reference with autograd).
    hp = (h * mask).reshape(case["b"], c, -1, t).permute(0, 1, 3, 2)
    x1 = x[:, c:].clone().requires_grad_()
    _, lad = transforms.piecewise_rational_quadratic_transform(
        x1, hp[..., :K] / DIV, hp[..., K:2 * K] / DIV, hp[..., 2 * K:], inverse=inverse, tails="linear",
        tail_bound=TAIL)
    (dlad,) = torch.autograd.grad(lad.sum(), x1)
    lad, dlad = lad.detach(), dlad.abs()
    x_tol = 1e-11 * (1 + x[:, c:].abs()) * (1 + torch.exp(-lad))
    m = mask.bool().expand(-1, c, -1)
    err = (back[:, c:] - x[:, c:]).abs()[m]
    assert (err <= x_tol[m]).all(), (err / x_tol[m]).max()
    ld_tol = ((1e-9 * (1 + lad.abs()) + dlad * x_tol) * mask).sum([1, 2])
    assert ((back_ld + logdet.detach()).abs() <= ld_tol).all()


@pytest.mark.parametrize("dtype,h_dtype", [(torch.bfloat16, None), (torch.float16, None),
                                           (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("inverse", [False, True])
def test_low_precision_matches_reference(dtype, h_dtype, inverse):
    x, h, mask = make_case(2, 2, 37, [37, 23], hscale=2.0, xscale=3.0, placement="random", seed=5)
    check_against_reference(x, h, mask, inverse, dtype, h_dtype=h_dtype)


# name -> (batch, C, T, lengths, inverse). One program per (BLOCK_T = 64 time steps, channel, item); the K = 10 bins
# sit in KP = 16 lanes (6 padding lanes in every shape).
SHAPES = {
    "piper-sdp": (2, 1, 37, (37, 20), False),  # the SDP's ConvFlows: C = 1
    "odd": (3, 1, 7, (7, 1, 4), True),
    "tile-1": (1, 2, 63, (63,), False),
    "tile": (2, 1, 64, (64, 40), True),
    "tile+1": (1, 2, 65, (50,), True),
    "2tile+1": (1, 1, 129, (129,), False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shape_grid(shape, dtype):
    """Output, log|det| and both gradients against float64 at every time-tile boundary (per-dtype rule)."""
    b, c, t, lengths, inverse = SHAPES[shape]
    x, h, mask = make_case(b, c, t, list(lengths), hscale=2.0, xscale=3.0, placement="random", seed=len(shape))
    check_against_reference(x, h, mask, inverse, dtype)


@pytest.mark.parametrize("hscale", [20.0, 50.0])
@pytest.mark.parametrize("inverse", [False, True])
def test_fp32_steep_bins_as_accurate_as_pytorch(hscale, inverse):
    x, h, mask = make_case(2, 2, 67, [67, 50], hscale=hscale, xscale=3.0, placement="random", seed=9)
    check_against_reference(x, h, mask, inverse, torch.float32, seed=9)


def test_fp32_inverse_undoes_forward():
    x, h, mask = make_case(3, 2, 67, [67, 40, 1], hscale=1.0, xscale=3.0, placement="random", seed=3)
    x, h, mask = x.float(), h.float(), mask.float()
    y, ld = fused(x, h, mask, False)
    back, back_ld = fused(y, h, mask, True)
    torch.testing.assert_close(back, x * mask, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(back_ld, -ld, rtol=1e-4, atol=1e-4)


def test_every_regime_in_one_batch_exactly_on_knots_and_tail():
    """Hand-placed inputs: each interior knot, both tail bounds, just inside/outside, far outside; steep params."""
    b, c, t = 1, 1, 23
    x, h, mask = make_case(b, c, t, [t], hscale=30.0, xscale=1.0, placement="knots", seed=11)
    x[0, 1, 11:] = torch.tensor([-TAIL, TAIL, -TAIL - 1e-9, TAIL + 1e-9, TAIL - 1e-9, -TAIL + 1e-9, 1e3, -1e3,
                                 0.0, 1e-12, -1e-12, 4.999])
    for inverse in (False, True):
        out, _ = check_against_reference(x, h, mask, inverse, F64)
        outside = x[0, 1].abs() > TAIL
        assert torch.equal(out[0, 1][outside], x[0, 1][outside])  # identity tails, bit for bit


@pytest.mark.parametrize("inverse", [False, True])
def test_gradcheck_fp64(inverse):
    x, h, mask = make_case(1, 1, 5, [4], hscale=2.0, xscale=3.0, placement="random", seed=2)
    x[0, 1, 1] = 6.0  # one element in the tail
    x.requires_grad_()
    h.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: fused(a, b, mask, inverse), (x, h), fast_mode=True)


def test_small_bin_count_and_gradcheck():
    k = 3
    x, h, mask = make_case(2, 1, 3, [3, 2], hscale=1.5, xscale=2.5, placement="random", seed=4, k=k)
    for inverse in (False, True):
        out, ld = fused(x, h, mask, inverse, k=k)
        ref_out, ref_ld = reference(x, h, mask, inverse, k=k)
        torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(ld, ref_ld, rtol=1e-9, atol=1e-9)
        x.requires_grad_()
        h.requires_grad_()
        assert torch.autograd.gradcheck(lambda a, b: fused(a, b, mask, inverse, k=k), (x, h), fast_mode=True)
        x, h = x.detach(), h.detach()


def test_opcheck():
    x, h, mask = make_case(2, 1, 7, [7, 3], hscale=1.0, xscale=2.0, placement="random", seed=1)
    x, h, mask = (t.float().to(DEVICE) for t in (x, h, mask))
    x.requires_grad_()
    h.requires_grad_()
    args = (x, h, mask, False, TAIL, DIV, K, 1e-3, 1e-3, 1e-3)
    torch.library.opcheck(torch.ops.vits_fast.rq_spline_coupling.default, args)
    go, gl = torch.randn_like(x), torch.randn(2, device=DEVICE)
    torch.library.opcheck(torch.ops.vits_fast.rq_spline_coupling_bwd.default,
                          (go, gl, x.detach(), h.detach(), mask, True, TAIL, DIV, K, 1e-3, 1e-3, 1e-3))


def test_bad_inputs_are_rejected():
    x, h, mask = make_case(2, 1, 7, [7, 3], hscale=1.0, xscale=2.0, placement="random", seed=1)
    with pytest.raises(ValueError, match="h must be"):
        fused(x, h[:, :-1], mask, False)
    with pytest.raises(ValueError, match="x_mask"):
        fused(x, h, mask[:, :, :-1], False)
    with pytest.raises(TypeError, match="unsupported dtypes"):
        fused(x.float(), h, mask, False)
    with pytest.raises(ValueError, match="x_mask"):
        out, ld = fused(x.requires_grad_(), h, mask.clone().requires_grad_(), False)
        ld.sum().backward()


@pytest.mark.skipif(not CUDA, reason="host synchronisation is only observable on CUDA")
def test_no_host_sync_on_cuda():
    x, h, mask = (t.float().cuda() for t in make_case(2, 1, 70, [70, 9], 1.0, 3.0, "random", 0))
    x.requires_grad_()
    h.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, ld = _op(x, h, mask, False)
        (out.sum() + ld.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------------------------------------------
# modules: ConvFlow and the stochastic duration predictor on the fused path


def _randomise(module, seed, std=0.3):
    """Random weights everywhere (``proj`` is zero-initialised, which would make every spline the same)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std + (1.0 if name.endswith("gamma") else 0.0))
    return module


def _ragged_mask(lengths, t, dtype):
    return (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).to(dtype)[:, None, :]


@pytest.mark.parametrize("reverse", [False, True])
def test_conv_flow_module_matches_reference(reverse, fused_ops):
    from vits_fast.modules import ConvFlow

    flow = _randomise(ConvFlow(2, 8, 3, n_layers=2), seed=1).double().to(DEVICE)
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 2, 11, generator=g, dtype=F64) * 2).to(DEVICE)
    gc = torch.randn(2, 8, 11, generator=g, dtype=F64).to(DEVICE)
    mask = _ragged_mask([11, 6], 11, F64).to(DEVICE)

    def run(name):
        flow.zero_grad()
        xi = x.clone().requires_grad_()
        with backend(name):
            res = flow(xi, mask, g=gc, reverse=reverse)
        out, ld = (res, None) if reverse else res
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=F64, device=DEVICE).view_as(out)).sum()
        if ld is not None:
            loss = loss + (ld * torch.tensor([0.7, -1.3], dtype=F64, device=DEVICE)).sum()
        loss.backward()
        return [out.detach()] + ([] if ld is None else [ld.detach()]) + [xi.grad] + [
            p.grad.clone() for p in flow.parameters()]

    fused_results = run("triton")
    assert fused_ops.counts["rq_spline_coupling"] == 1
    for a, b in zip(fused_results, run("reference")):
        torch.testing.assert_close(a, b, rtol=F64_TOL[0], atol=F64_TOL[1])


def test_conv_flow_under_autocast_keeps_reference_dtypes(fused_ops):
    """fp32 flow state with a bf16 projection (autocast): the reference's output dtypes, and its values up to the
    spline's fp32 rounding (both paths get the same bf16 projection from PyTorch)."""
    from vits_fast.modules import ConvFlow

    flow = _randomise(ConvFlow(2, 8, 3, n_layers=2), seed=6).to(DEVICE)
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(2, 2, 11, generator=g) * 2).to(DEVICE)
    mask = _ragged_mask([11, 6], 11, torch.float32).to(DEVICE)
    outs = {}
    for name in ("triton", "reference"):
        with torch.autocast(DEVICE, dtype=torch.bfloat16), backend(name):
            outs[name] = flow(x, mask)
    assert fused_ops.counts["rq_spline_coupling"] == 1
    (a, la), (b, lb) = outs["triton"], outs["reference"]
    assert a.dtype == b.dtype == torch.float32 and la.dtype == lb.dtype
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4)


def _sdp(dtype, n_flows=4):
    from vits_fast.models import StochasticDurationPredictor

    torch.manual_seed(0)
    return _randomise(StochasticDurationPredictor(8, 8, 3, 0.0, n_flows=n_flows), seed=3).to(DEVICE, dtype)


def _sdp_inputs(dtype):
    g = torch.Generator().manual_seed(4)
    lengths = [13, 9]
    mask = _ragged_mask(lengths, 13, dtype)
    x = torch.randn(2, 8, 13, generator=g, dtype=F64).to(dtype)
    # durations >= 2: with w = 1 the dequantised z0 = w - sigmoid(.) can be ~1e-3, and log(z0) then amplifies
    # any fp32 rounding upstream (the reference's own fp32 gradients move by ~1e-4 relative)
    w = (torch.randint(2, 7, (2, 1, 13), generator=g).to(dtype)) * mask
    return x.to(DEVICE), mask.to(DEVICE), w.to(DEVICE)


def _sdp_train(sdp, x, mask, w, name):
    sdp.zero_grad()
    torch.manual_seed(123)
    with backend(name):
        nll = sdp(x, mask, w=w)
    (nll * torch.tensor([1.0, 0.5], dtype=nll.dtype, device=nll.device)).sum().backward()
    return nll.detach(), {n: p.grad.clone() for n, p in sdp.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_sdp_training_nll_and_grads_match_reference(dtype, fused_ops):
    sdp64 = _sdp(F64)
    x64, mask64, w64 = _sdp_inputs(F64)
    ref_nll, ref_grads = _sdp_train(sdp64, x64, mask64, w64, "reference")
    assert not fused_ops.counts
    sdp = _sdp(dtype)
    x, mask, w = _sdp_inputs(dtype)
    nll, grads = _sdp_train(sdp, x, mask, w, "triton")
    assert fused_ops.counts["rq_spline_coupling"] == 8  # 4 posterior + 4 main ConvFlows
    assert set(grads) == set(ref_grads) and len(grads) > 20
    if dtype == F64:
        torch.testing.assert_close(nll, ref_nll, rtol=F64_TOL[0], atol=F64_TOL[1])
        for n in grads:
            torch.testing.assert_close(grads[n], ref_grads[n], rtol=F64_TOL[0], atol=F64_TOL[1], msg=n)
        return
    same_nll, same_grads = _sdp_train(sdp, x, mask, w, "reference")
    assert_close(nll, ref_nll, same_nll, "nll")
    for n in grads:
        assert_close(grads[n], ref_grads[n], same_grads[n], n)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_sdp_reverse_logw_matches_reference(dtype, fused_ops):
    def sample(model, x, mask, name):
        torch.manual_seed(321)
        with torch.no_grad(), backend(name):
            return model(x, mask, reverse=True, noise_scale=0.8)

    ref = sample(_sdp(F64), *_sdp_inputs(F64)[:2], "reference")
    sdp = _sdp(dtype)
    x, mask, _ = _sdp_inputs(dtype)
    logw = sample(sdp, x, mask, "triton")
    assert fused_ops.counts["rq_spline_coupling"] == 3  # sampling skips one of the 4 main ConvFlows, as upstream
    assert logw.shape == (2, 1, 13) and logw.dtype == dtype
    if dtype == F64:
        torch.testing.assert_close(logw, ref, rtol=F64_TOL[0], atol=F64_TOL[1])
    else:
        assert_close(logw.cpu(), ref.cpu(), sample(sdp, x, mask, "reference").cpu(), "logw")


def test_sdp_compiles_fullgraph():
    """``torch.compile(fullgraph=True)`` of the SDP on the fused path, training loss and reverse sampling: no graph
    break, and the compiled results and gradients equal eager's. The ``aot_eager`` backend traces exactly what
    inductor would be given (Dynamo capture, fake-tensor propagation through ``register_fake``, AOT autograd through
    ``register_autograd``) without generating C++ for the CPU convolutions, which costs minutes here (checked by
    hand: inductor on CPU compiles it too, and with ``fallback_random`` its NLL equals eager's to 3e-5); with CUDA
    the default inductor backend is used. Two main flows keep Dynamo's tracing time down while the reverse pass
    still runs a ConvFlow (upstream drops one of the flows when sampling)."""
    sdp = _sdp(torch.float32, n_flows=2)
    x, mask, w = _sdp_inputs(torch.float32)
    one = torch.tensor([1.0, 0.5], device=DEVICE)
    eager_nll, eager_grads = _sdp_train(sdp, x, mask, w, "triton")
    with torch.no_grad(), backend("triton"):
        torch.manual_seed(9)
        eager_logw = sdp(x, mask, reverse=True, noise_scale=0.8)

    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    compile_backend, graphs = ("inductor", None) if CUDA else graph_recorder()
    compiled = torch.compile(sdp, fullgraph=True, backend=compile_backend)
    sdp.zero_grad()
    torch.manual_seed(123)
    # fallback_random: inductor's own RNG would draw other noise than eager's torch.randn
    with backend("triton"), inductor_config.patch(fallback_random=True):
        nll = compiled(x, mask, w=w)
    (nll * one).sum().backward()
    torch.testing.assert_close(nll.detach(), eager_nll, rtol=1e-5, atol=1e-5)
    for n, p in sdp.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, eager_grads[n], rtol=1e-4, atol=1e-5, msg=n)

    sample = torch.compile(lambda a, m: sdp(a, m, reverse=True, noise_scale=0.8), fullgraph=True,
                           backend=compile_backend)
    with torch.no_grad(), backend("triton"), inductor_config.patch(fallback_random=True):
        torch.manual_seed(9)
        logw = sample(x, mask)
    torch.testing.assert_close(logw, eager_logw, rtol=1e-5, atol=1e-5)
    if graphs is not None:  # training: 4 posterior + 2 main flows, forward and backward; sampling: 1 main flow
        assert [g.count("vits_fast.rq_spline_coupling.default") for g in graphs["fw"]] == [6, 1], graphs["fw"]
        assert "vits_fast.rq_spline_coupling_bwd.default" in graphs["bw"][0]
    torch._dynamo.reset()
