#!/bin/bash
# One call on the lent GPU machine (see ../shared/device/README.md): parity tests, then the
# benchmark. Usage: bash benchmarks/device_run.sh [quick|full]; results land in $OUT.
set -o pipefail
export PYTHONPATH=/root/mlx-site:$PWD PYTHONUNBUFFERED=1
mode=${1:-quick}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
if [ "$mode" = quick ]; then
  timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels_gpu.py \
    -k "turbo4 or turbo0v4 or encode or dispatch" 2>&1 | tee $OUT/parity.log | tail -15
  timeout 240 python3 benchmarks/bench_kernels.py --out $OUT --skip-e2e \
    --contexts 4096 32768 131072 2>&1 | tee $OUT/bench.log
else
  timeout ${PARITY_S:-240} python3 -m pytest -q -n 12 -p no:cacheprovider tests/test_kernels_gpu.py \
    2>&1 | tee $OUT/parity.log | tail -15
  timeout ${BENCH_S:-330} python3 benchmarks/bench_kernels.py --out $OUT --sweep-blocks 256 512 2048 $BENCH_ARGS 2>&1 | tee $OUT/bench.log
fi
