#!/usr/bin/env bash
# GPU check (issue 17): one command on the GPU machine, under 8 minutes on an H200.
#
#   OUT=/path/to/out bash benchmarks/gpu_check.sh            # on the GPU machine
#   PYTHON=.venv/bin/python OUT=/tmp/gc bash benchmarks/gpu_check.sh --dry-run   # CPU, here
#
# Prints the versions, runs benchmarks/gpu_check.py (Pallas kernels compiled for the GPU and
# checked against their references, a bounded tile autotune, SDXL GEMM timings, one full-size
# SDXL-turbo UNet forward per configuration) and writes $OUT/gpu_check.json, $OUT/gpu_check.log,
# $OUT/unet_<config>.{json,log} and $OUT/tuned/<device>.json (OUT defaults to /tmp/gpu_check_out).
# Extra arguments go to gpu_check.py. A hard timeout (GPU_CHECK_TIMEOUT_S, default 470 s) stops
# the Python process; the JSON, rewritten after every section, keeps what finished.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-${TMPDIR:-/tmp}/gpu_check_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export OUT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # the UNet children must fit beside this process
# The interpreter: $PYTHON, else the first of python3 / python that can import jax.
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import jax" >/dev/null 2>&1; then
      PY="$(command -v "$cand")"
      break
    fi
  done
  PY="${PY:-python3}"
fi
LIMIT="${GPU_CHECK_TIMEOUT_S:-470}"
{
  echo "== gpu_check.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) host=$(hostname) out=$OUT"
  "$PY" - <<'PYEOF'
import sys
from importlib import metadata

print("python", sys.version.replace("\n", " "))
names = ["jax", "jaxlib", "flax", "optax", "numpy", "torch", "triton"]
names += sorted(
    d.metadata["Name"] for d in metadata.distributions()
    if (d.metadata["Name"] or "").lower().replace("_", "-").startswith(("jax-cuda", "jax-rocm"))
)
for name in names:
    try:
        print(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"{name} (not installed)")
PYEOF
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  timeout -k 10 "$LIMIT" "$PY" -u benchmarks/gpu_check.py --out "$OUT" "$@"
  rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "== gpu_check.py stopped by the ${LIMIT} s timeout; $OUT/gpu_check.json keeps what finished"
  fi
  echo "== gpu_check.sh exit $rc; results in $OUT/gpu_check.json"
  exit "$rc"
} 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
