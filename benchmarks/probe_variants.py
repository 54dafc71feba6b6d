"""Harm-probe variants side by side, on the same forward passes: what the probe reads (last prompt token,
mean over the prompt's tokens, smooth maximum over them) and what it trains on (the probe's 6 training
attacks, 3 per goal; or those plus the probe-only wrappers, 8 per goal, as `fit_probe` does).

Validation is `fit_probe`'s: the held-out 30% of the built-in calibration goals, direct and wrapped in the
probe's 3 validation templates (never the evaluation's held-out attacks, so that choosing a design here
does not tune to them). Prints, per variant and block: the AUROC pooled over all validation prompts, the
range of AUROCs within each validation template, and wrapped harmful prompts against plain harmless ones.

    python benchmarks/probe_variants.py [--model NAME] [--dtype bfloat16] [--layers 10 16]

About 10 minutes on 2 CPU cores for the 0.5B model in bfloat16.
"""

from __future__ import annotations

import argparse
import random

import torch
from _common import machine

from jailbreak_antidote.activations import prompt_token_states
from jailbreak_antidote.models import load_model
from jailbreak_antidote.probe import (
    NEST_PROBABILITY,
    PROBE_TRAIN_ATTACKS,
    PROBE_VALIDATION_ATTACKS,
    ProbeData,
    _Packed,
    against_direct_benign,
    attack_wrappers,
    augmented,
    auroc,
    per_group_auroc,
    smooth_max,
    train_logistic,
    train_max_pooled,
    training_wrappers,
)
from jailbreak_antidote.prompts import builtin_calibration


def split_goals(count: int, seed: int = 0) -> tuple[list[int], list[int]]:
    order = list(range(count))
    random.Random(seed).shuffle(order)  # the same split as fit_probe
    cut = int(count * 0.7)
    return order[:cut], order[cut:]


def pooled_features(states: list[torch.Tensor], column: int, pooling: str) -> torch.Tensor:
    if pooling == "last":
        return torch.stack([s[-1, column].float() for s in states])
    return torch.stack([s[:, column].float().mean(0) for s in states])


def linear_probe(train: list[torch.Tensor], labels: torch.Tensor, valid: list[torch.Tensor], column: int, pooling: str):
    x = pooled_features(train, column, pooling)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-4)
    weight, bias = train_logistic((x - mean) / std, labels, l2=0.1)
    return ((pooled_features(valid, column, pooling) - mean) / std) @ weight + bias


def max_probe(train: list[torch.Tensor], labels: torch.Tensor, valid: list[torch.Tensor], column: int):
    packed = _Packed.of(train, column)
    mean, std = packed.features.mean(0), packed.features.std(0).clamp_min(1e-4)
    packed.features = (packed.features - mean) / std
    weight, bias = train_max_pooled(packed, labels)
    valid_packed = _Packed.of(valid, column)
    scores = ((valid_packed.features - mean) / std) @ weight + bias
    return smooth_max(scores, valid_packed.segments, valid_packed.count, 1.0)


def describe(scores: torch.Tensor, data: ProbeData) -> str:
    per_template = per_group_auroc(scores, data, data.attacks).values()
    pooled = auroc(scores, torch.tensor(data.labels))
    return (
        f"{pooled:>7.3f} {min(per_template):>7.3f}-{max(per_template):.3f} {against_direct_benign(scores, data):>9.4f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layers", type=int, nargs="+", default=[10, 16])
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, dtype=args.dtype)
    calibration = builtin_calibration()
    train_goals, valid_goals = split_goals(len(calibration.harmful))

    def pick(indices: list[int]) -> tuple[list[str], list[str]]:
        return [calibration.harmful[i] for i in indices], [calibration.harmless[i] for i in indices]

    sets = {
        "6 attacks, 3/goal": augmented(*pick(train_goals), attack_wrappers(PROBE_TRAIN_ATTACKS), 3, 0),
        "+ wrappers, 8/goal": augmented(
            *pick(train_goals), training_wrappers(PROBE_TRAIN_ATTACKS), 8, 0, NEST_PROBABILITY
        ),
    }
    valid = augmented(*pick(valid_goals), attack_wrappers(PROBE_VALIDATION_ATTACKS), len(PROBE_VALIDATION_ATTACKS), 1)
    prompts = [p for data in sets.values() for p in data.prompts] + valid.prompts
    print(f"machine: {machine()}; model {args.model} ({args.dtype}); {len(prompts)} prompts")
    states = prompt_token_states(model, tokenizer, prompts, args.layers)
    start, by_set = 0, {}
    for name, data in sets.items():
        by_set[name] = states[start : start + len(data.prompts)]
        start += len(data.prompts)
    valid_states = states[start:]

    print(f"{'training data':<20} {'reads':<5} {'block':>5} {'pooled':>7} {'per template':>13} {'vs plain':>9}")
    for column, layer in enumerate(args.layers):
        for name, data in sets.items():
            labels = torch.tensor(data.labels)
            for pooling in ("last", "mean"):
                scores = linear_probe(by_set[name], labels, valid_states, column, pooling)
                print(f"{name:<20} {pooling:<5} {layer:>5} {describe(scores, valid)}")
        name = "+ wrappers, 8/goal"
        scores = max_probe(by_set[name], torch.tensor(sets[name].labels), valid_states, column)
        print(f"{name:<20} {'max':<5} {layer:>5} {describe(scores, valid)}")


if __name__ == "__main__":
    main()
