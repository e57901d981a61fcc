#!/usr/bin/env bash
# What to run on a lent H100/H200 (the workplace's device tool runs a command in the repo root,
# 10 minutes per call, with torch, triton, cupy and nvcc installed but no package registry).
# Two calls, each packing its outputs into one archive under $OUT (the tool returns at most 8
# files):
#
#   bash bench/gpu_session.sh tests   # GPU tests (make test-gpu), then compute-sanitizer
#                                     # memcheck on the CuPy backend's tests
#   bash bench/gpu_session.sh bench   # python -m bench (default plan, ~7 min on an H100)
#
# Then unpack the archive here, commit bench/results/ and fill in bench/NOTES.md's outcomes.
set -uo pipefail
mode=${1:?usage: bash bench/gpu_session.sh tests|bench}
export PYTHONPATH=python PYTHONUNBUFFERED=1
out=${OUT:-/tmp/gpu-session}
work=$(mktemp -d)
mkdir -p "$out"
nvidia-smi > "$work/nvidia-smi.txt" 2>&1
python3 -m softmax_kernels info > "$work/info.txt" 2>&1
cat "$work/info.txt"
rc=0
case "$mode" in
tests)
    timeout 420 python3 -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "$work/test-gpu.log"
    rc=${PIPESTATUS[0]}
    if command -v compute-sanitizer >/dev/null 2>&1; then
        timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 \
            python3 -m pytest -q -m gpu -x -p no:cacheprovider tests/test_cupy_backend.py \
            -k "softmax or cross_entropy" 2>&1 | tail -n 200 > "$work/memcheck.log"
        echo "memcheck exit ${PIPESTATUS[0]}" | tee -a "$work/memcheck.log"
    fi
    ;;
bench)
    timeout 560 python3 -m bench --out "$work/results" 2>&1 | tee "$work/bench.log"
    rc=${PIPESTATUS[0]}
    ;;
*)
    echo "unknown mode $mode (tests or bench)"
    exit 2
    ;;
esac
tar czf "$out/gpu-$mode.tgz" -C "$work" .
echo "wrote $out/gpu-$mode.tgz (exit $rc)"
exit "$rc"
