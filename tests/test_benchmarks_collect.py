"""The benchmark suite collects with every implementation per subject, runs under --benchmark-disable despite
pyproject's --benchmark-skip, and ``benchmarks/report.py`` turns its JSON into tables."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
# The smallest alignment-search shape of the suite on this machine (the suite's shapes depend on CUDA).
SMALL_MAS = "B16-tx128" if torch.cuda.is_available() else "B2-tx32"


def _pytest(*args: str, env: dict = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=full_env)


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report_module():
    return _load("vits_fast_bench_report", "report.py")


@pytest.mark.parametrize("on_cuda", [False, True])
def test_skip_reasons_per_device(monkeypatch, on_cuda):
    """Which entries run where (checked for both kinds of machine, whatever this one is)."""
    bench = _load("vits_fast_bench_helpers", "_bench.py")
    monkeypatch.setattr(bench, "ON_CUDA", on_cuda)
    monkeypatch.setattr(bench, "_COMPILE", ["medium"])
    cpu, cuda = ("tiny", "x-low"), ("x-low", "medium", "high")
    runs = lambda impl, config: bench.skip_reason(impl, config, cpu_configs=cpu, cuda_configs=cuda) is None  # noqa
    assert runs("reference", "x-low")
    assert runs("reference", "tiny") is not on_cuda
    assert runs("reference", "medium") is on_cuda
    assert runs("triton", "x-low") is on_cuda and runs("graphs", "x-low") is on_cuda
    assert runs("auto", "x-low") is on_cuda  # on a CPU the default backend is the reference path
    assert runs("compiled", "medium") is on_cuda  # medium is CUDA-only; compile is on for it
    assert not runs("compiled", "x-low") and not runs("fast", "high")  # compile selected for medium only
    reason = bench.skip_reason("triton", "x-low")
    if on_cuda:
        assert reason is None
    else:
        assert "CUDA" in reason


def test_suite_collects_every_subject_and_implementation():
    proc = _pytest("benchmarks", "--collect-only", "-q")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ids = set(re.findall(r"::(test_\w+)\[([^\]]+)\]", proc.stdout))
    by_test = {}
    for test, param in ids:
        by_test.setdefault(test, set()).add(param)
    for subject in ("wn", "spline", "coupling"):
        for config in ("x-low", "medium"):
            for direction in ("fwd", "bwd", "fwd+bwd"):
                for impl in ("reference", "compiled", "triton"):
                    assert f"{subject}-{config}-fp32-{impl}-{direction}" in by_test["test_kernel"]
    assert by_test["test_fused_call_host_time"] == {"dispatcher", "eager"}
    mas = by_test["test_mas"]
    shapes = {p.rsplit("-", 1)[0] for p in mas}
    assert len(shapes) >= 2
    for shape in shapes:
        for impl in ("cython", "reference", "compiled", "triton"):
            assert f"{shape}-{impl}" in mas
    for config in ("x-low", "medium", "high"):
        for impl in ("reference", "compiled", "triton", "auto", "fast"):
            assert f"{config}-fp32-{impl}" in by_test["test_train_step"]
        for what in ("rtf-b1", "rtf-b8", "rtf-b32", "ttfa"):
            for impl in ("reference", "compiled", "triton", "auto", "graphs", "fast"):
                assert f"{config}-{impl}-{what}" in by_test["test_infer"]


def test_disable_runs_once_and_default_skips(tmp_path):
    sel = ["benchmarks/test_bench_mas.py", "-q", "-k", f"{SMALL_MAS} and (cython or reference)"]
    proc = _pytest(*sel, "--benchmark-disable")
    assert "2 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = _pytest(*sel)  # pyproject's addopts: --benchmark-skip
    assert "2 skipped" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_report_from_a_real_run(tmp_path):
    out = tmp_path / "mas.json"
    proc = _pytest("benchmarks/test_bench_mas.py", "-q", "--benchmark-only", "-k",
                   f"{SMALL_MAS} and (cython or reference)", f"--benchmark-json={out}",
                   env={"VITS_FAST_BENCH_BUDGET_S": "0.02"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    entries = data["benchmarks"]
    assert {e["extra_info"]["impl"] for e in entries} == {"cython", "reference"}
    for e in entries:
        assert e["stats"]["rounds"] >= 3 and e["stats"]["median"] > 0
        assert e["extra_info"]["peak_mem_mb"] is not None and e["extra_info"]["peak_mem_mb"] >= 0
        if torch.cuda.is_available():
            info = e["extra_info"]
            assert 0 < info["device_ms_p20"] <= info["device_ms_median"] <= info["device_ms_p80"]
        assert e["group"].startswith(f"mas fwd [{SMALL_MAS}")
    assert data["machine_info"]["vits_fast"]["torch"]
    md = tmp_path / "r.md"
    report = _report_module()
    report.main([str(out), "-o", str(md), "--title", "t"])
    text = md.read_text()
    assert "## t" in text and "### Summary" in text and f"### mas fwd [{SMALL_MAS}" in text
    ref = next(e for e in entries if e["extra_info"]["impl"] == "reference")
    cy = next(e for e in entries if e["extra_info"]["impl"] == "cython")
    if torch.cuda.is_available():  # both carry do_bench device medians: the report compares those
        speedup = ref["extra_info"]["device_ms_median"] / cy["extra_info"]["device_ms_median"]
    else:
        speedup = ref["stats"]["median"] / cy["stats"]["median"]
    row = next(line for line in text.splitlines() if line.startswith("| cython |"))
    assert row.rstrip(" |").endswith(f"{speedup:.2f}x")


def _entry(group, impl, median_s, device_ms=None, run_extra=None):
    info = {"impl": impl, "peak_mem_mb": 1.5}
    if device_ms is not None:
        info.update(device_ms_median=device_ms, device_ms_p20=device_ms * 0.9, device_ms_p80=device_ms * 1.1)
    info.update(run_extra or {})
    return {"group": group, "name": f"test[{impl}]", "params": {}, "extra_info": info,
            "stats": {"median": median_s, "iqr": median_s / 10, "rounds": 5}}


def test_report_merges_files_and_prefers_device_time(tmp_path):
    machine = {"node": "box", "vits_fast": {"gpu": "Test GPU", "torch": "2.x", "triton": "3.x", "cuda": "13.0"}}
    a = {"machine_info": machine, "benchmarks": [_entry("g1", "reference", 0.010, device_ms=8.0),
                                                 _entry("g1", "triton", 0.005, device_ms=2.0),
                                                 _entry("g2", "reference", 0.002)]}
    b = {"machine_info": machine, "benchmarks": [_entry("g1", "compiled", 0.004, device_ms=4.0),
                                                 _entry("g2", "reference", 0.001),
                                                 {"group": "g3", "name": "x", "extra_info": {"impl": "reference"},
                                                  "stats": None}]}
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    report = _report_module()
    text = report.main([str(pa), str(pb), "-o", str(tmp_path / "o.md")])
    assert "**Test GPU**" in text
    g1 = text.split("### g1", 1)[1].split("###", 1)[0]
    rows = [line for line in g1.splitlines() if line.startswith("| ")][1:]  # after the header
    assert [r.split("|")[1].strip() for r in rows] == ["reference", "compiled", "triton"]  # merged, ordered
    assert rows[1].rstrip(" |").endswith("2.00x") and rows[2].rstrip(" |").endswith("4.00x")  # device medians
    assert "speedup by device median" in g1
    g2 = text.split("### g2", 1)[1].split("###", 1)[0]
    assert "reference (file 1)" in g2 and "reference (file 2)" in g2 and "speedup by wall median" in g2
    assert "| g1 | 8.000 (device) | triton | 4.00x |" in text
    assert "- g3: reference" in text.split("Not timed", 1)[1]
    compact = report.main([str(pa), str(pb), "--compact", "-o", str(tmp_path / "c.md")])
    assert "| g1 | triton | 5.000 | 0.500 | 5 | 2.000 | 1.800-2.200 | 1.50 | - | 4.00x |" in compact


def test_report_plot(tmp_path):
    pytest.importorskip("matplotlib")
    data = {"machine_info": {}, "benchmarks": [_entry("g1", "reference", 0.01), _entry("g1", "triton", 0.002),
                                               _entry("g2", "reference", 0.01)]}
    path = tmp_path / "a.json"
    path.write_text(json.dumps(data))
    _report_module().main([str(path), "-o", str(tmp_path / "o.md"), "--plot", str(tmp_path / "s.png")])
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_suite_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(BENCH / "gpu_suite.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(["bash", str(BENCH / "gpu_suite.sh")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and "usage" in proc.stderr  # OUTDIR is required
