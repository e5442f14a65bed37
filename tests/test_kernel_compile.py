"""Every Triton kernel of the project compiles for real GPUs, without local-memory spills.

Each module under ``vits_fast.kernels`` lists the launch configurations its launchers use in
``COMPILE_CONFIGS`` (``dict(fn=..., signature={...}, constexprs={...}, name=..., [num_warps=...]``). Every
entry is compiled ahead of time with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` for
sm_90 (H100/H200) and sm_80 (A100); the cubin goes through the ``cuobjdump --dump-resource-usage`` shipped in
the triton wheel (``triton/backends/nvidia/bin``), whose REG/STACK/SHARED/LOCAL we print (``pytest -s``) and
check: a compile error, LOCAL > 0 or STACK > 0 fails.

Spills show up as STACK, not LOCAL: ptxas puts spilled registers in the ABI stack frame (the spilling control
kernel below reports e.g. ``REG:255 STACK:544 LOCAL:0``, and ``ptxas -v`` on its PTX says "520 bytes stack
frame, 620 bytes spill stores"). Triton kernels make no calls that need a stack, so STACK > 0 means spills
(or a local array); both are failures here.

Why a subprocess: ``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before Triton is imported, and under it
``@triton.jit`` builds interpreter functions that ``ASTSource`` cannot compile. The worker (this file run as
a script) starts with ``TRITON_INTERPRET`` removed, so the kernel modules are imported afresh as real
``JITFunction``s, and with a private ``TRITON_CACHE_DIR`` so that every kernel is really compiled.

A control run compiles two deliberately bad kernels (one that spills, one that does not compile) to prove
that the checker reports both. The two targets compile in two workers side by side (compiling is
single-threaded); with the wn, spline, coupling, mas and hifigan kernels the test took 64 s on a busy
two-core machine.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time

import pytest

TARGETS = ((90, 32), (80, 32))  # (compute capability, warp size)
RECORD = "@@KERNEL-COMPILE@@ "  # prefix of the worker's JSON lines on stdout
WORKER_TIMEOUT_S = 300
_serial = itertools.count()


def parse_resource_usage(text: str) -> dict:
    """``cuobjdump --dump-resource-usage`` output -> ``{function name: {"REG": int, ...}}``."""
    usage, current = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function\s+([^\s:]+)\s*:", line)
        if m:
            current = m.group(1)
            continue
        if current is not None and "REG:" in line:
            usage[current] = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            current = None
    return usage


# ---------------------------------------------------------------------------------------------------------------
# Worker side (runs without TRITON_INTERPRET)
# ---------------------------------------------------------------------------------------------------------------


def _ast_source(fn, signature: dict, constexprs: dict):
    """``ASTSource`` across Triton versions: constexpr keys are ``(arg index,)`` tuples (accepted by 3.2+,
    including 3.6 and 3.9); a Triton that wants argument names gets names instead."""
    from triton.compiler import ASTSource

    by_index = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    try:
        return ASTSource(fn=fn, signature=signature, constexprs=by_index)
    except (AssertionError, TypeError, KeyError, ValueError):
        return ASTSource(fn=fn, signature=signature, constexprs=dict(constexprs))


def _compile_one(cfg: dict, cc: int, warp: int, cuobjdump: str, tmpdir: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    rec = {"name": cfg.get("name", cfg["fn"].__name__), "kernel": cfg["fn"].__name__, "cc": cc}
    t0 = time.perf_counter()
    try:
        options = {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}
        src = _ast_source(cfg["fn"], cfg["signature"], cfg.get("constexprs", {}))
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, warp), options=options)
        path = os.path.join(tmpdir, f"{rec['kernel']}_sm{cc}_{next(_serial)}.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        out = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True, timeout=60)
        usage = parse_resource_usage(out.stdout)
        if out.returncode != 0 or len(usage) != 1:
            raise RuntimeError(f"cuobjdump rc={out.returncode}: {out.stdout[-500:]} {out.stderr[-500:]}")
        rec.update(next(iter(usage.values())))
        rec["ok"] = True
    except Exception as exc:  # reported, and failed, by the parent
        rec.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[-1500:]}")
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def _emit(rec: dict) -> None:
    print(RECORD + json.dumps(rec), flush=True)


def _worker() -> None:
    import importlib
    import pkgutil
    import tempfile

    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.isfile(cuobjdump):
        _emit({"fatal": f"cuobjdump not found at {cuobjdump}; the triton wheel ships it (triton "
                        f"{triton.__version__})"})
        return
    targets = TARGETS
    if "--cc" in sys.argv:
        cc = int(sys.argv[sys.argv.index("--cc") + 1])
        targets = [t for t in TARGETS if t[0] == cc]
    with tempfile.TemporaryDirectory() as tmpdir:
        if "--control" in sys.argv:
            for name, cfg in _control_configs().items():
                _emit(dict(_compile_one(cfg, 90, 32, cuobjdump, tmpdir), module="<control>", control=name))
            return
        import vits_fast.kernels as pkg

        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
            if info.name.startswith("_"):
                continue
            modname = f"{pkg.__name__}.{info.name}"
            try:
                mod = importlib.import_module(modname)
                configs = mod.COMPILE_CONFIGS
                assert configs, "COMPILE_CONFIGS is empty"
            except Exception as exc:
                _emit({"module": modname, "name": "<import>", "kernel": "-", "cc": 0, "ok": False,
                       "error": f"{type(exc).__name__}: {exc} (each kernel module must define COMPILE_CONFIGS)"})
                continue
            for cfg in configs:
                for cc, warp in targets:
                    _emit(dict(_compile_one(cfg, cc, warp, cuobjdump, tmpdir), module=modname))


# Control kernels: the checker must flag both.
try:
    import triton
    import triton.language as tl

    @triton.jit
    def _control_spill_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
        # 32 threads hold BLOCK fp32 values each live across a reduction: far beyond 255 registers.
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs)
        tl.store(y_ptr + offs, x / tl.sum(x * x, axis=0) + tl.sum(tl.exp(x), axis=0))

    @triton.jit
    def _control_error_kernel(x_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)  # BLOCK is not a power of two: tl.arange rejects it
        tl.store(x_ptr + offs, offs)
except ImportError:  # the parent test reports a missing triton itself
    pass


def _control_configs() -> dict:
    return {
        "spill": dict(fn=_control_spill_kernel, signature={"x_ptr": "*fp32", "y_ptr": "*fp32", "BLOCK": "constexpr"},
                      constexprs={"BLOCK": 8192}, num_warps=1, name="control: spills"),
        "error": dict(fn=_control_error_kernel, signature={"x_ptr": "*i32", "BLOCK": "constexpr"},
                      constexprs={"BLOCK": 100}, name="control: compile error"),
    }


# ---------------------------------------------------------------------------------------------------------------
# Parent side (pytest)
# ---------------------------------------------------------------------------------------------------------------


def _start_worker(tmp_path_factory, *args):
    """Start the worker; its stdout/stderr go to files (a full pipe would stall a worker nobody reads yet)."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # the kernels cannot exist without it: a failure, not a skip
        pytest.fail(f"triton is not importable ({exc}); install vits_fast[triton]")
    tmp = tmp_path_factory.mktemp("compile_worker")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_CACHE_DIR"] = str(tmp / "triton_cache")
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # import vits_fast as this process does
    out, err = open(tmp / "stdout", "w+"), open(tmp / "stderr", "w+")
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", *args], env=env,
                            stdout=out, stderr=err, text=True)
    return proc, out, err


def _collect(worker) -> list:
    proc, out, err = worker
    try:
        proc.wait(timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read(), err.read()
    out.close()
    err.close()
    recs = [json.loads(line[len(RECORD):]) for line in stdout.splitlines() if line.startswith(RECORD)]
    assert proc.returncode == 0, (f"compile worker failed or ran over {WORKER_TIMEOUT_S} s (rc={proc.returncode}):"
                                  f"\n{stdout[-2000:]}\n{stderr[-4000:]}")
    fatal = [r["fatal"] for r in recs if "fatal" in r]
    assert not fatal, fatal[0]
    assert recs, f"compile worker reported nothing:\n{stdout[-2000:]}\n{stderr[-2000:]}"
    return recs


def _spills(r: dict) -> bool:
    return r["STACK"] > 0 or r["LOCAL"] > 0


@pytest.fixture(scope="module")
def compile_report(tmp_path_factory):
    # one worker per target, side by side (compilation is single-threaded)
    procs = [_start_worker(tmp_path_factory, "--cc", str(cc)) for cc, _ in TARGETS]
    return [r for p in procs for r in _collect(p)]


def test_parse_resource_usage():
    text = ("Resource usage:\n Common:\n  GLOBAL:0\n Function _k_a:\n  REG:40 STACK:0 SHARED:0 LOCAL:0 "
            "CONSTANT[0]:584 TEXTURE:0\n Function _k_b:\n  REG:255 STACK:16 SHARED:1024 LOCAL:24 CONSTANT[0]:1\n")
    assert parse_resource_usage(text) == {
        "_k_a": {"REG": 40, "STACK": 0, "SHARED": 0, "LOCAL": 0},
        "_k_b": {"REG": 255, "STACK": 16, "SHARED": 1024, "LOCAL": 24},
    }


def test_all_kernels_compile_without_spills(compile_report):
    print(f"\n{'module':<26} {'config':<44} {'sm':>3} {'REG':>4} {'STACK':>5} {'SHARED':>6} {'LOCAL':>5} {'s':>5}")
    for r in compile_report:
        if r.get("ok"):
            print(f"{r['module']:<26} {r['name'][:44]:<44} {r['cc']:>3} {r['REG']:>4} {r['STACK']:>5} "
                  f"{r['SHARED']:>6} {r['LOCAL']:>5} {r['seconds']:>5}")
        else:
            print(f"{r['module']:<26} {r['name'][:44]:<44} {r['cc']:>3} FAILED")
    modules = {r["module"] for r in compile_report}
    assert "vits_fast.kernels.wn" in modules, f"kernel modules found: {sorted(modules)}"
    errors = [f"{r['module']} / {r['name']} (sm_{r['cc']}): {r['error']}" for r in compile_report if not r["ok"]]
    assert not errors, "kernels that do not compile:\n" + "\n".join(errors)
    spills = [f"{r['module']} / {r['name']} (sm_{r['cc']}): STACK={r['STACK']} LOCAL={r['LOCAL']} REG={r['REG']}"
              for r in compile_report if _spills(r)]
    assert not spills, "kernels that spill to local memory:\n" + "\n".join(spills)
    # every config compiled for every target
    per_cfg = {}
    for r in compile_report:
        per_cfg.setdefault((r["module"], r["name"]), set()).add(r["cc"])
    assert all(ccs == {cc for cc, _ in TARGETS} for ccs in per_cfg.values()), per_cfg


def test_checker_flags_spills_and_compile_errors(tmp_path_factory):
    recs = {r["control"]: r for r in _collect(_start_worker(tmp_path_factory, "--control"))}
    spill, error = recs["spill"], recs["error"]
    assert spill["ok"] and _spills(spill), f"the spilling control kernel was not caught: {spill}"
    assert not error["ok"] and error["error"], f"the broken control kernel compiled: {error}"


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
