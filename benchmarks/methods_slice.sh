#!/usr/bin/env bash
# Issue 19's iteration slice, on HELD-OUT goals and attack templates: fit methods (pca = the paper,
# null_space, jailbreak_diff) x positions policy (all, prompt; jailbreak_diff all only) at 1x and 2x the
# suggested alpha; the paper's antidote gated and with the output monitor at the tuned operating point; the
# undefended model and ICD. Every 10th JailbreakBench goal (10) direct and wrapped in the 6 held-out
# templates (probe.HELD_OUT_ATTACKS; the fits read only the training attacks) = 70 attack prompts; the
# first 15 harmless_test, 15 XSTest safe and 15 XSTest unsafe prompts. 32 new tokens (the keyword judge
# reads the opening), greedy, float32. One output directory per artifact (eval keeps one antidote per
# directory), then both verdicts and the rows gzipped into docs/results/methods-slice/<method>.
# About 50 minutes on 2 CPU cores; resumable. Sizes: STRIDE, BENIGN_LIMIT, TOKENS.
# Run from the repository root with ../shared/data beside it.
set -euo pipefail
data=${DATA:-../shared/data}
runs=${OUT:-runs/methods-slice}
published=${PUBLISHED:-docs/results/methods-slice}
mkdir -p runs
# pca is the paper's antidote with the harm probe and tune of benchmarks/adaptive_heldout.sh (run it first), so
# the gated and monitor modes run beside it at the tuned alpha and threshold.
tuned=${TUNED:-runs/qwen05-tuned-float32.antidote}
[ -f "$tuned" ] || { echo "run benchmarks/adaptive_heldout.sh first (it writes $tuned)"; exit 2; }
for method in null_space jailbreak_diff; do
  artifact=runs/qwen05-$method.antidote
  [ -f "$artifact" ] || antidote fit --method "$method" --k "${K:-0.05}" --out "$artifact"
done
common=(--goals "$data/refusal_direction/raw/jailbreakbench.csv" --stride "${STRIDE:-10}"
  --attacks direct,developer-mode,opposite-mode,style-injection,future-tense,table-nesting,payload-splitting
  --max-new-tokens "${TOKENS:-32}" --batch-size 32 --xstest "$data/xstest/xstest_prompts.csv"
  --benign "$data/refusal_direction/splits/harmless_test.json" --benign-limit "${BENIGN_LIMIT:-15}"
  --harm-judge none)
read -r tuned_alpha threshold < <(antidote inspect "$tuned" --json | python -c '
import json, sys
tuned = json.load(sys.stdin)["alpha"]["tuned"]
print(tuned["alpha"], tuned["threshold"] if tuned["threshold"] is not None else 0.5)')
alpha_of() { antidote inspect "$1" --json | python -c 'import json,sys; print(json.load(sys.stdin)["alpha"]["suggested"])'; }
for method in pca null_space jailbreak_diff; do
  artifact=runs/qwen05-$method.antidote
  [ "$method" = pca ] && artifact=$tuned
  alpha=$(alpha_of "$artifact")
  defenses=antidote,antidote@prompt
  [ "$method" = pca ] && defenses=none,icd,$defenses
  [ "$method" = jailbreak_diff ] && defenses=antidote  # the policy comparison runs on the other two
  antidote eval "${common[@]}" -a "$artifact" --defenses "$defenses" --alpha "$alpha" \
    --alpha "$(python -c "print(round(2 * $alpha, 4))")" --threshold "$threshold" --out "$runs/$method"
  bash benchmarks/publish_run.sh "$runs/$method" "$published/$method"
done
# The adaptive modes at the tuned operating point, in their own directory (they depend on the probe, the
# fixed settings above do not).
antidote eval "${common[@]}" -a "$tuned" --defenses antidote-gated,antidote-monitor --alpha "$tuned_alpha" \
  --threshold "$threshold" --out "$runs/pca-gated"
bash benchmarks/publish_run.sh "$runs/pca-gated" "$published/pca-gated"
