#!/usr/bin/env bash
# One prepared GPU session: the checks this project owes a GPU, most important first, each under its own time
# limit so that a short lease (15 minutes of device time, 10 a command) still brings back what finished.
#
#   OUT=/some/folder bash benchmarks/gpu_session.sh          # on the GPU machine, from the repository root
#   bash benchmarks/gpu_session.sh tests budget_sweep        # some steps only (a lease's command runs 10 minutes
#                                                            # at most: all steps together can take 14)
#   DRY=1 bash benchmarks/gpu_session.sh                     # print the steps and their limits, run nothing
#   AUTOJAC_COMMIT=$(git rev-parse --short HEAD) ...         # the commit the benchmark reports name (a copied
#                                                            # working tree's .git may name an older one)
#
# It needs torch with CUDA and the test dependencies (pytest, hypothesis); autojac is taken from the checkout
# (PYTHONPATH), so nothing is installed. Results go to $OUT (default benchmarks/results/gpu-session), one file a
# step plus summary.txt; copy the ones worth keeping into benchmarks/results and fix the commit they name (a
# copied working tree may not know its own).
#   1. the test suite on CUDA: four pytest-xdist processes where xdist is installed (PER_FILE=1: one process
#      per file instead; a device-side assert poisons a process's CUDA context, so one file's failure must
#      not fail the files after it);
#   2. the budget sweep on `wide_mlp --size gpu` (an unchunked need of about 2 GiB, budgets 4x, 10x, 15x below it:
#      the mission's memory-constrained GPU job), quick;
#   3. the training-loop benchmark, quick;
#   4. the structured and habits benchmarks, quick (they say they work; their timings want a full run).
set -u
OUT=${OUT:-benchmarks/results/gpu-session}
DEVICE=${DEVICE:-cuda}
KNOWN="tests budget_sweep training_loop structured habits"
for want in "$@"; do
    case " $KNOWN " in
        *" $want "*) ;;
        *) echo "gpu_session.sh: unknown step '$want' (steps: $KNOWN)" >&2; exit 2 ;;
    esac
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
summary="$OUT/summary.txt"
if [ -z "${DRY:-}" ]; then
    mkdir -p "$OUT"
    echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC'): ${*:-all steps}" >> "$summary"  # appended: runs of some steps add up
fi

step() {  # step <name> <seconds> <command...>
    local name=$1 limit=$2
    shift 2
    if [ -n "${DRY:-}" ]; then
        echo "[$name] limit ${limit}s: $*"
        return
    fi
    local began=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "[$name] rc=$rc in $((SECONDS - began))s: $(tail -n 1 "$OUT/$name.log")" | tee -a "$summary"
}

[ -n "${DRY:-}" ] || $PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" | tee -a "$summary"

wanted() {  # wanted <step>: named on the command line, or no step named
    local want
    for want in $STEPS; do [ "$want" = "$1" ] && return 0; done
    [ -z "$STEPS" ]
}
STEPS="$*"

if wanted tests; then
    export PYTEST_TORCH_DEVICE=$DEVICE
    if [ -z "${PER_FILE:-}" ] && $PY -c "import xdist" 2>/dev/null; then
        # Four pytest processes share the GPU (the whole suite in about 110 s on an H200, against about 230 s a
        # file at a time), each with 4 CPU threads: with 16 each, the CPU tests' timing decisions (calibrated
        # on 2 cores) failed oversubscribed. A device-side assert ends one worker's CUDA use, not the others'.
        OMP_NUM_THREADS=4 step tests 300 $PY -m pytest -q -p no:cacheprovider -n 4 -rf tests/
    else
        for file in tests/test_*.py; do
            step "$(basename "$file" .py)" 120 $PY -m pytest -q -x -p no:cacheprovider "$file"
        done
    fi
fi
wanted budget_sweep && step budget_sweep 240 $PY benchmarks/budget_sweep.py --device "$DEVICE" --size "${SIZE:-gpu}" --quick --out "$OUT"
wanted training_loop && step training_loop 150 $PY benchmarks/training_loop.py --device "$DEVICE" --quick --out "$OUT"
# Quick sizes are launch-bound on a GPU (a smoke test). For figures, full sizes on a few problems fit a step:
#   STRUCTURED_ARGS="--only brusselator,heat,dense_control" HABITS_ARGS="--only mlp,rosenbrock --batches 512,4096"
wanted structured && step structured 150 $PY benchmarks/structured.py --device "$DEVICE" ${STRUCTURED_ARGS:---quick} --out "$OUT"
wanted habits && step habits 150 $PY benchmarks/habits.py --device "$DEVICE" ${HABITS_ARGS:---quick} --out "$OUT"
exit 0
