#!/usr/bin/env bash
# Issue 19, next step of the methods slice: the jailbreak_diff direction gated by the paper antidote's harm
# probe (`antidote probe --from`: the probe reads the unsteered model, so one probe serves every method).
# Same held-out prompts, tokens and judges as benchmarks/methods_slice.sh (every 10th JailbreakBench goal,
# direct + 6 held-out templates = 70 attack prompts; 15 harmless_test, 15 XSTest safe, 15 XSTest unsafe;
# 32 new tokens, greedy, float32), gated at the probe threshold `antidote tune` chose for the paper's
# antidote on the training templates (benchmarks/adaptive_heldout.sh writes that artifact; THRESHOLD
# overrides), at 1x, 2x and 4x jailbreak_diff's suggested alpha. Rows into
# docs/results/methods-slice/jailbreak_diff-gated.
# About 15 minutes on 2 CPU cores with the artifacts (10 more for the jailbreak_diff fit); resumable.
# Run from the repository root with ../shared/data beside it.
set -euo pipefail
data=${DATA:-../shared/data}
runs=${OUT:-runs/methods-slice}
published=${PUBLISHED:-docs/results/methods-slice}
mkdir -p runs
probe=runs/qwen05-probe-float32.antidote
tuned=${TUNED:-runs/qwen05-tuned-float32.antidote}
method=runs/qwen05-jailbreak_diff.antidote
gated=runs/qwen05-jailbreak_diff-gated.antidote
[ -f "$tuned" ] || { echo "run benchmarks/adaptive_heldout.sh first (it writes $probe and $tuned)"; exit 2; }
threshold=${THRESHOLD:-$(antidote inspect "$tuned" --json | python -c '
import json, sys
tuned = json.load(sys.stdin)["alpha"]["tuned"]
print(tuned["threshold"] if tuned["threshold"] is not None else 0.5)')}
[ -f "$method" ] || antidote fit --method jailbreak_diff --k "${K:-0.05}" --out "$method"
[ -f "$gated" ] || antidote probe "$method" --from "$probe" --out "$gated"
alpha=$(antidote inspect "$gated" --json | python -c 'import json,sys; print(json.load(sys.stdin)["alpha"]["suggested"])')
alphas=()
for factor in 1 2 4; do alphas+=(--alpha "$(python -c "print(round($factor * $alpha, 4))")"); done
antidote eval -a "$gated" --goals "$data/refusal_direction/raw/jailbreakbench.csv" --stride "${STRIDE:-10}" \
  --attacks direct,developer-mode,opposite-mode,style-injection,future-tense,table-nesting,payload-splitting \
  --max-new-tokens "${TOKENS:-32}" --batch-size 32 --xstest "$data/xstest/xstest_prompts.csv" \
  --benign "$data/refusal_direction/splits/harmless_test.json" --benign-limit "${BENIGN_LIMIT:-15}" \
  --harm-judge none --defenses antidote-gated --threshold "$threshold" "${alphas[@]}" \
  --out "$runs/jailbreak_diff-gated"
bash benchmarks/publish_run.sh "$runs/jailbreak_diff-gated" "$published/jailbreak_diff-gated"
