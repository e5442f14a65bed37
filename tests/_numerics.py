"""The project's tolerance rule, shared by every kernel test.

* fp64/fp32 outputs are compared with the float64 reference at fixed tolerances.
* bf16/fp16 outputs may be at most ``LOW_PRECISION_FACTOR`` times as far from the float64 reference as the
  same computation done by PyTorch in that dtype (plus a tiny absolute floor), and never beyond ``TOL``.
"""

from __future__ import annotations

import torch

# dtype -> (rtol, atol) against the float64 reference
TOL = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (1e-2, 1e-2),
}
LOW_PRECISION_FACTOR = 2.0


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN so that any element a kernel forgets to write fails the comparison."""
    return t.fill_(float("nan"))


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def assert_matches_reference(out: torch.Tensor, ref64: torch.Tensor, torch_same_dtype: torch.Tensor | None = None,
                             name: str = "output") -> None:
    """Check ``out`` (any dtype) against the float64 reference ``ref64`` with the rule above.

    ``torch_same_dtype`` is PyTorch's own result in ``out.dtype``; required for bf16/fp16.
    """
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (an element was not written?)"
    rtol, atol = TOL[out.dtype]
    if out.dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(out.double(), ref64.double(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
        return
    assert torch_same_dtype is not None, "low-precision checks need PyTorch's same-dtype result"
    err, base = max_err(out, ref64), max_err(torch_same_dtype, ref64)
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    bound = min(LOW_PRECISION_FACTOR * base + 1e-3 * max(scale, 1e-3), atol + rtol * scale)
    bound = max(bound, LOW_PRECISION_FACTOR * base)
    assert err <= bound, f"{name}: {out.dtype} error {err:.3g} > bound {bound:.3g} (PyTorch's own: {base:.3g})"


def assert_same_gradients(grads: dict, ref_grads: dict) -> None:
    """The fused run produced a gradient for exactly the inputs the reference did, none of them missing."""
    assert set(grads) == set(ref_grads)
    assert all(v is not None for v in grads.values()), [k for k, v in grads.items() if v is None]


def assert_all_match_reference(out: torch.Tensor, grads: dict, ref_out: torch.Tensor, ref_grads: dict) -> None:
    """Output and every gradient of an fp32/fp64 fused run against the float64 reference run."""
    assert_matches_reference(out, ref_out, name="output")
    for k, ref in ref_grads.items():
        assert_matches_reference(grads[k], ref, name=f"d{k}")


def check_low_precision(ours: dict, ref64: dict, same: dict, precision: torch.dtype,
                        unpooled: tuple = ()) -> None:
    """The bf16/fp16 tolerance rule, pooled over the output and all gradients.

    ``precision`` is the low-precision dtype the computation ran in (the tensors may be fp32 under autocast).
    Each tensor must be finite and inside the absolute ``TOL`` cap (this catches wrong or unwritten
    elements), widened to 2x the rule's factor where PyTorch's own error already comes near it (bf16
    gradients of ``weight_g`` are reductions with cancellation: PyTorch itself reaches ~2 % of their
    scale). The "at most 2x PyTorch's same-dtype error" comparison is made on the worst error relative
    to each tensor's scale, over all tensors together: per tensor it is a ratio of two rounding noises,
    which for small tensors (a 2-element bias gradient, a [1, 1, 1] output) swings past 2x in both
    directions between two equally exact computations. Tensors whose name ends with one of ``unpooled`` get
    only the per-tensor cap (for reductions whose rounding noise is as large as their result).
    """
    rtol, atol = TOL[precision]
    worst, worst_same = 0.0, 0.0
    for k, r in ref64.items():
        a = ours[k]
        assert a.dtype == same[k].dtype, f"{k}: dtype {a.dtype}, PyTorch gives {same[k].dtype}"
        assert torch.isfinite(a).all(), f"{k}: non-finite values"
        scale = max(r.abs().max().item(), 1e-6)
        err, base = max_err(a, r), max_err(same[k], r)
        cap = max(atol + rtol * scale, 2 * LOW_PRECISION_FACTOR * base)
        assert err <= cap, f"{k}: {a.dtype} error {err:.3g} > {cap:.3g} (scale {scale:.3g}, PyTorch's {base:.3g})"
        if not k.endswith(tuple(unpooled)):
            worst, worst_same = max(worst, err / scale), max(worst_same, base / scale)
    assert worst <= LOW_PRECISION_FACTOR * worst_same + 1e-3, (
        f"worst relative error {worst:.3g} > {LOW_PRECISION_FACTOR} x PyTorch's {worst_same:.3g}")
