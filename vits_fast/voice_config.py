"""Piper's voice config: the ``config.json`` of a training run and the ``VOICE.onnx.json`` of a published voice.

One place for what training, synthesis, ONNX export and ONNX import do with it: find it beside a checkpoint or an
ONNX file, read it, read its phoneme and speaker maps, complete it for a model (Piper's inference defaults, its
phoneme map) and write it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

#: Piper's defaults for ``infer`` (``inference`` in a voice's config.json).
DEFAULT_NOISE_SCALE = 0.667
DEFAULT_LENGTH_SCALE = 1.0
DEFAULT_NOISE_SCALE_W = 0.8

#: ``piper_version`` written into configs that have none.
PIPER_VERSION = "1.0.0"

#: Where Piper's default phoneme-id map is kept: the embedded corpus's config.
_DEFAULT_MAP_SOURCE = Path(__file__).parent / "corpus" / "config.json"


class VoiceError(ValueError):
    """A voice, speaker, input or setting that cannot be used; the message names the problem."""


def default_phoneme_id_map() -> Dict[str, List[int]]:
    """Piper's phoneme-id map (piper-tts's ``DEFAULT_PHONEME_ID_MAP``), as stored with the embedded corpus."""
    with open(_DEFAULT_MAP_SOURCE, "r", encoding="utf-8") as f:
        return {k: list(v) for k, v in json.load(f)["phoneme_id_map"].items()}


def config_phoneme_id_map(config: Mapping[str, Any]) -> Optional[Dict[str, List[int]]]:
    """A Piper voice config's ``phoneme_id_map`` with every entry a list of ids (None when it has none)."""
    raw = config.get("phoneme_id_map")
    if not raw:
        return None
    return {k: (list(v) if isinstance(v, list) else [int(v)]) for k, v in raw.items()}


def config_speaker_id_map(config: Mapping[str, Any]) -> Dict[str, int]:
    """A Piper voice config's ``speaker_id_map`` as name -> int (empty when it has none)."""
    return {str(k): int(v) for k, v in (config.get("speaker_id_map") or {}).items()}


def onnx_config_path(onnx_path: Union[str, Path]) -> Path:
    """``voice.onnx`` -> ``voice.onnx.json`` (where Piper looks for the config)."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name + ".json")


def find_voice_config(checkpoint: Union[str, Path]) -> Optional[Path]:
    """The ``config.json`` beside a checkpoint or up to three folders above it (Piper's training layout
    ``<dir>/lightning_logs/version_N/checkpoints/*.ckpt``), or None."""
    folder = Path(checkpoint).resolve().parent
    for candidate in [folder, *list(folder.parents)[:3]]:
        path = candidate / "config.json"
        if path.is_file():
            return path
    return None


def load_voice_config(path: Union[str, Path], what: str = "voice config") -> Dict[str, Any]:
    """Read a Piper voice ``config.json`` (UTF-8 JSON object); a :class:`VoiceError` names the file as ``what``."""
    path = Path(path)
    if not path.is_file():
        raise VoiceError(f"{what} {path} does not exist")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise VoiceError(f"cannot read the {what} {path}: {exc}") from None
    if not isinstance(config, dict):
        raise VoiceError(f"the {what} {path} is not a JSON object")
    return config


def make_voice_config(model: Any, base: Optional[Mapping[str, Any]] = None, *,
                      sample_rate: Optional[int] = None, quality: Optional[str] = None,
                      espeak_voice: Optional[str] = None, check: bool = True) -> Dict[str, Any]:
    """Piper's voice config for ``model``: ``base`` (the training ``config.json``) completed and checked.

    Fills ``audio.sample_rate``/``quality``, ``espeak.voice``, ``language.code``, ``inference`` scales (Piper's
    defaults), ``phoneme_type`` ("espeak"), ``phoneme_map``, ``phoneme_id_map`` (Piper's default map),
    ``speaker_id_map`` and ``piper_version`` where missing; ``num_symbols``/``num_speakers`` come from the model.
    With ``check`` (the default) raises :class:`VoiceError` when the config does not fit the model (speaker
    count, ids beyond the vocabulary); training, which writes the config its model is being fitted to, passes
    False.
    """
    cfg: Dict[str, Any] = copy.deepcopy(dict(base or {}))
    if check and cfg.get("num_speakers") is not None and int(cfg["num_speakers"]) != model.n_speakers:
        raise VoiceError(f"the voice config says {cfg['num_speakers']} speaker(s), the model has "
                          f"{model.n_speakers}")
    audio = cfg.setdefault("audio", {})
    if sample_rate is not None:
        audio["sample_rate"] = int(sample_rate)
    audio.setdefault("sample_rate", 22050)
    if quality is not None:
        audio["quality"] = quality
    espeak = cfg.setdefault("espeak", {})
    if espeak_voice is not None:
        espeak["voice"] = espeak_voice
    espeak.setdefault("voice", "en-us")
    cfg.setdefault("language", {}).setdefault("code", espeak["voice"])
    inference = cfg.setdefault("inference", {})
    inference.setdefault("noise_scale", DEFAULT_NOISE_SCALE)
    inference.setdefault("length_scale", DEFAULT_LENGTH_SCALE)
    inference.setdefault("noise_w", DEFAULT_NOISE_SCALE_W)
    cfg.setdefault("phoneme_type", "espeak")
    cfg.setdefault("phoneme_map", {})
    if not cfg.get("phoneme_id_map"):
        cfg["phoneme_id_map"] = default_phoneme_id_map()
    too_big = {sym: ids for sym, ids in cfg["phoneme_id_map"].items()
               if any(int(i) >= model.n_vocab or int(i) < 0 for i in (ids if isinstance(ids, list) else [ids]))}
    if check and too_big:
        raise VoiceError(f"the phoneme_id_map uses ids outside the model's vocabulary of {model.n_vocab} symbols: "
                          f"{dict(list(too_big.items())[:5])}")
    cfg["num_symbols"] = int(model.n_vocab)
    cfg["num_speakers"] = int(model.n_speakers)
    speakers = cfg.setdefault("speaker_id_map", {})
    bad = {k: v for k, v in speakers.items() if not 0 <= int(v) < model.n_speakers}
    if check and bad:
        raise VoiceError(f"speaker_id_map has ids outside 0..{model.n_speakers - 1}: {bad}")
    cfg.setdefault("piper_version", PIPER_VERSION)
    return cfg


def write_voice_config(config: Mapping[str, Any], path: Union[str, Path]) -> Path:
    """Write ``config`` to ``path`` as Piper does (UTF-8, indented); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=4)
    return path
