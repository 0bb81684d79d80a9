#!/usr/bin/env bash
# The one-command GPU check. Steps, in this order, each with its own log in OUTDIR, written as it goes:
#   1 install gpuad from this tree (nothing downloaded) and say whether the kernel modules import
#   2 the kernel tests (Triton CE, Triton linear, CuPy kernels, backends): pytest -m gpu, JUnit XML
#   3 the quick benchmark (every DESIGN.md target shape; one JSON line per record as measured)
#   4 the cupy-backend engine tests (pytest -m gpu on the rest) with the time left
#   5 a summary, last: tests per file, each target shape met or missed, time per step
#
#   bash bench/gpu_check.sh [--dry-run] [OUTDIR]       (default ./gpu-out)
#
# --dry-run runs every step's plumbing on a CPU (GPU tests skip, the benchmark takes its tiny CPU
# shapes) so CI catches a broken script. Compile caches (Triton, CuPy, Inductor) live in
# ./.gpu-cache (git-ignored), so a rerun on the same machine skips the compiles.
# Time limits in seconds: GPU_CHECK_KERNEL_S (default 150), GPU_CHECK_BENCH_S (150) and
# GPU_CHECK_BUDGET_S (360, the whole check; step 4 gets what is left). pytest runs
# GPU_CHECK_WORKERS (default 8) processes where pytest-xdist is installed.
# Exit status: 0 when the install, both test steps and the benchmark passed.
set -uo pipefail
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:-./gpu-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET_S:-360}
: >"$OUT/steps.txt"
step_done() { echo "  $1: rc $2$([ "$2" -eq 124 ] && echo ' (TIMED OUT)'), $(($SECONDS - $3)) s" >>"$OUT/steps.txt"; }

export TRITON_CACHE_DIR="$ROOT/.gpu-cache/triton" CUPY_CACHE_DIR="$ROOT/.gpu-cache/cupy"
export TORCHINDUCTOR_CACHE_DIR="$ROOT/.gpu-cache/inductor"
mkdir -p "$TRITON_CACHE_DIR" "$CUPY_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR"

T=$SECONDS
echo "== 1 install (pip --no-deps --no-build-isolation -e .)"
"$PY" -m pip install --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1
PIP_RC=$?
[ $PIP_RC -eq 0 ] || tail -n 20 "$OUT/pip.log"
if compgen -G ".whl/*.whl" >/dev/null; then  # wheels carried over (bench/fetch_wheels.sh), e.g. Liger
    echo "   carried wheels: $(cd .whl && echo *.whl)"
    SITE=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl \
        >>"$OUT/pip.log" 2>&1 && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
for mod in gpuad.kernels.triton gpuad.kernels.cupy; do
    "$PY" -c "import $mod" >>"$OUT/pip.log" 2>&1 && echo "   import $mod: ok" \
        || echo "   import $mod: FAILED ($("$PY" -c "import $mod" 2>&1 | tail -n 1))"
done
step_done install $PIP_RC $T

XDIST=()
if [ $DRY -eq 0 ] && "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n "${GPU_CHECK_WORKERS:-8}"); fi
KERNEL_TESTS=(tests/test_triton_cross_entropy.py tests/test_triton_linear_backward.py
              tests/test_cupy_kernels.py tests/test_backends.py)

T=$SECONDS
echo "== 2 kernel tests: pytest -m gpu ${KERNEL_TESTS[*]}"
timeout "${GPU_CHECK_KERNEL_S:-150}" "$PY" -m pytest -m gpu -q -rfE "${XDIST[@]}" --durations=15 \
    --junitxml="$OUT/junit-kernels.xml" "${KERNEL_TESTS[@]}" 2>&1 | tee "$OUT/pytest-kernels.log"
KERNEL_RC=$?
step_done "kernel tests" $KERNEL_RC $T

T=$SECONDS
BENCH_ARGS=(--preset quick)
[ $DRY -eq 1 ] && BENCH_ARGS=(--preset tiny --cpu)
echo "== 3 python -m bench ${BENCH_ARGS[*]}"
timeout "${GPU_CHECK_BENCH_S:-150}" "$PY" -m bench "${BENCH_ARGS[@]}" --out "$OUT" 2>&1 | tee "$OUT/bench.log"
BENCH_RC=$?
if [ $BENCH_RC -eq 124 ] && [ -s "$OUT/results.jsonl" ]; then  # killed: rebuild the table from what it measured
    "$PY" -m bench --report "$OUT" >>"$OUT/bench.log" 2>&1
fi
step_done benchmark $BENCH_RC $T

T=$SECONDS
LEFT=$((BUDGET - (SECONDS - START)))
[ $LEFT -lt 20 ] && LEFT=20
IGNORES=()
for f in "${KERNEL_TESTS[@]}"; do IGNORES+=(--ignore="$f"); done
echo "== 4 engine tests on the cupy backend: pytest -m gpu (the rest), ${LEFT} s"
timeout "$LEFT" "$PY" -m pytest -m gpu -q -rfE "${XDIST[@]}" --durations=10 \
    --junitxml="$OUT/junit-engine.xml" "${IGNORES[@]}" 2>&1 | tee "$OUT/pytest-engine.log"
ENGINE_RC=$?
step_done "engine tests" $ENGINE_RC $T

echo
echo "================ table, then summary ($((SECONDS - START)) s) ================"
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')" 2>/dev/null
echo "install: $([ $PIP_RC -eq 0 ] && echo ok || echo "FAILED (rc $PIP_RC, see pip.log)")"
[ -f "$OUT/table.txt" ] && cat "$OUT/table.txt"
"$PY" -m bench.summary "$OUT"
[ $PIP_RC -eq 0 ] && [ $KERNEL_RC -eq 0 ] && [ $BENCH_RC -eq 0 ] && [ $ENGINE_RC -eq 0 ]
