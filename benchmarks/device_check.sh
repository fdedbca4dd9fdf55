#!/usr/bin/env bash
# One-shot GPU check for a machine with no package index: installs the carried pure-Python deps
# and detectron2 v0.6's Python tree into /tmp/site, then runs the CUDA tests and the benchmarks.
# Prepare the carry folder here first (see README "GPU checks"); output goes to $OUT (or ./out).
set -uo pipefail
OUT="${OUT:-out}"; mkdir -p "$OUT"
CARRY="${CARRY:-.carry}"
mkdir -p /tmp/site && cp -r "$CARRY"/site/* /tmp/site/
python3 -m pip install -q --no-index --no-deps --target /tmp/site "$CARRY"/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 tools/install_detectron2.py --sdist "$CARRY"/pb1-detectron2-0.6.tar.gz --site-dir /tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
run() { echo; echo "### $*"; timeout "${STEP_TIMEOUT:-300}" "$@" 2>&1 | grep -v -i warn; }
for step in ${STEPS:-prroi pretrain}; do
  case "$step" in
    prroi)
      run python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_prroi_pool.py
      run python3 benchmarks/bench_prroi_pool.py --device cuda
      run python3 benchmarks/bench_prroi_pool.py --device cuda --check --dtype all ;;
    pretrain)
      run python3 benchmarks/bench_pretrain_step.py --device cuda --batch 128 --iters 10 --repeats 2
      run python3 benchmarks/bench_pretrain_step.py --device cuda --batch 128 --iters 10 --repeats 2 --bf16 --channels-last ;;
    compile)
      run python3 benchmarks/bench_pretrain_step.py --device cuda --batch 128 --bf16 --channels-last \
        --compile --models mocov2 resim_fpn ;;
    *) [ -x "benchmarks/device_$step.sh" ] && run bash "benchmarks/device_$step.sh" ;;
  esac
done
