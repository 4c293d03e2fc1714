#!/usr/bin/env bash
# The CPU grid behind docs/results.md: SmolLM2-135M on the three built-in targets, 2 seeds, small sizes that fit a
# 2-core CPU (about 3 min per run there, shared). Every run is resumable: start it again and finished runs are skipped.
#   scripts/lab_cpu_grid.sh [facts|spanish|science]...     (default: all three; OUT=runs/lab_cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/lab_cpu}
TASKS=("$@")
[ ${#TASKS[@]} -eq 0 ] && TASKS=(facts spanish science)

COMMON=(--model gguf:smollm2 --seeds 0,1 --max-learning-rate 1e-4 --steps 16 --batch-size 4 --seq-len 48
        --eval-seq-len 48 --eval-retain-sequences 8 --eval-quiz-items 16)

$PY -m train prepare all
for task in "${TASKS[@]}"; do
  case "$task" in
    facts)   extra=(--facts-entities 6) ;;
    spanish|science) extra=(--eval-task-examples 16) ;;
    *) echo "unknown task $task (facts|spanish|science)" >&2; exit 2 ;;
  esac
  start=$(date +%s)
  $PY -m train compare "${COMMON[@]}" "${extra[@]}" --task "$task" --method sft --method finch \
      --method sweep:lrs=5e-5/3e-5 --method warmup_matched --out "$OUT/$task"
  echo "[lab_cpu_grid] $task: $(( $(date +%s) - start ))s wall" | tee -a "$OUT/wall_times.txt"
done
