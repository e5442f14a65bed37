"""Checkpoints in Piper's (PyTorch Lightning) layout, loaded without ever running code from the file.

Layout written by :func:`save_checkpoint` (what Piper's ``VitsModel.load_from_checkpoint`` and export tools read)::

    {"state_dict": {"model_g.<key>": tensor, ..., "model_d.<key>": tensor, ...},
     "optimizer_states": [AdamW(G).state_dict(), AdamW(D).state_dict()],
     "lr_schedulers": [ExponentialLR(G).state_dict(), ExponentialLR(D).state_dict()],
     "epoch": int, "global_step": int (2 per batch, Lightning's count), "loops": {... Lightning's fit progress ...},
     "hyper_parameters": {... VitsModel keyword arguments, and every other one the source checkpoint had ...},
     "pytorch-lightning_version": str,
     "vits_fast": {... resume-only extras: RNG states, grad scaler, batch position, model kwargs, the trained
                   shrunk discriminator of a CPU demo run ...}}

Which trainer wrote a checkpoint is told by :func:`checkpoint_origin`; its step count by :func:`batches_done`.

Loading (:func:`load_checkpoint`) never unpickles with the stock unpickler. ``torch.load`` reads the file with
:class:`_RestrictedUnpickler`:

* allow-listed globals (torch's tensor rebuilding, containers, ``pathlib`` paths, NumPy scalars) resolve to the
  real objects; class-like names outside the list (Lightning's ``AttributeDict`` in ``hyper_parameters``, a
  dataset enum, ...) become inert placeholders that only hold the data they were given; any callable that could
  act on the system (``os.system``, ``builtins.eval``, ``subprocess.Popen``, functions in general) makes the load
  fail with :class:`UnsafeCheckpointError` before anything runs. No module named by the file is ever imported.
* everything the allowed callables and storages would allocate is charged to a budget of twice the file's size
  plus :data:`UNPICKLE_SLACK` elements: a small file cannot make ``bytearray(10**10)``, a huge storage or an
  expanded view of billions of elements. (torch's own ``weights_only`` reader is not used: its allow-list calls
  ``bytearray(n)`` and storage constructors for any ``n`` the file names.)

After reading: meta tensors (shapes without data) are refused, and a checkpoint written by vits_fast carries the
SHA-256 of its tensors (``vits_fast.tensor_sha256``, see :func:`tensor_checksum`), which must match: a flipped bit
is a :class:`CheckpointError`, not a silently different voice. Piper's checkpoints carry none and load as they are.

A missing, truncated or corrupt file raises :class:`CheckpointError` naming the file. Model sizes read from a
checkpoint are bounded (:func:`check_model_config`) before any model is built.
"""

from __future__ import annotations

import _codecs
import _compat_pickle
import collections
import copy
import copyreg
import hashlib
import inspect
import math
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
from .models import SynthesizerTrn

PathLike = Union[str, os.PathLike]

#: ``pytorch-lightning_version`` of a checkpoint from a fresh vits_fast run: it names the layout of the ``loops``
#: entry written (Lightning 2's), so Lightning 2 (piper1-gpl) runs no migration on it and Lightning 1.x (rhasspy
#: Piper) reads the top-level ``global_step``/``epoch`` it falls back on. A run continued from a Lightning
#: checkpoint keeps that checkpoint's version and loop layout instead (:func:`lightning_loops`).
LIGHTNING_VERSION = "2.0.0"

#: Optimizer steps per batch in ``global_step``: Lightning counts every optimizer step, and Piper (both trainers)
#: steps two optimizers (generator, discriminator) per batch. vits_fast writes and reads the same convention.
OPTIMIZER_STEPS_PER_BATCH = 2

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
    add("_codecs", "encode", _codecs.encode)  # bytes in protocol-2 pickles (torch.save's default)
    add("torch.serialization", "_get_layout", torch.serialization._get_layout)
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


#: Elements (or bytes) that unpickling may create beyond twice the file's size (see :class:`_Budget`).
UNPICKLE_SLACK = 1 << 26


class _Budget:
    """What one load may still allocate; every storage, tensor and sized object made while unpickling is
    charged here, and going over refuses the file."""

    def __init__(self, source: str, file_size: int) -> None:
        self.source = source
        self.limit = 2 * file_size + UNPICKLE_SLACK
        self.used = 0

    def charge(self, amount: int, what: str) -> None:
        self.used += int(amount)
        if self.used > self.limit:
            raise CheckpointError(
                f"refusing to load {self.source}: unpickling it would allocate more than {self.limit} elements "
                f"({what}), far beyond what its data holds; the file is corrupt or crafted")


def _shape_size(args: Tuple[Any, ...]) -> int:
    """Elements a size-taking constructor would allocate: the product of its integer arguments and integer
    tuples (shapes); 0 when it got none (it copies existing data instead)."""
    sizes = []
    for a in args:
        if isinstance(a, int) and not isinstance(a, bool):
            sizes.append(abs(a))
        elif isinstance(a, (tuple, list)) and a and all(isinstance(i, int) and not isinstance(i, bool) for i in a):
            sizes.append(math.prod(abs(i) for i in a))
    return math.prod(sizes) if sizes else 0


def _unwrap(value: Any) -> Any:
    if isinstance(value, _Guarded):
        return value.target
    if type(value) is tuple:
        return tuple(_unwrap(v) for v in value)
    return value


class _Guarded:
    """An allow-listed callable as the restricted unpickler hands it out: arguments are unwrapped, and what the
    call allocates is charged to the load's :class:`_Budget` before (sized constructors) or after (tensor
    rebuilds: the view's element count, which a later copy would materialise) the call."""

    def __init__(self, target: Any, kind: str, budget: "_Budget") -> None:
        self.target, self.kind, self.budget = target, kind, budget

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args = _unwrap(args)
        name = getattr(self.target, "__name__", repr(self.target))
        if self.kind == "sized":
            self.budget.charge(_shape_size(args), f"{name}{args!r}"[:120])
        elif self.kind == "range":
            self.budget.charge(len(range(*args)), f"range{args!r}"[:120])
        out = self.target(*args, **kwargs)
        if self.kind == "tensor" and isinstance(out, torch.Tensor) and not out.is_meta:
            self.budget.charge(out.numel(), f"a tensor of shape {tuple(out.shape)}")
        return out

    def __getattr__(self, item: str) -> Any:  # e.g. a storage class's ``dtype`` read by torch's loader
        return getattr(self.target, item)


def _guard_kind(obj: Any) -> Optional[str]:
    """How a call of an allow-listed object is charged (None: it is not called, or allocates nothing sized)."""
    if obj is range:
        return "range"
    if obj in (bytes, bytearray, torch.Tensor, np.ndarray, copyreg._reconstructor, _numpy_reconstruct) or (
            isinstance(obj, type) and issubclass(obj, (torch.storage.TypedStorage, torch.storage.UntypedStorage))):
        return "sized"
    if getattr(obj, "__module__", None) == "torch._utils" or obj is torch._tensor._rebuild_from_type_v2:
        return "tensor"
    return "call" if callable(obj) and not isinstance(obj, torch.dtype) else None


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals (charged to ``budget``); see the module docstring."""

    source = "<checkpoint>"
    budget: Optional[_Budget] = None
    _allowed: Optional[Dict[Tuple[str, str], Any]] = None
    _inert: Dict[Tuple[str, str], type] = {}

    @property
    def persistent_load(self) -> Any:  # torch assigns its storage loader here; see the setter
        return pickle.Unpickler.persistent_load.__get__(self)

    @persistent_load.setter
    def persistent_load(self, load: Callable[[Any], Any]) -> None:
        """Charge each storage the file declares (the legacy format allocates it before reading its data)."""
        budget = self.budget

        def charged(pid: Any) -> Any:
            pid = _unwrap(tuple(pid)) if isinstance(pid, (tuple, list)) else pid
            if budget is not None and isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
                storage_type, numel = pid[1], pid[4]
                dtype = getattr(storage_type, "dtype", torch.uint8)
                size = torch._utils._element_size(dtype) if isinstance(dtype, torch.dtype) else 1
                budget.charge(int(numel) * size, f"a storage of {numel} elements")
            return load(pid)

        pickle.Unpickler.persistent_load.__set__(self, charged)

    def find_class(self, module: str, name: str) -> Any:
        cls = type(self)
        if cls._allowed is None:
            cls._allowed = _allowed_globals()
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))  # Python 2 names (xrange)
        obj = cls._allowed.get((module, name))
        if obj is not None:
            kind = _guard_kind(obj)
            return _Guarded(obj, kind, self.budget) if kind is not None and self.budget is not None else obj
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


def _restricted_pickle_module(source: str, budget: Optional[_Budget] = None) -> Any:
    """The ``pickle_module`` handed to ``torch.load`` (errors name ``source``; allocations charged to ``budget``)."""
    unpickler = type("_RestrictedUnpickler", (_RestrictedUnpickler,), {"source": source, "budget": budget})

    def load(file: Any, **kwargs: Any) -> Any:  # torch's legacy (non-zip) reader uses it for its header
        return unpickler(file, **kwargs).load()

    return type("vits_fast_restricted_pickle", (), {"Unpickler": unpickler, "load": staticmethod(load),
                                                     "UnpicklingError": pickle.UnpicklingError})


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> Any:
    """Read a ``.ckpt``/``.pt`` file without executing code from it (module docstring).

    Returns what was saved (for checkpoints, a dict). Raises :class:`CheckpointError` for a missing, empty,
    truncated, corrupt (checksum mismatch) or oversized file, a directory, or meta tensors, and
    :class:`UnsafeCheckpointError` for a file whose pickle would call code.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; give the .ckpt file inside it")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    budget = _Budget(str(path), size)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False,
                         pickle_module=_restricted_pickle_module(str(path), budget))
    except CheckpointError:
        raise
    except Exception as exc:  # zip errors (RuntimeError), EOFError, ... from a damaged file
        raise CheckpointError(f"cannot read checkpoint {path}: truncated or corrupt ({_first_line(exc)})") from None
    _check_loaded_tensors(obj, str(path))
    return obj


def _tensors(obj: Any, prefix: str = "") -> List[Tuple[str, torch.Tensor]]:
    """(path, tensor) for every tensor in nested dicts/lists/tuples, in stored order; a container reached twice
    (pickle keeps shared references) is visited once, so the walk is linear in what the file holds."""
    out: List[Tuple[str, torch.Tensor]] = []
    seen = set()
    stack: List[Tuple[str, Any]] = [(prefix, obj)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, torch.Tensor):
            out.append((where, value))
            continue
        if isinstance(value, (Mapping, list, tuple)):
            if id(value) in seen:
                continue
            seen.add(id(value))
            items = value.items() if isinstance(value, Mapping) else enumerate(value)
            stack.extend(reversed([(f"{where}.{k}" if where else str(k), v) for k, v in items]))
    return out


def tensor_checksum(ckpt: Mapping[str, Any]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the weights (``state_dict``), optimizer states and
    trained shrunk discriminator (``vits_fast.discriminator``, when there is one) of a checkpoint dict: what
    :func:`build_checkpoint` records and :func:`load_checkpoint` verifies."""
    h = hashlib.sha256()
    extra = ckpt.get("vits_fast")
    trained_d = extra.get("discriminator") if isinstance(extra, Mapping) else None
    covered = {"state_dict": ckpt.get("state_dict"), "optimizer_states": ckpt.get("optimizer_states")}
    if trained_d is not None:  # only in checkpoints whose discriminator is shrunk (see build_checkpoint)
        covered["discriminator"] = trained_d
    for where, t in _tensors(covered):
        t = t.detach().cpu().reshape(-1).contiguous()
        h.update(f"{where}|{t.dtype}|{t.numel()}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_loaded_tensors(obj: Any, source: str) -> None:
    """Refuse meta tensors, and verify the recorded checksum of a vits_fast checkpoint."""
    meta = [where for where, t in _tensors(obj) if t.is_meta]
    if meta:
        raise CheckpointError(f"checkpoint {source} holds {len(meta)} meta tensor(s) (shapes without data), e.g. "
                              f"{meta[0]}: it was saved from a model that was never materialised")
    extra = obj.get("vits_fast") if isinstance(obj, Mapping) else None
    if not isinstance(extra, Mapping) or "tensor_sha256" not in extra:
        return  # not written by vits_fast (Piper's own checkpoints carry no checksum)
    recorded = extra["tensor_sha256"]
    if not isinstance(recorded, str) or recorded != tensor_checksum(obj):
        raise CheckpointError(f"checkpoint {source} is corrupt: the SHA-256 of its tensors does not match the one "
                              f"recorded when it was written (damaged on disk or in transfer?)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


#: Nodes and nesting depth :func:`to_plain` converts (hyper-parameters are a few hundred values).
MAX_PLAIN_NODES = 1_000_000
MAX_PLAIN_DEPTH = 100


def to_plain(obj: Any) -> Any:
    """Replace inert placeholders (recursively) by plain dicts/lists and paths by strings (for hparams).

    Raises :class:`CheckpointError` past :data:`MAX_PLAIN_NODES` values or :data:`MAX_PLAIN_DEPTH` levels (a
    pickle that shares one list many times over would otherwise expand exponentially here).
    """
    count = [0]

    def convert(value: Any, depth: int) -> Any:
        count[0] += 1
        if count[0] > MAX_PLAIN_NODES or depth > MAX_PLAIN_DEPTH:
            raise CheckpointError(f"the checkpoint's settings are too large or too deeply nested (more than "
                                  f"{MAX_PLAIN_NODES} values or {MAX_PLAIN_DEPTH} levels)")
        if isinstance(value, InertObject):
            if len(value) or not (value.inert_args or value.inert_items or value.inert_state):
                return {str(k): convert(v, depth + 1) for k, v in value.items()}
            return {"__class__": value.inert_qualname, "args": convert(list(value.inert_args), depth + 1),
                    "state": convert(value.inert_state, depth + 1), "items": convert(value.inert_items, depth + 1)}
        if isinstance(value, Mapping):
            return {k: convert(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list):
            return [convert(v, depth + 1) for v in value]
        if isinstance(value, tuple):
            return tuple(convert(v, depth + 1) for v in value)
        if isinstance(value, pathlib.PurePath):
            return str(value)
        return value

    return convert(obj, 0)


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


def discriminator_state(ckpt: Mapping[str, Any]) -> Tuple[Dict[str, torch.Tensor], Optional[Any]]:
    """(discriminator tensors, its optimizer state or None) to train on from: the trained shrunk one a vits_fast
    checkpoint keeps in ``vits_fast.discriminator`` (its ``state_dict`` then holds a fresh Piper-sized one, see
    :func:`build_checkpoint`), else the ``model_d.*`` weights and the second optimizer state."""
    extra = ckpt.get("vits_fast")
    trained = extra.get("discriminator") if isinstance(extra, Mapping) else None
    if isinstance(trained, Mapping) and isinstance(trained.get("state_dict"), Mapping):
        return dict(trained["state_dict"]), trained.get("optimizer_state")
    opt_states = ckpt.get("optimizer_states")
    opt_d = opt_states[1] if isinstance(opt_states, list) and len(opt_states) == 2 else None
    return generator_state(ckpt)[1], opt_d


def checkpoint_origin(ckpt: Mapping[str, Any]) -> str:
    """Which trainer wrote ``ckpt``: ``"vits_fast"`` (its ``vits_fast`` entry), ``"lightning1"`` (rhasspy Piper,
    ``pytorch-lightning_version`` 1.x), ``"lightning2"`` (piper1-gpl, 2.x) or ``"other"`` (no Lightning version:
    a bare or VITS state dict)."""
    if isinstance(ckpt.get("vits_fast"), Mapping):
        return "vits_fast"
    version = str(ckpt.get("pytorch-lightning_version") or "")
    if version.startswith("1."):
        return "lightning1"
    if version[:1].isdigit():
        return "lightning2"
    return "other"


def batches_done(ckpt: Mapping[str, Any]) -> Any:
    """Training batches a checkpoint's ``global_step`` stands for: ``global_step //``
    :data:`OPTIMIZER_STEPS_PER_BATCH` for Lightning-written (Piper) checkpoints and vits_fast's current ones;
    vits_fast checkpoints written before that convention (no ``optimizer_steps_per_batch`` recorded) counted
    batches. A value that is no non-negative integer is returned as it is, for the caller to refuse."""
    step = ckpt.get("global_step", 0)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return step
    extra = ckpt.get("vits_fast")
    per_batch = extra.get("optimizer_steps_per_batch", 1) if isinstance(extra, Mapping) else OPTIMIZER_STEPS_PER_BATCH
    return step // per_batch if isinstance(per_batch, int) and per_batch >= 1 else per_batch


def _progress(done: int, *, started: bool = True, processed: bool = True) -> Dict[str, Any]:
    one = {"ready": done, "completed": done}
    if started:
        one["started"] = done
    if processed:
        one["processed"] = done
    return {"current": dict(one), "total": dict(one)}


def lightning_loops(version: str, *, epoch: int, batches: int, batch_in_epoch: int,
                    scheduler_steps: int = 0) -> Dict[str, Any]:
    """The ``loops`` entry Lightning restores a fit from, in the layout of Lightning ``version`` (1.x: the
    ``batch_loop`` nesting; 2.x: flat), for ``batches`` trained batches of which ``batch_in_epoch`` in the
    current ``epoch``, and ``scheduler_steps`` learning-rate scheduler steps. Both the automatic (rhasspy Piper)
    and the manual (piper1-gpl) optimizer-step counters hold ``batches *`` :data:`OPTIMIZER_STEPS_PER_BATCH`, so
    ``trainer.global_step`` resumes right in either mode. The keys are those the two trainers' own files hold
    (``tests/test_piper_compat.py`` compares them)."""
    steps = batches * OPTIMIZER_STEPS_PER_BATCH
    batch_progress = _progress(batches)
    for part in ("ready", "completed", "started", "processed"):
        batch_progress["current"][part] = batch_in_epoch
    batch_progress["is_last_batch"] = False
    auto = {"optimizer": {"step": _progress(steps, started=False, processed=False),
                          "zero_grad": _progress(steps, processed=False)}}
    manual = _progress(steps, started=False, processed=False)
    idle = _progress(0)
    idle["is_last_batch"] = False
    fit: Dict[str, Any] = {"epoch_loop.batch_progress": batch_progress,
                           "epoch_loop.scheduler_progress": _progress(scheduler_steps, started=False, processed=False),
                           "epoch_loop.state_dict": {"_batches_that_stepped": batches},
                           "epoch_progress": _progress(epoch), "state_dict": {}}
    idle_loop = {"batch_progress": dict(idle), "state_dict": {}}
    if str(version).startswith("1."):
        auto["optimizer_position"] = OPTIMIZER_STEPS_PER_BATCH  # both optimizers of the batch done, as 1.7 writes
        fit.update({"epoch_loop.batch_loop.optimizer_loop.optim_progress": auto,
                    "epoch_loop.batch_loop.optimizer_loop.state_dict": {},
                    "epoch_loop.batch_loop.manual_loop.optim_step_progress": manual,
                    "epoch_loop.batch_loop.manual_loop.state_dict": {},
                    "epoch_loop.batch_loop.state_dict": {},
                    "epoch_loop.val_loop.dataloader_progress": _progress(0, started=False, processed=False),
                    "epoch_loop.val_loop.epoch_loop.batch_progress": idle,
                    "epoch_loop.val_loop.epoch_loop.state_dict": {},
                    "epoch_loop.val_loop.state_dict": {}})
        idle_loop = {"dataloader_progress": _progress(0, started=False, processed=False),
                     "epoch_loop.batch_progress": dict(idle), "epoch_loop.state_dict": {}, "state_dict": {}}
    else:
        fit.update({"epoch_loop.automatic_optimization.optim_progress": auto,
                    "epoch_loop.automatic_optimization.state_dict": {},
                    "epoch_loop.manual_optimization.optim_step_progress": manual,
                    "epoch_loop.manual_optimization.state_dict": {},
                    "epoch_loop.val_loop.batch_progress": idle, "epoch_loop.val_loop.state_dict": {}})
    loops = {"fit_loop": fit, "validate_loop": idle_loop, "test_loop": copy.deepcopy(idle_loop),
             "predict_loop": copy.deepcopy(idle_loop)}
    predict = loops["predict_loop"]  # Lightning's prediction progress has no is_last_batch
    predict.get("batch_progress", predict.get("epoch_loop.batch_progress")).pop("is_last_batch")
    return loops


def split_optimizer_state(state: Mapping[str, Any], n: int) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(head, tail)`` of a one-group optimizer state dict over more parameters than vits_fast trains: ``head``
    holds its first ``n`` parameters (what an optimizer over those loads), ``tail`` the rest as ``{"params": count,
    "state": {index from 0: per-parameter state}}`` — piper1-gpl's discriminator optimizer also steps its
    multi-resolution discriminator (``model_mrd``), whose parameters come after ``model_d``'s."""
    (group,) = state["param_groups"]
    ids = list(group["params"])
    head = {"state": {i: v for i, v in state["state"].items() if i in ids[:n]},
            "param_groups": [{**group, "params": ids[:n]}]}
    tail = {"params": len(ids) - n, "state": {ids.index(i) - n: v for i, v in state["state"].items() if i in ids[n:]}}
    return head, tail


def join_optimizer_state(state: Mapping[str, Any], tail: Mapping[str, Any]) -> Dict[str, Any]:
    """``state`` (one param group) with the parameters of ``tail`` (see :func:`split_optimizer_state`) after its
    own, numbered on from its last."""
    (group,) = state["param_groups"]
    start = max(group["params"], default=-1) + 1
    joined = dict(state["state"])
    joined.update({start + i: v for i, v in tail["state"].items()})
    return {"state": joined, "param_groups": [{**group, "params": list(group["params"]) + list(
        range(start, start + tail["params"]))}]}


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


#: Inclusive bounds of the integer model settings a checkpoint (or a dataset config) may give, checked by
#: :func:`check_model_config` before anything is allocated. Piper's largest preset is far inside them.
MODEL_LIMITS: Dict[str, Tuple[int, int]] = {
    "n_vocab": (1, 65536), "n_speakers": (1, 65536), "spec_channels": (1, 8193), "segment_size": (1, 4096),
    "inter_channels": (1, 4096), "hidden_channels": (1, 4096), "filter_channels": (1, 16384), "n_heads": (1, 64),
    "n_layers": (0, 64), "kernel_size": (1, 63), "upsample_initial_channel": (1, 8192), "gin_channels": (0, 4096),
}
#: Bounds of the decoder's per-stage lists: entries per list, kernel/dilation/stride values, total upsampling.
MAX_STAGES, MAX_KERNEL, MAX_HOP = 8, 128, 4096
#: Parameters of the generator a checkpoint describes (Piper "high" has about 30 M).
MAX_PARAMETERS = 500_000_000
#: Inclusive bounds of the audio settings.
AUDIO_LIMITS: Dict[str, Tuple[int, int]] = {
    "sample_rate": (1000, 384000), "filter_length": (4, 65536), "hop_length": (1, 65536), "win_length": (1, 65536),
    "mel_channels": (1, 1024),
}
_MODEL_PARAMS = frozenset(inspect.signature(SynthesizerTrn.__init__).parameters) - {"self"}


def _int_in(name: str, value: Any, low: int, high: int) -> Optional[str]:
    if not isinstance(value, int) or isinstance(value, bool):
        return f"{name}={value!r} is not an integer"
    if not low <= value <= high:
        return f"{name}={value} is outside [{low}, {high}]"
    return None


def check_model_config(kwargs: Mapping[str, Any], audio: Optional[AudioConfig] = None,
                       name: str = "the checkpoint", error: type = None) -> None:
    """Raise ``error`` (default :class:`CheckpointError`) naming ``name`` unless ``kwargs`` are
    ``SynthesizerTrn`` arguments of known names and types inside :data:`MODEL_LIMITS` /
    :data:`MAX_STAGES` / :data:`MAX_KERNEL` / :data:`MAX_HOP`, whose generator has at most
    :data:`MAX_PARAMETERS` parameters (counted on the meta device: nothing is allocated), and ``audio`` is
    inside :data:`AUDIO_LIMITS`."""
    error = error or CheckpointError
    unknown = sorted(set(kwargs) - _MODEL_PARAMS)
    if unknown:
        raise error(f"{name}: unknown model setting(s) {unknown}; SynthesizerTrn takes {sorted(_MODEL_PARAMS)}")
    problems = [p for key, (lo, hi) in MODEL_LIMITS.items() if key in kwargs
                for p in [_int_in(key, kwargs[key], lo, hi)] if p]
    lists = {"resblock_kernel_sizes": 1, "resblock_dilation_sizes": 2, "upsample_rates": 1, "upsample_kernel_sizes": 1}
    for key, depth in lists.items():
        value = kwargs.get(key)
        rows = value if depth == 2 and isinstance(value, (list, tuple)) else [value]
        if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_STAGES or not all(
                isinstance(r, (list, tuple)) and 1 <= len(r) <= MAX_STAGES and not any(
                    _int_in(key, v, 1, MAX_KERNEL) for v in r) for r in rows):
            problems.append(f"{key}={value!r} is not a list of 1..{MAX_STAGES} integers in [1, {MAX_KERNEL}]"
                            + (" per entry" if depth == 2 else ""))
    if not problems:
        rates = kwargs["upsample_rates"]
        if math.prod(rates) > MAX_HOP:
            problems.append(f"upsample_rates {list(rates)} give {math.prod(rates)} samples per frame (> {MAX_HOP})")
        if len(kwargs["upsample_kernel_sizes"]) != len(rates):
            problems.append("upsample_kernel_sizes and upsample_rates differ in length")
        if len(kwargs["resblock_dilation_sizes"]) != len(kwargs["resblock_kernel_sizes"]):
            problems.append("resblock_dilation_sizes and resblock_kernel_sizes differ in length")
        if kwargs.get("resblock") not in ("1", "2"):
            problems.append(f"resblock={kwargs.get('resblock')!r} is not '1' or '2'")
        dropout = kwargs.get("p_dropout", 0.0)
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
            problems.append(f"p_dropout={dropout!r} is not a number in [0, 1)")
        if not isinstance(kwargs.get("use_sdp", True), bool):
            problems.append(f"use_sdp={kwargs.get('use_sdp')!r} is not true/false")
    if audio is not None:
        problems += [p for key, (lo, hi) in AUDIO_LIMITS.items() for p in [_int_in(key, getattr(audio, key), lo, hi)]
                     if p]
        if not problems and max(audio.hop_length, audio.win_length) > audio.filter_length:
            problems.append(f"hop_length {audio.hop_length} / win_length {audio.win_length} exceed filter_length "
                            f"{audio.filter_length}")
    if problems:
        raise error(f"{name}: invalid model settings: " + "; ".join(problems))
    try:
        with torch.device("meta"):
            count = sum(p.numel() for p in SynthesizerTrn(**kwargs).parameters())
    except (TypeError, ValueError, RuntimeError) as exc:
        raise error(f"{name}: these model settings do not build a model: {_first_line(exc)}") from None
    if count > MAX_PARAMETERS:
        raise error(f"{name}: the model it describes has {count} parameters (limit {MAX_PARAMETERS})")


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

    try:
        kwargs, audio, quality = _model_config(ckpt, hp, extra, default_sample_rate, name)
    except (TypeError, ValueError) as exc:  # a setting of the wrong type (a string where a number belongs, ...)
        raise CheckpointError(f"{name}: unusable model settings ({_first_line(exc)})") from None
    check_model_config(kwargs, audio, name)
    return kwargs, audio, quality


def _model_config(ckpt: Mapping[str, Any], hp: Dict[str, Any], extra: Mapping[str, Any],
                  default_sample_rate: Optional[Callable[[Optional[str]], int]],
                  name: str) -> Tuple[Dict[str, Any], AudioConfig, Optional[str]]:
    """:func:`model_config_from_checkpoint` before its checks."""

    def sample_rate_for(quality: Optional[str]) -> int:
        return int(default_sample_rate(quality)) if default_sample_rate is not None else AudioConfig().sample_rate

    if isinstance(extra.get("model_kwargs"), Mapping):
        quality = extra.get("quality")
        kwargs = {str(k): _tuple(v) for k, v in extra["model_kwargs"].items()}
        recorded_audio = extra.get("audio")
        if isinstance(recorded_audio, Mapping):
            fields = {f for f in AudioConfig.__dataclass_fields__}
            unknown = sorted(str(k) for k in recorded_audio if k not in fields)
            if unknown:
                raise CheckpointError(f"{name}: unknown audio setting(s) {unknown}; known: {sorted(fields)}")
            audio = AudioConfig(**recorded_audio)
        else:
            audio = _audio_from_hparams(hp, sample_rate_for(quality))
        return kwargs, audio, quality if quality is None or isinstance(quality, str) else str(quality)

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
    fit this architecture), or holds NaN/inf values or no data (meta): a model never starts from such weights.
    """
    own = model.state_dict()
    source = match_keys(model, source)
    meta = [k for k, v in source.items() if v.is_meta]
    if meta:
        raise CheckpointError(f"{what} has {len(meta)} meta tensor(s) (shapes without data): {meta[:8]}")
    nonfinite = [k for k, v in source.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise CheckpointError(f"{what} holds NaN/inf weights in {len(nonfinite)} tensor(s): {nonfinite[:8]}; "
                              f"it is the checkpoint of a diverged run or damaged")
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
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the checkpoint private, unlike any other file
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def build_checkpoint(model_g: torch.nn.Module, model_d: torch.nn.Module, optimizers: List[torch.optim.Optimizer],
                     schedulers: List[Any], epoch: int, global_step: int, hyper_parameters: Mapping[str, Any],
                     extra: Optional[Mapping[str, Any]] = None, *, lightning_version: str = LIGHTNING_VERSION,
                     batch_in_epoch: int = 0, piper_discriminator: Optional[torch.nn.Module] = None,
                     kept_state: Optional[Mapping[str, torch.Tensor]] = None,
                     kept_d_optimizer: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The Lightning-layout dict described in the module docstring, with the checksum of its tensors
    (:func:`tensor_checksum`) in ``vits_fast.tensor_sha256``.

    ``global_step`` is written as given (Lightning's count: :data:`OPTIMIZER_STEPS_PER_BATCH` per batch, recorded
    as ``vits_fast.optimizer_steps_per_batch``); ``loops`` (:func:`lightning_loops`, in the layout of
    ``lightning_version``) says the same, with ``batch_in_epoch`` batches done in ``epoch``.

    ``piper_discriminator``: when ``model_d`` is not Piper's shape (the shrunk CPU-demo discriminator), the
    Piper-shaped module whose weights go under ``model_d.*`` instead, so that Piper's strict loader reads the
    file; ``model_d``'s trained weights and optimizer state then go to ``vits_fast.discriminator``
    (``{"state_dict", "optimizer_state"}``, what vits_fast resumes from, see :func:`discriminator_state`) and the
    second ``optimizer_states`` entry keeps only its settings (no moments: Piper's discriminator starts afresh).
    ``kept_state``: further ``state_dict`` entries written back untouched (a source checkpoint's ``model_mrd.*``),
    ``kept_d_optimizer``: their part of the discriminator optimizer's state (:func:`split_optimizer_state`), joined
    back after ``model_d``'s.
    """
    state_dict: Dict[str, torch.Tensor] = collections.OrderedDict()
    stored_d = model_d if piper_discriminator is None else piper_discriminator
    for prefix, model in (("model_g.", model_g), ("model_d.", stored_d)):
        for key, value in model.state_dict().items():
            state_dict[prefix + key] = value
    state_dict.update(kept_state or {})
    opt_states = [opt.state_dict() for opt in optimizers]
    extra = dict(extra or {})
    if piper_discriminator is not None:
        extra["discriminator"] = {"state_dict": collections.OrderedDict(model_d.state_dict()),
                                  "optimizer_state": opt_states[1] if len(opt_states) == 2 else None}
        if len(opt_states) == 2:
            opt_states[1] = {"state": {}, "param_groups": opt_states[1]["param_groups"]}
    if kept_d_optimizer is not None and len(opt_states) == 2:
        opt_states[1] = join_optimizer_state(opt_states[1], kept_d_optimizer)
    extra["optimizer_steps_per_batch"] = OPTIMIZER_STEPS_PER_BATCH
    ckpt = {
        "epoch": int(epoch),
        "global_step": int(global_step),
        "pytorch-lightning_version": str(lightning_version),
        "state_dict": state_dict,
        "loops": lightning_loops(lightning_version, epoch=int(epoch),
                                 batches=int(global_step) // OPTIMIZER_STEPS_PER_BATCH,
                                 batch_in_epoch=int(batch_in_epoch),
                                 scheduler_steps=max(0, int(getattr(schedulers[0], "last_epoch", 0)))
                                 if schedulers else 0),
        "optimizer_states": opt_states,
        "lr_schedulers": [sched.state_dict() for sched in schedulers],
        "hyper_parameters": dict(hyper_parameters),
        "vits_fast": extra,
    }
    ckpt["vits_fast"]["tensor_sha256"] = tensor_checksum(ckpt)
    return ckpt


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
