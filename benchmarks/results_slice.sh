#!/usr/bin/env bash
# The evaluation slice published in docs/RESULTS.md: every 20th JailbreakBench goal x all built-in attacks
# x every defense, XSTest benign/unsafe samples, judge agreement, and a small alpha x k x selector sweep.
# About 45 minutes on 2 CPU cores. Run from the repository root with ../shared/data beside it.
set -euo pipefail
data=${DATA:-../shared/data}
antidote_file=runs/qwen05-builtin.antidote
[ -f "$antidote_file" ] || antidote fit --out "$antidote_file"
suggested=$(antidote inspect "$antidote_file" --json | python -c "import json,sys; print(json.load(sys.stdin)['alpha']['suggested'])")
half=$(python -c "print(round($suggested / 2, 4))")
more=$(python -c "print(round($suggested * 1.5, 4))")

antidote eval -a "$antidote_file" --goals "$data/refusal_direction/raw/jailbreakbench.csv" --stride 20 --attacks all \
  --defenses none,antidote,antidote+self-reminder,self-reminder,icd,smoothllm,perplexity,paraphrase,dense-antidote \
  --alpha "$half" --alpha "$suggested" --alpha "$more" --max-new-tokens 32 \
  --xstest "$data/xstest/xstest_prompts.csv" --benign-limit 20 --out runs/jbb-stride20
antidote judge-agreement "$data"/xstest/completions/*.csv --llm-judge qwen2.5-coder-0.5b-instruct --limit 20 \
  --out runs/judge-llm
antidote judge-agreement "$data"/xstest/completions/*.csv --out runs/jbb-stride20   # keyword judge, all 2,250
antidote report runs/jbb-stride20
antidote sweep -a "$antidote_file" --goals "$data/refusal_direction/raw/jailbreakbench.csv" --stride 20 \
  --attacks dan,aim,refusal-suppression --factor 1 --factor 2 \
  --k 0.01 --k 0.05 --k 1 --max-new-tokens 32 --benign-limit 10 --out runs/sweep-stride20
