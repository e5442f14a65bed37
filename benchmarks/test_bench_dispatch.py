"""Host time of the fused ops: a chain of fused elementwise ops, forward + backward, on tensors so small that the
host sets the time.

Entries: ``dispatcher`` (every ``vits_fast::`` call through ``torch.library``'s dispatcher, ``VITS_FAST_EAGER_OPS=0``)
and ``eager`` (the default: plain eager calls take ``kernels._common.FusedOp``'s fast path). The subject is
``CALLS`` decoder ops in a row (``hifigan_act`` and ``hifigan_res_act`` alternating, as in a ResBlock) on
``[1, 8, 32]`` and their backward (one ``*_bwd`` op each). On CUDA the kernels take a few microseconds, so the wall
time per call is the host's, launches included. On a CPU the Triton kernels cannot run outside the interpreter, so
there ``launch`` is replaced by a no-op: the entries time the host work around the launches (dispatch, argument
checks, allocation, autograd) and compute on uninitialised memory. ``us_per_op_call`` in the JSON divides the
median by the ``2 x CALLS`` op calls.
"""

from __future__ import annotations

import pytest
import torch

from _bench import DEVICE, ON_CUDA, measure, median_s

IMPLS = ("dispatcher", "eager")
CALLS = 32


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_call_host_time(benchmark, monkeypatch, impl):
    pytest.importorskip("triton")
    from vits_fast.kernels import _common, hifigan

    if not ON_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the kernels accept CPU tensors; nothing launches
        monkeypatch.setattr(hifigan, "launch", lambda *args, **kwargs: None)
    monkeypatch.setattr(_common, "EAGER_OPS", impl == "eager")
    torch.manual_seed(0)
    x0 = torch.randn(1, 8, 32, device=DEVICE, requires_grad=True)
    mask = torch.ones(1, 1, 32, device=DEVICE)

    def step():
        x, xt = x0, x0
        for i in range(CALLS // 2):
            xt = hifigan.hifigan_act(xt, None, mask, 0.1)
            x, xt = hifigan.hifigan_res_act(xt, x, mask, 0.1)
        xt.backward(torch.ones_like(xt))
        x0.grad = None

    launches = "real launches" if ON_CUDA else "launches replaced by a no-op"
    measure(benchmark, step, impl=impl, extra=dict(subject="fused-call-host", launches=launches, op_calls=2 * CALLS),
            group=f"fused-op host time [{CALLS} decoder ops on [1, 8, 32], fwd+bwd, {launches}]")
    t = median_s(benchmark)
    if t is not None:
        benchmark.extra_info["us_per_op_call"] = round(t / (2 * CALLS) * 1e6, 2)
