"""Fused affine-coupling epilogue (``vits_fast.kernels.coupling``) against the reference ResidualCouplingLayer.

* Every kernel output buffer is NaN-poisoned (the ``poisoned_outputs`` fixture of ``tests/conftest.py``), so an
  element the kernel forgets to write fails the comparison.
* The reference is the epilogue of ``ResidualCouplingLayer.forward`` written out in PyTorch (mask on the stats,
  split, affine update, ``cat``, ``sum(logs)``), then ``torch.flip`` for the folded ``Flip``; float64 for the
  values, the kernel's dtype for the same-dtype rule (``tests/_numerics.py``).
* Module level: ResidualCouplingLayer and ResidualCouplingBlock (forward and reverse, with the flips folded by
  ``residual_coupling_block_forward``) on the fused path equal the reference path, gradients included.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from tests._numerics import assert_matches_reference
from tests._util import FusedOps, randomised
from vits_fast.backend import backend, interpreter_enabled
from vits_fast.kernels import coupling

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # the fused path: CUDA, or CPU under the interpreter
pytestmark = pytest.mark.usefixtures("poisoned_outputs")
F64 = torch.float64
F64_TOL = (1e-12, 1e-12) if interpreter_enabled() else (1e-9, 1e-9)
NO_SHRINK = [Phase.explicit, Phase.reuse, Phase.generate]  # shrinking under the interpreter runs for many minutes


def reference(x, stats, mask, reverse, flip, mean_only):
    """The reference layer's epilogue (plus the following Flip when ``flip``); logdet of the map applied."""
    c = x.shape[1] // 2
    x0, x1 = x[:, :c], x[:, c:]
    stats = stats * mask
    m, logs = (stats, torch.zeros_like(stats)) if mean_only else (stats[:, :c], stats[:, c:])
    if reverse:
        x1 = (x1 - m) * torch.exp(-logs) * mask
        logdet = -torch.sum(logs, [1, 2])
    else:
        x1 = m + x1 * torch.exp(logs) * mask
        logdet = torch.sum(logs, [1, 2])
    out = torch.cat([x0, x1], 1)
    return (torch.flip(out, [1]) if flip else out), logdet


def _op(x, stats, mask, reverse, flip, mean_only):
    return torch.ops.vits_fast.affine_coupling(x, stats, mask, reverse, flip, mean_only)


def fused(x, stats, mask, reverse, flip, mean_only):
    """The fused op on ``DEVICE``; inputs and results on the CPU (gradients flow through the copies)."""
    out, logdet = _op(x.to(DEVICE), stats.to(DEVICE), mask.to(DEVICE), reverse, flip, mean_only)
    return out.cpu(), logdet.cpu()


@pytest.fixture
def fused_ops():
    """Counts the fused ops the test dispatches (a ``TorchDispatchMode``), proving that module tests take the fused
    path."""
    with FusedOps() as ops:
        yield ops


def make_case(b, c, t, lengths, mean_only, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 2 * c, t, generator=g, dtype=F64) * 2
    stats = torch.randn(b, c if mean_only else 2 * c, t, generator=g, dtype=F64) * scale
    mask = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).to(F64)[:, None, :]
    return x, stats, mask


def check(x64, s64, mask64, reverse, flip, mean_only, dtype, s_dtype=None, seed=0):
    s_dtype = s_dtype or dtype
    x = x64.to(dtype).requires_grad_()
    s = s64.to(s_dtype).requires_grad_()
    mask = mask64.to(F64 if dtype == F64 else torch.float32)
    out, logdet = fused(x, s, mask, reverse, flip, mean_only)
    assert out.dtype == dtype and logdet.dtype == (F64 if dtype == F64 else torch.float32)

    xr, sr = x.detach().double().requires_grad_(), s.detach().double().requires_grad_()
    ref_out, ref_ld = reference(xr, sr, mask64, reverse, flip, mean_only)
    # PyTorch in the kernel's dtypes (with fp32 x and bf16 stats this is the autocast computation)
    xs, ss = x.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    same_out, same_ld = reference(xs, ss, mask.to(dtype), reverse, flip, mean_only)

    g = torch.Generator().manual_seed(seed + 1)
    go = torch.randn(out.shape, generator=g, dtype=F64)
    gl = torch.randn(logdet.shape, generator=g, dtype=F64)
    grads = torch.autograd.grad((out * go.to(dtype)).sum() + (logdet * gl.to(logdet.dtype)).sum(), [x, s])
    ref_grads = torch.autograd.grad((ref_out * go).sum() + (ref_ld * gl).sum(), [xr, sr])
    same = (same_out * go.to(same_out.dtype)).sum() + (same_ld * gl.to(same_ld.dtype)).sum()
    same_grads = torch.autograd.grad(same, [xs, ss], allow_unused=True)
    same_grads = [torch.zeros_like(a) if gr is None else gr for gr, a in zip(same_grads, (xs, ss))]
    assert grads[0].dtype == dtype and grads[1].dtype == s_dtype
    for name, a, r, p in [("out", out, ref_out, same_out), ("logdet", logdet, ref_ld, same_ld),
                          ("grad x", grads[0], ref_grads[0], same_grads[0]),
                          ("grad stats", grads[1], ref_grads[1], same_grads[1])]:
        r = r.detach()
        if a.dtype == F64:
            assert torch.isfinite(a).all(), name
            torch.testing.assert_close(a, r, rtol=F64_TOL[0], atol=F64_TOL[1], msg=lambda m: f"{name}: {m}")
        else:
            assert_matches_reference(a, r, p.detach().to(a.dtype), name)
    return out, logdet


@st.composite
def cases(draw):
    b = draw(st.integers(1, 3))
    c = draw(st.sampled_from([1, 2, 3, 5, 96]))
    t = draw(st.sampled_from([1, 2, 7, 11, 127, 1031]))
    lengths = [draw(st.integers(1, t)) for _ in range(b)]
    return dict(b=b, c=c, t=t, lengths=lengths, mean_only=draw(st.booleans()),
                scale=draw(st.sampled_from([0.01, 1.0, 4.0])), seed=draw(st.integers(0, 2**20)))


@settings(max_examples=20, phases=NO_SHRINK)
@given(case=cases(), reverse=st.booleans(), flip=st.booleans(), dtype=st.sampled_from([torch.float32, F64]))
def test_matches_reference(case, reverse, flip, dtype):
    x, s, mask = make_case(**case)
    check(x, s, mask, reverse, flip, case["mean_only"], dtype, seed=case["seed"])


@pytest.mark.parametrize("dtype,s_dtype", [(torch.bfloat16, None), (torch.float16, None),
                                           (torch.float32, torch.bfloat16), (torch.float32, torch.float16)])
@pytest.mark.parametrize("mean_only", [True, False])
def test_low_precision_and_autocast_dtypes(dtype, s_dtype, mean_only):
    x, s, mask = make_case(2, 5, 131, [131, 77], mean_only, 1.0, 3)
    for reverse, flip in ((False, True), (True, False)):
        check(x, s, mask, reverse, flip, mean_only, dtype, s_dtype=s_dtype)


# name -> (batch, C, T, lengths, mean_only, reverse, flip). BLOCK = 1024 elements of the [C, T] half per program.
SHAPES = {
    "piper-prior-flow": (1, 96, 11, (11,), True, False, True),  # Piper: 192 channels, mean-only; C*T = 1056
    "odd": (3, 3, 7, (7, 1, 4), False, True, False),
    "block-1": (2, 11, 93, (93, 50), False, False, True),  # C*T = 1023
    "block": (1, 8, 128, (100,), True, True, True),  # C*T = 1024
    "block+1": (2, 5, 205, (205, 101), False, True, True),  # C*T = 1025
    "2block+1": (1, 3, 683, (600,), True, False, False),  # C*T = 2049
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shape_grid(shape, dtype):
    """Output, logdet and both gradients against float64 at every block boundary (per-dtype rule)."""
    b, c, t, lengths, mean_only, reverse, flip = SHAPES[shape]
    x, s, mask = make_case(b, c, t, list(lengths), mean_only, 1.0, len(shape))
    check(x, s, mask, reverse, flip, mean_only, dtype)


@pytest.mark.parametrize("mean_only", [True, False])
@pytest.mark.parametrize("flip", [False, True])
def test_reverse_undoes_forward(mean_only, flip):
    x, s, mask = make_case(3, 3, 50, [50, 31, 1], mean_only, 2.0, 7)
    x = x * mask  # the flow state is zero at padded positions, as in the models
    y, ld = fused(x, s, mask, False, False, mean_only)
    back, back_ld = fused(y, s, mask, True, False, mean_only)
    torch.testing.assert_close(back, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(back_ld, -ld, rtol=1e-12, atol=1e-12)
    if flip:  # flipped output, flipped back, then reversed: the block's reverse order
        y_f, _ = fused(x, s, mask, False, True, mean_only)
        torch.testing.assert_close(torch.flip(y_f, [1]), y, rtol=0, atol=0)


@pytest.mark.parametrize("mean_only", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck_fp64(mean_only, reverse):
    x, s, mask = make_case(2, 2, 3, [3, 2], mean_only, 0.7, 5)
    x.requires_grad_()
    s.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: fused(a, b, mask, reverse, True, mean_only), (x, s))


def test_opcheck():
    for mean_only in (True, False):
        x, s, mask = make_case(2, 3, 9, [9, 4], mean_only, 1.0, 2)
        x, s, mask = (t.float().to(DEVICE) for t in (x, s, mask))
        x.requires_grad_()
        s.requires_grad_()
        torch.library.opcheck(torch.ops.vits_fast.affine_coupling.default, (x, s, mask, False, True, mean_only))
        go, gl = torch.randn_like(x), torch.randn(2, device=DEVICE)
        torch.library.opcheck(torch.ops.vits_fast.affine_coupling_bwd.default,
                              (go, gl, x.detach(), s.detach(), mask, True, False, mean_only))


def test_bad_inputs_are_rejected():
    x, s, mask = make_case(2, 3, 9, [9, 4], True, 1.0, 2)
    with pytest.raises(ValueError, match="stats must be"):
        fused(x, s, mask, False, False, False)  # mean_only=False needs 2C stats channels
    with pytest.raises(ValueError, match="x_mask"):
        fused(x, s, mask[:1], False, False, True)
    with pytest.raises(TypeError, match="unsupported dtypes"):
        fused(x.half(), s.float(), mask, False, False, True)


@pytest.mark.skipif(not CUDA, reason="host synchronisation is only observable on CUDA")
def test_no_host_sync_on_cuda():
    x, s, mask = (t.float().cuda() for t in make_case(2, 4, 70, [70, 9], False, 1.0, 0))
    x.requires_grad_()
    s.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, ld = _op(x, s, mask, False, True, False)
        (out.sum() + ld.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------------------------------------------
# modules


def _randomise(module, seed):
    """Random weights everywhere (``post`` is zero-initialised, which would make the coupling the identity)."""
    return randomised(module, seed, scale=0.3)


def _inputs(b, c, t, lengths, gin, seed):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).to(F64)[:, None, :]
    x = torch.randn(b, c, t, generator=g, dtype=F64) * mask
    cond = torch.randn(b, gin, 1, generator=g, dtype=F64).to(DEVICE) if gin else None
    return x.to(DEVICE), mask.to(DEVICE), cond


def _run(module, name, x, mask, cond, reverse, fn=None):
    module.zero_grad()
    xi = x.clone().requires_grad_()
    with backend(name):
        res = (fn or module)(xi, mask, g=cond, reverse=reverse)
    out, ld = res if isinstance(res, tuple) else (res, None)
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    ramp = None if ld is None else torch.arange(1, ld.numel() + 1, dtype=ld.dtype, device=ld.device)
    loss = (out * w).sum() + (0.0 if ld is None else (ld * ramp).sum())
    loss.backward()
    return [out.detach()] + ([] if ld is None else [ld.detach()]) + [xi.grad] + [
        p.grad.clone() for p in module.parameters() if p.grad is not None]


@pytest.mark.parametrize("mean_only", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
def test_residual_coupling_layer_matches_reference(mean_only, reverse, fused_ops):
    from vits_fast.modules import ResidualCouplingLayer

    layer = _randomise(ResidualCouplingLayer(6, 8, 3, 1, 2, gin_channels=4, mean_only=mean_only), 1)
    layer = layer.to(DEVICE, F64)
    x, mask, cond = _inputs(2, 6, 9, [9, 5], 4, 2)
    fused_res = _run(layer, "triton", x, mask, cond, reverse)
    assert fused_ops.counts["affine_coupling"] == 1
    ref_res = _run(layer, "reference", x, mask, cond, reverse)
    assert len(fused_res) == len(ref_res) > 3
    for a, b in zip(fused_res, ref_res):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("folded", [False, True])
def test_residual_coupling_block_matches_reference(reverse, folded, fused_ops):
    """The block end to end on the fused path: through the layers' own hooks, and with the flips folded."""
    from vits_fast.models import ResidualCouplingBlock

    block = _randomise(ResidualCouplingBlock(4, 8, 3, 1, 2, n_flows=3, gin_channels=4), 3).to(DEVICE, F64)
    x, mask, cond = _inputs(2, 4, 10, [10, 6], 4, 4)
    fn = (lambda *a, **k: coupling.residual_coupling_block_forward(block, *a, **k)) if folded else None
    fused_res = _run(block, "triton", x, mask, cond, reverse, fn=fn)
    assert fused_ops.counts["affine_coupling"] == 3
    ref_res = _run(block, "reference", x, mask, cond, reverse)
    assert len(fused_res) == len(ref_res) > 3
    for a, b in zip(fused_res, ref_res):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_folded_block_round_trip_and_pinned_layer():
    """reverse(forward(x)) == x through the folded block, also when one layer is pinned to the reference path
    (that layer and its flip then run unfused)."""
    from vits_fast.backend import set_module_backend
    from vits_fast.models import ResidualCouplingBlock

    block = _randomise(ResidualCouplingBlock(4, 8, 3, 1, 2, n_flows=2, gin_channels=0), 5).to(DEVICE, F64)
    x, mask, _ = _inputs(2, 4, 10, [10, 6], 0, 6)
    set_module_backend(block.flows[2], "reference")
    with torch.no_grad(), backend("triton"):
        z = coupling.residual_coupling_block_forward(block, x, mask)
        back = coupling.residual_coupling_block_forward(block, z, mask, reverse=True)
    set_module_backend(block.flows[2], None)
    with torch.no_grad(), backend("reference"):
        z_ref = block(x, mask)
    torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(back, x, rtol=1e-10, atol=1e-10)


def test_layer_under_autocast_keeps_reference_dtypes():
    """fp32 flow state with bf16 convolutions (CPU autocast): same output dtypes as the reference, same values up
    to the epilogue's rounding (the WN is pinned to the reference path so both see the same bf16 statistics)."""
    from vits_fast.backend import set_module_backend
    from vits_fast.modules import ResidualCouplingLayer

    layer = _randomise(ResidualCouplingLayer(4, 8, 3, 1, 2, mean_only=False), 8).to(DEVICE)
    set_module_backend(layer.enc, "reference")
    x, mask, _ = _inputs(2, 4, 12, [12, 7], 0, 9)
    x, mask = x.float(), mask.float()
    outs = {}
    for name in ("triton", "reference"):
        with torch.autocast(DEVICE, dtype=torch.bfloat16), backend(name):
            outs[name] = layer(x, mask)
    (a, la), (b, lb) = outs["triton"], outs["reference"]
    assert a.dtype == b.dtype and la.dtype == lb.dtype
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(la.float(), lb.float(), rtol=1e-2, atol=1e-2)
