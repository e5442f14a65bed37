#!/usr/bin/env python3
"""Count the elementwise launches of the HiFi-GAN decoder, reference path against fused path.

Every op dispatched during one forward and one backward is counted with a ``TorchDispatchMode``, except views,
allocations, convolutions and weight norm (the same on both paths; their count is printed separately). A fused
``vits_fast::hifigan_*`` op is one Triton launch. The counts depend on the module structure only, so the
Piper presets' decoders are built with their real structure (stages, blocks, kernel sizes, dilations) and a
few channels, and run on the CPU with the Triton interpreter.

Usage: ``python scripts/count_decoder_launches.py`` (from the repository root). The table in the header of
``kernels/hifigan.py`` is this script's output.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from collections import Counter  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from vits_fast.backend import backend  # noqa: E402
from vits_fast.config import PRESETS  # noqa: E402
from vits_fast.models import Generator  # noqa: E402
from vits_fast.modules import ResBlock1, ResBlock2  # noqa: E402

ALLOCATIONS = ("aten::empty", "aten::new_empty")
CONVOLUTIONS = ("aten::convolution", "aten::convolution_backward", "aten::_weight_norm_interface",
                "aten::_weight_norm_interface_backward")


class LaunchCounter(TorchDispatchMode):
    """Counts dispatched ops by kind: ``fused``, ``aten`` (elementwise and reductions) and ``conv``."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        is_view = any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
        if not (is_view or name.startswith(ALLOCATIONS)):
            kind = "fused" if name.startswith("vits_fast::") else "conv" if name in CONVOLUTIONS else "aten"
            self.counts[kind] += 1
        return func(*args, **(kwargs or {}))


def count(module, args, path):
    """(forward counts, backward counts) of ``module(*args)`` on backend ``path``; args[0] gets a gradient."""
    args = [args[0].detach().requires_grad_(True), *args[1:]]
    module.zero_grad(set_to_none=True)
    with backend(path):
        with LaunchCounter() as fwd:
            out = module(*args)
        seed = torch.ones_like(out)
        with LaunchCounter() as bwd:
            out.backward(seed)
    return fwd.counts, bwd.counts


def row(label, module, args, mask):
    cells = []
    for path in ("reference", "triton"):
        for m in (mask, None):
            fwd, bwd = count(module, [*args, m], path)
            cells.append(f"{fwd['aten'] + fwd['fused']:4d} {bwd['aten'] + bwd['fused']:4d}")
    print(f"{label:38s} " + "   ".join(cells) + f"   (convs/weight norm fwd {fwd['conv']})")


def main():
    torch.manual_seed(0)
    print(f"{'elementwise launches, fwd bwd':38s} {'eager mask':>9s}   {'eager none':>9s}   {'fused mask':>9s}   "
          f"{'fused none':>9s}")
    x = torch.randn(2, 4, 16)
    mask = (torch.arange(16)[None] < torch.tensor([16, 9])[:, None]).float()[:, None]
    row("ResBlock1 (3 dilation pairs)", ResBlock1(4, 3, (1, 3, 5)), [x], mask)
    row("ResBlock2 (2 convs)", ResBlock2(4, 3, (1, 2)), [x], mask)
    for quality in ("medium", "high"):
        p = PRESETS[quality]
        gen = Generator(6, p["resblock"], p["resblock_kernel_sizes"], p["resblock_dilation_sizes"],
                        p["upsample_rates"], 2 ** (len(p["upsample_rates"]) + 1), p["upsample_kernel_sizes"],
                        gin_channels=4)
        z, g = torch.randn(2, 6, 3), torch.randn(2, 4, 1)
        frame_mask = torch.tensor([[[1.0, 1, 1]], [[1, 1, 0]]])
        row(f"Generator {quality}", gen, [z, None], frame_mask)
        row(f"Generator {quality}, speaker-conditioned", gen, [z, g], frame_mask)


if __name__ == "__main__":
    main()
