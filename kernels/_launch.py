"""Launch helpers shared by the kernel files (no kernels here)."""

import torch


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output (tests replace a module's ``_empty`` to NaN-fill outputs)."""
    return torch.empty(shape, dtype=dtype, device=device)


def launch(kernel, grid, ref: torch.Tensor, *args, **kwargs) -> None:
    """Launch ``kernel[grid]`` on ``ref``'s GPU (CPU tensors: the interpreter; no torch.cuda call)."""
    if ref.is_cuda:
        with torch.cuda.device(ref.device):
            kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)
