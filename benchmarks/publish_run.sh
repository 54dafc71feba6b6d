#!/usr/bin/env bash
# Publish an evaluation run with its rows (issue 18): add the built-in harm judge's verdicts to RUN's rows,
# gzip rows/utility/metrics into PUBLISHED with its config.json and judges.json, and rebuild the report there
# from the gzipped rows, as anyone re-judging them would (`antidote rejudge PUBLISHED --judge J.npz`).
#   bash benchmarks/publish_run.sh RUN PUBLISHED
set -euo pipefail
run=$1
published=$2
antidote rejudge "$run" --judge builtin --no-report
mkdir -p "$published"
rm -f "$published"/*.png
for name in rows utility metrics; do
  if [ -f "$run/$name.jsonl" ]; then
    gzip -9 -n -c "$run/$name.jsonl" > "$published/$name.jsonl.gz"
  fi
done
cp "$run/config.json" "$run/judges.json" "$published/"
antidote report "$published"
