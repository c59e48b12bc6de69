#!/usr/bin/env bash
# GPU check of the fused AsFT kernels, for a lent CUDA machine (H200 sized; < 5 minutes).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh     # results under $OUT (default ./gpu_check_out)
#   DRY=1 bash benchmarks/gpu_check.sh             # CPU syntax/flow check: tiny sizes, interpreter
#
# Installs nothing. Needs python with torch (CUDA), triton, safetensors and tqdm; pytest is optional
# (without it the test suite is skipped and the script says so). The package is imported from this
# checkout through a throw-away shim that maps kernels/ to asft_optim.kernels, as setup.py does.
#
# Steps: 1. tests/test_triton.py on CUDA tensors (compiled kernels, ASFT_TEST_DEVICE=cuda);
#        2. benchmarks/bench_gpu.py: parity on CUDA (fp32, bf16, 1000 tiny tensors, one-pass c,
#           a bf16 tensor of 2**31 + 6221 elements with its tail checked), device-to-device copy
#           bandwidth, step times of fused AdamW / AsFT triton fp32 / AsFT triton bf16 W0,d /
#           explicit loss + autograd on ~1B Llama-shaped parameters and on 1000 small tensors.
# Writes $OUT/gpu_check.json, $OUT/gpu_check.txt, $OUT/pytest.txt, $OUT/env.txt.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/gpu_check_out}"
PY="${PYTHON:-python3}"
DRY="${DRY:-0}"
mkdir -p "$OUT"
cd "$REPO"

missing=$("$PY" - <<'EOF'
import importlib.util
print(" ".join(m for m in ("torch", "triton", "safetensors", "tqdm") if importlib.util.find_spec(m) is None))
EOF
)
if [[ -n "$missing" ]]; then
    echo "gpu_check.sh: missing python packages: $missing (this script installs nothing)" | tee "$OUT/env.txt"
    exit 2
fi

SHIM="$(mktemp -d)"
trap 'rm -rf "$SHIM"' EXIT
if ! "$PY" -c "import asft_optim.kernels" 2>/dev/null; then
    mkdir -p "$SHIM/asft_optim"
    for f in "$REPO"/asft_optim/*; do ln -s "$f" "$SHIM/asft_optim/"; done
    ln -s "$REPO/kernels" "$SHIM/asft_optim/kernels"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1

{
    date -u +"date: %Y-%m-%dT%H:%M:%SZ"
    (cd "$SHIM" && "$PY" -c "import torch, triton, asft_optim.kernels as k; print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__, 'asft_optim.kernels from', k.__file__)")
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem \
        --format=csv
} 2>&1 | tee "$OUT/env.txt"

status=0
if [[ "$DRY" == "1" ]]; then
    echo "== dry run: tests stay in the interpreter; bench on tiny CPU tensors"
    test_env=(env)
    bench_args=(--dry)
else
    test_env=(env ASFT_TEST_DEVICE=cuda)
    bench_args=()
fi

echo "== 1. tests/test_triton.py"
if "$PY" -c "import pytest" 2>/dev/null; then
    # run from the shim folder in importlib mode, so that asft_optim comes from PYTHONPATH and not
    # from the checkout root (which has no asft_optim/kernels)
    (cd "$SHIM" && timeout 130 "${test_env[@]}" "$PY" -m pytest -q -p no:cacheprovider \
        --import-mode=importlib --rootdir "$REPO" "$REPO/tests/test_triton.py") 2>&1 | tee "$OUT/pytest.txt"
    rc=${PIPESTATUS[0]}
    [[ $rc -ne 0 ]] && { echo "tests: exit $rc"; status=1; }
else
    echo "pytest not installed: test suite skipped (bench_gpu.py still checks parity)" | tee "$OUT/pytest.txt"
fi

echo "== 2. benchmarks/bench_gpu.py"
timeout 150 "$PY" benchmarks/bench_gpu.py --out "$OUT" "${bench_args[@]}"
rc=$?
[[ $rc -ne 0 ]] && { echo "bench_gpu.py: exit $rc"; status=1; }

echo "== done (status $status); results in $OUT"
exit $status
