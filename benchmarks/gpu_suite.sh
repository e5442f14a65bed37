#!/usr/bin/env bash
# Everything a GPU session runs, in one command:
#   bash benchmarks/gpu_suite.sh [--dry-run] [--bundle] OUTDIR
#
# Phases (each under a hard time limit; a phase that hits its limit is interrupted with SIGINT, then killed 10 s
# later, and keeps what it wrote):
#   env       device, driver, torch/triton/CUDA versions                          -> env.txt
#   wheels    missing packages from the carried .whl/ into /tmp/vits_fast_site  -> wheels.log
#   install   pip install --no-deps --no-build-isolation -e .  (no network on the GPU machines; builds the
#             Cython alignment search); if that fails, the source tree with kernels/ linked in -> install.log
#   calibrate copy bandwidth, matmul/conv rates per dtype, launch cost           -> calibrate.log, calibration.json
#   tests     the test suite on CUDA (pytest tests); each failure is written to failures.txt the moment it
#             happens, so a phase stopped at its limit still says what failed    -> tests.log, failures.txt
#   profile   python -m vits_fast.profile for every kernel, train-step and infer (medium), with achieved
#             bandwidth against the measured copy bandwidth                       -> profile.log, traces/*.json.gz
#   bench_*   the benchmark suite, one JSON per part (bench_upstream: synthesis against upstream Piper's own
#             model and onnxruntime)                                             -> bench_*.json, bench_*.log
#   report    benchmarks/report.py over all JSON                                  -> report.md (+ speedup.png)
# A summary (phase times and exit codes, calibration, failures, the report's summary table) is printed last.
#
# --dry-run: every phase on whatever machine this is (a CPU in CI) with tiny shapes and budgets, through the same
#   orchestration (wheels and install are skipped: the caller installed the package), writing OUTDIR/report.md.
#   It checks the suite, not the machine: its numbers mean nothing.
# --bundle: OUTDIR receives at most 8 files (the device tool returns no more): report.md, summary.txt,
#   calibration.json, failures.txt, phases.tsv, suite.tgz (every log and JSON) and traces.tgz; the working files
#   go to a temporary folder. The device call is:  bash benchmarks/gpu_suite.sh --bundle "$OUT"  with carry [".whl"]
#
# Time: the limits below add up to 500 s, plus at most 10 s per interrupted phase and ~20 s of the script's own,
# so a 15-minute device lease (start-up included) leaves room for a second, shorter call. Selection: the whole
# Piper-sized suite with every torch.compile baseline takes far longer (inductor compiles each module for tens of
# seconds), so by default: kernels and the alignment search without compiled entries; the training step for medium
# (fp32, bf16) and x-low/high in fp32; inference for medium at every batch and x-low/high at batch 1 and time to
# first audio; the default backend ('auto' entries) for medium only; compiled baselines for medium fp32 only. What the first H200 run (2026-11-30, RESULTS.md) showed:
# tests need more than 170 s even with 12 workers (150 s now, with failures logged as they happen), and profile/bench_mas/bench_infer/bench_compiled each ran
# slightly past their limits. Override any limit (seconds) or selection by environment, e.g.
#   T_TESTS=300 K_TRAIN="not compiled" bash benchmarks/gpu_suite.sh out
# (SKIP_INSTALL=1 skips the install; PYTHON picks the interpreter; TEST_WORKERS sets pytest-xdist's -n.)
set -u -o pipefail

DRY=0
BUNDLE=0
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1; shift ;;
    --bundle) BUNDLE=1; shift ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d'; exit 0 ;;
    -*) echo "gpu_suite.sh: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
[ $# -eq 1 ] || { echo "usage: bash benchmarks/gpu_suite.sh [--dry-run] [--bundle] OUTDIR" >&2; exit 2; }
mkdir -p "$1"
DEST=$(cd "$1" && pwd)
if [ $BUNDLE = 1 ]; then OUT=$(mktemp -d); else OUT=$DEST; fi
mkdir -p "$OUT/traces"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
START=$(date +%s)

PROFILE_ARGS=(--config medium --steps 2 --rows 15)
CALIBRATE_ARGS=()
if [ $DRY = 1 ]; then
  # Tiny shapes and budgets on a CPU; the selections name the CPU smoke entries of each benchmark file.
  : "${SKIP_INSTALL:=1}" "${T_TESTS:=120}" "${T_PROFILE:=120}" "${T_BENCH_KERNELS:=60}" "${T_BENCH_MAS:=30}"
  : "${T_BENCH_TRAIN:=120}" "${T_BENCH_INFER:=60}" "${T_BENCH_COMPILED:=30}" "${T_CALIBRATE:=30}"
  : "${T_BENCH_UPSTREAM:=60}"
  : "${VITS_FAST_BENCH_BUDGET_S:=0.01}" "${TEST_SELECTION:=tests/test_backend.py}"
  : "${K_KERNELS:=wn and x-low and fwd}" "${K_MAS:=B2-tx32}" "${K_TRAIN:=tiny}"
  : "${K_INFER:=tiny and (b1 or ttfa)}" "${K_COMPILED:=compiled and tiny}"
  PROFILE_ARGS=(--config tiny --device cpu --batch 1 --text-len 8 --frames 16 --segment-frames 8 --steps 1
                --warmup 0 --rows 8)
  CALIBRATE_ARGS=(--tiny)
fi
T_INSTALL=${T_INSTALL:-40}
T_CALIBRATE=${T_CALIBRATE:-30}
T_TESTS=${T_TESTS:-150}
T_PROFILE=${T_PROFILE:-35}
T_BENCH_KERNELS=${T_BENCH_KERNELS:-50}  # +5 s: the period-discriminator layout entries, +5 s: fused-op host time
T_BENCH_MAS=${T_BENCH_MAS:-20}
T_BENCH_TRAIN=${T_BENCH_TRAIN:-65}  # +10 s: the default-backend (auto) entries
T_BENCH_INFER=${T_BENCH_INFER:-40}  # +10 s: the default-backend (auto) entries
T_BENCH_COMPILED=${T_BENCH_COMPILED:-40}
T_BENCH_UPSTREAM=${T_BENCH_UPSTREAM:-30}
# Seconds of timed rounds per benchmark entry (at least 3 rounds; do_bench timing comes on top).
export VITS_FAST_BENCH_BUDGET_S=${VITS_FAST_BENCH_BUDGET_S:-0.2}
TEST_SELECTION=${TEST_SELECTION:-tests}
# pytest -k selections of the benchmark phases.
K_KERNELS=${K_KERNELS:-"not compiled"}
K_MAS=${K_MAS:-""}
K_TRAIN=${K_TRAIN:-"not compiled and (medium or fp32) and not (auto and not medium)"}
K_INFER=${K_INFER:-"not compiled and not fast and not tiny and (medium or rtf-b1 or ttfa) and not (auto and not medium)"}
K_COMPILED=${K_COMPILED:-"(compiled or fast) and medium and not bf16 and not rtf-b8 and not rtf-b32"}

log() { echo "[gpu_suite +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/suite.log"; }

phase() {  # phase NAME LIMIT_S CMD...: run CMD with its output in NAME.log, record rc and seconds
  local name=$1 limit=$2
  shift 2
  local t0
  t0=$(date +%s)
  log "$name: start (limit ${limit}s)"
  timeout --signal=INT --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && log "$name: hit its ${limit}s limit (interrupted; partial results kept)"
  log "$name: rc=$rc after ${dt}s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$dt" "$limit" >> "$OUT/phases.tsv"
}

printf 'phase\trc\tseconds\tlimit\n' > "$OUT/phases.tsv"
[ $DRY = 1 ] && log "dry run: tiny shapes on $(uname -m); checks the suite, not the machine"

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
    print("device cpu: NO CUDA DEVICE (only a --dry-run means anything here)")
for mod in ("pytest_benchmark", "pytest_timeout", "xdist", "matplotlib", "Cython", "soundfile", "soxr"):
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
if [ $DRY = 1 ]; then
  log "wheels: skipped (dry run: the caller's environment is used as it is)"
elif ls .whl/*.whl >/dev/null 2>&1; then
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
phase calibrate "$T_CALIBRATE" "$PY" benchmarks/calibrate.py "${CALIBRATE_ARGS[@]}" "$OUT/calibration.json"

# -- tests --------------------------------------------------------------------------------------------------
: > "$OUT/failures.txt"
TEST_ARGS=(-q -p no:cacheprovider -rfE --junitxml="$OUT/tests.xml")
"$PY" -c "import pytest_timeout" 2>/dev/null && TEST_ARGS+=(--timeout=150)
"$PY" -c "import xdist" 2>/dev/null && TEST_ARGS+=(-n "${TEST_WORKERS:-12}" --dist loadfile)
# shellcheck disable=SC2086
phase tests "$T_TESTS" env VITS_FAST_FAILURE_LOG="$OUT/failures.txt" "$PY" -m pytest $TEST_SELECTION "${TEST_ARGS[@]}"

# -- profile ------------------------------------------------------------------------------------------------
phase profile "$T_PROFILE" "$PY" - "$OUT/traces" "${PROFILE_ARGS[@]}" <<'EOF'
import sys, traceback
from vits_fast.profile import main

out, args = sys.argv[1], sys.argv[2:]
config = args[args.index("--config") + 1]
for workload in ("kernel:wn", "kernel:spline", "kernel:coupling", "kernel:mas", "train-step", "infer"):
    print("=" * 100, "\n$ python -m vits_fast.profile --workload", workload, *args, flush=True)
    try:
        main(["--workload", workload, *args, "--trace", f"{out}/{workload.replace(':', '-')}_{config}.json"])
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
bench bench_kernels "$T_BENCH_KERNELS" "benchmarks/test_bench_dispatch.py benchmarks/test_bench_kernels.py" "$K_KERNELS"
bench bench_mas "$T_BENCH_MAS" benchmarks/test_bench_mas.py "$K_MAS"
bench bench_train "$T_BENCH_TRAIN" benchmarks/test_bench_train.py "$K_TRAIN"
bench bench_infer "$T_BENCH_INFER" benchmarks/test_bench_infer.py "$K_INFER"
bench bench_upstream "$T_BENCH_UPSTREAM" benchmarks/test_bench_upstream.py ""
bench bench_compiled "$T_BENCH_COMPILED" \
  "benchmarks/test_bench_kernels.py benchmarks/test_bench_train.py benchmarks/test_bench_infer.py" \
  "$K_COMPILED" VITS_FAST_BENCH_COMPILE="$([ $DRY = 1 ] && echo none || echo medium)"

# -- report -------------------------------------------------------------------------------------------------
JSONS=()
for j in "$OUT"/bench_*.json; do [ -s "$j" ] && JSONS+=("$j"); done
if [ ${#JSONS[@]} -gt 0 ]; then
  "$PY" benchmarks/report.py "${JSONS[@]}" -o "$OUT/report.md" --plot "$OUT/speedup.png" \
    --title "vits_fast GPU suite$([ $DRY = 1 ] && echo ' (dry run: tiny shapes, numbers mean nothing)')" \
    > "$OUT/report.log" 2>&1 || log "report: failed (see report.log)"
fi
[ -f "$OUT/report.md" ] || { echo "# vits_fast GPU suite: no benchmark produced results (see the logs)" > "$OUT/report.md"; log "report: no benchmark results"; }

# -- summary (the device tool returns the end of the output) --------------------------------------------------
{
  echo
  echo "==================== gpu_suite summary ($(( $(date +%s) - START ))s total$([ $DRY = 1 ] && echo ', dry run')) ===================="
  grep -E "^(device|python|triton)" "$OUT/env.txt" || true
  column -t -s $'\t' "$OUT/phases.tsv" 2>/dev/null || cat "$OUT/phases.tsv"
  echo "-- calibration:"; grep -E "^ " "$OUT/calibrate.log" 2>/dev/null
  echo "-- tests:"; grep -E "passed|failed|error" "$OUT/tests.log" 2>/dev/null | tail -n 2
  echo "-- failures as they happened ($(grep -c '^==== ' "$OUT/failures.txt") in failures.txt):"
  grep '^==== ' "$OUT/failures.txt" | head -40
  echo "-- profile (fused-kernel bandwidth):"
  grep -E "^(vits_fast.profile:|Fused operators|wn_|rq_|affine_|maximum_path)" "$OUT/profile.log" 2>/dev/null | head -40
  echo "-- benchmark summary (full tables in report.md):"
  sed -n '/^### Summary/,/^### [^S]/p' "$OUT/report.md" | head -80
} | tee "$OUT/summary.txt"

if [ $BUNDLE = 1 ]; then
  cp "$OUT/report.md" "$OUT/summary.txt" "$OUT/phases.tsv" "$OUT/failures.txt" "$DEST/"
  [ -f "$OUT/calibration.json" ] && cp "$OUT/calibration.json" "$DEST/"
  tar czf "$DEST/traces.tgz" -C "$OUT" traces
  tar czf "$DEST/suite.tgz" -C "$OUT" --exclude=traces .
  rm -rf "$OUT"
  echo "bundled into $DEST: $(ls "$DEST" | tr '\n' ' ')"
fi

# A dry run is CI's check of the orchestration: any failed phase fails it. A GPU run always exits 0 (what failed
# is in phases.tsv and the logs, and the results of the other phases are kept).
if [ $DRY = 1 ]; then
  awk -F'\t' 'NR > 1 && $2 != 0 { bad = 1; print "dry run: phase " $1 " failed (rc " $2 ")" } END { exit bad }' \
    "$(if [ $BUNDLE = 1 ]; then echo "$DEST"; else echo "$OUT"; fi)/phases.tsv"
fi
