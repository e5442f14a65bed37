"""Dataset readers, bad-item handling, the spectrogram cache, batching and the bucket sampler."""

import json
import logging

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from vits_fast import data as D
from vits_fast.config import AudioConfig
from vits_fast.mel_processing import spectrogram_torch

AUDIO = AudioConfig(sample_rate=16000, filter_length=256, hop_length=64, win_length=256, mel_channels=40)


def _tone(seconds: float, rate: int, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t) * np.hanning(t.size)).astype(np.float32)


def _ljspeech(tmp_path, rows, files):
    folder = tmp_path / "lj"
    (folder / "wavs").mkdir(parents=True)
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    for name, (audio, rate) in files.items():
        sf.write(str(folder / "wavs" / f"{name}.wav"), audio, rate)
    return folder


def _chars():
    return D.Phonemizer("en-us", force_characters=True)


@pytest.fixture
def bad_dataset(tmp_path):
    rows = ["good|Hello there, world.", "resampled|Another fine sentence.", "missing|No audio for me.",
            "empty|   ", "long|" + "a very long sentence " * 6, "corrupt|This file is garbage."]
    files = {"good": (_tone(1.0, 16000), 16000), "resampled": (_tone(1.2, 22050), 22050),
             "empty": (_tone(0.8, 16000), 16000), "long": (_tone(2.0, 16000), 16000)}
    folder = _ljspeech(tmp_path, rows, files)
    (folder / "wavs" / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio at all")
    return folder


def test_audio_longer_than_the_limit_is_filtered_without_being_read(tmp_path, monkeypatch):
    folder = _ljspeech(tmp_path, ["short|Short one.", "hour|Pretend to be long."],
                       {"short": (_tone(0.5, 16000), 16000), "hour": (_tone(3.0, 22050), 22050)})
    items, _, _ = D.read_dataset(folder)
    read = []
    load_audio = D.load_audio
    monkeypatch.setattr(D, "load_audio", lambda path, rate: read.append(path.name) or load_audio(path, rate))
    ok, bad, filtered = D.prepare_items(items, AUDIO, tmp_path / "cache", phonemizer=_chars(), num_symbols=256,
                                        max_audio_seconds=2.5, progress=False)
    assert [it.id for it in ok] == ["short"] and bad == [] and read == ["short.wav"]  # the long file never loaded
    assert [(b.id, b.reason) for b in filtered] == [("hour", "3.0 s of audio > --max-audio-seconds 2.5")]
    # Cached by a run without the limit, it is still filtered by one with it.
    items, _, _ = D.read_dataset(folder)
    D.prepare_items(items, AUDIO, tmp_path / "cache", phonemizer=_chars(), num_symbols=256, progress=False)
    items, _, _ = D.read_dataset(folder)
    ok, _, filtered = D.prepare_items(items, AUDIO, tmp_path / "cache", phonemizer=_chars(), num_symbols=256,
                                      max_audio_seconds=1.0, progress=False)
    assert [it.id for it in ok] == ["short"]
    assert [(b.id, b.reason) for b in filtered] == [("hour", "3.0 s of audio > --max-audio-seconds 1")]


def test_bad_items_are_reported_by_name_and_skipped(bad_dataset, tmp_path, caplog):
    items, bad, info = D.read_dataset(bad_dataset)
    assert info.kind == "ljspeech" and info.num_speakers == 1
    assert {b.id: b.reason for b in bad} == {"missing": "audio file not found", "empty": "empty transcript"}
    ok, bad2, filtered = D.prepare_items(items, AUDIO, tmp_path / "cache", phonemizer=_chars(), num_symbols=256,
                                         max_phoneme_ids=100, progress=False)
    assert [it.id for it in ok] == ["good", "resampled"]
    assert [b.id for b in filtered] == ["long"] and "max-phoneme-ids" in filtered[0].reason
    assert [b.id for b in bad2] == ["corrupt"] and "cannot read audio" in bad2[0].reason
    assert bad2[0].path.endswith("corrupt.wav")
    with caplog.at_level(logging.WARNING, logger="vits_fast.data"):
        D.report_problems(bad + bad2, filtered, "skip", log_file=tmp_path / "bad.tsv", total=6)
    text = caplog.text
    for name in ("missing", "empty", "corrupt", "long"):
        assert name in text
    assert "3 of 6 item(s) skipped" in text and "1 of 6 item(s) filtered" in text
    assert len((tmp_path / "bad.tsv").read_text().splitlines()) == 4
    with pytest.raises(D.DataError, match="3 bad item.*missing.*empty.*corrupt"):
        D.report_problems(bad + bad2, filtered, "fail", total=6)


def test_other_sample_rate_is_resampled_with_soxr(bad_dataset, tmp_path):
    items, _, _ = D.read_dataset(bad_dataset)
    ok, _, _ = D.prepare_items([it for it in items if it.id == "resampled"], AUDIO, tmp_path / "c",
                               phonemizer=_chars(), num_symbols=256, progress=False)
    (item,) = ok
    cached = np.load(item.audio_cache)
    expected = soxr.resample(_tone(1.2, 22050), 22050, 16000, quality="HQ")
    assert cached.shape == expected.shape and abs(cached.size - 1.2 * 16000) <= 1
    np.testing.assert_allclose(cached, expected, atol=1e-4)
    spec = np.load(item.spec_cache)
    ref = spectrogram_torch(torch.from_numpy(cached), 256, 16000, 64, 256).numpy()
    np.testing.assert_allclose(spec, ref, rtol=1e-6, atol=1e-6)
    assert item.num_frames == spec.shape[1] == cached.size // 64


def test_cache_is_reused_and_invalidated_on_change(bad_dataset, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    items, _, _ = D.read_dataset(bad_dataset)
    good = [it for it in items if it.id == "good"]
    first, _, _ = D.prepare_items(good, AUDIO, cache, phonemizer=_chars(), num_symbols=256, progress=False)

    def boom(*args, **kwargs):
        raise AssertionError("audio decoded again although cached")

    monkeypatch.setattr(D, "load_audio", boom)
    items2, _, _ = D.read_dataset(bad_dataset)
    again, bad, _ = D.prepare_items([it for it in items2 if it.id == "good"], AUDIO, cache, phonemizer=_chars(),
                                    num_symbols=256, progress=False)
    assert not bad and again[0].spec_cache == first[0].spec_cache
    monkeypatch.undo()
    sf.write(str(bad_dataset / "wavs" / "good.wav"), _tone(0.5, 16000, 330.0), 16000)  # edited file
    items3, _, _ = D.read_dataset(bad_dataset)
    third, _, _ = D.prepare_items([it for it in items3 if it.id == "good"], AUDIO, cache, phonemizer=_chars(),
                                  num_symbols=256, progress=False)
    assert third[0].spec_cache != first[0].spec_cache and third[0].num_frames == 8000 // 64


def test_parallel_preparation_matches_serial(bad_dataset, tmp_path):
    items_a, _, _ = D.read_dataset(bad_dataset)
    items_b, _, _ = D.read_dataset(bad_dataset)
    serial = D.prepare_items(items_a, AUDIO, tmp_path / "a", phonemizer=_chars(), num_symbols=256, progress=False)
    parallel = D.prepare_items(items_b, AUDIO, tmp_path / "b", phonemizer=_chars(), num_symbols=256,
                               num_workers=2, progress=False)
    assert [it.id for it in serial[0]] == [it.id for it in parallel[0]]
    assert [str(b) for b in serial[1]] == [str(b) for b in parallel[1]]
    for a, b in zip(serial[0], parallel[0]):
        np.testing.assert_array_equal(np.load(a.spec_cache), np.load(b.spec_cache))


def test_speaker_column_and_phoneme_id_column(tmp_path):
    rows = ["a1|anna|One.|1 0 14 0 2", "b1|bob|Two.|1 0 15 0 2", "b2|bob|Three.|1 0 16 0 2"]
    files = {n: (_tone(0.6, 16000), 16000) for n in ("a1", "b1", "b2")}
    folder = _ljspeech(tmp_path, rows, files)
    items, bad, info = D.read_dataset(folder)
    assert not bad and info.num_speakers == 2
    assert info.speaker_id_map == {"bob": 0, "anna": 1}  # Piper: most utterances first
    assert [(it.id, it.speaker_id, it.phoneme_ids) for it in items] == [
        ("a1", 1, [1, 0, 14, 0, 2]), ("b1", 0, [1, 0, 15, 0, 2]), ("b2", 0, [1, 0, 16, 0, 2])]
    single, _, info1 = D.read_dataset(folder, single_speaker=True)
    assert info1.num_speakers == 1 and all(it.speaker_id is None for it in single)


def test_piper_preprocessed_folder(tmp_path):
    folder = tmp_path / "piper"
    cache = folder / "cache"
    cache.mkdir(parents=True)
    lines = []
    for i, secs in enumerate((0.7, 1.1)):
        audio = torch.from_numpy(_tone(secs, 16000)).unsqueeze(0)
        spec = spectrogram_torch(audio, 256, 16000, 64, 256).squeeze(0)
        torch.save(audio, cache / f"{i}.pt")
        torch.save(spec, cache / f"{i}.spec.pt")
        lines.append(json.dumps({"text": f"utt {i}", "audio_path": f"/orig/{i}.wav", "speaker_id": i,
                                 "phoneme_ids": [1, 0, 20 + i, 0, 2], "audio_norm_path": f"cache/{i}.pt",
                                 "audio_spec_path": f"cache/{i}.spec.pt"}))
    lines.append(json.dumps({"text": "gone", "phoneme_ids": [1, 0, 5, 0, 2], "audio_norm_path": "cache/x.pt",
                             "audio_spec_path": "cache/x.spec.pt"}))
    (folder / "dataset.jsonl").write_text("\n".join(lines) + "\nnot json\n", encoding="utf-8")
    (folder / "config.json").write_text(json.dumps({"audio": {"sample_rate": 16000}, "num_symbols": 256,
                                                    "num_speakers": 2, "speaker_id_map": {"a": 0, "b": 1},
                                                    "phoneme_id_map": {"_": [0], "^": [1], "$": [2]}}))
    items, bad, info = D.read_dataset(folder)
    assert info.kind == "piper" and info.num_speakers == 2 and info.sample_rate == 16000
    assert len(bad) == 1 and "line 4" in bad[0].id
    ok, bad2, _ = D.prepare_items(items, AUDIO, tmp_path / "c", phonemizer=None, num_symbols=256, progress=False)
    assert [it.num_frames for it in ok] == [int(0.7 * 16000) // 64, int(1.1 * 16000) // 64]
    assert [b.reason for b in bad2] == ["audio file not found"]
    example = D.TTSDataset(ok)[1]
    assert example["spec"].shape == (129, ok[1].num_frames) and example["audio"].shape == (1, 17600)
    assert example["speaker_id"] == 1


def test_fallback_phonemizer_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(D, "piper_phonemizer_available", lambda: False)
    monkeypatch.setattr(D.Phonemizer, "_warned", False)
    ph = D.Phonemizer("en-us")
    assert ph.kind == "characters"
    with caplog.at_level(logging.WARNING, logger="vits_fast.data"):
        ph.warn_if_fallback()
        ph.warn_if_fallback()
    assert caplog.text.count("CHARACTER-LEVEL") == 1
    ids = ph("Hi, yo!")
    id_map = D.default_phoneme_id_map()
    expected = [1, 0] + [x for c in "hi, yo!" for x in (id_map[c][0], 0)] + [2]
    assert ids == expected


def test_phonemize_lists_the_symbols_it_skips():
    ph = _chars()
    id_map = D.default_phoneme_id_map()
    assert "日" not in id_map and "本" not in id_map
    out = ph.phonemize("Hi 本日 yo 日")
    expected = [1, 0] + [x for c in "hi  yo " for x in (id_map[c][0], 0)] + [2]  # unknown symbols left out
    assert out.ids == expected == ph("Hi 本日 yo 日")
    assert out.unknown == ["日", "本"] and out.num_known == len("hi  yo ")
    nothing = ph.phonemize("日本")
    assert nothing.unknown == ["日", "本"] and nothing.num_known == 0 and nothing.ids == [1, 0, 2]
    clean = ph.phonemize("yo")
    assert clean.unknown == [] and clean.num_known == 2


def test_collate_pads_and_sorts():
    ex = [{"index": i, "phoneme_ids": torch.arange(1, n + 1), "spec": torch.rand(5, f), "audio": torch.rand(1, f * 4),
           "speaker_id": i} for i, (n, f) in enumerate([(3, 4), (6, 9), (2, 2)])]
    batch = D.Collate(True, segment_frames=12, hop_length=4)(ex)
    assert batch.indices.tolist() == [1, 0, 2]
    assert batch.spectrograms.shape == (3, 5, 12) and batch.audios.shape == (3, 1, 48)
    assert batch.phoneme_lengths.tolist() == [6, 3, 2] and batch.spectrogram_lengths.tolist() == [9, 4, 2]
    assert batch.speaker_ids.tolist() == [1, 0, 2]
    torch.testing.assert_close(batch.spectrograms[0, :, :9], ex[1]["spec"])
    assert batch.spectrograms[0, :, 9:].abs().sum() == 0 and batch.phoneme_ids[2, 2:].abs().sum() == 0


@pytest.mark.parametrize("n,batch,replicas", [(37, 4, 1), (37, 4, 3), (5, 4, 4), (64, 8, 2)])
def test_bucket_sampler_distributed(n, batch, replicas):
    rng = np.random.default_rng(n)
    lengths = rng.integers(10, 500, size=n).tolist()
    samplers = [D.BucketBatchSampler(lengths, batch, num_replicas=replicas, rank=r, seed=3) for r in range(replicas)]
    for s in samplers:
        s.set_epoch(2)
    per_rank = [list(s) for s in samplers]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(samplers[0])  # equal step counts
    seen = [i for rank in per_rank for b in rank for i in b]
    assert set(seen) == set(range(n))
    assert all(1 <= len(b) <= batch for rank in per_rank for b in rank)
    window = batch * replicas * 8
    if n > window:  # bucketing: a batch spans much less than the full length range
        spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for rank in per_rank for b in rank])
        assert spread < (max(lengths) - min(lengths)) / 3
    again = D.BucketBatchSampler(lengths, batch, num_replicas=replicas, rank=0, seed=3)
    again.set_epoch(2)
    assert list(again) == per_rank[0]
    again.set_epoch(3)
    assert list(again) != per_rank[0] or n <= batch
    again.set_epoch(2, start_batch=1)
    assert list(again) == per_rank[0][1:]


def test_split_is_deterministic_and_disjoint():
    items = [D.Item(id=str(i), text="t", phoneme_ids=[1, 2]) for i in range(20)]
    train, val, test = D.split_items(items, 0.1, 2, seed=5)
    assert len(val) == 2 and len(train) == 18 and test == val[:2]
    assert not {it.id for it in train} & {it.id for it in val}
    assert [it.id for it in D.split_items(items, 0.1, 2, seed=5)[1]] == [it.id for it in val]


def test_espeak_phonemizer_reproduces_corpus_ids_when_installed():
    pytest.importorskip("piper.phonemize_espeak")
    ph = D.Phonemizer("en-us")
    assert ph.kind == "espeak"
    rows = (D.CORPUS_DIR / "metadata.csv").read_text(encoding="utf-8").splitlines()[:5]
    for row in rows:
        _, _, text, ids = row.split("|")
        assert ph(text) == [int(i) for i in ids.split()]


def test_character_voice_keeps_characters_without_warning(monkeypatch, caplog):
    """A voice trained on characters (phoneme_type "text") is phonemised with characters even where espeak-ng
    is installed, and that is no fallback to warn about."""
    monkeypatch.setattr(D, "piper_phonemizer_available", lambda: True)
    monkeypatch.setattr(D.Phonemizer, "_warned", False)
    ph = D.Phonemizer("en-us", force_characters=True)
    with caplog.at_level(logging.WARNING, logger="vits_fast.data"):
        ph.warn_if_fallback()
    assert ph.kind == "characters" and "CHARACTER-LEVEL" not in caplog.text
    assert D.Phonemizer("en-us").kind == "espeak"
