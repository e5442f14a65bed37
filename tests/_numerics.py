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
