#!/usr/bin/env bash
# The one-command GPU check: install gpuad from this tree (nothing downloaded), run the GPU
# tests, run the quick benchmark, and print a short summary last.
#
#   bash bench/gpu_check.sh [OUTDIR]        (default ./gpu-out)
#
# Needs an NVIDIA GPU with torch, triton, cupy, numpy, pytest (and matplotlib for the plots)
# already installed; wheels in ./.whl (bench/fetch_wheels.sh: Liger) are added. Writes
# OUTDIR/pip.log, pytest-gpu.log, bench.log, results.json, table.txt and one PNG per op.
# Exit status: 0 when the install, the tests and every checked implementation passed.
# Budget: under 5 minutes (each step has a timeout, in seconds: GPU_CHECK_TEST_S, default 170,
# and GPU_CHECK_BENCH_S, default 110).
set -uo pipefail
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python

OUT=${1:-./gpu-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
START=$SECONDS

echo "== install (pip --no-deps --no-build-isolation -e .)"
"$PY" -m pip install --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1
PIP_RC=$?
[ $PIP_RC -eq 0 ] || tail -n 20 "$OUT/pip.log"

if compgen -G ".whl/*.whl" >/dev/null; then  # wheels carried over (bench/fetch_wheels.sh), e.g. Liger
    echo "== carried wheels: $(cd .whl && echo *.whl)"
    SITE=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl \
        >>"$OUT/pip.log" 2>&1 && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

echo "== pytest -m gpu"
timeout "${GPU_CHECK_TEST_S:-170}" "$PY" -m pytest -m gpu -q -rfE 2>&1 | tee "$OUT/pytest-gpu.log"
PYTEST_RC=$?

echo "== python -m bench --preset quick"
timeout "${GPU_CHECK_BENCH_S:-110}" "$PY" -m bench --preset quick --out "$OUT" 2>&1 | tee "$OUT/bench.log"
BENCH_RC=$?

echo
echo "================ summary ($((SECONDS - START)) s) ================"
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')" 2>/dev/null
echo "install: $([ $PIP_RC -eq 0 ] && echo ok || echo "FAILED (rc $PIP_RC, see pip.log)")"
COUNTS=$(grep -Eo '[0-9]+ (passed|failed|skipped|deselected|errors?|xfailed|xpassed)' "$OUT/pytest-gpu.log" | tail -n 6 | paste -sd, -)
echo "pytest -m gpu: rc $PYTEST_RC${COUNTS:+ ($COUNTS)}$([ $PYTEST_RC -eq 124 ] && echo ', TIMED OUT')"
echo "benchmark: rc $BENCH_RC$([ $BENCH_RC -eq 124 ] && echo ', TIMED OUT')  (results in $OUT)"
if [ -f "$OUT/table.txt" ]; then
    cat "$OUT/table.txt"
else
    echo "no benchmark table; see $OUT/bench.log"
fi
[ $PIP_RC -eq 0 ] && [ $PYTEST_RC -eq 0 ] && [ $BENCH_RC -eq 0 ]
