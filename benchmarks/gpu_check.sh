#!/usr/bin/env bash
# GPU check of the fused AsFT kernels, for a lent CUDA machine (H200 sized).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh                  # results under $OUT (default ./gpu_check_out)
#   STEPS="checks big" OUT=/some/dir bash benchmarks/gpu_check.sh   # a rerun of some steps only
#   DRY=1 OUT=/tmp/dry bash benchmarks/gpu_check.sh             # CPU: tiny sizes, Triton interpreter
#
# Installs nothing. Needs python with torch (CUDA), triton, safetensors and tqdm; pytest is optional
# (without it the test step is skipped and says so). It tests the checkout it sits in: a throw-away
# shim folder (first on PYTHONPATH) maps this checkout's asft_optim/ and kernels/ to asft_optim and
# asft_optim.kernels, as setup.py does, and the `where` step stops the run if either is imported
# from elsewhere (never an installed copy); a `where` step that only timed out (a cold CUDA start)
# does not stop it: bench_gpu.py checks the copy again itself.
#
# Steps, in this order, each under its own timeout in seconds (override: T_TESTS=200 ...):
#   where    60   which python, torch, triton and asft_optim files are used; CUDA's first start
#   tests    90   tests/test_triton.py on CUDA tensors, compiled kernels
#   checks   45   bench_gpu.py --section checks: fp32 parity, fp16/bf16 per element in ulps, one-pass c
#   timing  150   bench_gpu.py --section timing: copy bandwidth; ms/step on ~1B Llama-shaped params
#                 (fp32: fused AdamW, AsFT triton fp32 / bf16 W0,d, explicit loss; bf16 params: fused
#                 AdamW, AsFT triton), gradients in place and re-allocated; 1000 small tensors
#   big      75   bench_gpu.py --section big: a bf16 tensor of 2**31 + 6221 elements (tail, then c)
#   host     45   bench_gpu.py --section host: host time per step at the 1B layout, launches stubbed
#   summary  15   bench_gpu.py --summary: ratios against the goals, from what was measured
# Worst case 480 s (every step at its timeout); an H200 should need 3-4 minutes. At most 5 files in
# $OUT: run.log (every step's output, in order, as it is printed), steps.txt (one line per step:
# exit status, seconds), results.jsonl and gpu_check.txt (every result appended and flushed as it
# is measured, so a step cut short by its timeout, or the whole run killed, leaves what it
# measured), gpu_check.json (the summary). The EXIT/INT/TERM trap names the step that was running
# when the run stopped. Exit status: 0 if every step passed.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
OUT="${OUT:-$REPO/gpu_check_out}"
PY="${PYTHON:-python3}"
DRY="${DRY:-0}"
STEPS="${STEPS:-where tests checks timing big host summary}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd -P)"
cd "$REPO"

if [[ "$DRY" == "1" ]]; then  # the interpreter is slow (the sizes are tiny)
    declare -A LIMIT=([where]=120 [tests]=1200 [checks]=300 [timing]=300 [big]=300 [host]=600 [summary]=60)
else
    declare -A LIMIT=([where]=60 [tests]=90 [checks]=45 [timing]=150 [big]=75 [host]=45 [summary]=15)
fi
for step in "${!LIMIT[@]}"; do  # T_TESTS=200 etc. override
    var="T_${step^^}"
    LIMIT[$step]="${!var:-${LIMIT[$step]}}"
done

SHIM="$(mktemp -d)"
CURRENT=""
STEP_PID=""
STATUS=0
on_exit() {
    local rc=$?
    if [[ -n "$CURRENT" ]]; then
        [[ -n "$STEP_PID" ]] && kill -TERM "$STEP_PID" 2>/dev/null && wait "$STEP_PID" 2>/dev/null
        echo "stopped during step '$CURRENT' (signal); results so far are in $OUT" | tee -a "$OUT/steps.txt"
    fi
    echo "gpu_check.sh: exit $rc; results in $OUT ($(ls "$OUT" | tr '\n' ' '))"
    rm -rf "$SHIM"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$SHIM/asft_optim"
for f in "$REPO"/asft_optim/*; do ln -s "$f" "$SHIM/asft_optim/"; done
ln -s "$REPO/kernels" "$SHIM/asft_optim/kernels"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
if [[ "$DRY" == "1" ]]; then
    export TRITON_INTERPRET=1
    bench_args=(--dry)
else
    export ASFT_TEST_DEVICE=cuda
    bench_args=()
fi

# run STEP COMMAND...: the command under the step's timeout, its output to $OUT/run.log and here
run() {
    local step=$1; shift
    local t0=$SECONDS rc
    CURRENT=$step
    echo "== $step (timeout ${LIMIT[$step]} s)" | tee -a "$OUT/run.log"
    # in the background, so that a signal to this script runs its trap at once (bash runs traps
    # only between foreground commands); `timeout` puts the step in a process group of its own
    timeout -k 5 "${LIMIT[$step]}" "$@" > >(tee -a "$OUT/run.log") 2>&1 &
    STEP_PID=$!
    wait "$STEP_PID"
    rc=$?
    STEP_PID=""
    CURRENT=""
    local note=""
    [[ $rc -eq 124 || $rc -eq 137 ]] && note=" (timed out after ${LIMIT[$step]} s)"
    echo "$step exit $rc in $((SECONDS - t0)) s$note" | tee -a "$OUT/steps.txt" "$OUT/run.log"
    [[ $rc -ne 0 ]] && STATUS=1
    return $rc
}

# the steps that are shell functions run as `bash -c` under `timeout`, so they see these variables
export REPO SHIM PY OUT DRY
where() {
    (cd "$SHIM" && "$PY" - "$REPO" <<'EOF'
import importlib.util, os, sys
repo = sys.argv[1]
missing = [m for m in ("torch", "triton", "safetensors", "tqdm") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check.sh: missing python packages: {' '.join(missing)} (this script installs nothing)")
import torch, triton
import asft_optim, asft_optim.kernels
pkg = os.path.dirname(os.path.realpath(asft_optim.__file__))
ker = os.path.dirname(os.path.realpath(asft_optim.kernels.__file__))
print("python", sys.executable, sys.version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("triton", triton.__version__)
print("asft_optim from", pkg, "\nasft_optim.kernels from", ker)
want = (os.path.join(repo, "asft_optim"), os.path.join(repo, "kernels"))
if (pkg, ker) != want:
    sys.exit(f"gpu_check.sh: asft_optim is imported from {pkg} and {ker}, not from this checkout {repo}")
EOF
    )
    date -u +"date: %Y-%m-%dT%H:%M:%SZ"
    git -C "$REPO" rev-parse HEAD 2>/dev/null | sed 's/^/commit /'
    git -C "$REPO" status --short 2>/dev/null | head -20 | sed 's/^/changed /'
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem \
        --format=csv
    return 0
}

tests() {
    if ! "$PY" -c "import pytest" 2>/dev/null; then
        echo "pytest not installed: test step skipped (the checks step still judges the kernels)"
        return 0
    fi
    # from the shim folder in importlib mode, so that asft_optim comes from PYTHONPATH and not from
    # the checkout root (whose asft_optim/ has no kernels/)
    # the sm_90 compile checks need no GPU: they run with the CPU tests, not here
    local deselect=()
    [[ "${DRY:-0}" == "1" ]] || deselect=(-k "not compiled_variants")
    cd "$SHIM" && "$PY" -m pytest -v -p no:cacheprovider --import-mode=importlib --rootdir "$REPO" \
        --durations=10 "${deselect[@]}" "$REPO/tests/test_triton.py"
}

for step in $STEPS; do
    case "$step" in
        where)   run where bash -c "$(declare -f where); where"
                 rc=$?
                 if [[ $rc -eq 124 || $rc -eq 137 ]]; then
                     echo "where timed out (a cold CUDA start?): going on; bench_gpu.py checks the copy itself"
                 elif [[ $rc -ne 0 ]]; then
                     echo "cannot go on"; exit 3
                 fi ;;
        tests)   run tests bash -c "$(declare -f tests); tests" ;;
        checks|timing|big|host)
                 run "$step" "$PY" benchmarks/bench_gpu.py --out "$OUT" --section "$step" "${bench_args[@]}" ;;
        summary) run summary "$PY" benchmarks/bench_gpu.py --out "$OUT" --summary ;;
        *)       echo "gpu_check.sh: unknown step '$step' (steps: where tests checks timing big host summary)"; exit 2 ;;
    esac
done
echo "== done (status $STATUS)"
exit $STATUS
