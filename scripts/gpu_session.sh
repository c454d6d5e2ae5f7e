#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in one call (a machine start costs minutes):
# the Triton tests on the GPU, the kernels' errors per dtype and tile, and the timings against
# fla. Writes logs and reports under $OUT (or ./gpu-out). Usage, from the repository root on the
# GPU machine:  bash scripts/gpu_session.sh [seconds for the benchmark, default 240]
#
# The machine has torch and triton but no network: carry the wheels of seqdsl's other
# dependencies and of fla-core in .whl/ (see benchmarks/GPU_RESULTS.md for the download line).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1 || { tail -20 "$OUT/pip.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 240 python3 -m pytest tests/test_triton_chunk.py tests/test_triton_recurrent.py \
    tests/test_triton_attention.py tests/test_triton_backend.py -q -p no:cacheprovider -n 12 \
    --tb=short -rf >"$OUT/tests.log" 2>&1
echo "tests: $(tail -1 "$OUT/tests.log")"
grep -E "^FAILED" "$OUT/tests.log" | cut -c1-160
timeout 200 python3 scripts/gpu_numerics.py --dims 128 2>&1 | grep -v -i warn | tee "$OUT/numerics.log"
timeout "${1:-240}" python3 benchmarks/gpu.py --lengths 2048 8192 --dims 128 \
    --budget $(( ${1:-240} - 90 )) --out "$OUT/GPU_RESULTS.md" 2>&1 | grep -v -i warn | tail -12
