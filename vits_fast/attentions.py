"""Transformer text encoder of VITS (Piper's ``attentions``): relative-position self-attention and conv FFN."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from .commons import subsequent_mask
from .modules import LayerNorm


class Encoder(nn.Module):
    """Post-norm Transformer encoder with windowed relative-position attention.

    forward(x [b, h, t], x_mask [b, 1, t]) -> [b, h, t]
    """

    def __init__(self, hidden_channels: int, filter_channels: int, n_heads: int, n_layers: int,
                 kernel_size: int = 1, p_dropout: float = 0.0, window_size: int = 4, **kwargs):
        super().__init__()
        self.hidden_channels = hidden_channels
        self.filter_channels = filter_channels
        self.n_heads = n_heads
        self.n_layers = n_layers
        self.kernel_size = kernel_size
        self.p_dropout = p_dropout
        self.window_size = window_size

        self.drop = nn.Dropout(p_dropout)
        self.attn_layers = nn.ModuleList()
        self.norm_layers_1 = nn.ModuleList()
        self.ffn_layers = nn.ModuleList()
        self.norm_layers_2 = nn.ModuleList()
        for _ in range(n_layers):
            self.attn_layers.append(MultiHeadAttention(hidden_channels, hidden_channels, n_heads,
                                                       p_dropout=p_dropout, window_size=window_size))
            self.norm_layers_1.append(LayerNorm(hidden_channels))
            self.ffn_layers.append(FFN(hidden_channels, hidden_channels, filter_channels, kernel_size,
                                       p_dropout=p_dropout))
            self.norm_layers_2.append(LayerNorm(hidden_channels))

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor) -> torch.Tensor:
        attn_mask = x_mask.unsqueeze(2) * x_mask.unsqueeze(-1)
        x = x * x_mask
        for attn, norm_1, ffn, norm_2 in zip(self.attn_layers, self.norm_layers_1, self.ffn_layers,
                                             self.norm_layers_2):
            x = norm_1(x + self.drop(attn(x, x, attn_mask)))
            x = norm_2(x + self.drop(ffn(x, x_mask)))
        return x * x_mask


class Decoder(nn.Module):
    """Causal Transformer decoder with encoder-decoder attention (unused by VITS, kept for completeness).

    forward(x [b, h, t], x_mask [b, 1, t], h [b, h, t_h], h_mask [b, 1, t_h]) -> [b, h, t]
    """

    def __init__(self, hidden_channels: int, filter_channels: int, n_heads: int, n_layers: int,
                 kernel_size: int = 1, p_dropout: float = 0.0, proximal_bias: bool = False,
                 proximal_init: bool = True, **kwargs):
        super().__init__()
        self.hidden_channels = hidden_channels
        self.filter_channels = filter_channels
        self.n_heads = n_heads
        self.n_layers = n_layers
        self.kernel_size = kernel_size
        self.p_dropout = p_dropout
        self.proximal_bias = proximal_bias
        self.proximal_init = proximal_init

        self.drop = nn.Dropout(p_dropout)
        self.self_attn_layers = nn.ModuleList()
        self.norm_layers_0 = nn.ModuleList()
        self.encdec_attn_layers = nn.ModuleList()
        self.norm_layers_1 = nn.ModuleList()
        self.ffn_layers = nn.ModuleList()
        self.norm_layers_2 = nn.ModuleList()
        for _ in range(n_layers):
            self.self_attn_layers.append(MultiHeadAttention(
                hidden_channels, hidden_channels, n_heads, p_dropout=p_dropout, proximal_bias=proximal_bias,
                proximal_init=proximal_init))
            self.norm_layers_0.append(LayerNorm(hidden_channels))
            self.encdec_attn_layers.append(MultiHeadAttention(hidden_channels, hidden_channels, n_heads,
                                                              p_dropout=p_dropout))
            self.norm_layers_1.append(LayerNorm(hidden_channels))
            self.ffn_layers.append(FFN(hidden_channels, hidden_channels, filter_channels, kernel_size,
                                       p_dropout=p_dropout, causal=True))
            self.norm_layers_2.append(LayerNorm(hidden_channels))

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, h: torch.Tensor, h_mask: torch.Tensor) -> torch.Tensor:
        self_attn_mask = subsequent_mask(x_mask.size(2)).type_as(x)
        encdec_attn_mask = h_mask.unsqueeze(2) * x_mask.unsqueeze(-1)
        x = x * x_mask
        for i in range(self.n_layers):
            x = self.norm_layers_0[i](x + self.drop(self.self_attn_layers[i](x, x, self_attn_mask)))
            x = self.norm_layers_1[i](x + self.drop(self.encdec_attn_layers[i](x, h, encdec_attn_mask)))
            x = self.norm_layers_2[i](x + self.drop(self.ffn_layers[i](x, x_mask)))
        return x * x_mask


class MultiHeadAttention(nn.Module):
    """Multi-head attention over [b, c, t] tensors with optional relative-position embeddings (window ±w).

    forward(x [b, c, t_t], c [b, c, t_s], attn_mask [b, 1, t_t, t_s] or None) -> [b, out_channels, t_t]
    """

    def __init__(self, channels: int, out_channels: int, n_heads: int, p_dropout: float = 0.0,
                 window_size: Optional[int] = None, heads_share: bool = True, block_length: Optional[int] = None,
                 proximal_bias: bool = False, proximal_init: bool = False):
        super().__init__()
        if channels % n_heads != 0:
            raise ValueError(f"channels ({channels}) must be divisible by n_heads ({n_heads})")
        self.channels = channels
        self.out_channels = out_channels
        self.n_heads = n_heads
        self.p_dropout = p_dropout
        self.window_size = window_size
        self.heads_share = heads_share
        self.block_length = block_length
        self.proximal_bias = proximal_bias
        self.proximal_init = proximal_init
        self.attn = None

        self.k_channels = channels // n_heads
        self.conv_q = nn.Conv1d(channels, channels, 1)
        self.conv_k = nn.Conv1d(channels, channels, 1)
        self.conv_v = nn.Conv1d(channels, channels, 1)
        self.conv_o = nn.Conv1d(channels, out_channels, 1)
        self.drop = nn.Dropout(p_dropout)

        if window_size is not None:
            n_heads_rel = 1 if heads_share else n_heads
            rel_stddev = self.k_channels**-0.5
            self.emb_rel_k = nn.Parameter(torch.randn(n_heads_rel, 2 * window_size + 1, self.k_channels) * rel_stddev)
            self.emb_rel_v = nn.Parameter(torch.randn(n_heads_rel, 2 * window_size + 1, self.k_channels) * rel_stddev)

        nn.init.xavier_uniform_(self.conv_q.weight)
        nn.init.xavier_uniform_(self.conv_k.weight)
        nn.init.xavier_uniform_(self.conv_v.weight)
        if proximal_init:
            with torch.no_grad():
                self.conv_k.weight.copy_(self.conv_q.weight)
                self.conv_k.bias.copy_(self.conv_q.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, k, v = self.conv_q(x), self.conv_k(c), self.conv_v(c)
        x, self.attn = self.attention(q, k, v, mask=attn_mask)
        return self.conv_o(x)

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  mask: Optional[torch.Tensor] = None):
        """query [b, d, t_t], key/value [b, d, t_s] -> (output [b, d, t_t], weights [b, n_h, t_t, t_s])."""
        b, d, t_s, t_t = key.size(0), key.size(1), key.size(2), query.size(2)
        query = query.view(b, self.n_heads, self.k_channels, t_t).transpose(2, 3)
        key = key.view(b, self.n_heads, self.k_channels, t_s).transpose(2, 3)
        value = value.view(b, self.n_heads, self.k_channels, t_s).transpose(2, 3)

        query = query / math.sqrt(self.k_channels)
        scores = torch.matmul(query, key.transpose(-2, -1))
        if self.window_size is not None:
            if t_s != t_t:
                raise ValueError("relative attention is only available for self-attention")
            rel_keys = self._get_relative_embeddings(self.emb_rel_k, t_s)
            rel_logits = self._matmul_with_relative_keys(query, rel_keys)
            scores = scores + self._relative_position_to_absolute_position(rel_logits)
        if self.proximal_bias:
            if t_s != t_t:
                raise ValueError("proximal bias is only available for self-attention")
            scores = scores + self._attention_bias_proximal(t_s).to(device=scores.device, dtype=scores.dtype)
        if mask is not None:
            scores = scores.masked_fill(mask == 0, -1e4)
            if self.block_length is not None:
                if t_s != t_t:
                    raise ValueError("local attention is only available for self-attention")
                block_mask = torch.ones_like(scores).triu(-self.block_length).tril(self.block_length)
                scores = scores.masked_fill(block_mask == 0, -1e4)
        p_attn = self.drop(F.softmax(scores, dim=-1))  # [b, n_h, t_t, t_s]
        output = torch.matmul(p_attn, value)
        if self.window_size is not None:
            rel_weights = self._absolute_position_to_relative_position(p_attn)
            rel_values = self._get_relative_embeddings(self.emb_rel_v, t_s)
            output = output + self._matmul_with_relative_values(rel_weights, rel_values)
        output = output.transpose(2, 3).contiguous().view(b, d, t_t)
        return output, p_attn

    @staticmethod
    def _matmul_with_relative_values(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x [b, h, l, m] @ y [h or 1, m, d] -> [b, h, l, d]."""
        return torch.matmul(x, y.unsqueeze(0))

    @staticmethod
    def _matmul_with_relative_keys(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x [b, h, l, d] @ y [h or 1, m, d]^T -> [b, h, l, m]."""
        return torch.matmul(x, y.unsqueeze(0).transpose(-2, -1))

    def _get_relative_embeddings(self, relative_embeddings: torch.Tensor, length: int) -> torch.Tensor:
        """The 2*length-1 embeddings for offsets -(length-1)..(length-1), zero beyond the window."""
        pad_length = max(length - (self.window_size + 1), 0)
        start = max((self.window_size + 1) - length, 0)
        # Pad unconditionally-shaped so that tracing/export sees no data-dependent branches.
        if pad_length > 0:
            relative_embeddings = F.pad(relative_embeddings, (0, 0, pad_length, pad_length, 0, 0))
        return relative_embeddings[:, start: start + 2 * length - 1]

    @staticmethod
    def _relative_position_to_absolute_position(x: torch.Tensor) -> torch.Tensor:
        """[b, h, l, 2l-1] indexed by relative offset -> [b, h, l, l] indexed by absolute key position."""
        batch, heads, length, _ = x.size()
        x = F.pad(x, (0, 1, 0, 0, 0, 0, 0, 0))
        x_flat = F.pad(x.view(batch, heads, 2 * length * length), (0, length - 1, 0, 0, 0, 0))
        return x_flat.view(batch, heads, length + 1, 2 * length - 1)[:, :, :length, length - 1:]

    @staticmethod
    def _absolute_position_to_relative_position(x: torch.Tensor) -> torch.Tensor:
        """[b, h, l, l] indexed by absolute key position -> [b, h, l, 2l-1] indexed by relative offset."""
        batch, heads, length, _ = x.size()
        x = F.pad(x, (0, length - 1, 0, 0, 0, 0, 0, 0))
        x_flat = F.pad(x.view(batch, heads, length * length + length * (length - 1)), (length, 0, 0, 0, 0, 0))
        return x_flat.view(batch, heads, length, 2 * length)[:, :, :, 1:]

    @staticmethod
    def _attention_bias_proximal(length: int) -> torch.Tensor:
        """Bias [1, 1, length, length] of -log(1 + |i - j|), favouring nearby positions."""
        r = torch.arange(length, dtype=torch.float32)
        diff = r.unsqueeze(0) - r.unsqueeze(1)
        return (-torch.log1p(diff.abs())).unsqueeze(0).unsqueeze(0)


class FFN(nn.Module):
    """Two convolutions with ReLU (or fast GELU) between, 'same' or causal padding, masked.

    forward(x [b, in, t], x_mask [b, 1, t]) -> [b, out, t]
    """

    def __init__(self, in_channels: int, out_channels: int, filter_channels: int, kernel_size: int,
                 p_dropout: float = 0.0, activation: str = "", causal: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.filter_channels = filter_channels
        self.kernel_size = kernel_size
        self.p_dropout = p_dropout
        self.activation = activation
        self.causal = causal

        self.conv_1 = nn.Conv1d(in_channels, filter_channels, kernel_size)
        self.conv_2 = nn.Conv1d(filter_channels, out_channels, kernel_size)
        self.drop = nn.Dropout(p_dropout)

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor) -> torch.Tensor:
        x = self.conv_1(self._pad(x * x_mask))
        x = x * torch.sigmoid(1.702 * x) if self.activation == "gelu" else torch.relu(x)
        x = self.conv_2(self._pad(self.drop(x) * x_mask))
        return x * x_mask

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_size == 1:
            return x
        if self.causal:
            left, right = self.kernel_size - 1, 0
        else:
            left, right = (self.kernel_size - 1) // 2, self.kernel_size // 2
        return F.pad(x, (left, right, 0, 0, 0, 0))
