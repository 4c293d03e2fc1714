#!/usr/bin/env bash
# A larger forgetting-lab grid for one GPU (H200-class): SmolLM2-135M, every method, a 4-point constant-lr front,
# 2 seeds, longer runs and bigger evaluation sets than the CPU grid. Prepared data must already be in data_cache/
# (run `python -m train prepare all` where there is network, then carry data_cache/{austen,brown,quiz,spanish,pydocs}).
# Resumable: finished runs are skipped when started again (useful under a per-command time limit).
#   scripts/lab_gpu_grid.sh [facts|spanish|science]...     (default: facts; OUT=runs/lab_gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
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
