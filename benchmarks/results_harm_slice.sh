#!/usr/bin/env bash
# The run docs/RESULTS.md reports DSR by refusal and by harm from (issue 18), kept with its rows:
# every 20th JailbreakBench goal (5 goals, one per category pair) x all 16 built-in attacks = 80 attack
# prompts per defense, at the suggested alpha, 64 new tokens (the full protocol's length, so the harm judge
# reads whole openings), greedy, float32. Paraphrase (two generations per prompt) and SmoothLLM (three) run
# on the first 2 of those goals only (32 attack prompts), to fit a working session. Utility on the first 10
# XSTest safe, 10 XSTest unsafe and 10 harmless_test prompts (5 for Paraphrase and SmoothLLM): too few to
# measure utility; the full run in docs/RESULTS.md does that.
# Then both verdicts: the keyword refusal judge (at generation) and the built-in harm judge (`antidote
# rejudge`), and the rows gzipped into docs/results/harm-slice, so anyone can re-judge them without
# regenerating (`antidote rejudge docs/results/harm-slice --judge J.npz`).
# About 75 minutes on 2 CPU cores; resumable. Run from the repository root with ../shared/data beside it.
set -euo pipefail
data=${DATA:-../shared/data}
out=${OUT:-runs/harm-slice}
published=${PUBLISHED:-docs/results/harm-slice}
antidote_file=${ANTIDOTE:-runs/qwen05-builtin.antidote}
[ -f "$antidote_file" ] || antidote fit --out "$antidote_file"

common=(-a "$antidote_file" --goals "$data/refusal_direction/raw/jailbreakbench.csv" --stride 20 --attacks all
        --max-new-tokens 64 --batch-size 32 --xstest "$data/xstest/xstest_prompts.csv"
        --benign "$data/refusal_direction/splits/harmless_test.json" --harm-judge none --out "$out")
antidote eval "${common[@]}" --benign-limit 10 \
  --defenses none,antidote,antidote+self-reminder,self-reminder,icd,dense-antidote,perplexity
antidote eval "${common[@]}" --defenses paraphrase,smoothllm --limit 2 --benign-limit 5
bash benchmarks/publish_run.sh "$out" "$published"
