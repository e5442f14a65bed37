#!/usr/bin/env bash
# Everything a GPU session runs, in one command:  bash benchmarks/gpu_suite.sh OUTDIR
#
# Phases (each under a hard time limit, so the whole suite stays under 9 minutes on one H100; a phase that hits
# its limit is interrupted with SIGINT, and pytest still writes the results it has):
#   env       device, driver, torch/triton/CUDA versions                          -> env.txt
#   wheels    missing packages from the carried .whl/ into /tmp/vits_fast_site  -> wheels.log
#   install   pip install --no-deps --no-build-isolation -e .  (no network on the GPU machines; builds the
#             Cython alignment search); if that fails, the source tree with kernels/ linked in -> install.log
#   calibrate copy bandwidth, matmul/conv rates per dtype, launch cost           -> calibrate.log, calibration.json
#   tests     the test suite on CUDA (pytest -q tests)                            -> tests.log, tests.xml
#   profile   python -m vits_fast.profile for train-step, infer and every kernel (medium), with achieved
#             bandwidth against the measured copy bandwidth                       -> profile.log, traces/*.json.gz
#   bench_*   the benchmark suite, one JSON per part                              -> bench_*.json, bench_*.log
#   report    benchmarks/report.py over all JSON                                  -> report.md (+ speedup.png)
# A summary (phase times and exit codes, the test result line, the report's summary table) is printed last.
#
# Selection: the whole Piper-sized suite with every torch.compile baseline takes longer than 9 minutes (inductor
# compiles each module for tens of seconds), so by default: kernels and the alignment search in full except the
# compiled entries; the training step for medium (fp32, bf16) and x-low/high in fp32; inference for medium at
# every batch and x-low/high at batch 1 and time to first audio; the compiled baselines (compiled, fast) for
# medium in fp32 only (phase bench_compiled). These limits and selections are a first guess made without a GPU:
# the first GPU run should adjust them from phases.tsv. Override any limit (seconds) or selection by environment,
# e.g.  T_BENCH_KERNELS=200 K_TRAIN="not compiled" bash benchmarks/gpu_suite.sh out
# (SKIP_INSTALL=1 skips the install when the package is already installed; PYTHON picks the interpreter.)
# Run it from the device tool as:  bash benchmarks/gpu_suite.sh "$OUT"
set -u -o pipefail

OUT=${1:?usage: bash benchmarks/gpu_suite.sh OUTDIR}
mkdir -p "$OUT/traces"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
START=$(date +%s)

# Time limits (seconds): 410 s in all (so that a 15-minute lease leaves room for a second, shorter call), plus at most 10 s per interrupted phase and ~15 s of the script's own.
# A phase interrupted at its limit gets 10 s more to write its results before it is killed.
T_INSTALL=${T_INSTALL:-40}
T_CALIBRATE=${T_CALIBRATE:-30}
T_TESTS=${T_TESTS:-100}
T_PROFILE=${T_PROFILE:-35}
T_BENCH_KERNELS=${T_BENCH_KERNELS:-50}
T_BENCH_MAS=${T_BENCH_MAS:-20}
T_BENCH_TRAIN=${T_BENCH_TRAIN:-55}
T_BENCH_INFER=${T_BENCH_INFER:-30}
T_BENCH_COMPILED=${T_BENCH_COMPILED:-50}
# Seconds of timed rounds per benchmark entry (at least 3 rounds; do_bench timing comes on top).
export VITS_FAST_BENCH_BUDGET_S=${VITS_FAST_BENCH_BUDGET_S:-0.2}
# pytest -k selections of the benchmark phases.
K_KERNELS=${K_KERNELS:-"not compiled"}
K_MAS=${K_MAS:-""}
K_TRAIN=${K_TRAIN:-"not compiled and (medium or fp32)"}
K_INFER=${K_INFER:-"not compiled and not fast and not tiny and (medium or rtf-b1 or ttfa)"}
K_COMPILED=${K_COMPILED:-"(compiled or fast) and medium and not bf16 and not rtf-b8 and not rtf-b32"}

log() { echo "[gpu_suite +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/suite.log"; }

phase() {  # phase NAME LIMIT_S CMD...: run CMD with its output in NAME.log, record rc and seconds
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  log "$name: start (limit ${limit}s)"
  timeout --signal=INT --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  [ $rc -eq 124 ] && log "$name: hit its ${limit}s limit (interrupted; partial results kept)"
  log "$name: rc=$rc after ${dt}s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$dt" "$limit" >> "$OUT/phases.tsv"
}

printf 'phase\trc\tseconds\tlimit\n' > "$OUT/phases.tsv"

# -- env ----------------------------------------------------------------------------------------------------
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv 2>&1
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton missing:", exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          round(p.total_memory / 2**30, 1), "GiB")
else:
    print("NO CUDA DEVICE: the suite measures nothing useful here")
for mod in ("pytest_benchmark", "pytest_timeout", "xdist", "matplotlib", "Cython"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "present"))
    except ImportError:
        print(mod, "missing")
EOF
} > "$OUT/env.txt" 2>&1
log "env: $(grep -E '^(device|torch|python)' "$OUT/env.txt" | tr '\n' ' ')"

# -- wheels -------------------------------------------------------------------------------------------------
# The GPU machine has no network: what it lacks (soundfile, soxr, a setuptools new enough for pyproject.toml)
# travels as wheels in the ignored .whl/ (bash benchmarks/fetch_wheels.sh fills it; carry ".whl").
if ls .whl/*.whl >/dev/null 2>&1; then
  phase wheels 60 "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/vits_fast_site .whl/*.whl
  export PYTHONPATH=/tmp/vits_fast_site${PYTHONPATH:+:$PYTHONPATH}
else
  log "wheels: no .whl/ folder (run benchmarks/fetch_wheels.sh here and carry .whl)"
fi

# -- install ------------------------------------------------------------------------------------------------
if [ "${SKIP_INSTALL:-0}" = 1 ]; then
  log "install: skipped (SKIP_INSTALL=1)"
else
  phase install "$T_INSTALL" "$PY" -m pip install --no-deps --no-build-isolation --no-index -e .
fi
if ! "$PY" -c "import vits_fast.kernels" >> "$OUT/install.log" 2>&1; then
  # Not installable here (old setuptools, no compiler): run from the source tree, kernels/ linked in place of
  # the installed vits_fast.kernels (on the GPU machine's copy of the tree only).
  log "install: vits_fast.kernels not importable; running from the source tree (kernels linked in)"
  [ -e vits_fast/kernels ] || ln -s ../kernels vits_fast/kernels
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c "import vits_fast.monotonic_align as m, vits_fast.kernels; print('cython alignment search:', m.has_cython())" \
  >> "$OUT/install.log" 2>&1 || log "install: vits_fast does not import (see install.log)"

# -- calibrate ----------------------------------------------------------------------------------------------
phase calibrate "$T_CALIBRATE" "$PY" benchmarks/calibrate.py "$OUT/calibration.json"

# -- tests --------------------------------------------------------------------------------------------------
TEST_ARGS=(-q -p no:cacheprovider --junitxml="$OUT/tests.xml")
"$PY" -c "import pytest_timeout" 2>/dev/null && TEST_ARGS+=(--timeout=150)
"$PY" -c "import xdist" 2>/dev/null && TEST_ARGS+=(-n 4 --dist loadfile)
phase tests "$T_TESTS" "$PY" -m pytest tests "${TEST_ARGS[@]}"

# -- profile ------------------------------------------------------------------------------------------------
phase profile "$T_PROFILE" "$PY" - "$OUT/traces" <<'EOF'
import sys, traceback
from vits_fast.profile import main

out = sys.argv[1]
for workload in ("kernel:wn", "kernel:spline", "kernel:coupling", "kernel:mas", "train-step", "infer"):
    print("=" * 100, "\n$ python -m vits_fast.profile --workload", workload, "--config medium", flush=True)
    try:
        main(["--workload", workload, "--config", "medium", "--steps", "2", "--rows", "15",
              "--trace", f"{out}/{workload.replace(':', '-')}_medium.json"])
    except Exception:
        traceback.print_exc()
EOF
gzip -f "$OUT"/traces/*.json 2>/dev/null

# -- benchmarks ---------------------------------------------------------------------------------------------
BENCH=(-q -p no:cacheprovider --benchmark-only -o addopts=-ra)
"$PY" -c "import pytest_timeout" 2>/dev/null && BENCH+=(--timeout=120)
bench() {  # bench NAME LIMIT "FILE [FILE...]" KEXPR [ENV=VALUE...]  (files run in the order given)
  local name=$1 limit=$2 files=$3 kexpr=$4
  shift 4
  local sel=()
  [ -n "$kexpr" ] && sel=(-k "$kexpr")
  # shellcheck disable=SC2086
  phase "$name" "$limit" env "$@" "$PY" -m pytest $files "${BENCH[@]}" "${sel[@]}" --benchmark-json="$OUT/$name.json"
}
bench bench_kernels "$T_BENCH_KERNELS" benchmarks/test_bench_kernels.py "$K_KERNELS"
bench bench_mas "$T_BENCH_MAS" benchmarks/test_bench_mas.py "$K_MAS"
bench bench_train "$T_BENCH_TRAIN" benchmarks/test_bench_train.py "$K_TRAIN"
bench bench_infer "$T_BENCH_INFER" benchmarks/test_bench_infer.py "$K_INFER"
bench bench_compiled "$T_BENCH_COMPILED" \
  "benchmarks/test_bench_kernels.py benchmarks/test_bench_train.py benchmarks/test_bench_infer.py" \
  "$K_COMPILED" VITS_FAST_BENCH_COMPILE=medium

# -- report -------------------------------------------------------------------------------------------------
JSONS=$(ls "$OUT"/bench_*.json 2>/dev/null)
if [ -n "$JSONS" ]; then
  # shellcheck disable=SC2086
  "$PY" benchmarks/report.py $JSONS -o "$OUT/report.md" --plot "$OUT/speedup.png" --title "vits_fast GPU suite" \
    > "$OUT/report.log" 2>&1 || log "report: failed (see report.log)"
fi

# -- summary (the device tool returns the end of the output) --------------------------------------------------
echo
echo "==================== gpu_suite summary ($(( $(date +%s) - START ))s total) ===================="
cat "$OUT/env.txt" | grep -E "^(device|python|triton)" || true
column -t -s $'\t' "$OUT/phases.tsv" 2>/dev/null || cat "$OUT/phases.tsv"
echo "-- calibration:"; grep -E "^ " "$OUT/calibrate.log" 2>/dev/null
echo "-- tests:"; tail -n 3 "$OUT/tests.log" 2>/dev/null
echo "-- profile (fused-kernel bandwidth):"
grep -E "^(vits_fast.profile:|Fused operators|wn_|rq_|affine_|maximum_path)" "$OUT/profile.log" 2>/dev/null | head -40
if [ -f "$OUT/report.md" ]; then
  echo "-- benchmark summary (full tables in report.md):"
  sed -n '/^### Summary/,/^### [^S]/p' "$OUT/report.md" | head -80
fi
