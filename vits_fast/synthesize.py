"""Text to speech (and voice conversion) from a checkpoint: ``python -m vits_fast.synthesize``.

Examples::

    python -m vits_fast.synthesize --checkpoint voice.ckpt --output hello.wav "Hello world."
    python -m vits_fast.synthesize --checkpoint voice.ckpt --text-file book.txt --output-dir wavs/ --batch-size 16
    echo "Hello." | python -m vits_fast.synthesize --checkpoint voice.ckpt --output-raw --stream \\
        | aplay -r 22050 -f S16_LE
    python -m vits_fast.synthesize --checkpoint multi.ckpt --convert in.wav --from-speaker alice --to-speaker bob \\
        --output out.wav

Text comes from the arguments, ``--text-file`` or stdin, one utterance per line (blank lines are skipped);
``--phoneme-ids`` reads space- or comma-separated phoneme ids instead. The checkpoint is one of ours or Piper's
``.ckpt``; its ``config.json`` (phoneme map, speakers, sample rate, inference scales) is found beside it or given
with ``--config``. Output: WAV files (16-bit, soundfile) or raw 16-bit little-endian mono PCM on stdout.

Exit status: 0 on success, 1 for a problem with the inputs (the message names it), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
from pathlib import Path
from typing import BinaryIO, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

from .inference import Synthesizer, Voice, VoiceError, load_voice

_LOGGER = logging.getLogger("vits_fast.synthesize")
_DESCRIPTION = __doc__.split("\n\n")[0].replace("``", "")
_IDS_SPLIT = re.compile(r"[\s,]+")


# --------------------------------------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------------------------------------

def read_utterances(args: argparse.Namespace, stdin: Iterable[str]) -> List[str]:
    """Non-blank lines of the text arguments, the text file, or stdin (in that order of preference)."""
    if args.text and args.text_file:
        raise VoiceError("give the text either as arguments or with --text-file, not both")
    if args.text:
        source = " ".join(args.text)
        if not source.strip():
            raise VoiceError("the text is empty")
        lines = source.splitlines()
    elif args.text_file:
        path = Path(args.text_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise VoiceError(f"cannot read text file {path}: {exc}") from None
    else:
        lines = [line.rstrip("\n") for line in stdin]
    utterances = [line.strip() for line in lines if line.strip()]
    if not utterances:
        raise VoiceError("no text to synthesise: the input is empty")
    return utterances


def to_phoneme_ids(utterances: Sequence[str], voice: Voice, *, phoneme_ids: bool,
                   skip_unknown: bool) -> List[List[int]]:
    """Phonemise (or parse) every utterance and check it against the voice's vocabulary."""
    n_vocab = int(voice.model.n_vocab)
    out: List[List[int]] = []
    if phoneme_ids:
        for n, line in enumerate(utterances, 1):
            try:
                ids = [int(tok) for tok in _IDS_SPLIT.split(line.strip()) if tok]
            except ValueError:
                raise VoiceError(f"utterance {n} is not a list of phoneme ids: {line[:60]!r}") from None
            bad = [i for i in ids if not 0 <= i < n_vocab]
            if bad:
                raise VoiceError(f"utterance {n}: phoneme id {bad[0]} is outside the model's vocabulary "
                                 f"(ids 0..{n_vocab - 1})")
            out.append(ids)
        return out

    from .data import Phonemizer

    phonemizer = Phonemizer(voice=voice.espeak_voice, id_map=voice.phoneme_id_map)
    phonemizer.warn_if_fallback()
    id_to_symbol: Dict[int, str] = {}
    for symbol, ids in phonemizer.id_map.items():
        for i in ids:
            id_to_symbol.setdefault(int(i), symbol)
    for n, text in enumerate(utterances, 1):
        phonemes = phonemizer.phonemize(text)
        unknown, ids = phonemes.unknown, phonemes.ids
        if unknown and not skip_unknown:
            raise VoiceError(f"utterance {n}: symbol(s) {' '.join(repr(s) for s in unknown)} are not in the voice's "
                             f"phoneme_id_map ({phonemizer.kind} phonemes); remove them or pass --skip-unknown")
        if unknown:
            _LOGGER.warning("utterance %d: skipping symbol(s) missing from the phoneme map: %s", n, unknown)
        if phonemes.num_known == 0:
            raise VoiceError(f"utterance {n} has no phonemes to speak: {text[:60]!r}")
        bad = [i for i in ids if not 0 <= i < n_vocab]
        if bad:
            raise VoiceError(f"utterance {n}: symbol {id_to_symbol.get(bad[0], '?')!r} has phoneme id {bad[0]}, "
                             f"outside the model's vocabulary (ids 0..{n_vocab - 1}); the config.json does not "
                             f"belong to this checkpoint")
        out.append(ids)
    return out


# --------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------

def to_int16(audio: np.ndarray, normalize: bool) -> np.ndarray:
    """Float audio -> int16 PCM; ``normalize`` scales the peak to full scale (Piper's behaviour)."""
    audio = np.asarray(audio, dtype=np.float32)
    if normalize:
        audio = audio * (1.0 / max(0.01, float(np.abs(audio).max(initial=0.0))))
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")


class Sink:
    """Where audio goes: one WAV file, numbered WAV files in a folder, or raw PCM on a binary stream."""

    def __init__(self, args: argparse.Namespace, sample_rate: int, count: int, stdout: BinaryIO,
                 names: Optional[List[str]] = None, inputs: Sequence[Path] = ()):
        if args.output and count != 1:
            raise VoiceError(f"--output writes one file but there are {count} utterances; use --output-dir")
        self.sample_rate = sample_rate
        self.normalize = args.normalize
        self.stdout = stdout
        self.raw = bool(args.output_raw)
        self.paths: List[Path] = []
        if args.output:
            self.paths = [Path(args.output)]
        elif args.output_dir:
            folder = Path(args.output_dir)
            self.paths = [folder / f"{name}.wav" for name in (names or [f"{i:04d}" for i in range(count)])]
        resolved_inputs = {p.resolve() for p in inputs}
        for path in self.paths:
            if path.resolve() in resolved_inputs:
                raise VoiceError(f"refusing to overwrite the input file {path}; choose another output")

    def write(self, index: int, audio: np.ndarray) -> None:
        if self.raw:
            self.write_chunk(audio)
            return
        import soundfile as sf

        path = self.paths[index]
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), to_int16(audio, self.normalize), self.sample_rate, subtype="PCM_16")

    def write_chunk(self, audio: np.ndarray) -> None:
        self.stdout.write(to_int16(audio, self.normalize).tobytes())
        self.stdout.flush()


# --------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vits_fast.synthesize", description=_DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("text", nargs="*", help="text to speak (default: --text-file or stdin)")
    p.add_argument("--checkpoint", "-m", required=True, help="our or Piper's checkpoint (.ckpt)")
    p.add_argument("--config", "-c", help="the voice's config.json (default: found beside the checkpoint)")
    p.add_argument("--text-file", "-f", help="read utterances from this file, one per line")
    p.add_argument("--phoneme-ids", action="store_true", help="input lines are phoneme ids, not text")
    p.add_argument("--skip-unknown", action="store_true",
                   help="skip symbols missing from the phoneme map (with a warning) instead of failing")
    out = p.add_argument_group("output (choose one)")
    out.add_argument("--output", "-o", help="WAV file for a single utterance")
    out.add_argument("--output-dir", "-d", help="folder for numbered WAV files (0000.wav, ...)")
    out.add_argument("--output-raw", action="store_true", help="raw 16-bit mono PCM on stdout")
    out.add_argument("--normalize", action="store_true", help="scale each utterance's peak to full scale (Piper)")
    syn = p.add_argument_group("synthesis")
    syn.add_argument("--speaker", "-s", help="speaker name (config speaker_id_map) or number (default 0)")
    syn.add_argument("--noise-scale", type=float, help="default: the config's inference.noise_scale, else 0.667")
    syn.add_argument("--length-scale", type=float, help="default: the config's inference.length_scale, else 1.0")
    syn.add_argument("--noise-w", type=float, help="default: the config's inference.noise_w, else 0.8")
    syn.add_argument("--batch-size", type=int, default=8, help="utterances per batch (default 8)")
    syn.add_argument("--no-progress", action="store_true", help="no progress bar")
    syn.add_argument("--stream", action="store_true", help="stream each utterance in chunks (with --output-raw)")
    syn.add_argument("--chunk-frames", type=int, default=64, help="frames per streamed chunk (default 64)")
    syn.add_argument("--first-chunk-frames", type=int, default=16, help="frames of the first chunk (default 16)")
    syn.add_argument("--fast", action="store_true", help="CUDA graphs + torch.compile decoder (CUDA only)")
    syn.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    syn.add_argument("--seed", type=int, help="random seed (default: not seeded)")
    vc = p.add_argument_group("voice conversion (multi-speaker models)")
    vc.add_argument("--convert", nargs="+", metavar="WAV", help="convert these recordings instead of synthesising")
    vc.add_argument("--from-speaker", help="speaker of the recordings (name or number)")
    vc.add_argument("--to-speaker", help="speaker to convert to (name or number)")
    p.add_argument("--debug", action="store_true", help="log debug messages")
    return p


def _check_args(args: argparse.Namespace) -> None:
    """Problems visible from the arguments alone, reported before the checkpoint is loaded."""
    if len([o for o in ("output", "output_dir", "output_raw") if getattr(args, o)]) != 1:
        raise VoiceError("choose exactly one of --output FILE, --output-dir DIR and --output-raw")
    if args.batch_size < 1:
        raise VoiceError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.length_scale is not None and args.length_scale <= 0:
        raise VoiceError(f"--length-scale must be positive, got {args.length_scale}")
    if (args.noise_scale is not None and args.noise_scale < 0) or (args.noise_w is not None and args.noise_w < 0):
        raise VoiceError("--noise-scale and --noise-w must not be negative")
    if args.convert:
        if args.text or args.text_file:
            raise VoiceError("--convert converts recordings; it takes no text")
        if args.from_speaker is None or args.to_speaker is None:
            raise VoiceError("--convert needs --from-speaker and --to-speaker")
        for path in args.convert:
            if not Path(path).is_file():
                raise VoiceError(f"audio file {path} does not exist")
        return
    if args.from_speaker is not None or args.to_speaker is not None:
        raise VoiceError("--from-speaker/--to-speaker are for --convert")
    if args.stream and not args.output_raw:
        raise VoiceError("--stream writes audio as it is made: use it with --output-raw")
    if args.text_file and not Path(args.text_file).is_file():
        raise VoiceError(f"text file {args.text_file} does not exist")


def _scales(args: argparse.Namespace, voice: Voice) -> Dict[str, float]:
    """The config's inference scales (else Piper's), overridden by the flags."""
    scales = voice.inference_scales()
    for arg, key in (("noise_scale", "noise_scale"), ("length_scale", "length_scale"), ("noise_w", "noise_scale_w")):
        value = getattr(args, arg)
        if value is not None:
            scales[key] = float(value)
    if scales["length_scale"] <= 0 or scales["noise_scale"] < 0 or scales["noise_scale_w"] < 0:
        raise VoiceError(f"the voice config's inference scales are invalid: {scales}")
    return scales


def _convert(args: argparse.Namespace, voice: Voice, synth: Synthesizer, stdout: BinaryIO) -> None:
    from .data import load_audio

    if voice.num_speakers <= 1:
        raise VoiceError(f"voice conversion needs a multi-speaker model; {voice.checkpoint} has a single speaker")
    src, tgt = voice.speaker_id(args.from_speaker), voice.speaker_id(args.to_speaker)
    inputs = [Path(p) for p in args.convert]
    sink = Sink(args, voice.sample_rate, len(inputs), stdout, names=[p.stem for p in inputs], inputs=inputs)
    audio_cfg = dataclasses.replace(voice.audio, sample_rate=voice.sample_rate)
    for i, path in enumerate(inputs):
        try:
            audio = load_audio(path, voice.sample_rate)  # mono, resampled with soxr when the rate differs
        except Exception as exc:  # soundfile raises its own error types for unreadable files
            raise VoiceError(f"cannot read audio file {path}: {exc}") from None
        sink.write(i, synth.convert(torch.from_numpy(audio), audio_cfg, src, tgt).numpy())


def _synthesize(args: argparse.Namespace, voice: Voice, synth: Synthesizer, stdin: Iterable[str],
                stdout: BinaryIO) -> None:
    scales = _scales(args, voice)
    speaker = voice.speaker_id(args.speaker)
    utterances = read_utterances(args, stdin)
    sink = Sink(args, voice.sample_rate, len(utterances), stdout)
    ids = to_phoneme_ids(utterances, voice, phoneme_ids=args.phoneme_ids, skip_unknown=args.skip_unknown)
    if args.stream:
        for seq in ids:
            for chunk in synth.stream(seq, speaker, chunk_frames=args.chunk_frames,
                                      first_chunk_frames=args.first_chunk_frames, **scales):
                sink.write_chunk(chunk.numpy())
        return
    bar = None
    if not args.no_progress and len(ids) > 1:
        from tqdm import tqdm

        bar = tqdm(total=len(ids), unit="utt", desc="synthesising", file=sys.stderr)
    # Groups of several batches: sorted by length inside, written before the next group starts.
    group = args.batch_size * 16
    try:
        for start in range(0, len(ids), group):
            chunk_ids = ids[start: start + group]
            audios = synth.synthesize_batch(chunk_ids, speaker, batch_size=args.batch_size, **scales)
            for offset, audio in enumerate(audios):
                sink.write(start + offset, audio.numpy())
            if bar is not None:
                bar.update(len(chunk_ids))
    finally:
        if bar is not None:
            bar.close()


def main(argv: Optional[Sequence[str]] = None, *, stdin: Optional[Iterable[str]] = None,
         stdout: Optional[BinaryIO] = None) -> int:
    """Command line entry point; returns the exit status. ``stdin``/``stdout`` default to the process's."""
    from .checkpoint import CheckpointError

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s: %(message)s")
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout.buffer if stdout is None else stdout
    try:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(device)
        except RuntimeError:
            raise VoiceError(f"unknown device {args.device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise VoiceError("--device cuda was given but CUDA is not available here")
        _check_args(args)
        voice = load_voice(args.checkpoint, args.config)
        synth = Synthesizer(voice.model, device=device, fast=args.fast, copy_model=False)
        if args.seed is not None:  # after building the model, whose initialisation draws random numbers
            torch.manual_seed(args.seed)
        if args.convert:
            _convert(args, voice, synth, stdout)
        else:
            _synthesize(args, voice, synth, stdin, stdout)
    except (VoiceError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # writing the output
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
