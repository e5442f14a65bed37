"""Piecewise rational-quadratic spline with linear tails (Durkan et al., 2019, "Neural Spline Flows").

This is the reference implementation used by :class:`vits_fast.modules.ConvFlow` on the PyTorch path. It computes
the same function as Piper/VITS ``transforms.py`` under the same names:

* the spline maps ``[left, right]`` onto ``[bottom, top]`` through ``K`` monotone rational-quadratic segments whose
  widths and heights come from a softmax (each at least ``min_bin_width`` / ``min_bin_height`` of the range) and
  whose knot derivatives come from a softplus (each at least ``min_derivative``);
* with ``tails="linear"`` the spline lives on ``[-tail_bound, tail_bound]`` and is the identity outside (log|det| 0
  there); the two outer knot derivatives are pinned to exactly 1 so that the map is C1 at the tail bound;
* an input lying exactly on a knot belongs to the bin that starts there; ``tail_bound`` itself belongs to the last bin.

Differences from upstream that do not change any value: the bin search does not modify its argument in place, and
the inverse does not assert that the quadratic's discriminant is non-negative (that assertion is a host
synchronisation; the discriminant is clamped at 0 instead, which changes nothing where upstream would not raise).
The Triton version of the whole ConvFlow epilogue is ``vits_fast.kernels.spline``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch.nn import functional as F

DEFAULT_MIN_BIN_WIDTH = 1e-3
DEFAULT_MIN_BIN_HEIGHT = 1e-3
DEFAULT_MIN_DERIVATIVE = 1e-3


def piecewise_rational_quadratic_transform(
    inputs: torch.Tensor,
    unnormalized_widths: torch.Tensor,
    unnormalized_heights: torch.Tensor,
    unnormalized_derivatives: torch.Tensor,
    inverse: bool = False,
    tails: Optional[str] = None,
    tail_bound: float = 1.0,
    min_bin_width: float = DEFAULT_MIN_BIN_WIDTH,
    min_bin_height: float = DEFAULT_MIN_BIN_HEIGHT,
    min_derivative: float = DEFAULT_MIN_DERIVATIVE,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Apply the spline (or its inverse) elementwise.

    Args:
        inputs: ``[...]``.
        unnormalized_widths, unnormalized_heights: ``[..., K]`` raw bin sizes (softmax logits).
        unnormalized_derivatives: ``[..., K - 1]`` raw interior knot derivatives with ``tails="linear"``,
            ``[..., K + 1]`` (all knots) with ``tails=None``.
        inverse: evaluate the inverse map.
        tails: ``None`` (spline on ``[0, 1]``) or ``"linear"`` (spline on ``[-tail_bound, tail_bound]``, identity
            outside).

    Returns:
        ``(outputs [...], logabsdet [...])``: the mapped values and ``log|d outputs / d inputs|`` per element.
    """
    if tails is None:
        return rational_quadratic_spline(
            inputs, unnormalized_widths, unnormalized_heights, unnormalized_derivatives, inverse=inverse,
            min_bin_width=min_bin_width, min_bin_height=min_bin_height, min_derivative=min_derivative)
    return unconstrained_rational_quadratic_spline(
        inputs, unnormalized_widths, unnormalized_heights, unnormalized_derivatives, inverse=inverse,
        tails=tails, tail_bound=tail_bound, min_bin_width=min_bin_width, min_bin_height=min_bin_height,
        min_derivative=min_derivative)


def searchsorted(bin_locations: torch.Tensor, inputs: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Bin index of every input: the number of knots ``<= input`` minus one.

    ``bin_locations`` ``[..., K + 1]`` (sorted knots), ``inputs`` ``[...]`` -> ``[...]`` int64. The last knot is
    raised by ``eps`` so that an input equal to it falls into the last bin; the index is clamped to the ``K``
    bins, since in bf16/fp16 ``eps`` vanishes against the knot (an input on the last knot would index bin ``K``,
    out of bounds, on the GPU). ``bin_locations`` is not modified.
    """
    raised_last = bin_locations[..., -1:] + eps
    knots = torch.cat([bin_locations[..., :-1], raised_last], dim=-1)
    return ((inputs.unsqueeze(-1) >= knots).sum(dim=-1) - 1).clamp_(0, knots.shape[-1] - 2)


def unconstrained_rational_quadratic_spline(
    inputs: torch.Tensor,
    unnormalized_widths: torch.Tensor,
    unnormalized_heights: torch.Tensor,
    unnormalized_derivatives: torch.Tensor,
    inverse: bool = False,
    tails: str = "linear",
    tail_bound: float = 1.0,
    min_bin_width: float = DEFAULT_MIN_BIN_WIDTH,
    min_bin_height: float = DEFAULT_MIN_BIN_HEIGHT,
    min_derivative: float = DEFAULT_MIN_DERIVATIVE,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Spline on ``[-tail_bound, tail_bound]`` with identity tails outside (shapes as in
    :func:`piecewise_rational_quadratic_transform`, derivatives ``[..., K - 1]``)."""
    if tails != "linear":
        raise RuntimeError(f"{tails} tails are not implemented.")

    inside = (inputs >= -tail_bound) & (inputs <= tail_bound)

    # Outer knot derivatives: softplus(c) + min_derivative == 1 exactly, so the spline meets the identity tails
    # with slope 1.
    edge = math.log(math.expm1(1.0 - min_derivative))
    derivatives = F.pad(unnormalized_derivatives, (1, 1), value=edge)

    outputs = inputs.clone()  # identity in the tails
    logabsdet = torch.zeros_like(inputs)
    spline_out, spline_lad = rational_quadratic_spline(
        inputs[inside],
        unnormalized_widths[inside, :],
        unnormalized_heights[inside, :],
        derivatives[inside, :],
        inverse=inverse,
        left=-tail_bound, right=tail_bound, bottom=-tail_bound, top=tail_bound,
        min_bin_width=min_bin_width, min_bin_height=min_bin_height, min_derivative=min_derivative,
    )
    outputs[inside] = spline_out
    logabsdet[inside] = spline_lad
    return outputs, logabsdet


def _knots(unnormalized: torch.Tensor, lo: float, hi: float, min_size: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Knot positions ``[..., K + 1]`` (first ``lo``, last ``hi``) and bin sizes ``[..., K]`` from raw logits."""
    k = unnormalized.shape[-1]
    fractions = min_size + (1.0 - min_size * k) * torch.softmax(unnormalized, dim=-1)
    knots = F.pad(torch.cumsum(fractions, dim=-1), (1, 0), value=0.0)
    knots = (hi - lo) * knots + lo
    # Pin both ends exactly (the cumulative sum's rounding must not move the domain).
    first = torch.full_like(knots[..., :1], lo)
    last = torch.full_like(knots[..., :1], hi)
    knots = torch.cat([first, knots[..., 1:-1], last], dim=-1)
    return knots, knots[..., 1:] - knots[..., :-1]


def _pick(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return values.gather(-1, index).squeeze(-1)


def rational_quadratic_spline(
    inputs: torch.Tensor,
    unnormalized_widths: torch.Tensor,
    unnormalized_heights: torch.Tensor,
    unnormalized_derivatives: torch.Tensor,
    inverse: bool = False,
    left: float = 0.0,
    right: float = 1.0,
    bottom: float = 0.0,
    top: float = 1.0,
    min_bin_width: float = DEFAULT_MIN_BIN_WIDTH,
    min_bin_height: float = DEFAULT_MIN_BIN_HEIGHT,
    min_derivative: float = DEFAULT_MIN_DERIVATIVE,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Monotone RQ spline from ``[left, right]`` onto ``[bottom, top]``; inputs must lie in the domain.

    ``inputs [N]``, widths/heights ``[N, K]``, derivatives ``[N, K + 1]`` -> ``(outputs [N], logabsdet [N])``.
    """
    cumwidths, widths = _knots(unnormalized_widths, left, right, min_bin_width)
    cumheights, heights = _knots(unnormalized_heights, bottom, top, min_bin_height)
    derivatives = min_derivative + F.softplus(unnormalized_derivatives)

    idx = searchsorted(cumheights if inverse else cumwidths, inputs).unsqueeze(-1)
    x_k = _pick(cumwidths, idx)
    w_k = _pick(widths, idx)
    y_k = _pick(cumheights, idx)
    h_k = _pick(heights, idx)
    s_k = _pick(heights / widths, idx)  # slope of the secant over the bin
    d_lo = _pick(derivatives, idx)
    d_hi = _pick(derivatives[..., 1:], idx)
    curvature = d_lo + d_hi - 2 * s_k

    if inverse:
        # Solve y = y_k + h_k (s t^2 + d_lo t (1 - t)) / (s + curvature t (1 - t)) for t in [0, 1]:
        # a t^2 + b t + c = 0, taking the root that stays finite as a -> 0.
        dy = inputs - y_k
        a = dy * curvature + h_k * (s_k - d_lo)
        b = h_k * d_lo - dy * curvature
        c = -s_k * dy
        disc = (b.pow(2) - 4 * a * c).clamp_min(0)
        t = (2 * c) / (-b - torch.sqrt(disc))
        outputs = t * w_k + x_k
    else:
        t = (inputs - x_k) / w_k
        t_1mt = t * (1 - t)
        numerator = h_k * (s_k * t.pow(2) + d_lo * t_1mt)
        outputs = y_k + numerator / (s_k + curvature * t_1mt)

    t_1mt = t * (1 - t)
    denominator = s_k + curvature * t_1mt
    slope_numerator = s_k.pow(2) * (d_hi * t.pow(2) + 2 * s_k * t_1mt + d_lo * (1 - t).pow(2))
    logabsdet = torch.log(slope_numerator) - 2 * torch.log(denominator)
    return outputs, (-logabsdet if inverse else logabsdet)
