#!/usr/bin/env bash
# The torch versions beside CI's pin (torch 2.13, a CPU wheel, runs the whole suite): the GPU
# machines' 2.11 (with its Triton, 3.6) and the newest the registry serves, 2.15 (Triton
# 3.9). Each gets its own virtualenv and runs a subset: the optimizer, the step costs, the GPU
# script's dry run and the check, the first-step fallback, the gradient scales, and the
# distributed modules (FSDP2, DDP, TP, HSDP, FSDP2 x TP, each rank's blocks against torch's
# split); on 2.15 also the AOT harness's selftest (Triton 3.9). The package is read from this
# tree (PYTHONPATH), not installed.
#
# Disk: each is a CUDA build, about 5 GB installed. One lives at a time (install, test,
# remove) and pip keeps no cache of the wheels: two side by side with pip's cache came to
# about 13 GB in a clean clone and filled the CI machine's disk.
#   bash .ci/versions.sh list           # the versions, one per line
#   bash .ci/versions.sh install 2.11.0 # its virtualenv (network; little CPU)
#   bash .ci/versions.sh test 2.11.0    # the subset on it
#   bash .ci/versions.sh remove 2.11.0  # its virtualenv deleted
set -euo pipefail
cd "$(dirname "$0")/.."
VERSIONS="2.11.0 2.15.0"
SUBSET="tests/test_optim.py tests/test_step_costs.py tests/test_gpu_check.py tests/test_check.py
tests/test_fallback.py tests/test_gradient_scale.py tests/test_distributed.py tests/test_parallel.py
tests/test_placement.py"
# The AOT harness on the newest Triton (3.9 with torch 2.15): its selftest compiles toy kernels
# and must flag the spilling and the narrow-offset ones (the main suite runs the gate on 3.6).
EXTRA_2_15_0="tests/test_compile_gate.py::test_the_gate_flags_a_spilling_kernel_and_a_narrow_offset"
usage() { echo "usage: bash .ci/versions.sh list | install|test|remove VERSION" >&2; exit 2; }
cmd="${1:-}"
[ "$cmd" = list ] && { printf '%s\n' $VERSIONS; exit 0; }
v="${2:-}"
case " $VERSIONS " in *" $v "*) ;; *) usage ;; esac
venv=".venv-torch$v"
case "$cmd" in
  install)
    python3 -m venv "$venv"
    # PIP_CONSTRAINT: some machines cap torch at what lies on their disk; this job exists
    # to run the newest release.
    PIP_CONSTRAINT=/dev/null "$venv/bin/python" -m pip install -q --no-cache-dir "torch==$v" \
      "numpy<2.4" "pytest>=8" "pytest-xdist>=3" "hypothesis>=6" tqdm matplotlib ;;
  test)
    echo "== torch $v"
    extra="EXTRA_${v//./_}"
    # shellcheck disable=SC2086
    PYTHONPATH="$PWD" "$venv/bin/python" -m pytest -q -n auto -p no:cacheprovider \
      $SUBSET ${!extra:-} ;;
  remove) rm -rf "$venv" ;;
  *) usage ;;
esac
