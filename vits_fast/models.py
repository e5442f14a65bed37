"""VITS as Piper uses it (Piper's ``models``): text encoder, duration predictors, flows, decoder, discriminators.

``SynthesizerTrn`` takes the same constructor arguments and has the same submodules and state_dict keys as
Piper's/VITS's, so upstream checkpoints load with ``strict=True``. With the reference backend and the same RNG
state, ``forward``, ``infer`` and ``voice_conversion`` return what upstream returns. On the fused (Triton) path,
random draws happen on the tensors' device instead of the CPU generator, so a CUDA step never waits on the host.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import Conv1d, Conv2d, ConvTranspose1d
from torch.nn import functional as F

from . import attentions, commons, modules
from .backend import current_backend, eager, on_host, use_triton
from .commons import get_padding, init_weights, remove_weight_norm, spectral_norm, stage, weight_norm
from .monotonic_align import maximum_path


def _rng_device(module: nn.Module, x: torch.Tensor) -> Optional[str]:
    """Where random draws happen: upstream's CPU generator on the reference path, ``x``'s device on the fused one."""
    if not on_host(x) and use_triton(x, module=module):
        return None
    return "cpu"


def _randn(shape: Sequence[int], like: torch.Tensor, rng_device: Optional[str]) -> torch.Tensor:
    """Standard normal draws of ``like``'s dtype/device, drawn on ``rng_device`` (None: ``like.device``)."""
    return torch.randn(*shape, device=like.device if rng_device is None else rng_device).to(like)


class StochasticDurationPredictor(nn.Module):
    """Flow-based duration model: ``forward`` gives the NLL bound [b] of durations ``w``; ``reverse`` samples log w.

    forward(x [b, h, t], x_mask [b, 1, t], w [b, 1, t], g [b, gin, 1]) -> nll [b]
    forward(..., reverse=True, noise_scale) -> logw [b, 1, t]
    """

    def __init__(self, in_channels: int, filter_channels: int, kernel_size: int, p_dropout: float,
                 n_flows: int = 4, gin_channels: int = 0):
        super().__init__()
        filter_channels = in_channels  # as upstream: the argument is overridden
        self.in_channels = in_channels
        self.filter_channels = filter_channels
        self.kernel_size = kernel_size
        self.p_dropout = p_dropout
        self.n_flows = n_flows
        self.gin_channels = gin_channels

        self.log_flow = modules.Log()
        self.flows = self._flow_stack(n_flows, filter_channels, kernel_size)
        self.post_pre = nn.Conv1d(1, filter_channels, 1)
        self.post_proj = nn.Conv1d(filter_channels, filter_channels, 1)
        self.post_convs = modules.DDSConv(filter_channels, kernel_size, n_layers=3, p_dropout=p_dropout)
        self.post_flows = self._flow_stack(4, filter_channels, kernel_size)

        self.pre = nn.Conv1d(in_channels, filter_channels, 1)
        self.proj = nn.Conv1d(filter_channels, filter_channels, 1)
        self.convs = modules.DDSConv(filter_channels, kernel_size, n_layers=3, p_dropout=p_dropout)
        if gin_channels != 0:
            self.cond = nn.Conv1d(gin_channels, filter_channels, 1)

    @staticmethod
    def _flow_stack(n_flows: int, filter_channels: int, kernel_size: int) -> nn.ModuleList:
        flows = nn.ModuleList([modules.ElementwiseAffine(2)])
        for _ in range(n_flows):
            flows.append(modules.ConvFlow(2, filter_channels, kernel_size, n_layers=3))
            flows.append(modules.Flip())
        return flows

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, w: Optional[torch.Tensor] = None,
                g: Optional[torch.Tensor] = None, reverse: bool = False, noise_scale: float = 1.0):
        rng = _rng_device(self, x)
        x = self.pre(torch.detach(x))
        if g is not None:
            x = x + self.cond(torch.detach(g))
        x = self.convs(x, x_mask)
        x = self.proj(x) * x_mask

        if reverse:
            flows = list(reversed(self.flows))
            flows = flows[:-2] + [flows[-1]]  # the posterior's first ConvFlow is not needed to sample
            z = _randn((x.size(0), 2, x.size(2)), x, rng) * noise_scale
            for flow in flows:
                z = flow(z, x_mask, g=x, reverse=True)
            return z[:, :1]

        if w is None:
            raise ValueError("StochasticDurationPredictor: durations `w` are required unless reverse=True")
        # Variational posterior q(u, nu | w): dequantisation noise u and the extra channel nu.
        h_w = self.post_proj(self.post_convs(self.post_pre(w), x_mask)) * x_mask
        e_q = _randn((w.size(0), 2, w.size(2)), x, rng) * x_mask
        z_q = e_q
        logdet_tot_q = 0
        for flow in self.post_flows:
            z_q, logdet_q = flow(z_q, x_mask, g=(x + h_w))
            logdet_tot_q += logdet_q
        z_u, z1 = torch.split(z_q, [1, 1], 1)
        u = torch.sigmoid(z_u) * x_mask
        z0 = (w - u) * x_mask
        logdet_tot_q += torch.sum((F.logsigmoid(z_u) + F.logsigmoid(-z_u)) * x_mask, [1, 2])
        logq = torch.sum(-0.5 * (math.log(2 * math.pi) + (e_q**2)) * x_mask, [1, 2]) - logdet_tot_q

        logdet_tot = 0
        z0, logdet = self.log_flow(z0, x_mask)
        logdet_tot += logdet
        z = torch.cat([z0, z1], 1)
        for flow in self.flows:
            z, logdet = flow(z, x_mask, g=x, reverse=False)
            logdet_tot = logdet_tot + logdet
        nll = torch.sum(0.5 * (math.log(2 * math.pi) + (z**2)) * x_mask, [1, 2]) - logdet_tot
        return nll + logq


class DurationPredictor(nn.Module):
    """Deterministic log-duration regressor: two conv/ReLU/LayerNorm/dropout blocks and a projection.

    forward(x [b, h, t], x_mask [b, 1, t], g [b, gin, 1]) -> logw [b, 1, t]
    """

    def __init__(self, in_channels: int, filter_channels: int, kernel_size: int, p_dropout: float,
                 gin_channels: int = 0):
        super().__init__()
        self.in_channels = in_channels
        self.filter_channels = filter_channels
        self.kernel_size = kernel_size
        self.p_dropout = p_dropout
        self.gin_channels = gin_channels

        self.drop = nn.Dropout(p_dropout)
        self.conv_1 = nn.Conv1d(in_channels, filter_channels, kernel_size, padding=kernel_size // 2)
        self.norm_1 = modules.LayerNorm(filter_channels)
        self.conv_2 = nn.Conv1d(filter_channels, filter_channels, kernel_size, padding=kernel_size // 2)
        self.norm_2 = modules.LayerNorm(filter_channels)
        self.proj = nn.Conv1d(filter_channels, 1, 1)
        if gin_channels != 0:
            self.cond = nn.Conv1d(gin_channels, in_channels, 1)

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, g: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = torch.detach(x)
        if g is not None:
            x = x + self.cond(torch.detach(g))
        x = self.drop(self.norm_1(torch.relu(self.conv_1(x * x_mask))))
        x = self.drop(self.norm_2(torch.relu(self.conv_2(x * x_mask))))
        return self.proj(x * x_mask) * x_mask


class TextEncoder(nn.Module):
    """Phoneme ids -> prior statistics.

    forward(x [b, t] int, x_lengths [b]) -> (hidden [b, h, t], m [b, out, t], logs [b, out, t], x_mask [b, 1, t])
    """

    def __init__(self, n_vocab: int, out_channels: int, hidden_channels: int, filter_channels: int, n_heads: int,
                 n_layers: int, kernel_size: int, p_dropout: float):
        super().__init__()
        self.n_vocab = n_vocab
        self.out_channels = out_channels
        self.hidden_channels = hidden_channels
        self.filter_channels = filter_channels
        self.n_heads = n_heads
        self.n_layers = n_layers
        self.kernel_size = kernel_size
        self.p_dropout = p_dropout

        self.emb = nn.Embedding(n_vocab, hidden_channels)
        nn.init.normal_(self.emb.weight, 0.0, hidden_channels**-0.5)
        self.encoder = attentions.Encoder(hidden_channels, filter_channels, n_heads, n_layers, kernel_size,
                                          p_dropout)
        self.proj = nn.Conv1d(hidden_channels, out_channels * 2, 1)

    def forward(self, x: torch.Tensor, x_lengths: torch.Tensor):
        x = torch.transpose(self.emb(x) * math.sqrt(self.hidden_channels), 1, -1)  # [b, h, t]
        x_mask = torch.unsqueeze(commons.sequence_mask(x_lengths, x.size(2)), 1).type_as(x)
        x = self.encoder(x * x_mask, x_mask)
        stats = self.proj(x) * x_mask
        m, logs = torch.split(stats, self.out_channels, dim=1)
        return x, m, logs, x_mask


class ResidualCouplingBlock(nn.Module):
    """Volume-preserving flow between the posterior latent and the prior: [coupling, Flip] x n_flows.

    forward(x [b, c, t], x_mask [b, 1, t], g=None, reverse=False) -> [b, c, t]
    """

    fused_family = "coupling"  # auto's rule: vits_fast.backend.AUTO_FUSED_FROM

    def __init__(self, channels: int, hidden_channels: int, kernel_size: int, dilation_rate: int, n_layers: int,
                 n_flows: int = 4, gin_channels: int = 0):
        super().__init__()
        self.channels = channels
        self.hidden_channels = hidden_channels
        self.kernel_size = kernel_size
        self.dilation_rate = dilation_rate
        self.n_layers = n_layers
        self.n_flows = n_flows
        self.gin_channels = gin_channels

        self.flows = nn.ModuleList()
        for _ in range(n_flows):
            self.flows.append(modules.ResidualCouplingLayer(channels, hidden_channels, kernel_size, dilation_rate,
                                                            n_layers, gin_channels=gin_channels, mean_only=True))
            self.flows.append(modules.Flip())

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, g: Optional[torch.Tensor] = None,
                reverse: bool = False) -> torch.Tensor:
        if use_triton(x, module=self):  # fused couplings that write their output already flipped
            from .kernels import coupling as _coupling

            return _coupling.residual_coupling_block_forward(self, x, x_mask, g, reverse)
        if not reverse:
            for flow in self.flows:
                x, _ = flow(x, x_mask, g=g, reverse=False)
        else:
            for flow in reversed(self.flows):
                x = flow(x, x_mask, g=g, reverse=True)
        return x


class PosteriorEncoder(nn.Module):
    """Linear spectrogram -> posterior latent z (reparameterised sample).

    forward(y [b, spec, t], y_lengths [b], g=None) -> (z, m, logs [b, out, t], y_mask [b, 1, t])
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int, kernel_size: int,
                 dilation_rate: int, n_layers: int, gin_channels: int = 0):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.hidden_channels = hidden_channels
        self.kernel_size = kernel_size
        self.dilation_rate = dilation_rate
        self.n_layers = n_layers
        self.gin_channels = gin_channels

        self.pre = nn.Conv1d(in_channels, hidden_channels, 1)
        self.enc = modules.WN(hidden_channels, kernel_size, dilation_rate, n_layers, gin_channels=gin_channels)
        self.proj = nn.Conv1d(hidden_channels, out_channels * 2, 1)

    def forward(self, x: torch.Tensor, x_lengths: torch.Tensor, g: Optional[torch.Tensor] = None):
        x_mask = torch.unsqueeze(commons.sequence_mask(x_lengths, x.size(2)), 1).type_as(x)
        x = self.enc(self.pre(x) * x_mask, x_mask, g=g)
        stats = self.proj(x) * x_mask
        m, logs = torch.split(stats, self.out_channels, dim=1)
        z = (m + torch.randn_like(m) * torch.exp(logs)) * x_mask
        return z, m, logs, x_mask


class Generator(nn.Module):
    """HiFi-GAN decoder: latent [b, c, t] -> waveform [b, 1, t * prod(upsample_rates)]."""

    fused_family = "hifigan"  # auto's rule: vits_fast.backend.AUTO_FUSED_FROM

    def __init__(self, initial_channel: int, resblock: Optional[str], resblock_kernel_sizes: Tuple[int, ...],
                 resblock_dilation_sizes: Tuple[Tuple[int, ...], ...], upsample_rates: Tuple[int, ...],
                 upsample_initial_channel: int, upsample_kernel_sizes: Tuple[int, ...], gin_channels: int = 0):
        super().__init__()
        self.LRELU_SLOPE = modules.LRELU_SLOPE
        self.num_kernels = len(resblock_kernel_sizes)
        self.num_upsamples = len(upsample_rates)
        self.conv_pre = Conv1d(initial_channel, upsample_initial_channel, 7, 1, padding=3)
        resblock_module = modules.ResBlock1 if resblock == "1" else modules.ResBlock2

        self.ups = nn.ModuleList()
        for i, (u, k) in enumerate(zip(upsample_rates, upsample_kernel_sizes)):
            self.ups.append(weight_norm(ConvTranspose1d(upsample_initial_channel // (2**i),
                                                        upsample_initial_channel // (2 ** (i + 1)),
                                                        k, u, padding=(k - u) // 2)))

        self.resblocks = nn.ModuleList()
        for i in range(len(self.ups)):
            ch = upsample_initial_channel // (2 ** (i + 1))
            for k, d in zip(resblock_kernel_sizes, resblock_dilation_sizes):
                self.resblocks.append(resblock_module(ch, k, d))

        self.conv_post = Conv1d(ch, 1, 7, 1, padding=3, bias=False)
        self.ups.apply(init_weights)
        if gin_channels != 0:
            self.cond = nn.Conv1d(gin_channels, upsample_initial_channel, 1)

    def forward(self, x: torch.Tensor, g: Optional[torch.Tensor] = None,
                x_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [b, c, t], g [b, gin, 1] -> audio [b, 1, t * prod(upsample_rates)].

        With ``x_mask`` [b, 1, t] every convolution sees zeros past each item's length, so each item of a padded
        batch decodes exactly as it would alone, and the padding decodes to silence. Without it (upstream's
        behaviour, used in training on full-length slices) the padding's activations leak into the last samples.
        A mask with no padding (batch 1, equal lengths) is dropped where that costs no device synchronisation and
        no graph break (eager, host tensors): multiplying by ones changes nothing but the time (7-10 % of CPU
        synthesis).
        """
        if x_mask is not None and on_host(x_mask) and eager() and bool(x_mask.all()):
            x_mask = None
        if use_triton(x, module=self):
            from .kernels import hifigan as _hifigan

            return _hifigan.generator_forward(self, x, g, x_mask)
        x = self.conv_pre(x if x_mask is None else x * x_mask)
        if g is not None:
            x = x + self.cond(g)
        for i, up in enumerate(self.ups):
            x = F.leaky_relu(x, self.LRELU_SLOPE)
            if x_mask is not None:
                x = x * x_mask
                x_mask = torch.repeat_interleave(x_mask, up.stride[0], dim=2)
            x = up(x)
            blocks = self.resblocks[i * self.num_kernels: (i + 1) * self.num_kernels]
            xs = blocks[0](x, x_mask)
            for block in blocks[1:]:
                xs += block(x, x_mask)
            x = xs / self.num_kernels
        x = F.leaky_relu(x)
        if x_mask is None:
            return torch.tanh(self.conv_post(x))
        return torch.tanh(self.conv_post(x * x_mask)) * x_mask

    def remove_weight_norm(self) -> None:
        for layer in self.ups:
            remove_weight_norm(layer)
        for block in self.resblocks:
            block.remove_weight_norm()


class DiscriminatorP(nn.Module):
    """Period discriminator: the waveform folded into [t / period, period] and judged with 2-D convs.

    The fast path (kernel family ``period``; backend ``triton``, not yet ``auto``) runs every (k, 1) 2-D
    convolution as a 1-D convolution over the frames with the period folded into the batch
    (:func:`_period_forward_folded`): the same products and sums, in the layout of a plain 1-D convolution. The
    first GPU profile ran the 2-D convolutions' backward at about a tenth of the 1-D rate.
    """

    fused_family = "period"  # auto's rule: vits_fast.backend.AUTO_FUSED_FROM

    def __init__(self, period: int, kernel_size: int = 5, stride: int = 3, use_spectral_norm: bool = False):
        super().__init__()
        self.LRELU_SLOPE = modules.LRELU_SLOPE
        self.period = period
        self.use_spectral_norm = use_spectral_norm
        norm_f = spectral_norm if use_spectral_norm else weight_norm
        pad = (get_padding(kernel_size, 1), 0)
        chans = [1, 32, 128, 512, 1024, 1024]
        self.convs = nn.ModuleList([
            norm_f(Conv2d(cin, cout, (kernel_size, 1), (stride if i < 4 else 1, 1), padding=pad))
            for i, (cin, cout) in enumerate(zip(chans[:-1], chans[1:]))
        ])
        self.conv_post = norm_f(Conv2d(1024, 1, (3, 1), 1, padding=(1, 0)))

    def forward(self, x: torch.Tensor):
        """x [b, 1, t] -> (scores [b, n], feature maps [b, ch, frames, period])."""
        if not self.use_spectral_norm and use_triton(x, module=self):
            return _period_forward_folded(self, x)
        fmap = []
        b, c, t = x.shape
        if t % self.period != 0:
            n_pad = self.period - (t % self.period)
            x = F.pad(x, (0, n_pad), "reflect")
            t = t + n_pad
        x = x.view(b, c, t // self.period, self.period)
        for layer in self.convs:
            x = F.leaky_relu(layer(x), self.LRELU_SLOPE)
            fmap.append(x)
        x = self.conv_post(x)
        fmap.append(x)
        return torch.flatten(x, 1, -1), fmap


def _period_forward_folded(disc: DiscriminatorP, x: torch.Tensor):
    """``DiscriminatorP.forward`` with each (k, 1) convolution run as a 1-D convolution of the [b * period, ch,
    frames] batch (weight norm or none; spectral norm keeps the 2-D path). The feature maps are views in the module's [b, ch, frames, period] layout
    (no copy); the scores are the module's."""
    b, c, t = x.shape
    p = disc.period
    if t % p:
        x = F.pad(x, (0, p - t % p), "reflect")
        t = x.shape[-1]
    h = x.view(b, c, t // p, p).permute(0, 3, 1, 2).reshape(b * p, c, t // p)

    def conv(layer: nn.Conv2d, h: torch.Tensor) -> torch.Tensor:
        return F.conv1d(h, commons.current_weight(layer)[..., 0], layer.bias, stride=layer.stride[0],
                        padding=layer.padding[0])

    def as_2d(h: torch.Tensor) -> torch.Tensor:
        return h.view(b, p, h.shape[1], h.shape[2]).permute(0, 2, 3, 1)

    fmap = []
    for layer in disc.convs:
        h = F.leaky_relu(conv(layer, h), disc.LRELU_SLOPE)
        fmap.append(as_2d(h))
    out = as_2d(conv(disc.conv_post, h))
    fmap.append(out)
    return torch.flatten(out, 1, -1), fmap


class DiscriminatorS(nn.Module):
    """Scale discriminator on the raw waveform with grouped strided 1-D convs."""

    def __init__(self, use_spectral_norm: bool = False):
        super().__init__()
        self.LRELU_SLOPE = modules.LRELU_SLOPE
        norm_f = spectral_norm if use_spectral_norm else weight_norm
        self.convs = nn.ModuleList([
            norm_f(Conv1d(1, 16, 15, 1, padding=7)),
            norm_f(Conv1d(16, 64, 41, 4, groups=4, padding=20)),
            norm_f(Conv1d(64, 256, 41, 4, groups=16, padding=20)),
            norm_f(Conv1d(256, 1024, 41, 4, groups=64, padding=20)),
            norm_f(Conv1d(1024, 1024, 41, 4, groups=256, padding=20)),
            norm_f(Conv1d(1024, 1024, 5, 1, padding=2)),
        ])
        self.conv_post = norm_f(Conv1d(1024, 1, 3, 1, padding=1))

    def forward(self, x: torch.Tensor):
        """x [b, 1, t] -> (scores [b, n], feature maps)."""
        fmap = []
        for layer in self.convs:
            x = F.leaky_relu(layer(x), self.LRELU_SLOPE)
            fmap.append(x)
        x = self.conv_post(x)
        fmap.append(x)
        return torch.flatten(x, 1, -1), fmap


class MultiPeriodDiscriminator(nn.Module):
    """One scale discriminator and period discriminators for periods 2, 3, 5, 7, 11."""

    def __init__(self, use_spectral_norm: bool = False):
        super().__init__()
        periods = [2, 3, 5, 7, 11]
        discs = [DiscriminatorS(use_spectral_norm=use_spectral_norm)]
        discs += [DiscriminatorP(p, use_spectral_norm=use_spectral_norm) for p in periods]
        self.discriminators = nn.ModuleList(discs)

    def forward(self, y: torch.Tensor, y_hat: torch.Tensor):
        """Real y and generated y_hat [b, 1, t] -> (real scores, fake scores, real fmaps, fake fmaps)."""
        y_d_rs, y_d_gs, fmap_rs, fmap_gs = [], [], [], []
        for d in self.discriminators:
            y_d_r, fmap_r = d(y)
            y_d_g, fmap_g = d(y_hat)
            y_d_rs.append(y_d_r)
            y_d_gs.append(y_d_g)
            fmap_rs.append(fmap_r)
            fmap_gs.append(fmap_g)
        return y_d_rs, y_d_gs, fmap_rs, fmap_gs


# --- input validation ---------------------------------------------------------------------------------------
# Only shapes and dtypes are checked (no host synchronisation); value checks on lengths run on CPU tensors,
# or on CUDA tensors only on the reference backend, where upstream synchronises anyway.

def _check_ids(name: str, x: torch.Tensor, n_vocab: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be [batch, phonemes], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name} must hold integer phoneme ids, got dtype {x.dtype}")
    if on_host(x) and x.numel() and (int(x.min()) < 0 or int(x.max()) >= n_vocab):
        raise ValueError(f"{name} holds ids outside the vocabulary [0, {n_vocab}): "
                         f"min {int(x.min())}, max {int(x.max())}")


def _check_lengths(name: str, lengths: torch.Tensor, batch: int, max_len: int, dim_name: str) -> None:
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(lengths).__name__}")
    if lengths.dim() != 1 or lengths.size(0) != batch:
        raise ValueError(f"{name} must have shape [{batch}] (one length per item), got {tuple(lengths.shape)}")
    if lengths.is_floating_point() or lengths.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got dtype {lengths.dtype}")
    if not on_host(lengths) and current_backend() != "reference":
        return  # value checks would synchronise with the host
    if batch and int(lengths.min()) <= 0:
        raise ValueError(f"{name} must be positive, got {lengths.tolist()}")
    if batch and int(lengths.max()) > max_len:
        raise ValueError(f"{name} has a length {int(lengths.max())} larger than the {dim_name} ({max_len})")


class SynthesizerTrn(nn.Module):
    """VITS synthesizer for training and inference (Piper-compatible drop-in)."""

    def __init__(self, n_vocab: int, spec_channels: int, segment_size: int, inter_channels: int,
                 hidden_channels: int, filter_channels: int, n_heads: int, n_layers: int, kernel_size: int,
                 p_dropout: float, resblock: str, resblock_kernel_sizes: Tuple[int, ...],
                 resblock_dilation_sizes: Tuple[Tuple[int, ...], ...], upsample_rates: Tuple[int, ...],
                 upsample_initial_channel: int, upsample_kernel_sizes: Tuple[int, ...], n_speakers: int = 1,
                 gin_channels: int = 0, use_sdp: bool = True):
        super().__init__()
        self.n_vocab = n_vocab
        self.spec_channels = spec_channels
        self.inter_channels = inter_channels
        self.hidden_channels = hidden_channels
        self.filter_channels = filter_channels
        self.n_heads = n_heads
        self.n_layers = n_layers
        self.kernel_size = kernel_size
        self.p_dropout = p_dropout
        self.resblock = resblock
        self.resblock_kernel_sizes = resblock_kernel_sizes
        self.resblock_dilation_sizes = resblock_dilation_sizes
        self.upsample_rates = upsample_rates
        self.upsample_initial_channel = upsample_initial_channel
        self.upsample_kernel_sizes = upsample_kernel_sizes
        self.segment_size = segment_size
        self.n_speakers = n_speakers
        self.gin_channels = gin_channels
        self.use_sdp = use_sdp
        if n_speakers > 1 and gin_channels <= 0:
            raise ValueError(f"a multi-speaker model (n_speakers={n_speakers}) needs gin_channels > 0")

        self.enc_p = TextEncoder(n_vocab, inter_channels, hidden_channels, filter_channels, n_heads, n_layers,
                                 kernel_size, p_dropout)
        self.dec = Generator(inter_channels, resblock, resblock_kernel_sizes, resblock_dilation_sizes,
                             upsample_rates, upsample_initial_channel, upsample_kernel_sizes,
                             gin_channels=gin_channels)
        self.enc_q = PosteriorEncoder(spec_channels, inter_channels, hidden_channels, 5, 1, 16,
                                      gin_channels=gin_channels)
        self.flow = ResidualCouplingBlock(inter_channels, hidden_channels, 5, 1, 4, gin_channels=gin_channels)
        if use_sdp:
            self.dp = StochasticDurationPredictor(hidden_channels, 192, 3, 0.5, 4, gin_channels=gin_channels)
        else:
            self.dp = DurationPredictor(hidden_channels, 256, 3, 0.5, gin_channels=gin_channels)
        if n_speakers > 1:
            self.emb_g = nn.Embedding(n_speakers, gin_channels)

    # -- helpers ---------------------------------------------------------------------------------------------
    def _speaker(self, sid: Optional[torch.Tensor], batch: int, name: str = "sid") -> Optional[torch.Tensor]:
        """Speaker embedding [b, gin, 1], or None for a single-speaker model."""
        if self.n_speakers <= 1:
            return None
        if sid is None:
            raise ValueError(f"`{name}` is required: this model has {self.n_speakers} speakers")
        if not isinstance(sid, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor of speaker ids, got {type(sid).__name__}")
        if sid.dim() != 1 or sid.size(0) != batch:
            raise ValueError(f"`{name}` must have shape [{batch}], got {tuple(sid.shape)}")
        if on_host(sid) and batch and (int(sid.min()) < 0 or int(sid.max()) >= self.n_speakers):
            raise ValueError(f"`{name}` must be in [0, {self.n_speakers}), got {sid.tolist()}")
        return self.emb_g(sid).unsqueeze(-1)

    def _check_text(self, x: torch.Tensor, x_lengths: torch.Tensor) -> None:
        _check_ids("x", x, self.n_vocab)
        _check_lengths("x_lengths", x_lengths, x.size(0), x.size(1), "number of phoneme positions in x")

    def _check_spec(self, y: torch.Tensor, y_lengths: torch.Tensor, batch: Optional[int] = None,
                    name: str = "y") -> None:
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
        if y.dim() != 3:
            raise ValueError(f"{name} must be a spectrogram [batch, {self.spec_channels}, frames], "
                             f"got shape {tuple(y.shape)}")
        batch = y.size(0) if batch is None else batch
        if y.size(0) != batch or y.size(1) != self.spec_channels:
            raise ValueError(f"{name} must have shape [{batch}, {self.spec_channels}, frames], got {tuple(y.shape)}")
        if not y.is_floating_point():
            raise TypeError(f"{name} must be floating point, got dtype {y.dtype}")
        _check_lengths(f"{name}_lengths", y_lengths, batch, y.size(2), f"number of frames in {name}")

    # -- public API ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, x_lengths: torch.Tensor, y: torch.Tensor, y_lengths: torch.Tensor,
                sid: Optional[torch.Tensor] = None):
        """Training pass.

        x [b, t_x] phoneme ids, x_lengths [b], y [b, spec, t_y] linear spectrogram, y_lengths [b], sid [b].
        Returns (audio slice [b, 1, segment*hop], l_length [b], attn [b, 1, t_y, t_x], ids_slice [b],
        x_mask [b, 1, t_x], y_mask [b, 1, t_y], (z, z_p, m_p, logs_p, m_q, logs_q)).
        """
        self._check_text(x, x_lengths)
        self._check_spec(y, y_lengths, x.size(0))
        with stage("text_encoder"):
            x, m_p, logs_p, x_mask = self.enc_p(x, x_lengths)
            g = self._speaker(sid, x.size(0))
        with stage("posterior_encoder"):
            z, m_q, logs_q, y_mask = self.enc_q(y, y_lengths, g=g)
        with stage("flow"):
            z_p = self.flow(z, y_mask, g=g)

        with torch.no_grad(), stage("alignment_search"):
            # log N(z_p; m_p, exp(logs_p)) for every (frame, token) pair, summed over channels: [b, t_y, t_x]
            s_p_sq_r = torch.exp(-2 * logs_p)  # [b, d, t_x]
            neg_cent1 = torch.sum(-0.5 * math.log(2 * math.pi) - logs_p, [1], keepdim=True)  # [b, 1, t_x]
            neg_cent2 = torch.matmul(-0.5 * (z_p**2).transpose(1, 2), s_p_sq_r)  # [b, t_y, t_x]
            neg_cent3 = torch.matmul(z_p.transpose(1, 2), (m_p * s_p_sq_r))  # [b, t_y, t_x]
            neg_cent4 = torch.sum(-0.5 * (m_p**2) * s_p_sq_r, [1], keepdim=True)  # [b, 1, t_x]
            neg_cent = neg_cent1 + neg_cent2 + neg_cent3 + neg_cent4

            # lengths rather than a dense mask: on CUDA nothing here waits on the host
            attn = maximum_path(neg_cent, x_lengths=x_lengths, y_lengths=y_lengths).unsqueeze(1).detach()

        with stage("duration_predictor"):
            w = attn.sum(2)
            if self.use_sdp:
                l_length = self.dp(x, x_mask, w, g=g) / torch.sum(x_mask)
            else:
                logw_ = torch.log(w + 1e-6) * x_mask
                logw = self.dp(x, x_mask, g=g)
                l_length = torch.sum((logw - logw_) ** 2, [1, 2]) / torch.sum(x_mask)

        # expand the prior to frame rate
        m_p = torch.matmul(attn.squeeze(1), m_p.transpose(1, 2)).transpose(1, 2)
        logs_p = torch.matmul(attn.squeeze(1), logs_p.transpose(1, 2)).transpose(1, 2)

        with stage("decoder"):
            z_slice, ids_slice = commons.rand_slice_segments(z, y_lengths, self.segment_size,
                                                             rng_device=_rng_device(self, z))
            o = self.dec(z_slice, g=g)
        return o, l_length, attn, ids_slice, x_mask, y_mask, (z, z_p, m_p, logs_p, m_q, logs_q)

    def infer(self, x: torch.Tensor, x_lengths: torch.Tensor, sid: Optional[torch.Tensor] = None,
              noise_scale: float = 0.667, length_scale: float = 1, noise_scale_w: float = 0.8,
              max_len: Optional[int] = None, max_frames: Optional[int] = None):
        """Synthesis: x [b, t_x] ids, x_lengths [b] -> (audio [b, 1, samples], attn [b, 1, t_y, t_x],
        y_mask [b, 1, t_y], (z, z_p, m_p, logs_p)).

        Each item of a padded batch decodes as it would alone (the decoder is masked), and its audio past
        ``y_mask.sum() * hop`` samples is silence. For a batch of one this is upstream's result exactly; upstream
        lets the padding of shorter items leak into their last samples. ``max_frames``: see :meth:`infer_latent`."""
        z, y_mask, g, attn, (z_p, m_p, logs_p) = self.infer_latent(x, x_lengths, sid, noise_scale, length_scale,
                                                                   noise_scale_w, max_frames=max_frames)
        with stage("decoder"):
            o = self.dec((z * y_mask)[:, :, :max_len], g=g, x_mask=y_mask[:, :, :max_len])
        return o, attn, y_mask, (z, z_p, m_p, logs_p)

    def infer_latent(self, x: torch.Tensor, x_lengths: torch.Tensor, sid: Optional[torch.Tensor] = None,
                     noise_scale: float = 0.667, length_scale: float = 1, noise_scale_w: float = 0.8,
                     max_frames: Optional[int] = None):
        """The text side of :meth:`infer` (encoder, durations, flow), drawing the same random numbers.

        ``max_frames`` (None: no limit, upstream's behaviour) bounds the predicted length before the mask and the
        [b, 1, t_y, t_x] alignment are allocated: a longer or non-finite prediction raises ValueError. No host
        read is added (the check uses the mask's shape); not for tracing/export.

        Returns (z [b, c, t_y], y_mask [b, 1, t_y], g [b, gin, 1] or None, attn [b, 1, t_y, t_x],
        (z_p, m_p, logs_p)); ``self.dec(z * y_mask, g=g, x_mask=y_mask)`` is then ``infer``'s audio.
        """
        self._check_text(x, x_lengths)
        with stage("text_encoder"):
            x, m_p, logs_p, x_mask = self.enc_p(x, x_lengths)
            g = self._speaker(sid, x.size(0))

        with stage("duration_predictor"):
            if self.use_sdp:
                logw = self.dp(x, x_mask, g=g, reverse=True, noise_scale=noise_scale_w)
            else:
                logw = self.dp(x, x_mask, g=g)
            w = torch.exp(logw) * x_mask * length_scale
            w_ceil = torch.ceil(w)
            frames = torch.sum(w_ceil, [1, 2])
            if max_frames is not None:  # too long or NaN/inf -> max_frames + 1 (refused below): bounded mask
                frames = torch.where(torch.isfinite(frames), frames, max_frames + 1.0).clamp(max=max_frames + 1)
            y_lengths = torch.clamp_min(frames, 1).long()
            # The one host synchronisation of synthesis: the output length sizes everything after it.
            y_mask = torch.unsqueeze(commons.sequence_mask(y_lengths, y_lengths.max()), 1).type_as(x_mask)
            if max_frames is not None and y_mask.size(2) > max_frames:
                raise ValueError(f"the predicted length exceeds the limit of {max_frames} frames or is not finite "
                                 f"(lower length_scale or split the text)")
            attn_mask = torch.unsqueeze(x_mask, 2) * torch.unsqueeze(y_mask, -1)
            attn = commons.generate_path(w_ceil, attn_mask)

        m_p = torch.matmul(attn.squeeze(1), m_p.transpose(1, 2)).transpose(1, 2)  # [b, d, t_y]
        logs_p = torch.matmul(attn.squeeze(1), logs_p.transpose(1, 2)).transpose(1, 2)  # [b, d, t_y]

        with stage("flow"):
            z_p = m_p + torch.randn_like(m_p) * torch.exp(logs_p) * noise_scale
            z = self.flow(z_p, y_mask, g=g, reverse=True)
        return z, y_mask, g, attn, (z_p, m_p, logs_p)

    def voice_conversion(self, y: torch.Tensor, y_lengths: torch.Tensor, sid_src: torch.Tensor,
                         sid_tgt: torch.Tensor):
        """Re-voice spectrogram y [b, spec, t] of speaker sid_src [b] as sid_tgt [b] ->
        (audio [b, 1, samples], y_mask [b, 1, t], (z, z_p, z_hat))."""
        if self.n_speakers <= 1:
            raise ValueError("voice_conversion needs a multi-speaker model; this one has a single speaker")
        self._check_spec(y, y_lengths)
        g_src = self._speaker(sid_src, y.size(0), "sid_src")
        g_tgt = self._speaker(sid_tgt, y.size(0), "sid_tgt")
        z, m_q, logs_q, y_mask = self.enc_q(y, y_lengths, g=g_src)
        z_p = self.flow(z, y_mask, g=g_src)
        z_hat = self.flow(z_p, y_mask, g=g_tgt, reverse=True)
        o_hat = self.dec(z_hat * y_mask, g=g_tgt, x_mask=y_mask)
        return o_hat, y_mask, (z, z_p, z_hat)
