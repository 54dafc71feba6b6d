"""One table over several evaluation directories (docs/RESULTS.md, issue 19): per setting, DSR by refusal
and by harm, benign compliance and per-attack DSR, each with its 95% Wilson interval, from summary.csv.

    python benchmarks/methods_table.py docs/results/methods-slice/pca docs/results/methods-slice/null_space ...

Each directory is one artifact (one fit method); its name labels its rows. `--attacks` lists the per-attack
columns (default: the six held-out templates).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

HELD_OUT = ("developer-mode", "opposite-mode", "style-injection", "future-tense", "table-nesting", "payload-splitting")


def cell(row: dict[str, str] | None) -> str:
    if row is None:
        return "-"
    return f"{100 * float(row['value']):.1f} [{100 * float(row['ci_low']):.0f}-{100 * float(row['ci_high']):.0f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="evaluation directories holding summary.csv")
    parser.add_argument("--attacks", default=",".join(HELD_OUT), help="comma-separated per-attack DSR columns")
    args = parser.parse_args()
    attacks = [a for a in args.attacks.split(",") if a]
    columns = [("dsr", "overall"), ("harm_dsr", "overall"), ("benign_compliance", "harmless_test"),
               ("benign_compliance", "xstest-safe"), ("refusal_rate", "xstest-unsafe")]  # fmt: skip
    header = ["method", "setting", "DSR (refusal)", "harm-DSR", "harmless_test compliance", "XSTest safe compliance",
              "XSTest unsafe refusal", *[f"DSR {a}" for a in attacks]]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for run in args.runs:
        with open(run / "summary.csv", newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        settings = dict.fromkeys((r["defense"], r["alpha"], r["k"], r["selector"]) for r in rows)
        for setting in settings:
            defense, alpha, k, selector = setting
            mine = {(r["metric"], r["scope"]): r for r in rows
                    if (r["defense"], r["alpha"], r["k"], r["selector"]) == setting}  # fmt: skip
            label = defense if not k else f"{defense}, alpha {float(alpha):g}, k {float(k):g}" + (
                " random" if selector == "random" else "")  # fmt: skip
            cells = [cell(mine.get(key)) for key in columns] + [cell(mine.get(("dsr", a))) for a in attacks]
            print(f"| {run.name} | {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
