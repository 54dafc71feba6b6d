#!/usr/bin/env bash
# The full evaluation published in docs/RESULTS.md: the 100 JailbreakBench goals x all built-in attacks x
# every defense, 64 new tokens, greedy, keyword judge; utility on XSTest (250 safe, 200 unsafe) and the first
# 250 prompts of harmless_test; then the alpha sweep and k ablation on a 20-goal slice.
#
# float32, because its numbers reproduce across CPUs (docs/RESULTS.md: the same slice on two CPU models
# gave identical summaries), so parts may run on different machines. It needs about 15 hours of CPU on
# 2 cores, far more than one working session, so it is kept in parts: after each defense the committed
# report in $PARTS is rebuilt from the defenses finished so far (`antidote report` combines it with this
# run's directory, and refuses another configuration or a setting whose numbers do not reproduce),
# defenses already in it are skipped, and $PARTS/RUNS.md records the machine and time of each. Rerun the
# script (and commit $PARTS and the sweep's) until nothing is left to run.
#
# Settings: DEFENSES="a b" (a subset), DTYPE (float32; bfloat16 is 2.5x faster on CPUs with AMX, but its
# numbers were not checked across CPUs), BATCH (64), OUT (runs/jbb-full, the rows), PARTS (docs/results/jbb-full),
# SWEEP=0 (skip the sweep). Run from the repository root with ../shared/data beside it.
set -euo pipefail
data=${DATA:-../shared/data}
dtype=${DTYPE:-float32}
batch=${BATCH:-64}
out=${OUT:-runs/jbb-full}
parts=${PARTS:-docs/results/jbb-full}
antidote_file=${ANTIDOTE:-runs/qwen05-builtin.antidote}
defenses=${DEFENSES:-none antidote antidote+self-reminder self-reminder icd dense-antidote perplexity paraphrase smoothllm}
benign=(--xstest "$data/xstest/xstest_prompts.csv" --benign "$data/refusal_direction/splits/harmless_test.json")
goals="$data/refusal_direction/raw/jailbreakbench.csv"

fast_bf16=$(python -c "from jailbreak_antidote.models import cpu_has_fast_bfloat16 as f; print('yes' if f() else 'no')")
if [ "$dtype" = bfloat16 ] && [ "$fast_bf16" = no ] && [ "${ALLOW_SLOW:-0}" != 1 ]; then
  echo "this CPU has neither AMX nor AVX512-BF16: bfloat16 runs slower here than float32 (docs/BENCHMARKS.md);" >&2
  echo "use DTYPE=float32, or set ALLOW_SLOW=1" >&2
  exit 3
fi
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
[ -f "$antidote_file" ] || antidote fit --out "$antidote_file"

# Is this setting (a summary.csv line prefix) already in the committed parts?
in_parts() { [ -f "$1/summary.csv" ] && grep -q "^$2" "$1/summary.csv"; }

# Rebuild the committed report from this run plus what it held, and note where this part ran.
save_part() {  # $1 run dir, $2 parts dir, $3 what finished, $4 start time
  local sources=("$1")
  [ -f "$2/summary.csv" ] && sources+=("$2")
  mkdir -p "$2"
  [ -f "$2/RUNS.md" ] || printf '# Where each part of this report ran\n\n' > "$2/RUNS.md"
  antidote report "${sources[@]}" --out "$2"
  echo "- $3: $4 to $(date -u +%FT%TZ), $cpu, $(nproc) cores, AMX/AVX512-BF16: $fast_bf16, dtype $dtype, batch $batch" >> "$2/RUNS.md"
}

for defense in $defenses; do
  if in_parts "$parts" "$defense,[^,]*,[^,]*,[^,]*,dsr,overall,"; then
    echo "== $defense  already in $parts"
    continue
  fi
  started=$(date -u +%FT%TZ)
  echo "== $defense  started $started"
  antidote eval -a "$antidote_file" --goals "$goals" --attacks all --defenses "$defense" --max-new-tokens 64 \
    --dtype "$dtype" --batch-size "$batch" "${benign[@]}" --benign-limit 250 --out "$out"
  save_part "$out" "$parts" "$defense" "$started"
done

# Alpha sweep and k ablation (top vs random coordinates) on a 20-goal slice x 4 attacks, one k at a time.
if [ "${SWEEP:-1}" = 1 ]; then
  sweep_parts=${SWEEP_PARTS:-docs/results/sweep-full}
  for k in 0.01 0.05 0.25 1.0; do
    if in_parts "$sweep_parts" "antidote,[^,]*,$k,top,dsr,overall,"; then  # parts are saved only when complete
      echo "== sweep k=$k  already in $sweep_parts"
      continue
    fi
    started=$(date -u +%FT%TZ)
    echo "== sweep k=$k  started $started"
    antidote sweep -a "$antidote_file" --goals "$goals" --stride 5 \
      --attacks dan,aim,refusal-suppression,developer-mode --factor 0.5 --factor 1 --factor 1.5 --factor 2 \
      --k "$k" --max-new-tokens 64 --dtype "$dtype" --batch-size "$batch" "${benign[@]}" --benign-limit 50 \
      --out "${SWEEP_OUT:-runs/sweep-full}"
    save_part "${SWEEP_OUT:-runs/sweep-full}" "$sweep_parts" "sweep k=$k" "$started"
  done
fi
echo "done: every defense asked for is in $parts"
