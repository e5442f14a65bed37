"""The whole model on the fused path equals the reference path.

On a CPU the Triton kernels run in the interpreter (slow, so one tiny multi-speaker model); on CUDA the same
check runs on the GPU, and a training forward must not synchronise with the host.
"""

import pytest
import torch

import vits_fast
from vits_fast.config import tiny_model_kwargs

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _model_and_batch(device):
    torch.manual_seed(0)
    model = vits_fast.SynthesizerTrn(**tiny_model_kwargs(num_speakers=3))
    with torch.no_grad():  # zero-initialised flow projections would hide the coupling and spline kernels
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    g = torch.Generator().manual_seed(1)
    x_lengths = torch.tensor([7, 5, 3])
    x = torch.randint(1, 32, (3, 7), generator=g) * (torch.arange(7) < x_lengths[:, None])
    y_lengths = torch.tensor([20, 14, 11])
    y = torch.rand(3, 65, 20, generator=g) * (torch.arange(20) < y_lengths[:, None, None])
    batch = [t.to(device) for t in (x, x_lengths, y, y_lengths, torch.tensor([0, 2, 1]))]
    return model.to(device), batch


def _train_pass(model, batch, name):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)
    x, x_lengths, y, y_lengths, sid = batch
    with vits_fast.backend(name):
        o, l_length, attn, _, _, y_mask, (z, z_p, m_p, logs_p, m_q, logs_q) = model(x, x_lengths, y, y_lengths, sid)
        kl = (logs_p - logs_q - 0.5 + 0.5 * (z_p - m_p) ** 2 * torch.exp(-2 * logs_p)) * y_mask
        loss = o.abs().mean() + l_length.sum() + kl.sum() / y_mask.sum()
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), attn, grads


@pytest.mark.parametrize("device", DEVICES)
def test_training_pass_equals_reference(device):
    model, batch = _model_and_batch(device)
    ref_loss, ref_attn, ref_grads = _train_pass(model, batch, "reference")
    loss, attn, grads = _train_pass(model, batch, "triton")

    assert torch.equal(attn, ref_attn), "the alignment search must give the same path"
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    # every parameter receives a gradient from the loss (the duration predictor's flows included)
    assert len(grads) == sum(1 for _ in model.parameters())
    # fp32 rounding differs between the paths; gradients that are zero in exact arithmetic (e.g. attention
    # key biases, to which softmax is invariant) carry only that rounding, so the absolute floor is set by the
    # largest gradient of the model, not of the tensor.
    floor = 1e-6 * max(g.abs().max().item() for g in ref_grads.values())
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=floor,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_inference_equals_reference(device):
    model, (x, x_lengths, _, _, sid) = _model_and_batch(device)
    model.eval()
    outs = {}
    for name in ("reference", "triton"):
        torch.manual_seed(3)
        with torch.no_grad(), vits_fast.backend(name):
            outs[name] = model.infer(x, x_lengths, sid=sid)
    torch.testing.assert_close(outs["triton"][1], outs["reference"][1])  # same durations / alignment
    torch.testing.assert_close(outs["triton"][0], outs["reference"][0], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_forward_never_synchronises():
    model, batch = _model_and_batch("cuda")
    x, x_lengths, y, y_lengths, sid = batch
    with vits_fast.backend("triton"):
        model(x, x_lengths, y, y_lengths, sid)  # warm-up: compile kernels, allocate
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = model(x, x_lengths, y, y_lengths, sid)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert out[0].is_cuda


def _fused_ops_under_auto(run):
    """The ``vits_fast::`` ops ``run()`` dispatches under backend ``auto``, CPU tensors counting as device tensors
    (what ``auto`` sees on a GPU; the kernels run in the interpreter)."""
    from tests._util import FusedOps
    from vits_fast.backend import host_as_device

    with host_as_device(), FusedOps() as ops:
        out = run()
    return out, {name for name in ops.counts if not name.endswith("_bwd")}


def test_auto_fuses_only_the_families_that_pay_in_training():
    """Training under ``auto``: the alignment search, the splines, the WaveNet stacks and the coupling flows fused,
    the decoder (a small window) on the reference path (``AUTO_FUSED_FROM``), with the reference's loss."""
    model, batch = _model_and_batch("cpu")
    ref_loss, ref_attn, _ = _train_pass(model, batch, "reference")
    (loss, attn, _), fused = _fused_ops_under_auto(lambda: _train_pass(model, batch, "auto"))
    assert fused == {"maximum_path", "rq_spline_coupling", "wn_gate", "wn_res_skip", "wn_out", "affine_coupling"}
    assert torch.equal(attn, ref_attn)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)


def test_auto_fuses_the_decoder_from_its_size_rule(monkeypatch):
    """Synthesis under ``auto`` (no autograd): the splines fused, the flows on the reference path, and a decoder
    call below ``AUTO_FUSED_FROM['hifigan']`` frames (batch x time) on the reference decoder, one at or above it on
    the fused one, with the same audio."""
    import importlib

    B = importlib.import_module("vits_fast.backend")  # the module (vits_fast.backend is the context manager)
    model, (x, x_lengths, _, _, sid) = _model_and_batch("cpu")
    model.eval()

    def infer():
        torch.manual_seed(3)
        with torch.no_grad(), vits_fast.backend("auto"):
            return model.infer(x, x_lengths, sid=sid, noise_scale=0.0, noise_scale_w=0.0)[0]

    small, fused = _fused_ops_under_auto(infer)
    assert fused == {"rq_spline_coupling"}
    monkeypatch.setitem(B.AUTO_FUSED_FROM, "hifigan", (int(x.shape[0]), None))  # one frame per item reaches it
    large, fused = _fused_ops_under_auto(infer)
    assert fused == {"rq_spline_coupling", "hifigan_act", "hifigan_res_act", "hifigan_mrf"}
    torch.testing.assert_close(large, small, rtol=1e-4, atol=1e-5)
