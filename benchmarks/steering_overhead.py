"""Steering overhead: generation tokens/s with the antidote applied versus the unsteered model.

Same prompts, greedy decoding, exactly N new tokens per row (min_new_tokens = max_new_tokens), runs
interleaved in one process (alternating which goes first) so that machine noise hits both sides alike;
prints the median of the per-pair time ratios. End-to-end ratios on a shared 2-core machine scatter by a
few percent from run to run, so the script also reports the share of a steered generation's time spent
inside the steering hooks themselves (cProfile), which is stable.

    python benchmarks/steering_overhead.py [--model NAME] [--tokens 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
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


def hook_share(model, antidote, alpha: float, batch, tokens: int, pad_id: int) -> float:
    """Fraction of a steered generation's time spent inside jailbreak_antidote/steer.py (cProfile)."""
    profiler = cProfile.Profile()
    with antidote.applied(model, alpha=alpha):
        profiler.enable()
        total = timed_generate(model, batch, tokens, pad_id)
        profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    own = sum(tottime for (file, _, _), (_, _, tottime, _, _) in stats.items() if file.endswith("steer.py"))
    return own / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()

    model, tokenizer, antidote = bundled_model_and_antidote(args.model)
    alpha = antidote.suggested_alpha
    prompts = builtin_prompts("benign")
    print(f"machine: {machine()}")
    print(f"model {args.model}, k={antidote.k}, {len(antidote.layers)} steered layers, alpha {alpha}")
    print(f"{'batch':>5} {'plain tok/s':>12} {'steered tok/s':>14} {'overhead':>9} {'time in hooks':>14}")
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
        share = hook_share(model, antidote, alpha, batch, args.tokens, tokenizer.pad_token_id)
        print(
            f"{batch_size:>5} {statistics.median(plain_rates):>12.1f} {statistics.median(steered_rates):>14.1f} "
            f"{overhead:>+9.1%} {share:>14.2%}"
        )


if __name__ == "__main__":
    main()
