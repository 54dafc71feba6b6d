#!/usr/bin/env bash
# Do float32 results reproduce on another CPU? Reruns `none` and the antidote at its suggested alpha on the
# published slice (benchmarks/results_slice.sh: every 20th JailbreakBench goal x all attacks, 20 XSTest safe
# and 20 unsafe prompts, 32 new tokens, float32) and compares every number of the new summary with the
# published docs/results/jbb-stride20/summary.csv. About 6 minutes on 2 cores.
set -euo pipefail
data=${DATA:-../shared/data}
antidote_file=runs/qwen05-builtin.antidote
out=${OUT:-runs/slice-reproduce}
[ -f "$antidote_file" ] || antidote fit --out "$antidote_file"
suggested=$(antidote inspect "$antidote_file" --json | python -c "import json,sys; print(json.load(sys.stdin)['alpha']['suggested'])")
antidote eval -a "$antidote_file" --goals "$data/refusal_direction/raw/jailbreakbench.csv" --stride 20 --attacks all \
  --defenses none,antidote --alpha "$suggested" --max-new-tokens 32 \
  --xstest "$data/xstest/xstest_prompts.csv" --benign-limit 20 --out "$out"
python - "$out/summary.csv" docs/results/jbb-stride20/summary.csv <<'PY'
import csv, sys

def numbers(path):
    return {tuple(r[f] for f in ("defense", "alpha", "k", "selector", "metric", "scope")): (r["n"], r["value"])
            for r in csv.DictReader(open(path, encoding="utf-8"))}

new, published = numbers(sys.argv[1]), numbers(sys.argv[2])
common = [key for key in new if key in published]
different = [key for key in common if new[key] != published[key]]
print(f"{len(common)} of {len(new)} numbers are in the published summary; {len(different)} differ")
for key in different:
    print("  ", " ".join(key), "now", new[key], "published", published[key])
sys.exit(1 if different or not common else 0)
PY
