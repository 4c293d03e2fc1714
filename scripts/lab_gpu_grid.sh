#!/usr/bin/env bash
# A larger forgetting-lab grid for one GPU (H200-class): SmolLM2-135M, every method, a 4-point constant-lr front,
# 2 seeds, longer runs and bigger evaluation sets than the CPU grid. Prepared data must already be in data_cache/
# (run `python -m train prepare all` where there is network, then carry data_cache/{austen,brown,quiz,spanish,pydocs}).
# Resumable: finished runs are skipped when started again (useful under a per-command time limit).
#   scripts/lab_gpu_grid.sh [facts|spanish|science]...     (default: facts; OUT=runs/lab_gpu)
#
# E2 at the paper's model sizes: the pre-registered grid of docs/results.md (scripts/lab_e2_grid.py: pilots, 8 arms,
# 3 seeds, the three domains) with another base model; records and reports under $OUT/<model>/ (report/ holds the
# tables and plots), never mixed with the committed SmolLM2 grid.
#   scripts/lab_gpu_grid.sh e2 [MODEL...]     (default: hub:Qwen/Qwen3-4B; DTYPE=float32; OUT=runs/e2-gpu)
# Weights come from the Hugging Face Hub (or a pre-filled HF_HUB_CACHE). Memory, estimated, not measured (no
# accelerator was lent to the work that wrote this): full fine-tuning in float32 keeps ~16 bytes per parameter
# (weights, gradients, Adam's two moments), 64 GB for a 4B model, up to 80 GB if a copy of the base is held for the
# retain KL: one H200 (141 GB), not one H100. An 8B model needs 128-160 GB in float32. DTYPE=bfloat16 halves that but stores the weights in bfloat16, whose 8-bit
# mantissa rounds away updates below ~0.4% of a weight: at the grid's rates (3e-5 .. 3e-4) that changes what the
# constant-lr arms and FINCH do, so read a bfloat16 grid as its own experiment, not as the paper's setting.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ "${1:-}" = e2 ]; then
  shift
  MODELS=("$@")
  [ ${#MODELS[@]} -eq 0 ] && MODELS=(hub:Qwen/Qwen3-4B)
  OUT=${OUT:-runs/e2-gpu}
  for model in "${MODELS[@]}"; do
    slug=$(printf '%s' "$model" | tr -c 'A-Za-z0-9._-' '_')
    start=$(date +%s)
    $PY scripts/lab_e2_grid.py --model "$model" --dtype "${DTYPE:-float32}" --out "$OUT/$slug"
    echo "[lab_gpu_grid] e2 $model: $(( $(date +%s) - start ))s wall" | tee -a "$OUT/wall_times.txt"
  done
  exit 0
fi
OUT=${OUT:-runs/lab_gpu}
TASKS=("$@")
[ ${#TASKS[@]} -eq 0 ] && TASKS=(facts)

COMMON=(--model gguf:smollm2 --seeds 0,1 --max-learning-rate 1e-4 --steps 60 --batch-size 16 --seq-len 128
        --eval-seq-len 128 --eval-batch-size 32 --eval-retain-sequences 64 --eval-quiz-items 256
        --method sft --method sft_cosine --method finch --method sweep:lrs=3e-4/3e-5/1e-5/3e-6
        --method warmup_matched --method l2sp --method stm)
for task in "${TASKS[@]}"; do
  case "$task" in
    facts)   extra=(--facts-entities 32) ;;
    spanish|science) extra=(--eval-task-examples 64) ;;
    *) echo "unknown task $task (facts|spanish|science)" >&2; exit 2 ;;
  esac
  start=$(date +%s)
  $PY -m train compare "${COMMON[@]}" "${extra[@]}" --task "$task" --out "$OUT/$task"
  echo "[lab_gpu_grid] $task: $(( $(date +%s) - start ))s wall" | tee -a "$OUT/wall_times.txt"
done
