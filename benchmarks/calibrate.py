"""Measure the ceilings the cost model uses, on the GPU it runs on: ``python benchmarks/calibrate.py OUT.json``.

``--tiny`` shrinks every size (the suite's ``--dry-run`` on a CPU, which checks the script, not the machine).
Measured (on CUDA: CUDA events through ``triton.testing.do_bench``; on a CPU: host clock; median, after warm-up,
random data):

* ``copy_bytes_per_s``: a 1 GiB device-to-device copy, counting bytes read plus bytes written;
* ``matmul_flops_per_s``: an 8192^3 matrix product per dtype (``fp32`` with TF32 off, ``tf32``, ``bf16``, ``fp16``);
* ``conv1d_flops_per_s``: a HiFi-GAN-sized 1-D convolution (batch 16, 256 -> 256 channels, kernel 7, 8192 steps)
  per dtype (cuDNN, fp32 with TF32 off and on), the shape class most of a VITS step is made of;
* ``launch_s``: host time per launch of a one-element PyTorch op and of a one-element Triton kernel, each the
  mean over 2000 back-to-back launches (no synchronisation in between), which is what a launch-bound step pays;
  and the host time of one fused op, layer by layer (:func:`fused_op_host_times`).

Prints one line per number and writes them all to the JSON file. ``vits_fast.profile --estimate`` can read it
(``--calibration FILE``) in place of its documented defaults.
"""

from __future__ import annotations

import json
import platform
import sys
import time

import torch


ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
#: Sizes (full, tiny): copy bytes, matmul n, conv1d (batch, channels, kernel, steps), launches timed.
SIZES = {False: dict(copy=1 << 30, n=8192, conv=(16, 256, 7, 8192), launches=2000),
         True: dict(copy=1 << 22, n=128, conv=(1, 16, 7, 256), launches=100)}


def _bench(fn) -> float:
    """Median milliseconds of ``fn``: CUDA events (do_bench) on CUDA, the host clock over 5 calls on a CPU."""
    if ON_CUDA:
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=150, return_mode="median")
    fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[2]


def copy_rate(nbytes: int) -> float:
    """Bytes read + written per second by a ``nbytes`` copy (on CUDA: the profiler's own measurement)."""
    if ON_CUDA:
        from vits_fast.profile import copy_bandwidth

        return copy_bandwidth(DEVICE, nbytes)
    src = torch.rand(nbytes // 4, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * nbytes / (_bench(lambda: dst.copy_(src)) * 1e-3)


def matmul_rate(dtype: torch.dtype, tf32: bool, n: int = 8192) -> float:
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        ms = _bench(lambda: a @ b)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return 2 * n ** 3 / (ms * 1e-3)


def conv1d_rate(dtype: torch.dtype, tf32: bool, batch: int = 16, ch: int = 256, k: int = 7, t: int = 8192) -> float:
    x = torch.randn(batch, ch, t, device=DEVICE, dtype=dtype)
    w = torch.randn(ch, ch, k, device=DEVICE, dtype=dtype)
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = tf32
    old_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        ms = _bench(lambda: torch.nn.functional.conv1d(x, w, padding=k // 2))
    finally:
        torch.backends.cudnn.allow_tf32 = old
        torch.backends.cudnn.benchmark = old_benchmark
    return 2 * batch * ch * ch * k * t / (ms * 1e-3)


def _sync() -> None:
    if ON_CUDA:
        torch.cuda.synchronize()


def launch_time(fn, n: int = 2000) -> float:
    for _ in range(50):
        fn()
    _sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    _sync()
    return (t1 - t0) / n


def triton_launch_time() -> float:
    import triton
    import triton.language as tl

    @triton.jit
    def _one(x_ptr):  # x: [1]
        tl.store(x_ptr, tl.load(x_ptr) + 1.0)

    x = torch.zeros(1, device="cuda")
    return launch_time(lambda: _one[(1,)](x))


def fused_op_host_times() -> dict:
    """Host seconds per call of one fused op at a tiny size, peeled layer by layer: the registered op
    (``torch.ops.vits_fast.wn_gate``: dispatcher, autograd wrapper, launcher), its Python body alone (launcher
    and Triton launch), and the eager ops it replaces. The first H200 run found fused modules slower than the
    reference though each kernel ran at the copy ceiling; these numbers say which layer costs the host time."""
    from vits_fast.kernels import wn as _wn

    x = torch.randn(1, 32, 16, device="cuda")
    body = _wn.wn_gate._init_fn  # the custom op's own Python function, without torch.library's dispatch

    def eager():
        return torch.tanh(x[:, :16]) * torch.sigmoid(x[:, 16:])

    return {"wn_gate_op": launch_time(lambda: torch.ops.vits_fast.wn_gate(x, None)),
            "wn_gate_body": launch_time(lambda: body(x, None)),
            "wn_gate_eager_equivalent": launch_time(eager)}


def main(argv=None) -> dict:
    args = sys.argv[1:] if argv is None else list(argv)
    tiny = "--tiny" in args
    args = [a for a in args if a != "--tiny"]
    size = SIZES[tiny]
    if ON_CUDA:
        props = torch.cuda.get_device_properties(0)
        res = {"device": props.name, "sm": f"sm_{props.major}{props.minor}", "sms": props.multi_processor_count}
    else:
        res = {"device": f"cpu ({platform.processor() or platform.machine()})", "sm": "-", "sms": 0}
    dtypes = {"fp32": (torch.float32, False), "tf32": (torch.float32, True), "bf16": (torch.bfloat16, False),
              "fp16": (torch.float16, False)}
    if not ON_CUDA:  # TF32 is a CUDA mode; fp16 matmul/conv on a CPU is not what the cost model asks about
        dtypes = {k: dtypes[k] for k in ("fp32", "bf16")}
    res.update({
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()), "tiny": tiny,
        "copy_bytes_per_s": copy_rate(size["copy"]),
        "matmul_flops_per_s": {k: matmul_rate(d, tf, size["n"]) for k, (d, tf) in dtypes.items()},
        "conv1d_flops_per_s": {k: conv1d_rate(d, tf, *size["conv"]) for k, (d, tf) in dtypes.items()},
    })
    x = torch.zeros(1, device=DEVICE)
    res["launch_s"] = {"torch": launch_time(lambda: x.add_(1.0), size["launches"])}
    if ON_CUDA:
        try:
            res["launch_s"]["triton"] = triton_launch_time()
            res["launch_s"].update(fused_op_host_times())
        except Exception as exc:  # noqa: BLE001 -- report, keep the other numbers
            res["launch_s"]["triton_error"] = repr(exc)
    print(f"calibration on {res['device']} ({res['sm']}, {res['sms']} SMs), torch {res['torch']}"
          f"{' [--tiny: checks the script, not the machine]' if tiny else ''}:")
    print(f"  copy bandwidth        {res['copy_bytes_per_s'] / 1e12:8.2f} TB/s (read + write)")
    for kind in ("matmul", "conv1d"):
        for dt, v in res[f"{kind}_flops_per_s"].items():
            print(f"  {kind:6s} {dt:5s}          {v / 1e12:8.1f} TFLOP/s")
    for k, v in res["launch_s"].items():
        print(f"  launch {k:14s} {v * 1e6:8.2f} us" if isinstance(v, float) else f"  launch {k}: {v}")
    if args:
        with open(args[0], "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
