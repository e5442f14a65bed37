#!/usr/bin/env bash
# Download, here (with network), the wheels that the GPU machine lacks, for its CPython 3.12 on x86-64 Linux, into
# the ignored .whl/ folder that gpu_suite.sh installs from:  bash benchmarks/fetch_wheels.sh
# The device call then names ".whl" in carry (about 37 MB of the 64 MiB a call may carry). One version of each
# package only (two stop the install there). piper-tts brings upstream Piper's model for bench_upstream.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(soundfile==0.13.1 cffi==2.0.0 pycparser==2.23 soxr==1.0.0 setuptools==80.9.0 piper-tts==1.8.0
        pathvalidate==3.3.1)
mkdir -p .whl
for w in "${WHEELS[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$w"
done
ls -1 .whl
