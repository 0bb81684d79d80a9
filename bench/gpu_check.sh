#!/usr/bin/env bash
# The one-command GPU check. Steps, in this order, each with its own log in OUTDIR, written as it goes:
#   1 install gpuad from this tree (nothing downloaded; skipped when it is installed from here
#     already) and say whether the kernel modules import
#   2 the kernel tests (Triton CE, Triton linear, CuPy kernels, backends): pytest -m gpu, JUnit XML
#   3 the quick benchmark (every target shape; one JSON line per record as measured)
#   4 the tuning sweep: every candidate the kernels declare, winners into kernels/tuned/<GPU>.json
#   5 the cupy-backend engine tests (pytest -m gpu on the rest) with the time left
#   6 a summary, last: tests per file, each target shape met or missed, the sweep's table, the
#     benchmark's seconds per impl, time per step
#
#   bash bench/gpu_check.sh [--dry-run] [OUTDIR]       (default ./gpu-out)
#
# --dry-run runs every step's plumbing on a CPU (pip install --dry-run, GPU tests skip, the
# benchmark takes its tiny CPU shapes, the sweep runs the Triton candidates in the interpreter
# and writes its table into OUTDIR/tuned) so CI catches a broken script.
# Caches live in ./.gpu-cache (git-ignored): Triton's compiles and autotuner results
# (TRITON_CACHE_AUTOTUNING=1), CuPy's NVRTC kernels, Inductor's compiles, so a rerun on the same
# machine compiles and autotunes nothing it did before.
#
# Time limits in seconds (environment): GPU_CHECK_KERNEL_S (default 90), GPU_CHECK_BENCH_S (160),
# GPU_CHECK_SWEEP_S (75; 0 skips the sweep, for a rerun that needs no new table),
# GPU_CHECK_BUDGET_S (360, the whole check; step 5 gets what is left, at least 30). The benchmark
# stops starting new measurements 20 s before its limit, the sweep at three quarters of its
# limit, and both still write their tables; a step killed by its limit leaves its log and JSON
# lines. A sweep cut short starts, on the rerun, with the ops it did not reach.
# pytest runs GPU_CHECK_WORKERS (default 8) processes where pytest-xdist is installed.
#
# Time estimate (not a measurement of this script). Cold, on one H100: install 12 s, kernel tests
# 51 s, benchmark at most 160 s (the torch.compile rows come last and are the ones cut if it does
# not fit) plus at most 75 s of host, back-to-back and CUDA-graph figures (about 0.3 s a record, 45
# records), engine tests 38 s: at most 336 s, under 6 minutes, plus the machine's start. The stage
# figures are those of a recorded cold H100 run (bench/RESULTS.md, 328 s), whose 227 s benchmark
# included an estimated 60-120 s of drawing, rounding and widening the 2.9 G input elements on one
# host core (about 80 ns an element on one core of a shared 2-core CPU: 30 to draw, 35 to round to
# bf16, 15 to widen); the benchmark draws them with one thread per core and widens them on the
# device, a few seconds. A rerun on the warm machine: install skipped, kernel tests about 35 s,
# benchmark about 75 s (nothing compiled or autotuned again), sweep about 40 s (its candidates
# compiled already), engine tests about 25 s: about 175 s, under 3 minutes (about 135 s with GPU_CHECK_SWEEP_S=0).
# Exit status: 0 when the install, both test steps, the benchmark and the sweep passed.
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
step_done() { echo "  $1: rc $2$([ "$2" -eq 124 ] && echo ' (TIMED OUT)'), $((SECONDS - $3)) s" >>"$OUT/steps.txt"; }

export TRITON_CACHE_DIR="$ROOT/.gpu-cache/triton" CUPY_CACHE_DIR="$ROOT/.gpu-cache/cupy"
export TORCHINDUCTOR_CACHE_DIR="$ROOT/.gpu-cache/inductor" TORCHINDUCTOR_FX_GRAPH_CACHE=1
export TRITON_CACHE_AUTOTUNING=1  # triton >= 3.4: autotuner timings kept in TRITON_CACHE_DIR
mkdir -p "$TRITON_CACHE_DIR" "$CUPY_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR"

T=$SECONDS
PIP_RC=0
INSTALLED_HERE=$(cd / && "$PY" -c "import gpuad, os; print(os.path.dirname(os.path.dirname(os.path.abspath(gpuad.__file__))))" 2>/dev/null)
if [ $DRY -eq 1 ]; then
    echo "== 1 install (dry run: pip install --dry-run --no-deps --no-build-isolation -e .)"
    "$PY" -m pip install --dry-run --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1
    PIP_RC=$?
elif [ "$INSTALLED_HERE" = "$ROOT" ]; then
    echo "== 1 install: gpuad is installed from this tree already (skipped)" | tee "$OUT/pip.log"
else
    echo "== 1 install (pip --no-deps --no-build-isolation -e .)"
    "$PY" -m pip install --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1
    PIP_RC=$?
fi
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
timeout "${GPU_CHECK_KERNEL_S:-90}" "$PY" -m pytest -m gpu -q -rfE "${XDIST[@]}" --durations=15 \
    --junitxml="$OUT/junit-kernels.xml" "${KERNEL_TESTS[@]}" 2>&1 | tee "$OUT/pytest-kernels.log"
KERNEL_RC=$?
step_done "kernel tests" $KERNEL_RC $T

CPU_ARGS=()
[ $DRY -eq 1 ] && CPU_ARGS=(--cpu)

T=$SECONDS
BENCH_S=${GPU_CHECK_BENCH_S:-160}
BENCH_ARGS=(--preset quick)
[ $DRY -eq 1 ] && BENCH_ARGS=(--preset tiny)
echo "== 3 python -m bench ${BENCH_ARGS[*]} ${CPU_ARGS[*]} (limit ${BENCH_S} s)"
timeout "$BENCH_S" "$PY" -m bench "${BENCH_ARGS[@]}" "${CPU_ARGS[@]}" --budget-s $((BENCH_S - 20)) --out "$OUT" \
    2>&1 | tee "$OUT/bench.log"
BENCH_RC=$?
if [ $BENCH_RC -eq 124 ] && [ -s "$OUT/results.jsonl" ]; then  # killed: rebuild the table from what it measured
    "$PY" -m bench --report "$OUT" >>"$OUT/bench.log" 2>&1
fi
step_done benchmark $BENCH_RC $T

T=$SECONDS
SWEEP_S=${GPU_CHECK_SWEEP_S:-75}
SWEEP_RC=0
if [ "$SWEEP_S" -gt 0 ]; then
    echo "== 4 python -m bench --sweep ${CPU_ARGS[*]} (limit ${SWEEP_S} s)"
    timeout "$SWEEP_S" "$PY" -m bench --sweep "${CPU_ARGS[@]}" --budget-s $((SWEEP_S * 3 / 4)) --out "$OUT" \
        2>&1 | tee "$OUT/sweep.log"
    SWEEP_RC=$?
    step_done sweep $SWEEP_RC $T
else
    echo "== 4 sweep skipped (GPU_CHECK_SWEEP_S=0)" | tee "$OUT/sweep.log"
    echo "  sweep: skipped" >>"$OUT/steps.txt"
fi

T=$SECONDS
LEFT=$((BUDGET - (SECONDS - START)))
[ $LEFT -lt 30 ] && LEFT=30
IGNORES=()
for f in "${KERNEL_TESTS[@]}"; do IGNORES+=(--ignore="$f"); done
echo "== 5 engine tests on the cupy backend: pytest -m gpu (the rest), ${LEFT} s"
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
[ $PIP_RC -eq 0 ] && [ $KERNEL_RC -eq 0 ] && [ $BENCH_RC -eq 0 ] && [ $SWEEP_RC -eq 0 ] && [ $ENGINE_RC -eq 0 ]
