"""End-to-end evaluation wall time on both backends: the same `antidote eval` slice with --backend
transformers (float32, batched) and --backend llamacpp (the original GGUF, one prompt at a time).

    python benchmarks/eval_backends.py --goals ../shared/data/refusal_direction/raw/jailbreakbench.csv
        [--antidote runs/qwen05-builtin.antidote] [--stride 5] [--attacks dan,aim,refusal-suppression,base64]

Default slice: every 5th JailbreakBench goal (20 goals) x 4 attacks, defenses none and antidote at the
suggested alpha, 64 new tokens, the built-in benign list for compliance. Prints each run's wall time (model
loading included), its defense success rate and benign compliance, and the ratio.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine


def run_eval(backend: str, args: argparse.Namespace, out: Path) -> float:
    command = [
        sys.executable, "-m", "jailbreak_antidote", "eval", "--backend", backend, "-a", str(args.antidote),
        "--goals", str(args.goals), "--stride", str(args.stride), "--attacks", args.attacks,
        "--defenses", "none,antidote", "--max-new-tokens", str(args.tokens), "--out", str(out),
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def overall(out: Path) -> dict[str, str]:
    """defense -> 'DSR x%, compliance y%' from summary.csv."""
    cells: dict[str, dict[str, str]] = {}
    with open(out / "summary.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["scope"] in ("overall", "builtin-benign") and row["metric"] in ("dsr", "benign_compliance"):
                cells.setdefault(row["defense"], {})[row["metric"]] = f"{float(row['value']):.0%}"
    return {
        d: f"DSR {c.get('dsr', '?')}, benign compliance {c.get('benign_compliance', '?')}" for d, c in cells.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--goals", type=Path, default=Path("../shared/data/refusal_direction/raw/jailbreakbench.csv"))
    parser.add_argument("--antidote", type=Path, default=Path("runs/qwen05-builtin.antidote"))
    parser.add_argument("--stride", type=int, default=5)
    parser.add_argument("--attacks", default="dan,aim,refusal-suppression,base64")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"slice: every {args.stride}th goal of {args.goals.name} x {args.attacks}, defenses none + antidote, "
          f"{args.tokens} new tokens, built-in benign list")  # fmt: skip
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("transformers", "llamacpp"):
            out = Path(tmp) / backend
            seconds[backend] = run_eval(backend, args, out)
            print(f"{backend:<13} {seconds[backend]:7.1f} s   {overall(out)}")
    print(f"speed, llama.cpp relative to transformers: {seconds['transformers'] / seconds['llamacpp']:.2f}x")


if __name__ == "__main__":
    main()
