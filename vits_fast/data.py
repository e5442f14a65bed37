"""Training data: dataset readers, phonemisation, the spectrogram cache, batching and a length-bucketed sampler.

Accepted inputs (:func:`read_dataset`):

* an LJSpeech-style folder: ``metadata.csv`` (``|``-separated, no header) with ``id|text``, ``id|speaker|text``,
  or pre-phonemised ``id|text|phoneme ids`` / ``id|speaker|text|phoneme ids`` (ids space-separated, Piper's
  ``--dataset-type phoneme_ids``); audio in ``wavs/`` (or ``wav/``, or beside the csv) as ``<id>``, ``<id>.wav``
  or ``<id>.flac``. An optional ``config.json`` beside it (Piper's voice config) gives the phoneme-id map,
  speaker map and sample rate.
* Piper's preprocessed folder: ``config.json`` + ``dataset.jsonl`` (``phoneme_ids``, ``audio_norm_path``,
  ``audio_spec_path``, ``speaker_id``, ``text``, ``audio_path`` per line); its cached tensors are used as they are.

Bad items are never dropped silently: every one is reported with its id, file and reason, and
``on_bad_item="fail"`` turns them into a :class:`DataError`. Items longer than ``max_phoneme_ids`` are a filter,
not an error: they are counted and named in the log.

Audio is read with soundfile, mixed to mono, resampled with soxr when its rate differs, and cached once (in
parallel worker processes, with a progress bar) as float32 ``.npy`` files: ``<key>.audio.npy`` ``[T]`` and
``<key>.spec.npy`` ``[n_fft // 2 + 1, frames]`` (Piper's linear spectrogram); the key hashes the file path, size,
mtime and the STFT settings, so later runs reuse it and an edited file is re-cached.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .config import AudioConfig
from .guards import TextLineError, decode_line
from .voice_config import (VoiceError, config_phoneme_id_map, config_speaker_id_map,
                           default_phoneme_id_map, load_voice_config)

_LOGGER = logging.getLogger("vits_fast.data")

PathLike = Union[str, os.PathLike]
CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
_IDS_RE = re.compile(r"^\s*\d+(\s+\d+)*\s*$")
_AUDIO_EXTS = ("", ".wav", ".flac", ".ogg", ".mp3")


class DataError(RuntimeError):
    """Bad training data with ``on_bad_item="fail"``, or no usable item at all."""


@dataclass
class Item:
    """One utterance. ``phoneme_ids`` may be None until phonemised; cache paths are set by preparation."""

    id: str
    text: str
    phoneme_ids: Optional[List[int]]
    speaker_id: Optional[int] = None
    audio_path: Optional[Path] = None
    audio_cache: Optional[Path] = None
    spec_cache: Optional[Path] = None
    num_frames: int = 0


@dataclass
class BadItem:
    id: str
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.id} ({self.path}): {self.reason}"


@dataclass
class DatasetInfo:
    """What a dataset says about itself (from ``config.json`` where present)."""

    root: Path
    kind: str
    num_speakers: int = 1
    speaker_id_map: Dict[str, int] = field(default_factory=dict)
    sample_rate: Optional[int] = None
    num_symbols: Optional[int] = None
    phoneme_id_map: Optional[Dict[str, List[int]]] = None
    espeak_voice: str = "en-us"
    config: Dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------
# Phonemisation
# --------------------------------------------------------------------------------------------------------

def piper_phonemizer_available() -> bool:
    try:
        import piper.phonemize_espeak  # noqa: F401
        import piper.phoneme_ids  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Phonemes:
    """What :meth:`Phonemizer.phonemize` made of a text: ``ids`` (phoneme ids, sentence framing ``^ _ ... $``
    included), ``num_known`` (symbols of the text the map has; each gave ids) and ``unknown`` (the distinct
    symbols missing from the map, which were skipped; sorted)."""

    ids: List[int]
    num_known: int
    unknown: List[str]


class Phonemizer:
    """Text -> Piper phoneme ids (``^ _ p1 _ p2 _ ... $`` per sentence, sentences concatenated).

    With piper-tts installed (``pip install vits_fast[phonemize]``) this is Piper's espeak-ng phonemiser and
    its id map. Without it, a character-level fallback maps the lower-cased, NFD-normalised characters of the
    text through the same map (letters, digits and punctuation have ids there): it trains, but the voice is not
    compatible with Piper's phonemiser. Which one is in use is in :attr:`kind` ("espeak" or "characters").
    """

    _warned = False

    def __init__(self, voice: str = "en-us", id_map: Optional[Dict[str, List[int]]] = None,
                 force_characters: bool = False) -> None:
        self.voice = voice
        self.id_map = id_map or default_phoneme_id_map()
        self.kind = "characters" if force_characters or not piper_phonemizer_available() else "espeak"
        self.forced = force_characters  # a character voice: characters are what it was trained on, no fallback
        self._espeak = None

    def warn_if_fallback(self) -> None:
        if self.kind == "characters" and not self.forced and not Phonemizer._warned:
            Phonemizer._warned = True
            _LOGGER.warning("piper-tts is not installed: phonemising with a CHARACTER-LEVEL fallback (letters "
                            "as symbols), not espeak-ng phonemes. The voice will not match Piper's phonemiser; "
                            "install it with `pip install piper-tts`.")

    def _sentences(self, text: str) -> List[List[str]]:
        if self.kind == "espeak":
            if self._espeak is None:
                from piper.phonemize_espeak import EspeakPhonemizer

                self._espeak = EspeakPhonemizer()
            return self._espeak.phonemize(self.voice, text)
        return [list(unicodedata.normalize("NFD", text.lower()))]

    def phonemize(self, text: str) -> Phonemes:
        """Phoneme ids of ``text`` with what was left out: symbols missing from the map are skipped and
        listed in :attr:`Phonemes.unknown`."""
        bos, pad, eos = self.id_map["^"], self.id_map["_"], self.id_map["$"]
        ids: List[int] = []
        known = 0
        unknown: set = set()
        for sentence in self._sentences(text):
            ids.extend(bos)
            ids.extend(pad)
            for symbol in sentence:
                mapped = self.id_map.get(symbol)
                if mapped is None:
                    unknown.add(symbol)
                    continue
                known += 1
                ids.extend(mapped)
                ids.extend(pad)
            ids.extend(eos)
        return Phonemes(ids=ids, num_known=known, unknown=sorted(unknown))

    def __call__(self, text: str) -> List[int]:
        """Phoneme ids of ``text`` (symbols missing from the map are skipped)."""
        return self.phonemize(text).ids


# --------------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------------

def _read_config(folder: Path) -> Dict[str, Any]:
    """The dataset's ``config.json`` ({} without one); an unreadable one is a :class:`DataError`."""
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        return load_voice_config(path, what="dataset config")
    except VoiceError as exc:
        raise DataError(str(exc)) from None


def _read_lines(path: Path, csv_ids: bool = False) -> Tuple[List[Tuple[int, str]], List[BadItem]]:
    """(line number, text) of the non-blank lines of a UTF-8 file, and a bad item for each line that is not
    UTF-8 text, named by its line number (or with ``csv_ids`` its first ``|`` field, the utterance id)."""
    lines: List[Tuple[int, str]] = []
    bad: List[BadItem] = []
    for n, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            text = decode_line(raw, n, str(path))
        except TextLineError as exc:
            name = raw.split(b"|", 1)[0].decode("utf-8", "replace").strip() if csv_ids else ""
            bad.append(BadItem(name if 0 < len(name) <= 100 else f"line {n}", str(path), str(exc)))
            continue
        text = text.lstrip("\ufeff") if n == 1 else text  # a byte-order mark is not part of the first id
        if text.strip():
            lines.append((n, text))
    return lines, bad


def _info_from_config(root: Path, kind: str, config: Dict[str, Any]) -> DatasetInfo:
    info = DatasetInfo(root=root, kind=kind, config=config)
    if config:
        try:
            info.sample_rate = config.get("audio", {}).get("sample_rate")
            info.num_symbols = config.get("num_symbols")
            if info.num_symbols is not None and not _is_int(info.num_symbols):
                raise ValueError(f"num_symbols {info.num_symbols!r} is not an integer")
            info.phoneme_id_map = config_phoneme_id_map(config)
            info.speaker_id_map = config_speaker_id_map(config)
            info.num_speakers = int(config.get("num_speakers") or max(1, len(info.speaker_id_map)))
            info.espeak_voice = config.get("espeak", {}).get("voice", info.espeak_voice)
        except (AttributeError, TypeError, ValueError) as exc:
            raise DataError(f"the dataset config {root / 'config.json'} has a field of the wrong type "
                            f"({type(exc).__name__}: {exc})") from None
    return info


def _find_audio(csv_dir: Path, utt_id: str) -> Optional[Path]:
    for folder in (csv_dir / "wavs", csv_dir / "wav", csv_dir):
        for ext in _AUDIO_EXTS:
            candidate = folder / f"{utt_id}{ext}"
            if candidate.is_file():
                return candidate
    return None


def read_ljspeech(folder: Path, single_speaker: bool = False) -> Tuple[List[Item], List[BadItem], DatasetInfo]:
    """Read ``metadata.csv`` (see the module docstring). Phoneme ids stay None unless the csv has them.

    The format is decided for the whole file, never per line: trailing phoneme ids when every line ends in
    them, and ``id|text`` or ``id|speaker|text`` by the column count most lines have (a tie takes fewer
    columns). A line with more columns has a ``|`` inside its text, which is kept there; a line with fewer is a
    bad item, as is a line that is not UTF-8 text.
    """
    metadata = folder / "metadata.csv"
    info = _info_from_config(folder, "ljspeech", _read_config(folder))
    lines, bad = _read_lines(metadata, csv_ids=True)
    rows = [(n, line.split("|")) for n, line in lines]
    has_ids = bool(rows) and all(len(r) >= 3 for _, r in rows) and all(_IDS_RE.match(r[-1]) for _, r in rows)
    counts = collections.Counter(len(r) - has_ids for _, r in rows)
    n_cols = max(counts, key=lambda c: (counts[c], -c)) if counts else 2
    layout = ("id|text" if n_cols < 3 else "id|speaker|text") + ("|phoneme ids" if has_ids else "")
    items: List[Item] = []
    speakers: List[Optional[str]] = []
    with_pipes: List[int] = []
    for line_no, row in rows:
        utt_id = row[0].strip()
        n_text_cols = len(row) - (1 if has_ids else 0)
        if n_text_cols < max(2, n_cols):
            bad.append(BadItem(utt_id or f"line {line_no}", str(metadata),
                               f"line {line_no}: too few columns ({len(row)}) for this file's format {layout}"))
            continue
        if n_text_cols > n_cols:
            with_pipes.append(line_no)
        speaker = row[1].strip() if (n_cols >= 3 and not single_speaker) else None
        text = "|".join(row[n_cols - 1: n_text_cols])
        ids = [int(t) for t in row[-1].split()] if has_ids else None
        audio = _find_audio(folder, utt_id)
        if audio is None:
            bad.append(BadItem(utt_id, str(folder / "wavs" / f"{utt_id}.wav"), "audio file not found"))
            continue
        if not text.strip() and not ids:
            bad.append(BadItem(utt_id, str(audio), "empty transcript"))
            continue
        items.append(Item(id=utt_id, text=text, phoneme_ids=ids, audio_path=audio))
        speakers.append(speaker)
    if with_pipes:
        _LOGGER.warning("%s: %d line(s) have a '|' inside the text (format %s), kept as part of the text: line(s) "
                        "%s", metadata, len(with_pipes), layout, ", ".join(map(str, with_pipes[:10])))
    names = sorted({s for s in speakers if s is not None})
    if names:
        if not set(names) <= set(info.speaker_id_map):
            # Piper assigns ids by utterance count, most first (ties by first appearance).
            counts: Dict[str, int] = {}
            for s in speakers:
                if s is not None:
                    counts[s] = counts.get(s, 0) + 1
            order = sorted(counts, key=lambda s: -counts[s])
            info.speaker_id_map = {s: i for i, s in enumerate(order)}
        for item, speaker in zip(items, speakers):
            item.speaker_id = info.speaker_id_map[speaker] if speaker is not None else 0
        info.num_speakers = max(len(info.speaker_id_map), max(info.speaker_id_map.values()) + 1)
    else:
        info.num_speakers = 1
        info.speaker_id_map = {}
    return items, bad, info


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _record_problem(rec: Any, num_speakers: int) -> Optional[str]:
    """What is wrong with one ``dataset.jsonl`` record (field types, speaker id range), or None."""
    if not isinstance(rec, dict):
        return f"a JSON {type(rec).__name__}, not an object"
    ids = rec.get("phoneme_ids")
    if not isinstance(ids, list) or not all(_is_int(i) for i in ids):
        return f"phoneme_ids must be a list of integers, got {str(ids)[:60]}"
    for key in ("text", "audio_path", "audio_norm_path", "audio_spec_path"):
        if rec.get(key) is not None and not isinstance(rec[key], str):
            return f"{key} must be a string, got {rec[key]!r}"
    speaker = rec.get("speaker_id")
    if speaker is not None:
        if not _is_int(speaker):
            return f"speaker_id must be an integer, got {speaker!r}"
        if not 0 <= speaker < max(1, num_speakers):
            return (f"speaker_id {speaker} is outside the dataset's speakers 0..{max(1, num_speakers) - 1} "
                    f"(config.json num_speakers)")
    return None


def read_piper_dataset(folder: Path, jsonl: Optional[Path] = None) -> Tuple[List[Item], List[BadItem], DatasetInfo]:
    """Read Piper's preprocessed ``dataset.jsonl`` (+ ``config.json``)."""
    jsonl = jsonl or folder / "dataset.jsonl"
    info = _info_from_config(folder, "piper", _read_config(folder))
    items: List[Item] = []

    def resolve(p: Optional[str]) -> Optional[Path]:
        if not p:
            return None
        path = Path(p)
        return path if path.is_absolute() else folder / path

    lines, bad = _read_lines(jsonl)
    for line_no, line in lines:
        rec: Any = None
        try:
            rec = json.loads(line)
            problem = _record_problem(rec, info.num_speakers)
        except ValueError as exc:
            problem = f"not JSON ({exc})"
        if problem:
            named = isinstance(rec, dict) and isinstance(rec.get("audio_path"), str) and rec["audio_path"]
            bad.append(BadItem(Path(rec["audio_path"]).stem if named else f"line {line_no}", str(jsonl),
                               f"line {line_no}: {problem}"))
            continue
        audio_path = resolve(rec.get("audio_path"))
        utt_id = Path(rec.get("audio_path") or rec.get("audio_norm_path") or f"line{line_no}").stem
        item = Item(id=utt_id, text=rec.get("text") or "", phoneme_ids=list(rec["phoneme_ids"]),
                    audio_path=audio_path, speaker_id=rec.get("speaker_id"))
        item.audio_cache = resolve(rec.get("audio_norm_path"))
        item.spec_cache = resolve(rec.get("audio_spec_path"))
        items.append(item)
    if info.num_speakers > 1:
        for item in items:
            if item.speaker_id is None:
                item.speaker_id = 0
    return items, bad, info


def read_dataset(path: PathLike, single_speaker: bool = False) -> Tuple[List[Item], List[BadItem], DatasetInfo]:
    """Dispatch on what ``path`` holds: Piper's ``dataset.jsonl`` or an LJSpeech ``metadata.csv``."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".jsonl":
            return read_piper_dataset(path.parent, path)
        if path.name.endswith(".csv"):
            return read_ljspeech(path.parent, single_speaker)
        raise DataError(f"{path}: expected a dataset folder, a dataset.jsonl or a metadata.csv")
    if (path / "dataset.jsonl").is_file():
        return read_piper_dataset(path)
    if (path / "metadata.csv").is_file():
        return read_ljspeech(path, single_speaker)
    raise DataError(f"{path}: no dataset.jsonl (Piper preprocessed) or metadata.csv (LJSpeech) found")


# --------------------------------------------------------------------------------------------------------
# Audio and the cache
# --------------------------------------------------------------------------------------------------------

def load_audio(path: PathLike, sample_rate: int) -> np.ndarray:
    """Mono float32 audio ``[T]`` in [-1, 1] at ``sample_rate`` (soundfile; soxr "HQ" resampling)."""
    import soundfile as sf

    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if rate != sample_rate:
        import soxr

        audio = soxr.resample(audio, rate, sample_rate, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(audio, dtype=np.float32)


def cache_key(audio_path: Path, audio: AudioConfig) -> str:
    st = audio_path.stat()
    text = (f"{audio_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{audio.sample_rate}|{audio.filter_length}|"
            f"{audio.hop_length}|{audio.win_length}|v1")
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def _load_tensor_file(path: Path) -> torch.Tensor:
    """A cached ``.npy`` or Piper ``.pt`` tensor (``allow_pickle=False`` / the bounded restricted checkpoint
    reader: never runs code, never allocates beyond what the file holds)."""
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False))
    from .checkpoint import load_checkpoint

    tensor = load_checkpoint(path)
    if not isinstance(tensor, torch.Tensor):
        raise DataError(f"{path} holds a {type(tensor).__name__}, not a tensor")
    return tensor


@dataclass
class _PrepResult:
    index: int
    ok: bool
    reason: str = ""
    path: str = ""
    audio_cache: Optional[str] = None
    spec_cache: Optional[str] = None
    num_frames: int = 0
    num_samples: int = 0
    too_long: bool = False  # longer than the run's audio limit: filtered (logged), not bad


def _array(path: Path) -> np.ndarray:
    """A cached tensor as an array: ``.npy`` memory-mapped (read only where used), Piper's ``.pt`` loaded."""
    if path.suffix == ".npy":
        return np.load(path, mmap_mode="r", allow_pickle=False)
    return _load_tensor_file(path).float().numpy()


def _cached_result(index: int, spec_file: Path, audio_file: Path, audio: AudioConfig,
                   check_values: bool) -> _PrepResult:
    """Check an existing cached pair: the spectrogram's shape and, with ``check_values`` (Piper's tensors, which
    this package did not write), that both hold only finite values (read in full once, before training). Our
    own cache is written from audio already checked to be finite, so only its shape is read."""
    spec, wav = _array(spec_file), _array(audio_file)
    where = str(spec_file)
    if spec.ndim != 2 or spec.shape[0] != audio.spec_channels:
        return _PrepResult(index, False, f"cached spectrogram has shape {tuple(spec.shape)}, expected "
                                         f"[{audio.spec_channels}, frames] (filter_length {audio.filter_length})",
                           where)
    for name, values, path in (("spectrogram", spec, spec_file), ("audio", wav, audio_file)):
        if check_values and not np.isfinite(values).all():
            return _PrepResult(index, False, f"cached {name} {path} contains NaN or infinite values", where)
    return _PrepResult(index, True, path=where, audio_cache=str(audio_file), spec_cache=str(spec_file),
                       num_frames=int(spec.shape[-1]), num_samples=int(wav.shape[-1]))


def _prepare_one(index: int, item: Item, audio: AudioConfig, cache_dir: Path,
                 max_seconds: Optional[float] = None) -> _PrepResult:
    """Make sure ``item`` has a cached audio + spectrogram pair and measure it; never raises. Audio longer than
    ``max_seconds`` (from the file's header) is not read."""
    from .mel_processing import spectrogram_torch

    where = str(item.audio_path or item.spec_cache or "")
    try:
        # Piper-preprocessed items: use its cached tensors when both exist.
        if item.spec_cache is not None and item.audio_cache is not None and item.spec_cache.is_file() \
                and item.audio_cache.is_file():
            return _cached_result(index, item.spec_cache, item.audio_cache, audio, check_values=True)
        if item.audio_path is None or not item.audio_path.is_file():
            missing = item.audio_path or item.spec_cache
            return _PrepResult(index, False, "audio file not found", str(missing))
        key = cache_key(item.audio_path, audio)
        audio_file = cache_dir / key[:2] / f"{key}.audio.npy"
        spec_file = cache_dir / key[:2] / f"{key}.spec.npy"
        if audio_file.is_file() and spec_file.is_file():
            return _cached_result(index, spec_file, audio_file, audio, check_values=False)
        if max_seconds is not None:
            import soundfile as sf

            info = sf.info(str(item.audio_path))
            if info.frames > max_seconds * info.samplerate:
                return _PrepResult(index, False, _too_long(info.frames / info.samplerate, max_seconds), where,
                                   too_long=True)
        wav = load_audio(item.audio_path, audio.sample_rate)
        if wav.size == 0:
            return _PrepResult(index, False, "audio file has no samples", where)
        if wav.size <= audio.filter_length:
            return _PrepResult(index, False, f"audio too short ({wav.size} samples at {audio.sample_rate} Hz; "
                                             f"needs more than {audio.filter_length})", where)
        if not np.isfinite(wav).all():
            return _PrepResult(index, False, "audio contains NaN or infinite samples", where)
        peak = float(np.abs(wav).max())
        if peak > 1.0:
            wav = wav / peak
        spec = spectrogram_torch(torch.from_numpy(wav), audio.filter_length, audio.sample_rate,
                                 audio.hop_length, audio.win_length).numpy()
        audio_file.parent.mkdir(parents=True, exist_ok=True)
        _save_npy(audio_file, wav)
        _save_npy(spec_file, spec)
        return _PrepResult(index, True, path=where, audio_cache=str(audio_file), spec_cache=str(spec_file),
                           num_frames=int(spec.shape[-1]), num_samples=int(wav.size))
    except Exception as exc:  # unreadable/corrupt file: reported by name by the caller
        return _PrepResult(index, False, f"cannot read audio ({type(exc).__name__}: {str(exc).strip()[:200]})",
                           where)


def _too_long(seconds: float, limit: float) -> str:
    return f"{seconds:.1f} s of audio > --max-audio-seconds {limit:g}"


class _PrepTasks(torch.utils.data.Dataset):
    def __init__(self, items: Sequence[Item], audio: AudioConfig, cache_dir: Path,
                 max_seconds: Optional[float]) -> None:
        self.items, self.audio, self.cache_dir, self.max_seconds = items, audio, cache_dir, max_seconds

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> _PrepResult:
        return _prepare_one(index, self.items[index], self.audio, self.cache_dir, self.max_seconds)


def _identity(x: Any) -> Any:
    return x


def prepare_items(items: List[Item], audio: AudioConfig, cache_dir: PathLike, *, phonemizer: Optional[Phonemizer],
                  num_symbols: int, max_phoneme_ids: Optional[int] = None, max_audio_seconds: Optional[float] = None,
                  num_workers: int = 0, progress: bool = True,
                  timeout: float = 600.0) -> Tuple[List[Item], List[BadItem], List[BadItem]]:
    """Phonemise, validate and cache every item.

    Returns (usable items with cache paths and frame counts, bad items, filtered items: more than
    ``max_phoneme_ids`` ids or ``max_audio_seconds`` of audio, the latter read from the file's header, so that a
    long file is never loaded). Phonemes are cached
    in ``cache_dir/phonemes-<kind>-<voice>.json``. Audio work runs in ``num_workers`` processes (0: here)
    with a tqdm bar; a worker that dies or stalls past ``timeout`` seconds raises instead of hanging.
    """
    from tqdm.auto import tqdm

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    bad: List[BadItem] = []
    filtered: List[BadItem] = []

    # 1. Phoneme ids (cached by text).
    need = [it for it in items if it.phoneme_ids is None]
    if need:
        if phonemizer is None:
            raise DataError("these items have no phoneme ids and no phonemiser was given: "
                            + ", ".join(it.id for it in need[:10]))
        phonemizer.warn_if_fallback()
        ph_cache_path = cache_dir / f"phonemes-{phonemizer.kind}-{phonemizer.voice}.json"
        ph_cache: Dict[str, List[int]] = {}
        if ph_cache_path.is_file():
            try:
                ph_cache = json.loads(ph_cache_path.read_text(encoding="utf-8"))
            except ValueError:
                ph_cache = {}
        fresh = 0
        for it in tqdm(need, desc="phonemising", disable=not progress or len(need) < 50):
            ids = ph_cache.get(it.text)
            if ids is None:
                ids = phonemizer(it.text)
                ph_cache[it.text] = ids
                fresh += 1
            it.phoneme_ids = list(ids)
        if fresh:
            tmp = ph_cache_path.with_name(ph_cache_path.name + f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(ph_cache, ensure_ascii=False), encoding="utf-8")
            os.replace(tmp, ph_cache_path)

    # 2. Id checks and the length filter (before any audio work).
    candidates: List[Item] = []
    for it in items:
        where = str(it.audio_path or it.spec_cache or "")
        ids = it.phoneme_ids or []
        if len(ids) == 0 or all(i in (0, 1, 2) for i in ids):
            bad.append(BadItem(it.id, where, "empty transcript (no phonemes)"))
        elif min(ids) < 0 or max(ids) >= num_symbols:
            wrong = [i for i in ids if not 0 <= i < num_symbols]
            bad.append(BadItem(it.id, where, f"phoneme id {wrong[0]} outside the vocabulary of {num_symbols} "
                                             f"({len(wrong)} such id(s))"))
        elif max_phoneme_ids is not None and len(ids) > max_phoneme_ids:
            filtered.append(BadItem(it.id, where, f"{len(ids)} phoneme ids > --max-phoneme-ids {max_phoneme_ids}"))
        else:
            candidates.append(it)

    # 3. Audio cache, in parallel.
    tasks = _PrepTasks(candidates, audio, cache_dir, max_audio_seconds)
    loader = torch.utils.data.DataLoader(tasks, batch_size=None, shuffle=False, num_workers=num_workers,
                                         collate_fn=_identity, timeout=timeout if num_workers > 0 else 0)
    results: List[_PrepResult] = []
    for res in tqdm(loader, total=len(tasks), desc="caching spectrograms", disable=not progress):
        results.append(res)
    ok: List[Item] = []
    for res in sorted(results, key=lambda r: r.index):
        it = candidates[res.index]
        if not res.ok:
            (filtered if res.too_long else bad).append(BadItem(it.id, res.path, res.reason))
            continue
        if max_audio_seconds is not None and res.num_samples > max_audio_seconds * audio.sample_rate:  # cached
            filtered.append(BadItem(it.id, res.path, _too_long(res.num_samples / audio.sample_rate, max_audio_seconds)))
            continue
        it.audio_cache = Path(res.audio_cache)
        it.spec_cache = Path(res.spec_cache)
        it.num_frames = res.num_frames
        ids_len = len(it.phoneme_ids or [])
        if res.num_frames < ids_len:
            bad.append(BadItem(it.id, res.path, f"audio too short for its text: {res.num_frames} frames < "
                                                f"{ids_len} phoneme ids (the alignment needs a frame per id)"))
            continue
        ok.append(it)
    return ok, bad, filtered


def report_problems(bad: Sequence[BadItem], filtered: Sequence[BadItem], on_bad_item: str, *,
                    log_file: Optional[Path] = None, total: int = 0) -> None:
    """Log every bad and filtered item by name (and write them to ``log_file``); raise on ``fail``."""
    if log_file is not None and (bad or filtered):
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "w", encoding="utf-8") as f:
            for b in bad:
                f.write(f"bad\t{b.id}\t{b.path}\t{b.reason}\n")
            for b in filtered:
                f.write(f"filtered\t{b.id}\t{b.path}\t{b.reason}\n")
    if filtered:
        _LOGGER.warning("%d of %d item(s) filtered out: %s", len(filtered), total,
                        "; ".join(str(b) for b in filtered[:20]) + (" ..." if len(filtered) > 20 else ""))
    if bad:
        names = "; ".join(str(b) for b in bad[:20]) + (f" ... (all in {log_file})" if len(bad) > 20 else "")
        if on_bad_item == "fail":
            raise DataError(f"{len(bad)} bad item(s) (--on-bad-item fail): {names}")
        _LOGGER.warning("%d of %d item(s) skipped as bad (--on-bad-item skip): %s", len(bad), total, names)


# --------------------------------------------------------------------------------------------------------
# Dataset, batches, sampler
# --------------------------------------------------------------------------------------------------------

@dataclass
class Batch:
    """A padded batch, sorted by decreasing spectrogram length (Piper's order).

    phoneme_ids [b, t_x] int64, phoneme_lengths [b], spectrograms [b, spec, t_y] float32, spectrogram_lengths
    [b], audios [b, 1, t] float32, audio_lengths [b], speaker_ids [b] or None, indices [b] (dataset indices).
    """

    phoneme_ids: torch.Tensor
    phoneme_lengths: torch.Tensor
    spectrograms: torch.Tensor
    spectrogram_lengths: torch.Tensor
    audios: torch.Tensor
    audio_lengths: torch.Tensor
    speaker_ids: Optional[torch.Tensor]
    indices: torch.Tensor

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Batch":
        return Batch(**{k: (fn(v) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()})

    def pin_memory(self) -> "Batch":
        return self._map(lambda t: t.pin_memory())

    def to(self, device: Union[str, torch.device], non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def __len__(self) -> int:
        return int(self.phoneme_ids.size(0))


class TTSDataset(torch.utils.data.Dataset):
    """Prepared items -> dicts of tensors (``phoneme_ids`` [t_x], ``spec`` [spec, t_y], ``audio`` [1, t])."""

    def __init__(self, items: Sequence[Item]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def lengths(self) -> List[int]:
        return [it.num_frames for it in self.items]

    def __getitem__(self, index: int) -> Dict[str, Any]:
        it = self.items[index]
        try:
            spec = _load_tensor_file(it.spec_cache).float()
            audio = _load_tensor_file(it.audio_cache).float().reshape(1, -1)
        except Exception as exc:
            raise DataError(f"item {it.id}: cannot read its cached audio/spectrogram {it.spec_cache} / "
                            f"{it.audio_cache} ({type(exc).__name__}: {exc})") from None
        return {"index": index, "phoneme_ids": torch.as_tensor(it.phoneme_ids, dtype=torch.long), "spec": spec,
                "audio": audio, "speaker_id": it.speaker_id}


class Collate:
    """Pad a list of dataset items into a :class:`Batch`.

    Spectrograms are padded to at least ``segment_frames`` frames and audio to ``segment_frames * hop``
    samples, so the random training window always fits.
    """

    def __init__(self, multi_speaker: bool, segment_frames: int, hop_length: int) -> None:
        self.multi_speaker = multi_speaker
        self.segment_frames = segment_frames
        self.hop_length = hop_length

    def __call__(self, examples: Sequence[Dict[str, Any]]) -> Batch:
        examples = sorted(examples, key=lambda e: e["spec"].size(1), reverse=True)
        b = len(examples)
        t_x = max(e["phoneme_ids"].numel() for e in examples)
        t_y = max(max(e["spec"].size(1) for e in examples), self.segment_frames)
        t_a = max(max(e["audio"].size(1) for e in examples), self.segment_frames * self.hop_length)
        n_spec = examples[0]["spec"].size(0)
        ids = torch.zeros(b, t_x, dtype=torch.long)
        spec = torch.zeros(b, n_spec, t_y)
        audio = torch.zeros(b, 1, t_a)
        id_len = torch.zeros(b, dtype=torch.long)
        spec_len = torch.zeros(b, dtype=torch.long)
        audio_len = torch.zeros(b, dtype=torch.long)
        for i, e in enumerate(examples):
            n, f, s = e["phoneme_ids"].numel(), e["spec"].size(1), e["audio"].size(1)
            ids[i, :n] = e["phoneme_ids"]
            spec[i, :, :f] = e["spec"]
            audio[i, :, :s] = e["audio"]
            id_len[i], spec_len[i], audio_len[i] = n, f, s
        sids = None
        if self.multi_speaker:
            sids = torch.tensor([int(e["speaker_id"] or 0) for e in examples], dtype=torch.long)
        return Batch(ids, id_len, spec, spec_len, audio, audio_len, sids,
                     torch.tensor([e["index"] for e in examples], dtype=torch.long))


class BucketBatchSampler(torch.utils.data.Sampler):
    """Length-bucketed batches, shuffled per epoch, split across distributed ranks.

    Each epoch: a seeded permutation is cut into windows of ``batch_size * num_replicas * bucket_windows``
    items, each window is sorted by length and cut into batches (so a batch holds similar lengths and
    little padding), and the batch order is shuffled. The batch list is padded by repeating batches to a
    multiple of ``num_replicas``; rank ``r`` takes every ``num_replicas``-th batch from ``r``. Every rank
    therefore runs the same number of steps (no DDP hang), and the union over ranks covers every item.

    :meth:`set_epoch` picks the permutation; ``start_batch`` skips batches already trained in that epoch
    (exact mid-epoch resume). Deterministic for a given (seed, epoch).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = False, bucket_windows: int = 8) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.bucket_windows = bucket_windows
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def _all_batches(self) -> List[List[int]]:
        n = len(self.lengths)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        window = self.batch_size * self.num_replicas * self.bucket_windows
        batches: List[List[int]] = []
        for start in range(0, n, window):
            chunk = sorted(order[start:start + window], key=lambda i: self.lengths[i])
            for b in range(0, len(chunk), self.batch_size):
                batches.append(chunk[b:b + self.batch_size])
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        if self.shuffle:
            perm = torch.randperm(len(batches), generator=g).tolist()
            batches = [batches[i] for i in perm]
        if not batches:
            return batches
        if self.drop_last:
            batches = batches[: len(batches) - len(batches) % self.num_replicas]
        else:
            k = 0
            while len(batches) % self.num_replicas:
                batches.append(batches[k % len(batches)])
                k += 1
        return batches

    def batches_per_epoch(self) -> int:
        return len(self._all_batches()) // self.num_replicas

    def __iter__(self) -> Iterator[List[int]]:
        mine = self._all_batches()[self.rank::self.num_replicas]
        return iter(mine[self.start_batch:])

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start_batch)


def split_items(items: Sequence[Item], validation_split: float, num_test_examples: int,
                seed: int) -> Tuple[List[Item], List[Item], List[Item]]:
    """Deterministic (train, validation, test) split; test items (for sample WAVs) come from validation."""
    n = len(items)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).tolist()
    n_val = min(n - 1, max(1 if n > 1 and validation_split > 0 else 0, int(round(n * validation_split))))
    val = [items[i] for i in perm[:n_val]]
    train = [items[i] for i in perm[n_val:]]
    test = val[:num_test_examples] if val else train[:num_test_examples]
    return train, val, test

