"""Checkpoints in Piper's (PyTorch Lightning) layout, loaded without ever running code from the file.

Layout written by :func:`save_checkpoint` (what Piper's ``VitsModel.load_from_checkpoint`` and export tools read)::

    {"state_dict": {"model_g.<key>": tensor, ..., "model_d.<key>": tensor, ...},
     "optimizer_states": [AdamW(G).state_dict(), AdamW(D).state_dict()],
     "lr_schedulers": [ExponentialLR(G).state_dict(), ExponentialLR(D).state_dict()],
     "epoch": int, "global_step": int, "hyper_parameters": {... VitsModel keyword arguments ...},
     "pytorch-lightning_version": str,
     "vits_fast": {... resume-only extras: RNG states, grad scaler, batch position, model kwargs ...}}

Loading (:func:`load_checkpoint`) never unpickles with the stock unpickler:

1. ``torch.load(weights_only=True)`` with an explicit allow-list (``pathlib`` paths besides torch's own tensors
   and containers).
2. If the file names a class outside that list (Lightning's ``AttributeDict`` in ``hyper_parameters``, a
   dataset enum, ...), it is read again with :class:`_RestrictedUnpickler`: allow-listed globals resolve to the
   real objects, class-like names become inert placeholders that only hold the data they were given, and any
   callable that could act on the system (``os.system``, ``builtins.eval``, ``subprocess.Popen``, functions in
   general) makes the load fail with :class:`UnsafeCheckpointError` before anything runs. No module named by
   the file is ever imported.

A truncated or corrupt file raises :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import collections
import copyreg
import os
import pathlib
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from .config import PRESETS, AudioConfig, model_kwargs as preset_model_kwargs

PathLike = Union[str, os.PathLike]

#: Lightning version recorded in our checkpoints (Piper's ``piper_train`` pins pytorch-lightning 1.7-1.9; a
#: lower version makes newer Lightning run its forward migrations, which only touch keys we do not use).
LIGHTNING_VERSION = "1.7.7"

# Conditioning weights that exist only in multi-speaker models (Piper's single->multi warm start drops them).
_COND_MARKERS = ("emb_g.", "dec.cond.", "dp.cond.", "cond_layer.")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose pickle would call something able to run code; it was refused unread."""


# --------------------------------------------------------------------------------------------------------
# Safe loading
# --------------------------------------------------------------------------------------------------------

_PATH_CLASSES = (pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath,
                 pathlib.Path, pathlib.PurePath)


def _allowed_globals() -> Dict[Tuple[str, str], Any]:
    """(module, name) -> object for every global the restricted unpickler resolves to the real thing."""
    allowed: Dict[Tuple[str, str], Any] = {}

    def add(module: str, name: str, obj: Any) -> None:
        allowed[(module, name)] = obj

    # Tensor and parameter reconstruction (zip and legacy formats).
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                 "_rebuild_parameter_with_state", "_rebuild_qtensor", "_rebuild_device_tensor_from_numpy",
                 "_rebuild_meta_tensor_no_storage", "_rebuild_wrapper_subclass", "_rebuild_nested_tensor"):
        if hasattr(torch._utils, name):
            add("torch._utils", name, getattr(torch._utils, name))
    add("torch._tensor", "_rebuild_from_type_v2", torch._tensor._rebuild_from_type_v2)
    add("torch.nn.parameter", "Parameter", torch.nn.Parameter)
    add("torch", "Tensor", torch.Tensor)
    add("torch", "Size", torch.Size)
    add("torch", "device", torch.device)
    for dtype_name in ("float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8",
                       "bool", "complex64", "complex128", "half", "float", "double", "long", "int", "short"):
        add("torch", dtype_name, getattr(torch, dtype_name))
    for storage in ("FloatStorage", "DoubleStorage", "HalfStorage", "BFloat16Storage", "LongStorage",
                    "IntStorage", "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage", "UntypedStorage"):
        if hasattr(torch, storage):
            add("torch", storage, getattr(torch, storage))
    add("torch.storage", "TypedStorage", torch.storage.TypedStorage)
    add("torch.storage", "UntypedStorage", torch.storage.UntypedStorage)
    add("collections", "OrderedDict", collections.OrderedDict)
    add("collections", "defaultdict", collections.defaultdict)
    add("collections", "Counter", collections.Counter)
    for builtin in (set, frozenset, list, dict, tuple, int, float, complex, bool, str, bytes, bytearray, slice,
                    range, object):
        add("builtins", builtin.__name__, builtin)
        add("__builtin__", builtin.__name__, builtin)
    add("copyreg", "_reconstructor", copyreg._reconstructor)
    for cls in _PATH_CLASSES:
        for module in ("pathlib", "pathlib._local"):
            add(module, cls.__name__, cls)
    # NumPy scalars/arrays (e.g. a metric stored as np.float64 by a Lightning callback).
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        add(module, "scalar", _numpy_scalar)
        add(module, "_reconstruct", _numpy_reconstruct)
    add("numpy", "dtype", np.dtype)
    add("numpy", "ndarray", np.ndarray)
    for dtype_cls in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType"):
        if hasattr(np.dtypes, dtype_cls):
            add("numpy.dtypes", dtype_cls, getattr(np.dtypes, dtype_cls))
    return allowed


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    """Rebuild a NumPy scalar from its dtype and raw bytes (only for plain numeric dtypes)."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, (bytes, bytearray)):
        raise UnsafeCheckpointError("numpy scalar with a non-numeric dtype")
    return np.frombuffer(bytes(data), dtype=dtype)[0]


def _numpy_reconstruct(cls: Any, shape: Any, dtype: Any) -> Any:
    if cls is not np.ndarray:
        raise UnsafeCheckpointError("numpy array of a subclass")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


# Modules whose every name is treated as able to act on the system, whatever its spelling. Elsewhere only
# function-like names (lower-case first letter) are refused: class-like names become inert placeholders.
_DANGEROUS_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "sys", "builtins", "__builtin__", "shutil", "socket", "importlib",
    "runpy", "code", "codeop", "pty", "ctypes", "marshal", "pickle", "_pickle", "types", "operator",
    "functools", "io", "_io", "webbrowser", "multiprocessing", "signal", "pdb", "timeit", "tempfile", "glob",
    "platform", "asyncio", "threading", "_thread", "inspect", "gc", "ftplib", "http", "urllib", "smtplib",
    "telnetlib", "commands", "popen2", "zipimport", "pkgutil", "site", "sysconfig", "distutils",
    "setuptools", "pip", "cProfile", "profile", "trace", "dill", "cloudpickle", "joblib",
})


class InertObject(dict):
    """Stand-in for a class a checkpoint names but we do not trust: holds its data, runs nothing.

    It is a ``dict`` so that pickled ``dict`` subclasses (Lightning's ``AttributeDict``) keep their items.
    ``inert_args``/``inert_state``/``inert_items`` hold constructor arguments, ``__setstate__`` state and
    appended items.
    """

    inert_qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "InertObject":
        obj = dict.__new__(cls)
        obj.__dict__["inert_args"] = args
        obj.__dict__["inert_kwargs"] = kwargs
        obj.__dict__["inert_items"] = []
        obj.__dict__["inert_state"] = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: D401 - nothing to initialise
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["inert_state"] = state

    def append(self, item: Any) -> None:
        self.__dict__["inert_items"].append(item)

    def extend(self, items: Iterable[Any]) -> None:
        self.__dict__["inert_items"].extend(items)

    def __reduce__(self):  # saved again as plain data
        return (dict, (dict(self),))

    def __repr__(self) -> str:
        return f"<inert {self.inert_qualname} {dict.__repr__(self)}>"


def _inert_class(module: str, name: str) -> type:
    return type(name.rsplit(".", 1)[-1], (InertObject,),
                {"inert_qualname": f"{module}.{name}", "__module__": "vits_fast.checkpoint.inert"})


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals; see the module docstring for the rules."""

    source = "<checkpoint>"
    _allowed: Optional[Dict[Tuple[str, str], Any]] = None
    _inert: Dict[Tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        cls = type(self)
        if cls._allowed is None:
            cls._allowed = _allowed_globals()
        obj = cls._allowed.get((module, name))
        if obj is not None:
            return obj
        top = module.split(".", 1)[0]
        leaf = name.rsplit(".", 1)[-1]
        if top in _DANGEROUS_MODULES or not leaf[:1].isupper():
            raise UnsafeCheckpointError(
                f"refusing to load {self.source}: its pickle calls {module}.{name}, which could run code on "
                f"this machine; nothing from the file was executed. Only load checkpoints you trust the origin "
                f"of; a genuine Piper/vits_fast checkpoint never references it")
        key = (module, name)
        if key not in cls._inert:
            cls._inert[key] = _inert_class(module, name)
        return cls._inert[key]


def _restricted_pickle_module(source: str) -> Any:
    """The ``pickle_module`` handed to ``torch.load`` for the restricted pass (errors name ``source``)."""
    unpickler = type("_RestrictedUnpickler", (_RestrictedUnpickler,), {"source": source})

    def load(file: Any, **kwargs: Any) -> Any:  # torch's legacy (non-zip) reader uses it for its header
        return unpickler(file, **kwargs).load()

    return type("vits_fast_restricted_pickle", (), {"Unpickler": unpickler, "load": staticmethod(load),
                                                     "UnpicklingError": pickle.UnpicklingError})


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> Any:
    """Read a ``.ckpt``/``.pt`` file without executing code from it.

    Returns what was saved (for checkpoints, a dict). Raises :class:`CheckpointError` for a missing, empty,
    truncated or corrupt file and :class:`UnsafeCheckpointError` for a file whose pickle would call code.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    try:
        if hasattr(torch.serialization, "safe_globals"):
            with torch.serialization.safe_globals(list(_PATH_CLASSES)):
                return torch.load(path, map_location=map_location, weights_only=True)
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        pass  # a global beyond the allow-list (or an opcode torch's reader lacks): decided by the pass below
    except Exception as exc:  # zip errors (RuntimeError), EOFError, ... from a damaged file
        raise CheckpointError(f"cannot read checkpoint {path}: truncated or corrupt ({_first_line(exc)})") from None
    # Read it again with the restricted unpickler: it refuses code, keeps unknown classes as inert data.
    try:
        return torch.load(path, map_location=map_location, weights_only=False,
                          pickle_module=_restricted_pickle_module(str(path)))
    except UnsafeCheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: truncated or corrupt ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def to_plain(obj: Any) -> Any:
    """Replace inert placeholders (recursively) by plain dicts/lists and paths by strings (for hparams)."""
    if isinstance(obj, InertObject):
        if len(obj) or not (obj.inert_args or obj.inert_items or obj.inert_state):
            return {str(k): to_plain(v) for k, v in obj.items()}
        return {"__class__": obj.inert_qualname, "args": to_plain(list(obj.inert_args)),
                "state": to_plain(obj.inert_state), "items": to_plain(obj.inert_items)}
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj) if isinstance(obj, list) else tuple(to_plain(v) for v in obj)
    if isinstance(obj, pathlib.PurePath):
        return str(obj)
    return obj


# --------------------------------------------------------------------------------------------------------
# Key layout helpers
# --------------------------------------------------------------------------------------------------------

_WN_NEW = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}


def _wn_variants(key: str) -> List[str]:
    """The same weight-norm tensor under the legacy and the parametrization spellings."""
    out = [key]
    for legacy, new in _WN_NEW.items():
        if key.endswith("." + legacy):
            out.append(key[: -len(legacy)] + new)
        elif key.endswith("." + new):
            out.append(key[: -len(new)] + legacy)
    return out


def split_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Lightning ``state_dict`` -> (generator state, discriminator state) without the ``model_g.``/``model_d.``
    prefixes. A state dict with neither prefix is taken as a bare generator (VITS ``G_*.pth`` style)."""
    g = {k[len("model_g."):]: v for k, v in state_dict.items() if k.startswith("model_g.")}
    d = {k[len("model_d."):]: v for k, v in state_dict.items() if k.startswith("model_d.")}
    if not g and not d:
        g = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    return g, d


def generator_state(ckpt: Mapping[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(generator, discriminator) tensors of a loaded checkpoint: Lightning (``state_dict``), VITS
    (``model``) or a bare state dict."""
    if "state_dict" in ckpt:
        return split_state_dict(ckpt["state_dict"])
    if "model" in ckpt and isinstance(ckpt["model"], Mapping):
        return split_state_dict(ckpt["model"])
    return split_state_dict(ckpt)


def match_keys(model: torch.nn.Module, source: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename ``source`` keys to the model's spelling (legacy ``weight_g``/``weight_v`` vs parametrizations)."""
    own = model.state_dict()
    out: Dict[str, torch.Tensor] = {}
    for key, value in source.items():
        for variant in _wn_variants(key):
            if variant in own:
                out[variant] = value
                break
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------------------
# Inference of the architecture from tensor shapes
# --------------------------------------------------------------------------------------------------------

def _get(g: Mapping[str, torch.Tensor], key: str) -> Optional[torch.Tensor]:
    for variant in _wn_variants(key):
        if variant in g:
            return g[variant]
    return None


def infer_architecture(g: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """Read the Piper quality, vocabulary, speaker count and channel sizes off a generator state dict.

    Returns ``{"quality": "x-low"|"medium"|"high"|None, "num_symbols", "num_speakers", "gin_channels",
    "spec_channels", "hidden_channels", "inter_channels", "filter_channels", "n_layers",
    "upsample_initial_channel", "resblock", "num_upsamples"}``; ``quality`` is None when no Piper preset has
    these sizes.
    """
    emb = _get(g, "enc_p.emb.weight")
    if emb is None:
        raise CheckpointError("not a VITS/Piper generator: no enc_p.emb.weight in the checkpoint")
    proj = _get(g, "enc_p.proj.weight")
    ffn = _get(g, "enc_p.encoder.ffn_layers.0.conv_1.weight")
    pre = _get(g, "enc_q.pre.weight")
    conv_pre = _get(g, "dec.conv_pre.weight")
    if proj is None or ffn is None or pre is None or conv_pre is None:
        raise CheckpointError("not a VITS/Piper generator: missing enc_p.proj, enc_p.encoder, enc_q.pre or dec.conv_pre")
    emb_g = g.get("emb_g.weight")
    layers = {k.split(".")[3] for k in g if k.startswith("enc_p.encoder.attn_layers.")}
    ups = {k.split(".")[2] for k in g if k.startswith("dec.ups.")}
    resblock = "1" if any(k.startswith("dec.resblocks.0.convs1.") for k in g) else "2"
    arch: Dict[str, Any] = dict(
        num_symbols=int(emb.shape[0]),
        hidden_channels=int(emb.shape[1]),
        inter_channels=int(proj.shape[0]) // 2,
        filter_channels=int(ffn.shape[0]),
        spec_channels=int(pre.shape[1]),
        n_layers=len(layers),
        upsample_initial_channel=int(conv_pre.shape[0]),
        resblock=resblock,
        num_upsamples=len(ups),
        num_speakers=int(emb_g.shape[0]) if emb_g is not None else 1,
        gin_channels=int(emb_g.shape[1]) if emb_g is not None else 0,
    )
    arch["quality"] = None
    for quality, preset in PRESETS.items():
        if (preset["hidden_channels"] == arch["hidden_channels"]
                and preset["inter_channels"] == arch["inter_channels"]
                and preset["filter_channels"] == arch["filter_channels"]
                and preset["upsample_initial_channel"] == arch["upsample_initial_channel"]
                and preset["resblock"] == arch["resblock"]
                and len(preset["upsample_rates"]) == arch["num_upsamples"]):
            arch["quality"] = quality
            break
    return arch


# --------------------------------------------------------------------------------------------------------
# Model configuration of a checkpoint
# --------------------------------------------------------------------------------------------------------

# Piper's VitsModel hyper-parameters that are SynthesizerTrn arguments (same name unless renamed here). The
# vocabulary, speaker count and gin_channels are not among them: the tensor shapes say those exactly.
_HPARAM_MODEL_KEYS = ("inter_channels", "hidden_channels", "filter_channels", "n_heads", "n_layers", "kernel_size",
                      "p_dropout", "resblock", "resblock_kernel_sizes", "resblock_dilation_sizes", "upsample_rates",
                      "upsample_initial_channel", "upsample_kernel_sizes", "use_sdp")
# Qualities a checkpoint may name in its hyper-parameters (ours record "tiny" for the CPU demo preset).
_KNOWN_QUALITIES = ("tiny",) + tuple(PRESETS)


def _tuple(v: Any) -> Any:
    """Lists (nested) -> tuples, as SynthesizerTrn's presets spell them."""
    return tuple(_tuple(i) for i in v) if isinstance(v, (list, tuple)) else v


def _audio_from_hparams(hp: Mapping[str, Any], default_sample_rate: int) -> AudioConfig:
    """STFT/mel settings from Piper hyper-parameters; missing ones take ``VitsModel``'s defaults."""
    d = AudioConfig()
    mel_fmax = hp.get("mel_fmax", d.mel_fmax)
    return AudioConfig(sample_rate=int(hp.get("sample_rate") or default_sample_rate),
                       filter_length=int(hp.get("filter_length") or d.filter_length),
                       hop_length=int(hp.get("hop_length") or d.hop_length),
                       win_length=int(hp.get("win_length") or d.win_length),
                       mel_channels=int(hp.get("mel_channels") or d.mel_channels),
                       mel_fmin=float(hp.get("mel_fmin") or 0.0),
                       mel_fmax=None if mel_fmax is None else float(mel_fmax))


def model_config_from_checkpoint(
    ckpt: Mapping[str, Any], *, default_sample_rate: Optional[Callable[[Optional[str]], int]] = None,
    name: str = "the checkpoint",
) -> Tuple[Dict[str, Any], AudioConfig, Optional[str]]:
    """``(SynthesizerTrn kwargs, audio settings, quality)`` of a loaded checkpoint (ours, Piper's or bare).

    In order of trust:

    1. Ours: the ``vits_fast`` entry records ``model_kwargs``, ``audio`` and ``quality`` exactly; they are
       returned as recorded (lists as tuples).
    2. Piper's ``hyper_parameters`` (``VitsModel`` keyword arguments): each one present is used, a missing one
       takes the value of the quality preset the tensor shapes match, else ``VitsModel``'s default (the medium
       preset). ``segment_size`` is in samples there and becomes frames.
    3. No hyper-parameters: the Piper quality preset the tensor shapes match.

    Outside (1) the vocabulary (``n_vocab``), speaker count (``n_speakers``) and ``gin_channels`` are read off
    the tensor shapes (:func:`infer_architecture`): the weights must fit them whatever the hyper-parameters
    say. Piper gives a multi-speaker model with ``gin_channels <= 0`` 512 channels; the speaker embedding it
    saved has that width, so the shapes carry the rule. ``quality`` is the one recorded (``vits_fast`` entry,
    a ``quality`` hyper-parameter) or the preset the shapes match, None for a custom architecture.

    ``default_sample_rate(quality)`` gives the sample rate when the checkpoint records none (default: 22050,
    Piper's). ``name`` names the checkpoint in errors. Raises :class:`CheckpointError` when the file is no
    VITS/Piper generator, or has no hyper-parameters and its shapes match no preset (nothing says how to build
    the model).
    """
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{name} is not a checkpoint (it holds a {type(ckpt).__name__})")
    hp = to_plain(ckpt.get("hyper_parameters") or {})
    hp = dict(hp) if isinstance(hp, Mapping) else {}
    extra = ckpt.get("vits_fast")
    extra = extra if isinstance(extra, Mapping) else {}

    def sample_rate_for(quality: Optional[str]) -> int:
        return int(default_sample_rate(quality)) if default_sample_rate is not None else AudioConfig().sample_rate

    if isinstance(extra.get("model_kwargs"), Mapping):
        quality = extra.get("quality")
        kwargs = {k: _tuple(v) for k, v in extra["model_kwargs"].items()}
        recorded_audio = extra.get("audio")
        audio = (AudioConfig(**recorded_audio) if isinstance(recorded_audio, Mapping)
                 else _audio_from_hparams(hp, sample_rate_for(quality)))
        return kwargs, audio, quality

    arch = infer_architecture(generator_state(ckpt)[0])
    quality = hp["quality"] if hp.get("quality") in _KNOWN_QUALITIES else arch["quality"]
    audio = _audio_from_hparams(hp, sample_rate_for(quality))
    n_vocab, n_speakers = arch["num_symbols"], arch["num_speakers"]
    if hp:
        kwargs = preset_model_kwargs(arch["quality"] or "medium", n_vocab, n_speakers, audio=audio,
                                     segment_size=int(hp.get("segment_size") or 8192))
        kwargs.update({k: _tuple(hp[k]) for k in _HPARAM_MODEL_KEYS if hp.get(k) is not None})
        kwargs["resblock"] = str(kwargs["resblock"])
    elif arch["quality"] is not None:
        kwargs = preset_model_kwargs(arch["quality"], n_vocab, n_speakers, audio=audio)
    else:
        sizes = {k: v for k, v in arch.items() if k != "quality"}
        raise CheckpointError(f"{name}: cannot tell how to build the model: it has no hyper_parameters and its "
                              f"tensor shapes match no Piper quality preset ({sizes})")
    kwargs["gin_channels"] = arch["gin_channels"]
    return kwargs, audio, quality


def drop_speaker_conditioning(g: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Remove the speaker embedding and every conditioning layer; returns (kept, dropped keys)."""
    kept: Dict[str, torch.Tensor] = {}
    dropped: List[str] = []
    for key, value in g.items():
        if key.startswith("emb_g.") or any(marker in key for marker in _COND_MARKERS):
            dropped.append(key)
        else:
            kept[key] = value
    return kept, dropped


def load_weights(model: torch.nn.Module, source: Mapping[str, torch.Tensor], what: str) -> List[str]:
    """Copy ``source`` into ``model`` where names and shapes agree; returns the model keys left at init.

    Raises :class:`CheckpointError` when a tensor of the same name has another shape (the checkpoint does not
    fit this architecture).
    """
    own = model.state_dict()
    source = match_keys(model, source)
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in source.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise CheckpointError(f"{what} does not fit the model ({len(mismatched)} tensor(s) differ): "
                              + "; ".join(mismatched[:8]))
    unexpected = [k for k in source if k not in own]
    if unexpected:
        raise CheckpointError(f"{what} has {len(unexpected)} tensor(s) the model lacks: {unexpected[:8]}")
    merged = dict(own)
    merged.update({k: v.to(dtype=own[k].dtype) for k, v in source.items()})
    model.load_state_dict(merged)
    return [k for k in own if k not in source]


# --------------------------------------------------------------------------------------------------------
# Saving / RNG
# --------------------------------------------------------------------------------------------------------

def rng_state() -> Dict[str, Any]:
    """Every RNG a training step draws from, as tensors and plain Python values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), np_state[2], np_state[3], np_state[4]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def build_checkpoint(model_g: torch.nn.Module, model_d: torch.nn.Module, optimizers: List[torch.optim.Optimizer],
                     schedulers: List[Any], epoch: int, global_step: int, hyper_parameters: Mapping[str, Any],
                     extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The Lightning-layout dict described in the module docstring."""
    state_dict: Dict[str, torch.Tensor] = collections.OrderedDict()
    for prefix, model in (("model_g.", model_g), ("model_d.", model_d)):
        for key, value in model.state_dict().items():
            state_dict[prefix + key] = value
    return {
        "epoch": int(epoch),
        "global_step": int(global_step),
        "pytorch-lightning_version": LIGHTNING_VERSION,
        "state_dict": state_dict,
        "optimizer_states": [opt.state_dict() for opt in optimizers],
        "lr_schedulers": [sched.state_dict() for sched in schedulers],
        "hyper_parameters": dict(hyper_parameters),
        "vits_fast": dict(extra or {}),
    }


def save_checkpoint(path: PathLike, *args: Any, **kwargs: Any) -> Path:
    """:func:`build_checkpoint` then :func:`atomic_save`; returns the path."""
    atomic_save(build_checkpoint(*args, **kwargs), path)
    return Path(path)


def piper_hyper_parameters(model_kwargs: Mapping[str, Any], audio: Any, *, num_speakers: int,
                           training: Mapping[str, Any]) -> Dict[str, Any]:
    """Keyword arguments of Piper's ``VitsModel`` for this model (so ``load_from_checkpoint`` rebuilds it)."""
    hp: Dict[str, Any] = dict(
        num_symbols=int(model_kwargs["n_vocab"]),
        num_speakers=int(num_speakers),
        resblock=str(model_kwargs["resblock"]),
        resblock_kernel_sizes=tuple(model_kwargs["resblock_kernel_sizes"]),
        resblock_dilation_sizes=tuple(tuple(d) for d in model_kwargs["resblock_dilation_sizes"]),
        upsample_rates=tuple(model_kwargs["upsample_rates"]),
        upsample_initial_channel=int(model_kwargs["upsample_initial_channel"]),
        upsample_kernel_sizes=tuple(model_kwargs["upsample_kernel_sizes"]),
        filter_length=int(audio.filter_length),
        hop_length=int(audio.hop_length),
        win_length=int(audio.win_length),
        mel_channels=int(audio.mel_channels),
        sample_rate=int(audio.sample_rate),
        sample_bytes=2,
        channels=1,
        mel_fmin=float(audio.mel_fmin),
        mel_fmax=None if audio.mel_fmax is None else float(audio.mel_fmax),
        inter_channels=int(model_kwargs["inter_channels"]),
        hidden_channels=int(model_kwargs["hidden_channels"]),
        filter_channels=int(model_kwargs["filter_channels"]),
        n_heads=int(model_kwargs["n_heads"]),
        n_layers=int(model_kwargs["n_layers"]),
        kernel_size=int(model_kwargs["kernel_size"]),
        p_dropout=float(model_kwargs["p_dropout"]),
        n_layers_q=3,
        use_spectral_norm=False,
        gin_channels=int(model_kwargs["gin_channels"]),
        use_sdp=bool(model_kwargs["use_sdp"]),
        segment_size=int(model_kwargs["segment_size"]) * int(audio.hop_length),
        dataset=None,
    )
    hp.update(training)
    return hp
