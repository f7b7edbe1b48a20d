#!/bin/bash
# Tensor-core attention on the lent GPU, one step per call (see docs/kernels.md):
#   bash benchmarks/device_tc.sh smoke|parity|e2e|steps|profile|stalls|ktimes|ktab|ktrees|timeline
# Results in $OUT.
set -o pipefail
export PYTHONPATH=/root/mlx-site:$PWD PYTHONUNBUFFERED=1
# GPU time of single attention calls at the clocks a user's run gets (the profiler
# serializes kernels and flushes the caches between them), every scheme and length in one
# process of the tree in the current directory: $1/kt.csv, and $1/kt_order.json to tell the
# calls apart; $2 seconds at most.
ktimes() {
  timeout $2 /usr/local/cuda/bin/ncu --csv --clock-control none \
    --metrics gpu__time_duration.sum -k regex:"attention|sdpa|lean_reduction" \
    python3 benchmarks/profile_attention.py --context ${KT_CONTEXTS:-4096 32768 131072} \
    --scheme ${KT_SCHEMES:-fp16 turbo4 turbo3 turbo2} --calls 5 \
    --order $1/kt_order.json > $1/kt.csv 2> $1/kt.err
}
# ktimes of several trees on one machine, each run twice in turn (name, name2, ...): the
# arguments are name=dir pairs; then the table in that order (kt_ab.txt, kt_ab.json).
ktrees() {
  local dirs=() round spec run
  for round in "" 2; do
    for spec in "$@"; do
      run=${spec%%=*}$round
      mkdir -p $OUT/raw/$run
      (cd ${spec#*=} && PYTHONPATH=/root/mlx-site:$PWD ktimes $OUT/raw/$run ${KT_S:-150})
      echo "$run: rc $? at $SECONDS s"
      dirs+=($OUT/raw/$run)
    done
  done
  python3 benchmarks/profile_attention.py --summarize ${dirs[@]} --json $OUT/kt_ab.json \
    | tee $OUT/kt_ab.txt
  tar -czf $OUT/kt_raw.tgz -C $OUT raw && rm -rf $OUT/raw
}
case "${1:-smoke}" in
  smoke)
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
    python3 -c "import mlx.core as mx; print(mx.device_info())" | tee -a $OUT/gpu.txt
    timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels_gpu.py \
      -k "tensor_cores_take or large_queries or (test_attention_parity and turbo4 and 128)" \
      2>&1 | tee $OUT/smoke.log | tail -5
    timeout 260 python3 benchmarks/bench_kernels.py --out $OUT --skip-e2e \
      --contexts 1024 4096 16384 32768 65536 131072 \
      --schemes turbo4 turbo4:portable turbo3 turbo2 turbo4v2 turbo0v4 2>&1 | tee $OUT/bench.log
    timeout 120 /usr/local/cuda/bin/ncu --set full -k regex:turboquant_attention --launch-skip 1 -c 1 \
      python3 benchmarks/profile_attention.py --context 131072 > $OUT/ncu_tc.txt 2>&1
    grep -E "Duration|Issued Instructions  |Registers Per|Achieved Occupancy|DRAM Throughput|Memory Throughput" \
      $OUT/ncu_tc.txt | head -12 ;;
  parity)
    timeout ${PARITY_S:-420} python3 -m pytest -q -n 12 -p no:cacheprovider tests/test_kernels_gpu.py \
      2>&1 | tee $OUT/parity.log | tail -15 ;;
  e2e)
    timeout ${E2E_S:-500} python3 benchmarks/bench_kernels.py --out $OUT --skip-kernels \
      --e2e-contexts ${E2E_CONTEXTS:-4096 16384 32768 65536} --decode-steps 32 \
      --e2e-schemes ${E2E_SCHEMES:-turbo4 turbo4:portable turbo3 turbo2} 2>&1 | tee $OUT/e2e.log ;;
  steps)
    timeout ${STEPS_S:-200} python3 benchmarks/step_costs.py --out $OUT \
      --context ${STEP_CONTEXTS:-4096 32768} 2>&1 | tee $OUT/steps.log ;;
  profile)
    kinds=${PROFILE_KINDS:-fp16 turbo4 turbo3}
    for T in ${PROFILE_CONTEXTS:-4096 32768}; do
      timeout ${PROFILE_S:-240} /usr/local/cuda/bin/ncu --csv ${PROFILE_CLOCKS:+--clock-control $PROFILE_CLOCKS} \
        --metrics gpu__time_duration.sum \
        --profile-from-start off python3 benchmarks/profile_step.py --context $T \
        --kinds $kinds > $OUT/step_$T.csv 2> $OUT/step_$T.err
      python3 benchmarks/profile_step.py --summarize $OUT/step_$T.csv --json $OUT/step_$T.json \
        --kinds $kinds 2>&1 | tee $OUT/step_$T.txt
    done ;;
  stalls)
    # Where one turbo4 call's (STALL_SCHEME) warps stall, per SASS instruction: sass.csv and
    # stalls.json, and a summary printed.
    T=${STALL_CONTEXT:-131072}
    timeout ${STALL_S:-200} /usr/local/cuda/bin/ncu --section SourceCounters \
      --section WarpStateStats --page source --print-source sass --csv \
      -k regex:turboquant_attention --launch-skip 2 -c 1 \
      python3 benchmarks/profile_attention.py --context $T --scheme ${STALL_SCHEME:-turbo4} \
      --calls 4 > $OUT/sass.csv 2> $OUT/sass.err
    python3 benchmarks/profile_attention.py --context $T --stalls $OUT/sass.csv \
      --json $OUT/stalls.json 2>&1 | tee $OUT/stalls.txt ;;
  ktimes)
    ktimes $OUT ${KT_S:-300} ;;
  ktab)
    # Two trees: KT_BASE is the code to compare against (`git archive HEAD~1
    # mlx_lm_turboquant benchmarks | tar -x -C base`), this tree the new one.
    ktrees head=${KT_BASE:?set KT_BASE to the tree to compare} new=. ;;
  ktrees)
    ktrees ${KT_TREES:?set KT_TREES to name=dir pairs, e.g. \"head=base new=.\"} ;;
  timeline)
    timeout ${TIMELINE_S:-300} python3 benchmarks/kernel_timeline.py \
      --schemes ${TIMELINE_SCHEMES:-turbo4 turbo2} --json $OUT/timeline.json 2>&1 \
      | tee $OUT/timeline.txt ;;
esac
