#!/usr/bin/env bash
# One-shot GPU check for a machine with no package index: installs the carried pure-Python deps
# and detectron2 v0.6's Python tree into /tmp/site, then runs the CUDA tests and the benchmarks,
# in the order of STEPS (most important first), each under its own time limit, logging to
# $OUT/device.log as it goes so that a cut-off run still returns what it measured.
# Fill the carry folder here first: bash benchmarks/prepare_carry.sh
#
#   STEPS="prroi pretrain compile_graphs train_demo" bash benchmarks/device_check.sh
set -uo pipefail
OUT="${OUT:-out}"; mkdir -p "$OUT"
LOG="$OUT/device.log"
CARRY="${CARRY:-.carry}"
exec > >(tee -a "$LOG") 2>&1
mkdir -p /tmp/site && cp -r "$CARRY"/site/* /tmp/site/
python3 -m pip install -q --no-index --no-deps --target /tmp/site "$CARRY"/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 tools/install_detectron2.py --sdist "$CARRY"/pb1-detectron2-0.6.tar.gz --site-dir /tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
run() {
  local limit="$1"; shift
  echo; echo "### [$(date +%T), limit ${limit}s] $*"
  timeout "$limit" "$@" 2>&1 | grep -v -i -E "warn|^ *warnings\.|USDT|SyncActivity"
}
bench=benchmarks/bench_pretrain_step.py
for step in ${STEPS:-prroi pretrain compile views}; do
  case "$step" in
    prroi)
      run 90 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_prroi_pool.py
      run 60 python3 benchmarks/bench_prroi_pool.py --device cuda
      run 60 python3 benchmarks/bench_prroi_pool.py --device cuda --check --dtype all ;;
    prroi_bench)
      run 60 python3 benchmarks/bench_prroi_pool.py --device cuda ;;
    pretrain)
      run 120 python3 $bench --device cuda --batch 128 --bf16 --channels-last --repeats 2
      run 120 python3 $bench --device cuda --batch 64 --bf16 --channels-last --repeats 2
      run 120 python3 $bench --device cuda --batch 128 --repeats 2
      run 60 python3 $bench --device cuda --batch 128 --bf16 --channels-last --repeats 1 \
        --iters 5 --models resim_fpn --profile 25 ;;
    pretrain_bf16)
      run 120 python3 $bench --device cuda --batch 128 64 --bf16 --channels-last --repeats 2 ;;
    compile_profile)
      run 300 python3 $bench --device cuda --batch 128 --bf16 --channels-last --compile \
        --models mocov2 resim_fpn --repeats 2 --profile 30 ;;
    compile_graphs)  # compiled encoders as CUDA graphs, batch 128; MoCo-v2 the baseline
      run 300 python3 $bench --device cuda --batch 128 --bf16 --channels-last --compile \
        --compile-mode reduce-overhead --models mocov2 resim_fpn --repeats 2 --profile 12 ;;
    compile_graphs64)  # does replaying CUDA graphs lift the launch-bound batch 64?
      run 300 python3 $bench --device cuda --batch 64 --bf16 --channels-last --compile \
        --compile-mode reduce-overhead --models mocov2 resim_c4 --repeats 2 ;;
    heads)
      run 120 python3 $bench --device cuda --batch 128 --bf16 --channels-last --repeats 2 \
        --models mocov2 resim_fpn resim_fpn_released ;;
    simsiam)
      run 120 python3 $bench --device cuda --batch 128 --bf16 --channels-last --repeats 2 \
        --models simsiam resim_fpn_simsiam ;;
    pretrain_rr)  # bf16 and fp32, batch 128 and 64, models timed in turn (drift check)
      run 150 python3 $bench --device cuda --batch 128 64 --bf16 --channels-last --iters 20 \
        --repeats 5 --order round-robin
      run 150 python3 $bench --device cuda --batch 128 64 --iters 10 --repeats 3 \
        --order round-robin ;;
    pretrain64fp32)
      run 120 python3 $bench --device cuda --batch 64 --repeats 2 ;;
    compile)
      run 240 python3 $bench --device cuda --batch 128 --bf16 --channels-last --compile \
        --models mocov2 resim_fpn --repeats 2 ;;
    views)
      run 150 python3 benchmarks/bench_gpu_views.py --device cuda --workers 16 --batch 128 \
        --paths gpu --iters 15 --warmup 4 --train --depth 50 ;;
    train_demo)  # the real trainer on CUDA: demo config, GPU views, bf16, checkpoints, evaluation
      run 200 env PYTHONPATH="$CARRY/skimage_data:$PYTHONPATH" python3 tools/train_net.py \
        --config-file configs/pretrain/demo_resim_c4_cpu.yaml MODEL.DEVICE cuda \
        RESIM.VIEWS.BACKEND gpu DATALOADER.NUM_WORKERS 8 RESIM.SPEED.AMP_DTYPE bfloat16 \
        RESIM.SPEED.CHANNELS_LAST True OUTPUT_DIR /tmp/demo_cuda
      ls /tmp/demo_cuda ;;
    bn_groups)  # batch norm per 32 images (RESIM.BN_GROUP_IMAGES) against plain batch norm, eager
      run 90 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_group_batch_norm.py
      run 240 python3 $bench --device cuda --batch 128 --bf16 --channels-last --repeats 2 \
        --models mocov2 resim_c4 resim_fpn --bn-group-images 0 32
      run 240 python3 $bench --device cuda --batch 128 --bf16 --repeats 2 \
        --models resim_c4 resim_fpn --bn-group-images 0 32 ;;
    bn_groups_graphs)  # the same with torch.compile + CUDA graphs
      run 540 python3 $bench --device cuda --batch 128 --bf16 --channels-last --compile \
        --compile-mode reduce-overhead --repeats 2 --models resim_c4 resim_fpn \
        --bn-group-images 0 32 ;;
    *) echo "unknown step $step" ;;
  esac
done
echo "### done $(date +%T)"
