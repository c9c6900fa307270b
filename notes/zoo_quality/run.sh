#!/usr/bin/env bash
# Measure the zoo quality table of issue 3 on the demo zoo, through the user's own commands.
# Run from the repository root after `.venv/bin/pcbmerge zoo build .pcbmerge/demo/zoo-demo --size demo --seed 0`
# (the folder `pcbmerge demo` builds and reuses). Each merge goes through `pcbmerge run` (the merge-flow
# pipeline: fetch, validate, merge, evaluate base + experts + merge on the test split, MLflow tracking and
# registry), then `pcbmerge eval --json` reads every model's scores with their standard errors (from the
# evaluation cache the run filled). Results: notes/zoo_quality/results/; logs: .pcbmerge/zoo-quality/.
# The runs get a home of their own (MLflow store, caches, Prefect results), so every merge and evaluation is
# computed here and nothing mixes with the demo's registry.
set -euo pipefail
pcbmerge=${PCBMERGE:-.venv/bin/pcbmerge}
here=notes/zoo_quality
zoo=.pcbmerge/demo/zoo-demo
tasks=zoo_reverse,zoo_sort,zoo_translate,zoo_polarity
logs=.pcbmerge/zoo-quality
export PCBMERGE_HOME=$logs/home PREFECT_HOME=$logs/home/prefect
mkdir -p "$logs" "$here/results"
: > "$here/results/wall_seconds.tsv"
for config in linear task-arithmetic-lambda1 task-arithmetic-lambda0_4 ties pcb-paper pcb-release pcb-release-q1e-4; do
  start=$(date +%s.%N)
  "$pcbmerge" run "$here/$config.yml" --out "$logs/merged/$config" --overwrite > "$logs/$config.out" 2> "$logs/$config.err"
  printf 'run %s\t%.1f\n' "$config" "$(echo "$(date +%s.%N) - $start" | bc)" >> "$here/results/wall_seconds.tsv"
done
for model in base experts/zoo_reverse experts/zoo_sort experts/zoo_translate experts/zoo_polarity; do
  start=$(date +%s.%N)
  "$pcbmerge" eval "$zoo/$model" --tasks "$tasks" --include-path "$zoo/tasks" --split test --json > "$here/results/$(basename "$model").json"
  printf 'eval %s\t%.1f\n' "$model" "$(echo "$(date +%s.%N) - $start" | bc)" >> "$here/results/wall_seconds.tsv"
done
for config in linear task-arithmetic-lambda1 task-arithmetic-lambda0_4 ties pcb-paper pcb-release pcb-release-q1e-4; do
  "$pcbmerge" eval "$logs/merged/$config" --tasks "$tasks" --include-path "$zoo/tasks" --split test --json > "$here/results/$config.json"
done
