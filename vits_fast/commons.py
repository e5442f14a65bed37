"""Small helpers shared by the VITS modules (Piper's ``commons``): masks, paths, slicing, initialisation."""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F


def stage(name: str):
    """A ``torch.profiler`` range named ``vits.<name>`` around one VITS stage (nothing while exporting/tracing)."""
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return contextlib.nullcontext()
    return torch.profiler.record_function(f"vits.{name}")


# --- weight norm -------------------------------------------------------------------------------------------
# Piper/VITS checkpoints store the legacy hook-based weight norm (``weight_g``/``weight_v``). The legacy API is
# deprecated in favour of parametrizations, which would rename the keys; we keep the legacy one and silence
# only its deprecation warning.

def weight_norm(module: nn.Module, name: str = "weight", dim: int = 0) -> nn.Module:
    """Legacy weight norm (``<name>_g``/``<name>_v`` parameters), as upstream checkpoints expect."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*weight_norm.*")
        return torch.nn.utils.weight_norm(module, name=name, dim=dim)


def remove_weight_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """Fold a legacy weight norm back into a plain ``weight`` (done before export)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*weight_norm.*")
        return torch.nn.utils.remove_weight_norm(module, name=name)


def current_weight(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """``module``'s ``name`` as its next forward would use it: a legacy weight norm's hook recomputes it from
    ``<name>_g``/``<name>_v`` (the attribute itself holds the previous forward's value); otherwise the attribute."""
    from torch.nn.utils.weight_norm import WeightNorm

    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm) and hook.name == name:
            return hook.compute_weight(module)
    return getattr(module, name)


def spectral_norm(module: nn.Module) -> nn.Module:
    """Spectral norm as used by the discriminators when ``use_spectral_norm`` is set."""
    return torch.nn.utils.spectral_norm(module)


def init_weights(m: nn.Module, mean: float = 0.0, std: float = 0.01) -> None:
    """Draw conv weights from N(mean, std) (used with ``Module.apply``)."""
    if "Conv" in type(m).__name__:
        m.weight.data.normal_(mean, std)


def get_padding(kernel_size: int, dilation: int = 1) -> int:
    """'Same' padding of an odd kernel with the given dilation."""
    return (kernel_size * dilation - dilation) // 2


def convert_pad_shape(pad_shape: Sequence[Sequence[int]]) -> List[int]:
    """[[l0, r0], [l1, r1], ...] per dimension (first to last) -> F.pad's flat list (last dimension first)."""
    return [p for pair in reversed(pad_shape) for p in pair]


def intersperse(lst: Sequence, item) -> list:
    """[a, b] -> [item, a, item, b, item]."""
    out = [item] * (2 * len(lst) + 1)
    out[1::2] = lst
    return out


def kl_divergence(m_p: torch.Tensor, logs_p: torch.Tensor, m_q: torch.Tensor, logs_q: torch.Tensor) -> torch.Tensor:
    """Element-wise KL(P || Q) of two diagonal Gaussians given means and log standard deviations."""
    var_ratio = torch.exp(2.0 * logs_p) + (m_p - m_q) ** 2
    return (logs_q - logs_p) - 0.5 + 0.5 * var_ratio * torch.exp(-2.0 * logs_q)


def rand_gumbel(shape: Sequence[int]) -> torch.Tensor:
    """Gumbel(0, 1) samples; uniforms are kept away from 0 and 1 to avoid infinities."""
    u = torch.rand(shape) * 0.99998 + 0.00001
    return -torch.log(-torch.log(u))


def rand_gumbel_like(x: torch.Tensor) -> torch.Tensor:
    return rand_gumbel(x.size()).to(dtype=x.dtype, device=x.device)


def subsequent_mask(length: int) -> torch.Tensor:
    """Causal mask [1, 1, length, length] (lower triangle of ones)."""
    return torch.tril(torch.ones(length, length)).unsqueeze(0).unsqueeze(0)


def sequence_mask(length: torch.Tensor, max_length: Optional[int] = None) -> torch.Tensor:
    """Boolean mask [b, max_length]: ``mask[i, t] = t < length[i]``."""
    if max_length is None:
        max_length = length.max()
    positions = torch.arange(max_length, dtype=length.dtype, device=length.device)
    return positions.unsqueeze(0) < length.unsqueeze(1)


def fused_add_tanh_sigmoid_multiply(input_a: torch.Tensor, input_b: torch.Tensor,
                                    n_channels: Union[torch.Tensor, int]) -> torch.Tensor:
    """WaveNet gate: with ``s = a + b`` ([b, 2h, t]), returns ``tanh(s[:, :h]) * sigmoid(s[:, h:])`` ([b, h, t]).

    ``n_channels`` is ``h`` (an int, or a one-element tensor as upstream passes it).
    """
    h = int(n_channels[0]) if isinstance(n_channels, torch.Tensor) else int(n_channels)
    s = input_a + input_b
    return torch.tanh(s[:, :h]) * torch.sigmoid(s[:, h:])


def generate_path(duration: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hard monotonic alignment from integer durations.

    duration: [b, 1, t_x] (whole numbers); mask: [b, 1, t_y, t_x]. Returns path [b, 1, t_y, t_x] with
    ``path[i, 0, y, x] = 1`` when frame ``y`` belongs to text position ``x``.
    """
    b, _, t_y, t_x = mask.shape
    ends = torch.cumsum(duration, -1).view(b * t_x)
    covered = sequence_mask(ends, t_y).type_as(mask).view(b, t_x, t_y)  # frames before each token's end
    path = covered - F.pad(covered, (0, 0, 1, 0, 0, 0))[:, :-1]  # minus frames before its start
    return path.unsqueeze(1).transpose(2, 3) * mask


def slice_segments(x: torch.Tensor, ids_str: torch.Tensor, segment_size: int = 4) -> torch.Tensor:
    """Cut ``x[i, :, ids_str[i] : ids_str[i] + segment_size]`` for every item i.

    x: [b, c, t]; ids_str: [b] integer starts (negative starts count as 0). Returns [b, c, segment_size].
    One gather, no per-item loop and no host synchronisation.
    """
    b, c, t = x.shape
    if segment_size > t:
        raise ValueError(f"slice_segments: segment_size {segment_size} is longer than the tensor ({t} steps)")
    starts = ids_str.to(device=x.device, dtype=torch.long).clamp_min(0)
    index = starts.view(b, 1, 1) + torch.arange(segment_size, device=x.device).view(1, 1, segment_size)
    return torch.gather(x, 2, index.expand(b, c, segment_size))


def rand_slice_segments(x: torch.Tensor, x_lengths: Optional[torch.Tensor] = None, segment_size: int = 4,
                        rng_device: Optional[Union[str, torch.device]] = "cpu"
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random ``segment_size`` windows inside each item's valid length.

    x: [b, c, t]; x_lengths: [b] (defaults to t). Returns (segments [b, c, segment_size], starts [b]).
    Upstream draws the uniforms with the CPU generator (``rng_device="cpu"``, the default, reproduces its
    numbers); ``rng_device=None`` draws them on ``x.device`` so a CUDA step never waits on a host copy.
    """
    b, _, t = x.size()
    if x_lengths is None:
        x_lengths = t
    ids_str_max = x_lengths - segment_size + 1
    u = torch.rand([b], device=x.device if rng_device is None else rng_device).to(device=x.device)
    ids_str = (u * ids_str_max).to(dtype=torch.long)
    return slice_segments(x, ids_str, segment_size), ids_str


def get_timing_signal_1d(length: int, channels: int, min_timescale: float = 1.0,
                         max_timescale: float = 1.0e4) -> torch.Tensor:
    """Sinusoidal position signal [1, channels, length] (Transformer style)."""
    position = torch.arange(length, dtype=torch.float)
    num_timescales = channels // 2
    log_increment = math.log(float(max_timescale) / float(min_timescale)) / (num_timescales - 1)
    inv_timescales = min_timescale * torch.exp(torch.arange(num_timescales, dtype=torch.float) * -log_increment)
    scaled_time = position.unsqueeze(0) * inv_timescales.unsqueeze(1)
    signal = torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], 0)
    signal = F.pad(signal, [0, 0, 0, channels % 2])
    return signal.view(1, channels, length)


def add_timing_signal_1d(x: torch.Tensor, min_timescale: float = 1.0, max_timescale: float = 1.0e4) -> torch.Tensor:
    _, channels, length = x.size()
    signal = get_timing_signal_1d(length, channels, min_timescale, max_timescale)
    return x + signal.to(dtype=x.dtype, device=x.device)


def cat_timing_signal_1d(x: torch.Tensor, min_timescale: float = 1.0, max_timescale: float = 1.0e4,
                         axis: int = 1) -> torch.Tensor:
    _, channels, length = x.size()
    signal = get_timing_signal_1d(length, channels, min_timescale, max_timescale)
    return torch.cat([x, signal.to(dtype=x.dtype, device=x.device)], axis)


def clip_grad_value_(parameters, clip_value: Optional[float], norm_type: float = 2) -> float:
    """Clamp every gradient to ``[-clip_value, clip_value]``; returns the total gradient norm before clamping.

    The norm is accumulated on the device and read once (upstream reads one number per parameter).
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    norm_type = float(norm_type)
    total = torch.stack([g.detach().float().norm(norm_type) for g in grads]).pow(norm_type).sum()
    if clip_value is not None:
        for g in grads:
            g.data.clamp_(min=-float(clip_value), max=float(clip_value))
    return float(total.pow(1.0 / norm_type))
