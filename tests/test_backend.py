"""The backend switch: precedence, validation, and refusing to run Triton where it cannot."""

import importlib

import pytest
import torch

import vits_fast

# `vits_fast.backend` is the context manager; the module behind it:
B = importlib.import_module("vits_fast.backend")
from vits_fast.modules import WN


def test_precedence_env_context_module(monkeypatch):
    monkeypatch.setenv(B.ENV_VAR, "reference")
    assert B.current_backend() == "reference"
    with vits_fast.backend("triton"):
        assert B.current_backend() == "triton"
        with vits_fast.backend("auto"):
            assert B.current_backend() == "auto"
        assert B.current_backend() == "triton"
    assert B.current_backend() == "reference"

    wn = WN(4, 3, 1, 2)
    x = torch.randn(1, 4, 5)
    vits_fast.set_module_backend(wn, "reference")
    with vits_fast.backend("triton"):
        assert B.use_triton(x, module=wn) is False  # the module's own setting wins
    vits_fast.set_module_backend(wn, None)
    assert all(m.backend is None for m in wn.modules())


def test_auto_keeps_cpu_tensors_on_reference(monkeypatch):
    monkeypatch.delenv(B.ENV_VAR, raising=False)
    assert B.current_backend() == "auto"
    assert B.use_triton(torch.randn(3)) is False


def test_invalid_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        with vits_fast.backend("cuda"):
            pass
    monkeypatch.setenv(B.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="VITS_FAST_BACKEND"):
        B.current_backend()
    with pytest.raises(ValueError, match="set_module_backend"):
        vits_fast.set_module_backend(torch.nn.Linear(1, 1), "gpu")


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    # Triton reads TRITON_INTERPRET when it is first imported: import it before the variable is turned off here,
    # or every kernel imported later in this process would be compiled for a GPU instead of interpreted
    B.triton_importable()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with vits_fast.backend("triton"):
        with pytest.raises(B.BackendError, match="needs CUDA tensors"):
            B.use_triton(torch.randn(3))


def test_triton_missing_is_an_error(monkeypatch):
    monkeypatch.setattr(B, "triton_importable", lambda: False)
    with vits_fast.backend("triton"):
        with pytest.raises(B.BackendError, match="import triton"):
            B.use_triton(torch.randn(3))
    with vits_fast.backend("auto"):
        assert B.use_triton(torch.randn(3)) is False


def test_export_paths_use_reference(monkeypatch):
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
    with vits_fast.backend("triton"):
        assert B.use_triton(torch.randn(3)) is False


def test_context_is_thread_local():
    import threading

    seen = {}
    with vits_fast.backend("reference"):
        t = threading.Thread(target=lambda: seen.setdefault("other", B.current_backend()))
        t.start()
        t.join()
    assert seen["other"] == B.current_backend()  # the other thread never saw this thread's block


def test_auto_follows_the_family_table(monkeypatch):
    from vits_fast.models import Generator
    from vits_fast.modules import ConvFlow, ResBlock2, ResidualCouplingLayer

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(B, "triton_importable", lambda: True)
    with B.host_as_device():  # CPU tensors count as device tensors for auto (what it sees on a GPU)
        gen = Generator(8, 1, [3], [[1, 3]], [2], 8, [4])
        x = torch.randn(2, 4, 9)
        # (module, fused without autograd, fused while autograd records)
        cases = [(WN(4, 3, 1, 2), False, True), (ResidualCouplingLayer(4, 4, 3, 1, 2), False, True),
                 (ConvFlow(4, 4, 3, 2), True, True), (ResBlock2(4), False, False)]
        for module, inference, training in cases:
            for grad, fused in ((False, inference), (True, training)):
                with torch.set_grad_enabled(grad), vits_fast.backend("auto"):
                    assert B.use_triton(x, module=module) is fused, (type(module).__name__, grad)
                with torch.set_grad_enabled(grad), vits_fast.backend("triton"):
                    assert B.use_triton(x, module=module) is True  # triton forces every family
        start = B.AUTO_FUSED_FROM["hifigan"][0]
        with torch.no_grad(), vits_fast.backend("auto"):
            assert B.use_triton(torch.randn(4, 8, start // 4 - 1), module=gen) is False  # batch x time below the rule
            assert B.use_triton(torch.randn(4, 8, start // 4), module=gen) is True
            assert B.use_triton(torch.randn(2, 3, 1), family="mas") is True
            assert B.use_triton(torch.randn(2, 3)) is True  # no family: every fused op where tensors allow
            monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
            assert B.use_triton(torch.randn(1, 8, 1), module=gen) is True  # compiled code keeps every family


def test_every_fused_family_has_an_auto_rule():
    from vits_fast import models, modules

    families = {cls.fused_family for mod in (models, modules) for cls in vars(mod).values()
                if isinstance(cls, type) and issubclass(cls, torch.nn.Module) and hasattr(cls, "fused_family")}
    assert families | {"mas"} == set(B.AUTO_FUSED_FROM)


def test_describe_names_what_runs_fused(monkeypatch):
    monkeypatch.setattr(B, "triton_importable", lambda: True)
    cuda = torch.device("cuda")
    with vits_fast.backend("auto"):
        assert B.describe(cuda, training=True) == ("backend auto (training): fused mas, spline, wn, coupling; "
                                                   "hifigan from 2400 frames; reference resblock, period")
        assert B.describe(cuda, training=False) == ("backend auto (synthesis): fused mas, spline; hifigan from 2400 "
                                                    "frames; reference wn, coupling, resblock, period")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert B.describe(torch.device("cpu"), training=True) == "backend auto: the reference path"
    with vits_fast.backend("triton"):
        assert B.describe(cuda, training=True) == "backend triton: every fused family"
    with vits_fast.backend("reference"):
        assert B.describe(cuda, training=True) == "backend reference: the reference path"
