"""Pure NumPy alignment search, used when the Cython extension ``core`` is not built.

Same contract as :func:`vits_fast.monotonic_align.core.maximum_path_c` and bit-identical to it: the dynamic
programme runs in float32 with the same additions and the same comparisons, row by row over frames and
vectorised over the batch and text axes. The input is never written.

Rules shared by every implementation (Cython, NumPy, Triton), for one item with lengths ``t_x`` (text) and
``t_y`` (frames) in a ``[t_y_max, t_x_max]`` slice:

* The item is *valid* when ``1 <= t_x <= t_y``, ``t_x <= t_x_max`` and ``t_y <= t_y_max``. An item that is not
  valid gets an all-zero path (upstream Cython reads out of bounds there).
* ``v[y, x] = value[y, x] + max(left, up)`` for ``x`` in the band ``[max(0, t_x + y - t_y), min(t_x, y + 1))``,
  with ``left = v[y-1, x-1]`` (``0`` at ``(0, 0)``, ``-1e9`` at ``x == 0 < y``), ``up = v[y-1, x]`` (``-1e9`` at
  ``x == y``) and ``max(left, up) = up if up > left else left``.
* The backtrack starts at ``x = t_x - 1`` on the last frame and steps to ``x - 1`` from frame ``y`` when
  ``x != 0`` and (``x == y`` or ``v[y-1, x] < v[y-1, x-1]``); ties stay on the same text position. That choice
  is recorded during the forward pass as one decision per cell, so only one DP row is kept.
"""

from __future__ import annotations

import numpy as np

NEG = np.float32(-1e9)


def valid_items(t_ys: np.ndarray, t_xs: np.ndarray, t_y_max: int, t_x_max: int) -> np.ndarray:
    """Boolean ``[b]``: which items have lengths the search is defined for (see the module docstring)."""
    t_ys = np.asarray(t_ys, dtype=np.int64)
    t_xs = np.asarray(t_xs, dtype=np.int64)
    return (t_xs >= 1) & (t_xs <= t_ys) & (t_xs <= t_x_max) & (t_ys <= t_y_max)


def maximum_path_numpy(paths: np.ndarray, values: np.ndarray, t_ys: np.ndarray, t_xs: np.ndarray) -> None:
    """Fill ``paths`` with the maximum-score monotonic alignment of each item.

    Args:
        paths: int32 ``[b, t_y_max, t_x_max]``, C-contiguous, written completely (0/1).
        values: float32 ``[b, t_y_max, t_x_max]`` scores (read only).
        t_ys: int32 ``[b]`` frame counts.
        t_xs: int32 ``[b]`` text lengths.
    """
    b, t_y_max, t_x_max = values.shape
    if paths.shape != values.shape:
        raise ValueError(f"paths has shape {paths.shape}, values {values.shape}")
    values = np.asarray(values, dtype=np.float32)
    ok = valid_items(t_ys, t_xs, t_y_max, t_x_max)
    ty = np.where(ok, np.asarray(t_ys, dtype=np.int64), 0)  # invalid items take no steps
    tx = np.where(ok, np.asarray(t_xs, dtype=np.int64), 0)
    paths[...] = 0
    n_rows = int(ty.max()) if b else 0
    if n_rows == 0:
        return

    x = np.arange(t_x_max)[None, :]  # [1, t_x_max]
    decisions = np.zeros((b, n_rows, t_x_max), dtype=bool)  # True: step to x - 1 before frame y
    v = np.full((b, t_x_max), NEG, dtype=np.float32)  # row y - 1 of the DP
    left = np.empty_like(v)
    with np.errstate(over="ignore", invalid="ignore"):
        for y in range(n_rows):
            left[:, 1:] = v[:, :-1]
            left[:, 0] = np.float32(0.0) if y == 0 else NEG
            up = v.copy()
            if y < t_x_max:
                up[:, y] = NEG
            best = np.where(up > left, up, left)
            new = values[:, y, :] + best  # float32 + float32
            decisions[:, y, :] = (x > 0) & ((x == y) | (up < left))
            lo = np.maximum(0, tx + y - ty)[:, None]
            hi = np.minimum(tx, y + 1)[:, None]
            band = (x >= lo) & (x < hi)
            v = np.where(band, new, NEG).astype(np.float32, copy=False)

    index = tx - 1  # [b]; -1 for invalid items, which are never active
    rows = np.arange(b)
    for y in range(n_rows - 1, -1, -1):
        active = y < ty
        if not active.any():
            continue
        ia = rows[active]
        xa = index[active]
        paths[ia, y, xa] = 1
        index[ia] = xa - decisions[ia, y, xa]
