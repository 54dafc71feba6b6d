"""Evaluation throughput: prompts/s of batched generation at batch sizes 1, 4 and 16, and the time the
refusal-score judge takes for 1,000 prompts (no generation).

    python benchmarks/eval_throughput.py [--model NAME] [--tokens 64] [--prompts 16] [--score-prompts 1000]
                                         [--dtypes float32 bfloat16]

All batch sizes answer the same prompts (JailbreakBench-style attack prompts from the built-in attack
templates over the built-in jailbreak goals) with exactly N new tokens, in one process.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import machine

from jailbreak_antidote.eval.attacks import BUILTIN
from jailbreak_antidote.eval.judges import refusal_scores
from jailbreak_antidote.models import encode_prompts, load_model
from jailbreak_antidote.prompts import builtin_calibration, builtin_prompts


@torch.no_grad()
def answer(model, tokenizer, prompts: list[str], batch_size: int, tokens: int) -> float:
    started = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        batch = encode_prompts(tokenizer, prompts[start : start + batch_size])
        model.generate(
            **batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None,
        )  # fmt: skip
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 4, 16], help="none: only time the judge")
    parser.add_argument("--score-prompts", type=int, default=1000)
    parser.add_argument("--dtypes", nargs="+", default=["float32"], help="weights dtypes to compare, in turn")
    args = parser.parse_args()
    for dtype in args.dtypes:
        run(args, dtype)


def run(args: argparse.Namespace, dtype: str) -> None:
    model, tokenizer = load_model(args.model, dtype=dtype)
    goals = builtin_prompts("harmful") + [p for p in builtin_calibration().harmful]
    attacks = [a for a in BUILTIN.values() if a.name != "direct"]
    prompts = [attacks[i % len(attacks)](goals[i % len(goals)]) for i in range(args.prompts)]
    print(f"machine: {machine()}")
    print(f"model {args.model} ({dtype}): {len(prompts)} attack prompts, {args.tokens} new tokens each, greedy")
    answer(model, tokenizer, prompts[:2], 2, 4)  # warm-up
    base = None
    for batch_size in args.batch_sizes:
        seconds = answer(model, tokenizer, prompts, batch_size, args.tokens)
        rate = len(prompts) / seconds
        base = base or rate
        speedup = f"{rate / base:5.2f}x batch {args.batch_sizes[0]}"
        print(f"batch {batch_size:>3}: {rate:6.3f} prompts/s  {rate * args.tokens:7.1f} tokens/s  {speedup}")
    if not args.score_prompts:
        return
    many = [attacks[i % len(attacks)](goals[i % len(goals)]) for i in range(args.score_prompts)]
    started = time.perf_counter()
    scores = refusal_scores(model, tokenizer, many, batch_size=16)
    seconds = time.perf_counter() - started
    rate = len(scores) / seconds
    print(f"refusal-score judge: {len(scores)} prompts in {seconds:.1f} s ({rate:.1f} prompts/s), no generation")


if __name__ == "__main__":
    main()
