"""Fused subjects: WN stack, spline ConvFlow, affine coupling flow; forward, backward and forward+backward.

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
