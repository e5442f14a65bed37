"""Monotonic alignment search (``maximum_path``) for VITS/Piper, on the CPU or the GPU.

Layout as in VITS: scores ``neg_cent`` ``[b, t_y, t_x]`` (frames by text positions, text axis contiguous).
The result is the 0/1 path of the best monotonic alignment of each item: every frame sits on exactly one text
position, the text index never decreases and steps by at most one per frame, starting at ``(0, 0)`` and ending
at ``(t_y - 1, t_x - 1)``; cells outside an item's lengths are zero.

Implementations (all bit-identical, upstream Piper/VITS semantics including its tie-breaking):

* the Cython extension ``core`` (OpenMP over the batch, no GIL), built by ``pip install``;
* a NumPy fallback, used automatically with one warning per process when the extension is not importable;
* a Triton kernel (``vits_fast.kernels.mas``) chosen by the backend switch for CUDA tensors, which never
  synchronises with the host.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ._numpy import maximum_path_numpy, valid_items

try:
    from .core import maximum_path_c
except ImportError as _exc:  # extension not built: NumPy fallback
    maximum_path_c = None
    _CORE_IMPORT_ERROR: Optional[BaseException] = _exc
else:
    _CORE_IMPORT_ERROR = None

__all__ = [
    "MonotonicAlignWarning",
    "has_cython",
    "maximum_path",
    "maximum_path_c",
    "maximum_path_cpu",
    "maximum_path_lengths",
    "maximum_path_numpy",
]

Lengths = Union[torch.Tensor, Sequence[int], np.ndarray, None]


class MonotonicAlignWarning(UserWarning):
    """Alignment-search notices: the NumPy fallback is in use, or items have more text than frames."""


_fallback_warned = False


def has_cython() -> bool:
    """True when the compiled Cython extension is importable."""
    return maximum_path_c is not None


def maximum_path_cpu(values: np.ndarray, t_ys: np.ndarray, t_xs: np.ndarray,
                     implementation: str = "auto") -> np.ndarray:
    """Low-level CPU search on NumPy arrays.

    Args:
        values: ``[b, t_y_max, t_x_max]`` scores (converted to C-contiguous float32; never modified).
        t_ys: ``[b]`` frame counts. t_xs: ``[b]`` text lengths.
        implementation: ``"auto"`` (Cython when built, else NumPy with a one-time warning), ``"cython"`` or
            ``"numpy"``.

    Returns:
        int32 ``[b, t_y_max, t_x_max]`` 0/1 path. Items outside ``1 <= t_x <= t_y`` (or longer than the array)
        get all zeros.
    """
    global _fallback_warned
    if implementation not in ("auto", "cython", "numpy"):
        raise ValueError(f"implementation must be 'auto', 'cython' or 'numpy', got {implementation!r}")
    values = np.ascontiguousarray(values, dtype=np.float32)
    if values.ndim != 3:
        raise ValueError(f"values must be 3-D [b, t_y, t_x], got shape {values.shape}")
    t_ys = np.ascontiguousarray(t_ys, dtype=np.int32)
    t_xs = np.ascontiguousarray(t_xs, dtype=np.int32)
    paths = np.empty(values.shape, dtype=np.int32)
    use_c = implementation == "cython" or (implementation == "auto" and maximum_path_c is not None)
    if use_c:
        if maximum_path_c is None:
            raise RuntimeError(f"the Cython extension is not built: {_CORE_IMPORT_ERROR}")
        maximum_path_c(paths, values, t_ys, t_xs)
        return paths
    if implementation == "auto" and not _fallback_warned:
        _fallback_warned = True
        warnings.warn(
            "vits_fast.monotonic_align: the Cython extension is not built "
            f"({_CORE_IMPORT_ERROR}); using the slower NumPy fallback. Reinstall with a C compiler and Cython "
            "to build it.", MonotonicAlignWarning, stacklevel=3)
    maximum_path_numpy(paths, values, t_ys, t_xs)
    return paths


def _lengths_tensor(name: str, value: Lengths, b: int) -> Optional[torch.Tensor]:
    """``value`` as an integer tensor ``[b]`` (on its own device), or None."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        arr = np.asarray(value)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integers, got {arr.dtype}")
        value = torch.as_tensor(arr.astype(np.int64))
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    if value.dim() != 1 or value.shape[0] != b:
        raise ValueError(f"{name} must have shape [{b}] (one length per batch item of neg_cent), "
                         f"got {tuple(value.shape)}")
    return value


def _check_host_lengths(t_xs: np.ndarray, t_ys: np.ndarray, t_x_max: int, t_y_max: int,
                        x_name: str, y_name: str) -> None:
    """Raise for zero/negative lengths and lengths beyond ``neg_cent``; warn for items with t_x > t_y."""
    for name, lens, limit, dim in ((x_name, t_xs, t_x_max, "text dimension neg_cent.shape[2]"),
                                   (y_name, t_ys, t_y_max, "frame dimension neg_cent.shape[1]")):
        bad = np.flatnonzero(lens < 1)
        if bad.size:
            raise ValueError(f"{name} must be positive: item {int(bad[0])} has length {int(lens[bad[0]])}")
        bad = np.flatnonzero(lens > limit)
        if bad.size:
            raise ValueError(f"{name}: item {int(bad[0])} has length {int(lens[bad[0]])}, longer than the "
                             f"{dim} = {limit}")
    long_text = np.flatnonzero(t_xs > t_ys)
    if long_text.size:
        warnings.warn(
            f"maximum_path: items {long_text.tolist()} have more text positions than frames (t_x > t_y); no "
            "monotonic path covers every text position, so their path is all zero", MonotonicAlignWarning,
            stacklevel=4)


def _validate(neg_cent, mask, x_lengths, y_lengths):
    if not isinstance(neg_cent, torch.Tensor):
        raise TypeError(f"neg_cent must be a torch.Tensor, got {type(neg_cent).__name__}")
    if neg_cent.dim() != 3:
        raise ValueError(f"neg_cent must be 3-D [b, t_y, t_x], got shape {tuple(neg_cent.shape)}")
    if not neg_cent.is_floating_point():
        raise TypeError(f"neg_cent must be a floating tensor, got {neg_cent.dtype}")
    b = neg_cent.shape[0]
    if mask is not None:
        if x_lengths is not None or y_lengths is not None:
            raise ValueError("pass either mask or x_lengths/y_lengths, not both")
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.shape != neg_cent.shape:
            raise ValueError(f"mask must have neg_cent's shape {tuple(neg_cent.shape)}, got {tuple(mask.shape)}")
    return _lengths_tensor("x_lengths", x_lengths, b), _lengths_tensor("y_lengths", y_lengths, b)


def _maximum_path(neg_cent, mask, x_lengths, y_lengths, return_durations):
    x_len, y_len = _validate(neg_cent, mask, x_lengths, y_lengths)
    b, t_y_max, t_x_max = neg_cent.shape
    device, dtype = neg_cent.device, neg_cent.dtype
    x_name, y_name = ("mask", "mask") if mask is not None else ("x_lengths", "y_lengths")

    from ..backend import current_backend, on_host, use_triton

    on_triton = use_triton(neg_cent, family="mas")
    if on_triton:
        from ..kernels import mas

        try:
            mas.check_sizes(neg_cent)
        except ValueError:
            if current_backend() != "auto":
                raise
            on_triton = False  # auto: sizes beyond the kernel fall back to the CPU search

    if b == 0:
        path = torch.zeros(neg_cent.shape, dtype=dtype, device=device)
        return (path, path.sum(1)) if return_durations else path

    if on_triton:
        # Lengths stay on the device. Lengths (or a mask) on the host are checked there, which needs no sync.
        if mask is not None:
            m = mask.detach()
            x_len = (m[:, 0, :] != 0).sum(1, dtype=torch.int32)
            y_len = (m[:, :, 0] != 0).sum(1, dtype=torch.int32)
        if all(on_host(t) for t in (x_len, y_len) if t is not None):
            xs = x_len.numpy().astype(np.int64) if x_len is not None else np.full(b, t_x_max)
            ys = y_len.numpy().astype(np.int64) if y_len is not None else np.full(b, t_y_max)
            _check_host_lengths(xs, ys, t_x_max, t_y_max, x_name, y_name)
        x_len = (torch.full((b,), t_x_max, dtype=torch.int32, device=device) if x_len is None
                 else x_len.to(device, non_blocking=True))
        y_len = (torch.full((b,), t_y_max, dtype=torch.int32, device=device) if y_len is None
                 else y_len.to(device, non_blocking=True))
        path, dur = mas.maximum_path_triton(neg_cent.detach(), x_len, y_len)
        return (path, dur) if return_durations else path

    # CPU search (copies to the host when neg_cent lives on a GPU).
    if mask is not None:
        m = mask.detach()
        xs = (m[:, 0, :] != 0).sum(1).cpu().numpy()
        ys = (m[:, :, 0] != 0).sum(1).cpu().numpy()
    else:
        xs = x_len.cpu().numpy() if x_len is not None else np.full(b, t_x_max)
        ys = y_len.cpu().numpy() if y_len is not None else np.full(b, t_y_max)
    xs = xs.astype(np.int64)
    ys = ys.astype(np.int64)
    _check_host_lengths(xs, ys, t_x_max, t_y_max, x_name, y_name)
    values = neg_cent.detach().to("cpu", torch.float32).contiguous().numpy()
    path_np = maximum_path_cpu(values, ys, xs)
    path = torch.from_numpy(path_np).to(device=device, dtype=dtype)
    if not return_durations:
        return path
    dur = torch.from_numpy(path_np.sum(1, dtype=np.int64)).to(device=device, dtype=dtype)
    return path, dur


def maximum_path(neg_cent: torch.Tensor, mask: Optional[torch.Tensor] = None, *, x_lengths: Lengths = None,
                 y_lengths: Lengths = None,
                 return_durations: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Best monotonic alignment path, a drop-in for upstream's ``maximum_path(neg_cent, mask)``.

    Args:
        neg_cent: ``[b, t_y, t_x]`` floating scores (frames x text positions). Never modified.
        mask: optional ``[b, t_y, t_x]`` 0/1 mask as upstream passes it (``x_mask * y_mask``); the lengths are
            read from its first column (frames) and first row (text), as upstream does. Exclusive with lengths.
        x_lengths: optional integer ``[b]`` text lengths (tensor on any device, or a sequence).
        y_lengths: optional integer ``[b]`` frame counts. A missing length means the full dimension.
        return_durations: also return ``w = path.sum(1)``, ``[b, t_x]``.

    Returns:
        ``path`` ``[b, t_y, t_x]`` of 0/1 in ``neg_cent.dtype`` on ``neg_cent.device`` (and ``durations``).

    Backends: when the backend switch picks Triton (CUDA tensors, ``auto``; or ``triton`` forced), the search
    runs on the GPU with no host synchronisation: lengths and mask stay on the device. Otherwise the Cython
    extension (or the NumPy fallback) runs on a host copy. Under ``auto``, tensors larger than the kernel
    supports (``vits_fast.kernels.mas.MAX_TEXT`` text positions, ``MAX_FRAMES`` frames) use the CPU search;
    under ``triton`` they raise ``ValueError``.

    Items with more text positions than frames (``t_x > t_y``) have no monotonic path that visits every text
    position (upstream reads out of bounds there): their path and durations are all zero. When the lengths are
    known on the host (CPU search, or lengths passed as CPU tensors/sequences) one
    :class:`MonotonicAlignWarning` per call names those batch indices; lengths or masks on the GPU are not
    inspected (that would need a sync): such items are silently zero, as are items whose GPU-resident lengths
    are zero, negative or larger than ``neg_cent``.

    Raises:
        TypeError: ``neg_cent`` not a floating tensor; lengths not integers; mask not a tensor.
        ValueError: ``neg_cent`` not 3-D; ``mask`` shape differs from ``neg_cent``; lengths not ``[b]``; lengths
            (on the host) zero, negative or larger than ``neg_cent``'s dims; mask and lengths both given.
    """
    return _maximum_path(neg_cent, mask, x_lengths, y_lengths, return_durations)


def maximum_path_lengths(neg_cent: torch.Tensor, x_lengths: Lengths = None, y_lengths: Lengths = None,
                         mask: Optional[torch.Tensor] = None, *,
                         return_durations: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """:func:`maximum_path` taking the lengths positionally: ``(neg_cent, x_lengths, y_lengths, mask)``.

    ``neg_cent`` ``[b, t_y, t_x]``; ``x_lengths``/``y_lengths`` integer ``[b]``; returns the ``[b, t_y, t_x]``
    path (and ``[b, t_x]`` durations when ``return_durations``). See :func:`maximum_path` for the rules.
    """
    return _maximum_path(neg_cent, mask, x_lengths, y_lengths, return_durations)
