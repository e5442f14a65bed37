"""Building blocks of VITS (Piper's ``modules``): normalisation, WaveNet, HiFi-GAN residual blocks and flows.

These are the reference implementations. ``WN``, ``ResBlock1``/``ResBlock2``, ``ResidualCouplingLayer`` and
``ConvFlow`` hand their work to the fused Triton kernels in ``vits_fast.kernels`` when the backend switch
(:mod:`vits_fast.backend`) says so; the convolutions always stay in PyTorch.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import Conv1d
from torch.nn import functional as F

from .backend import use_triton
from .commons import fused_add_tanh_sigmoid_multiply, get_padding, init_weights, remove_weight_norm, weight_norm
from .transforms import piecewise_rational_quadratic_transform

LRELU_SLOPE = 0.1


class LayerNorm(nn.Module):
    """Layer norm over the channel axis of a [b, c, t] tensor."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.channels = channels
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.transpose(1, -1), (self.channels,), self.gamma, self.beta, self.eps)
        return y.transpose(1, -1)


class ConvReluNorm(nn.Module):
    """Stack of conv -> LayerNorm -> ReLU -> dropout with a zero-initialised residual projection."""

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int, kernel_size: int,
                 n_layers: int, p_dropout: float):
        super().__init__()
        if n_layers <= 1:
            raise ValueError(f"ConvReluNorm needs n_layers > 1, got {n_layers}")
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.n_layers = n_layers
        self.p_dropout = p_dropout

        self.conv_layers = nn.ModuleList()
        self.norm_layers = nn.ModuleList()
        for i in range(n_layers):
            self.conv_layers.append(nn.Conv1d(in_channels if i == 0 else hidden_channels, hidden_channels,
                                              kernel_size, padding=kernel_size // 2))
            self.norm_layers.append(LayerNorm(hidden_channels))
            if i == 0:
                self.relu_drop = nn.Sequential(nn.ReLU(), nn.Dropout(p_dropout))
        self.proj = nn.Conv1d(hidden_channels, out_channels, 1)
        self.proj.weight.data.zero_()
        self.proj.bias.data.zero_()

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor) -> torch.Tensor:
        x_org = x
        for conv, norm in zip(self.conv_layers, self.norm_layers):
            x = self.relu_drop(norm(conv(x * x_mask)))
        return (x_org + self.proj(x)) * x_mask


class DDSConv(nn.Module):
    """Dilated depth-separable convolutions (dilation ``kernel_size**i``) with GELU, LayerNorm and residuals."""

    def __init__(self, channels: int, kernel_size: int, n_layers: int, p_dropout: float = 0.0):
        super().__init__()
        self.channels = channels
        self.kernel_size = kernel_size
        self.n_layers = n_layers
        self.p_dropout = p_dropout

        self.drop = nn.Dropout(p_dropout)
        self.convs_sep = nn.ModuleList()
        self.convs_1x1 = nn.ModuleList()
        self.norms_1 = nn.ModuleList()
        self.norms_2 = nn.ModuleList()
        for i in range(n_layers):
            dilation = kernel_size**i
            self.convs_sep.append(nn.Conv1d(channels, channels, kernel_size, groups=channels, dilation=dilation,
                                            padding=(kernel_size * dilation - dilation) // 2))
            self.convs_1x1.append(nn.Conv1d(channels, channels, 1))
            self.norms_1.append(LayerNorm(channels))
            self.norms_2.append(LayerNorm(channels))

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, g: Optional[torch.Tensor] = None) -> torch.Tensor:
        if g is not None:
            x = x + g
        for sep, norm_1, pointwise, norm_2 in zip(self.convs_sep, self.norms_1, self.convs_1x1, self.norms_2):
            y = F.gelu(norm_1(sep(x * x_mask)))
            y = F.gelu(norm_2(pointwise(y)))
            x = x + self.drop(y)
        return x * x_mask


class WN(nn.Module):
    """Non-causal WaveNet: gated dilated convolutions with residual and skip paths, optional global conditioning.

    forward(x [b, h, t], x_mask [b, 1, t], g [b, gin, 1] or None) -> [b, h, t]
    """

    fused_family = "wn"  # auto's rule: vits_fast.backend.AUTO_FUSED_FROM

    def __init__(self, hidden_channels: int, kernel_size: int, dilation_rate: int, n_layers: int,
                 gin_channels: int = 0, p_dropout: float = 0):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"WN needs an odd kernel_size, got {kernel_size}")
        self.hidden_channels = hidden_channels
        self.kernel_size = (kernel_size,)
        self.dilation_rate = dilation_rate
        self.n_layers = n_layers
        self.gin_channels = gin_channels
        self.p_dropout = p_dropout

        self.in_layers = nn.ModuleList()
        self.res_skip_layers = nn.ModuleList()
        self.drop = nn.Dropout(p_dropout)

        if gin_channels != 0:
            self.cond_layer = weight_norm(nn.Conv1d(gin_channels, 2 * hidden_channels * n_layers, 1))

        for i in range(n_layers):
            dilation = dilation_rate**i
            self.in_layers.append(weight_norm(nn.Conv1d(
                hidden_channels, 2 * hidden_channels, kernel_size, dilation=dilation,
                padding=(kernel_size * dilation - dilation) // 2)))
            # The last layer only feeds the skip path.
            res_skip_channels = 2 * hidden_channels if i < n_layers - 1 else hidden_channels
            self.res_skip_layers.append(weight_norm(nn.Conv1d(hidden_channels, res_skip_channels, 1)))

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, g: Optional[torch.Tensor] = None,
                **kwargs) -> torch.Tensor:
        if use_triton(x, module=self):
            from .kernels import wn as _wn

            return _wn.wn_forward(self, x, x_mask, g)
        h = self.hidden_channels
        output = torch.zeros_like(x)
        if g is not None:
            g = self.cond_layer(g)
        for i, (in_layer, res_skip_layer) in enumerate(zip(self.in_layers, self.res_skip_layers)):
            x_in = in_layer(x)
            g_l = g[:, 2 * h * i: 2 * h * (i + 1)] if g is not None else torch.zeros_like(x_in)
            acts = self.drop(fused_add_tanh_sigmoid_multiply(x_in, g_l, h))
            res_skip_acts = res_skip_layer(acts)
            if i < self.n_layers - 1:
                x = (x + res_skip_acts[:, :h]) * x_mask
                output = output + res_skip_acts[:, h:]
            else:
                output = output + res_skip_acts
        return output * x_mask

    def remove_weight_norm(self) -> None:
        if self.gin_channels != 0:
            remove_weight_norm(self.cond_layer)
        for layer in list(self.in_layers) + list(self.res_skip_layers):
            remove_weight_norm(layer)


def _dilated_conv(channels: int, kernel_size: int, dilation: int) -> nn.Module:
    return weight_norm(Conv1d(channels, channels, kernel_size, 1, dilation=dilation,
                              padding=get_padding(kernel_size, dilation)))


class ResBlock1(nn.Module):
    """HiFi-GAN residual block V1: three (dilated conv, conv) pairs."""

    fused_family = "resblock"  # auto's rule: vits_fast.backend.AUTO_FUSED_FROM

    def __init__(self, channels: int, kernel_size: int = 3, dilation: Tuple[int, ...] = (1, 3, 5)):
        super().__init__()
        self.LRELU_SLOPE = LRELU_SLOPE
        self.convs1 = nn.ModuleList([_dilated_conv(channels, kernel_size, d) for d in dilation[:3]])
        self.convs1.apply(init_weights)
        self.convs2 = nn.ModuleList([_dilated_conv(channels, kernel_size, 1) for _ in range(3)])
        self.convs2.apply(init_weights)

    def forward(self, x: torch.Tensor, x_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if use_triton(x, module=self):
            from .kernels import hifigan as _hifigan

            return _hifigan.resblock_forward(self, x, x_mask)
        for c1, c2 in zip(self.convs1, self.convs2):
            xt = F.leaky_relu(x, self.LRELU_SLOPE)
            if x_mask is not None:
                xt = xt * x_mask
            xt = F.leaky_relu(c1(xt), self.LRELU_SLOPE)
            if x_mask is not None:
                xt = xt * x_mask
            x = c2(xt) + x
        return x * x_mask if x_mask is not None else x

    def remove_weight_norm(self) -> None:
        for layer in list(self.convs1) + list(self.convs2):
            remove_weight_norm(layer)


class ResBlock2(nn.Module):
    """HiFi-GAN residual block V2: two dilated convs."""

    fused_family = "resblock"  # auto's rule: vits_fast.backend.AUTO_FUSED_FROM

    def __init__(self, channels: int, kernel_size: int = 3, dilation: Tuple[int, ...] = (1, 3)):
        super().__init__()
        self.LRELU_SLOPE = LRELU_SLOPE
        self.convs = nn.ModuleList([_dilated_conv(channels, kernel_size, d) for d in dilation[:2]])
        self.convs.apply(init_weights)

    def forward(self, x: torch.Tensor, x_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if use_triton(x, module=self):
            from .kernels import hifigan as _hifigan

            return _hifigan.resblock_forward(self, x, x_mask)
        for c in self.convs:
            xt = F.leaky_relu(x, self.LRELU_SLOPE)
            if x_mask is not None:
                xt = xt * x_mask
            x = c(xt) + x
        return x * x_mask if x_mask is not None else x

    def remove_weight_norm(self) -> None:
        for layer in self.convs:
            remove_weight_norm(layer)


class Log(nn.Module):
    """Flow y = log(x) on the masked positions (x clamped at 1e-5)."""

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, reverse: bool = False, **kwargs):
        if not reverse:
            y = torch.log(torch.clamp_min(x, 1e-5)) * x_mask
            return y, torch.sum(-y, [1, 2])
        return torch.exp(x) * x_mask


class Flip(nn.Module):
    """Flow that reverses the channel order (log-determinant 0)."""

    def forward(self, x: torch.Tensor, *args, reverse: bool = False, **kwargs):
        x = torch.flip(x, [1])
        if not reverse:
            return x, x.new_zeros(x.size(0))
        return x


class ElementwiseAffine(nn.Module):
    """Flow y = m + exp(logs) * x with per-channel parameters."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.m = nn.Parameter(torch.zeros(channels, 1))
        self.logs = nn.Parameter(torch.zeros(channels, 1))

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, reverse: bool = False, **kwargs):
        if not reverse:
            y = (self.m + torch.exp(self.logs) * x) * x_mask
            return y, torch.sum(self.logs * x_mask, [1, 2])
        return (x - self.m) * torch.exp(-self.logs) * x_mask


class ResidualCouplingLayer(nn.Module):
    """Affine coupling: the first half of the channels, through a WN, shifts (and scales) the second half.

    forward(x [b, c, t], x_mask [b, 1, t], g=None, reverse=False) -> (x', logdet [b]) or x' when reversed.
    """

    fused_family = "coupling"  # auto's rule: vits_fast.backend.AUTO_FUSED_FROM

    def __init__(self, channels: int, hidden_channels: int, kernel_size: int, dilation_rate: int, n_layers: int,
                 p_dropout: float = 0, gin_channels: int = 0, mean_only: bool = False):
        if channels % 2 != 0:
            raise ValueError(f"ResidualCouplingLayer needs an even number of channels, got {channels}")
        super().__init__()
        self.channels = channels
        self.hidden_channels = hidden_channels
        self.kernel_size = kernel_size
        self.dilation_rate = dilation_rate
        self.n_layers = n_layers
        self.half_channels = channels // 2
        self.mean_only = mean_only

        self.pre = nn.Conv1d(self.half_channels, hidden_channels, 1)
        self.enc = WN(hidden_channels, kernel_size, dilation_rate, n_layers, p_dropout=p_dropout,
                      gin_channels=gin_channels)
        self.post = nn.Conv1d(hidden_channels, self.half_channels * (2 - mean_only), 1)
        self.post.weight.data.zero_()
        self.post.bias.data.zero_()

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, g: Optional[torch.Tensor] = None,
                reverse: bool = False):
        if use_triton(x, module=self):
            from .kernels import coupling as _coupling

            return _coupling.residual_coupling_forward(self, x, x_mask, g, reverse)
        x0, x1 = torch.split(x, [self.half_channels] * 2, 1)
        h = self.enc(self.pre(x0) * x_mask, x_mask, g=g)
        stats = self.post(h) * x_mask
        if self.mean_only:
            m, logs = stats, torch.zeros_like(stats)
        else:
            m, logs = torch.split(stats, [self.half_channels] * 2, 1)
        if not reverse:
            x1 = m + x1 * torch.exp(logs) * x_mask
            return torch.cat([x0, x1], 1), torch.sum(logs, [1, 2])
        x1 = (x1 - m) * torch.exp(-logs) * x_mask
        return torch.cat([x0, x1], 1)


class ConvFlow(nn.Module):
    """Neural-spline coupling: the first half parameterises a rational-quadratic spline applied to the second.

    forward(x [b, c, t], x_mask [b, 1, t], g [b, filter, t] or None, reverse=False) -> (x', logdet [b]) or x'.
    """

    fused_family = "spline"  # auto's rule: vits_fast.backend.AUTO_FUSED_FROM

    def __init__(self, in_channels: int, filter_channels: int, kernel_size: int, n_layers: int,
                 num_bins: int = 10, tail_bound: float = 5.0):
        super().__init__()
        self.in_channels = in_channels
        self.filter_channels = filter_channels
        self.kernel_size = kernel_size
        self.n_layers = n_layers
        self.num_bins = num_bins
        self.tail_bound = tail_bound
        self.half_channels = in_channels // 2

        self.pre = nn.Conv1d(self.half_channels, filter_channels, 1)
        self.convs = DDSConv(filter_channels, kernel_size, n_layers, p_dropout=0.0)
        self.proj = nn.Conv1d(filter_channels, self.half_channels * (num_bins * 3 - 1), 1)
        self.proj.weight.data.zero_()
        self.proj.bias.data.zero_()

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, g: Optional[torch.Tensor] = None,
                reverse: bool = False):
        if use_triton(x, module=self):
            from .kernels import spline as _spline

            return _spline.conv_flow_forward(self, x, x_mask, g, reverse)
        x0, x1 = torch.split(x, [self.half_channels] * 2, 1)
        h = self.convs(self.pre(x0), x_mask, g=g)
        h = self.proj(h) * x_mask

        b, c, t = x0.shape
        h = h.reshape(b, c, -1, t).permute(0, 1, 3, 2)  # [b, c, t, 3 * num_bins - 1]
        scale = math.sqrt(self.filter_channels)
        k = self.num_bins
        x1, logabsdet = piecewise_rational_quadratic_transform(
            x1, h[..., :k] / scale, h[..., k: 2 * k] / scale, h[..., 2 * k:],
            inverse=reverse, tails="linear", tail_bound=self.tail_bound)

        x = torch.cat([x0, x1], 1) * x_mask
        if not reverse:
            return x, torch.sum(logabsdet * x_mask, [1, 2])
        return x
