"""``python -m vits_fast.synthesize``: outputs, batch == single, streaming, voice conversion and clear errors.

The CLI runs in-process through ``main(argv, stdin=..., stdout=...)``; one subprocess run checks the module entry.
"""

import io
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

import vits_fast
from vits_fast import checkpoint as ckpt_lib
from vits_fast import inference as inf
from vits_fast.config import AudioConfig, tiny_model_kwargs
from vits_fast.data import Phonemizer, load_audio
from vits_fast.voice_config import default_phoneme_id_map
from vits_fast.synthesize import main

AUDIO = AudioConfig(sample_rate=16000, filter_length=128, hop_length=16, win_length=128)
SPEAKERS = {"alice": 0, "bob": 1, "carol": 2}
ZERO = ["--noise-scale", "0", "--noise-w", "0"]
LSB = 1.0 / 32767


from tests._util import one_thread, randomised as _randomised  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(num_speakers, **extra):
    cfg = {"audio": {"sample_rate": 16000}, "espeak": {"voice": "en-us"},
           "inference": {"noise_scale": 0.667, "length_scale": 1, "noise_w": 0.8}, "phoneme_type": "text",
           "phoneme_map": {}, "phoneme_id_map": default_phoneme_id_map(), "num_symbols": 256,
           "num_speakers": num_speakers, "speaker_id_map": SPEAKERS if num_speakers > 1 else {}}
    cfg.update(extra)
    return cfg


@pytest.fixture(scope="module")
def voices(tmp_path_factory):
    """Our checkpoints (single: recorded model kwargs, 3 speakers: Piper hyper-parameters) with config.json
    beside them, and a Piper-layout .ckpt."""
    root = tmp_path_factory.mktemp("voices")
    out = {}
    for name, ns in (("single", 1), ("multi", 3)):
        kw = tiny_model_kwargs(num_symbols=256, num_speakers=ns)
        model = _randomised(vits_fast.SynthesizerTrn(**kw), seed=ns)
        folder = root / name
        folder.mkdir()
        if ns == 1:  # built from the exact kwargs our training records (no Piper hyper-parameters)
            hp, extra = {}, {"model_kwargs": kw, "audio": AUDIO.to_dict()}
        else:
            hp, extra = ckpt_lib.piper_hyper_parameters(kw, AUDIO, num_speakers=ns, training={}), None
        ckpt_lib.save_checkpoint(folder / "model.ckpt", model, nn.Module(), [], [], 0, 0, hp, extra)
        (folder / "config.json").write_text(json.dumps(_config(ns)))
        out[name] = dict(ckpt=str(folder / "model.ckpt"), config=str(folder / "config.json"), model=model)
    # Piper's layout: <dir>/lightning_logs/version_0/checkpoints/*.ckpt, config.json in <dir>; its
    # hyper_parameters hold a PosixPath (torch.load with weights_only needs the allow-list for it).
    kw = tiny_model_kwargs(num_symbols=256, num_speakers=3)
    model = _randomised(vits_fast.SynthesizerTrn(**kw), seed=7)
    hp = ckpt_lib.piper_hyper_parameters(kw, AUDIO, num_speakers=3, training={})
    hp["dataset"] = [pathlib.PosixPath("/data/piper/dataset.jsonl")]
    piper_dir = root / "piper"
    ckpt_dir = piper_dir / "lightning_logs" / "version_0" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    torch.save({"epoch": 3, "global_step": 30, "pytorch-lightning_version": "1.7.7", "hyper_parameters": hp,
                "state_dict": {f"model_g.{k}": v for k, v in model.state_dict().items()},
                "optimizer_states": [], "lr_schedulers": []}, ckpt_dir / "epoch=3-step=30.ckpt")
    (piper_dir / "config.json").write_text(json.dumps(_config(3)))
    out["piper"] = dict(ckpt=str(ckpt_dir / "epoch=3-step=30.ckpt"), model=model)
    # A bare generator state dict of a non-preset architecture: nothing says how to build it.
    torch.save(out["single"]["model"].state_dict(), root / "bare.pt")
    out["bare"] = dict(ckpt=str(root / "bare.pt"))
    return out


def _run(argv, stdin=""):
    stdout = io.BytesIO()
    rc = main([str(a) for a in argv], stdin=io.StringIO(stdin), stdout=stdout)
    return rc, stdout.getvalue()


def _expected(model, texts, speaker=None):
    """Zero-noise audio of each text, synthesised one at a time through the library, as int16-quantised floats."""
    phonemize = Phonemizer(id_map=default_phoneme_id_map(), force_characters=True)  # the voices are "text"
    synth = inf.Synthesizer(model)
    out = []
    for text in texts:
        audio = synth.synthesize_ids(phonemize(text), speaker, noise_scale=0.0, noise_scale_w=0.0).numpy()
        out.append(np.round(np.clip(audio, -1, 1) * 32767) / 32767)
    return out


def _read(path):
    audio, rate = sf.read(str(path), dtype="float32")
    assert rate == 16000 and sf.info(str(path)).subtype == "PCM_16"
    return audio


def test_text_argument_to_wav(voices, tmp_path):
    rc, _ = _run(["-m", voices["single"]["ckpt"], "-o", tmp_path / "a.wav", *ZERO, "Hello, world!"])
    assert rc == 0
    audio = _read(tmp_path / "a.wav")
    (expected,) = _expected(voices["single"]["model"], ["Hello, world!"])
    assert audio.shape == expected.shape and audio.size % 16 == 0 and np.abs(audio).max() > 1e-3
    np.testing.assert_allclose(audio, expected, atol=1.5 * LSB, rtol=0)


def test_text_file_batch_equals_single(voices, tmp_path):
    lines = ["The first line.", "", "A second, longer line of text here.", "  third  ", "4th"]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    rc, _ = _run(["-m", voices["multi"]["ckpt"], "-f", tmp_path / "in.txt", "-d", tmp_path / "out",
                  "--speaker", "carol", "--batch-size", "2", *ZERO])
    assert rc == 0
    texts = [line.strip() for line in lines if line.strip()]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{i:04d}.wav" for i in range(len(texts))]
    for i, expected in enumerate(_expected(voices["multi"]["model"], texts, speaker=SPEAKERS["carol"])):
        np.testing.assert_allclose(_read(tmp_path / "out" / f"{i:04d}.wav"), expected, atol=1.5 * LSB, rtol=0)


def test_stdin_raw_and_stream(voices):
    text = "Streaming test one.\nAnd two.\n"
    rc, raw = _run(["-m", voices["multi"]["ckpt"], "--output-raw", "--speaker", "1", *ZERO], stdin=text)
    assert rc == 0
    expected = np.concatenate(_expected(voices["multi"]["model"], text.split("\n")[:2], speaker=1))
    np.testing.assert_allclose(np.frombuffer(raw, "<i2") / 32767, expected, atol=1.5 * LSB, rtol=0)
    rc, streamed = _run(["-m", voices["multi"]["ckpt"], "--output-raw", "--stream", "--speaker", "bob",
                         "--chunk-frames", "5", "--first-chunk-frames", "2", *ZERO], stdin=text)
    assert rc == 0 and len(streamed) == len(raw)
    assert np.abs(np.frombuffer(streamed, "<i2").astype(int) - np.frombuffer(raw, "<i2")).max() <= 1


def test_phoneme_ids_input_and_piper_checkpoint(voices, tmp_path):
    """A Piper-layout .ckpt (config.json three folders up) with pre-phonemised input."""
    ids = [1, 0, 20, 0, 18, 0, 24, 0, 2]
    rc, raw = _run(["-m", voices["piper"]["ckpt"], "--phoneme-ids", "--output-raw", "--speaker", "alice", *ZERO],
                   stdin=" ".join(map(str, ids)) + "\n" + ",".join(map(str, ids[::-1])) + "\n")
    assert rc == 0
    synth = inf.Synthesizer(voices["piper"]["model"])
    expected = np.concatenate([synth.synthesize_ids(s, 0, noise_scale=0.0, noise_scale_w=0.0).numpy()
                               for s in (ids, ids[::-1])])
    np.testing.assert_allclose(np.frombuffer(raw, "<i2") / 32767, expected, atol=1.5 * LSB, rtol=0)


def test_scales_default_to_the_config(voices, tmp_path):
    """The config's ``inference`` section sets the defaults; flags override them."""
    zero_cfg = tmp_path / "zero.json"
    zero_cfg.write_text(json.dumps(_config(1, inference={"noise_scale": 0.0, "length_scale": 1.4, "noise_w": 0.0})))
    rc, by_config = _run(["-m", voices["single"]["ckpt"], "-c", zero_cfg, "--output-raw", "Scales."])
    assert rc == 0
    rc, by_flags = _run(["-m", voices["single"]["ckpt"], "--output-raw", "--length-scale", "1.4", *ZERO, "Scales."])
    assert rc == 0 and by_config == by_flags
    rc, other = _run(["-m", voices["single"]["ckpt"], "-c", zero_cfg, "--output-raw", "--length-scale", "1",
                      "Scales."])
    assert rc == 0 and len(other) < len(by_config)


def test_skip_unknown_symbols(voices, tmp_path):
    rc, raw = _run(["-m", voices["single"]["ckpt"], "--output-raw", "--skip-unknown", *ZERO, "Hi 日本 there"])
    rc2, plain = _run(["-m", voices["single"]["ckpt"], "--output-raw", *ZERO, "Hi  there"])
    assert rc == rc2 == 0 and raw == plain


def test_voice_conversion(voices, tmp_path):
    g = np.random.default_rng(0)
    src = tmp_path / "in" / "utt.wav"
    src.parent.mkdir()
    sf.write(str(src), (g.standard_normal(1600) * 0.2).astype(np.float32), 8000)  # 0.2 s at 8 kHz
    rc, _ = _run(["-m", voices["multi"]["ckpt"], "--convert", src, "--from-speaker", "alice", "--to-speaker", "bob",
                  "-d", tmp_path / "out", "--seed", "3"])
    assert rc == 0
    converted = _read(tmp_path / "out" / "utt.wav")
    audio = load_audio(src, 16000)  # resampled to the voice's rate, as the CLI does
    assert audio.size == 3200 and converted.size == (audio.size // 16) * 16
    torch.manual_seed(3)
    expected = inf.Synthesizer(voices["multi"]["model"]).convert(torch.from_numpy(audio), AUDIO, 0, 1).numpy()
    np.testing.assert_allclose(converted, np.clip(expected, -1, 1), atol=1.5 * LSB, rtol=0)


def _error_cases(v, tmp):
    single, multi = v["single"]["ckpt"], v["multi"]["ckpt"]
    (tmp / "wav").mkdir(exist_ok=True)
    sf.write(str(tmp / "wav" / "x.wav"), np.zeros(800, np.float32), 16000)
    (tmp / "wrong.json").write_text(json.dumps(_config(1)))
    out = ["-o", tmp / "o.wav"]
    return {
        "unknown speaker": ([multi, *out, "--speaker", "dave", "Hi"], "", "unknown speaker 'dave'; this voice's "
                                                                          "speakers are: alice, bob, carol"),
        "speaker out of range": ([multi, *out, "--speaker", "5", "Hi"], "", "speaker id 5 is out of range"),
        "speaker on single": ([single, *out, "--speaker", "bob", "Hi"], "", "single speaker"),
        "unknown symbols": ([single, *out, "Hi 日本"], "", "symbol(s) '日' '本' are not in the voice's "
                                                           "phoneme_id_map"),
        "id outside vocabulary": ([single, *out, "--phoneme-ids", "1 0 256 0 2"], "",
                                  "phoneme id 256 is outside the model's vocabulary"),
        "not ids": ([single, *out, "--phoneme-ids", "1 0 x"], "", "not a list of phoneme ids"),
        "empty text": ([single, *out, "   "], "", "the text is empty"),
        "empty stdin": ([single, *out], "\n  \n", "the input is empty"),
        "missing checkpoint": ([tmp / "nope.ckpt", *out, "Hi"], "", "nope.ckpt does not exist"),
        "missing config": ([single, "-c", tmp / "nope.json", *out, "Hi"], "", "nope.json does not exist"),
        "config of another voice": ([multi, "-c", tmp / "wrong.json", *out, "Hi"], "", "do not belong together"),
        "unbuildable checkpoint": ([v["bare"]["ckpt"], "-c", v["single"]["config"], *out, "Hi"], "",
                                   "cannot tell how to build the model"),
        "missing text file": ([single, "-f", tmp / "nope.txt", *out], "", "nope.txt does not exist"),
        "two utterances to one file": ([single, *out, "One\nTwo"], "", "there are 2 utterances"),
        "no output": ([single, "Hi"], "", "choose exactly one of --output"),
        "stream to file": ([single, *out, "--stream", "Hi"], "", "--stream"),
        "bad length scale": ([single, *out, "--length-scale", "0", "Hi"], "", "--length-scale must be > 0"),
        "convert single speaker": ([single, "--convert", tmp / "wav" / "x.wav", "--from-speaker", "0",
                                    "--to-speaker", "0", *out], "", "needs a multi-speaker model"),
        "convert missing audio": ([multi, "--convert", tmp / "none.wav", "--from-speaker", "0", "--to-speaker", "1",
                                   *out], "", "none.wav does not exist"),
        "convert without target": ([multi, "--convert", tmp / "wav" / "x.wav", "--from-speaker", "0", *out], "",
                                   "needs --from-speaker and --to-speaker"),
        "convert over its input": ([multi, "--convert", tmp / "wav" / "x.wav", "--from-speaker", "0",
                                    "--to-speaker", "1", "-d", tmp / "wav"], "", "refusing to overwrite"),
    }


def test_errors_are_clear(voices, tmp_path, capsys):
    for name, (argv, stdin, message) in _error_cases(voices, tmp_path).items():
        capsys.readouterr()
        rc, stdout = _run(["-m", *argv], stdin=stdin)
        err = capsys.readouterr().err
        assert rc == 1, f"{name}: exit status {rc}"
        assert message in err and err.startswith("error: "), f"{name}: {err!r}"
        assert not (tmp_path / "o.wav").exists() and stdout == b"", name


def test_module_entry_point_subprocess(voices, tmp_path):
    out = tmp_path / "sub.wav"
    proc = subprocess.run([sys.executable, "-m", "vits_fast.synthesize", "-m", voices["single"]["ckpt"], "-o",
                           str(out), "Hello."], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert _read(out).size > 0
