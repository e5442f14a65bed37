"""One Piper training step, the single definition that :class:`vits_fast.train.Trainer`, ``python -m
vits_fast.profile`` and the benchmark suite all run.

A step: generator forward (under autocast for bf16/fp16), the mel spectrograms and the real audio window, the
discriminator on the real and generated windows, the generator losses (mel L1 x ``C_MEL``, KL x ``C_KL``,
duration, LSGAN generator and feature matching), the generator backward, the discriminator forward on the detached
window and its loss and backward, optional gradient clipping, and both AdamW updates. The profiler ranges
``vits.discriminator``, ``vits.losses``, ``vits.backward`` and ``vits.optimizer`` cover what the model's own ranges
(text encoder, posterior encoder, flow, alignment search, duration predictor, decoder) do not.

No host synchronisation: the step returns its losses (and gradient norms) as a device tensor and a device flag
saying whether all of them are finite. The updates are skipped on the device when they are not: fused AdamW
reads the flag as its ``found_inf`` (the update and its step counter are left untouched, as GradScaler does for
fp16 overflows), so nothing waits for the GPU. :class:`DeferredRead` copies these values to the host in the
background; the trainer reads step k's copy after it has queued step k+1, while the GPU is still busy. The only
synchronisations left are listed in :data:`HOST_SYNCS` with their reasons; the audit test
(``tests/test_sync_audit.py``) fails on any other.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.nn import functional as F

from ..commons import slice_segments, stage
from ..config import AudioConfig
from ..data import Batch
from ..losses import discriminator_loss, feature_loss, generator_loss, kl_loss
from ..mel_processing import mel_spectrogram_torch, spec_to_mel_torch

#: Piper's loss weights.
C_MEL = 45.0
C_KL = 1.0
#: Names of the step's losses, in the order of :attr:`StepOutput.values`; gradient norms follow when clipping.
LOSS_NAMES = ("loss_g", "loss_d", "loss_mel", "loss_kl", "loss_dur", "loss_gen", "loss_fm")
GRAD_NORM_NAMES = ("grad_norm_g", "grad_norm_d")

#: Host synchronisations a step may still cause, with the reason each is needed (the audit test reads this).
HOST_SYNCS: Dict[str, str] = {
    "fp16 GradScaler": "with --precision 16 and an optimizer that is not fused, GradScaler.step reads its "
                       "overflow flag on the host; fused AdamW (the default wherever PyTorch has it) avoids it",
}


def adamw(params, device: torch.device, lr: float, betas: Tuple[float, float] = (0.8, 0.99),
          eps: float = 1e-9) -> torch.optim.AdamW:
    """Piper's AdamW, fused (one multi-tensor kernel, no per-parameter host work, and an on-device skip of
    non-finite steps) where PyTorch has a fused AdamW for ``device``; foreach otherwise."""
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, fused=fused)


COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


def compile_fixed_shape_parts(model_g: torch.nn.Module, model_d: torch.nn.Module, mode: str = "default",
                              backend: str = "inductor") -> None:
    """``torch.compile`` the parts of a training step whose shapes are fixed: the decoder (``model_g.dec``) and
    the discriminator see windows of ``segment_size`` frames only, so they compile once per batch size.
    ``mode="reduce-overhead"`` also replays them as CUDA graphs, which removes the per-launch host time that the
    first GPU measurements found dominant. Call before wrapping the models in DDP."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    if mode == "off":
        return
    opts = dict(backend=backend, dynamic=False)
    if backend == "inductor":
        opts["mode"] = mode
    model_g.dec.compile(**opts)
    model_d.compile(**opts)


@dataclass
class StepParts:
    """What a training step works on.

    ``model_g``/``model_d``: the generator (:class:`~vits_fast.models.SynthesizerTrn`) and the
    :class:`~vits_fast.models.MultiPeriodDiscriminator`; ``g_train``/``d_train``: what the step calls (their DDP
    wrappers, or None for the models themselves); ``amp_dtype``: autocast dtype (None: fp32); ``scaler``: fp16's
    GradScaler (None or disabled otherwise); ``grad_clip``: max gradient norm (None: no clipping);
    ``distributed``: all-reduce the finite flag so that every rank skips the same steps.
    """

    model_g: torch.nn.Module
    model_d: torch.nn.Module
    optim_g: torch.optim.Optimizer
    optim_d: torch.optim.Optimizer
    audio: AudioConfig
    segment_size: int
    g_train: Optional[torch.nn.Module] = None
    d_train: Optional[torch.nn.Module] = None
    amp_dtype: Optional[torch.dtype] = None
    scaler: Optional[torch.amp.GradScaler] = None
    grad_clip: Optional[float] = None
    distributed: bool = False

    @property
    def device_type(self) -> str:
        return next(self.model_g.parameters()).device.type

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.amp_dtype)

    def fp32(self):
        return torch.autocast(self.device_type, enabled=False)


@dataclass
class StepOutput:
    """``values`` [n] float32 on the step's device (the losses of :data:`LOSS_NAMES`, then the gradient norms
    of :data:`GRAD_NORM_NAMES` when clipping); ``finite`` [] bool on the device: every value finite, so the
    updates were applied."""

    values: torch.Tensor
    finite: torch.Tensor
    names: Tuple[str, ...]


def _scaled(parts: StepParts, loss: torch.Tensor) -> torch.Tensor:
    return parts.scaler.scale(loss) if parts.scaler is not None and parts.scaler.is_enabled() else loss


def generator_pass(parts: StepParts, g_model: torch.nn.Module, batch: Batch):
    """Generator forward, mels and the real audio window. Returns (outputs of ``SynthesizerTrn.forward``,
    y_mel [b, mel, seg], y_hat_mel [b, mel, seg], y [b, 1, seg * hop])."""
    seg, a = parts.segment_size, parts.audio
    with parts.autocast():
        out = g_model(batch.phoneme_ids, batch.phoneme_lengths, batch.spectrograms, batch.spectrogram_lengths,
                      batch.speaker_ids)
    y_hat, ids_slice = out[0], out[3]
    with stage("losses"), parts.fp32():
        spec_slice = slice_segments(batch.spectrograms, ids_slice, seg)
        y_mel = spec_to_mel_torch(spec_slice, a.filter_length, a.mel_channels, a.sample_rate, a.mel_fmin, a.mel_fmax)
        y_hat_mel = mel_spectrogram_torch(y_hat.float().squeeze(1), a.filter_length, a.mel_channels,
                                          a.sample_rate, a.hop_length, a.win_length, a.mel_fmin, a.mel_fmax)
        y = slice_segments(batch.audios, ids_slice * a.hop_length, seg * a.hop_length)
    return out, y_mel, y_hat_mel, y


def _optimizer_step(parts: StepParts, optim: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    scaler = parts.scaler
    if scaler is not None and scaler.is_enabled():
        scaler.step(optim)  # fp16: the scaler's own overflow flag (inf/NaN gradients) decides
    elif optim.defaults.get("fused"):
        optim.found_inf = skip  # read on the device by the fused kernel
        optim.step()
        optim.found_inf = None
    elif not bool(skip):  # host synchronisation: only for optimizers without a fused kernel (not the default)
        optim.step()


def train_step(parts: StepParts, batch: Batch) -> StepOutput:
    """One generator + discriminator update on ``batch`` (already on the models' device); see the module doc."""
    g_train = parts.g_train or parts.model_g
    d_train = parts.d_train or parts.model_d
    g_train.train()
    d_train.train()
    parts.model_d.requires_grad_(False)  # G step: gradients reach y_hat through D, not D's weights
    out, y_mel, y_hat_mel, y = generator_pass(parts, g_train, batch)
    y_hat, l_length, _attn, _ids, _x_mask, z_mask, (_z, z_p, m_p, logs_p, _m_q, logs_q) = out
    with stage("discriminator"), parts.autocast():
        _, y_d_hat_g, fmap_r, fmap_g = parts.model_d(y, y_hat)
    with stage("losses"), parts.fp32():
        loss_dur = torch.sum(l_length.float())
        loss_mel = F.l1_loss(y_mel, y_hat_mel) * C_MEL
        loss_kl = kl_loss(z_p, logs_q, m_p, logs_p, z_mask) * C_KL
        loss_fm = feature_loss(fmap_r, fmap_g)
        loss_gen, _ = generator_loss(y_d_hat_g)
        loss_g = loss_gen + loss_fm + loss_mel + loss_dur + loss_kl
    with stage("backward"):
        _scaled(parts, loss_g).backward()
    parts.model_d.requires_grad_(True)

    with stage("discriminator"), parts.autocast():
        y_d_r, y_d_g, _, _ = d_train(y, y_hat.detach())
    with stage("losses"), parts.fp32():
        loss_d, _, _ = discriminator_loss(y_d_r, y_d_g)
    with stage("backward"):
        _scaled(parts, loss_d).backward()

    with stage("optimizer"):
        scalars = [loss_g, loss_d, loss_mel, loss_kl, loss_dur, loss_gen, loss_fm]
        names = LOSS_NAMES
        if parts.grad_clip is not None:
            if parts.scaler is not None and parts.scaler.is_enabled():
                parts.scaler.unscale_(parts.optim_g)
                parts.scaler.unscale_(parts.optim_d)
            gn_g = torch.nn.utils.clip_grad_norm_(parts.model_g.parameters(), parts.grad_clip)
            gn_d = torch.nn.utils.clip_grad_norm_(parts.model_d.parameters(), parts.grad_clip)
            if parts.scaler is None or not parts.scaler.is_enabled():  # fp16 overflows are the scaler's business
                scalars += [gn_g, gn_d]
                names = LOSS_NAMES + GRAD_NORM_NAMES
        values = torch.stack([s.detach().float() for s in scalars])
        finite = torch.isfinite(values).all()
        if parts.distributed:
            flag = finite.float().reshape(1)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)  # every rank decides alike
            finite = flag[0] > 0
        skip = (~finite).float()
        _optimizer_step(parts, parts.optim_g, skip)
        _optimizer_step(parts, parts.optim_d, skip)
        if parts.scaler is not None and parts.scaler.is_enabled():
            parts.scaler.update()
        parts.optim_g.zero_grad(set_to_none=True)
        parts.optim_d.zero_grad(set_to_none=True)
    return StepOutput(values, finite, names)


class DeferredRead:
    """Host copies of steps' outputs, started when each step has been queued and read one step later.

    ``push(out, meta)`` queues a non-blocking copy of ``out`` into pinned host memory behind the step's work;
    ``pop()`` returns the oldest pushed step as ``(losses dict, finite bool, meta)``, waiting (on an event, not
    the stream) only for that step's own work, which has finished or is about to while the GPU runs the next one.
    """

    def __init__(self) -> None:
        self._pending: List[Tuple[StepOutput, torch.Tensor, torch.Tensor, Optional[torch.cuda.Event], Any]] = []

    def push(self, out: StepOutput, meta: Any = None) -> None:
        if out.values.is_cuda:
            values = torch.empty(out.values.shape, dtype=out.values.dtype, pin_memory=True)
            finite = torch.empty((), dtype=torch.bool, pin_memory=True)
            values.copy_(out.values, non_blocking=True)
            finite.copy_(out.finite, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            values, finite, event = out.values, out.finite, None
        self._pending.append((out, values, finite, event, meta))

    def __len__(self) -> int:
        return len(self._pending)

    def pop(self) -> Tuple[Dict[str, float], bool, Any]:
        out, values, finite, event, meta = self._pending.pop(0)
        if event is not None:
            event.synchronize()
        return dict(zip(out.names, values.tolist())), bool(finite), meta


def losses_of(out: StepOutput) -> Tuple[Dict[str, float], bool]:
    """Read one step's losses at once (a host synchronisation: for tests and one-off use, not the loop)."""
    reader = DeferredRead()
    reader.push(out)
    losses, finite, _ = reader.pop()
    return losses, finite

