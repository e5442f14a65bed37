"""`python -m vits_fast.train` on the embedded corpus: learning, exact resume, DDP, warm starts, failure modes.

Runs in-process on a 12-utterance subset of the corpus with the tiny preset, one CPU thread, no loader workers.
"""

import hashlib
import json
import logging
import os
import pathlib
import shutil
import socket
import sys
import types

import pytest
import torch

from vits_fast import checkpoint as ck
from vits_fast.train import step as step_lib
from vits_fast import train
from vits_fast.config import shrink_discriminator, tiny_model_kwargs
from vits_fast.data import CORPUS_DIR, DataError
from vits_fast.models import MultiPeriodDiscriminator, SynthesizerTrn

from tests._util import one_thread  # noqa: F401  (fixture)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """12 utterances (6 per speaker) of the embedded corpus, as an LJSpeech folder."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "wavs").mkdir()
    rows = (CORPUS_DIR / "metadata.csv").read_text(encoding="utf-8").splitlines()
    keep = [r for r in rows if int(r.split("|")[0].split("_")[1]) < 6]
    assert len(keep) == 12
    (root / "metadata.csv").write_text("\n".join(keep) + "\n", encoding="utf-8")
    for r in keep:
        name = r.split("|")[0]
        shutil.copy(CORPUS_DIR / "wavs" / f"{name}.flac", root / "wavs" / f"{name}.flac")
    shutil.copy(CORPUS_DIR / "config.json", root / "config.json")
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _args(corpus, cache_dir, out, *extra):
    return ["--dataset", str(corpus), "--cache-dir", str(cache_dir), "--output-dir", str(out), "--no-progress",
            "--num-workers", "0", "--batch-size", "4", "--validation-split", "0.17", "--num-test-examples", "1",
            "--log-every", "1", "--val-every", "1000", "--checkpoint-every", "1000", "--no-samples",
            "--quality", "tiny", *extra]


def _trainer(argv):
    t = train.Trainer(train.build_parser().parse_args(argv))
    t.setup()
    return t


def _digest(*modules):
    h = hashlib.sha256()
    for m in modules:
        for k, v in m.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_losses_finite_and_mel_loss_falls(corpus, cache_dir, tmp_path):
    t = _trainer(_args(corpus, cache_dir, tmp_path / "run", "--max-steps", "12", "--learning-rate", "1e-3"))
    assert t.sampler.batches_per_epoch() == 3  # 10 training items, batch 4
    everything = t.collate([t.train_set[i] for i in range(len(t.train_set))])  # all 10 training items

    def mel_loss():  # eval mode, fixed windows: the same measurement before and after
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(0)
            t.model_g.eval()
            _, y_mel, y_hat_mel, _ = step_lib.generator_pass(t.step_parts(), t.model_g, everything)
            t.model_g.train()
        return float(torch.nn.functional.l1_loss(y_mel, y_hat_mel)) * step_lib.C_MEL

    before = mel_loss()
    result = t.fit()
    after = mel_loss()
    assert result["global_step"] == 12 and result["epoch"] == 4
    for rec in result["history"]:
        assert all(torch.isfinite(torch.tensor(rec[k])) for k in step_lib.LOSS_NAMES), rec
    assert after < 0.95 * before, (before, after)  # 92.7 -> 81.2 here
    # schedulers stepped once per epoch
    assert t.optim_g.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.999875 ** 4)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert any("samples_per_s" in r and "s_per_step" in r for r in log)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_resume_is_bit_identical(corpus, cache_dir, tmp_path):
    full = train.main(_args(corpus, cache_dir, tmp_path / "full", "--max-steps", "5", "--checkpoint-every", "2"))
    mid = tmp_path / "full" / "checkpoints" / "epoch=0-step=2.ckpt"
    assert mid.is_file()
    resumed = train.main(_args(corpus, cache_dir, tmp_path / "resumed", "--max-steps", "5", "--resume", str(mid)))
    assert resumed["global_step"] == 5
    assert [r["loss_g"] for r in resumed["history"]] == [r["loss_g"] for r in full["history"][2:]]
    a = ck.load_checkpoint(tmp_path / "full" / "checkpoints" / "last.ckpt")
    b = ck.load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert a["epoch"] == b["epoch"] == 1 and a["global_step"] == b["global_step"] == 10  # 2 optimizer steps a batch
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    for oa, ob in zip(a["optimizer_states"], b["optimizer_states"]):
        for pid, st in oa["state"].items():
            for name, val in st.items():
                assert torch.equal(val, ob["state"][pid][name]), (pid, name)
    assert a["lr_schedulers"] == b["lr_schedulers"]


def _ddp_worker(rank, world, port, argv, out_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), VITS_FAST_KEEP_PG="1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    t = train.Trainer(train.build_parser().parse_args(argv))
    t.setup()
    result = t.fit()
    digest = _digest(t.model_g, t.model_d)
    with open(f"{out_file}.{rank}", "w") as f:
        json.dump({"digest": digest, "steps": result["global_step"], "loss": result["history"][-1]["loss_g"],
                   "indices": t.sampler.batches_per_epoch()}, f)
    dist.destroy_process_group()


def test_ddp_two_processes_keep_identical_parameters(corpus, cache_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = _args(corpus, cache_dir, tmp_path / "ddp", "--max-steps", "2", "--batch-size", "2")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, argv, str(tmp_path / "res")), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "res.0").read_text())
    r1 = json.loads((tmp_path / "res.1").read_text())
    assert r0["steps"] == r1["steps"] == 2
    assert r0["digest"] == r1["digest"]
    assert r0["loss"] != r1["loss"]  # each rank saw its own data
    assert r0["indices"] == r1["indices"] == 3  # 10 items / (2 per batch x 2 ranks), padded to equal counts
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["epoch=0-step=2.ckpt",
                                                                                  "last.ckpt"]


def _piper_ckpt(path, speakers=1):
    """A Piper/Lightning-style checkpoint of a tiny model: model_g./model_d. keys with legacy weight-norm names,
    hyper_parameters an AttributeDict (pickled from a module that is gone at load time) holding a PosixPath
    and an unknown class."""
    kw = tiny_model_kwargs(num_symbols=256, num_speakers=speakers, spec_channels=129, upsample_rates=(4, 4, 4),
                           upsample_kernel_sizes=(8, 8, 8), upsample_initial_channel=32, segment_size=16)
    torch.manual_seed(42)
    g = SynthesizerTrn(**kw)
    d = shrink_discriminator(MultiPeriodDiscriminator(), 16)
    names = ["pytorch_lightning", "pytorch_lightning.utilities", "pytorch_lightning.utilities.parsing"]
    mods = [types.ModuleType(n) for n in names]

    class AttributeDict(dict):
        pass

    class PhonemeType:
        def __init__(self, v):
            self.v = v

    AttributeDict.__module__ = PhonemeType.__module__ = names[-1]
    AttributeDict.__qualname__, PhonemeType.__qualname__ = "AttributeDict", "PhonemeType"
    mods[-1].AttributeDict, mods[-1].PhonemeType = AttributeDict, PhonemeType
    hp = AttributeDict(num_symbols=256, num_speakers=speakers, resblock="2", resblock_kernel_sizes=(3, 5),
                       resblock_dilation_sizes=((1, 2), (2, 6)), upsample_rates=(4, 4, 4),
                       upsample_initial_channel=32, upsample_kernel_sizes=(8, 8, 8), filter_length=256,
                       hop_length=64, win_length=256, mel_channels=40, sample_rate=16000, inter_channels=16,
                       hidden_channels=16, filter_channels=32, n_heads=2, n_layers=2, kernel_size=3, p_dropout=0.1,
                       gin_channels=kw["gin_channels"], use_sdp=True, segment_size=1024,
                       dataset=[pathlib.PosixPath("/home/piper/dataset.jsonl")], phoneme_type=PhonemeType("espeak"))
    state = {f"model_g.{k}": v for k, v in g.state_dict().items()}
    state.update({f"model_d.{k}": v for k, v in d.state_dict().items()})
    assert any(k.endswith(".weight_g") for k in state)
    saved = dict(sys.modules)
    sys.modules.update(zip(names, mods))
    try:
        torch.save({"epoch": 9, "global_step": 900, "pytorch-lightning_version": "1.7.7", "state_dict": state,
                    "hyper_parameters": hp, "optimizer_states": [], "lr_schedulers": []}, path)
    finally:
        for n in names:
            if n not in saved:
                del sys.modules[n]
    return g, d


def test_init_from_piper_checkpoint_single_to_multi_speaker(corpus, cache_dir, tmp_path, caplog):
    path = tmp_path / "piper.ckpt"
    g, d = _piper_ckpt(path, speakers=1)
    with caplog.at_level(logging.INFO, logger="vits_fast.train"):
        t = _trainer(_args(corpus, cache_dir, tmp_path / "ft", "--init-from", str(path)))
    assert "pytorch_lightning" not in sys.modules
    assert t.num_speakers == 2 and t.model_g.emb_g.weight.shape[0] == 2
    assert "single->multi-speaker warm start" in caplog.text
    src = g.state_dict()
    own = t.model_g.state_dict()
    cond = [k for k in own if k.startswith("emb_g.") or "cond" in k]
    assert cond and all(k not in src for k in cond)
    for k, v in src.items():
        assert torch.equal(own[k], v), k
    for k, v in d.state_dict().items():
        assert torch.equal(t.model_d.state_dict()[k], v), k
    losses, finite = step_lib.losses_of(t.train_step(next(iter(t._loader(t.train_set, t.sampler, 0)))))
    assert finite and all(torch.isfinite(torch.tensor(v)) for v in losses.values())


def test_init_from_refuses_malicious_checkpoint(corpus, cache_dir, tmp_path):
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": Evil()}, path)
    with pytest.raises(ck.UnsafeCheckpointError, match="evil.ckpt"):
        train.main(_args(corpus, cache_dir, tmp_path / "x", "--init-from", str(path)))
    truncated = tmp_path / "cut.ckpt"
    _piper_ckpt(tmp_path / "whole.ckpt")
    truncated.write_bytes((tmp_path / "whole.ckpt").read_bytes()[:5000])
    with pytest.raises(ck.CheckpointError, match="cut.ckpt.*truncated or corrupt"):
        train.main(_args(corpus, cache_dir, tmp_path / "y", "--init-from", str(truncated)))
    assert not marker.exists()


def test_nonfinite_loss_is_skipped_or_stops(corpus, cache_dir, tmp_path, monkeypatch):
    real_kl = step_lib.kl_loss
    calls = {"n": 0}

    def kl_nan_on_second_call(*args):
        calls["n"] += 1
        out = real_kl(*args)
        return out * float("nan") if calls["n"] == 2 else out

    monkeypatch.setattr(step_lib, "kl_loss", kl_nan_on_second_call)
    t = _trainer(_args(corpus, cache_dir, tmp_path / "skip", "--max-steps", "1"))
    batches = iter(t._loader(t.train_set, t.sampler, 0))
    t.train_step(next(batches))
    before = _digest(t.model_g, t.model_d)
    adam_steps = [s["step"].item() for s in t.optim_g.state.values()][:1]
    losses, finite = step_lib.losses_of(t.train_step(next(batches)))  # the update was skipped on the device
    assert not finite and not torch.isfinite(torch.tensor(losses["loss_kl"]))
    t._account(losses, finite, step=2, epoch=0)  # the trainer's bookkeeping once the losses are read
    assert _digest(t.model_g, t.model_d) == before  # nothing trained on the NaN
    assert [s["step"].item() for s in t.optim_g.state.values()][:1] == adam_steps
    assert all(p.grad is None for p in t.model_g.parameters())
    log = (tmp_path / "skip" / "train_log.jsonl").read_text()
    assert '"event": "nonfinite"' in log

    calls["n"] = 0
    t2 = _trainer(_args(corpus, cache_dir, tmp_path / "stop", "--max-steps", "3", "--on-nonfinite", "stop"))
    with pytest.raises(train.NonFiniteLossError, match="step 2"):
        t2.fit()


def test_bf16_and_grad_clip_step(corpus, cache_dir, tmp_path):
    t = _trainer(_args(corpus, cache_dir, tmp_path / "bf16", "--precision", "bf16", "--grad-clip", "1.0"))
    losses, finite = step_lib.losses_of(t.train_step(next(iter(t._loader(t.train_set, t.sampler, 0)))))
    assert finite and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert all(p.dtype == torch.float32 for p in t.model_g.parameters())


def test_bad_items_fail_flag_and_skip(corpus, cache_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(corpus, broken)
    rows = (broken / "metadata.csv").read_text(encoding="utf-8").splitlines()
    rows.append("ghost_001|adam|There is no audio for this line.|1 0 20 0 2")
    (broken / "metadata.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="ghost_001.*audio file not found"):
        train.main(_args(broken, cache_dir, tmp_path / "f", "--on-bad-item", "fail", "--max-steps", "1"))
    t = _trainer(_args(broken, cache_dir, tmp_path / "s", "--max-steps", "1", "--max-phoneme-ids", "90"))
    assert [b.id for b in t.bad_items] == ["ghost_001"]
    assert t.filtered_items and all("max-phoneme-ids" in b.reason for b in t.filtered_items)
    assert "ghost_001" in (tmp_path / "s" / "bad_items.tsv").read_text()


def test_default_run_writes_checkpoint_and_sample(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = train.main(["--max-steps", "1", "--no-progress"])  # everything else: the no-argument defaults
    out = tmp_path / "runs" / "default"
    assert result["global_step"] == 1 and (out / "checkpoints" / "last.ckpt").is_file()
    wavs = list((out / "samples").rglob("*.wav"))
    assert wavs
    import soundfile as sf

    audio, rate = sf.read(str(wavs[0]))
    assert rate == 16000 and audio.size > 0
    ckpt = ck.load_checkpoint(out / "checkpoints" / "last.ckpt")
    hp = ckpt["hyper_parameters"]
    assert hp["num_speakers"] == 2 and hp["sample_rate"] == 16000 and hp["hop_length"] == 64
    config = json.loads((out / "config.json").read_text())
    assert config["num_speakers"] == 2 and config["audio"]["sample_rate"] == 16000
    assert config["audio"]["quality"] == "tiny" and config["num_symbols"] == hp["num_symbols"]
    assert config["inference"] == {"noise_scale": 0.667, "length_scale": 1, "noise_w": 0.8}
    assert config["speaker_id_map"] and config["phoneme_id_map"] and config["piper_version"]


def test_compile_flag_trains_like_eager(corpus, cache_dir, tmp_path):
    """--compile compiles the decoder and discriminator (checked through the backend that only traces, since
    inductor takes minutes per graph on a CPU); losses equal the eager run's, and checkpoints keep their keys."""
    from torch._dynamo.utils import counters

    eager = train.main(_args(corpus, cache_dir, tmp_path / "eager", "--max-steps", "2"))
    counters.clear()
    compiled = train.main(_args(corpus, cache_dir, tmp_path / "compiled", "--max-steps", "2", "--compile", "default",
                                "--compile-backend", "aot_eager"))
    assert counters["stats"]["unique_graphs"] >= 2  # decoder and discriminator graphs were compiled
    for a, b in zip(compiled["history"], eager["history"]):
        for k in step_lib.LOSS_NAMES:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    a = ck.load_checkpoint(tmp_path / "compiled" / "checkpoints" / "last.ckpt")["state_dict"]
    b = ck.load_checkpoint(tmp_path / "eager" / "checkpoints" / "last.ckpt")["state_dict"]
    assert a.keys() == b.keys()
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--compile", "sometimes"])
