"""Steering overhead: generation tokens/s with the antidote applied versus the unsteered model.

Same prompts, greedy decoding, exactly N new tokens per row (min_new_tokens = max_new_tokens), runs
interleaved in one process (alternating which goes first) so that machine noise hits both sides alike;
prints the median of the per-pair time ratios.

    python benchmarks/steering_overhead.py [--model NAME] [--tokens 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import bundled_model_and_antidote, machine

from jailbreak_antidote.models import encode_prompts
from jailbreak_antidote.prompts import builtin_prompts


def timed_generate(model, batch, tokens: int, pad_id: int) -> float:
    started = time.perf_counter()
    with torch.no_grad():
        output = model.generate(
            **batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=pad_id,
            temperature=None, top_p=None, top_k=None,
        )  # fmt: skip
    elapsed = time.perf_counter() - started
    assert output.shape[1] - batch["input_ids"].shape[1] == tokens
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()

    model, tokenizer, antidote = bundled_model_and_antidote(args.model)
    alpha = antidote.suggested_alpha
    prompts = builtin_prompts("benign")
    print(f"machine: {machine()}")
    print(f"model {args.model}, k={antidote.k}, {len(antidote.layers)} steered layers, alpha {alpha}")
    print(f"{'batch':>5} {'plain tok/s':>12} {'steered tok/s':>14} {'overhead':>9}")
    for batch_size in args.batch_sizes:
        batch = encode_prompts(tokenizer, prompts[:batch_size])
        timed_generate(model, batch, 4, tokenizer.pad_token_id)  # warm-up
        ratios, plain_rates, steered_rates = [], [], []
        for repeat in range(args.repeats):
            # Alternate which side runs first so that drift within a pair does not favour either side.
            order = ("plain", "steered") if repeat % 2 == 0 else ("steered", "plain")
            seconds = {}
            for side in order:
                if side == "plain":
                    seconds[side] = timed_generate(model, batch, args.tokens, tokenizer.pad_token_id)
                else:
                    with antidote.applied(model, alpha=alpha):
                        seconds[side] = timed_generate(model, batch, args.tokens, tokenizer.pad_token_id)
            plain, steered = seconds["plain"], seconds["steered"]
            ratios.append(steered / plain)
            plain_rates.append(batch_size * args.tokens / plain)
            steered_rates.append(batch_size * args.tokens / steered)
        overhead = statistics.median(ratios) - 1
        print(
            f"{batch_size:>5} {statistics.median(plain_rates):>12.1f} {statistics.median(steered_rates):>14.1f} "
            f"{overhead:>+9.1%}"
        )


if __name__ == "__main__":
    main()
