#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in one device call (a machine start costs
# minutes, and one call may run 10 minutes): the Triton tests on the GPU, the kernels' errors per
# dtype, and the timings against fla. Writes logs and reports under $OUT (or ./gpu-out).
#
#   bash scripts/gpu_session.sh [all|tests|numerics|bench] [benchmark case indices...]
#
# Time limits (seconds) from the environment: TESTS_S (200), NUMERICS_S (150), BENCH_S (200);
# "all" takes about 9 minutes. The benchmark starts no new case after BENCH_S - 60 seconds (fla
# autotunes every new shape: a case can take a minute), so a second call with the remaining
# case indices (benchmarks/gpu.py CASES) finishes the table.
#
# The machine has torch and triton but no network: carry the wheels of seqdsl's other
# dependencies and of fla-core in .whl/ (benchmarks/GPU_RESULTS.md has the download line).
set -uo pipefail
OUT=${OUT:-gpu-out}
PART=${1:-all}
shift || true
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1 \
    || { tail -20 "$OUT/pip.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [[ $PART == all || $PART == tests ]]; then
    timeout "${TESTS_S:-200}" python3 -m pytest tests/test_triton_chunk.py \
        tests/test_triton_recurrent.py tests/test_triton_attention.py tests/test_triton_backend.py \
        -q -p no:cacheprovider -n 16 --tb=short -rf >"$OUT/tests.log" 2>&1
    echo "tests: $(tail -1 "$OUT/tests.log")"
    grep -E "^FAILED" "$OUT/tests.log" | cut -c1-160
fi
if [[ $PART == all || $PART == numerics ]]; then
    timeout "${NUMERICS_S:-150}" python3 scripts/gpu_numerics.py --dims 128 2>&1 \
        | grep -v -i warn | tee "$OUT/numerics.log"
fi
if [[ $PART == all || $PART == bench ]]; then
    BENCH=${BENCH_S:-200}
    timeout "$BENCH" python3 benchmarks/gpu.py --lengths 2048 8192 --dims 128 \
        --budget $(( BENCH - 60 )) ${1:+--cases "$@"} --out "$OUT/GPU_RESULTS.md" 2>&1 \
        | grep -v -i warn | tail -12
fi
