#!/usr/bin/env bash
# Evidence for the adaptive antidote (docs/RESULTS.md, "Adaptive antidote"), kept with its rows: fixed vs
# gated vs scaled on goals and attack templates the probe and the tuner never saw: the JailbreakBench goals
# (every 5th: 20), direct and wrapped in the 6 held-out templates (probe.HELD_OUT_ATTACKS) = 140 attack
# prompts; benign compliance on the first 20 XSTest safe, 20 XSTest unsafe and 20 harmless_test prompts.
# 32 new tokens, float32 (bfloat16 is slow on CPUs without AVX512-BF16/AMX). Settings: undefended; fixed
# and gated at the suggested alpha and at the tuned alpha; scaled at the tuned alpha.
# The artifact: the built-in antidote + `antidote probe` + `antidote tune` (training templates only).
# Then both verdicts (keyword refusal at generation, the built-in harm judge by `antidote rejudge`) and the
# rows gzipped into docs/results/adaptive-heldout. About 2 hours on 2 CPU cores (probe 30, tune 30 to
# 40, eval 40 to 50 minutes); resumable.
# Sizes: STRIDE, BENIGN_LIMIT, DTYPE. Run from the repository root with ../shared/data beside it.
set -euo pipefail
data=${DATA:-../shared/data}
out=${OUT:-runs/adaptive-heldout}
published=${PUBLISHED:-docs/results/adaptive-heldout}
dtype=${DTYPE:-float32}
base=runs/qwen05-builtin.antidote
probe=runs/qwen05-probe-$dtype.antidote
tuned=runs/qwen05-tuned-$dtype.antidote
[ -f "$base" ] || antidote fit --out "$base"
[ -f "$probe" ] || antidote probe "$base" --dtype "$dtype" --out "$probe"
[ -f "$tuned" ] || antidote tune "$probe" --dtype "$dtype" --factor 1 --factor 2 --factor 4 --batch-size 32 \
  --out "$tuned"
read -r suggested tuned_alpha threshold < <(antidote inspect "$tuned" --json | python -c '
import json, sys
alpha = json.load(sys.stdin)["alpha"]
tuned = alpha["tuned"]
print(alpha["suggested"], tuned["alpha"], tuned["threshold"] if tuned["threshold"] is not None else 0.5)')
echo "suggested alpha $suggested; tuned alpha $tuned_alpha, threshold $threshold"
common=(-a "$tuned" --goals "$data/refusal_direction/raw/jailbreakbench.csv" --stride "${STRIDE:-5}"
  --attacks direct,developer-mode,opposite-mode,style-injection,future-tense,table-nesting,payload-splitting
  --threshold "$threshold" --max-new-tokens 32 --dtype "$dtype" --batch-size 32
  --xstest "$data/xstest/xstest_prompts.csv" --benign "$data/refusal_direction/splits/harmless_test.json"
  --benign-limit "${BENIGN_LIMIT:-20}" --harm-judge none --out "$out")
antidote eval "${common[@]}" --defenses none,antidote,antidote-gated --alpha "$suggested" --alpha "$tuned_alpha"
antidote eval "${common[@]}" --defenses antidote-scaled --alpha "$tuned_alpha"
bash benchmarks/publish_run.sh "$out" "$published"
