"""Profile one VITS workload with ``torch.profiler``: ``python -m vits_fast.profile``.

Workloads (``--workload``):

* ``train-step``: one Piper training step, generator then discriminator (the same sequence as
  :meth:`vits_fast.train.Trainer.train_step`, on a synthetic batch);
* ``infer``: :meth:`vits_fast.inference.Synthesizer.synthesize` on a synthetic batch of phoneme ids;
* ``kernel:<name>``: one fused subject, forward then backward: ``wn`` (the posterior encoder's 16-layer WaveNet),
  ``spline`` (a ConvFlow of the stochastic duration predictor), ``coupling`` (the prior flow, 4 coupling layers
  with their WaveNets), ``mas`` (the alignment search; forward only).

Model sizes follow Piper's presets (``--config x-low|medium|high``, or ``tiny`` for a toy model); batch and lengths
default to Piper-sized shapes on CUDA and to small ones on a CPU, and can be set with ``--batch``, ``--text-len``,
``--frames`` (and ``--segment-frames`` for the decoder window of ``train-step``). For example, the smallest x-low
training step on a CPU::

    python -m vits_fast.profile --workload train-step --config x-low --device cpu --batch 1 --text-len 8 \\
        --frames 16 --segment-frames 8 --steps 1 --warmup 0 --threads 1

The run prints

1. a per-stage table: time inside each ``record_function`` range ``vits.<stage>`` (the model's own ranges: text
   encoder, posterior encoder, flow, alignment search, duration predictor, decoder; and this module's:
   discriminator, losses, backward, optimizer), per step, CPU wall time and, on CUDA, device time;
2. a per-kernel table (CUDA: device kernels by self device time; CPU: operators by self CPU time);
3. on CUDA, for every fused ``vits_fast::*`` operator: the bytes it must move at least (inputs read once, outputs
   written once), the device time, the achieved bandwidth and its fraction of the device-to-device copy bandwidth
   measured on the same device in the same run;

and writes a Chrome trace (``--trace``; open it in ``chrome://tracing`` or https://ui.perfetto.dev).

``--estimate {h100,h200,a100}`` runs no profiler: it estimates the workload's GPU time per stage, reference and fused
path side by side, from one run on fake tensors (:mod:`vits_fast.costmodel`; every number printed is an estimate).

The workload builders here (:class:`TrainStep`, :class:`InferStep`, :func:`make_kernel_case`) are also what the
benchmark suite in ``benchmarks/`` times, so a benchmark and a profile of the same subject run the same code.
Backward ops run outside the forward stage ranges (autograd replays them later), so in ``train-step`` the
backward pass is its own stage. Under the profiler the fused ops go through ``torch.library``'s dispatcher (so that
the tables name them with their shapes), not through the eager fast path of ``kernels._common.FusedOp`` that an
unprofiled run takes: the profiled host time of a fused op is the dispatcher path's (about twice the fast path's,
by ``benchmarks/test_bench_dispatch.py``); the benchmarks time the fast path.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .backend import backend as backend_ctx, set_module_backend
from .commons import stage
from .config import TINY_AUDIO, AudioConfig, model_kwargs, shrink_discriminator, tiny_preset_kwargs
from .data import Batch
from .train.step import StepOutput, StepParts, adamw, compile_fixed_shape_parts, train_step

CONFIGS = ("tiny", "x-low", "medium", "high")
KERNELS = ("wn", "spline", "coupling", "mas")
WORKLOADS = ("train-step", "infer") + tuple(f"kernel:{k}" for k in KERNELS)

#: Stage ranges of each workload, in execution order (the table lists them in this order).
TRAIN_STAGES = ("text_encoder", "posterior_encoder", "flow", "alignment_search", "duration_predictor", "decoder",
                "discriminator", "losses", "backward", "optimizer")
INFER_STAGES = ("text_encoder", "duration_predictor", "flow", "decoder")
KERNEL_STAGES = ("forward", "backward")


# --------------------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    """Batch and (maximum) lengths of a workload. Items are ragged: lengths are drawn in [3/4 max, max] with the
    first item at the maximum. ``segment_frames`` overrides the model's training window (None: the preset's)."""

    batch: int
    text_len: int
    frames: int
    segment_frames: Optional[int] = None


#: Piper-sized shapes (GPU) and small ones (CPU) per workload. Kernel targets: WN B=32, T=800 frames; SDP spline
#: B=32, T=200 phonemes; alignment search B=16, t_x=512, t_y=4 t_x.
DEFAULT_SIZES: Dict[str, Dict[str, Sizes]] = {
    "cuda": {
        "train-step": Sizes(32, 200, 800),
        "infer": Sizes(1, 160, 0),
        "kernel:wn": Sizes(32, 0, 800),
        "kernel:spline": Sizes(32, 200, 0),
        "kernel:coupling": Sizes(32, 0, 800),
        "kernel:mas": Sizes(16, 512, 2048),
    },
    "cpu": {
        "train-step": Sizes(1, 12, 48),
        "infer": Sizes(1, 16, 0),
        "kernel:wn": Sizes(2, 0, 64),
        "kernel:spline": Sizes(2, 24, 0),
        "kernel:coupling": Sizes(2, 0, 64),
        "kernel:mas": Sizes(2, 32, 128),
    },
}


def default_sizes(workload: str, device: torch.device) -> Sizes:
    """Default :class:`Sizes` of ``workload`` on ``device`` (CUDA: Piper-sized; otherwise small)."""
    return DEFAULT_SIZES["cuda" if device.type == "cuda" else "cpu"][workload]


def ragged_lengths(batch: int, max_len: int, gen: torch.Generator, low: float = 0.75,
                   min_len: int = 1) -> torch.Tensor:
    """int64 [batch] lengths in ``[max(min_len, low * max_len), max_len]``, the first one ``max_len``."""
    lo = max(min_len, min(max_len, int(math.ceil(low * max_len))))
    lengths = torch.randint(lo, max_len + 1, (batch,), generator=gen)
    lengths[0] = max_len
    return lengths


def length_mask(lengths: torch.Tensor, max_len: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[b, 1, max_len] 0/1 mask of ``lengths`` [b]."""
    positions = torch.arange(max_len, device=lengths.device)
    return (positions.unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(1).to(dtype)


# --------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------

def model_setup(config: str, segment_frames: Optional[int] = None) -> Tuple[Dict[str, Any], AudioConfig]:
    """(``SynthesizerTrn`` keyword arguments, audio settings) of a single-speaker model of ``config``.

    Piper's presets for ``x-low`` (16 kHz), ``medium``, ``high`` (22.05 kHz), 256 symbols; ``tiny`` is the toy
    model ``vits_fast.train`` trains by default. ``segment_frames`` overrides the training window.
    """
    if config == "tiny":
        audio = TINY_AUDIO
        kwargs = tiny_preset_kwargs()
    elif config in CONFIGS:
        audio = AudioConfig(sample_rate=16000 if config == "x-low" else 22050)
        kwargs = model_kwargs(config, num_symbols=256, num_speakers=1, audio=audio)
    else:
        raise ValueError(f"config must be one of {CONFIGS}, got {config!r}")
    if segment_frames is not None:
        kwargs["segment_size"] = int(segment_frames)
    return kwargs, audio


def hop_of(kwargs: Dict[str, Any]) -> int:
    """Audio samples per spectrogram frame of a model (product of its upsampling rates)."""
    return math.prod(kwargs["upsample_rates"])


def build_discriminator(config: str):
    """Piper's multi-period discriminator (channels divided by 16 for ``tiny``, as the demo trainer does)."""
    from .models import MultiPeriodDiscriminator

    mpd = MultiPeriodDiscriminator()
    if config == "tiny":
        shrink_discriminator(mpd)
    return mpd


def synthetic_batch(kwargs: Dict[str, Any], sizes: Sizes, device: torch.device, seed: int = 0) -> Batch:
    """A random padded training :class:`~vits_fast.data.Batch` for a model built from ``kwargs``.

    ``phoneme_ids`` [b, t_x] (0 past each length), ``phoneme_lengths`` [b], ``spectrograms`` [b, spec, t_y]
    positive linear magnitudes, ``spectrogram_lengths`` [b], ``audios`` [b, 1, t_y * hop] in [-1, 1]; speaker ids
    for a multi-speaker model. Every item has ``t_x <= t_y`` and at least ``segment_size`` frames. Values are
    random, never zeros.
    """
    gen = torch.Generator().manual_seed(seed)
    b, t_x, t_y = sizes.batch, sizes.text_len, sizes.frames
    seg = kwargs["segment_size"]
    if t_y < max(seg, t_x):
        raise ValueError(f"frames ({t_y}) must be at least the training window ({seg} frames) and the text length "
                         f"({t_x})")
    x_lengths = ragged_lengths(b, t_x, gen)
    y_lengths = torch.maximum(ragged_lengths(b, t_y, gen, min_len=seg), x_lengths)
    x = torch.randint(1, kwargs["n_vocab"], (b, t_x), generator=gen) * length_mask(x_lengths, t_x, torch.long)[:, 0]
    y_mask = length_mask(y_lengths, t_y)
    spec = torch.exp(torch.randn(b, kwargs["spec_channels"], t_y, generator=gen) - 2.0) * y_mask
    hop = hop_of(kwargs)
    audio = (torch.rand(b, 1, t_y * hop, generator=gen) * 2 - 1) * 0.5
    audio = audio * torch.repeat_interleave(y_mask, hop, dim=2)
    n_speakers = kwargs.get("n_speakers", 0)
    sid = torch.randint(0, n_speakers, (b,), generator=gen) if n_speakers > 1 else None
    batch = Batch(phoneme_ids=x, phoneme_lengths=x_lengths, spectrograms=spec, spectrogram_lengths=y_lengths,
                  audios=audio, audio_lengths=y_lengths * hop, speaker_ids=sid, indices=torch.arange(b))
    return batch.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(name: Optional[str]) -> torch.device:
    """``name`` as a device; None: CUDA when available, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------------------------
# Training step
# --------------------------------------------------------------------------------------------------------

class TrainStep:
    """One Piper training step on a fixed synthetic batch: :func:`vits_fast.train.step.train_step`, the function
    :class:`vits_fast.train.Trainer` runs (the same losses, weights, optimizers and profiler ranges).

    ``backend``: ``reference``, ``triton`` or ``auto`` (pinned on the generator's modules and active around every
    step, so the alignment search follows it too). ``precision``: ``fp32`` or ``bf16`` (autocast; spectrograms,
    mels and losses stay fp32). ``compile``: ``torch.compile`` the decoder and the discriminator (the two largest
    parts; their shapes are fixed by the training window, so they compile once) in ``compile_mode``
    (``reduce-overhead``: replayed as CUDA graphs); see :func:`vits_fast.train.step.compile_fixed_shape_parts`.
    Calling the object runs one step and returns its :class:`~vits_fast.train.step.StepOutput` (losses on the device,
    no host synchronisation).
    """

    def __init__(self, config: str, sizes: Sizes, device: torch.device, *, backend: str = "auto",
                 precision: str = "fp32", compile: bool = False, compile_mode: str = "default", seed: int = 0):
        from .models import SynthesizerTrn

        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
        self.config, self.sizes, self.device, self.backend = config, sizes, device, backend
        self.kwargs, self.audio = model_setup(config, sizes.segment_frames)
        torch.manual_seed(seed)
        self.model_g = SynthesizerTrn(**self.kwargs).to(device).train()
        self.model_d = build_discriminator(config).to(device).train()
        set_module_backend(self.model_g, backend)
        if compile:
            compile_fixed_shape_parts(self.model_g, self.model_d, compile_mode)
        self.optim_g = adamw(self.model_g.parameters(), device, lr=2e-4)
        self.optim_d = adamw(self.model_d.parameters(), device, lr=2e-4)
        self.parts = StepParts(model_g=self.model_g, model_d=self.model_d, optim_g=self.optim_g,
                               optim_d=self.optim_d, audio=self.audio, segment_size=self.kwargs["segment_size"],
                               amp_dtype=PRECISIONS[precision])
        self.batch = synthetic_batch(self.kwargs, sizes, device, seed)
        self.hop = hop_of(self.kwargs)

    def __call__(self) -> StepOutput:
        with backend_ctx(self.backend):
            return train_step(self.parts, self.batch)


# --------------------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------------------

INFER_DECODERS = ("eager", "compiled", "graphs", "compiled+graphs")


class InferStep:
    """Batched synthesis through :class:`vits_fast.inference.Synthesizer` on synthetic phoneme ids.

    ``sizes.batch`` utterances with ragged lengths up to ``sizes.text_len`` (:meth:`set_inputs` changes them
    without rebuilding the model). ``backend`` as for :class:`TrainStep`; ``decoder``: ``eager`` (the reference
    decoder), ``compiled`` (``torch.compile`` of it, no CUDA graphs), ``graphs`` (the eager decoder replayed as CUDA
    graphs per bucket) or ``compiled+graphs`` (both, as ``Synthesizer(fast=True)``); the last two need CUDA. The
    random draws are re-seeded on every call, so every call synthesises the same audio. Calling returns
    ``(audio [b, 1, T], lengths [b] in samples)``; :attr:`sample_rate` converts samples to seconds.
    """

    def __init__(self, config: str, sizes: Sizes, device: torch.device, *, backend: str = "auto",
                 decoder: str = "eager", seed: int = 0):
        from .inference import FastDecoder, Synthesizer
        from .models import SynthesizerTrn

        if decoder not in INFER_DECODERS:
            raise ValueError(f"decoder must be one of {INFER_DECODERS}, got {decoder!r}")
        self.config, self.device, self.backend, self.seed = config, device, backend, seed
        self.kwargs, self.audio = model_setup(config)
        self.sample_rate = self.audio.sample_rate
        torch.manual_seed(seed)
        model = SynthesizerTrn(**self.kwargs)
        self.synth = Synthesizer(model, device=device, copy_model=False)
        if decoder != "eager":
            self.synth.fast_decoder = FastDecoder(self.synth.model.dec, compile=decoder != "graphs",
                                                  cuda_graphs=decoder != "compiled", copy_decoder=False)
        set_module_backend(self.synth.model, backend)
        self.set_inputs(sizes)

    def set_inputs(self, sizes: Sizes) -> None:
        """Draw ``sizes.batch`` utterances (ids in [1, n_vocab), lengths in [text_len / 2, text_len], the first
        one ``text_len``): ``x`` [b, t_x], ``x_lengths`` [b], ``ids`` (the first utterance)."""
        self.sizes = sizes
        gen = torch.Generator().manual_seed(self.seed)
        self.x_lengths = ragged_lengths(sizes.batch, sizes.text_len, gen, low=0.5)
        self.x = (torch.randint(1, self.kwargs["n_vocab"], (sizes.batch, sizes.text_len), generator=gen)
                  * length_mask(self.x_lengths, sizes.text_len, torch.long)[:, 0])
        self.ids = self.x[0, : int(self.x_lengths[0])].clone()

    def __call__(self) -> Tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(self.seed)
        with backend_ctx(self.backend):
            return self.synth.synthesize(self.x, self.x_lengths)

    def first_chunk(self, chunk_frames: int = 64, first_chunk_frames: int = 16) -> torch.Tensor:
        """Stream the first utterance and return its first audio chunk (on the CPU): the time to first audio."""
        torch.manual_seed(self.seed)
        with backend_ctx(self.backend):
            stream = self.synth.stream(self.ids, chunk_frames=chunk_frames, first_chunk_frames=first_chunk_frames)
            try:
                return next(iter(stream))
            finally:
                stream.close()


# --------------------------------------------------------------------------------------------------------
# Kernel subjects
# --------------------------------------------------------------------------------------------------------

@dataclass
class KernelCase:
    """One fused subject on fixed random inputs.

    ``forward()`` runs the module (grad enabled) and returns its differentiable outputs; ``params`` are the tensors
    whose ``.grad`` a backward fills (inputs that require grad and the module's parameters); ``module`` is the
    eager module (its backend pinned). ``backward_supported`` is False for the alignment search.
    """

    subject: str
    config: str
    module: Optional[torch.nn.Module]
    forward: Callable[[], Tuple[torch.Tensor, ...]]
    params: List[torch.Tensor] = field(default_factory=list)
    backward_supported: bool = True
    info: Dict[str, Any] = field(default_factory=dict)

    def grads_to_none(self) -> None:
        for p in self.params:
            p.grad = None


def _hidden(config: str) -> int:
    return model_setup(config)[0]["hidden_channels"]


def _randomize(conv: torch.nn.Module, std: float, gen: torch.Generator) -> None:
    """Replace a zero-initialised projection (ConvFlow.proj, coupling post) by small random weights so the flow
    does real work (a zero projection makes the spline/affine map trivial)."""
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * std)
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen) * std)


def make_kernel_case(subject: str, config: str, sizes: Sizes, device: torch.device, *, backend: str = "auto",
                     dtype: torch.dtype = torch.float32, compile: bool = False, seed: int = 0,
                     ragged: bool = True) -> KernelCase:
    """Build one fused subject at ``sizes`` on ``device``.

    * ``wn``: ``WN(hidden, 5, 1, 16)`` (the posterior encoder's), x [b, hidden, frames], ragged mask;
    * ``spline``: ``ConvFlow(2, hidden, 3, 3)`` (the SDP's), x [b, 2, text_len], g [b, hidden, text_len];
    * ``coupling``: ``ResidualCouplingBlock(inter, hidden, 5, 1, 4)`` (the prior flow), x [b, inter, frames];
    * ``mas``: ``maximum_path`` on neg_cent [b, frames, text_len] float32 with a ragged mask (forward only; ``dtype``
      does not apply).

    ``backend`` is pinned on the module (and active around the alignment search); ``compile`` wraps the module in
    ``torch.compile`` (not for ``mas``); ``ragged=False`` gives every item the full lengths.
    """
    from .models import ResidualCouplingBlock
    from .modules import WN, ConvFlow

    gen = torch.Generator().manual_seed(seed)
    b = sizes.batch
    if subject == "mas":
        from .monotonic_align import maximum_path

        t_x, t_y = sizes.text_len, sizes.frames
        low = 0.75 if ragged else 1.0
        x_len = ragged_lengths(b, t_x, gen, low=low)
        y_len = torch.maximum(ragged_lengths(b, t_y, gen, low=low), x_len)
        mask = (length_mask(y_len, t_y).transpose(1, 2) * length_mask(x_len, t_x)).to(device)  # [b, t_y, t_x]
        neg_cent = torch.randn(b, t_y, t_x, generator=gen).to(device)

        def forward():
            with backend_ctx(backend):
                return (maximum_path(neg_cent, mask),)

        return KernelCase(subject, config, None, forward, backward_supported=False,
                          info=dict(neg_cent=neg_cent, mask=mask, x_lengths=x_len, y_lengths=y_len))

    hidden = _hidden(config)
    torch.manual_seed(seed)
    if subject == "wn":
        t = sizes.frames
        module = WN(hidden, 5, 1, 16)
        inputs = [torch.randn(b, hidden, t, generator=gen)]
    elif subject == "spline":
        t = sizes.text_len
        module = ConvFlow(2, hidden, 3, n_layers=3)
        _randomize(module.proj, hidden ** -0.5, gen)
        inputs = [torch.randn(b, 2, t, generator=gen) * 2.0, torch.randn(b, hidden, t, generator=gen)]
    elif subject == "coupling":
        t = sizes.frames
        inter = model_setup(config)[0]["inter_channels"]
        module = ResidualCouplingBlock(inter, hidden, 5, 1, 4)
        for flow in module.flows[::2]:
            _randomize(flow.post, 0.02, gen)
        inputs = [torch.randn(b, inter, t, generator=gen)]
    else:
        raise ValueError(f"subject must be one of {KERNELS}, got {subject!r}")
    lengths = ragged_lengths(b, t, gen, low=0.75 if ragged else 1.0)
    mask = length_mask(lengths, t).to(device=device, dtype=dtype)
    module = module.to(device=device, dtype=dtype).train()
    set_module_backend(module, backend)
    inputs = [(v.to(device=device, dtype=dtype) * mask).requires_grad_(True) for v in inputs]
    run = torch.compile(module) if compile else module

    if subject == "spline":
        def forward():
            with backend_ctx(backend):
                return run(inputs[0], mask, g=inputs[1])
    else:
        def forward():
            with backend_ctx(backend):
                out = run(inputs[0], mask)
                return out if isinstance(out, tuple) else (out,)

    params = inputs + [p for p in module.parameters() if p.requires_grad]
    return KernelCase(subject, config, module, forward, params, info=dict(mask=mask, lengths=lengths))


def backward_inputs(outputs: Sequence[torch.Tensor], seed: int = 1) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """(differentiable outputs, random upstream gradients of the same shapes) for ``torch.autograd.backward``."""
    gen = torch.Generator().manual_seed(seed)
    outs = [o for o in outputs if o.requires_grad]
    grads = [torch.randn(o.shape, generator=gen).to(device=o.device, dtype=o.dtype) for o in outs]
    return outs, grads


# --------------------------------------------------------------------------------------------------------
# Bandwidth
# --------------------------------------------------------------------------------------------------------

#: Outputs of each fused operator as (input index, size relative to that input); every tensor input is read once.
#: This gives the fewest bytes the operator can move (the floor of its memory traffic).
FUSED_OUTPUTS: Dict[str, Tuple[Tuple[int, float], ...]] = {
    "wn_gate": ((0, 0.5),),                      # acts [b, h, t] from x_in [b, 2h, t]
    "wn_gate_bwd": ((1, 1.0),),                  # d x_in [b, 2h, t]
    "wn_res_skip": ((0, 2.0),),                  # x', skip' [b, h, t]
    "wn_res_skip_bwd": ((0, 3.0),),              # dx [b, h, t], drs [b, 2h, t]
    "wn_out": ((0, 1.0),),
    "wn_out_bwd": ((0, 1.0),),
    "affine_coupling": ((0, 1.0),),              # out [B, 2C, T]
    "affine_coupling_bwd": ((2, 1.0), (3, 1.0)),  # grad_x, grad_stats
    "rq_spline_coupling": ((0, 1.0),),
    "rq_spline_coupling_bwd": ((2, 1.0), (3, 1.0)),  # grad_x, grad_h
    "maximum_path": ((0, 1.0),),                 # path [b, t_y, t_x] (+ durations, negligible)
    "hifigan_act": ((0, 1.0),),                  # xt [b, c, t] from x
    "hifigan_res_act": ((0, 2.0),),              # s, xt [b, c, t] from y
    "hifigan_act_bwd": ((1, 1.0),),              # d [b, c, t] from xt
    "hifigan_mrf": ((0, 1.0),),                  # MRF sum or next activation [b, c, t] from y
    "hifigan_mrf_bwd": ((1, 1.0),),              # d [b, c, t] from out
}

#: Bytes per element of the dtype names ``torch.profiler`` records (``FunctionEvent.input_dtypes``), lower-cased.
_DTYPE_SIZES = {"float": 4, "c10::bfloat16": 2, "c10::half": 2, "double": 8, "int": 4, "long int": 8, "bool": 1,
                "short int": 2, "signed char": 1, "unsigned char": 1}


def min_bytes(op: str, shapes: Sequence[Sequence[int]], dtypes: Sequence[str]) -> Optional[int]:
    """Fewest bytes fused operator ``op`` (name without ``vits_fast::``) moves for the given input shapes/dtypes:
    every tensor input read once plus every output written once (see :data:`FUSED_OUTPUTS`). None if unknown."""
    outputs = FUSED_OUTPUTS.get(op)
    if outputs is None:
        return None

    def size(i: int) -> int:
        shape = shapes[i] if i < len(shapes) else []
        if not shape:
            return 0
        dt = str(dtypes[i]).lower() if i < len(dtypes) else "float"
        return math.prod(shape) * _DTYPE_SIZES.get(dt, 4)

    total = sum(size(i) for i in range(len(shapes)))
    total += sum(int(size(i) * f) for i, f in outputs)
    return total


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written), median of timed copies of
    ``nbytes`` (random data) on ``device`` (CUDA only)."""
    if device.type != "cuda":
        raise ValueError("copy_bandwidth measures a CUDA device")
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    try:
        from triton.testing import do_bench

        ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    except ImportError:
        times = []
        for _ in range(20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        ms = sorted(times)[len(times) // 2]
    del src, dst
    return 2 * nbytes / (ms * 1e-3)


# --------------------------------------------------------------------------------------------------------
# Profiling
# --------------------------------------------------------------------------------------------------------

@dataclass
class StageRow:
    name: str
    calls: int
    cpu_ms: float
    device_ms: float


@dataclass
class KernelRow:
    name: str
    calls: int
    total_ms: float


@dataclass
class BandwidthRow:
    op: str
    calls: int
    bytes_per_call: int
    device_us: float
    gbps: float
    fraction_of_copy: float


@dataclass
class ProfileResult:
    """Per-step tables of one profiled run (times are per step: totals divided by ``steps``)."""

    workload: str
    config: str
    device: torch.device
    steps: int
    step_ms: float
    stages: List[StageRow]
    kernels: List[KernelRow]
    bandwidth: List[BandwidthRow]
    copy_gbps: Optional[float]
    trace: Optional[Path]


def _stage_rows(events, expected: Sequence[str], steps: int) -> List[StageRow]:
    acc: Dict[str, List[float]] = {}
    for e in events:
        if not e.name.startswith("vits.") or e.device_type != torch.autograd.DeviceType.CPU or e.is_async:
            continue
        name = e.name[len("vits."):]
        row = acc.setdefault(name, [0, 0.0, 0.0])
        row[0] += 1
        row[1] += e.cpu_time_total / 1e3
        row[2] += e.device_time_total / 1e3
    order = list(expected) + sorted(k for k in acc if k not in expected)
    return [StageRow(n, int(acc[n][0] / steps), acc[n][1] / steps, acc[n][2] / steps) if n in acc
            else StageRow(n, 0, 0.0, 0.0) for n in order]


def _kernel_rows(prof, on_cuda: bool, steps: int, limit: int) -> List[KernelRow]:
    rows = []
    for avg in prof.key_averages():
        if avg.key.startswith(("vits.", "ProfilerStep", "profile.")):
            continue
        t = avg.self_device_time_total if on_cuda else avg.self_cpu_time_total
        if on_cuda and avg.device_type == torch.autograd.DeviceType.CPU:
            continue
        if t > 0:
            rows.append(KernelRow(avg.key, int(avg.count / steps), t / 1e3 / steps))
    rows.sort(key=lambda r: -r.total_ms)
    return rows[:limit]


def _bandwidth_rows(events, steps: int, copy_bps: float) -> List[BandwidthRow]:
    acc: Dict[str, List[float]] = {}
    for e in events:
        if not e.name.startswith("vits_fast::") or e.device_type != torch.autograd.DeviceType.CPU:
            continue
        op = e.name.split("::", 1)[1]
        nbytes = min_bytes(op, e.input_shapes or [], getattr(e, "input_dtypes", None) or [])
        if nbytes is None or e.device_time_total <= 0:
            continue
        row = acc.setdefault(op, [0, 0.0, 0.0])
        row[0] += 1
        row[1] += nbytes
        row[2] += e.device_time_total  # microseconds
    rows = []
    for op, (calls, nbytes, us) in sorted(acc.items()):
        bps = nbytes / (us * 1e-6)
        rows.append(BandwidthRow(op, int(calls / steps), int(nbytes / calls), us / calls, bps / 1e9, bps / copy_bps))
    return rows


def build_workload(workload: str, config: str, sizes: Sizes, device: torch.device, *, backend: str = "auto",
                   precision: str = "fp32") -> Tuple[Callable[[], Any], Sequence[str]]:
    """(one-iteration callable, expected stage names) of ``workload``."""
    if workload == "train-step":
        return TrainStep(config, sizes, device, backend=backend, precision=precision), TRAIN_STAGES
    if workload == "infer":
        step = InferStep(config, sizes, device, backend=backend)
        return step, INFER_STAGES
    if workload.startswith("kernel:"):
        subject = workload.split(":", 1)[1]
        dtype = PRECISIONS[precision] or torch.float32
        case = make_kernel_case(subject, config, sizes, device, backend=backend, dtype=dtype)

        def run():
            with stage("forward"):
                outs = case.forward()
            if case.backward_supported:
                outs, grads = backward_inputs(outs)
                with stage("backward"):
                    torch.autograd.backward(outs, grads)
                case.grads_to_none()
            return outs

        return run, KERNEL_STAGES if case.backward_supported else KERNEL_STAGES[:1]
    raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")


def profile_workload(workload: str, config: str, *, device: Optional[torch.device] = None,
                     sizes: Optional[Sizes] = None, backend: str = "auto", precision: str = "fp32",
                     steps: int = 2, warmup: int = 1, trace: Optional[os.PathLike] = None,
                     row_limit: int = 20) -> ProfileResult:
    """Run ``warmup`` untimed iterations, then profile ``steps`` iterations; returns the tables (per step) and
    writes the Chrome trace to ``trace`` (when given)."""
    from torch.profiler import ProfilerActivity, profile

    device = device or resolve_device(None)
    sizes = sizes or default_sizes(workload, device)
    run, expected = build_workload(workload, config, sizes, device, backend=backend, precision=precision)
    on_cuda = device.type == "cuda"
    for _ in range(warmup):
        run()
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with warnings.catch_warnings(), profile(activities=activities, record_shapes=on_cuda) as prof:
        # torch.profiler's notice that it clears its events each cycle is about its schedule API, not used here
        warnings.filterwarnings("ignore", message=".*Profiler clears events.*")
        start = time.perf_counter()
        for _ in range(steps):
            with torch.profiler.record_function("profile.step"):
                run()
        _sync(device)
        elapsed = time.perf_counter() - start
    events = prof.events()
    copy_bps = copy_bandwidth(device) if on_cuda else None
    result = ProfileResult(
        workload=workload, config=config, device=device, steps=steps, step_ms=elapsed * 1e3 / steps,
        stages=_stage_rows(events, expected, steps), kernels=_kernel_rows(prof, on_cuda, steps, row_limit),
        bandwidth=_bandwidth_rows(events, steps, copy_bps) if on_cuda else [],
        copy_gbps=copy_bps / 1e9 if copy_bps else None, trace=Path(trace).resolve() if trace else None)
    if trace:
        Path(trace).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    return result


def format_result(r: ProfileResult) -> str:
    """The printed report of :func:`profile_workload`."""
    on_cuda = r.device.type == "cuda"
    lines = [f"vits_fast.profile: {r.workload}, config {r.config}, {r.device}"
             f"{' (' + torch.cuda.get_device_name(r.device) + ')' if on_cuda else ''}, torch {torch.__version__}, "
             f"{r.steps} profiled step(s), {r.step_ms:.2f} ms per step (wall, under the profiler)", ""]
    lines.append("Per stage (per step; CPU = wall time inside the range"
                 + ("; device = kernels launched inside it)" if on_cuda else ")"))
    head = f"{'stage':<22}{'calls':>7}{'CPU ms':>12}{'% step':>9}" + (f"{'device ms':>12}" if on_cuda else "")
    lines += [head, "-" * len(head)]
    for s in r.stages:
        pct = 100.0 * s.cpu_ms / r.step_ms if r.step_ms else 0.0
        line = f"{s.name:<22}{s.calls:>7}{s.cpu_ms:>12.3f}{pct:>8.1f}%"
        if on_cuda:
            line += f"{s.device_ms:>12.3f}"
        lines.append(line)
    lines.append("")
    lines.append("Per kernel (per step; " + ("device kernels by self device time)" if on_cuda
                                            else "CPU operators by self CPU time)"))
    head = f"{'kernel' if on_cuda else 'operator':<70}{'calls':>7}{'ms':>11}"
    lines += [head, "-" * len(head)]
    for k in r.kernels:
        name = k.name if len(k.name) <= 68 else k.name[:65] + "..."
        lines.append(f"{name:<70}{k.calls:>7}{k.total_ms:>11.3f}")
    lines.append("")
    if on_cuda:
        lines.append(f"Fused operators: achieved bandwidth (fewest bytes / device time) against the device copy "
                     f"bandwidth, {r.copy_gbps:.0f} GB/s measured here (read + write)")
        head = f"{'operator':<30}{'calls':>7}{'MB/call':>10}{'us/call':>10}{'GB/s':>9}{'% copy':>9}"
        lines += [head, "-" * len(head)]
        for b in r.bandwidth:
            lines.append(f"{b.op:<30}{b.calls:>7}{b.bytes_per_call / 1e6:>10.2f}{b.device_us:>10.1f}{b.gbps:>9.0f}"
                         f"{100 * b.fraction_of_copy:>8.1f}%")
        if not r.bandwidth:
            lines.append("(no fused operator ran: backend 'reference', or none of the subject's ops is fused)")
    else:
        lines.append("Fused-kernel bandwidth: CUDA only (this run is on the CPU, where the fused Triton kernels do "
                     "not run).")
    if r.trace:
        lines.append(f"Chrome trace: {r.trace}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vits_fast.profile", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="train-step", choices=WORKLOADS, help="what to run (default train-step)")
    p.add_argument("--config", default="medium", choices=CONFIGS, help="model size (Piper preset; default medium)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--backend", default="auto", choices=("auto", "reference", "triton"),
                   help="vits_fast backend (default auto: Triton kernels on CUDA)")
    p.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS),
                   help="fp32, or bf16 (autocast for train-step; bf16 tensors for kernels)")
    p.add_argument("--batch", type=int, help="batch size (default: 32 on CUDA, small on CPU; see DEFAULT_SIZES)")
    p.add_argument("--text-len", type=int, help="maximum phoneme ids per item")
    p.add_argument("--frames", type=int, help="maximum spectrogram frames per item")
    p.add_argument("--segment-frames", type=int,
                   help="train-step: decoder window in frames (default: the preset's, 32 = 8192 samples)")
    p.add_argument("--steps", type=int, default=2, help="profiled iterations (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations before profiling (default 1)")
    p.add_argument("--rows", type=int, default=20, help="rows of the kernel table (default 20)")
    p.add_argument("--threads", type=int, help="torch intra-op CPU threads (default: torch's choice)")
    p.add_argument("--trace", default=None,
                   help="Chrome trace path (default: <output-dir>/<workload>_<config>.json)")
    p.add_argument("--output-dir", default="vits_fast_profile",
                   help="folder of the default trace path (default: ./vits_fast_profile)")
    from . import costmodel

    costmodel.add_arguments(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> ProfileResult:
    args = build_parser().parse_args(argv)
    if args.estimate:
        from . import costmodel

        return costmodel.main(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    base = default_sizes(args.workload, device)
    sizes = Sizes(args.batch or base.batch, args.text_len or base.text_len, args.frames or base.frames,
                  args.segment_frames)
    trace = args.trace or Path(args.output_dir) / f"{args.workload.replace(':', '-')}_{args.config}.json"
    result = profile_workload(args.workload, args.config, device=device, sizes=sizes, backend=args.backend,
                              precision=args.precision, steps=args.steps, warmup=args.warmup, trace=trace,
                              row_limit=args.rows)
    print(format_result(result))
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()
