"""Fused subjects: WN stack, spline ConvFlow, affine coupling flow; forward, backward and forward+backward. And a
candidate for the discriminators: their (k, 1) 2-D convolutions run as 1-D convolutions (``test_period_layout``).

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

from torch.nn import functional as F

from _bench import BENCH_DTYPES, DEVICE, DTYPES, IMPLS, ON_CUDA, measure, skip_unless_runnable
from vits_fast.models import DiscriminatorP, MultiPeriodDiscriminator
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


def folded_period_forward(disc: DiscriminatorP, x: torch.Tensor):
    """``DiscriminatorP.forward`` (x [b, 1, t] -> (scores [b, n], feature maps)) with every (k, 1) convolution run
    as a 1-D convolution over the frames, the period folded into the batch: the same products and sums
    (bit-identical on this CPU), in a layout cuDNN may serve better. The H200 profile of GPU run 1 ran the 2-D
    convolutions' backward at about a tenth of the 1-D rate (``vits_fast.costmodel.CONV_EFFICIENCY``); this entry
    measures whether the layout is the cause before any model uses it. Weight norm only (Piper's default)."""
    b, c, t = x.shape
    p = disc.period
    if t % p:
        x = F.pad(x, (0, p - t % p), "reflect")
        t = x.shape[-1]
    h = x.view(b, c, t // p, p).permute(0, 3, 1, 2).reshape(b * p, c, t // p)  # [b * p, c, frames]

    def conv(layer, h):
        weight = torch._weight_norm(layer.weight_v, layer.weight_g, 0)[..., 0]  # [out, in, k]
        return F.conv1d(h, weight, layer.bias, stride=layer.stride[0], padding=layer.padding[0])

    def as_2d(h):  # [b * p, ch, frames] -> the module's [b, ch, frames, p]
        return h.view(b, p, h.shape[1], h.shape[2]).permute(0, 2, 3, 1)

    fmap = []
    for layer in disc.convs:
        h = F.leaky_relu(conv(layer, h), disc.LRELU_SLOPE)
        fmap.append(as_2d(h))
    fmap.append(as_2d(conv(disc.conv_post, h)))
    return torch.flatten(fmap[-1], 1, -1), fmap


@pytest.mark.parametrize("impl", ["reference", "folded-conv1d"])
def test_period_layout(benchmark, impl):
    torch.manual_seed(0)
    discs = [d for d in MultiPeriodDiscriminator().to(DEVICE).discriminators if isinstance(d, DiscriminatorP)]
    b, t = PERIOD_SIZES
    x = torch.randn(b, 1, t, device=DEVICE, requires_grad=True)
    forward = (lambda d: d(x)) if impl == "reference" else (lambda d: folded_period_forward(d, x))
    params = [p for d in discs for p in d.parameters()]

    def fn():
        loss = sum(score.square().mean() + sum(f.abs().mean() for f in fmap) for score, fmap in map(forward, discs))
        loss.backward()
        return loss

    # The candidate computes what the module computes: scores, every feature map and the input gradient.
    tol = dict(rtol=1e-2, atol=1e-3) if ON_CUDA else dict(rtol=1e-5, atol=1e-6)  # CUDA: TF32 convolutions
    for d in discs:
        (s_ref, f_ref), (s_new, f_new) = d(x), folded_period_forward(d, x)
        torch.testing.assert_close(s_new, s_ref, **tol)
        for a, r in zip(f_new, f_ref):
            torch.testing.assert_close(a, r, **tol)
    measure(benchmark, fn, group=f"period discriminators fwd+bwd [fp32, B={b}, T={t}]", impl=impl,
            grad_to_none=[x, *params], extra=dict(subject="discriminator", direction="fwd+bwd"))
    assert x.grad is not None and torch.isfinite(x.grad).all()
