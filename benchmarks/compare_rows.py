"""Where a defense changes the keyword judge's verdict, compared row by row with the undefended run.

    python benchmarks/compare_rows.py runs/jbb-full paraphrase [--examples 2]

Reads rows.jsonl and utility.jsonl of one `antidote eval` output directory and prints, per attack and per
benign set, how many refusals the defense gained and lost against `none` on the same prompt, and, for
attack rows, how many of its answers are byte-for-byte the undefended ones. docs/RESULTS.md quotes these
counts.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from jailbreak_antidote.eval.runner import read_rows


def load(path: Path) -> list[dict]:
    return read_rows(path)[0] if path.exists() else []


def compare(rows: list[dict], defense: str, key: str, examples: int) -> None:
    baseline = {(r[key], r["prompt"]): r for r in rows if r["defense"] == "none"}
    gained, lost, same, total = Counter(), Counter(), Counter(), Counter()
    shown: Counter = Counter()
    for row in rows:
        if row["defense"] != defense or (row[key], row["prompt"]) not in baseline:
            continue
        base = baseline[(row[key], row["prompt"])]
        group = row[key]
        total[group] += 1
        same[group] += row["response"] == base["response"]
        refused, refused_before = row["judges"]["keyword_refusal"], base["judges"]["keyword_refusal"]
        if refused == refused_before:
            continue
        (gained if refused else lost)[group] += 1
        if shown[group] < examples:
            shown[group] += 1
            rewrite = row.get("details", {}).get("paraphrase")
            print(f"  [{group}] {'gained' if refused else 'lost'}: {row['prompt'][:100]!r}")
            if rewrite:
                print(f"      rewrite: {rewrite[:160]!r}")
            print(f"      answer:  {row['response'][:160]!r}")
    print(f"{key:<22} {'rows':>5} {'refusals gained':>16} {'lost':>5} {'identical answers':>18}")
    for group in sorted(total):
        print(f"{group:<22} {total[group]:>5} {gained[group]:>16} {lost[group]:>5} {same[group]:>18}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="an `antidote eval` output directory")
    parser.add_argument("defense", help="the defense to compare with `none`, e.g. paraphrase")
    parser.add_argument("--examples", type=int, default=0, help="print this many changed rows per group")
    args = parser.parse_args()
    attack_rows = load(args.run_dir / "rows.jsonl")
    benign_rows = load(args.run_dir / "utility.jsonl")
    if not attack_rows and not benign_rows:
        parser.error(f"no rows.jsonl or utility.jsonl in {args.run_dir}: pass an `antidote eval --out` directory")
    if attack_rows:
        compare(attack_rows, args.defense, "attack", args.examples)
    if benign_rows:
        compare(benign_rows, args.defense, "set", args.examples)


if __name__ == "__main__":
    main()
