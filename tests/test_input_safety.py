"""Nothing lost, nothing unbounded: one test per class of issue 13, each showing the refusal or the bound, its
message, and that nothing on disk changed.

Classes: (1) no overwrite or deletion the user did not ask for, (2) dataset items checked at load, (3) sizes a
flag or file controls bounded before allocation, (4) non-finite values never pass silently, (5) corruption
detected by the checkpoint checksum, (6) messages, not tracebacks.
"""

import hashlib
import io
import json
import pickle
import resource
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import vits_fast
from vits_fast import checkpoint as ck
from vits_fast import export, train
from vits_fast import inference as inf
from vits_fast.config import tiny_model_kwargs
from vits_fast.data import DataError, Phonemizer, read_dataset
from vits_fast.voice_config import default_phoneme_id_map
from vits_fast.guards import OverwriteError
from vits_fast.synthesize import main as synthesize_main
from tests._util import one_thread, randomised  # noqa: F401  (one_thread: a fixture)
from tests.test_synthesize_cli import AUDIO, LSB, ZERO, voices  # noqa: F401  (fixture)
from tests.test_train import _args, _trainer, cache_dir, corpus  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


def _snapshot(*roots):
    """{file: sha256} of every file under ``roots`` (a file root is itself)."""
    out = {}
    for root in map(Path, roots):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _synth(argv, stdin=b""):
    """Run the synthesize CLI in-process on bytes stdin; returns (exit status, stdout bytes)."""
    stdout = io.BytesIO()
    rc = synthesize_main([str(a) for a in argv], stdin=io.BytesIO(stdin), stdout=stdout)
    return rc, stdout.getvalue()


def _save_voice(path, model, kwargs, **extra):
    """A vits_fast checkpoint of ``model`` recording ``kwargs`` (plus ``extra`` vits_fast fields)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ck.save_checkpoint(path, model, nn.Module(), [], [], 0, 0, {},
                       {"model_kwargs": kwargs, "audio": AUDIO.to_dict(), **extra})
    return path


# --------------------------------------------------------------------------------------------------------
# 1. Nothing is overwritten or deleted that the user did not ask for
# --------------------------------------------------------------------------------------------------------

def test_nothing_is_overwritten_or_deleted_unasked(corpus, cache_dir, voices, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"the other run's last checkpoint")
    (run / "checkpoints" / "epoch=7-step=700.ckpt").write_bytes(b"the other run's step 700")
    before = _snapshot(run)

    # A fresh run into that folder: refused before anything is written, naming --resume and --overwrite.
    with pytest.raises(OverwriteError) as info:
        train.main(_args(corpus, cache_dir, run, "--max-steps", "1"))
    assert "--resume auto" in str(info.value) and "--overwrite" in str(info.value)
    assert _snapshot(run) == before and sorted(p.name for p in run.rglob("*")) == [
        "checkpoints", "epoch=7-step=700.ckpt", "last.ckpt"]

    # --init-from a checkpoint in the folder the run writes to; --output-dir the dataset itself (config.json).
    with pytest.raises(OverwriteError, match="inside this run's checkpoint folder"):
        train.main(_args(corpus, cache_dir, run, "--overwrite", "--init-from",
                         str(run / "checkpoints" / "epoch=7-step=700.ckpt")))
    dataset_before = _snapshot(corpus)
    with pytest.raises(OverwriteError, match=r"refusing to overwrite the input .*config\.json"):
        train.main(_args(corpus, cache_dir, corpus, "--max-steps", "1"))
    assert _snapshot(run) == before and _snapshot(corpus) == dataset_before

    # Asked for with --overwrite: rotation (keep 1) deletes only what this run wrote.
    train.main(_args(corpus, cache_dir, run, "--overwrite", "--max-steps", "3", "--checkpoint-every", "1",
                     "--keep-checkpoints", "1"))
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["epoch=1-step=3.ckpt", "epoch=7-step=700.ckpt", "last.ckpt"]
    assert (run / "checkpoints" / "epoch=7-step=700.ckpt").read_bytes() == b"the other run's step 700"

    # Commands writing over one of their inputs: export onto its checkpoint or its config, synthesis onto its
    # text file.
    single = Path(voices["single"]["ckpt"])
    config_copy = tmp_path / "v.onnx.json"
    shutil.copy(voices["single"]["config"], config_copy)
    text_dir = tmp_path / "texts"
    text_dir.mkdir()
    (text_dir / "0000.wav").write_text("Hello there.\n")
    inputs_before = _snapshot(single, config_copy, text_dir)
    for argv, call in ((["onnx", single, single], export.main),
                       (["onnx", single, tmp_path / "v.onnx", "--config", config_copy], export.main),
                       (["-m", single, "-f", text_dir / "0000.wav", "-d", text_dir], _synth)):
        capsys.readouterr()
        rc = call([str(a) for a in argv]) if call is export.main else call(argv)[0]
        err = capsys.readouterr().err
        assert rc == 1 and "refusing to overwrite the input" in err, (argv, err)
    assert _snapshot(single, config_copy, text_dir) == inputs_before
    assert not (tmp_path / "v.onnx").exists()


# --------------------------------------------------------------------------------------------------------
# 2. Every dataset item is validated at load, before step 1, with the bad-item report
# --------------------------------------------------------------------------------------------------------

def test_dataset_items_are_checked_before_the_first_step(corpus, cache_dir, tmp_path, caplog):
    # LJSpeech layout (id|speaker|text|ids): a '|' inside a text, a line that is not UTF-8, an id out of range.
    lj = tmp_path / "lj"
    shutil.copytree(corpus, lj)
    rows = (lj / "metadata.csv").read_text(encoding="utf-8").splitlines()
    name, speaker, _, ids = rows[0].split("|")
    rows[0] = f"{name}|{speaker}|Left | right.|{ids}"
    name1, speaker1, text1, ids1 = rows[1].split("|")
    rows[1] = f"{name1}|{speaker1}|{text1}|{ids1.replace(' 0 2', ' 0 999 0 2')}"
    raw = "\n".join(rows).encode() + b"\nbeth_009|beth|caf\xe9 au lait|1 0 2\n"
    (lj / "metadata.csv").write_bytes(raw)
    before = _snapshot(lj)
    items, _, info = read_dataset(lj)
    first = next(it for it in items if it.id == name)
    assert first.text == "Left | right." and info.speaker_id_map[speaker] == first.speaker_id
    t = _trainer(_args(lj, cache_dir, tmp_path / "out_lj", "--max-steps", "1"))
    assert t.global_step == 0  # setup only: the report comes before any step
    reasons = {b.id: b.reason for b in t.bad_items}
    assert set(reasons) == {name1, "beth_009"}
    assert "phoneme id 999 outside the vocabulary of 256" in reasons[name1]
    assert "line 13: byte 0xe9 at column 18 is not UTF-8 text" in reasons["beth_009"]
    tsv = (tmp_path / "out_lj" / "bad_items.tsv").read_text()
    assert name1 in tsv and "beth_009" in tsv

    # Piper's preprocessed layout (dataset.jsonl + cached tensors): wrong speaker types/ranges, non-finite cache.
    pj = tmp_path / "piper"
    pj.mkdir()
    shutil.copy(corpus / "config.json", pj / "config.json")
    good = t.train_set.items[:3]
    nan_audio = pj / "nan.audio.npy"
    np.save(nan_audio, np.full(4000, np.nan, np.float32))

    def record(it, **changes):
        rec = {"phoneme_ids": it.phoneme_ids, "audio_norm_path": str(it.audio_cache),
               "audio_spec_path": str(it.spec_cache), "speaker_id": it.speaker_id, "text": it.text,
               "audio_path": f"wavs/{it.id}.wav"}
        rec.update(changes)
        return json.dumps(rec)

    lines = [record(it) for it in good] + [
        record(good[0], audio_path="wavs/typed.wav", speaker_id="adam"),
        record(good[0], audio_path="wavs/ranged.wav", speaker_id=7),
        record(good[0], audio_path="wavs/boolean.wav", speaker_id=True),
        record(good[0], audio_path="wavs/float_ids.wav", phoneme_ids=[1, 0, 2.5, 0, 2]),
        record(good[0], audio_path="wavs/big_id.wav", phoneme_ids=[1, 0, 300, 0, 2]),
        record(good[0], audio_path="wavs/nan.wav", audio_norm_path=str(nan_audio)),
    ]
    (pj / "dataset.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "\xff"}\n')
    before.update(_snapshot(pj))
    with caplog.at_level("WARNING", logger="vits_fast.data"):
        t2 = _trainer(_args(pj, cache_dir, tmp_path / "out_pj", "--max-steps", "1", "--validation-split", "0"))
    reasons = {b.id: b.reason for b in t2.bad_items}
    assert reasons == {
        "typed": "line 4: speaker_id must be an integer, got 'adam'",
        "ranged": "line 5: speaker_id 7 is outside the dataset's speakers 0..1 (config.json num_speakers)",
        "boolean": "line 6: speaker_id must be an integer, got True",
        "float_ids": "line 7: phoneme_ids must be a list of integers, got [1, 0, 2.5, 0, 2]",
        "big_id": "phoneme id 300 outside the vocabulary of 256 (1 such id(s))",
        "nan": f"cached audio {nan_audio} contains NaN or infinite values",
        "line 10": f"{pj / 'dataset.jsonl'} line 10: byte 0xff at column 11 is not UTF-8 text",
    }
    assert "7 of 10 item(s) skipped as bad" in caplog.text and len(t2.train_set) == 3
    tsv = (tmp_path / "out_pj" / "bad_items.tsv").read_text().splitlines()
    assert len(tsv) == 7 and all(line.startswith("bad\t") for line in tsv)
    with pytest.raises(DataError, match=r"7 bad item\(s\) \(--on-bad-item fail\): line 10 .* typed .* nan "):
        _trainer(_args(pj, cache_dir, tmp_path / "out_fail", "--on-bad-item", "fail"))
    assert {k: v for k, v in _snapshot(lj, pj).items()} == before


# --------------------------------------------------------------------------------------------------------
# 3. Every size a user or a file controls is bounded before memory is allocated
# --------------------------------------------------------------------------------------------------------

class _Call:
    """Pickles as ``fn(*args)``: what a crafted checkpoint asks the unpickler to run."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_sizes_from_flags_and_files_are_bounded(corpus, cache_dir, voices, tmp_path, capsys, caplog,
                                                monkeypatch):
    # The checkpoint loader: tiny files whose allowed callables would allocate gigabytes.
    bombs = {"bytearray": _Call(bytearray, 10**9), "list of range": _Call(list, _Call(range, 10**9)),
             "storage": _Call(torch.UntypedStorage, 10**10), "expanded view": torch.zeros(1).expand(10**9)}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name, payload in bombs.items():
        path = tmp_path / f"{name}.ckpt"
        if isinstance(payload, torch.Tensor):
            torch.save({"state_dict": {"model_g.enc_p.emb.weight": payload}}, path)
        else:
            path.write_bytes(pickle.dumps(payload, protocol=2))
        size, digest = path.stat().st_size, _snapshot(path)
        assert size < 2000, (name, size)
        with pytest.raises(ck.CheckpointError, match="would allocate more than") as info:
            ck.load_checkpoint(path)
        assert str(path) in str(info.value) and _snapshot(path) == digest, name
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 300 * 1024  # KiB: nothing was built

    # Model sizes read from a checkpoint or a dataset config: refused before any model is built.
    kw = tiny_model_kwargs(num_symbols=256)
    model = randomised(vits_fast.SynthesizerTrn(**kw))
    huge = _save_voice(tmp_path / "huge" / "model.ckpt", model, dict(kw, n_vocab=10**12))
    with pytest.raises(ck.CheckpointError, match=r"n_vocab=1000000000000 is outside \[1, 65536\]"):
        inf.load_voice(huge)
    wide = _save_voice(tmp_path / "wide" / "model.ckpt", model, dict(kw, hidden_channels=4096, filter_channels=16384,
                                                                     n_layers=64))
    with pytest.raises(ck.CheckpointError, match=r"parameters \(limit 500000000\)"):
        inf.load_voice(wide)
    big_vocab = tmp_path / "bigvocab"
    shutil.copytree(corpus, big_vocab)
    config = json.loads((big_vocab / "config.json").read_text())
    (big_vocab / "config.json").write_text(json.dumps(dict(config, num_symbols=10**12)))
    with pytest.raises(ck.CheckpointError, match=r"bigvocab: invalid model settings: n_vocab=1000000000000 is outside"):
        _trainer(_args(big_vocab, cache_dir, tmp_path / "out", "--max-steps", "1"))

    # Training's validation samples: an absurd predicted length is refused, the sample skipped (and named).
    t = _trainer(_args(corpus, cache_dir, tmp_path / "samples", "--max-steps", "1"))
    t.args.no_samples = False
    monkeypatch.setattr(train.trainer, "DEFAULT_LENGTH_SCALE", 1e6)
    with caplog.at_level("WARNING", logger="vits_fast.train"):
        assert t.validate()["samples"] == []
    assert f"sample {t.test_items[0].id} not written: the predicted length exceeds the limit" in caplog.text

    # length_scale: the predicted length is checked before the alignment is allocated.
    single = voices["single"]["ckpt"]
    rc, out = _synth(["-m", single, "-o", tmp_path / "slow.wav", "--length-scale", "1e5", "Hello there."])
    err = capsys.readouterr().err
    assert rc == 1 and "the predicted length exceeds the limit of 10000 frames" in err and not (tmp_path / "slow.wav").exists()

    # Long text: cut at sentence ends into pieces of at most --max-phonemes ids, spoken in order.
    text = " ".join(f"Sentence number {i} is here." for i in range(30))
    rc, raw = _synth(["-m", single, "--output-raw", "--max-phonemes", "80", *ZERO], text.encode())
    assert rc == 0, capsys.readouterr().err
    id_map = default_phoneme_id_map()
    ids = Phonemizer(id_map=id_map, force_characters=True)(text)  # the test voices are "text" voices
    pieces = inf.split_ids(ids, 80, id_map["$"], id_map[" "])
    assert len(ids) > 1000 and len(pieces) > 12 and max(map(len, pieces)) <= 80
    assert sum(pieces, []) == ids
    synth = inf.Synthesizer(voices["single"]["model"])
    expected = np.concatenate([synth.synthesize_ids(p, noise_scale=0.0, noise_scale_w=0.0).numpy() for p in pieces])
    np.testing.assert_allclose(np.frombuffer(raw, "<i2") / 32767, np.clip(expected, -1, 1), atol=1.5 * LSB, rtol=0)
    with pytest.raises(inf.VoiceError, match="has 1000 phoneme ids, more than the limit of 500"):
        synth.synthesize_ids([1] * 1000)


# --------------------------------------------------------------------------------------------------------
# 4. Non-finite values never pass silently
# --------------------------------------------------------------------------------------------------------

def test_nonfinite_values_are_refused_where_they_enter(corpus, cache_dir, voices, tmp_path, capsys):
    kw = tiny_model_kwargs(num_symbols=256)
    model = randomised(vits_fast.SynthesizerTrn(**kw))
    with torch.no_grad():
        model.dec.conv_post.weight[0, 0, 0] = float("inf")
    inf_ckpt = _save_voice(tmp_path / "inf" / "model.ckpt", model, kw)
    single = voices["single"]["ckpt"]
    nan_config = tmp_path / "nan.json"
    nan_config.write_text(json.dumps({"inference": {"noise_scale": float("nan")}}))
    cases = {
        "inf weight": ([inf_ckpt, "Hi"], "holds NaN/inf weights in 1 tensor(s): ['dec.conv_post.weight']"),
        "noise scale nan": ([single, "--noise-scale", "nan", "Hi"], "--noise-scale must be a finite number, got nan"),
        "noise w inf": ([single, "--noise-w", "inf", "Hi"], "--noise-w must be a finite number, got inf"),
        "length scale 0": ([single, "--length-scale", "0", "Hi"], "--length-scale must be > 0, got 0.0"),
        "length scale negative": ([single, "--length-scale", "-2", "Hi"], "--length-scale must be > 0, got -2.0"),
        "config scale nan": ([single, "-c", nan_config, "Hi"], "noise_scale must be a finite number, got nan"),
    }
    for name, (argv, message) in cases.items():
        capsys.readouterr()
        rc, out = _synth(["-m", argv[0], "-o", tmp_path / "o.wav", *argv[1:]])
        err = capsys.readouterr().err
        assert rc == 1 and message in err and out == b"", (name, err)
        assert not (tmp_path / "o.wav").exists(), name
    synth = inf.Synthesizer(voices["single"]["model"])
    for scales in ({"length_scale": 0.0}, {"length_scale": -1.0}, {"noise_scale": float("nan")}):
        with pytest.raises(inf.VoiceError, match="must be"):
            synth.synthesize_ids([1, 0, 20, 0, 2], **scales)

    # Training: NaN flags are usage errors; a NaN checkpoint is refused as a warm start.
    with pytest.raises(SystemExit) as exit_info:
        train.build_parser().parse_args(["--learning-rate", "nan"])
    assert exit_info.value.code == 2
    assert "argument --learning-rate: the value must be a finite number, got nan" in capsys.readouterr().err
    with torch.no_grad():
        model.enc_p.emb.weight.fill_(float("nan"))
    nan_ckpt = _save_voice(tmp_path / "nan" / "model.ckpt", model, kw)
    nan_before = _snapshot(nan_ckpt)
    with pytest.raises(ck.CheckpointError, match=r"holds NaN/inf weights in \d+ tensor\(s\): \['enc_p.emb.weight'"):
        train.main(_args(corpus, cache_dir, tmp_path / "warm", "--init-from", str(nan_ckpt)))
    assert _snapshot(nan_ckpt) == nan_before

    # A diverging run (learning rate 10: every loss after step 1 overflows) stops after --max-nonfinite
    # consecutive non-finite steps; what it saved holds the last finite weights, those of step 1.
    run = tmp_path / "diverge"
    with pytest.raises(train.NonFiniteLossError, match="3 consecutive non-finite steps"):
        train.main(_args(corpus, cache_dir, run, "--max-steps", "20", "--checkpoint-every", "1", "--keep-checkpoints",
                         "5", "--max-nonfinite", "3", "--learning-rate", "10"))
    saved = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert saved == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "epoch=1-step=3.ckpt", "last.ckpt"]
    first = ck.load_checkpoint(run / "checkpoints" / "epoch=0-step=1.ckpt")["state_dict"]
    for name in saved[1:]:
        state = ck.load_checkpoint(run / "checkpoints" / name)["state_dict"]
        assert all(torch.equal(v, first[k]) for k, v in state.items()), name
    assert all(torch.isfinite(v).all() for v in first.values() if v.is_floating_point())
    # NaN/inf weights are never written: a save refuses them and leaves the folder as it was.
    t = _trainer(_args(corpus, cache_dir, tmp_path / "nan_weights", "--max-steps", "1"))
    with torch.no_grad():
        t.model_d.discriminators[0].conv_post.bias.fill_(float("inf"))
    with pytest.raises(train.NonFiniteLossError, match=r"the weights became non-finite by step 0 \(1 tensor\(s\), e\.g\. "
                                                        r"discriminators\.0\.conv_post\.bias\); nothing was saved"):
        t.save()
    assert list((tmp_path / "nan_weights" / "checkpoints").iterdir()) == []
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--learning-rate", "1e39"])  # torch cannot even hold it as float32
    assert "argument --learning-rate: the value must be <= 10" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------
# 5. Corruption is detected
# --------------------------------------------------------------------------------------------------------

def _flip_bit_in_tensor(path, record_suffix="/data/0"):
    """Flip one bit in the middle of a tensor's bytes inside a zip checkpoint; returns the offset."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(record_suffix))
    data = bytearray(path.read_bytes())
    name_len = int.from_bytes(data[info.header_offset + 26: info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28: info.header_offset + 30], "little")
    offset = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))
    return offset


def test_a_flipped_bit_in_a_checkpoint_is_an_error(voices, tmp_path, capsys):
    original = Path(voices["single"]["ckpt"])
    assert isinstance(ck.load_checkpoint(original)["vits_fast"]["tensor_sha256"], str)
    damaged = tmp_path / "model.ckpt"
    shutil.copy(original, damaged)
    shutil.copy(voices["single"]["config"], tmp_path / "config.json")
    _flip_bit_in_tensor(damaged)
    before = _snapshot(damaged)
    with pytest.raises(ck.CheckpointError, match="is corrupt: the SHA-256 of its tensors does not match"):
        ck.load_checkpoint(damaged)
    rc, out = _synth(["-m", damaged, "-o", tmp_path / "o.wav", "Hi"])
    assert rc == 1 and "is corrupt" in capsys.readouterr().err and not (tmp_path / "o.wav").exists()
    assert _snapshot(damaged) == before
    # A changed recorded checksum is caught the same way; Piper's checkpoints carry none and load as before.
    ckpt = ck.load_checkpoint(original)
    ckpt["vits_fast"]["tensor_sha256"] = "0" * 64
    torch.save(ckpt, tmp_path / "relabelled.ckpt")
    with pytest.raises(ck.CheckpointError, match="is corrupt"):
        ck.load_checkpoint(tmp_path / "relabelled.ckpt")
    piper = ck.load_checkpoint(voices["piper"]["ckpt"])
    assert "vits_fast" not in piper
    piper_copy = tmp_path / "piper.ckpt"
    shutil.copy(voices["piper"]["ckpt"], piper_copy)
    _flip_bit_in_tensor(piper_copy)  # no checksum to compare against: loads (as upstream would)
    assert ck.load_checkpoint(piper_copy).keys() == piper.keys()


# --------------------------------------------------------------------------------------------------------
# 6. Messages, not tracebacks
# --------------------------------------------------------------------------------------------------------

def test_user_errors_give_messages_not_tracebacks(corpus, cache_dir, voices, tmp_path, capsys):
    kw = tiny_model_kwargs(num_symbols=256)
    model = randomised(vits_fast.SynthesizerTrn(**kw))
    meta = tmp_path / "meta.ckpt"
    torch.save({"state_dict": {"model_g.enc_p.emb.weight": torch.empty(256, 16, device="meta")}}, meta)
    unknown = _save_voice(tmp_path / "unknown" / "model.ckpt", model, dict(kw, bogus_size=3))
    audio_key = tmp_path / "audio_key" / "model.ckpt"
    ck.save_checkpoint(audio_key, model, nn.Module(), [], [], 0, 0, {},
                       {"model_kwargs": kw, "audio": dict(AUDIO.to_dict(), hop_size=16)})
    single = voices["single"]["ckpt"]
    out = ["-o", tmp_path / "o.wav"]
    cases = {
        "binary stdin": ([single, *out], b"Hello\n\x89PNG\r\n\x1a\n", "standard input line 2: byte 0x89 at column 1 "
                                                                     "is not UTF-8 text"),
        "NUL on stdin": ([single, *out], b"Hel\x00lo\n", "standard input line 1: control byte 0x00 at column 4"),
        "output not wav": ([single, "-o", tmp_path / "o.mp3", "Hi"], b"", "its name must end in .wav"),
        "inf flag": ([single, *out, "--length-scale", "inf", "Hi"], b"", "--length-scale must be a finite number"),
        "directory checkpoint": ([tmp_path, *out, "Hi"], b"", f"checkpoint {tmp_path} is a directory"),
        "meta tensors": ([meta, *out, "Hi"], b"", "holds 1 meta tensor(s) (shapes without data), e.g. "
                                                  "state_dict.model_g.enc_p.emb.weight"),
        "unknown setting": ([unknown, *out, "Hi"], b"", "unknown model setting(s) ['bogus_size']"),
        "unknown audio setting": ([audio_key, *out, "Hi"], b"", "unknown audio setting(s) ['hop_size']"),
    }
    for name, (argv, stdin, message) in cases.items():
        capsys.readouterr()
        rc, stdout = _synth(["-m", *argv], stdin)
        err = capsys.readouterr().err
        assert rc == 1 and err.startswith("error: ") and message in err, (name, err)
        assert "Traceback" not in err and stdout == b"" and not (tmp_path / "o.wav").exists(), name
    capsys.readouterr()
    assert export.main(["onnx", str(tmp_path), str(tmp_path / "x.onnx")]) == 1
    assert "is a directory" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()

    # Training: zero/NaN numeric flags are usage messages (exit 2).
    for flag, value in (("--log-every", "0"), ("--keep-checkpoints", "0"), ("--grad-clip", "nan"),
                        ("--validation-split", "inf")):
        with pytest.raises(SystemExit) as exit_info:
            train.build_parser().parse_args([flag, value])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"argument {flag}: the value must be" in err, (flag, err)

    # Bad fields in a resumed checkpoint name the field; through the module entry point, a message, exit 1.
    good = tmp_path / "good" / "checkpoints"
    train.main(_args(corpus, cache_dir, good.parent, "--max-steps", "1"))
    base = ck.load_checkpoint(good / "last.ckpt")
    broken = {"epoch": (lambda c: c.update(epoch="three"), "epoch must be a non-negative integer, got 'three'"),
              "optimizer": (lambda c: c["optimizer_states"].reverse(), "its optimizer_states cannot be restored"),
              "rng": (lambda c: c["vits_fast"].update(rng={"torch": 5}), "its rng state cannot be restored")}
    for name, (damage, message) in broken.items():
        ckpt = ck.load_checkpoint(good / "last.ckpt")
        damage(ckpt)
        ckpt["vits_fast"]["tensor_sha256"] = ck.tensor_checksum(ckpt)
        path = tmp_path / f"{name}.ckpt"
        torch.save(ckpt, path)
        with pytest.raises(ck.CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
            train.main(_args(corpus, cache_dir, tmp_path / f"resume_{name}", "--resume", str(path)))
    assert base["global_step"] == 2 and ck.batches_done(base) == 1  # Lightning's count: 2 optimizer steps a batch
    proc = subprocess.run([sys.executable, "-m", "vits_fast.train",
                           *_args(corpus, cache_dir, tmp_path / "resume_cli", "--resume", str(tmp_path / "epoch.ckpt"))],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "epoch must be a non-negative integer, got 'three'" in proc.stderr
