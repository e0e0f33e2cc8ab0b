#!/usr/bin/env bash
# The prepared GPU check (issue: a step a GPU does not wait for). One call on a machine with a
# CUDA GPU, at most ~8 minutes; writes bench/results/gpu_<device>_<date>.md. Needs only torch
# and triton there (no pytest, nothing downloaded): the package is imported from this tree.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0  # the compiled kernels
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
timeout 470 python bench/gpu_check.py "$@"
