#!/usr/bin/env python3
"""Build the small speech corpus shipped in ``vits_fast/corpus`` (the default of ``python -m vits_fast.train``).

Audio: Debian's ``espeak-ng`` (``apt-get install espeak-ng``) speaks each sentence with two voices (two
"speakers"); the 22.05 kHz output is resampled to 16 kHz mono with soxr, edge silence is trimmed, the peak is
normalised to 0.9, and the result is stored as 16-bit FLAC.

Phoneme ids: piper-tts's bundled espeak-ng phonemiser and its phoneme-id map (``pip install piper-tts``), one
``^ _ p _ ... $`` group per sentence exactly as Piper's training does, so the ids are Piper-compatible. The audio
comes from Debian's espeak-ng 1.51 and the phonemes from piper-tts's newer build; both read the same text.

Layout written (an LJSpeech-style folder with Piper's pre-phonemised fourth column)::

    corpus/metadata.csv   id|speaker|text|phoneme ids (space separated)
    corpus/wavs/<id>.flac
    corpus/config.json    Piper voice config: audio, espeak voice, phoneme_id_map, num_symbols, speakers

Usage: ``python scripts/make_corpus.py [--out vits_fast/corpus]``. Deterministic for a given espeak-ng build.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000
# (speaker name, espeak-ng voice, words per minute)
SPEAKERS = [("adam", "en-us", 160), ("beth", "en-us+f3", 170)]

# Short sentences written for this corpus (public domain): varied phonemes, punctuation and lengths.
SENTENCES = [
    "The sun rose slowly over the quiet hills.",
    "Please bring the blue cup to the kitchen.",
    "A small boat drifted across the lake.",
    "We should leave before it starts to rain.",
    "Seven green apples fell from the tree.",
    "Where did you put the old map?",
    "The train to the city leaves at nine.",
    "She laughed, and the room felt warmer.",
    "Thick fog covered the harbor all morning.",
    "Can you hear the birds singing outside?",
    "He painted the fence a bright shade of red.",
    "Fresh bread smells wonderful in the evening.",
    "The river runs fast after a storm.",
    "My brother plays the violin every day.",
    "Turn left at the bridge, then go straight.",
    "The clock on the wall stopped at noon.",
    "Our cat sleeps on the warm windowsill.",
    "They built a tiny house near the forest.",
    "Why is the sky so dark today?",
    "Five children ran along the sandy beach.",
    "The letter arrived three weeks too late.",
    "Quiet voices drifted from the next room.",
    "Jump over the puddle, not into it!",
    "A cold wind blew through the open door.",
    "Each morning she reads the news with tea.",
    "The museum opens its doors at ten.",
    "Yellow leaves covered the garden path.",
    "Do you remember the song we heard?",
    "The pilot checked the engines twice.",
    "Heavy snow kept everyone at home.",
    "Measure the wood before you cut it.",
    "The lamp flickered, then went out.",
]


def synthesize(text: str, voice: str, wpm: int, workdir: Path) -> np.ndarray:
    """espeak-ng audio of ``text`` as float32 at :data:`SAMPLE_RATE` (edge silence trimmed, peak 0.9)."""
    wav_path = workdir / "utt.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-w", str(wav_path), text], check=True)
    audio, rate = sf.read(str(wav_path), dtype="float32", always_2d=True)
    audio = soxr.resample(audio.mean(axis=1), rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    loud = np.flatnonzero(np.abs(audio) > 0.01)
    keep = int(0.05 * SAMPLE_RATE)  # 50 ms margin on each side
    audio = audio[max(0, loud[0] - keep): loud[-1] + keep]
    return (audio * (0.9 / np.abs(audio).max())).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "vits_fast" / "corpus")
    args = parser.parse_args()
    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng not found: apt-get install espeak-ng")
    try:
        from piper.phoneme_ids import DEFAULT_PHONEME_ID_MAP, phonemes_to_ids
        from piper.phonemize_espeak import EspeakPhonemizer
    except ImportError:
        sys.exit("piper-tts not found: pip install piper-tts (its phonemiser gives Piper-compatible ids)")

    phonemizer = EspeakPhonemizer()
    out: Path = args.out
    wav_dir = out / "wavs"
    if wav_dir.exists():
        shutil.rmtree(wav_dir)
    wav_dir.mkdir(parents=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for s_idx, (speaker, voice, wpm) in enumerate(SPEAKERS):
            for t_idx, text in enumerate(SENTENCES):
                utt_id = f"{speaker}_{t_idx:03d}"
                ids = [i for sentence in phonemizer.phonemize("en-us", text) for i in phonemes_to_ids(sentence)]
                audio = synthesize(text, voice, wpm, Path(tmp))
                sf.write(str(wav_dir / f"{utt_id}.flac"), audio, SAMPLE_RATE, subtype="PCM_16")
                rows.append(f"{utt_id}|{speaker}|{text}|{' '.join(map(str, ids))}")
    (out / "metadata.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    config = {
        "dataset": "vits_fast_espeak_demo",
        "audio": {"sample_rate": SAMPLE_RATE, "quality": "x-low"},
        "espeak": {"voice": "en-us"},
        "language": {"code": "en-us"},
        "inference": {"noise_scale": 0.667, "length_scale": 1, "noise_w": 0.8},
        "phoneme_type": "espeak",
        "phoneme_map": {},
        "phoneme_id_map": DEFAULT_PHONEME_ID_MAP,
        "num_symbols": 256,
        "num_speakers": len(SPEAKERS),
        "speaker_id_map": {name: i for i, (name, _, _) in enumerate(SPEAKERS)},
        "piper_version": "1.0.0",
        "source": "audio: Debian espeak-ng 1.51; phoneme ids: piper-tts espeak phonemiser (Piper-compatible)",
    }
    (out / "config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {len(rows)} utterances to {out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
