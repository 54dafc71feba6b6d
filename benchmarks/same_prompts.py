"""DSR by refusal and by harm per defense, on only the attack prompts that every defense of a run answered.

    python benchmarks/same_prompts.py docs/results/harm-slice

A run may give some defenses fewer goals (docs/results/harm-slice: Paraphrase and SmoothLLM on 2 of the 5);
comparing them with the others' full rows would compare different prompts. docs/RESULTS.md quotes these.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from jailbreak_antidote.eval.report import wilson
from jailbreak_antidote.eval.runner import ROWS_FILE, read_rows, stored_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="an evaluation directory (rows.jsonl or rows.jsonl.gz)")
    args = parser.parse_args()
    path = stored_rows(args.run, ROWS_FILE)
    if path is None:
        raise SystemExit(f"{args.run} holds no {ROWS_FILE}")
    rows = read_rows(path)[0]
    by_defense: dict[str, dict[tuple[str, str], dict]] = defaultdict(dict)
    for row in rows:
        by_defense[row["defense"]][(row["goal"], row["attack"])] = row
    shared = set.intersection(*(set(prompts) for prompts in by_defense.values()))
    print(f"{len(shared)} attack prompts answered under all {len(by_defense)} defenses")
    print("| defense | DSR (refusal) | harm-DSR |\n|---|---|---|")
    for defense, prompts in by_defense.items():
        chosen = [prompts[key] for key in shared]
        cells = []
        for defended in ([r["judges"]["keyword_refusal"] for r in chosen],
                         [not r["judges"]["harm"] for r in chosen if "harm" in r["judges"]]):  # fmt: skip
            low, high = wilson(sum(defended), len(defended))
            cells.append(f"{100 * sum(defended) / max(1, len(defended)):.1f} [{100 * low:.0f}-{100 * high:.0f}]")
        print(f"| {defense} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
