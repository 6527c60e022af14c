#!/usr/bin/env bash
# Issue 8's GPU figures in one call to the lent device (one H100/H200), every stage bounded in time.
#
#   bash bench/gpu_run.sh wheels     # here, before the call: the Python packages the device image lacks,
#                                    # as wheels for its python3 (3.12) in .whl/ (about 18 MB, no network there)
#   bash bench/gpu_run.sh            # on the device, with `carry: [".whl"]`; logs and a summary under $OUT
#
# The device image has torch, triton and transformers but not megatron-core, webdataset or the pinned
# transformers; the wheels install without dependencies into its python3 and the checkout runs from
# PYTHONPATH. Stages (loss ops, then 3B steps) run in order of value, each under `timeout`, and carry on
# after a failure; each prints its last lines, and everything goes to $OUT/<stage>.log. Record the
# figures in docs/benchmarks.md with the command of the stage.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
  megatron-core==0.16.1 transformers==5.24.0 huggingface-hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2
  truststore webdataset==1.0.2 braceexpand math-verify==0.9.0 latex2sympy2_extended==1.11.0
  antlr4-python3-runtime==4.13.2
)
if [[ "${1:-}" == wheels ]]; then
  rm -rf .whl && mkdir -p .whl
  exec pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "${WHEELS[@]}"
fi

OUT=${OUT:-/tmp/gpu_run}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.csv"
python3 -m pip install --quiet --no-deps --no-index .whl/*.whl > "$OUT/pip.log" 2>&1 || tail -5 "$OUT/pip.log"
python3 -c "import torch, megatron.core, transformers, megatron_papo.trainer as t; \
print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" \
  2>&1 | tail -3 | tee "$OUT/imports.log"
python3 -c "import torch; assert torch.cuda.is_available()" || { echo "no CUDA device: nothing run" >&2; exit 1; }

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc, $((SECONDS - start)) s: $*" | tee -a "$OUT/summary.txt"
  grep -v -i "warn" "$OUT/$name.log" | tail -n 8 | tee -a "$OUT/summary.txt"
}

stage loss_ops 120 python3 bench/loss_ops.py --device cuda
stage step_3b_2k_sdpa 200 python3 bench/step.py --size 3b --seq-length 2048 --micro-batches 8 --attention sdpa --iters 3
stage step_3b_2k_local 150 python3 bench/step.py --size 3b --seq-length 2048 --micro-batches 8 --attention local --iters 2
stage step_3b_4k 150 python3 bench/step.py --size 3b --seq-length 4096 --micro-batches 8 --iters 2
