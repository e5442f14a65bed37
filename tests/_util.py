"""Helpers shared by the model-level and kernel tests."""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode


def randomised(module, seed=0, scale=0.2, dtype=torch.float32):
    """Fill every parameter with seeded random values drawn in ``dtype`` (zero-initialised projections would hide
    bugs); eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * scale)
    return module.eval()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add contention on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FusedOps(TorchDispatchMode):
    """Counts the ``vits_fast::`` custom ops dispatched inside the ``with`` block, forward and backward alike
    (``counts["wn_gate"]``; with ``prefix`` only the ops whose name starts with it). A module test uses it to
    prove that the fused path ran, without replacing any function of the code under test."""

    def __init__(self, prefix: str = ""):
        super().__init__()
        self.prefix = prefix
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ns, _, name = func.name().partition("::")
        if ns == "vits_fast" and name.startswith(self.prefix):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def graph_recorder():
    """A ``torch.compile`` backend (Dynamo + AOTAutograd, graphs run eagerly: no code generation) and the dict
    ``{"fw": [...], "bw": [...]}`` into which it records the text of every forward and backward graph."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {"fw": [], "bw": []}

    def recorder(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(str(gm.graph))
            return make_boxed_func(gm.forward)
        return compiler

    return aot_autograd(fw_compiler=recorder("fw"), bw_compiler=recorder("bw")), graphs
