"""Fit cost: `fit_antidote` wall time divided by the time of the bare forward passes over the same prompts.

"Bare" = the same decoder-stack forward passes, same batches, no hooks and no statistics; a full
CausalLM forward (with the LM head, as a naive implementation would run) is timed too. Runs are
interleaved in one process; prints median ratios.

    python benchmarks/fit_cost.py [--model NAME] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import machine

from jailbreak_antidote.blocks import find_decoder
from jailbreak_antidote.fit import fit_antidote
from jailbreak_antidote.models import encode_prompts, load_model
from jailbreak_antidote.prompts import builtin_calibration


@torch.no_grad()
def bare_forwards(module, tokenizer, prompts: list[str], batch_size: int) -> float:
    order = sorted(prompts, key=len)  # the same length-sorted batches that fitting uses
    started = time.perf_counter()
    for start in range(0, len(order), batch_size):
        module(**encode_prompts(tokenizer, order[start : start + batch_size]), use_cache=False)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    calibration = builtin_calibration()
    prompts = calibration.harmful + calibration.harmless
    stack, _ = find_decoder(model)
    print(f"machine: {machine()}")
    print(f"model {args.model}: {len(prompts)} prompts, batch size {args.batch_size}")
    bare_forwards(stack, tokenizer, prompts[:32], args.batch_size)  # warm-up
    fits, stacks, fulls = [], [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        fit_antidote(model, tokenizer, calibration.harmful, calibration.harmless, batch_size=args.batch_size)
        fits.append(time.perf_counter() - started)
        stacks.append(bare_forwards(stack, tokenizer, prompts, args.batch_size))
        fulls.append(bare_forwards(model, tokenizer, prompts, args.batch_size))
    fit_s, stack_s, full_s = (statistics.median(x) for x in (fits, stacks, fulls))
    print(f"fit wall time          {fit_s:7.2f} s")
    print(f"bare stack forwards    {stack_s:7.2f} s   ratio fit / bare = {fit_s / stack_s:.3f}")
    print(f"bare full-LM forwards  {full_s:7.2f} s   ratio fit / full = {fit_s / full_s:.3f}")


if __name__ == "__main__":
    main()
