#!/usr/bin/env bash
# The torch versions beside CI's pin (torch 2.13, a CPU wheel, runs the whole suite): the GPU
# machines' 2.11 (with its Triton, 3.6) and the newest the registry serves, 2.15 (Triton
# 3.9). Each gets its own virtualenv and runs a subset: the optimizer, the step costs, the GPU
# script's dry run and the check, the first-step fallback, the gradient scales, and the
# distributed modules (FSDP2, DDP, TP, HSDP, FSDP2 x TP, each rank's blocks against torch's
# split); on 2.15 also the AOT harness's selftest (Triton 3.9). The package is read from this
# tree (PYTHONPATH), not installed.
#   bash .ci/versions.sh install    # the virtualenvs (network; little CPU)
#   bash .ci/versions.sh test       # the subset on each
set -euo pipefail
cd "$(dirname "$0")/.."
VERSIONS="2.11.0 2.15.0"
SUBSET="tests/test_optim.py tests/test_step_costs.py tests/test_gpu_check.py tests/test_check.py
tests/test_fallback.py tests/test_gradient_scale.py tests/test_distributed.py tests/test_parallel.py
tests/test_placement.py"
# The AOT harness on the newest Triton (3.9 with torch 2.15): its selftest compiles toy kernels
# and must flag the spilling and the narrow-offset ones (the main suite runs the gate on 3.6).
EXTRA_2_15_0="tests/test_compile_gate.py::test_the_gate_flags_a_spilling_kernel_and_a_narrow_offset"
case "${1:-}" in
  install)
    for v in $VERSIONS; do
      python3 -m venv ".venv-torch$v"
      # PIP_CONSTRAINT: some machines cap torch at what lies on their disk; this job exists
      # to run the newest release.
      PIP_CONSTRAINT=/dev/null ".venv-torch$v/bin/python" -m pip install -q "torch==$v" \
        "numpy<2.4" "pytest>=8" "pytest-xdist>=3" "hypothesis>=6" tqdm matplotlib
    done ;;
  test)
    for v in $VERSIONS; do
      echo "== torch $v"
      extra="EXTRA_${v//./_}"
      # shellcheck disable=SC2086
      PYTHONPATH="$PWD" ".venv-torch$v/bin/python" -m pytest -q -n auto -p no:cacheprovider \
        $SUBSET ${!extra:-}
    done ;;
  *) echo "usage: bash .ci/versions.sh install|test" >&2; exit 2 ;;
esac
