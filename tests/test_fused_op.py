"""The eager fast path of the ``vits_fast::`` custom ops (``kernels._common.FusedOp``).

A plain eager call runs the op's own forward, setup and backward as a ``torch.autograd.Function`` (or directly
without autograd) instead of going through ``torch.library``'s dispatcher. It must compute exactly what the
dispatcher path computes, and step aside wherever the dispatcher is needed.
"""

from __future__ import annotations

import pytest
import torch

from tests._util import FusedOps
from vits_fast.kernels import _common, coupling, hifigan, wn


def _grad_fn_name(t: torch.Tensor) -> str:
    return type(t.grad_fn).__name__


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    b, c, t = 2, 3, 37
    mask = (torch.arange(t) < torch.tensor([t, 29])[:, None]).float()[:, None]
    return dict(
        x=torch.randn(b, c, t, generator=g), y=torch.randn(b, c, t, generator=g),
        acc=torch.randn(b, c, t, generator=g), bias=torch.randn(b, c, 1, generator=g),
        gate=torch.randn(b, 2 * c, t, generator=g), flow=torch.randn(b, 2 * c, t, generator=g),
        stats=torch.randn(b, c, t, generator=g), mask=mask)


# (name, op, argument builder from _inputs, indices of the differentiable arguments)
CASES = [
    ("hifigan_act", hifigan.hifigan_act, lambda d: (d["x"], d["bias"], d["mask"], 0.1), (0, 1)),
    ("hifigan_res_act", hifigan.hifigan_res_act, lambda d: (d["y"], d["x"], d["mask"], 0.1), (0, 1)),
    ("hifigan_mrf", hifigan.hifigan_mrf, lambda d: (d["y"], d["x"], d["acc"], d["mask"], 3, 0.01), (0, 1, 2)),
    ("wn_gate", wn.wn_gate, lambda d: (d["gate"], None), (0,)),
    ("affine_coupling", coupling.affine_coupling,
     lambda d: (d["flow"], d["stats"], d["mask"], False, True, True), (0, 1)),
]


def _run(op, build, diff, seed):
    args = list(build(_inputs(seed)))
    for i in diff:
        args[i] = args[i].clone().requires_grad_(True)
    out = op(*args)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed + 1)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
    grads = torch.autograd.grad(loss, [args[i] for i in diff])
    return outs, grads


@pytest.mark.parametrize("name,op,build,diff", CASES, ids=[c[0] for c in CASES])
def test_fast_path_equals_the_dispatcher(monkeypatch, name, op, build, diff):
    fast_outs, fast_grads = _run(op, build, diff, seed=3)
    assert "_eager" in _grad_fn_name(fast_outs[0]), "a plain eager call must take the fast path"
    monkeypatch.setattr(_common, "EAGER_OPS", False)
    outs, grads = _run(op, build, diff, seed=3)
    assert "_eager" not in _grad_fn_name(outs[0])
    for a, b in zip(fast_outs + fast_grads, outs + grads):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_no_grad_calls_run_directly_and_match():
    d = _inputs(5)
    with torch.no_grad():
        out = hifigan.hifigan_act(d["x"].requires_grad_(True), None, d["mask"], 0.2)
    assert out.grad_fn is None
    with FusedOps() as ops:  # a dispatch mode: the call goes through the dispatcher
        ref = hifigan.hifigan_act(d["x"].detach(), None, d["mask"], 0.2)
    assert ops.counts["hifigan_act"] == 1
    assert torch.equal(out, ref)


def test_profiler_and_modes_see_the_custom_op():
    d = _inputs(7)
    x = d["x"].requires_grad_(True)
    with torch.profiler.profile() as prof:
        out = hifigan.hifigan_act(x, None, d["mask"], 0.1)
    assert "_eager" not in _grad_fn_name(out)
    assert any(e.name == "vits_fast::hifigan_act" for e in prof.events())
    with FusedOps() as ops:
        out = hifigan.hifigan_act(x, None, d["mask"], 0.1)
        out.sum().backward()
    assert ops.counts["hifigan_act"] == 1 and ops.counts["hifigan_act_bwd"] == 1


def test_double_backward_is_refused_on_both_paths(monkeypatch):
    """The ops have no second derivative: the fast path must raise as the dispatcher does, not return a gradient
    that treats the first one as a constant."""
    for eager in (True, False):
        monkeypatch.setattr(_common, "EAGER_OPS", eager)
        d = _inputs(11)
        x = d["x"].requires_grad_(True)
        out = hifigan.hifigan_act(x, None, d["mask"], 0.1)
        (gx,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError):
            torch.autograd.grad(gx.sum(), x)


@pytest.mark.parametrize("name,op,build,diff", [CASES[0], CASES[3]], ids=[CASES[0][0], CASES[3][0]])
def test_fast_path_equals_the_dispatcher_under_autocast(monkeypatch, name, op, build, diff):
    """bf16 autocast: the custom op is not cast by autocast on either path, and its inner ops see the same state."""
    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _run(op, lambda d: tuple(a.bfloat16() if isinstance(a, torch.Tensor) and i == 0 else a
                                            for i, a in enumerate(build(d))), diff, seed=13)
    fast_outs, fast_grads = run()
    monkeypatch.setattr(_common, "EAGER_OPS", False)
    outs, grads = run()
    for a, b in zip(fast_outs + fast_grads, outs + grads):
        assert a.dtype == b.dtype and torch.equal(a, b)
