"""Convergence: several full training steps (:func:`vits_fast.train.step.train_step`: generator, discriminator, both
fused AdamW updates) of the tiny model on the fused path and on the reference path give the same losses and the
same parameters, within tolerances that only fp32 rounding explains.

Both runs start from the same weights, the same synthetic batches and the same random seed (the fused path draws
its noise and window starts on the tensors' device, which is the CPU here, so the draws coincide). On a CPU the
fused kernels run in Triton's interpreter; on CUDA the same check runs on the GPU.

Tolerances: the paths differ by fp32 rounding only. Measured on a CPU here (6 steps, lr 2e-4): worst loss
relative difference 1.0e-6, worst parameter difference 1.1e-6, except the attention key biases: softmax is
invariant to them, so their exact gradient is zero and Adam turns the two paths' rounding noise into full-size
steps of opposite signs (1.5e-3 apart after 6 steps). For those the bound is Adam's own, lr per step.
"""

import pytest
import torch

from vits_fast.profile import Sizes, TrainStep
from vits_fast.train.step import losses_of
from tests._util import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
STEPS = 6


def _run(backend: str, device: str):
    torch.manual_seed(0)
    step = TrainStep("tiny", Sizes(2, 6, 20), torch.device(device), backend=backend, seed=0)
    with torch.no_grad():  # zero-initialised flow projections would leave the fused flow kernels idle
        g = torch.Generator().manual_seed(3)
        for p in step.model_g.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p) * 0.05)
    history = []
    torch.manual_seed(1)
    for _ in range(STEPS):
        losses, finite = losses_of(step())
        assert finite, losses
        history.append(losses)
    params = {n: p.detach().clone() for n, p in step.model_g.named_parameters()}
    params.update({f"d.{n}": p.detach().clone() for n, p in step.model_d.named_parameters()})
    return history, params


@pytest.mark.parametrize("device", DEVICES)
def test_fused_and_reference_training_converge_alike(device):
    ref_hist, ref_params = _run("reference", device)
    hist, params = _run("triton", device)
    assert [h.keys() for h in hist] == [h.keys() for h in ref_hist]
    for k, (h, r) in enumerate(zip(hist, ref_hist)):
        for name, value in r.items():
            assert h[name] == pytest.approx(value, rel=2e-4, abs=1e-5), (k, name, h[name], value)
    # the run learned something (the losses moved), so equal parameters are not equal starting points
    assert hist[-1]["loss_mel"] != hist[0]["loss_mel"]
    lr = 2e-4  # TrainStep's
    for name, ref in ref_params.items():
        if name.endswith("conv_k.bias"):  # zero exact gradient (see the module doc): Adam's step bound
            assert float((params[name] - ref).abs().max()) <= 2 * lr * STEPS, name
        else:
            torch.testing.assert_close(params[name], ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
