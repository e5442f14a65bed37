"""Linear and mel spectrograms exactly as Piper/VITS compute them for training.

* Linear spectrogram: reflect-pad ``(n_fft - hop) / 2`` samples on both sides, STFT with ``center=False`` and a
  Hann window of ``win_size``, magnitude ``sqrt(re^2 + im^2 + 1e-6)``. Shape ``[b, n_fft // 2 + 1, frames]`` with
  ``frames = (T + 2 * pad - n_fft) // hop + 1`` (= ``T // hop`` when ``hop`` divides ``T``).
* Mel: Slaney-scale, Slaney-normalised triangular filterbank (the defaults of ``librosa.filters.mel``, which
  upstream calls), applied to the linear magnitude, then ``log(clamp(x, 1e-5))``.

Both always run in float32 (also under autocast): cuFFT needs fp32 for non-power-of-two sizes and half-precision
mel losses are too coarse. The filterbank is computed here in float64 with NumPy (no librosa dependency) and cached
per ``(sr, n_fft, n_mels, fmin, fmax, device)``; the Hann window is cached per ``(win_size, device)``.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import numpy as np
import torch

# --- Slaney mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above (27 mels per factor 6.4) ------
_F_SP = 200.0 / 3.0
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = math.log(6.4) / 27.0


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel of frequencies in Hz (array in, float64 array out)."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / _F_SP
    log_part = _MIN_LOG_MEL + np.log(np.maximum(hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(hz >= _MIN_LOG_HZ, log_part, linear)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * _F_SP
    log_part = _MIN_LOG_HZ * np.exp(_LOGSTEP * (np.maximum(mel, _MIN_LOG_MEL) - _MIN_LOG_MEL))
    return np.where(mel >= _MIN_LOG_MEL, log_part, linear)


def mel_filterbank(sr: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: Optional[float] = None) -> np.ndarray:
    """Slaney triangular filterbank ``[n_mels, n_fft // 2 + 1]`` (float32), area-normalised per filter.

    Matches ``librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)`` (htk=False,
    norm="slaney"). ``fmax=None`` means ``sr / 2``.
    """
    if fmax is None:
        fmax = sr / 2.0
    fft_freqs = np.linspace(0.0, sr / 2.0, n_fft // 2 + 1)
    # n_mels + 2 band edges equally spaced in mel.
    edges = mel_to_hz(np.linspace(hz_to_mel(np.array(fmin)), hz_to_mel(np.array(fmax)), n_mels + 2))
    widths = np.diff(edges)  # [n_mels + 1]
    dist = edges[:, None] - fft_freqs[None, :]  # [n_mels + 2, n_freqs]
    rising = -dist[:-2] / widths[:-1, None]
    falling = dist[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.astype(np.float32)


_MEL_CACHE: Dict[Tuple, torch.Tensor] = {}
_WINDOW_CACHE: Dict[Tuple, torch.Tensor] = {}


def _mel_basis(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: Optional[float],
               device: torch.device) -> torch.Tensor:
    key = (sr, n_fft, n_mels, float(fmin), None if fmax is None else float(fmax), str(device))
    basis = _MEL_CACHE.get(key)
    if basis is None:
        basis = torch.from_numpy(mel_filterbank(sr, n_fft, n_mels, fmin, fmax)).to(device)
        _MEL_CACHE[key] = basis
    return basis


def _hann(win_size: int, device: torch.device) -> torch.Tensor:
    key = (win_size, str(device))
    window = _WINDOW_CACHE.get(key)
    if window is None:
        window = torch.hann_window(win_size, dtype=torch.float32, device=device)
        _WINDOW_CACHE[key] = window
    return window


def spectrogram_torch(y: torch.Tensor, n_fft: int, sampling_rate: int, hop_size: int, win_size: int,
                      center: bool = False) -> torch.Tensor:
    """Linear magnitude spectrogram, float32.

    y: [b, T] or [T] audio in [-1, 1]. Returns [b, n_fft // 2 + 1, frames] (or [n_fft // 2 + 1, frames]).
    ``sampling_rate`` is unused (kept for upstream's signature). ``center`` is passed to ``torch.stft`` after the
    reflect padding, as upstream does (training always uses ``False``).
    """
    del sampling_rate
    squeeze = y.dim() == 1
    if squeeze:
        y = y.unsqueeze(0)
    with torch.autocast(y.device.type, enabled=False):
        y = y.float()
        pad = (n_fft - hop_size) // 2
        y = torch.nn.functional.pad(y.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
        stft = torch.stft(y, n_fft, hop_length=hop_size, win_length=win_size, window=_hann(win_size, y.device),
                          center=center, pad_mode="reflect", normalized=False, onesided=True, return_complex=True)
        spec = torch.sqrt(stft.real.square() + stft.imag.square() + 1e-6)
    return spec.squeeze(0) if squeeze else spec


def dynamic_range_compression_torch(x: torch.Tensor, C: float = 1.0, clip_val: float = 1e-5) -> torch.Tensor:
    """``log(clamp(x, clip_val) * C)``."""
    return torch.log(torch.clamp(x, min=clip_val) * C)


def dynamic_range_decompression_torch(x: torch.Tensor, C: float = 1.0) -> torch.Tensor:
    """Inverse of :func:`dynamic_range_compression_torch` (above the clip)."""
    return torch.exp(x) / C


def spec_to_mel_torch(spec: torch.Tensor, n_fft: int, num_mels: int, sampling_rate: int, fmin: float,
                      fmax: Optional[float]) -> torch.Tensor:
    """Log-mel from a linear magnitude spectrogram.

    spec: [b, n_fft // 2 + 1, frames] (or without the batch axis). Returns [b, num_mels, frames], float32.
    """
    with torch.autocast(spec.device.type, enabled=False):
        basis = _mel_basis(sampling_rate, n_fft, num_mels, fmin, fmax, spec.device)
        mel = torch.matmul(basis, spec.float())
        return dynamic_range_compression_torch(mel)


def mel_spectrogram_torch(y: torch.Tensor, n_fft: int, num_mels: int, sampling_rate: int, hop_size: int,
                          win_size: int, fmin: float, fmax: Optional[float], center: bool = False) -> torch.Tensor:
    """Log-mel spectrogram of audio: :func:`spectrogram_torch` then :func:`spec_to_mel_torch`.

    y: [b, T] audio. Returns [b, num_mels, frames], float32.
    """
    spec = spectrogram_torch(y, n_fft, sampling_rate, hop_size, win_size, center=center)
    return spec_to_mel_torch(spec, n_fft, num_mels, sampling_rate, fmin, fmax)
