"""Refusal counts across alpha on the built-in jailbreak and benign lists (keyword judge).

    python benchmarks/alpha_sweep.py [--model NAME] [--tokens 40] [--factors 0 0.5 1 1.5 2]

Alphas are multiples of the fitted antidote's suggested alpha. Prints one line per alpha.
"""

from __future__ import annotations

import argparse

from _common import bundled_model_and_antidote, machine

from jailbreak_antidote.eval.judges import is_refusal
from jailbreak_antidote.generate import generate_grid
from jailbreak_antidote.prompts import builtin_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--factors", type=float, nargs="+", default=[0, 0.5, 1, 1.5, 2])
    args = parser.parse_args()

    model, tokenizer, antidote = bundled_model_and_antidote(args.model)
    suggested = antidote.suggested_alpha
    alphas = [round(f * suggested, 4) for f in args.factors]
    lists = {kind: builtin_prompts(kind) for kind in ("harmful", "jailbreak", "benign")}
    prompts = [p for group in lists.values() for p in group]
    rows = generate_grid(
        model, tokenizer, prompts, alphas, antidote=antidote, max_new_tokens=args.tokens, batch_size=16
    )
    refused = {(row["prompt"], row["alpha"]): is_refusal(row["response"]) for row in rows}
    print(f"machine: {machine()}")
    print(f"model {args.model}, suggested alpha {suggested}, {args.tokens} new tokens, greedy, keyword judge")
    print(f"{'alpha':>8} " + " ".join(f"{kind + ' refused':>18}" for kind in lists))
    for alpha in alphas:
        cells = [f"{sum(refused[(p, alpha)] for p in group)}/{len(group)}" for group in lists.values()]
        print(f"{alpha:>8} " + " ".join(f"{cell:>18}" for cell in cells))


if __name__ == "__main__":
    main()
