"""Text to speech (and voice conversion) from a checkpoint: ``python -m vits_fast.synthesize``.

Examples::

    python -m vits_fast.synthesize --checkpoint voice.ckpt --output hello.wav "Hello world."
    python -m vits_fast.synthesize --checkpoint voice.ckpt --text-file book.txt --output-dir wavs/ --batch-size 16
    echo "Hello." | python -m vits_fast.synthesize --checkpoint voice.ckpt --output-raw --stream \\
        | aplay -r 22050 -f S16_LE
    python -m vits_fast.synthesize --checkpoint multi.ckpt --convert in.wav --from-speaker alice --to-speaker bob \\
        --output out.wav

Text comes from the arguments, ``--text-file`` or stdin (UTF-8), one utterance per line (blank lines are
skipped); ``--phoneme-ids`` reads space- or comma-separated phoneme ids instead. An utterance longer than
``--max-phonemes`` ids is cut at sentence ends (else word breaks) and its pieces are synthesised in order into
the same output; a piece longer than ``--max-frames`` frames (e.g. from a huge ``--length-scale``) is an error.
The checkpoint is one of ours or Piper's ``.ckpt``; its ``config.json`` (phoneme map, speakers, sample rate,
inference scales) is found beside it or given with ``--config``. Output: WAV files (16-bit, soundfile) or raw
16-bit little-endian mono PCM on stdout; no output may replace an input.

Exit status: 0 on success, 1 for a problem with the inputs (the message names it), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
from pathlib import Path
from typing import BinaryIO, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .guards import OverwriteError, TextLineError, check_number, decode_line, number, refuse_overwrite
from .inference import (DEFAULT_MAX_FRAMES, DEFAULT_MAX_PHONEMES, Synthesizer, Voice, VoiceError, load_voice,
                        split_ids)

_LOGGER = logging.getLogger("vits_fast.synthesize")
_DESCRIPTION = __doc__.split("\n\n")[0].replace("``", "")
_IDS_SPLIT = re.compile(r"[\s,]+")


# --------------------------------------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------------------------------------

def read_utterances(args: argparse.Namespace, stdin: Iterable[Union[str, bytes]]) -> List[str]:
    """Non-blank lines of the text arguments, the text file, or stdin (in that order of preference).

    Lines must be UTF-8 text: undecodable bytes and control bytes (binary input) are a :class:`VoiceError`
    naming the line."""
    if args.text and args.text_file:
        raise VoiceError("give the text either as arguments or with --text-file, not both")
    if args.text:
        source = " ".join(args.text)
        if not source.strip():
            raise VoiceError("the text is empty")
        where, raw = "the text", source.split("\n")
    elif args.text_file:
        path = Path(args.text_file)
        try:
            where, raw = f"text file {path}", path.read_bytes().splitlines()
        except OSError as exc:
            raise VoiceError(f"cannot read text file {path}: {exc}") from None
    else:
        where, raw = "standard input", stdin
    try:
        lines = [decode_line(line, n, where) for n, line in enumerate(raw, 1)]
    except TextLineError as exc:
        raise VoiceError(str(exc)) from None
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

    # A voice trained on characters (phoneme_type "text", as vits_fast writes without piper-tts) keeps them even
    # where espeak-ng is installed: its ids mean letters.
    phonemizer = Phonemizer(voice=voice.espeak_voice, id_map=voice.phoneme_id_map,
                            force_characters=voice.config.get("phoneme_type") == "text")
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
    """Where audio goes: one WAV file, numbered WAV files in a folder, or raw PCM on a binary stream.

    An utterance is written piece by piece (:meth:`open`, :meth:`add` per piece, :meth:`close`), so a long text
    never has to be held whole; ``--normalize`` scales each piece, as Piper scales each sentence. No output path
    may name one of ``inputs`` (:func:`vits_fast.guards.refuse_overwrite`).
    """

    def __init__(self, args: argparse.Namespace, sample_rate: int, count: int, stdout: BinaryIO,
                 names: Optional[List[str]] = None, inputs: Sequence[Optional[Union[str, Path]]] = ()):
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
        refuse_overwrite(self.paths, inputs)
        self._file = None

    def open(self, index: int) -> None:
        if self.raw:
            return
        import soundfile as sf

        path = self.paths[index]
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = sf.SoundFile(str(path), "w", samplerate=self.sample_rate, channels=1, subtype="PCM_16",
                                  format="WAV")

    def add(self, audio: np.ndarray) -> None:
        pcm = to_int16(audio, self.normalize)
        if self._file is not None:
            self._file.write(pcm)
        else:
            self.stdout.write(pcm.tobytes())
            self.stdout.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def write(self, index: int, audio: np.ndarray) -> None:
        """One whole utterance."""
        self.open(index)
        try:
            self.add(audio)
        finally:
            self.close()


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
    syn.add_argument("--max-phonemes", type=number(int, low=1), default=DEFAULT_MAX_PHONEMES,
                     help=f"longest phoneme-id sequence synthesised at once; longer utterances are cut at sentence "
                          f"ends and spoken piece by piece (default {DEFAULT_MAX_PHONEMES})")
    syn.add_argument("--max-frames", type=number(int, low=1), default=DEFAULT_MAX_FRAMES,
                     help=f"longest audio of one piece, in frames (hop-size steps), checked before memory is "
                          f"allocated (default {DEFAULT_MAX_FRAMES}, about 2 min at 22.05 kHz)")
    syn.add_argument("--no-progress", action="store_true", help="no progress bar")
    syn.add_argument("--stream", action="store_true", help="stream each utterance in chunks (with --output-raw)")
    syn.add_argument("--chunk-frames", type=number(int, low=1), default=64,
                     help="frames per streamed chunk (default 64)")
    syn.add_argument("--first-chunk-frames", type=number(int, low=1), default=16,
                     help="frames of the first chunk (default 16)")
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
    for flag, value, strict in (("--noise-scale", args.noise_scale, False), ("--length-scale", args.length_scale, True),
                                ("--noise-w", args.noise_w, False)):
        if value is not None:
            check_number(flag, value, low=0, low_inclusive=not strict, error=VoiceError)
    if args.output and Path(args.output).suffix.lower() != ".wav":
        raise VoiceError(f"--output writes a WAV file: its name must end in .wav, got {args.output}")
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
    """The config's inference scales (else Piper's), overridden by the flags, checked."""
    return voice.inference_scales(noise_scale=args.noise_scale, length_scale=args.length_scale,
                                  noise_scale_w=args.noise_w)


def _inputs(args: argparse.Namespace, voice: Voice) -> List[Optional[Union[str, Path]]]:
    """Every file the command reads (no output may replace one)."""
    return [args.checkpoint, voice.config_path, args.text_file, *(args.convert or [])]


def _convert(args: argparse.Namespace, voice: Voice, synth: Synthesizer, stdout: BinaryIO) -> None:
    from .data import load_audio

    if voice.num_speakers <= 1:
        raise VoiceError(f"voice conversion needs a multi-speaker model; {voice.checkpoint} has a single speaker")
    src, tgt = voice.speaker_id(args.from_speaker), voice.speaker_id(args.to_speaker)
    inputs = [Path(p) for p in args.convert]
    sink = Sink(args, voice.sample_rate, len(inputs), stdout, names=[p.stem for p in inputs],
                inputs=_inputs(args, voice))
    audio_cfg = dataclasses.replace(voice.audio, sample_rate=voice.sample_rate)
    for i, path in enumerate(inputs):
        try:
            audio = load_audio(path, voice.sample_rate)  # mono, resampled with soxr when the rate differs
        except Exception as exc:  # soundfile raises its own error types for unreadable files
            raise VoiceError(f"cannot read audio file {path}: {exc}") from None
        sink.write(i, synth.convert(torch.from_numpy(audio), audio_cfg, src, tgt).numpy())


def _pieces(ids: Sequence[List[int]], voice: Voice, max_ids: int) -> List[Tuple[int, List[int]]]:
    """(utterance index, ids) for every piece of every utterance, in order (:func:`split_ids` at the voice's
    sentence ends ``$``, else its word breaks ``" "``)."""
    id_map = voice.phoneme_id_map
    ends, breaks = id_map.get("$", []), id_map.get(" ", [])
    return [(u, piece) for u, seq in enumerate(ids) for piece in split_ids(seq, max_ids, ends, breaks)]


def _synthesize(args: argparse.Namespace, voice: Voice, synth: Synthesizer, stdin: Iterable[Union[str, bytes]],
                stdout: BinaryIO) -> None:
    scales = _scales(args, voice)
    speaker = voice.speaker_id(args.speaker)
    utterances = read_utterances(args, stdin)
    sink = Sink(args, voice.sample_rate, len(utterances), stdout, inputs=_inputs(args, voice))
    ids = to_phoneme_ids(utterances, voice, phoneme_ids=args.phoneme_ids, skip_unknown=args.skip_unknown)
    pieces = _pieces(ids, voice, args.max_phonemes)
    if args.stream:
        for _, seq in pieces:
            for chunk in synth.stream(seq, speaker, chunk_frames=args.chunk_frames,
                                      first_chunk_frames=args.first_chunk_frames, **scales):
                sink.add(chunk.numpy())
        return
    bar = None
    if not args.no_progress and len(ids) > 1:
        from tqdm import tqdm

        bar = tqdm(total=len(ids), unit="utt", desc="synthesising", file=sys.stderr)
    # Groups of several batches: sorted by length inside; each utterance is written piece by piece as its
    # pieces come out, and closed after its last one.
    group = args.batch_size * 16
    try:
        for start in range(0, len(pieces), group):
            chunk = pieces[start: start + group]
            audios = synth.synthesize_batch([seq for _, seq in chunk], speaker, batch_size=args.batch_size,
                                            **scales)
            for offset, ((utt, _), audio) in enumerate(zip(chunk, audios)):
                index = start + offset
                if index == 0 or pieces[index - 1][0] != utt:
                    sink.open(utt)
                sink.add(audio.numpy())
                if index + 1 == len(pieces) or pieces[index + 1][0] != utt:
                    sink.close()
                    if bar is not None:
                        bar.update(1)
    finally:
        sink.close()
        if bar is not None:
            bar.close()


def main(argv: Optional[Sequence[str]] = None, *, stdin: Optional[Iterable[str]] = None,
         stdout: Optional[BinaryIO] = None) -> int:
    """Command line entry point; returns the exit status. ``stdin``/``stdout`` default to the process's."""
    from .checkpoint import CheckpointError

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s: %(message)s")
    stdin = sys.stdin.buffer if stdin is None else stdin  # bytes: decoded line by line, errors name the line
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
        synth = Synthesizer(voice.model, device=device, fast=args.fast, copy_model=False,
                            max_phonemes=args.max_phonemes, max_frames=args.max_frames)
        if args.seed is not None:  # after building the model, whose initialisation draws random numbers
            torch.manual_seed(args.seed)
        if args.convert:
            _convert(args, voice, synth, stdout)
        else:
            _synthesize(args, voice, synth, stdin, stdout)
    except (VoiceError, CheckpointError, OverwriteError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # writing the output
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
