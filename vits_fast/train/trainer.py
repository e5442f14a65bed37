"""The training loop of :mod:`vits_fast.train`: :class:`Trainer` builds the models, data, optimizers and
checkpoints of one run and runs :func:`vits_fast.train.step.train_step` until the run's end."""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.nn import functional as F

from .. import checkpoint as ckpt_lib
from ..backend import describe as describe_backend
from ..config import (TINY_AUDIO, TINY_DISCRIMINATOR_DIVISOR, TINY_SEGMENT_SAMPLES, AudioConfig,
                      model_kwargs as preset_model_kwargs, shrink_discriminator, tiny_preset_kwargs)
from ..convert import load_checkpoint_or_voice
from ..data import (CORPUS_DIR, Batch, BucketBatchSampler, Collate, DataError, Phonemizer, TTSDataset, prepare_items,
                    read_dataset, report_problems, split_items)
from ..guards import OverwriteError, refuse_overwrite, same_file
from ..losses import kl_loss
from ..models import MultiPeriodDiscriminator, SynthesizerTrn
from ..voice_config import (DEFAULT_LENGTH_SCALE, DEFAULT_NOISE_SCALE, DEFAULT_NOISE_SCALE_W, default_phoneme_id_map,
                            make_voice_config, write_voice_config)
from .log import RunLog
from .step import (C_KL, C_MEL, DeferredRead, StepOutput, StepParts, adamw, compile_fixed_shape_parts, generator_pass,
                   train_step)

_LOGGER = logging.getLogger("vits_fast.train")


class NonFiniteLossError(RuntimeError):
    """A loss became NaN/inf and ``--on-nonfinite stop`` was chosen (or too many updates were skipped)."""


def dist_info() -> Tuple[int, int, int]:
    """(world size, rank, local rank) from torchrun's environment; (1, 0, 0) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return world, rank, local


def _discriminator_divisor(d_state: Dict[str, torch.Tensor], default: int) -> int:
    """Channel divisor of a saved discriminator (Piper's first period conv has 32 output channels)."""
    for key in ("discriminators.1.convs.0.weight_v", "discriminators.1.convs.0.weight",
                "discriminators.1.convs.0.parametrizations.weight.original1"):
        if key in d_state:
            return max(1, 32 // int(d_state[key].shape[0]))
    return default


def _default_sample_rate(quality: Optional[str]) -> int:
    """Sample rate when neither ``--sample-rate``, the dataset nor a checkpoint gives one: Piper's x-low voices
    (and the tiny demo preset) are 16 kHz, the others 22.05 kHz."""
    return 16000 if quality in ("tiny", "x-low") else 22050


def _set_requires_grad(module: torch.nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


class Trainer:
    """Everything for one run; :func:`main` builds it from the command line and calls :meth:`fit`."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.world, self.rank, self.local_rank = dist_info()
        self.distributed = self.world > 1
        self.is_main = self.rank == 0
        if args.device is None:
            args.device = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(args.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.distributed and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=args.dist_timeout_min))
        self.demo = args.dataset is None
        if self.demo:
            args.dataset = CORPUS_DIR
        self.out = Path(args.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self._check_outputs()  # before anything is written
        if self.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.log = RunLog(self.out / "train_log.jsonl" if self.is_main else None)
        self.history: List[Dict[str, Any]] = []
        self.nonfinite_skipped = 0
        self.written: List[Path] = []  # step checkpoints this run wrote, oldest first (the only ones rotated)

    def _check_outputs(self) -> None:
        """Refuse (:class:`vits_fast.guards.OverwriteError`) a fresh run into a folder holding another run's
        checkpoints without ``--overwrite``, and any output file that is one of the run's inputs."""
        args = self.args
        resume = self._resolve_resume()
        existing = sorted(p.name for p in self.ckpt_dir.glob("*.ckpt")) if self.ckpt_dir.is_dir() else []
        continuing = resume is not None and same_file(resume.parent, self.ckpt_dir)
        if existing and not continuing and not args.overwrite:
            shown = ", ".join(existing[:4]) + (" ..." if len(existing) > 4 else "")
            raise OverwriteError(
                f"{self.ckpt_dir} already holds the checkpoints of another run ({shown}); nothing was written. "
                f"Continue that run with --resume auto (or --resume PATH), start afresh there with --overwrite "
                f"(files of the same name, such as last.ckpt, are replaced; its other checkpoints are kept), or "
                f"choose another --output-dir")
        if args.init_from is not None and same_file(Path(args.init_from).parent, self.ckpt_dir):
            raise OverwriteError(f"--init-from {args.init_from} is inside this run's checkpoint folder, where the run "
                                 f"writes its own checkpoints; copy it elsewhere or choose another --output-dir")
        data = Path(args.dataset)
        folder = data.parent if data.is_file() else data
        inputs = [data, folder / "config.json", folder / "metadata.csv", folder / "dataset.jsonl", args.init_from]
        outputs = [self.out / name for name in ("config.json", "train_log.jsonl", "bad_items.tsv")]
        refuse_overwrite(outputs + [self.ckpt_dir / "last.ckpt"], inputs)

    # -- setup -------------------------------------------------------------------------------------------
    def _resolve_resume(self) -> Optional[Path]:
        r = self.args.resume
        if r is None:
            return None
        if r == "auto":
            last = self.ckpt_dir / "last.ckpt"
            return last if last.is_file() else None
        return Path(r)

    def setup(self) -> None:
        args = self.args
        resume_path = self._resolve_resume()
        self.resume_ckpt = ckpt_lib.load_checkpoint(resume_path) if resume_path is not None else None
        init_ckpt = load_checkpoint_or_voice(args.init_from) if args.init_from is not None else None
        source_ckpt = self.resume_ckpt if self.resume_ckpt is not None else init_ckpt

        items, bad, info = read_dataset(args.dataset, single_speaker=args.single_speaker)
        num_speakers = info.num_speakers
        quality = args.quality or ("tiny" if self.demo else "medium")

        # Architecture and audio settings: a checkpoint's (exact) > the preset.
        from_ckpt = self._architecture_from(source_ckpt, resume_path or args.init_from) if source_ckpt else None
        if from_ckpt is not None:
            kwargs, audio, ckpt_quality = from_ckpt
            if args.quality is not None and ckpt_quality is not None and args.quality != ckpt_quality:
                _LOGGER.warning("--quality %s ignored: the checkpoint is %s", args.quality, ckpt_quality)
            quality = ckpt_quality or quality
        else:
            sample_rate = args.sample_rate or info.sample_rate or _default_sample_rate(quality)
            num_symbols = int(info.num_symbols or 256)
            if quality == "tiny":
                audio = replace(TINY_AUDIO, sample_rate=sample_rate)
                kwargs = tiny_preset_kwargs(num_symbols, num_speakers, audio,
                                            args.segment_size or TINY_SEGMENT_SAMPLES)
            else:
                audio = AudioConfig(sample_rate=sample_rate)
                kwargs = preset_model_kwargs(quality, num_symbols, num_speakers,
                                             segment_size=args.segment_size or 8192, audio=audio)
        if args.sample_rate and args.sample_rate != audio.sample_rate:
            audio = replace(audio, sample_rate=args.sample_rate)
        if info.sample_rate and info.sample_rate != audio.sample_rate and self.is_main:
            _LOGGER.warning("dataset config says %d Hz; training at %d Hz (audio is resampled)",
                            info.sample_rate, audio.sample_rate)
        # Speakers follow the dataset (warm start adapts the checkpoint's conditioning, see _init_weights).
        if self.resume_ckpt is None:
            kwargs["n_speakers"] = num_speakers
            if num_speakers > 1 and kwargs.get("gin_channels", 0) <= 0:
                kwargs["gin_channels"] = 8 if quality == "tiny" else 512
            if num_speakers <= 1:
                kwargs["gin_channels"] = 0
        elif kwargs["n_speakers"] != num_speakers and not (kwargs["n_speakers"] >= num_speakers > 1):
            raise DataError(f"--resume: the checkpoint has {kwargs['n_speakers']} speaker(s), the dataset "
                            f"{num_speakers}; use --init-from to warm start on a different speaker set")
        # Sizes from the dataset config (vocabulary, speakers) or the checkpoint, bounded before allocation.
        ckpt_lib.check_model_config(kwargs, audio, name=f"the model for {args.dataset}")
        self.quality, self.audio, self.model_kwargs, self.info = quality, audio, kwargs, info
        self.num_speakers = kwargs["n_speakers"]

        # Data (rank 0 builds the cache, the others wait and then read it).
        self._setup_data(items, bad)

        # Models.
        torch.manual_seed(args.seed)
        self.model_g = SynthesizerTrn(**kwargs).to(self.device)
        self.model_d = MultiPeriodDiscriminator()
        divisor = TINY_DISCRIMINATOR_DIVISOR if quality == "tiny" else 1
        if source_ckpt is not None:
            divisor = _discriminator_divisor(ckpt_lib.discriminator_state(source_ckpt)[0], divisor)
        if divisor > 1:
            shrink_discriminator(self.model_d, divisor)
        self.model_d.to(self.device)
        if self.resume_ckpt is None and init_ckpt is not None:
            self._init_weights(init_ckpt, args.init_from)
        self._source_conventions(source_ckpt, resume_path or args.init_from)
        hp = self.source_hp
        self.optim_g = adamw(self.model_g.parameters(), self.device, lr=args.learning_rate)
        # The discriminator's own settings where the source has them (piper1-gpl: 1e-4, (0.5, 0.9), 0.9999);
        # rhasspy Piper and fresh runs use the generator's.
        self.optim_d = adamw(self.model_d.parameters(), self.device, lr=float(hp.get("learning_rate_d", args.learning_rate)),
                             betas=tuple(float(b) for b in hp.get("betas_d", (0.8, 0.99))))
        self.sched_g = torch.optim.lr_scheduler.ExponentialLR(self.optim_g, gamma=args.lr_decay)
        self.sched_d = torch.optim.lr_scheduler.ExponentialLR(self.optim_d, gamma=float(hp.get("lr_decay_d", args.lr_decay)))
        self.amp_dtype = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}[args.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.precision == "16")
        self.epoch, self.global_step, self.batch_in_epoch = 0, 0, 0
        if self.resume_ckpt is not None:
            self._restore(self.resume_ckpt, resume_path)
        else:
            torch.manual_seed(args.seed + self.rank)
        compile_fixed_shape_parts(self.model_g, self.model_d, args.compile, args.compile_backend)
        self.g_train, self.d_train = self.model_g, self.model_d
        if self.distributed:
            self._wrap_ddp()
        if self.is_main:
            self._write_voice_config()

    def _source_conventions(self, ckpt: Optional[Dict[str, Any]], path: Any) -> None:
        """Keep the conventions of the trainer that wrote ``ckpt`` (see README, "Checkpoints across trainers"):
        its hyper-parameters (all written back), Lightning version and loop layout, learning-rate schedule, and
        any ``state_dict`` part vits_fast does not train (``model_mrd.*``: kept untouched)."""
        origin = ckpt_lib.checkpoint_origin(ckpt) if ckpt is not None else "fresh"
        extra = ckpt.get("vits_fast") if origin == "vits_fast" else None
        hp = ckpt_lib.to_plain(ckpt.get("hyper_parameters") or {}) if ckpt is not None else {}
        self.source_hp: Dict[str, Any] = dict(hp) if isinstance(hp, dict) else {}
        if origin in ("lightning1", "lightning2") or (extra is not None and "optimizer_steps_per_batch" in extra):
            self.lightning_version = str(ckpt["pytorch-lightning_version"])
        else:  # fresh, bare, or a vits_fast file from before the Lightning step convention (it claimed 1.7.7)
            self.lightning_version = ckpt_lib.LIGHTNING_VERSION
        # piper1-gpl optimizes manually under Lightning 2, which then never steps its schedulers: constant rates.
        recorded = extra.get("lr_schedule") if extra is not None else None
        self.lr_schedule = recorded if recorded in ("per_epoch", "none") else (
            "none" if origin == "lightning2" else "per_epoch")
        state = (ckpt.get("state_dict") if ckpt is not None else None) or {}
        self.kept_state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and "." in k
                           and not k.startswith(("model_g.", "model_d."))}
        # piper1-gpl's discriminator optimizer also steps model_mrd: its share of that state is kept beside ours
        # (moments only when resuming; fine-tuning starts every optimizer afresh).
        self.kept_d_optimizer: Optional[Dict[str, Any]] = None
        opt_d = ckpt_lib.discriminator_state(ckpt)[1] if ckpt is not None and self.kept_state else None
        n_d = len(list(self.model_d.parameters()))
        if isinstance(opt_d, dict) and len(opt_d.get("param_groups") or []) == 1 and \
                len(opt_d["param_groups"][0].get("params", [])) > n_d:
            self.d_optimizer_head, self.kept_d_optimizer = ckpt_lib.split_optimizer_state(opt_d, n_d)
            if ckpt is not self.resume_ckpt:
                self.kept_d_optimizer["state"] = {}
        if self.is_main and ckpt is not None:
            _LOGGER.info("%s: written by %s (Lightning %s); learning-rate schedule: %s", path, origin,
                         ckpt.get("pytorch-lightning_version"), self.lr_schedule)
            if self.kept_state:
                parts = sorted({k.split(".", 1)[0] for k in self.kept_state})
                _LOGGER.warning("%s: %s (%d tensors) is not trained by vits_fast; it is written back unchanged",
                                path, ", ".join(parts), len(self.kept_state))

    def _architecture_from(self, ckpt: Dict[str, Any], path: Any) -> Tuple[Dict[str, Any], AudioConfig, Optional[str]]:
        """Model kwargs, audio settings and quality of a checkpoint (see
        :func:`vits_fast.checkpoint.model_config_from_checkpoint`); a checkpoint that records no sample rate gets
        ``--sample-rate``, else :func:`_default_sample_rate` of its quality."""
        kw, audio, quality = ckpt_lib.model_config_from_checkpoint(
            ckpt, name=str(path),
            default_sample_rate=lambda q: self.args.sample_rate or _default_sample_rate(q))
        if self.is_main:
            _LOGGER.info("%s: quality %s, %d symbols, %d speaker(s)", path, quality or "custom", kw["n_vocab"],
                         kw["n_speakers"])
        return kw, audio, quality

    def _init_weights(self, ckpt: Dict[str, Any], path: Path) -> None:
        g, d = ckpt_lib.generator_state(ckpt)
        arch = ckpt_lib.infer_architecture(g)
        n_target = self.model_kwargs["n_speakers"]
        note = None
        if arch["num_speakers"] > 1 and n_target <= 1:
            g, dropped = ckpt_lib.drop_speaker_conditioning(g)
            note = f"multi->single-speaker warm start: dropped {len(dropped)} speaker-conditioning tensor(s)"
        elif arch["num_speakers"] <= 1 and n_target > 1:
            g, dropped = ckpt_lib.drop_speaker_conditioning(g)
            note = (f"single->multi-speaker warm start: the speaker embedding emb_g and the conditioning layers "
                    f"(dec.cond, dp.cond, *.cond_layer) start fresh for {n_target} speakers")
        elif arch["num_speakers"] > 1 and arch["num_speakers"] != n_target:
            dropped = [k for k in g if k.startswith("emb_g.")]
            g = {k: v for k, v in g.items() if not k.startswith("emb_g.")}
            note = (f"speaker count {arch['num_speakers']} -> {n_target}: dropped emb_g ({len(dropped)} tensor), "
                    f"kept the conditioning layers")
        d = ckpt_lib.discriminator_state(ckpt)[0]
        left = ckpt_lib.load_weights(self.model_g, g, f"{path} (generator)")
        if d:
            ckpt_lib.load_weights(self.model_d, d, f"{path} (discriminator)")
        if self.is_main:
            if note:
                _LOGGER.warning("%s", note)
            _LOGGER.info("initialised from %s: %d generator tensors loaded, %d left at init%s", path,
                         len(self.model_g.state_dict()) - len(left), len(left),
                         "" if d else "; no discriminator in the file (fresh one)")

    def _restore(self, ckpt: Dict[str, Any], path: Path) -> None:
        """Continue from ``ckpt``: weights, optimizers, schedulers, counters, RNG and grad scaler. A field that
        cannot be used is a :class:`vits_fast.checkpoint.CheckpointError` naming it."""
        g = ckpt_lib.generator_state(ckpt)[0]
        d, opt_d_state = ckpt_lib.discriminator_state(ckpt)
        if self.kept_d_optimizer is not None:  # without model_mrd's part (see _source_conventions)
            opt_d_state = self.d_optimizer_head
        ckpt_lib.load_weights(self.model_g, g, f"{path} (generator)")
        if d:
            ckpt_lib.load_weights(self.model_d, d, f"{path} (discriminator)")
        extra = ckpt.get("vits_fast") or {}
        # global_step counts optimizer steps (two per batch) except in early vits_fast files; Lightning's own
        # files resume at the start of an epoch, as Lightning does with a plain data loader.
        counters = {"epoch": ckpt.get("epoch", 0), "global_step": ckpt_lib.batches_done(ckpt),
                    "batch_in_epoch": extra.get("batch_in_epoch", 0) if isinstance(extra, dict) else None}
        for name, value in counters.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ckpt_lib.CheckpointError(f"--resume {path}: {name} must be a non-negative integer, got "
                                               f"{value!r}")
        batches = self.sampler.batches_per_epoch()
        if counters["batch_in_epoch"] >= batches:
            raise ckpt_lib.CheckpointError(f"--resume {path}: batch_in_epoch {counters['batch_in_epoch']} is beyond "
                                           f"the {batches} batches of an epoch here (another dataset or "
                                           f"--batch-size?)")

        def restore(name: str, load: Any) -> None:
            try:
                load()
            except (AttributeError, IndexError, KeyError, RuntimeError, TypeError, ValueError) as exc:
                raise ckpt_lib.CheckpointError(f"--resume {path}: its {name} cannot be restored "
                                               f"({type(exc).__name__}: {str(exc).strip()[:200]})") from None

        def load_optimizer(opt: torch.optim.Optimizer, state: Any) -> None:
            # The file's settings (lr, betas, ...) but our implementation flags: Piper's AdamW is not fused.
            flags = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in opt.param_groups]
            opt.load_state_dict(state)
            for group, own in zip(opt.param_groups, flags):
                group.update(own)

        opt_states = ckpt.get("optimizer_states") or []
        if len(opt_states) == 2:
            restore("optimizer_states", lambda: (load_optimizer(self.optim_g, opt_states[0]),
                                                 load_optimizer(self.optim_d, opt_d_state)))
        scheds = ckpt.get("lr_schedulers") or []
        if len(scheds) == 2:
            restore("lr_schedulers", lambda: (self.sched_g.load_state_dict(scheds[0]),
                                              self.sched_d.load_state_dict(scheds[1])))
        self.epoch, self.global_step, self.batch_in_epoch = (counters["epoch"], counters["global_step"],
                                                             counters["batch_in_epoch"])
        if "grad_scaler" in extra and self.scaler.is_enabled():
            restore("grad_scaler", lambda: self.scaler.load_state_dict(extra["grad_scaler"]))
        if "rng" in extra and self.rank == 0:
            restore("rng state", lambda: ckpt_lib.set_rng_state(extra["rng"]))
        else:
            torch.manual_seed(self.args.seed + self.rank + 7919 * self.global_step)
        if self.is_main:
            _LOGGER.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.global_step)

    def _setup_data(self, items: List[Any], bad: List[Any]) -> None:
        args = self.args
        cache_dir = args.cache_dir or self.out / "cache"
        prep_workers = args.num_workers if args.num_workers is not None else min(4, os.cpu_count() or 1)
        # Training batches: worker processes on GPU runs; on a CPU run the cores are better spent on the model
        # (loader workers there slow the step down several-fold) unless asked for.
        if args.num_workers is not None:
            self.num_workers = args.num_workers
        else:
            self.num_workers = min(4, os.cpu_count() or 1) if self.device.type == "cuda" else 0
        if args.phonemizer == "espeak":
            from ..data import piper_phonemizer_available

            if not piper_phonemizer_available():
                raise DataError("--phonemizer espeak needs piper-tts: pip install vits_fast[phonemize]")
        phonemizer = Phonemizer(args.espeak_voice or self.info.espeak_voice,
                                id_map=self.info.phoneme_id_map or default_phoneme_id_map(),
                                force_characters=args.phonemizer == "characters")
        self.phoneme_type = phonemizer.kind if any(it.phoneme_ids is None for it in items) else "given"
        total = len(items) + len(bad)
        if self.distributed and not self.is_main:
            dist.barrier()  # wait for rank 0 to build the cache
        ok, bad2, filtered = prepare_items(items, self.audio, cache_dir, phonemizer=phonemizer,
                                           num_symbols=self.model_kwargs["n_vocab"],
                                           max_phoneme_ids=args.max_phoneme_ids,
                                           max_audio_seconds=args.max_audio_seconds,
                                           num_workers=prep_workers if self.is_main else 0,
                                           progress=self.is_main and not args.no_progress)
        if self.distributed and self.is_main:
            dist.barrier()
        bad = list(bad) + bad2
        if self.is_main:
            report_problems(bad, filtered, args.on_bad_item, log_file=self.out / "bad_items.tsv", total=total)
        elif bad and args.on_bad_item == "fail":
            raise DataError(f"{len(bad)} bad item(s) (details on rank 0)")
        if not ok:
            raise DataError(f"{args.dataset}: no usable item ({len(bad)} bad, {len(filtered)} filtered)")
        self.bad_items, self.filtered_items = bad, filtered
        train, val, test = split_items(ok, args.validation_split, args.num_test_examples, args.seed)
        self.train_set, self.val_set, self.test_items = TTSDataset(train), TTSDataset(val), test
        batch_size = args.batch_size or (8 if (args.quality or ("tiny" if self.demo else "")) == "tiny" else 32)
        self.batch_size = batch_size
        self.sampler = BucketBatchSampler(self.train_set.lengths, batch_size, num_replicas=self.world,
                                          rank=self.rank, seed=args.seed)
        hop = self.audio.hop_length
        self.collate = Collate(self.model_kwargs["n_speakers"] > 1, self.model_kwargs["segment_size"], hop)
        pin = args.pin_memory == "yes" or (args.pin_memory == "auto" and self.device.type == "cuda")
        self.pin_memory = pin
        if self.is_main:
            _LOGGER.info("%d training / %d validation items, %d speaker(s), %d Hz, phonemes: %s, batch %d x %d "
                         "process(es), %d batches per epoch", len(train), len(val), self.model_kwargs["n_speakers"],
                         self.audio.sample_rate, self.phoneme_type, batch_size, self.world,
                         self.sampler.batches_per_epoch())
            _LOGGER.info("%s", describe_backend(self.device, training=True))

    def _loader(self, dataset: TTSDataset, batch_sampler: Any, epoch: int) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=batch_sampler, collate_fn=self.collate, num_workers=self.num_workers,
            pin_memory=self.pin_memory, generator=torch.Generator().manual_seed(self.args.seed + epoch),
            persistent_workers=False)

    def _wrap_ddp(self) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        mode = self.args.find_unused_parameters
        unused: List[str] = []
        if mode == "auto":
            unused = self._probe_unused()
            find_unused = bool(unused)
        else:
            find_unused = mode == "yes"
        if self.is_main and unused:
            _LOGGER.warning("DDP: %d generator parameter(s) get no gradient (%s...): find_unused_parameters=True",
                            len(unused), ", ".join(unused[:4]))
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.g_train = DDP(self.model_g, device_ids=ids, find_unused_parameters=find_unused)
        self.d_train = DDP(self.model_d, device_ids=ids)

    def _probe_unused(self) -> List[str]:
        """Names of generator parameters that get no gradient from a training forward (RNG untouched)."""
        self.sampler.set_epoch(self.epoch)
        batch = next(iter(self._loader(self.train_set, self.sampler, self.epoch))).to(self.device)
        devices = [self.device.index] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            y_hat, l_length, _, _, _, z_mask, (_, z_p, m_p, logs_p, _, logs_q) = self.model_g(
                batch.phoneme_ids, batch.phoneme_lengths, batch.spectrograms, batch.spectrogram_lengths,
                batch.speaker_ids)
            loss = y_hat.float().mean() + l_length.float().sum() + kl_loss(z_p, logs_q, m_p, logs_p, z_mask)
            loss.backward()
        unused = [n for n, p in self.model_g.named_parameters() if p.requires_grad and p.grad is None]
        self.model_g.zero_grad(set_to_none=True)
        return unused

    def _write_voice_config(self) -> None:
        """``config.json``: the dataset's config completed for this model (see
        :func:`vits_fast.voice_config.make_voice_config`)."""
        info = self.info
        base = dict(info.config or {})
        base.setdefault("phoneme_type", "text" if self.phoneme_type == "characters" else "espeak")
        base.update(phoneme_id_map=info.phoneme_id_map or default_phoneme_id_map(),
                    speaker_id_map=info.speaker_id_map)
        config = make_voice_config(self.model_g, base, sample_rate=self.audio.sample_rate, quality=self.quality,
                                   espeak_voice=self.args.espeak_voice or info.espeak_voice, check=False)
        write_voice_config(config, self.out / "config.json")

    # -- one step ----------------------------------------------------------------------------------------
    def step_parts(self) -> StepParts:
        """The models, optimizers and settings :func:`vits_fast.train.step.train_step` works on."""
        return StepParts(model_g=self.model_g, model_d=self.model_d, optim_g=self.optim_g, optim_d=self.optim_d,
                         audio=self.audio, segment_size=self.model_kwargs["segment_size"], g_train=self.g_train,
                         d_train=self.d_train, amp_dtype=self.amp_dtype, scaler=self.scaler,
                         grad_clip=self.args.grad_clip, distributed=self.distributed)

    def train_step(self, batch: Batch) -> StepOutput:
        """One Piper step (generator then discriminator update); the losses stay on the device (see
        :mod:`vits_fast.train.step`)."""
        return train_step(self.step_parts(), batch)

    def _account(self, losses: Dict[str, float], finite: bool, step: int, epoch: int) -> None:
        """Bookkeeping of one step once its losses are on the host: the non-finite policy (the update itself was
        already skipped on the device), and on fp16 a skipped overflow backs the loss scale off."""
        if finite:
            self.nonfinite_skipped = 0
        else:
            self._nonfinite(losses, step, epoch)

    def _nonfinite(self, losses: Dict[str, float], step: int, epoch: int) -> None:
        detail = ", ".join(f"{k}={v:.4g}" for k, v in losses.items())
        message = f"non-finite loss or gradient at step {step} (epoch {epoch}): {detail}"
        self.log.write({"step": step, "event": "nonfinite", **{k: (v if math.isfinite(v) else str(v))
                                                                for k, v in losses.items()}})
        if self.args.on_nonfinite == "stop":
            raise NonFiniteLossError(message + " (--on-nonfinite stop; the last checkpoint is untouched)")
        self.nonfinite_skipped += 1
        if self.is_main:
            _LOGGER.warning("%s: update skipped (--on-nonfinite skip, %d in a row)", message, self.nonfinite_skipped)
        if self.nonfinite_skipped >= self.args.max_nonfinite:
            raise NonFiniteLossError(f"{self.nonfinite_skipped} consecutive non-finite steps (last: {message})")

    # -- validation and checkpoints ----------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> Dict[str, Any]:
        """Mel L1 (x45, as in training) on the held-out items, and sample WAVs of the test items."""
        record: Dict[str, Any] = {"step": self.global_step}
        g = self.model_g
        was_training = g.training
        g.eval()
        devices = [self.device.index] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.args.seed)
            if len(self.val_set):
                sampler = BucketBatchSampler(self.val_set.lengths, self.batch_size, shuffle=False)
                total, count = 0.0, 0
                for batch in self._loader(self.val_set, sampler, 0):
                    batch = batch.to(self.device)
                    _, y_mel, y_hat_mel, _ = generator_pass(self.step_parts(), g, batch)
                    total += float(F.l1_loss(y_mel, y_hat_mel)) * C_MEL * len(batch)
                    count += len(batch)
                record["val_loss_mel"] = total / max(1, count)
            if not self.args.no_samples:
                record["samples"] = self._write_samples()
        g.train(was_training)
        self.log.write(record)
        return record

    def _write_samples(self) -> List[str]:
        import soundfile as sf

        folder = self.out / "samples" / f"step-{self.global_step:07d}"
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        max_frames = int(30 * self.audio.sample_rate / self.audio.hop_length)
        for it in self.test_items:
            x = torch.as_tensor(it.phoneme_ids, dtype=torch.long, device=self.device).unsqueeze(0)
            x_len = torch.tensor([x.size(1)], device=self.device)
            sid = torch.tensor([int(it.speaker_id or 0)], device=self.device) if self.num_speakers > 1 else None
            try:  # a young or diverging model can predict absurd durations: bounded before allocation
                wav = self.model_g.infer(x, x_len, sid=sid, noise_scale=DEFAULT_NOISE_SCALE,
                                         length_scale=DEFAULT_LENGTH_SCALE, noise_scale_w=DEFAULT_NOISE_SCALE_W,
                                         max_len=max_frames, max_frames=10 * max_frames)[0].float().reshape(-1).cpu()
            except ValueError as exc:
                _LOGGER.warning("sample %s not written: %s", it.id, exc)
                continue
            if not bool(torch.isfinite(wav).all()):
                _LOGGER.warning("sample %s not written: its audio holds NaN/inf values", it.id)
                continue
            wav = wav / max(0.01, float(wav.abs().max()))
            path = folder / f"{it.id}.wav"
            sf.write(str(path), wav.numpy(), self.audio.sample_rate, subtype="PCM_16")
            self.log.audio(it.id, wav, self.audio.sample_rate, self.global_step)
            paths.append(str(path))
        return paths

    def hyper_parameters(self) -> Dict[str, Any]:
        """Piper ``VitsModel`` keyword arguments of this run, over every other one the source checkpoint carried
        (kept even where vits_fast does not use it). Optimizer settings are the optimizers' own (a resumed
        state brings the file's). ``mos_metric`` defaults to None: piper1-gpl would otherwise download UTMOS."""
        a = self.args
        (g_group,), (d_group,) = self.optim_g.param_groups, self.optim_d.param_groups
        kept = {"mos_metric": None, **self.source_hp}
        return {**kept, **ckpt_lib.piper_hyper_parameters(self.model_kwargs, self.audio, num_speakers=self.num_speakers, training=dict(
            learning_rate=float(g_group["initial_lr"]), betas=tuple(g_group["betas"]), eps=float(g_group["eps"]),
            learning_rate_d=float(d_group["initial_lr"]), betas_d=tuple(d_group["betas"]),
            lr_decay=float(self.sched_g.gamma), lr_decay_d=float(self.sched_d.gamma), batch_size=self.batch_size,
            init_lr_ratio=1.0, warmup_epochs=0, c_mel=int(C_MEL), c_kl=C_KL,
            grad_clip=a.grad_clip, num_workers=self.num_workers, seed=a.seed, num_test_examples=a.num_test_examples,
            validation_split=a.validation_split, max_phoneme_ids=a.max_phoneme_ids, quality=self.quality))}

    def save(self) -> Optional[Path]:
        """Write ``epoch=E-step=S.ckpt`` and ``last.ckpt`` (rank 0 only); keep the newest ``--keep-checkpoints``."""
        if not self.is_main:
            return None
        self._check_weights_finite()
        extra = {"model_kwargs": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.model_kwargs.items()},
                 "audio": self.audio.to_dict(), "quality": self.quality, "batch_in_epoch": self.batch_in_epoch,
                 "rng": ckpt_lib.rng_state(), "speaker_id_map": self.info.speaker_id_map,
                 "phoneme_type": self.phoneme_type, "lr_schedule": self.lr_schedule}
        if self.scaler.is_enabled():
            extra["grad_scaler"] = self.scaler.state_dict()
        data = ckpt_lib.build_checkpoint(
            self.model_g, self.model_d, [self.optim_g, self.optim_d], [self.sched_g, self.sched_d], self.epoch,
            self.global_step * ckpt_lib.OPTIMIZER_STEPS_PER_BATCH, self.hyper_parameters(), extra,
            lightning_version=self.lightning_version, batch_in_epoch=self.batch_in_epoch,
            piper_discriminator=self._piper_discriminator(), kept_state=self.kept_state,
            kept_d_optimizer=self.kept_d_optimizer)
        path = self.ckpt_dir / f"epoch={self.epoch}-step={self.global_step}.ckpt"
        ckpt_lib.atomic_save(data, path)
        last = self.ckpt_dir / "last.ckpt"
        tmp = self.ckpt_dir / "last.ckpt.tmp"
        tmp.unlink(missing_ok=True)
        try:  # a second name for the same file: no second copy on disk
            os.link(path, tmp)
        except OSError:  # a file system without hard links
            shutil.copyfile(path, tmp)
        os.replace(tmp, last)
        if path not in self.written:
            self.written.append(path)
        while len(self.written) > self.args.keep_checkpoints:  # only checkpoints this run wrote
            self.written.pop(0).unlink(missing_ok=True)
        _LOGGER.info("saved %s", path)
        return path

    def _piper_discriminator(self) -> Optional[MultiPeriodDiscriminator]:
        """None when the discriminator trained is Piper's shape; else a fresh full-size one (built once, seeded,
        on the side of the training RNG) that checkpoints store under ``model_d.*`` for Piper's strict loader; the
        trained shrunk one is kept in ``vits_fast.discriminator``. Stored in float16 (94 MB instead of 188 MB per
        file): it is only a starting point, and loading casts it to the module's float32."""
        if _discriminator_divisor(self.model_d.state_dict(), 1) == 1:
            return None
        if getattr(self, "_fresh_piper_d", None) is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.args.seed)
                self._fresh_piper_d = MultiPeriodDiscriminator().half()
            _LOGGER.warning("the discriminator trained here is shrunk %dx for speed; checkpoints give Piper a fresh "
                            "full-size one (model_d), which Piper would re-train; vits_fast resumes the trained one",
                            _discriminator_divisor(self.model_d.state_dict(), 1))
        return self._fresh_piper_d

    def _check_weights_finite(self) -> None:
        """Refuse to save NaN/inf weights (one host read per checkpoint): the last good checkpoints stay."""
        named = list(self.model_g.named_parameters()) + list(self.model_d.named_parameters())
        finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named])
        if not bool(finite.all()):
            names = [n for (n, _), ok in zip(named, finite.tolist()) if not ok]
            raise NonFiniteLossError(f"the weights became non-finite by step {self.global_step} ({len(names)} "
                                     f"tensor(s), e.g. {names[0]}); nothing was saved, the checkpoints written "
                                     f"before are kept in {self.ckpt_dir}")

    # -- loop --------------------------------------------------------------------------------------------
    def fit(self) -> Dict[str, Any]:
        args = self.args
        max_steps = args.max_steps if args.max_steps is not None else (150 if self.demo else None)
        max_epochs = args.max_epochs if args.max_epochs is not None else (None if max_steps else 10_000)
        val_every = args.val_every or (50 if self.demo else 1000)
        ckpt_every = args.checkpoint_every or (50 if self.demo else 1000)
        from tqdm.auto import tqdm

        bar = tqdm(total=max_steps, initial=self.global_step, desc="training", dynamic_ncols=True,
                   disable=args.no_progress or not self.is_main)
        last_saved = -1
        last_val = -1
        t_last = time.perf_counter()
        window_samples, window_steps = 0, 0

        def done() -> bool:
            return ((max_steps is not None and self.global_step >= max_steps)
                    or (max_epochs is not None and self.epoch >= max_epochs))

        # Step k's losses are read on the host after step k+1 has been queued (no GPU stall); account() does the
        # bookkeeping of a step once its losses are here, settle() runs it for all but ``keep`` pending steps.
        reader = DeferredRead()

        def account(losses: Dict[str, float], finite: bool, meta: Dict[str, Any]) -> None:
            nonlocal t_last, window_samples, window_steps
            step = meta["step"]
            self._account(losses, finite, step, meta["epoch"])
            record = {"step": step, "epoch": meta["epoch"], **losses}
            self.history.append(record)
            if step % args.log_every == 0 or step == 1 or meta["last"]:
                now = time.perf_counter()
                dt = (now - t_last) / max(1, window_steps)
                record.update(lr=meta["lr"], s_per_step=dt, samples_per_s=window_samples / max(1e-9, now - t_last))
                if self.scaler.is_enabled():  # fp16: a falling scale means skipped overflow steps
                    record["grad_scale"] = float(self.scaler.get_scale())
                self.log.write(record)
                bar.set_postfix(g=f"{losses['loss_g']:.2f}", d=f"{losses['loss_d']:.2f}",
                                mel=f"{losses['loss_mel']:.2f}", sps=f"{record['samples_per_s']:.1f}",
                                s_step=f"{dt:.2f}")
                if self.is_main and bar.disable:
                    _LOGGER.info("step %d: loss_g %.3f loss_d %.3f mel %.3f kl %.3f dur %.3f | %.1f samples/s, "
                                 "%.2f s/step", step, losses["loss_g"], losses["loss_d"], losses["loss_mel"],
                                 losses["loss_kl"], losses["loss_dur"], record["samples_per_s"], dt)
                t_last, window_samples, window_steps = now, 0, 0

        def settle(keep: int = 0) -> None:
            while len(reader) > keep:
                account(*reader.pop())

        try:
            while not done():
                self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
                n_batches = self.sampler.batches_per_epoch()
                epoch_at_start = self.epoch
                for batch in self._loader(self.train_set, self.sampler, self.epoch):
                    batch = batch.to(self.device, non_blocking=self.pin_memory)
                    lr = self.optim_g.param_groups[0]["lr"]
                    out = self.train_step(batch)
                    self.global_step += 1
                    self.batch_in_epoch += 1
                    window_samples += len(batch) * self.world
                    window_steps += 1
                    if self.batch_in_epoch >= n_batches:  # epoch boundary: rhasspy Piper steps the schedulers here
                        if self.lr_schedule == "per_epoch":
                            self.sched_g.step()
                            self.sched_d.step()
                        self.epoch += 1
                        self.batch_in_epoch = 0
                    reader.push(out, {"step": self.global_step, "epoch": epoch_at_start, "lr": lr, "last": done()})
                    settle(keep=1)
                    bar.update(1)
                    validating = self.is_main and self.global_step % val_every == 0
                    saving = self.global_step % ckpt_every == 0
                    if validating or saving or done() or self.epoch != epoch_at_start:
                        settle()  # every step's bookkeeping done before anything is judged or written
                    if validating:
                        val = self.validate()
                        last_val = self.global_step
                        msg = (f"step {self.global_step}: loss_mel {self.history[-1]['loss_mel']:.3f}, validation "
                               f"mel {val.get('val_loss_mel', float('nan')):.3f}")
                        bar.write(msg) if not bar.disable else _LOGGER.info("%s", msg)
                    if saving:
                        self.save()
                        last_saved = self.global_step
                    if done() or self.epoch != epoch_at_start:
                        break
            settle()
        finally:
            bar.close()
        if self.is_main and last_val != self.global_step:
            self.validate()
        if last_saved != self.global_step:
            self.save()
        if self.distributed:
            dist.barrier()
        result = {"global_step": self.global_step, "epoch": self.epoch, "history": self.history,
                  "checkpoint": str(self.ckpt_dir / "last.ckpt")}
        if self.is_main and self.history:
            first, last = self.history[0]["loss_mel"], self.history[-1]["loss_mel"]
            _LOGGER.info("done: %d steps, mel loss %.3f -> %.3f; checkpoint %s; samples in %s", self.global_step,
                         first, last, result["checkpoint"], self.out / "samples")
        self.log.close()
        return result
