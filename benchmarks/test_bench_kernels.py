"""Fused subjects: WN stack, spline ConvFlow, affine coupling flow; forward, backward and forward+backward. And the
period discriminators' fast path (family ``period``, off under ``auto`` until measured): their (k, 1) 2-D
convolutions run as 1-D convolutions (``test_period_layout``).

Shapes (CUDA, Piper-sized): WN = the posterior encoder's ``WN(hidden, 5, 1, 16)`` on ``[32, hidden, 800]``;
spline = one SDP ``ConvFlow(2, hidden, 3, 3)`` on ``[32, 2, 200]`` with ``g [32, hidden, 200]``; coupling = the prior
flow ``ResidualCouplingBlock(inter, hidden, 5, 1, 4)`` on ``[32, inter, 800]``; ragged lengths (3/4 to all of T).
x-low has hidden = inter = 96; medium and high both have 192 (high differs only in the decoder), so ``medium``
stands for both. A CPU runs the same modules on ``B=2`` and 32 steps.

``fwd`` is the training forward (grad enabled, activations saved); ``bwd`` is the backward alone, replayed on a
retained graph; ``fwd+bwd`` both. Each group compares reference / compiled / triton for one shape and direction.
"""

from __future__ import annotations

import pytest
import torch

from _bench import BENCH_DTYPES, DEVICE, DTYPES, IMPLS, ON_CUDA, measure, skip_unless_runnable
from vits_fast.models import DiscriminatorP, MultiPeriodDiscriminator, _period_forward_folded
from vits_fast.profile import Sizes, backward_inputs, make_kernel_case

SUBJECTS = ("wn", "spline", "coupling")
CONFIGS = ("x-low", "medium")
DIRECTIONS = ("fwd", "bwd", "fwd+bwd")

SIZES = {
    True: {"wn": Sizes(32, 0, 800), "spline": Sizes(32, 200, 0), "coupling": Sizes(32, 0, 800)},
    False: {"wn": Sizes(2, 0, 32), "spline": Sizes(2, 32, 0), "coupling": Sizes(2, 0, 32)},
}[ON_CUDA]

# subject -> config -> dtype -> impl -> direction: consecutive entries share one built (and compiled) module.
CASES = [(s, c, d, i, r) for s in SUBJECTS for c in CONFIGS for d in BENCH_DTYPES for i in IMPLS for r in DIRECTIONS]


def _shape(subject: str) -> str:
    sz = SIZES[subject]
    return f"B={sz.batch}, T={sz.text_len if subject == 'spline' else sz.frames}"


@pytest.mark.parametrize("subject,config,dtype,impl,direction", CASES,
                         ids=[f"{s}-{c}-{d}-{i}-{r}" for s, c, d, i, r in CASES])
def test_kernel(benchmark, case_cache, subject, config, dtype, impl, direction):
    skip_unless_runnable(impl, config)
    backend = "triton" if impl == "triton" else "reference"
    case = case_cache.get((subject, config, dtype, impl), lambda: make_kernel_case(
        subject, config, SIZES[subject], DEVICE, backend=backend, dtype=DTYPES[dtype], compile=impl == "compiled"))
    outs, grads = backward_inputs(case.forward())
    assert outs, "the subject must produce differentiable outputs"
    assert all(torch.isfinite(o).all() for o in outs), "non-finite output: the timing would be meaningless"

    if direction == "fwd":
        del outs, grads

        def fn():
            return case.forward()
    elif direction == "bwd":
        def fn():
            case.grads_to_none()
            torch.autograd.backward(outs, grads, retain_graph=True)
    else:
        del outs

        def fn():
            case.grads_to_none()
            torch.autograd.backward([o for o in case.forward() if o.requires_grad], grads)

    group = f"{subject} {direction} [{config}, {dtype}, {_shape(subject)}]"
    measure(benchmark, fn, group=group, impl=impl, grad_to_none=case.params,
            extra=dict(subject=subject, config=config, dtype=dtype, direction=direction, shape=_shape(subject)))
    if direction != "fwd":
        assert any(p.grad is not None for p in case.params), "the backward filled no gradient"
    case.grads_to_none()


# ---- Period discriminators: Piper's 2-D (k, 1) convolutions, or the same convolutions in 1-D --------------------

#: (batch, samples): Piper's training window on CUDA (B=32, segment 8192), a small one on a CPU.
PERIOD_SIZES = (32, 8192) if ON_CUDA else (1, 2048)


@pytest.mark.parametrize("impl", ["reference", "folded-conv1d"])
def test_period_layout(benchmark, impl):
    torch.manual_seed(0)
    discs = [d for d in MultiPeriodDiscriminator().to(DEVICE).discriminators if isinstance(d, DiscriminatorP)]
    b, t = PERIOD_SIZES
    x = torch.randn(b, 1, t, device=DEVICE, requires_grad=True)
    forward = (lambda d: d(x)) if impl == "reference" else (lambda d: _period_forward_folded(d, x))
    params = [p for d in discs for p in d.parameters()]

    def fn():
        loss = sum(score.square().mean() + sum(f.abs().mean() for f in fmap) for score, fmap in map(forward, discs))
        loss.backward()
        return loss

    # The candidate computes what the module computes: scores, every feature map and the input gradient.
    tol = dict(rtol=1e-2, atol=1e-3) if ON_CUDA else dict(rtol=1e-5, atol=1e-6)  # CUDA: TF32 convolutions
    for d in discs:
        (s_ref, f_ref), (s_new, f_new) = d(x), _period_forward_folded(d, x)
        torch.testing.assert_close(s_new, s_ref, **tol)
        for a, r in zip(f_new, f_ref):
            torch.testing.assert_close(a, r, **tol)
    measure(benchmark, fn, group=f"period discriminators fwd+bwd [fp32, B={b}, T={t}]", impl=impl,
            grad_to_none=[x, *params], extra=dict(subject="discriminator", direction="fwd+bwd"))
    assert x.grad is not None and torch.isfinite(x.grad).all()
