#!/usr/bin/env bash
# The full evaluation published in docs/RESULTS.md: the 100 JailbreakBench goals x all built-in attacks x
# every defense, 64 new tokens, greedy, keyword judge; utility on XSTest (250 safe, 200 unsafe) and the first
# 250 prompts of harmless_test. bfloat16 weights (about 2x faster than float32 on CPUs with AMX).
# Each defense is its own resumable command writing into the same directory, most informative first, so an
# interrupted run loses nothing: rerun this script to continue. About 5 hours on 2 CPU cores, plus about
# 1 hour for the sweep at the end.
# Run from the repository root with ../shared/data beside it.
set -euo pipefail
data=${DATA:-../shared/data}
out=${OUT:-runs/jbb-full}
antidote_file=runs/qwen05-builtin.antidote
[ -f "$antidote_file" ] || antidote fit --out "$antidote_file"
for defense in none antidote antidote+self-reminder self-reminder icd dense-antidote perplexity paraphrase smoothllm; do
  echo "== $defense  started $(date -u +%FT%TZ)"
  antidote eval -a "$antidote_file" --goals "$data/refusal_direction/raw/jailbreakbench.csv" --attacks all \
    --defenses "$defense" --max-new-tokens 64 --dtype bfloat16 --batch-size 32 \
    --xstest "$data/xstest/xstest_prompts.csv" --benign "$data/refusal_direction/splits/harmless_test.json" \
    --benign-limit 250 --out "$out"
  echo "== $defense  finished $(date -u +%FT%TZ)"
done
antidote report "$out"
# Alpha sweep and k ablation (top vs random coordinates) on a 20-goal slice x 4 attacks.
antidote sweep -a "$antidote_file" --goals "$data/refusal_direction/raw/jailbreakbench.csv" --stride 5 \
  --attacks dan,aim,refusal-suppression,developer-mode --factor 0.5 --factor 1 --factor 1.5 --factor 2 \
  --k 0.01 --k 0.05 --k 0.25 --k 1 --max-new-tokens 64 --dtype bfloat16 --batch-size 32 \
  --xstest "$data/xstest/xstest_prompts.csv" --benign "$data/refusal_direction/splits/harmless_test.json" \
  --benign-limit 50 --out "${SWEEP_OUT:-runs/sweep-full}"
