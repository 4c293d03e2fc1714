#!/usr/bin/env bash
# The benchmark on a lent accelerator (one H200): bf16 compute, random-init SmolLM2-135M- and Qwen3-0.6B-sized models,
# MFU two ways (against a bf16 matmul peak measured in the same run, and against the chip's published dense peak,
# train/bench/chips.py), FINCH vs AdamW in the same jit step, and PyTorch eager if present.
#
#   OUT=/some/dir bash scripts/device_bench.sh        # from the repository root; writes JSON + logs to $OUT
#
# Needs jax (CUDA), flax, optax, orbax (for pyyaml) preinstalled; torch/transformers only for the PyTorch run.
# No network. Stays under ~7 minutes: each run has its own timeout and the later runs are skipped when the
# time budget is spent, so whatever finished is always in $OUT.
set -u
OUT=${OUT:?set OUT to the output directory}
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
BUDGET_S=${BUDGET_S:-420}
START=$(date +%s)
mkdir -p "$OUT"
# JAX must not grab 75% of the GPU up front: torch shares the device in the third run, and
# peak_bytes_in_use should show what the step needs.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONUNBUFFERED=1

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

run() {  # run NAME TIMEOUT ARGS...: one bench invocation, JSON to $OUT/NAME.json, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local remaining; remaining=$(left)
  if (( remaining < 40 )); then echo "skip $name: only ${remaining}s left" | tee -a "$OUT/summary.txt"; return; fi
  (( limit > remaining )) && limit=$remaining
  echo "== $name (timeout ${limit}s): $*" | tee -a "$OUT/summary.txt"
  timeout "$limit" "$PYTHON" -m train.bench --out "$OUT/$name.json" --max-minutes 10 "$@" >"$OUT/$name.log" 2>&1
  echo "   exit $? after $(( $(date +%s) - START ))s" | tee -a "$OUT/summary.txt"
  sed -n '/M params, batch /,$p' "$OUT/$name.log" >>"$OUT/summary.txt"  # the table, from its first line
}

{
  echo "date: $(date -u +%FT%TZ)"; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>&1
  "$PYTHON" -c "import jax, flax, optax; print('jax', jax.__version__, jax.devices()); print('flax', flax.__version__, 'optax', optax.__version__)" 2>&1
  "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" 2>&1 | tail -1
} >"$OUT/summary.txt"

# 1. The headline, one process: MFU at 64 x 512 = 32k tokens/step; FINCH vs AdamW in the same jit step and
#    transformers' LlamaForCausalLM + torch.optim.AdamW (bf16 autocast, eager), all interleaved A B C ...
#    The JSON is rewritten after every section, so a timeout still leaves the finished sections.
run gpu_main 170 --model preset:smollm2-135m --dtype bfloat16 --batch-size 64 --seq-len 512 \
  --sections step,finch,torch --torch-modes eager --warmup 2 --rounds 4 --steps 4
# 2. The accelerator target: a Qwen3-0.6B-size model, >= 45% of the bf16 spec peak (MFU column 2).
run gpu_qwen3_06b 150 --model preset:qwen3-0.6b --dtype bfloat16 --batch-size 16 --seq-len 1024 \
  --sections step --warmup 2 --rounds 3 --steps 3
# 3. If time is left: the attention implementations on the GPU (blockwise, the default, against cuDNN's).
run gpu_qwen3_06b_attention 120 --model preset:qwen3-0.6b --dtype bfloat16 --batch-size 16 --seq-len 1024 \
  --sections variants --variant attention_impl=dot_product --warmup 2 --rounds 3 --steps 2
echo "total $(( $(date +%s) - START ))s" >>"$OUT/summary.txt"
cat "$OUT/summary.txt"
