#!/usr/bin/env bash
# The one-command GPU check. Steps, in this order, each with its own log in OUTDIR, written as it goes:
#   1 install gpuad from this tree (nothing downloaded; skipped when it is installed from here
#     already) and say whether the kernel modules import
#   2 the kernel tests (Triton CE, Triton linear, CuPy kernels, backends): pytest -m gpu, JUnit XML
#   3 the tuning sweep: the candidates the kernels declare, by expected gain, each op within its
#     share of the time (bench/sweep.py); winners into OUTDIR/tuned/<GPU>.json
#   4 the quick benchmark (every target shape of bench/TARGETS.md; one JSON line per record as measured),
#     on the table the sweep just wrote (GPUAD_TUNED_DIR=OUTDIR/tuned)
#   5 the cupy-backend engine tests (pytest -m gpu on the rest)
#   6 a summary, last: tests per file, each target shape met or missed (bench/TARGETS.md), the sweep's table, the
#     benchmark's seconds per impl, time per step
# Each test step also writes tests-<step>.jsonl, a line as each test starts and ends, so a step
# killed by its limit still names what failed and what was running.
#
#   bash bench/gpu_check.sh [--dry-run] [OUTDIR]       (default ./gpu-out)
#   bash bench/gpu_check.sh --bench-only [--dry-run] OUTDIR   a second call: install, the benchmark on
#                                      the committed tables (kernels/tuned), Nsight Compute profiles of
#                                      the gpuad kernels where `ncu` exists, the summary
#   bash bench/gpu_check.sh --plan     each step of both commands, its limit and its estimated
#                                      seconds (bench/plan.py); exit 1 when a command's limits pass 9 minutes
#
# --dry-run runs every step's plumbing on a CPU (pip install --dry-run, GPU tests skip, the
# benchmark takes its tiny CPU shapes, the sweep runs the Triton candidates in the interpreter
# and writes its table into OUTDIR/tuned) so CI catches a broken script.
# Caches live in ./.gpu-cache (git-ignored): Triton's compiles and autotuner results
# (TRITON_CACHE_AUTOTUNING=1), CuPy's NVRTC kernels, Inductor's compiles, so a rerun on the same
# machine compiles and autotunes nothing it did before.
#
# Time limits in seconds (environment; bench/plan.py holds the defaults): GPU_CHECK_INSTALL_S,
# GPU_CHECK_KERNEL_S, GPU_CHECK_SWEEP_S (0 skips the sweep), GPU_CHECK_BENCH_S, GPU_CHECK_ENGINE_S,
# GPU_CHECK_PROFILE_S. The benchmark stops starting new measurements 20 s before its limit, the
# sweep at four fifths of its limit, and both still write their tables; a step killed by its limit
# leaves its log and JSON lines. A sweep cut short starts, on the rerun, with the ops it did not reach.
# pytest runs GPU_CHECK_WORKERS (default 8) processes where pytest-xdist is installed.
# Exit status: 0 when the install, both test steps, the sweep and the benchmark passed.
set -uo pipefail
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python

DRY=0 PLAN=0 BENCH_ONLY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --plan) PLAN=1 ;;
        --bench-only) BENCH_ONLY=1 ;;
        -*) echo "gpu_check.sh: unknown option $1 (--dry-run, --plan, --bench-only)" >&2; exit 2 ;;
        *) break ;;
    esac
    shift
done
if [ $PLAN -eq 0 ]; then  # OUTDIR relative to where the script was called from
    OUT=${1:-./gpu-out}
    mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
fi
cd "$(dirname "$0")/.." || exit 2
if [ $PLAN -eq 1 ]; then exec "$PY" -m bench.plan; fi
LIMITS=$("$PY" -m bench.plan --limits) || exit 2  # INSTALL_S ... PROFILE_S: the environment's, else the defaults
eval "$LIMITS"
if [ $DRY -eq 1 ]; then  # a CI CPU: the interpreter's sweep gets less, pytest's collection of every file more
    SWEEP_S=${GPU_CHECK_SWEEP_S:-75} ENGINE_S=${GPU_CHECK_ENGINE_S:-240}
fi
ROOT=$(pwd)
START=$SECONDS
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
    timeout "$INSTALL_S" "$PY" -m pip install --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1
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
CPU_ARGS=()
[ $DRY -eq 1 ] && CPU_ARGS=(--cpu)
KERNEL_RC=0 SWEEP_RC=0 ENGINE_RC=0 PROFILE_RC=0

# pytest -m gpu with a limit: JUnit XML at the end, and a line a test as it goes (tests-<name>.jsonl)
gpu_tests() {
    local name=$1 limit=$2
    shift 2
    : >"$OUT/tests-$name.jsonl"
    timeout "$limit" "$PY" -m pytest -m gpu -q -rfE "${XDIST[@]}" --durations=15 --junitxml="$OUT/junit-$name.xml" \
        --test-lines="$OUT/tests-$name.jsonl" "$@" 2>&1 | tee "$OUT/pytest-$name.log"
}

if [ $BENCH_ONLY -eq 0 ]; then
    T=$SECONDS
    echo "== 2 kernel tests: pytest -m gpu ${KERNEL_TESTS[*]} (limit ${KERNEL_S} s)"
    gpu_tests kernels "$KERNEL_S" "${KERNEL_TESTS[@]}"
    KERNEL_RC=$?
    step_done "kernel tests" $KERNEL_RC $T

    T=$SECONDS
    if [ "$SWEEP_S" -gt 0 ]; then
        echo "== 3 python -m bench --sweep ${CPU_ARGS[*]} (limit ${SWEEP_S} s)"
        mkdir -p "$OUT/tuned"  # from the committed tables (a rerun keeps what a cut sweep wrote)
        for f in kernels/tuned/*.json; do [ -e "$f" ] && cp -n "$f" "$OUT/tuned/"; done
        timeout "$SWEEP_S" "$PY" -m bench --sweep "${CPU_ARGS[@]}" --budget-s $((SWEEP_S * 4 / 5)) --out "$OUT" \
            --tuned-dir "$OUT/tuned" 2>&1 | tee "$OUT/sweep.log"
        SWEEP_RC=$?
        step_done sweep $SWEEP_RC $T
        export GPUAD_TUNED_DIR="$OUT/tuned"  # the benchmark's launchers read the table just written
    else
        echo "== 3 sweep skipped (GPU_CHECK_SWEEP_S=0)" | tee "$OUT/sweep.log"
        echo "  sweep: skipped" >>"$OUT/steps.txt"
    fi
fi

T=$SECONDS
BENCH_ARGS=(--preset quick)
[ $DRY -eq 1 ] && BENCH_ARGS=(--preset tiny)
echo "== 4 python -m bench ${BENCH_ARGS[*]} ${CPU_ARGS[*]} (limit ${BENCH_S} s; tuned tables: ${GPUAD_TUNED_DIR:-kernels/tuned})"
timeout "$BENCH_S" "$PY" -m bench "${BENCH_ARGS[@]}" "${CPU_ARGS[@]}" --budget-s $((BENCH_S - 20)) --out "$OUT" \
    2>&1 | tee "$OUT/bench.log"
BENCH_RC=$?
if [ $BENCH_RC -eq 124 ] && [ -s "$OUT/results.jsonl" ]; then  # killed: rebuild the table from what it measured
    "$PY" -m bench --report "$OUT" >>"$OUT/bench.log" 2>&1
fi
step_done benchmark $BENCH_RC $T

T=$SECONDS
if [ $BENCH_ONLY -eq 0 ]; then
    IGNORES=()
    for f in "${KERNEL_TESTS[@]}"; do IGNORES+=(--ignore="$f"); done
    echo "== 5 engine tests on the cupy backend: pytest -m gpu (the rest), limit ${ENGINE_S} s"
    gpu_tests engine "$ENGINE_S" "${IGNORES[@]}"
    ENGINE_RC=$?
    step_done "engine tests" $ENGINE_RC $T
elif command -v ncu >/dev/null 2>&1 && [ $DRY -eq 0 ]; then
    echo "== 5 Nsight Compute profiles of the gpuad kernels at the LM-head and CE shapes (limit ${PROFILE_S} s)"
    mkdir -p "$OUT/ncu"
    # the third call of each kernel whose name holds ce_ (past the check and the first timing call)
    timeout "$PROFILE_S" ncu --target-processes all --kernel-name-base function --kernel-id '::regex:ce_:3' \
        --set full -o "$OUT/ncu/profiles" -f "$PY" -m bench --preset quick --impls triton,cupy \
        --ops softmax_cross_entropy,linear_cross_entropy --budget-s $((PROFILE_S - 30)) --out "$OUT/ncu" \
        >"$OUT/ncu.log" 2>&1
    PROFILE_RC=$?
    step_done "profiles" $PROFILE_RC $T
else
    echo "== 5 profiles skipped: $([ $DRY -eq 1 ] && echo 'dry run' || echo 'no ncu on PATH')" | tee "$OUT/ncu.log"
    echo "  profiles: skipped" >>"$OUT/steps.txt"
fi

echo
echo "================ table, then summary ($((SECONDS - START)) s) ================"
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')" 2>/dev/null
echo "install: $([ $PIP_RC -eq 0 ] && echo ok || echo "FAILED (rc $PIP_RC, see pip.log)")"
[ -f "$OUT/table.txt" ] && cat "$OUT/table.txt"
"$PY" -m bench.summary "$OUT"
[ $PIP_RC -eq 0 ] && [ $KERNEL_RC -eq 0 ] && [ $BENCH_RC -eq 0 ] && [ $SWEEP_RC -eq 0 ] && [ $ENGINE_RC -eq 0 ]
