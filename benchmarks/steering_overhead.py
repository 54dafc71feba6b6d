"""Steering overhead: generation tokens/s with the antidote applied versus the unsteered model.

Same prompts, greedy decoding, exactly N new tokens per row (min_new_tokens = max_new_tokens), runs
interleaved in one process (alternating which goes first) so that machine noise hits both sides alike;
prints the median of the per-pair time ratios. End-to-end ratios on a shared 2-core machine scatter by a
few percent from run to run, so the script also reports the share of a steered generation's time spent
inside the steering hooks themselves (cProfile), which is stable.

    python benchmarks/steering_overhead.py [--model NAME] [--tokens 32] [--repeats 12]
    python benchmarks/steering_overhead.py --antidote runs/qwen05-probe.antidote --modes fixed gated monitor
    python benchmarks/steering_overhead.py --antidote runs/qwen05-null_space.antidote --positions prompt

With `--antidote` (an artifact with a harm probe) each mode is timed against the plain model in the same
interleaved rounds; gated and monitor run with threshold 0, so the gate is open and every prompt is
steered: the probe's own cost on top of fixed steering (monitor: the probe also reads every generated
token). A null_space artifact adds its readouts' cost; `--positions prompt` steers the prefill only.
Mode `gated+refuse` is gated with the outright-refusal check after every token (`--refuse-threshold`,
default 2, above any probability, so that the check runs and no row is refused): the check's own cost.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch
from _common import bundled_model_and_antidote, machine

from jailbreak_antidote.generate import refusal_stopping
from jailbreak_antidote.models import encode_prompts
from jailbreak_antidote.prompts import builtin_prompts


def timed_generate(model, batch, tokens: int, pad_id: int, stopping=None) -> float:
    started = time.perf_counter()
    with torch.no_grad():
        output = model.generate(
            **batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=pad_id,
            temperature=None, top_p=None, top_k=None, stopping_criteria=stopping,
        )  # fmt: skip
    elapsed = time.perf_counter() - started
    assert output.shape[1] - batch["input_ids"].shape[1] == tokens
    return elapsed


POSITIONS = "all"  # set from --positions in main()
REFUSE_THRESHOLD = 2.0  # set from --refuse-threshold in main()


def steered(model, antidote, alpha: float, mode: str):
    return antidote.applied(model, alpha=alpha, mode=mode.removesuffix("+refuse"), threshold=0.0, positions=POSITIONS)


def stopping(steering, mode: str):
    """The outright-refusal check for mode "gated+refuse", else none."""
    return refusal_stopping(steering, REFUSE_THRESHOLD) if mode.endswith("+refuse") else None


def hook_share(model, antidote, alpha: float, mode: str, batch, tokens: int, pad_id: int) -> float:
    """Fraction of a steered generation's time spent inside steer.py and probe.py (cProfile)."""
    profiler = cProfile.Profile()
    with steered(model, antidote, alpha, mode) as steering:
        profiler.enable()
        total = timed_generate(model, batch, tokens, pad_id, stopping(steering, mode))
        profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    ours = ("steer.py", "probe.py", "generate.py")
    own = sum(tottime for (file, _, _), (_, _, tottime, _, _) in stats.items() if file.endswith(ours))
    return own / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--antidote", help="A .antidote file (default: fit the built-in one)")
    parser.add_argument("--modes", nargs="+", default=["fixed"],
                        choices=["fixed", "gated", "scaled", "monitor", "gated+refuse"])  # fmt: skip
    parser.add_argument("--refuse-threshold", type=float, default=2.0, help="for mode gated+refuse")
    parser.add_argument("--positions", default="all", choices=["all", "prompt", "generated"])
    args = parser.parse_args()
    global POSITIONS, REFUSE_THRESHOLD
    POSITIONS, REFUSE_THRESHOLD = args.positions, args.refuse_threshold

    if args.antidote:
        from jailbreak_antidote.antidote import Antidote
        from jailbreak_antidote.models import load_model

        model, tokenizer = load_model(args.model)
        antidote = Antidote.load(args.antidote)
    else:
        model, tokenizer, antidote = bundled_model_and_antidote(args.model)
    alpha = antidote.suggested_alpha
    prompts = builtin_prompts("benign")
    print(f"machine: {machine()}")
    print(f"model {args.model}, method {antidote.method}, k={antidote.k}, {len(antidote.layers)} steered layers, "
          f"alpha {alpha}, positions {args.positions}")  # fmt: skip
    print(f"{'batch':>5} {'mode':>12} {'plain tok/s':>12} {'steered tok/s':>14} {'overhead':>9} {'time in hooks':>14}")
    for batch_size in args.batch_sizes:
        batch = encode_prompts(tokenizer, prompts[:batch_size])
        timed_generate(model, batch, 4, tokenizer.pad_token_id)  # warm-up
        sides = ["plain", *args.modes]
        seconds: dict[str, list[float]] = {side: [] for side in sides}
        for repeat in range(args.repeats):
            # Rotate which side runs first so that drift within a round does not favour any side.
            for side in sides[repeat % len(sides) :] + sides[: repeat % len(sides)]:
                if side == "plain":
                    seconds[side].append(timed_generate(model, batch, args.tokens, tokenizer.pad_token_id))
                else:
                    with steered(model, antidote, alpha, side) as steering:
                        seconds[side].append(
                            timed_generate(model, batch, args.tokens, tokenizer.pad_token_id, stopping(steering, side))
                        )
        for mode in args.modes:
            overhead = statistics.median(s / p for s, p in zip(seconds[mode], seconds["plain"])) - 1
            share = hook_share(model, antidote, alpha, mode, batch, args.tokens, tokenizer.pad_token_id)
            plain_rate = batch_size * args.tokens / statistics.median(seconds["plain"])
            steered_rate = batch_size * args.tokens / statistics.median(seconds[mode])
            print(
                f"{batch_size:>5} {mode:>12} {plain_rate:>12.1f} {steered_rate:>14.1f} {overhead:>+9.1%} {share:>14.2%}"
            )


if __name__ == "__main__":
    main()
