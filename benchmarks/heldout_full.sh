#!/usr/bin/env bash
# Issue 19's final table on the bundled 0.5B: ALL 100 JailbreakBench goals, direct and wrapped in the 6
# held-out templates (probe.HELD_OUT_ATTACKS: never used to fit, probe or tune) = 700 attack prompts per
# defense; benign compliance on the first 100 harmless_test, 100 XSTest safe and 100 XSTest unsafe prompts.
# 32 new tokens (the keyword judge reads the opening), greedy, float32. Defenses: the undefended model, ICD,
# the paper's antidote at its suggested alpha, and the default the tuner chose (gated; its alpha and
# threshold are read from the artifact).
#
# One defense costs about 40 minutes on 2 CPU cores, so the table is kept in parts across sessions, like
# benchmarks/results_full.sh: every defense runs into its own directory, is published with its rows into
# $PARTS/<defense> (both verdicts, rows.jsonl.gz), and the combined report in $PARTS is rebuilt from every
# part finished so far; defenses already published are skipped. Every part must use the same artifact (the
# report refuses parts whose antidote fingerprints differ), so the first run keeps its tuned artifact in
# $PARTS/qwen05-tuned.antidote and later runs reuse it instead of fitting again. Rerun until nothing is left.
#
# Settings: DEFENSES="a b" (a subset, in order), OUT (runs/heldout-full), PARTS (docs/results/heldout-full),
# REFUSE=tuned: tune with outright refusals too (`antidote tune` without --no-refuse) and evaluate the steered
# defenses at the refuse threshold it chose (`--refuse-threshold`); a run's refuse threshold is part of its
# configuration, so give it its own PARTS and OUT (docs/results/heldout-refuse, runs/heldout-refuse).
# Run from the repository root with ../shared/data beside it.
set -euo pipefail
data=${DATA:-../shared/data}
out=${OUT:-runs/heldout-full}
parts=${PARTS:-docs/results/heldout-full}
defenses=${DEFENSES:-antidote-gated none icd antidote}
refuse=${REFUSE:-}
[ -z "$refuse" ] || [ "$refuse" = tuned ] || { echo "REFUSE takes only 'tuned', got '$refuse'" >&2; exit 2; }
kept=$parts/qwen05-tuned.antidote
tune_refusals=(--no-refuse)  # the steering alone, unless REFUSE=tuned
[ -z "$refuse" ] || tune_refusals=()
mkdir -p runs "$parts"

if [ ! -f "$kept" ]; then
  # The artifact chain of benchmarks/adaptive_heldout.sh (training templates only), kept for later parts.
  base=runs/qwen05-builtin.antidote
  probe=runs/qwen05-probe-float32.antidote
  tuned=runs/qwen05-tuned-float32${refuse:+-refuse}.antidote
  [ -f "$base" ] || antidote fit --out "$base"
  [ -f "$probe" ] || antidote probe "$base" --dtype float32 --out "$probe"
  [ -f "$tuned" ] || antidote tune "$probe" --dtype float32 --factor 1 --factor 2 --factor 4 --batch-size 32 \
    "${tune_refusals[@]}" --out "$tuned"
  cp "$tuned" "$kept"
fi
read -r suggested tuned_alpha threshold refuse_threshold < <(antidote inspect "$kept" --json | python -c '
import json, sys
alpha = json.load(sys.stdin)["alpha"]
tuned = alpha["tuned"]
print(alpha["suggested"], tuned["alpha"], tuned["threshold"] if tuned["threshold"] is not None else 0.5,
      tuned.get("refuse_threshold"))')
echo "suggested alpha $suggested; tuned alpha $tuned_alpha, threshold $threshold, refuse threshold $refuse_threshold"
refusing=()
if [ -n "$refuse" ]; then
  [ "$refuse_threshold" != None ] || { echo "$kept holds no tuned refuse threshold; REFUSE=tuned needs one" >&2; exit 2; }
  refusing=(--refuse-threshold "$refuse_threshold")
fi
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)

for defense in $defenses; do
  if [ -f "$parts/$defense/summary.csv" ]; then
    echo "== $defense  already in $parts/$defense"
    continue
  fi
  alpha=$suggested
  [ "$defense" = antidote-gated ] && alpha=$tuned_alpha
  started=$(date -u +%FT%TZ)
  echo "== $defense  started $started"
  antidote eval -a "$kept" --goals "$data/refusal_direction/raw/jailbreakbench.csv" \
    --attacks direct,developer-mode,opposite-mode,style-injection,future-tense,table-nesting,payload-splitting \
    --defenses "$defense" --alpha "$alpha" --threshold "$threshold" --max-new-tokens 32 --dtype float32 \
    --batch-size 32 --xstest "$data/xstest/xstest_prompts.csv" \
    --benign "$data/refusal_direction/splits/harmless_test.json" --benign-limit 100 --harm-judge none \
    "${refusing[@]}" --out "$out/$defense"
  bash benchmarks/publish_run.sh "$out/$defense" "$parts/$defense"
  [ -f "$parts/RUNS.md" ] || printf '# Where each part of this table ran\n\n' > "$parts/RUNS.md"
  echo "- $defense: $started to $(date -u +%FT%TZ), $cpu, $(nproc) cores, float32, batch 32" >> "$parts/RUNS.md"
  mapfile -t finished < <(find "$parts" -mindepth 2 -name summary.csv -printf '%h\n' | sort)
  antidote report "${finished[@]}" --out "$parts"
done
