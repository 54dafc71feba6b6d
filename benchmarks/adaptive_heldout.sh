#!/usr/bin/env bash
# Evidence for the adaptive antidote (docs/RESULTS.md, "Adaptive antidote"): fixed vs gated vs scaled on
# goals and attack templates the probe and the tuner never saw: the JailbreakBench goals (every 2nd, 50),
# direct and wrapped in the 6 held-out templates (probe.HELD_OUT_ATTACKS); benign compliance on XSTest
# (first 100 safe, first 100 unsafe) and the first 100 harmless_test prompts. 32 new tokens, bfloat16.
# The artifact: the built-in antidote + `antidote probe` + `antidote tune` (training templates only).
# About an hour on 2 CPU cores. Run from the repository root with ../shared/data beside it.
set -euo pipefail
data=${DATA:-../shared/data}
out=${OUT:-runs/adaptive-heldout}
base=runs/qwen05-builtin.antidote
[ -f "$base" ] || antidote fit --out "$base"
[ -f runs/qwen05-probe.antidote ] || antidote probe "$base" --dtype bfloat16 --out runs/qwen05-probe.antidote
[ -f runs/qwen05-tuned.antidote ] || antidote tune runs/qwen05-probe.antidote --dtype bfloat16 --factor 1 \
  --factor 2 --factor 4 --batch-size 32 --out runs/qwen05-tuned.antidote
threshold=$(antidote inspect runs/qwen05-tuned.antidote --json | python -c 'import json,sys; print(json.load(sys.stdin)["alpha"]["tuned"]["threshold"])')
alpha=$(antidote inspect runs/qwen05-tuned.antidote --json | python -c 'import json,sys; print(json.load(sys.stdin)["alpha"]["suggested"])')
common=(-a runs/qwen05-tuned.antidote --goals "$data/refusal_direction/raw/jailbreakbench.csv" --stride 2
  --attacks direct,developer-mode,opposite-mode,style-injection,future-tense,table-nesting,payload-splitting
  --threshold "$threshold" --max-new-tokens 32 --dtype bfloat16 --batch-size 32
  --xstest "$data/xstest/xstest_prompts.csv" --benign "$data/refusal_direction/splits/harmless_test.json"
  --benign-limit 100 --out "$out")
# fixed and gated at 1x, 2x and 4x the suggested alpha; scaled at 4x only (CPU time)
antidote eval "${common[@]}" --defenses none,antidote,antidote-gated \
  --alpha "$alpha" --alpha "$(python -c "print(2 * $alpha)")" --alpha "$(python -c "print(4 * $alpha)")"
antidote eval "${common[@]}" --defenses antidote-scaled --alpha "$(python -c "print(4 * $alpha)")"
antidote report "$out"
