"""Host-synchronisation audit (:mod:`vits_fast.audit`): the fused training step asks the host for nothing, fused
synthesis only for its output length, and the recorder sees every kind of synchronisation it claims to.

Why real tiny CPU tensors and not fake ones (the audit module's docstring has the detail): a fake tensor cannot
answer a data-dependent read, so the first synchronisation would end the run and hide the rest; ``numpy`` and
``tolist`` have no fake form; and a CPU-only PyTorch cannot run autograd on fake CUDA tensors. The fused path runs
the real custom ops and launchers in Triton's interpreter, and while recording CPU tensors count as device
tensors (``vits_fast.backend.on_host``), so the code takes the branches it takes on a GPU.
"""

import pytest
import torch

from vits_fast import audit
from vits_fast.train import step as step_lib
from vits_fast.train.step import HOST_SYNCS
from tests._util import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _function(site: str) -> str:
    return site.rsplit(" in ", 1)[-1]


def test_recorder_sees_every_kind_of_synchronisation():
    x = torch.tensor([3.0, -1.0, 2.0])
    lengths = torch.tensor([2, 3])
    cases = {
        "scalar read": [lambda: x.sum().item(), lambda: bool(x[0] > 0), lambda: int(lengths.max()),
                        lambda: torch.arange(lengths.max())],
        "tolist": [lambda: x.tolist()],
        "numpy": [lambda: x.numpy()],
        "copy to the CPU": [lambda: x.cpu(), lambda: x.to("cpu")],
        "nonzero": [lambda: torch.nonzero(x)],
        "boolean-mask indexing": [lambda: x[x > 0], lambda: x.clone().index_put_((x > 0,), torch.tensor(0.0))],
        "masked_select": [lambda: torch.masked_select(x, x > 0)],
        "unique": [lambda: torch.unique(lengths)],
        "repeat_interleave without output_size": [lambda: torch.repeat_interleave(lengths)],
    }
    for kind, fns in cases.items():
        for fn in fns:
            with audit.record() as res:
                fn()
            assert [s.kind for s in res.syncs] == [kind], (kind, res.syncs)
    with audit.record() as res, torch.inference_mode():  # a size read inference_mode would otherwise hide
        torch.arange(lengths.max())
    assert [s.kind for s in res.syncs] == ["scalar read"]
    with audit.record() as res:  # device-side work, and a move to another tensor's device: no synchronisation
        y = torch.where(x > 0, x, torch.zeros_like(x)).to(x.device)
        torch.repeat_interleave(lengths, lengths, output_size=5)
        torch.isfinite(y).all()
    assert res.syncs == []
    assert sum(res.ops["-"].values()) >= 4


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_training_step_needs_no_host_synchronisation(precision):
    res = audit.audit_train_step("triton", precision=precision)
    assert res.syncs == [], "host synchronisations in the fused training step:\n" + "\n".join(res.sites())
    # every stage of the step ran and launched work
    for st in ("text_encoder", "posterior_encoder", "flow", "alignment_search", "duration_predictor", "decoder",
               "discriminator", "losses", "backward", "optimizer"):
        assert sum(res.ops[st].values()) > 0, st
    assert any(op.startswith("vits_fast::") for st in res.ops for op in res.ops[st])
    assert all("GradScaler" in k for k in HOST_SYNCS)  # the only listed exception is fp16's, not used here


def test_an_added_synchronisation_is_caught_with_its_line(monkeypatch):
    real_kl = step_lib.kl_loss

    def kl_with_a_read(*args):
        out = real_kl(*args)
        float(out.detach())  # what a careless log line would do
        return out

    monkeypatch.setattr(step_lib, "kl_loss", kl_with_a_read)
    res = audit.audit_train_step("triton")
    assert [(s.kind, _function(s.where), s.stage) for s in res.syncs] == [("scalar read", "train_step", "losses")]
    assert res.syncs[0].where.startswith("vits_fast/train/step.py:")


def test_fused_synthesis_reads_only_its_output_length():
    res = audit.audit_infer("triton")
    assert [(s.kind, _function(s.where), _function(s.via)) for s in res.syncs] == [
        ("scalar read", "sequence_mask", "infer_latent")], "\n".join(res.sites())


def test_reference_path_is_reported_side_by_side():
    fused, ref = audit.audit_infer("triton"), audit.audit_infer("reference")
    assert len(ref.syncs) > len(fused.syncs)
    assert any(s.kind == "boolean-mask indexing" and "spline" in s.where for s in ref.syncs)
    text = audit.format_side_by_side(fused, ref, "infer")
    assert "fused (triton): 1 host synchronisation site(s)" in text
    assert f"reference: {len(ref.syncs)} host synchronisation site(s)" in text
    assert "decoder" in text and "duration_predictor" in text
