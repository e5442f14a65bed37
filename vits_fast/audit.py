"""Host-synchronisation and launch audit: ``python -m vits_fast.audit [--workload train-step|infer]``.

Runs one training step or one synthesis call of a tiny model on the CPU, on the fused path (the Triton kernels in
Triton's interpreter, the same custom ops and launchers CUDA runs) and on the reference path, and records

* every operation that would make the host wait for a GPU, with the source line in vits_fast that asked for it:
  scalar reads (``item``, ``bool``/``int``/``float`` of a tensor, ``tolist``), ``numpy``, copies to the CPU
  (``cpu()``, ``to("cpu")``), and ops whose output size depends on tensor values (``nonzero``, boolean-mask
  indexing, ``masked_select``, ``unique``, ``repeat_interleave`` without an output size). While recording,
  CPU tensors count as device tensors (:func:`vits_fast.backend.on_host` is False), so the code takes the
  branches it takes on a GPU;
* the operations that launch device work (views and allocations excluded), per ``vits.<stage>`` range.

Why real tiny tensors rather than fake ones: on fake tensors a data-dependent read cannot return a value, so the
first synchronisation would end the run and the rest would go unseen, and ``numpy``/``tolist`` have no fake
form; a CPU-only PyTorch cannot run autograd on fake CUDA tensors either. The interpreter executes the real
launchers, so what the fused path asks of the host is exactly what it asks on CUDA. What a CPU run cannot see is
a copy between devices that does not go through the calls above (none exists in vits_fast).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .backend import host_as_device

_PKG = os.path.dirname(os.path.abspath(__file__))
_HERE = os.path.abspath(__file__)
_aten = torch.ops.aten

#: Ops whose result the host must read (scalar reads) or whose output size depends on values.
SYNC_OPS = {
    _aten._local_scalar_dense.default: "scalar read",
    _aten.nonzero.default: "nonzero",
    _aten.masked_select.default: "masked_select",
    _aten._unique2.default: "unique",
    _aten.unique_consecutive.default: "unique",
    _aten.unique_dim.default: "unique",
    _aten.equal.default: "equal (host bool)",
    _aten.is_nonzero.default: "bool of a tensor",
}
#: Ops that allocate or reinterpret memory without launching a kernel.
_NO_LAUNCH = {_aten.empty.memory_format, _aten.empty_strided.default, _aten.empty_like.default,
              _aten.detach.default, _aten.lift_fresh.default, _aten._local_scalar_dense.default}


@dataclass(frozen=True)
class Sync:
    """One host synchronisation: ``kind`` (what was asked), ``where`` (``file.py:line in function`` of the
    innermost vits_fast frame that asked), ``via`` (the next vits_fast frame out, its caller), ``stage`` (the
    innermost ``vits.<stage>`` range, or "-")."""

    kind: str
    where: str
    via: str
    stage: str


@dataclass
class AuditResult:
    """Syncs in the order they happened (one entry per kind and source line) and launching ops per stage."""

    syncs: List[Sync] = field(default_factory=list)
    ops: Dict[str, collections.Counter] = field(default_factory=lambda: collections.defaultdict(collections.Counter))

    def sites(self) -> List[str]:
        return sorted({f"{s.kind} at {s.where}" for s in self.syncs})


def _callers(depth: int = 2) -> List[str]:
    """``relative/file.py:line in function`` of the ``depth`` innermost frames inside vits_fast (not this
    module), innermost first, padded with "outside vits_fast"."""
    found = []
    for frame in reversed(traceback.extract_stack()[:-1]):
        path = os.path.abspath(frame.filename)
        if path.startswith(_PKG) and path != _HERE:
            found.append(f"{os.path.relpath(path, os.path.dirname(_PKG))}:{frame.lineno} in {frame.name}")
            if len(found) == depth:
                break
    return found + ["outside vits_fast"] * (depth - len(found))


class _Recorder(TorchDispatchMode):
    def __init__(self, result: AuditResult, stages: List[str]):
        super().__init__()
        self.result, self.stages = result, stages
        self._seen = set()

    def stage(self) -> str:
        return self.stages[-1] if self.stages else "-"

    def sync(self, kind: str) -> None:
        where, via = _callers()
        key = (kind, where)
        if key not in self._seen:
            self._seen.add(key)
            self.result.syncs.append(Sync(kind, where, via, self.stage()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = SYNC_OPS.get(func)
        if kind is None and func in (_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(i is not None and i.dtype == torch.bool for i in indices):
                kind = "boolean-mask indexing"
        if kind is None and func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            kind = "repeat_interleave without output_size"
        if kind is not None:
            self.sync(kind)
        if func not in _NO_LAUNCH and not func.is_view:
            self.result.ops[self.stage()][func.name()] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def record() -> Iterator[AuditResult]:
    """Record host synchronisations and launching ops of the enclosed code (see the module doc)."""
    result = AuditResult()
    stages: List[str] = []
    rf = torch.autograd.profiler.record_function
    enter, exit_ = rf.__enter__, rf.__exit__

    def rf_enter(self):
        if self.name.startswith("vits."):
            stages.append(self.name[5:])
        return enter(self)

    def rf_exit(self, *exc):
        if self.name.startswith("vits.") and stages:
            stages.pop()
        return exit_(self, *exc)

    mode = _Recorder(result, stages)
    patched = {}

    def watch(name: str, kind: str, when: Callable[..., bool] = lambda *a, **k: True):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if when(self, *args, **kwargs):
                mode.sync(kind)
            return original(self, *args, **kwargs)

        patched[name] = original
        setattr(torch.Tensor, name, wrapper)

    def to_cpu(self, *args, **kwargs):  # to("cpu"): a device object may be another tensor's (on CUDA, the GPU)
        target = kwargs.get("device", args[0] if args else None)
        return isinstance(target, str) and torch.device(target).type == "cpu"

    rf.__enter__, rf.__exit__ = rf_enter, rf_exit
    inference_mode = torch.inference_mode
    # Under inference_mode PyTorch reads a tensor passed as a size (torch.arange(lengths.max())) without
    # dispatching, out of the recorder's sight; no_grad computes the same and dispatches every read.
    torch.inference_mode = lambda mode=True: torch.no_grad() if mode else contextlib.nullcontext()
    try:
        watch("tolist", "tolist")
        watch("numpy", "numpy")
        watch("cpu", "copy to the CPU")
        watch("to", "copy to the CPU", to_cpu)
        with host_as_device(), mode:
            yield result
    finally:
        torch.inference_mode = inference_mode
        rf.__enter__, rf.__exit__ = enter, exit_
        for name, original in patched.items():
            setattr(torch.Tensor, name, original)


# ----------------------------------------------------------------------------------------------------------
# Workloads
# ----------------------------------------------------------------------------------------------------------

def _fused_ready() -> bool:
    from .backend import interpreter_enabled

    return torch.cuda.is_available() or interpreter_enabled()


def audit_train_step(backend: str, config: str = "tiny", precision: str = "fp32", seed: int = 0) -> AuditResult:
    """One :func:`vits_fast.train.step.train_step` (warmed up once outside the record) and the push of its losses
    to :class:`vits_fast.train.step.DeferredRead`, on CPU tensors of ``config`` with ``backend``."""
    from .profile import Sizes, TrainStep
    from .train.step import DeferredRead

    step = TrainStep(config, Sizes(2, 6, 20), torch.device("cpu"), backend=backend, precision=precision, seed=seed)
    step()  # first-call work (lazy imports, kernel caches) is not what a step costs
    reader = DeferredRead()
    with record() as result:
        reader.push(step())
    return result


def audit_infer(backend: str, config: str = "tiny", seed: int = 0) -> AuditResult:
    """One batched synthesis call (:class:`vits_fast.profile.InferStep`) on CPU tensors."""
    from .profile import InferStep, Sizes

    step = InferStep(config, Sizes(2, 7, 0), torch.device("cpu"), backend=backend, seed=seed)
    step()
    with record() as result:
        step()
    return result


def format_side_by_side(fused: AuditResult, reference: AuditResult, title: str) -> str:
    lines = [title, ""]
    for name, res in (("fused (triton)", fused), ("reference", reference)):
        lines.append(f"{name}: {len(res.syncs)} host synchronisation site(s)")
        lines += [f"  [{s.stage}] {s.kind} at {s.where} (from {s.via})" for s in res.syncs] or ["  none"]
    lines += ["", "launching ops per stage (views and allocations excluded)",
              f"{'stage':<22}{'fused':>8}{'reference':>11}"]
    for st in sorted(set(fused.ops) | set(reference.ops)):
        lines.append(f"{st:<22}{sum(fused.ops[st].values()):>8}{sum(reference.ops[st].values()):>11}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Tuple[AuditResult, AuditResult]:
    p = argparse.ArgumentParser(prog="python -m vits_fast.audit", description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="train-step", choices=("train-step", "infer"))
    p.add_argument("--config", default="tiny", choices=("tiny", "x-low"))
    args = p.parse_args(argv)
    if not _fused_ready():
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the fused path in the interpreter
    run = audit_train_step if args.workload == "train-step" else audit_infer
    fused, reference = run("triton", args.config), run("reference", args.config)
    print(format_side_by_side(fused, reference, f"vits_fast.audit: {args.workload}, config {args.config}, CPU "
                              f"tensors (fused path in Triton's interpreter)"))
    return fused, reference


if __name__ == "__main__":
    main()
