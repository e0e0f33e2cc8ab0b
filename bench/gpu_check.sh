#!/usr/bin/env bash
# The prepared GPU check: one call on a machine with a CUDA GPU, at most 5 minutes on an H100.
#   bash bench/gpu_check.sh --out "$OUT/gpu_check.md"
# Needs only torch and triton there (no pytest, nothing downloaded): the package is imported
# from this tree. Every section is appended to the report as it finishes, so a timeout keeps
# what was done. Budget (an estimate from the compile counts, not a measurement): the check
# compiles the 25 kernel configurations of a default step (fp32 and bf16; ~1-2 s each on one
# core, bench/results/compile_report.md: 256 compiles in 265 s here) and the benchmarks about
# 60 more (eight flag sets, the phases at dh 128): ~2.5 minutes of compiling, under a minute
# of running; each part has its own timeout below, 5 minutes in all.
set -uo pipefail
cd "$(dirname "$0")/.."
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    *) echo "usage: bash bench/gpu_check.sh --out REPORT.md" >&2; exit 2 ;;
  esac
done
[ -n "$out" ] || { echo "usage: bash bench/gpu_check.sh --out REPORT.md" >&2; exit 2; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0  # the compiled kernels
mkdir -p "$(dirname "$out")"
{ echo "# GPU check, $(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo; echo "Command: \`bash bench/gpu_check.sh --out $out\`"; echo
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
  echo; } >> "$out"
status=0
timeout 150 python3 -m cm_triton.check --out "$out" || status=$?
timeout 150 python3 bench/gpu_check.py --out "$out" || status=$?
echo "gpu_check: exit $status (the check's: non-zero on a failing kernel, 124 on a timeout)" >> "$out"
exit $status
