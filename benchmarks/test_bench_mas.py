"""Monotonic alignment search (``maximum_path``), forward only (the path has no gradient).

Shapes (CUDA): B=16 with t_x = 128, 512, 1024 text positions and t_y = 4 t_x frames (the super-monotonic-align
anchors in REFERENCE.md; every item full length), and a Piper batch: B=32, t_x <= 400, t_y <= 1300, ragged. A CPU
runs B=2, 32 x 128 (full) and a ragged B=4, 40 x 130. Scores are float32 ``[b, t_y, t_x]`` (VITS layout), the mask
as the model builds it.

Entries per shape:

* ``cython``: the DP alone on host arrays (``maximum_path_cpu(..., "cython")``, OpenMP over the batch), no copies;
* ``reference``: ``vits_fast.maximum_path(neg_cent, mask)`` on the reference backend, as a training step calls it:
  on CUDA that is the device-to-host copy of the scores and lengths (a synchronisation), Cython, and the copy of
  the path back;
* ``compiled``: not applicable (skips);
* ``triton``: the same call on the Triton backend (no host synchronisation).
"""

from __future__ import annotations

import pytest
import torch

from _bench import DEVICE, ON_CUDA, measure
from vits_fast.monotonic_align import has_cython, maximum_path_cpu
from vits_fast.profile import Sizes, make_kernel_case

SHAPES = {
    True: {"B16-tx128": Sizes(16, 128, 512), "B16-tx512": Sizes(16, 512, 2048), "B16-tx1024": Sizes(16, 1024, 4096),
           "B32-tx400-ty1300": Sizes(32, 400, 1300)},
    False: {"B2-tx32": Sizes(2, 32, 128), "B4-tx40-ty130": Sizes(4, 40, 130)},
}[ON_CUDA]
MAS_IMPLS = ("cython", "reference", "compiled", "triton")
CASES = [(s, i) for s in SHAPES for i in MAS_IMPLS]


def _check_path(path: torch.Tensor, mask: torch.Tensor) -> None:
    """Every valid frame sits on exactly one text position; nothing outside the mask."""
    per_frame = path.float().sum(2)
    assert torch.equal(per_frame, mask[:, :, 0].float()), "alignment path is not one position per valid frame"
    assert float((path.float() * (1 - mask.float())).abs().sum()) == 0.0


@pytest.mark.parametrize("shape,impl", CASES, ids=[f"{s}-{i}" for s, i in CASES])
def test_mas(benchmark, case_cache, shape, impl):
    if impl == "compiled":
        pytest.skip("torch.compile does not apply: the alignment search is a serial dynamic programme (Cython on "
                    "the host, a Triton kernel on the GPU); the compiled entry has nothing to compile")
    if impl == "triton" and not ON_CUDA:
        pytest.skip("'triton' needs a CUDA device (the fused Triton kernels do not run on a CPU outside the "
                    "interpreter)")
    if impl == "cython" and not has_cython():
        pytest.skip("the Cython extension vits_fast.monotonic_align.core is not built (NumPy fallback only)")
    sizes = SHAPES[shape]
    backend = "triton" if impl == "triton" else "reference"
    ragged = shape.startswith(("B32", "B4"))
    case = case_cache.get(("mas", shape, backend), lambda: make_kernel_case("mas", "medium", sizes, DEVICE,
                                                                           backend=backend, ragged=ragged))
    mask = case.info["mask"]
    if impl == "cython":
        values = case.info["neg_cent"].float().cpu().contiguous().numpy()
        t_ys = case.info["y_lengths"].numpy()
        t_xs = case.info["x_lengths"].numpy()

        def fn():
            return maximum_path_cpu(values, t_ys, t_xs, "cython")

        _check_path(torch.from_numpy(fn()), mask.cpu())
    else:
        def fn():
            return case.forward()[0]

        _check_path(fn(), mask)
    extra = dict(subject="mas", shape=shape, batch=sizes.batch, t_x=sizes.text_len, t_y=sizes.frames,
                 ragged=ragged, dtype="fp32", direction="fwd")
    measure(benchmark, fn, group=f"mas fwd [{shape}: B={sizes.batch}, t_x<={sizes.text_len}, t_y<={sizes.frames}]",
            impl=impl, extra=extra)
