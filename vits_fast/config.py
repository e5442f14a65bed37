"""Piper's model presets (``--quality`` in piper_train) and audio settings.

``model_kwargs("medium", num_symbols=256)`` gives the keyword arguments of :class:`SynthesizerTrn` exactly as
Piper builds them; ``PRESETS`` holds the parts that differ between qualities.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

QUALITIES = ("x-low", "medium", "high")

_DECODER_SMALL: Dict[str, Any] = dict(
    resblock="2",
    resblock_kernel_sizes=(3, 5, 7),
    resblock_dilation_sizes=((1, 2), (2, 6), (3, 12)),
    upsample_rates=(8, 8, 4),
    upsample_initial_channel=256,
    upsample_kernel_sizes=(16, 16, 8),
)
_DECODER_LARGE: Dict[str, Any] = dict(
    resblock="1",
    resblock_kernel_sizes=(3, 7, 11),
    resblock_dilation_sizes=((1, 3, 5), (1, 3, 5), (1, 3, 5)),
    upsample_rates=(8, 8, 2, 2),
    upsample_initial_channel=512,
    upsample_kernel_sizes=(16, 16, 4, 4),
)

PRESETS: Dict[str, Dict[str, Any]] = {
    "x-low": dict(inter_channels=96, hidden_channels=96, filter_channels=384, **_DECODER_SMALL),
    "medium": dict(inter_channels=192, hidden_channels=192, filter_channels=768, **_DECODER_SMALL),
    "high": dict(inter_channels=192, hidden_channels=192, filter_channels=768, **_DECODER_LARGE),
}


@dataclass(frozen=True)
class AudioConfig:
    """STFT/mel settings shared by training, synthesis and voice conversion (Piper's defaults)."""

    sample_rate: int = 22050
    filter_length: int = 1024
    hop_length: int = 256
    win_length: int = 1024
    mel_channels: int = 80
    mel_fmin: float = 0.0
    mel_fmax: Optional[float] = None

    @property
    def spec_channels(self) -> int:
        return self.filter_length // 2 + 1

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def model_kwargs(
    quality: str = "medium",
    num_symbols: int = 256,
    num_speakers: int = 1,
    *,
    segment_size: int = 8192,
    audio: AudioConfig = AudioConfig(),
    gin_channels: Optional[int] = None,
    **overrides: Any,
) -> Dict[str, Any]:
    """Keyword arguments for ``SynthesizerTrn`` as Piper builds them for ``quality``.

    ``segment_size`` is in samples (Piper's hyper-parameter) and is converted to frames. Multi-speaker
    models get ``gin_channels=512`` unless given.
    """
    if quality not in PRESETS:
        raise ValueError(f"quality must be one of {QUALITIES}, got {quality!r}")
    if num_speakers < 1:
        raise ValueError(f"num_speakers must be >= 1, got {num_speakers}")
    if gin_channels is None:
        gin_channels = 512 if num_speakers > 1 else 0
    kwargs: Dict[str, Any] = dict(
        n_vocab=num_symbols,
        spec_channels=audio.spec_channels,
        segment_size=segment_size // audio.hop_length,
        n_heads=2,
        n_layers=6,
        kernel_size=3,
        p_dropout=0.1,
        n_speakers=num_speakers,
        gin_channels=gin_channels,
        use_sdp=True,
        **PRESETS[quality],
    )
    kwargs.update(overrides)
    return kwargs


def tiny_model_kwargs(num_symbols: int = 32, num_speakers: int = 1, **overrides: Any) -> Dict[str, Any]:
    """A very small configuration with every code path of the full model, for tests and demos on a CPU."""
    kwargs: Dict[str, Any] = dict(
        n_vocab=num_symbols,
        spec_channels=65,
        segment_size=8,
        inter_channels=16,
        hidden_channels=16,
        filter_channels=32,
        n_heads=2,
        n_layers=2,
        kernel_size=3,
        p_dropout=0.1,
        resblock="2",
        resblock_kernel_sizes=(3, 5),
        resblock_dilation_sizes=((1, 2), (2, 6)),
        upsample_rates=(4, 4),
        upsample_initial_channel=32,
        upsample_kernel_sizes=(8, 8),
        n_speakers=num_speakers,
        gin_channels=8 if num_speakers > 1 else 0,
        use_sdp=True,
    )
    kwargs.update(overrides)
    return kwargs


# ----------------------------------------------------------------------------------------------------------
# The tiny preset: ``python -m vits_fast.train``'s demo on the embedded corpus, and the profiler's "tiny" config
# ----------------------------------------------------------------------------------------------------------

#: Audio settings of the ``tiny`` preset (16 kHz; hop = 4 * 4 * 4, its upsampling).
TINY_AUDIO = AudioConfig(sample_rate=16000, filter_length=256, hop_length=64, win_length=256, mel_channels=40)
#: Channel divisor of the ``tiny`` preset's discriminator (Piper's has 47M parameters: too slow on a CPU).
TINY_DISCRIMINATOR_DIVISOR = 16
#: Training window of the ``tiny`` preset, in samples.
TINY_SEGMENT_SAMPLES = 1024


def tiny_preset_kwargs(num_symbols: int = 256, num_speakers: int = 1, audio: AudioConfig = TINY_AUDIO,
                       segment_samples: int = TINY_SEGMENT_SAMPLES) -> Dict[str, Any]:
    """:class:`SynthesizerTrn` keyword arguments of the ``tiny`` preset for ``audio`` (its hop must be 64)."""
    return tiny_model_kwargs(num_symbols=num_symbols, num_speakers=num_speakers, spec_channels=audio.spec_channels,
                             upsample_rates=(4, 4, 4), upsample_kernel_sizes=(8, 8, 8), upsample_initial_channel=32,
                             segment_size=segment_samples // audio.hop_length)


def shrink_discriminator(mpd: Any, divisor: int = TINY_DISCRIMINATOR_DIVISOR) -> Any:
    """Rebuild every conv of a :class:`~vits_fast.models.MultiPeriodDiscriminator` with ``channels // divisor``
    (same kernels, strides, groups ratio, weight norm), for CPU demos and tests; returns it. Forward code and the
    key layout are unchanged."""
    from .commons import weight_norm

    def rebuild(conv: Any, c_in: int, c_out: int) -> Any:
        groups = conv.groups
        if groups > 1:  # keep Piper's 4 input channels per group where possible
            groups = max(1, c_in // (conv.in_channels // conv.groups))
            while c_in % groups or c_out % groups:
                groups -= 1
        new = type(conv)(c_in, c_out, conv.kernel_size, conv.stride, padding=conv.padding, groups=groups)
        return weight_norm(new)

    for disc in mpd.discriminators:
        prev = 1
        for i, conv in enumerate(disc.convs):
            c_out = max(1, conv.out_channels // divisor)
            disc.convs[i] = rebuild(conv, prev, c_out)
            prev = c_out
        disc.conv_post = rebuild(disc.conv_post, prev, 1)
    return mpd
