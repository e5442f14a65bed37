"""Spectrogram and mel filterbank: Piper's formulas, checked against independent float64 references."""

import math

import numpy as np
import pytest
import torch

from vits_fast.mel_processing import (hz_to_mel, mel_filterbank, mel_spectrogram_torch, mel_to_hz,
                                      spec_to_mel_torch, spectrogram_torch)

# librosa.filters.mel(sr=8000, n_fft=32, n_mels=6) (librosa 0.11, float32), rounded to 1e-10.
_LIBROSA_8K_32_6 = [
    [0.0, 0.0022290919, 0.0015138736] + [0.0] * 14,
    [0.0, 0.0, 0.0014718079, 0.0022706122, 4.30968e-05] + [0.0] * 12,
    [0.0, 0.0, 0.0, 0.0006388022, 0.0026297311, 0.0010900827] + [0.0] * 11,
    [0.0] * 5 + [0.0011829301, 0.0017244829, 0.0008704927, 1.65026e-05] + [0.0] * 8,
    [0.0] * 6 + [0.0001950635, 0.0007996545, 0.0014042456, 0.0009961736, 0.0005681472, 0.0001401207] + [0.0] * 5,
    [0.0] * 9 + [0.00029717, 0.0006001958, 0.0009032215, 0.0008581207, 0.0006435906, 0.0004290604,
                 0.0002145302, 0.0],
]


def test_filterbank_matches_librosa_values():
    fb = mel_filterbank(8000, 32, 6)
    assert fb.dtype == np.float32 and fb.shape == (6, 17)
    np.testing.assert_allclose(fb, np.array(_LIBROSA_8K_32_6), rtol=0, atol=2e-10)


def test_filterbank_22k_summary_matches_librosa():
    # librosa.filters.mel(sr=22050, n_fft=1024, n_mels=80, fmin=0, fmax=8000): row sums, argmax, total.
    fb = mel_filterbank(22050, 1024, 80, 0.0, 8000.0)
    np.testing.assert_allclose(fb.sum(1)[[0, 10, 40, 79]], [0.045302778, 0.049143925, 0.046545245, 0.046414793],
                               rtol=1e-6)
    assert fb.argmax(1)[[0, 10, 40, 79]].tolist() == [2, 19, 80, 358]
    assert math.isclose(float(fb.sum()), 3.713688373565674, rel_tol=1e-6)


@pytest.mark.parametrize("args", [(22050, 1024, 80, 0.0, None), (16000, 256, 40, 0.0, 8000.0),
                                  (16000, 128, 32, 50.0, 7000.0), (44100, 2048, 128, 20.0, None)])
def test_filterbank_against_librosa_when_installed(args):
    librosa = pytest.importorskip("librosa")
    ref = librosa.filters.mel(sr=args[0], n_fft=args[1], n_mels=args[2], fmin=args[3], fmax=args[4])
    np.testing.assert_allclose(mel_filterbank(*args), ref, rtol=0, atol=1e-8)


def test_mel_scale_roundtrip_and_breakpoint():
    hz = np.array([0.0, 200.0, 999.0, 1000.0, 1001.0, 4000.0, 11025.0])
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(hz)), hz, rtol=1e-12, atol=1e-9)
    assert hz_to_mel(np.array(1000.0)) == pytest.approx(15.0)
    assert hz_to_mel(np.array(6400.0)) == pytest.approx(15.0 + 27.0)  # 27 mels per factor 6.4 above 1 kHz


def _reference_spectrogram(y: np.ndarray, n_fft: int, hop: int, win: int) -> np.ndarray:
    """Piper's definition written out in float64: reflect pad, framed DFT with a periodic Hann window."""
    pad = (n_fft - hop) // 2
    y = np.pad(y, (pad, pad), mode="reflect")
    window = np.zeros(n_fft)
    n = np.arange(win)
    off = (n_fft - win) // 2
    window[off:off + win] = 0.5 - 0.5 * np.cos(2 * np.pi * n / win)
    frames = (len(y) - n_fft) // hop + 1
    k = np.arange(n_fft // 2 + 1)[:, None]
    t = np.arange(n_fft)[None, :]
    basis = np.exp(-2j * np.pi * k * t / n_fft)
    out = np.empty((n_fft // 2 + 1, frames))
    for f in range(frames):
        seg = y[f * hop: f * hop + n_fft] * window
        spec = basis @ seg
        out[:, f] = np.sqrt(spec.real ** 2 + spec.imag ** 2 + 1e-6)
    return out


@pytest.mark.parametrize("n_fft,hop,win,length", [(64, 16, 64, 301), (128, 32, 96, 517), (256, 64, 256, 1024)])
def test_spectrogram_matches_reference(n_fft, hop, win, length):
    rng = np.random.default_rng(n_fft + length)
    y = rng.uniform(-0.9, 0.9, size=(2, length))
    got = spectrogram_torch(torch.tensor(y, dtype=torch.float32), n_fft, 16000, hop, win)
    assert got.dtype == torch.float32
    for b in range(2):
        ref = _reference_spectrogram(y[b], n_fft, hop, win)
        assert got.shape[1:] == ref.shape
        np.testing.assert_allclose(got[b].numpy(), ref, rtol=2e-5, atol=2e-5)
    # frames = T // hop when hop divides T (Piper's alignment of audio and frames)
    if length % hop == 0:
        assert got.shape[-1] == length // hop


def test_mel_is_filterbank_of_spectrogram_and_fp32_under_autocast():
    rng = np.random.default_rng(3)
    y = torch.tensor(rng.uniform(-0.5, 0.5, size=(3, 2048)), dtype=torch.float32)
    spec = spectrogram_torch(y, 256, 16000, 64, 256)
    fb = torch.from_numpy(mel_filterbank(16000, 256, 40, 0.0, None)).double()
    ref = torch.log(torch.clamp(fb @ spec.double(), min=1e-5)).float()
    mel = spec_to_mel_torch(spec, 256, 40, 16000, 0.0, None)
    torch.testing.assert_close(mel, ref, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mel_amp = mel_spectrogram_torch(y.bfloat16(), 256, 40, 16000, 64, 256, 0.0, None)
    assert mel_amp.dtype == torch.float32
    mel_direct = mel_spectrogram_torch(y.bfloat16().float(), 256, 40, 16000, 64, 256, 0.0, None)
    torch.testing.assert_close(mel_amp, mel_direct, rtol=0, atol=0)
