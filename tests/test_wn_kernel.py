"""Fused WaveNet kernels (``vits_fast.kernels.wn``) against the reference ``vits_fast.modules.WN``.

Runs on CUDA when present, otherwise on CPU under the Triton interpreter (``TRITON_INTERPRET=1``).

* Every fused run uses NaN-poisoned output buffers (the ``poisoned_outputs`` fixture of ``tests/conftest.py``), so
  an element a kernel does not write fails the comparison; ``FusedOps`` (a ``TorchDispatchMode``) counts the fused
  ops of every fused run, which proves the fused path ran.
* The reference is a float64 copy of the same module on the ``reference`` backend; the tolerance rule is
  ``tests/_numerics.py``, applied to the output and to the gradients of x, g and every parameter
  (``weight_g``, ``weight_v``, ``bias`` of every conv). fp32 is checked per tensor. For bf16/fp16 each tensor
  must stay inside the ``TOL`` cap and the 2x-PyTorch comparison is pooled over all tensors (see
  ``_check_low_precision`` for why a per-tensor ratio is noise).
* The hypothesis test does not shrink (a failing example is printed as found): shrinking under the
  interpreter runs for many minutes.
* ``torch.compile``: on CPU the test compiles with ``fullgraph=True`` through Dynamo and AOTAutograd (the
  same graph capture and fake-tensor tracing Inductor receives; the custom ops must show up in the forward
  and backward graphs) and runs the graphs eagerly. Inductor itself also works on CPU, but it spends
  ~80 s compiling C++ for this module on a two-core machine, beyond this file's time budget; where CUDA
  is present the test uses Inductor.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from tests._numerics import assert_all_match_reference, assert_same_gradients, max_err
from tests._numerics import check_low_precision as _check_low_precision
from tests._util import FusedOps, graph_recorder

from vits_fast.backend import backend, set_module_backend
from vits_fast.kernels import wn
from vits_fast.modules import WN

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # fused path: CUDA, or CPU under the interpreter
LOW = (torch.bfloat16, torch.float16)
MAX_EXAMPLES = 60 if CUDA else 24
pytestmark = pytest.mark.usefixtures("poisoned_outputs")


def _expected_ops(n_layers):
    """Fused ops of one forward + backward of an ``n_layers`` WN stack (counted with ``FusedOps``)."""
    mid = n_layers - 1
    return +Counter(wn_gate=n_layers, wn_gate_bwd=n_layers, wn_res_skip=mid, wn_res_skip_bwd=mid, wn_out=1,
                    wn_out_bwd=1)


def _make_wn(h, kernel_size, dilation_rate, n_layers, gin, p_dropout=0.0, seed=0):
    torch.manual_seed(seed)
    m = WN(h, kernel_size, dilation_rate, n_layers, gin_channels=gin, p_dropout=p_dropout).double()
    with torch.no_grad():  # weight_g away from ||v|| and non-trivial biases
        for name, p in m.named_parameters():
            if name.endswith("weight_g"):
                p.mul_(1.0 + 0.3 * torch.rand_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
    return m.to(DEVICE)


def _clone(m, dtype):
    """A copy of WN ``m`` in ``dtype`` (``copy.deepcopy`` fails once legacy weight norm has run forward)."""
    c = WN(m.hidden_channels, m.kernel_size[0], m.dilation_rate, m.n_layers, gin_channels=m.gin_channels,
           p_dropout=m.p_dropout)
    c.load_state_dict(m.state_dict())
    return c.to(device=DEVICE, dtype=dtype).train(m.training)


def _mask(lengths, t, dtype):
    return (torch.arange(t, device=DEVICE)[None, :] < lengths[:, None]).to(dtype).unsqueeze(1)


def _run(m, name, x, mask, g, gout):
    """Forward + backward of module ``m`` on backend ``name``: (output, {gradient name: tensor})."""
    x = x.detach().requires_grad_(True)
    g = g.detach().requires_grad_(True) if g is not None else None
    m.zero_grad(set_to_none=True)
    with backend(name):
        out = m(x, mask, g)
    (out * gout.to(out.dtype)).sum().backward()
    grads = {"x": x.grad}
    if g is not None:
        grads["g"] = g.grad
    for pname, p in m.named_parameters():
        grads[pname] = p.grad
    return out.detach(), grads


def _check_against_reference(m64, x64, mask64, g64, dtype, gout64):
    ref_out, ref_grads = _run(m64, "reference", x64, mask64, g64, gout64)
    m = _clone(m64, dtype)

    def cast(t):
        return t.to(dtype) if t is not None else None

    with FusedOps() as ops:
        out, grads = _run(m, "triton", cast(x64), cast(mask64), cast(g64), gout64)
    assert ops.counts == _expected_ops(m.n_layers), f"the fused path did not run as expected: {ops.counts}"
    assert out.dtype == dtype
    assert_same_gradients(grads, ref_grads)
    if dtype not in LOW:
        assert_all_match_reference(out, grads, ref_out, ref_grads)
        return
    same_out, same_grads = _run(_clone(m64, dtype), "reference", cast(x64), cast(mask64), cast(g64), gout64)
    _check_low_precision({"output": out, **grads}, {"output": ref_out, **ref_grads},
                         {"output": same_out, **same_grads}, dtype)


@settings(max_examples=MAX_EXAMPLES, phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(
    b=st.integers(1, 4),
    h=st.sampled_from([1, 3, 5, 8, 12]),
    t=st.sampled_from([1, 2, 3, 7, 13, 31, 37]),
    n_layers=st.integers(1, 3),
    kernel_size=st.sampled_from([1, 3, 5]),
    dilation_rate=st.sampled_from([1, 2]),
    gin=st.sampled_from([0, 3]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_wn_matches_reference(b, h, t, n_layers, kernel_size, dilation_rate, gin, dtype, seed, data):
    lengths = torch.tensor(data.draw(st.lists(st.integers(1, t), min_size=b, max_size=b)), device=DEVICE)
    m64 = _make_wn(h, kernel_size, dilation_rate, n_layers, gin, seed=seed)
    x = torch.randn(b, h, t, dtype=torch.float64, device=DEVICE)  # deliberately not masked
    g = torch.randn(b, gin, 1, dtype=torch.float64, device=DEVICE) if gin else None
    gout = torch.randn(b, h, t, dtype=torch.float64, device=DEVICE)
    _check_against_reference(m64, x, _mask(lengths, t, torch.float64), g, dtype, gout)


# ---- named shape grid --------------------------------------------------------------------------------------------
# name -> (batch, hidden, time, lengths, gin). The flat kernels run BLOCK = 1024 elements of H*T per program, the
# conditioned gate backward [4, 128] (channel x time) tiles: each boundary is met below, at and above.
SHAPES = {
    "piper-channels": (1, 192, 9, (9,), 3),  # Piper's hidden size; H*T = 1728: two blocks, H % 4 = 0
    "odd": (3, 3, 7, (7, 1, 4), 3),  # one partial block, one partial channel tile
    "block-1": (2, 11, 93, (93, 50), 0),  # H*T = 1023
    "block/tile": (1, 8, 128, (100,), 3),  # H*T = 1024, T = 128: exactly one block and one time tile
    "block+1": (2, 5, 205, (205, 101), 0),  # H*T = 1025; T = 205 > 128
    "2block+1/2tile+1": (1, 3, 683, (600,), 3),  # H*T = 2049, T = 683: 6 time tiles, H = 3 < 4 channels
}
GRID_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("dtype", GRID_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_wn_shape_grid(shape, dtype):
    """Output and all gradients against float64 at every block/tile boundary (per-dtype rule of _numerics)."""
    b, h, t, lengths, gin = SHAPES[shape]
    m64 = _make_wn(h, 3, 2, 2, gin, seed=len(shape))
    gen = torch.Generator().manual_seed(t)
    x = torch.randn(b, h, t, generator=gen, dtype=torch.float64).to(DEVICE)
    g = torch.randn(b, gin, 1, generator=gen, dtype=torch.float64).to(DEVICE) if gin else None
    gout = torch.randn(b, h, t, generator=gen, dtype=torch.float64).to(DEVICE)
    mask = _mask(torch.tensor(lengths, device=DEVICE), t, torch.float64)
    _check_against_reference(m64, x, mask, g, dtype, gout)


@pytest.mark.parametrize("gin", [0, 4])
def test_wn_float64_is_exact(gin):
    """In fp64 the kernels compute in fp64: agreement to rounding, a sharp check of every formula."""
    m = _make_wn(7, 3, 2, 4, gin, seed=1)
    x = torch.randn(3, 7, 19, dtype=torch.float64, device=DEVICE)
    mask = _mask(torch.tensor([19, 11, 1], device=DEVICE), 19, torch.float64)
    g = torch.randn(3, gin, 1, dtype=torch.float64, device=DEVICE) if gin else None
    gout = torch.randn(3, 7, 19, dtype=torch.float64, device=DEVICE)
    ref, ref_grads = _run(m, "reference", x, mask, g, gout)
    out, grads = _run(m, "triton", x, mask, g, gout)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-11, atol=1e-12, msg=lambda s: f"d{k}: {s}")


@pytest.mark.parametrize("training", [True, False])
def test_wn_dropout_follows_reference(training):
    """p_dropout > 0: the same dropout masks as the reference (same random stream), not silently skipped."""
    m = _make_wn(6, 3, 1, 3, 0, p_dropout=0.4, seed=2).train(training)
    x = torch.randn(2, 6, 23, dtype=torch.float64, device=DEVICE)
    mask = _mask(torch.tensor([23, 9], device=DEVICE), 23, torch.float64)
    gout = torch.randn(2, 6, 23, dtype=torch.float64, device=DEVICE)
    torch.manual_seed(123)
    ref, ref_grads = _run(m, "reference", x, mask, None, gout)
    torch.manual_seed(123)
    out, grads = _run(m, "triton", x, mask, None, gout)
    torch.manual_seed(124)
    other, _ = _run(m, "reference", x, mask, None, gout)
    assert training == (max_err(other, ref) > 1e-3), "dropout must change the output in training only"
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-11, atol=1e-12)


def test_wn_autocast_mixed_dtypes():
    """Under autocast the stream (x, skip sum, mask) stays fp32 while conv outputs are bf16."""
    m64 = _make_wn(5, 5, 2, 3, 3, seed=3)
    b, t = 3, 29
    x = torch.randn(b, 5, t, dtype=torch.float64, device=DEVICE)
    mask = _mask(torch.tensor([29, 17, 4], device=DEVICE), t, torch.float64)
    g = torch.randn(b, 3, 1, dtype=torch.float64, device=DEVICE)
    gout = torch.randn(b, 5, t, dtype=torch.float64, device=DEVICE)
    ref, ref_grads = _run(m64, "reference", x, mask, g, gout)
    m32 = _clone(m64, torch.float32)
    x32, mask32, g32 = x.float(), mask.float(), g.float()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        with FusedOps() as ops:
            out, grads = _run(m32, "triton", x32, mask32, g32, gout)
        same, same_grads = _run(_clone(m64, torch.float32), "reference", x32, mask32, g32, gout)
    assert ops.counts == _expected_ops(3), ops.counts
    assert out.dtype == torch.float32
    _check_low_precision({"output": out, **grads}, {"output": ref, **ref_grads}, {"output": same, **same_grads},
                         torch.bfloat16)


def test_wn_time_varying_conditioning():
    """A conditioning input with a time axis ([b, gin, t]) is broadcast-added like the reference does."""
    m = _make_wn(4, 3, 2, 2, 3, seed=4)
    x = torch.randn(2, 4, 9, dtype=torch.float64, device=DEVICE)
    mask = _mask(torch.tensor([9, 5], device=DEVICE), 9, torch.float64)
    g = torch.randn(2, 3, 9, dtype=torch.float64, device=DEVICE)
    gout = torch.randn(2, 4, 9, dtype=torch.float64, device=DEVICE)
    ref, ref_grads = _run(m, "reference", x, mask, g, gout)
    out, grads = _run(m, "triton", x, mask, g, gout)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-11, atol=1e-12)


def test_wn_bool_and_broadcast_mask():
    m = _make_wn(3, 3, 1, 3, 0, seed=5)
    x = torch.randn(2, 3, 8, dtype=torch.float64, device=DEVICE)
    gout = torch.randn(2, 3, 8, dtype=torch.float64, device=DEVICE)
    for mask in (_mask(torch.tensor([8, 3], device=DEVICE), 8, torch.bool),
                 _mask(torch.tensor([5], device=DEVICE), 8, torch.float64)):  # [1, 1, t] for both items
        ref, ref_grads = _run(m, "reference", x, mask, None, gout)
        out, grads = _run(m, "triton", x, mask, None, gout)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        for k in ref_grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-11, atol=1e-12)


# ---- the custom ops on their own ---------------------------------------------------------------------------------


def _t(*shape, dtype=torch.float64, grad=True):
    return torch.randn(*shape, dtype=dtype, device=DEVICE).requires_grad_(grad)


def _mask_t(b, t, dtype=torch.float64, grad=False):
    m = (torch.rand(b, 1, t, device=DEVICE) > 0.3).to(dtype)
    return (m + 0.5 * torch.rand_like(m)).requires_grad_(grad) if grad else m


def test_gradcheck_ops():
    """Finite differences in fp64 for every op, including the rarely used gradient of the mask."""
    b, h, t = 2, 2, 3
    g_full = _t(b, 4 * h, 1)
    checks = [
        (lambda xi: wn.wn_gate(xi, None), (_t(b, 2 * h, t),)),
        (lambda xi, gg: wn.wn_gate(xi, gg[:, 2 * h:]), (_t(b, 2 * h, t), g_full)),  # strided slice of g
        (lambda x, rs, m: wn.wn_res_skip(x, rs, None, m), (_t(b, h, t), _t(b, 2 * h, t), _mask_t(b, t, grad=True))),
        (wn.wn_res_skip, (_t(b, h, t), _t(b, 2 * h, t), _t(b, h, t), _mask_t(b, t, grad=True))),
        (lambda rs, m: wn.wn_out(rs, None, m), (_t(b, h, t), _mask_t(b, t, grad=True))),
        (wn.wn_out, (_t(b, h, t), _t(b, h, t), _mask_t(1, t, grad=True))),  # mask broadcast over batch
    ]
    for fn, args in checks:
        assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-8, fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_outputs_are_rounded_once(dtype):
    """bf16/fp16 results are the fp32 results rounded once to nearest-even (math in fp32, one rounding)."""
    b, h, t = 3, 5, 37
    xi, acts_grad = _t(b, 2 * h, t, dtype=dtype, grad=False), _t(b, h, t, dtype=dtype, grad=False)
    g = _t(b, 4 * h, 1, dtype=dtype, grad=False)[:, 2 * h:]
    x, rs, skip = (_t(b, h, t, dtype=dtype, grad=False), _t(b, 2 * h, t, dtype=dtype, grad=False),
                   _t(b, h, t, dtype=dtype, grad=False))
    mask = _mask_t(b, t, dtype)
    runs = [
        lambda *a: (wn.wn_gate(*a),), (xi, g),
        lambda *a: wn.wn_gate_bwd(*a), (acts_grad, xi, g),
        lambda *a: wn.wn_gate_bwd(*a)[:1], (acts_grad, xi, None),
        lambda *a: wn.wn_res_skip(*a), (x, rs, skip, mask),
        lambda *a: (wn.wn_out(*a),), (rs[:, :h], skip, mask),
    ]
    for fn, args in zip(runs[::2], runs[1::2]):
        low = fn(*args)
        high = fn(*[a.float() if isinstance(a, torch.Tensor) else a for a in args])
        for lo, hi in zip(low, high):
            assert lo.dtype == dtype
            torch.testing.assert_close(lo, hi.to(dtype), rtol=0, atol=0)


def _opcheck_samples():
    b, h, t = 2, 3, 5
    f32 = dict(dtype=torch.float32, grad=True)
    g_full = _t(b, 4 * h, 1, **f32)
    mask = _mask_t(b, t, torch.float32)
    # the *_bwd ops run inside backward only (no double backward): their inputs do not require grad
    c = dict(dtype=torch.float32, grad=False)
    g_const = _t(b, 4 * h, 1, **c)
    return [
        ("gate", wn.wn_gate, (_t(b, 2 * h, t, **f32), None)),
        ("gate cond", wn.wn_gate, (_t(b, 2 * h, t, **f32), g_full[:, 2 * h:])),
        ("gate bf16", wn.wn_gate, (_t(b, 2 * h, t, dtype=torch.bfloat16), _t(b, 2 * h, 1, dtype=torch.bfloat16))),
        ("gate bwd", wn.wn_gate_bwd, (_t(b, h, t, **c), _t(b, 2 * h, t, **c), None)),
        ("gate cond bwd", wn.wn_gate_bwd, (_t(b, h, t, **c), _t(b, 2 * h, t, **c), g_const[:, :2 * h])),
        ("res/skip first", wn.wn_res_skip, (_t(b, h, t, **f32), _t(b, 2 * h, t, **f32), None, mask)),
        ("res/skip", wn.wn_res_skip, (_t(b, h, t, **f32), _t(b, 2 * h, t, **f32), _t(b, h, t, **f32), mask)),
        ("res/skip mixed", wn.wn_res_skip, (_t(b, h, t, **f32), _t(b, 2 * h, t, dtype=torch.bfloat16),
                                            _t(b, h, t, **f32), mask)),
        ("res/skip bwd", wn.wn_res_skip_bwd, (_t(b, h, t, **c), _t(b, h, t, **c), mask, torch.float32,
                                              torch.bfloat16)),
        ("out", wn.wn_out, (_t(b, h, t, **f32), _t(b, h, t, **f32), mask)),
        ("out single layer", wn.wn_out, (_t(b, h, t, **f32), None, mask)),
        ("out bwd", wn.wn_out_bwd, (_t(b, h, t, **c), mask)),
    ]


@pytest.mark.parametrize("idx", range(len(_opcheck_samples())), ids=[s[0] for s in _opcheck_samples()])
def test_opcheck(idx):
    _, op, args = _opcheck_samples()[idx]
    # all four checks apply: schema, autograd registration, fake tensors, AOT dispatch (static and dynamic)
    torch.library.opcheck(op, args)


def test_ops_reject_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        wn.wn_gate(torch.randn(1, 2, 3), None)


# ---- torch.compile --------------------------------------------------------------------------------------------


def test_torch_compile_fullgraph():
    if CUDA:  # Dynamo's graph goes to Inductor
        graphs = {"dynamo": []}

        def compile_backend(gm, example_inputs):
            from torch._inductor.compile_fx import compile_fx

            graphs["dynamo"].append(str(gm.graph))
            return compile_fx(gm, example_inputs)
    else:  # Dynamo + AOTAutograd, graphs run eagerly (see the module docstring)
        compile_backend, graphs = graph_recorder()
    torch._dynamo.reset()
    m = _make_wn(5, 3, 2, 3, 4, seed=6).float()
    set_module_backend(m, "triton")
    x = torch.randn(2, 5, 11, device=DEVICE)
    mask = _mask(torch.tensor([11, 6], device=DEVICE), 11, torch.float32)
    g = torch.randn(2, 4, 1, device=DEVICE)
    gout = torch.randn(2, 5, 11, device=DEVICE)
    eager, eager_grads = _run(m, "triton", x, mask, g, gout)
    compiled = torch.compile(m, fullgraph=True, backend=compile_backend)
    out, grads = _run(compiled, "triton", x, mask, g, gout)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    grads = {k.replace("_orig_mod.", ""): v for k, v in grads.items()}  # OptimizedModule prefixes names
    assert set(grads) == set(eager_grads)
    for k in eager_grads:
        torch.testing.assert_close(grads[k], eager_grads[k], rtol=1e-5, atol=1e-6, msg=lambda s: f"d{k}: {s}")
    # one graph (no break, no recompile) holding the fused ops, forward and (on CPU, visible there) backward
    fw = graphs["dynamo"] if CUDA else graphs["fw"]
    assert len(fw) == 1, f"{len(fw)} forward graphs: graph break or recompilation"
    for op in ("wn_gate", "wn_res_skip", "wn_out"):
        assert f"vits_fast.{op}" in fw[0], f"{op} missing from the forward graph"
        if not CUDA:
            assert f"vits_fast.{op}_bwd" in "\n".join(graphs["bw"]), f"{op}_bwd missing from the backward graph"
