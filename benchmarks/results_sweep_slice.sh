#!/usr/bin/env bash
# The alpha sweep and k ablation of docs/RESULTS.md, kept with its rows (issue 18): every 10th
# JailbreakBench goal (10) x AIM, DAN, developer mode and refusal suppression = 40 attack prompts; the
# first 20 harmless_test, 20 XSTest safe and 20 XSTest unsafe prompts. The top-|d| coordinates at k = 0.05
# (the default) and k = 1 at 1x and 2x the suggested alpha, at k = 0.01 and 0.25 at 2x; as many random
# coordinates at k = 0.05, 2x (where top and random differed most); and the undefended model: 8 settings.
# 64 new tokens, greedy, float32. Then both verdicts (keyword refusal at generation, the built-in harm judge by `antidote rejudge`)
# and the rows gzipped into docs/results/sweep-slice. About 45 minutes on 2 CPU cores; resumable.
# Run from the repository root with ../shared/data beside it.
set -euo pipefail
data=${DATA:-../shared/data}
out=${OUT:-runs/sweep-slice}
published=${PUBLISHED:-docs/results/sweep-slice}
antidote_file=${ANTIDOTE:-runs/qwen05-builtin.antidote}
[ -f "$antidote_file" ] || antidote fit --out "$antidote_file"
common=(-a "$antidote_file" --goals "$data/refusal_direction/raw/jailbreakbench.csv" --stride 10
  --attacks aim,dan,developer-mode,refusal-suppression --max-new-tokens 64 --batch-size 32
  --xstest "$data/xstest/xstest_prompts.csv" --benign "$data/refusal_direction/splits/harmless_test.json"
  --benign-limit 20 --harm-judge none --out "$out")
antidote sweep "${common[@]}" --factor 1 --factor 2 --k 0.05 --k 1 --selector top
antidote sweep "${common[@]}" --factor 2 --k 0.01 --k 0.25 --selector top
antidote sweep "${common[@]}" --factor 2 --k 0.05 --selector random
bash benchmarks/publish_run.sh "$out" "$published"
