#!/usr/bin/env bash
# The one-call GPU session on a lent H100/H200 (see bench/gpu_session.py for the steps):
#
#   bash bench/gpu_session.sh                # main call, ~7 min of command time: probe, GPU tests
#                                            # in parallel shards, compute-sanitizer memcheck /
#                                            # racecheck / synccheck, python -m bench --quick
#   bash bench/gpu_session.sh second [FILE]  # optional, ~4 min: FILE's failing test ids (the
#                                            # main call's failed-tests.txt) with
#                                            # CUDA_LAUNCH_BLOCKING=1, then the QuACK grid
#   bash bench/gpu_session.sh lce            # optional, ~7 min: fused linear + cross-entropy
#                                            # (Llama-3 / Gemma-2 heads) and the vocabulary-
#                                            # parallel merge, with peak memory
#   bash bench/gpu_session.sh --dry-run      # each step with its limit, and the total
#
# Everything lands in $OUT (at most 8 files: summary.txt, gpu-<mode>-logs.tgz,
# failed-tests.txt, the bench JSON/CSV/MD/PNG), kept current while the steps run, so a call cut
# off at its limit still returns what was done. Needs no install: runs from the checkout with
# PYTHONPATH=python on the machine's python3 (PYTHON overrides it).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu_session.py "$@"
