"""Inference library: batched synthesis, streaming, the fast GPU decoder, voice conversion and voice loading.

Everything here runs on top of :meth:`SynthesizerTrn.infer`; nothing re-implements the model:

* :func:`encode` is the text side (encoder, durations, flow): ``SynthesizerTrn.infer_latent``.
* :func:`decode` runs the masked HiFi-GAN decoder exactly as ``infer`` does, so ``decode(encode(...))`` equals
  ``infer(...)`` item by item.
* :func:`stream_decode` decodes a latent in overlapping chunks; the overlap is the decoder's receptive field,
  computed from its layers (:func:`receptive_field`), so the concatenated chunks equal whole-utterance decoding
  up to float rounding.
* :class:`FastDecoder` pads latents to fixed (batch, frames) buckets and replays a CUDA graph per bucket of an
  optionally ``torch.compile``-d decoder; the masked decoder makes the padding exact.
* :class:`Synthesizer` ties these together (eval copy with weight norm folded, ``inference_mode``), and
  :func:`load_voice` builds a model and its Piper ``config.json`` from one of our or Piper's checkpoints.

Shapes: ``b`` batch, ``t_x`` phoneme ids, ``c`` latent channels, ``t`` latent frames, ``hop`` audio samples per
frame (the product of the decoder's upsampling rates).
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .commons import remove_weight_norm
from .config import AudioConfig
from .models import Generator, SynthesizerTrn
from .voice_config import (DEFAULT_LENGTH_SCALE, DEFAULT_NOISE_SCALE, DEFAULT_NOISE_SCALE_W, VoiceError,
                           config_phoneme_id_map, config_speaker_id_map, default_phoneme_id_map, find_voice_config,
                           load_voice_config)

_LOGGER = logging.getLogger("vits_fast.inference")

#: Limits of one synthesised sequence (README "Limits"; ``Synthesizer(max_phonemes=..., max_frames=...)``,
#: ``--max-phonemes``/``--max-frames``): phoneme ids per sequence (the text encoder's attention is quadratic in
#: them; longer text is split with :func:`split_ids`) and predicted frames (checked before the alignment and
#: the decoder are allocated; 10000 frames is about two minutes of audio at Piper's 86 frames per second).
DEFAULT_MAX_PHONEMES = 500
DEFAULT_MAX_FRAMES = 10000

DecodeFn = Callable[[torch.Tensor, Optional[torch.Tensor], torch.Tensor], torch.Tensor]


def check_scales(noise_scale: float, length_scale: float, noise_scale_w: float) -> Dict[str, float]:
    """The three ``infer`` scales as floats, or :class:`VoiceError` unless finite with ``length_scale > 0`` and
    both noise scales ``>= 0``."""
    from .guards import check_number

    return dict(noise_scale=check_number("noise_scale", noise_scale, low=0, error=VoiceError),
                length_scale=check_number("length_scale", length_scale, low=0, low_inclusive=False,
                                          error=VoiceError),
                noise_scale_w=check_number("noise_scale_w", noise_scale_w, low=0, error=VoiceError))


def split_ids(ids: Sequence[int], max_ids: int, sentence_ends: Sequence[int] = (),
              word_breaks: Sequence[int] = ()) -> List[List[int]]:
    """Cut a phoneme-id sequence into consecutive pieces of at most ``max_ids`` ids, in order.

    Each cut goes after the last sentence end (``sentence_ends``, e.g. Piper's ``$``) inside the window, else
    after the last word break (e.g. the id of ``" "``), else at ``max_ids``. Concatenated, the pieces are ``ids``.
    """
    if max_ids < 1:
        raise VoiceError(f"max_ids must be >= 1, got {max_ids}")
    ids = list(ids)
    ends, breaks = set(sentence_ends), set(word_breaks)
    pieces: List[List[int]] = []
    start = 0
    while len(ids) - start > max_ids:
        window = ids[start: start + max_ids]
        cut = next((i + 1 for i in range(len(window) - 1, 0, -1) if window[i] in ends), None)
        if cut is None:
            cut = next((i + 1 for i in range(len(window) - 1, 0, -1) if window[i] in breaks), max_ids)
        pieces.append(window[:cut])
        start += cut
    pieces.append(ids[start:])
    return pieces


# --------------------------------------------------------------------------------------------------------
# Model preparation
# --------------------------------------------------------------------------------------------------------

def fold_weight_norm(module: nn.Module) -> nn.Module:
    """Replace every weight norm in ``module`` (in place) by the plain weight it computes; returns ``module``.

    Handles the legacy hook (``weight_g``/``weight_v``, what upstream uses) and the parametrization API. The
    folded weight is the value the hook computes on every forward, so outputs do not change.
    """
    from torch.nn.utils import parametrize
    from torch.nn.utils.weight_norm import WeightNorm

    for m in module.modules():
        for hook in list(m._forward_pre_hooks.values()):
            if isinstance(hook, WeightNorm):
                remove_weight_norm(m, hook.name)
        if parametrize.is_parametrized(m):
            for name in list(m.parametrizations.keys()):
                if any(type(p).__name__ == "_WeightNorm" for p in m.parametrizations[name]):
                    parametrize.remove_parametrizations(m, name, leave_parametrized=True)
    return module


def copy_module(module: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also works after a forward pass with gradients on.

    A forward leaves computed (non-leaf) tensors on some modules (the legacy weight-norm hook's ``weight``, the
    attention's cached ``attn``), which ``deepcopy`` refuses; they are copied detached (a forward recomputes them).
    """
    memo: Dict[int, Any] = {}
    for m in module.modules():
        for value in vars(m).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(module, memo)


def prepare_for_inference(model: SynthesizerTrn, device: Optional[Union[str, torch.device]] = None,
                          copy_model: bool = True) -> SynthesizerTrn:
    """An eval-mode model with weight norm folded and gradients off, on ``device`` (default: where it is).

    With ``copy_model`` (the default) the caller's model is left untouched.
    """
    if not isinstance(model, SynthesizerTrn):
        raise TypeError(f"expected a SynthesizerTrn, got {type(model).__name__}")
    if copy_model:
        model = copy_module(model)
    model = fold_weight_norm(model).eval().requires_grad_(False)
    return model.to(device) if device is not None else model


def hop_length(dec: Generator) -> int:
    """Audio samples per latent frame: the product of the decoder's upsampling strides."""
    return math.prod(int(up.stride[0]) for up in dec.ups)


def _module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


# --------------------------------------------------------------------------------------------------------
# Text side and decoder
# --------------------------------------------------------------------------------------------------------

@dataclass
class Latent:
    """Output of the text side: ``z`` [b, c, t] (zero past each item's length), ``y_mask`` [b, 1, t],
    ``g`` [b, gin, 1] speaker embedding or None."""

    z: torch.Tensor
    y_mask: torch.Tensor
    g: Optional[torch.Tensor]

    @property
    def frames(self) -> torch.Tensor:
        """Frames per item [b] (int64)."""
        return self.y_mask.sum((1, 2)).long()


def encode(model: SynthesizerTrn, x: torch.Tensor, x_lengths: torch.Tensor, sid: Optional[torch.Tensor] = None,
           noise_scale: float = DEFAULT_NOISE_SCALE, length_scale: float = DEFAULT_LENGTH_SCALE,
           noise_scale_w: float = DEFAULT_NOISE_SCALE_W, max_frames: Optional[int] = None) -> Latent:
    """Text side of ``infer``: x [b, t_x] ids, x_lengths [b], sid [b] -> :class:`Latent`.

    Draws the same random numbers as ``model.infer`` with the same arguments, so with the same seed
    ``decode(model, encode(model, ...))`` equals ``model.infer(...)[0]``. ``max_frames``: see
    ``SynthesizerTrn.infer_latent``.
    """
    z, y_mask, g, _, _ = model.infer_latent(x, x_lengths, sid=sid, noise_scale=noise_scale,
                                            length_scale=length_scale, noise_scale_w=noise_scale_w,
                                            max_frames=max_frames)
    return Latent(z * y_mask, y_mask, g)


def decode(model: SynthesizerTrn, latent: Latent) -> torch.Tensor:
    """Masked decoder exactly as ``infer`` runs it: -> audio [b, 1, t * hop], silent past each item's length."""
    return model.dec(latent.z, g=latent.g, x_mask=latent.y_mask)


def _conv_context(conv: nn.Module) -> Tuple[int, int]:
    """(left, right) input positions one output of a stride-1 ``Conv1d`` reads beyond its own position."""
    k, d, p, s = conv.kernel_size[0], conv.dilation[0], conv.padding, conv.stride[0]
    if isinstance(p, str) or s != 1:
        raise ValueError(f"receptive_field: unsupported conv {conv} (needs stride 1 and integer padding)")
    return p[0], d * (k - 1) - p[0]


def receptive_field(dec: Generator) -> Tuple[int, int]:
    """Latent frames (left, right) that any output sample of the decoder depends on beyond its own frame.

    Computed backwards from ``conv_post`` through each stage's residual blocks (parallel blocks: the largest
    context; inside a block every conv is on the residual chain, so their contexts add) and transposed convs.
    A transposed conv (kernel k, stride u, padding p) maps output context (L, R) to input context
    ``(floor((L + k - 1 - p) / u), ceil((R + p) / u))`` for chunks aligned to whole input frames.
    """
    left, right = _conv_context(dec.conv_post)
    n_kernels = dec.num_kernels
    for i in reversed(range(len(dec.ups))):
        block_ctx = [(0, 0)]
        for block in dec.resblocks[i * n_kernels: (i + 1) * n_kernels]:
            ctx = [_conv_context(m) for m in block.modules() if isinstance(m, nn.Conv1d)]
            block_ctx.append((sum(c[0] for c in ctx), sum(c[1] for c in ctx)))
        left += max(c[0] for c in block_ctx)
        right += max(c[1] for c in block_ctx)
        up = dec.ups[i]
        k, u, p = up.kernel_size[0], up.stride[0], up.padding[0]
        if up.dilation[0] != 1 or up.output_padding[0] != 0 or k - 2 * p != u:
            raise ValueError(f"receptive_field: upsampling layer {i} ({up}) does not produce exactly "
                             f"stride x input samples; chunked decoding needs that")
        left = (left + k - 1 - p) // u
        right = -((-(right + p)) // u)
    pre_left, pre_right = _conv_context(dec.conv_pre)
    return left + pre_left, right + pre_right


def stream_decode(decoder: DecodeFn, latent: Latent, hop: int, context: Tuple[int, int],
                  chunk_frames: int = 64, first_chunk_frames: int = 16) -> Iterator[torch.Tensor]:
    """Decode ``latent`` in chunks; yields audio [b, 1, n * hop] for consecutive frame ranges.

    ``decoder(z, g, mask)`` is the masked decoder (``model.dec`` with ``x_mask=mask``, or a :class:`FastDecoder`),
    ``context`` its :func:`receptive_field`. Each chunk of ``n`` frames is decoded with ``context`` extra frames
    on each side (clipped at the ends) and cut back, so the concatenation equals decoding the whole latent.
    The first chunk has ``first_chunk_frames`` frames (a short first chunk lowers the time to first audio).
    """
    if chunk_frames < 1 or first_chunk_frames < 1:
        raise ValueError(f"chunk sizes must be >= 1, got chunk_frames={chunk_frames}, "
                         f"first_chunk_frames={first_chunk_frames}")
    left, right = context
    total = latent.z.size(2)
    start, size = 0, first_chunk_frames
    while start < total:
        end = min(total, start + size)
        lo, hi = max(0, start - left), min(total, end + right)
        audio = decoder(latent.z[:, :, lo:hi], latent.g, latent.y_mask[:, :, lo:hi])
        yield audio[:, :, (start - lo) * hop: (end - lo) * hop]
        start, size = end, chunk_frames


# --------------------------------------------------------------------------------------------------------
# Fast GPU decoder
# --------------------------------------------------------------------------------------------------------

def frame_buckets(max_frames: int, min_frames: int = 32) -> List[int]:
    """Bucket sizes ``min, 1.5 min, 2 min, 3 min, 4 min, ...`` up to the first one >= ``max_frames``.

    Two buckets per octave: padding wastes at most a third of the decoder's work.
    """
    if min_frames < 1 or max_frames < 1:
        raise ValueError("frame bucket sizes must be >= 1")
    out: List[int] = []
    base = min_frames
    while True:
        for size in (base, base * 3 // 2):
            if not out or size > out[-1]:
                out.append(size)
            if size >= max_frames:
                return out
        base *= 2


@dataclass
class _Graph:
    graph: Any
    z: torch.Tensor
    g: Optional[torch.Tensor]
    mask: torch.Tensor
    out: torch.Tensor


class FastDecoder:
    """The masked decoder for fixed (batch, frames) buckets, compiled and replayed as CUDA graphs.

    ``fast(z [b, c, t], g [b, gin, 1] or None, mask [b, 1, t]) -> audio [b, 1, t * hop]``, the same as
    ``dec(z, g=g, x_mask=mask)``: inputs are zero-padded to the smallest bucket that holds them (padding frames
    are masked, so they change nothing) and the output is cut back.

    * ``compile``: ``torch.compile`` the decoder (default: on CUDA). ``dynamic=True`` compiles once for all
      lengths instead of once per bucket (torch.compile's recompile limit would otherwise be hit).
    * ``cuda_graphs``: capture one CUDA graph per bucket on first use and replay it (default: on CUDA). All
      graphs share one memory pool; inputs beyond the largest bucket run without a graph.
    * ``bucketing``: pad to buckets even without graphs (default: with graphs); useful to check the padding
      logic on a CPU. Buckets: ``frame_sizes`` (default :func:`frame_buckets` up to ``max_graph_frames``) times
      ``batch_sizes``.
    * ``compile_backend``/``fullgraph`` are passed to ``torch.compile``.

    The decoder is copied (``copy_decoder``) and its weight norm folded; the caller's module is not changed.
    """

    def __init__(self, dec: Generator, *, compile: Optional[bool] = None, cuda_graphs: Optional[bool] = None,
                 bucketing: Optional[bool] = None, dynamic: bool = True,
                 frame_sizes: Optional[Sequence[int]] = None, max_graph_frames: int = 2048,
                 batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64), copy_decoder: bool = True,
                 compile_backend: str = "inductor", fullgraph: bool = False):
        if copy_decoder:
            dec = copy_module(dec)
        self.dec = fold_weight_norm(dec).eval().requires_grad_(False)
        self.device = _module_device(self.dec)
        on_cuda = self.device.type == "cuda"
        self.compile = on_cuda if compile is None else bool(compile)
        self.cuda_graphs = on_cuda if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and not on_cuda:
            raise ValueError("FastDecoder: cuda_graphs=True needs the decoder on a CUDA device")
        self.bucketing = self.cuda_graphs if bucketing is None else bool(bucketing)
        if self.cuda_graphs and not self.bucketing:
            raise ValueError("FastDecoder: CUDA graphs need fixed shapes, so bucketing cannot be off")
        self.hop = hop_length(self.dec)
        self.in_channels = self.dec.conv_pre.in_channels
        self.frame_sizes = sorted(set(int(b) for b in (frame_sizes or frame_buckets(max_graph_frames))))
        self.batch_sizes = sorted(set(int(b) for b in batch_sizes))
        self._fn: DecodeFn = self._eager
        if self.compile:
            self._fn = torch.compile(self._eager, dynamic=dynamic, backend=compile_backend, fullgraph=fullgraph)
        self._graphs: Dict[Tuple, _Graph] = {}
        self._pool = None

    def _eager(self, z: torch.Tensor, g: Optional[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        return self.dec(z, g=g, x_mask=mask)

    def bucket(self, batch: int, frames: int) -> Optional[Tuple[int, int]]:
        """The (batch, frames) bucket holding an input of this size, or None when it exceeds the largest."""
        b = next((s for s in self.batch_sizes if s >= batch), None)
        t = next((s for s in self.frame_sizes if s >= frames), None)
        return None if b is None or t is None else (b, t)

    @property
    def num_graphs(self) -> int:
        """CUDA graphs captured so far (one per bucket used)."""
        return len(self._graphs)

    def __call__(self, z: torch.Tensor, g: Optional[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            b, _, t = z.shape
            key = self.bucket(b, t) if self.bucketing else None
            if key is None:
                return self._fn(z, g, mask)
            if self.cuda_graphs:
                entry = self._graphs.get(key + (g is not None, z.dtype))
                if entry is None:
                    entry = self._capture(key, g is not None, z.dtype)
                self._load(entry.z, entry.g, entry.mask, z, g, mask)
                entry.graph.replay()
                return entry.out[:b, :, : t * self.hop].clone()
            zp = z.new_zeros(key[0], z.size(1), key[1])
            mp = mask.new_zeros(key[0], 1, key[1])
            gp = None if g is None else g.new_zeros(key[0], g.size(1), 1)
            self._load(zp, gp, mp, z, g, mask)
            return self._fn(zp, gp, mp)[:b, :, : t * self.hop]

    @staticmethod
    def _load(zp: torch.Tensor, gp: Optional[torch.Tensor], mp: torch.Tensor, z: torch.Tensor,
              g: Optional[torch.Tensor], mask: torch.Tensor) -> None:
        """Copy an input into the top-left corner of zero-filled bucket buffers."""
        b, _, t = z.shape
        zp.zero_()
        mp.zero_()
        zp[:b, :, :t].copy_(z)
        mp[:b, :, :t].copy_(mask)
        if gp is not None:
            gp.zero_()
            gp[:b].copy_(g)

    def _capture(self, key: Tuple[int, int], has_g: bool, dtype: torch.dtype) -> _Graph:
        b, t = key
        dev = self.device
        z = torch.zeros(b, self.in_channels, t, device=dev, dtype=dtype)
        mask = torch.zeros(b, 1, t, device=dev, dtype=dtype)
        g = torch.zeros(b, self.dec.cond.in_channels, 1, device=dev, dtype=dtype) if has_g else None
        # Warm up on a side stream first (compilation, cuDNN algorithm choice, lazy initialisation), as
        # capture requires; then capture into the shared pool.
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._fn(z, g, mask)
        torch.cuda.current_stream(dev).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._fn(z, g, mask)
        entry = _Graph(graph, z, g, mask, out)
        self._graphs[key + (has_g, dtype)] = entry
        return entry


# --------------------------------------------------------------------------------------------------------
# Synthesizer
# --------------------------------------------------------------------------------------------------------

@dataclass
class StreamTiming:
    """Timing of one streamed utterance (seconds; CUDA work is finished before each clock read)."""

    first_audio_s: float
    total_s: float
    audio_samples: int
    chunks: int


def _as_ids(seq: Union[Sequence[int], torch.Tensor], index: int) -> torch.Tensor:
    ids = torch.as_tensor(seq, dtype=torch.long).flatten()
    if ids.numel() == 0:
        raise VoiceError(f"utterance {index} is empty (no phoneme ids)")
    return ids


class Synthesizer:
    """Synthesis with an inference copy of a model (eval, weight norm folded, ``inference_mode``).

    ``fast=True`` decodes with a :class:`FastDecoder` (CUDA graphs + ``torch.compile``; ``fast_options`` are
    passed to it). It needs CUDA; on a CPU it warns and uses the reference decoder. Scales default to Piper's
    (noise 0.667, length 1.0, noise_w 0.8) and must be finite (:func:`check_scales`). A sequence may have at
    most ``max_phonemes`` ids (:func:`split_ids` cuts longer ones) and last at most ``max_frames`` frames;
    beyond either, and for audio that comes out NaN/inf, a :class:`VoiceError` says so.
    """

    def __init__(self, model: SynthesizerTrn, *, device: Optional[Union[str, torch.device]] = None,
                 fast: bool = False, fast_options: Optional[Mapping[str, Any]] = None, copy_model: bool = True,
                 max_phonemes: int = DEFAULT_MAX_PHONEMES, max_frames: int = DEFAULT_MAX_FRAMES):
        self.max_phonemes, self.max_frames = int(max_phonemes), int(max_frames)
        self.model = prepare_for_inference(model, device=device, copy_model=copy_model)
        self.device = _module_device(self.model)
        self.hop = hop_length(self.model.dec)
        self.context = receptive_field(self.model.dec)
        self.fast_decoder: Optional[FastDecoder] = None
        if fast:
            if self.device.type == "cuda":
                self.fast_decoder = FastDecoder(self.model.dec, copy_decoder=False, **dict(fast_options or {}))
            else:
                warnings.warn("fast inference (CUDA graphs, torch.compile) needs a CUDA device; "
                              f"the model is on {self.device}, so the reference decoder is used", stacklevel=2)

    @property
    def num_speakers(self) -> int:
        return int(self.model.n_speakers)

    def _decoder(self) -> DecodeFn:
        if self.fast_decoder is not None:
            return self.fast_decoder
        return lambda z, g, mask: self.model.dec(z, g=g, x_mask=mask)

    def _sid(self, sid: Optional[Union[int, Sequence[int], torch.Tensor]], batch: int) -> Optional[torch.Tensor]:
        if self.model.n_speakers <= 1:
            if sid is not None and torch.as_tensor(sid).ne(0).any():
                raise VoiceError("this model has a single speaker; a speaker id other than 0 was given")
            return None
        if sid is None:
            sid = 0
        sid = torch.as_tensor(sid, dtype=torch.long).flatten()
        if sid.numel() == 1 and batch > 1:
            sid = sid.expand(batch)
        if sid.numel() != batch:
            raise VoiceError(f"{sid.numel()} speaker ids for {batch} utterances")
        bad = sid[(sid < 0) | (sid >= self.model.n_speakers)]
        if bad.numel():
            raise VoiceError(f"speaker id {int(bad[0])} is out of range: this model has speakers "
                             f"0..{self.model.n_speakers - 1}")
        return sid.to(self.device)

    def _check_ids(self, ids: torch.Tensor, index: int) -> None:
        if ids.numel() > self.max_phonemes:
            raise VoiceError(f"utterance {index} has {ids.numel()} phoneme ids, more than the limit of "
                             f"{self.max_phonemes} per sequence; split it (vits_fast.inference.split_ids) or raise "
                             f"max_phonemes")
        bad = ids[(ids < 0) | (ids >= self.model.n_vocab)]
        if bad.numel():
            raise VoiceError(f"utterance {index}: phoneme id {int(bad[0])} is outside the model's vocabulary "
                             f"(ids 0..{self.model.n_vocab - 1})")

    def synthesize(self, x: torch.Tensor, x_lengths: torch.Tensor, sid: Optional[torch.Tensor] = None,
                   noise_scale: float = DEFAULT_NOISE_SCALE, length_scale: float = DEFAULT_LENGTH_SCALE,
                   noise_scale_w: float = DEFAULT_NOISE_SCALE_W) -> Tuple[torch.Tensor, torch.Tensor]:
        """x [b, t_x] ids, x_lengths [b], sid [b] -> (audio [b, 1, T] on the model's device, lengths [b] samples).

        ``audio[i, 0, :lengths[i]]`` is item i's audio, the same as synthesising it alone (exactly so with zero
        noise; with noise the random draws depend on the batch); the rest is silence.
        """
        kw = dict(check_scales(noise_scale, length_scale, noise_scale_w), max_frames=self.max_frames)
        with torch.inference_mode():
            x, x_lengths = x.to(self.device), x_lengths.to(self.device)
            sid = self._sid(sid, x.size(0))
            latent = self._encode(x, x_lengths, sid, kw) if self.fast_decoder is not None or x.size(0) == 1 else None
            if self.fast_decoder is not None:
                audio, y_mask = self.fast_decoder(latent.z, latent.g, latent.y_mask), latent.y_mask
            elif latent is not None:
                # One item has no padding: the unmasked decoder gives the same numbers without the mask products.
                audio, y_mask = self.model.dec(latent.z, g=latent.g), latent.y_mask
            else:
                try:
                    audio, _, y_mask, _ = self.model.infer(x, x_lengths, sid=sid, **kw)
                except ValueError as exc:  # over max_frames or non-finite durations
                    raise VoiceError(str(exc)) from None
            return audio, y_mask.sum((1, 2)).long() * self.hop

    def _encode(self, x: torch.Tensor, x_lengths: torch.Tensor, sid: Optional[torch.Tensor],
                kw: Mapping[str, Any]) -> Latent:
        try:
            return encode(self.model, x, x_lengths, sid=sid, **kw)
        except ValueError as exc:  # over max_frames or non-finite durations
            raise VoiceError(str(exc)) from None

    @staticmethod
    def _finite(audio: torch.Tensor, index: int) -> torch.Tensor:
        if not bool(torch.isfinite(audio).all()):
            raise VoiceError(f"utterance {index}: the synthesised audio holds NaN/inf values (the model's weights "
                             f"or the scales overflow)")
        return audio

    def synthesize_ids(self, ids: Union[Sequence[int], torch.Tensor], speaker_id: Optional[int] = None,
                       **scales: float) -> torch.Tensor:
        """One utterance of phoneme ids -> float32 audio [T] on the CPU (the batch-1 path benchmarks time)."""
        return self.synthesize_batch([ids], None if speaker_id is None else [speaker_id], batch_size=1,
                                     **scales)[0]

    def synthesize_batch(self, utterances: Sequence[Union[Sequence[int], torch.Tensor]],
                         speaker_ids: Optional[Union[int, Sequence[int]]] = None, *, batch_size: int = 16,
                         sort_by_length: bool = True, progress: bool = False,
                         noise_scale: float = DEFAULT_NOISE_SCALE, length_scale: float = DEFAULT_LENGTH_SCALE,
                         noise_scale_w: float = DEFAULT_NOISE_SCALE_W) -> List[torch.Tensor]:
        """Phoneme-id sequences -> float32 audio [T_i] per utterance (CPU), in input order, trimmed to length.

        Utterances are grouped ``batch_size`` at a time (by length when ``sort_by_length``, which minimises
        padding). ``speaker_ids``: one id for all, one per utterance, or None (speaker 0 / single speaker).
        ``progress`` shows a tqdm bar on stderr.
        """
        if batch_size < 1:
            raise VoiceError(f"batch_size must be >= 1, got {batch_size}")
        seqs = [_as_ids(u, i) for i, u in enumerate(utterances)]
        for i, s in enumerate(seqs):
            self._check_ids(s, i)
        if speaker_ids is None or isinstance(speaker_ids, int):
            sids: List[Optional[int]] = [speaker_ids] * len(seqs)
        else:
            sids = [int(s) for s in speaker_ids]
            if len(sids) != len(seqs):
                raise VoiceError(f"{len(sids)} speaker ids for {len(seqs)} utterances")
        order = list(range(len(seqs)))
        if sort_by_length:
            order.sort(key=lambda i: -len(seqs[i]))
        results: List[Optional[torch.Tensor]] = [None] * len(seqs)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(seqs), unit="utt", desc="synthesising")
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start: start + batch_size]
                lengths = torch.tensor([len(seqs[i]) for i in idx])
                x = torch.zeros(len(idx), int(lengths.max()), dtype=torch.long)
                for row, i in enumerate(idx):
                    x[row, : len(seqs[i])] = seqs[i]
                batch_sids = [sids[i] for i in idx]
                sid = None if all(s is None for s in batch_sids) else [0 if s is None else s for s in batch_sids]
                audio, n = self.synthesize(x, lengths, sid, noise_scale=noise_scale, length_scale=length_scale,
                                           noise_scale_w=noise_scale_w)
                audio = audio.float().cpu()
                for row, i in enumerate(idx):
                    results[i] = self._finite(audio[row, 0, : int(n[row])].clone(), i)
                if bar is not None:
                    bar.update(len(idx))
        finally:
            if bar is not None:
                bar.close()
        return [r for r in results if r is not None]

    def stream(self, ids: Union[Sequence[int], torch.Tensor], speaker_id: Optional[int] = None, *,
               chunk_frames: int = 64, first_chunk_frames: int = 16, noise_scale: float = DEFAULT_NOISE_SCALE,
               length_scale: float = DEFAULT_LENGTH_SCALE,
               noise_scale_w: float = DEFAULT_NOISE_SCALE_W) -> Iterator[torch.Tensor]:
        """Stream one utterance: yields float32 audio chunks [n] (CPU) whose concatenation is the utterance.

        The text side runs once; the decoder runs per chunk (see :func:`stream_decode`).
        """
        x = _as_ids(ids, 0)
        self._check_ids(x, 0)
        kw = dict(check_scales(noise_scale, length_scale, noise_scale_w), max_frames=self.max_frames)
        # inference_mode is entered per step, never held across a yield (it would leak into the caller's code)
        with torch.inference_mode():
            x = x.unsqueeze(0).to(self.device)
            sid = self._sid(None if speaker_id is None else [speaker_id], 1)
            latent = self._encode(x, torch.tensor([x.size(1)], device=self.device), sid, kw)
        chunks = stream_decode(self._decoder(), latent, self.hop, self.context, chunk_frames=chunk_frames,
                               first_chunk_frames=first_chunk_frames)
        while True:
            with torch.inference_mode():
                chunk = next(chunks, None)
                if chunk is None:
                    return
                audio = self._finite(chunk[0, 0].float().cpu(), 0)
            yield audio

    def time_to_first_audio(self, ids: Union[Sequence[int], torch.Tensor], speaker_id: Optional[int] = None,
                            **stream_kwargs: Any) -> StreamTiming:
        """Stream ``ids`` and time it: seconds until the first chunk is on the CPU, and in total."""
        start = time.perf_counter()
        first = None
        samples = chunks = 0
        for chunk in self.stream(ids, speaker_id, **stream_kwargs):  # chunks arrive on the CPU: work is done
            if first is None:
                first = time.perf_counter() - start
            samples += chunk.numel()
            chunks += 1
        total = time.perf_counter() - start
        return StreamTiming(first_audio_s=total if first is None else first, total_s=total, audio_samples=samples,
                            chunks=chunks)

    def convert(self, audio: torch.Tensor, audio_config: AudioConfig, from_speaker: int,
                to_speaker: int) -> torch.Tensor:
        """Voice conversion: audio [T] in [-1, 1] at ``audio_config.sample_rate`` of speaker ``from_speaker`` ->
        audio [frames * hop] of ``to_speaker`` (CPU float32).

        The linear spectrogram is computed as in training (:func:`vits_fast.mel_processing.spectrogram_torch`).
        """
        from .mel_processing import spectrogram_torch

        if self.model.n_speakers <= 1:
            raise VoiceError("voice conversion needs a multi-speaker model; this one has a single speaker")
        sids = self._sid([from_speaker, to_speaker], 2)
        audio = torch.as_tensor(audio, dtype=torch.float32).flatten()
        if audio.numel() < audio_config.filter_length:
            raise VoiceError(f"the audio to convert is too short: {audio.numel()} samples, at least "
                             f"{audio_config.filter_length} are needed")
        with torch.inference_mode():
            spec = spectrogram_torch(audio.unsqueeze(0).to(self.device), audio_config.filter_length,
                                     audio_config.sample_rate, audio_config.hop_length, audio_config.win_length,
                                     center=False).to(self.model.dec.conv_pre.weight.dtype)
            lengths = torch.tensor([spec.size(2)], device=self.device)
            out, _, _ = self.model.voice_conversion(spec, lengths, sids[:1], sids[1:])
            return self._finite(out[0, 0].float().cpu(), 0)


# --------------------------------------------------------------------------------------------------------
# Voices: checkpoint + config.json
# --------------------------------------------------------------------------------------------------------

@dataclass
class Voice:
    """A model with its Piper voice config (``config.json``; may be empty) and audio settings."""

    model: SynthesizerTrn
    audio: AudioConfig
    config: Dict[str, Any] = field(default_factory=dict)
    checkpoint: Optional[Path] = None
    config_path: Optional[Path] = None

    @property
    def sample_rate(self) -> int:
        return int(self.config.get("audio", {}).get("sample_rate") or self.audio.sample_rate)

    @property
    def num_speakers(self) -> int:
        return int(self.model.n_speakers)

    @property
    def speaker_id_map(self) -> Dict[str, int]:
        return config_speaker_id_map(self.config)

    @property
    def phoneme_id_map(self) -> Dict[str, List[int]]:
        return config_phoneme_id_map(self.config) or default_phoneme_id_map()

    @property
    def espeak_voice(self) -> str:
        return str(self.config.get("espeak", {}).get("voice") or "en-us")

    def inference_scales(self, **overrides: Optional[float]) -> Dict[str, float]:
        """(noise_scale, length_scale, noise_scale_w) from the config's ``inference`` section, else Piper's, with
        ``overrides`` that are not None taking precedence; checked by :func:`check_scales`."""
        inf = self.config.get("inference") or {}
        scales = dict(noise_scale=inf.get("noise_scale", DEFAULT_NOISE_SCALE),
                      length_scale=inf.get("length_scale", DEFAULT_LENGTH_SCALE),
                      noise_scale_w=inf.get("noise_w", DEFAULT_NOISE_SCALE_W))
        scales.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return check_scales(**scales)
        except VoiceError as exc:
            raise VoiceError(f"{exc} (voice config {self.config_path or '(given)'}, section inference, or the "
                             f"flag)") from None

    def speaker_id(self, speaker: Optional[Union[str, int]]) -> Optional[int]:
        """Resolve a speaker name (``speaker_id_map``) or number; None means the default (0 / single speaker)."""
        names = self.speaker_id_map
        if self.num_speakers <= 1:
            if speaker is None or str(speaker) == "0" or (names and str(speaker) in names):
                return None
            raise VoiceError(f"this voice has a single speaker; --speaker {speaker!r} cannot be used")
        if speaker is None:
            return 0
        text = str(speaker)
        if text in names:
            return names[text]
        if text.lstrip("-").isdigit():
            sid = int(text)
            if 0 <= sid < self.num_speakers:
                return sid
            raise VoiceError(f"speaker id {sid} is out of range: this voice has speakers 0..{self.num_speakers - 1}")
        known = ", ".join(sorted(names, key=lambda n: names[n])[:20]) or "none (use a number)"
        more = f" (and {len(names) - 20} more)" if len(names) > 20 else ""
        raise VoiceError(f"unknown speaker {text!r}; this voice's speakers are: {known}{more}")


def load_voice(checkpoint: Union[str, Path], config: Optional[Union[str, Path, Mapping[str, Any]]] = None,
               map_location: Union[str, torch.device] = "cpu") -> Voice:
    """Build the generator of one of our or Piper's checkpoints (``.ckpt``, or a bare generator state dict), or of
    a Piper ONNX voice (``.onnx``, imported by :func:`vits_fast.convert.import_onnx_voice`).

    ``config``: a Piper ``config.json`` (path or dict); by default the one :func:`find_voice_config` finds (for
    ``VOICE.onnx``: ``VOICE.onnx.json``, which must exist).
    The checkpoint is read with :func:`vits_fast.checkpoint.load_checkpoint` (no code from the file runs) and
    the model built as :func:`vits_fast.checkpoint.model_config_from_checkpoint` says; both raise
    :class:`vits_fast.checkpoint.CheckpointError` for a file they cannot use.
    """
    from . import checkpoint as ckpt_lib
    from .convert import is_onnx, load_onnx_voice

    checkpoint = Path(checkpoint)
    if is_onnx(checkpoint):
        return load_onnx_voice(checkpoint, config)
    ckpt = ckpt_lib.load_checkpoint(checkpoint, map_location=map_location)
    kwargs, audio, _ = ckpt_lib.model_config_from_checkpoint(ckpt, name=f"checkpoint {checkpoint}")
    g_state, _ = ckpt_lib.generator_state(ckpt)
    model = SynthesizerTrn(**kwargs)
    missing = ckpt_lib.load_weights(model, g_state, what=f"checkpoint {checkpoint}")
    if missing:
        raise VoiceError(f"checkpoint {checkpoint} lacks {len(missing)} generator tensor(s): {missing[:6]}")
    model.eval()

    config_path: Optional[Path] = None
    if isinstance(config, Mapping):
        config_dict = dict(config)
    else:
        config_path = Path(config) if config is not None else find_voice_config(checkpoint)
        config_dict = load_voice_config(config_path) if config_path is not None else {}
        if config_path is None:
            _LOGGER.warning("no config.json found for %s: using Piper's default phoneme map and the "
                            "checkpoint's sample rate", checkpoint)
    n_cfg = config_dict.get("num_speakers")
    if n_cfg is not None and int(n_cfg) != model.n_speakers:
        raise VoiceError(f"voice config {config_path or '(given)'} says {n_cfg} speaker(s) but checkpoint "
                         f"{checkpoint} has {model.n_speakers}: they do not belong together")
    return Voice(model=model, audio=audio, config=config_dict, checkpoint=checkpoint, config_path=config_path)
