"""Harm probe: how likely a prompt is harmful, read from the last prompt token's hidden state, including
prompts wrapped in jailbreak templates.

The antidote direction alone does not flag jailbreaks (templates push the state toward "harmless"; that is
how they work), so the probe is a logistic regression trained on template-augmented data: the calibration
pairs wrapped in attack templates on *both* sides, harmful and harmless, so that the template itself
carries no signal. Layers are chosen by AUROC on held-out goals wrapped in held-out templates, and the
score is calibrated to a probability on that validation set (Platt scaling).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .activations import last_token_states
from .blocks import decoder_blocks
from .errors import InvalidParameter
from .prompts import check_pairs

# Templates the probe trains on, and templates kept out to choose the layer and calibrate (built-in attacks).
TRAIN_ATTACKS = (
    "aim", "dan", "prefix-injection", "refusal-suppression", "base64", "past-tense", "deep-inception",
    "code-nesting", "few-shot",
)  # fmt: skip
HELD_OUT_ATTACKS = ("developer-mode", "opposite-mode", "style-injection", "future-tense", "table-nesting",
                    "payload-splitting")  # fmt: skip


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (probability a random positive outscores a random negative; ties count half)."""
    scores, labels = scores.double().flatten(), labels.bool().flatten()
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        raise InvalidParameter("AUROC needs both harmful and harmless examples")
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    for value in scores.unique():  # average ranks over ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def train_logistic(features: torch.Tensor, labels: torch.Tensor, l2: float = 1e-2) -> tuple[torch.Tensor, float]:
    """L2-regularised logistic regression (L-BFGS, full batch); features should be standardised."""
    x, y = features.double(), labels.double()
    weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, y) + l2 * weight.square().sum()
        value.backward()
        return value

    optimizer.step(loss)
    return weight.detach().float(), float(bias.detach())


@dataclass
class HarmProbe:
    """p(harmful | prompt) = sigmoid(scale * (w . (h - mean) / std + bias) + offset), h = block `layer`'s
    output at the last prompt token."""

    layer: int
    weight: torch.Tensor
    bias: float
    mean: torch.Tensor
    std: torch.Tensor
    scale: float = 1.0
    offset: float = 0.0
    report: dict[str, Any] = field(default_factory=dict)

    def raw_scores(self, states: torch.Tensor) -> torch.Tensor:
        return ((states.float() - self.mean) / self.std) @ self.weight + self.bias

    def probability(self, states: torch.Tensor) -> torch.Tensor:
        """states: [n, hidden] outputs of block `layer` at the last prompt token."""
        return torch.sigmoid(self.scale * self.raw_scores(states) + self.offset)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"probe.weight": self.weight, "probe.mean": self.mean, "probe.std": self.std}

    def metadata(self) -> dict[str, Any]:
        return {"layer": self.layer, "bias": self.bias, "scale": self.scale, "offset": self.offset,
                "report": self.report}  # fmt: skip

    @classmethod
    def from_parts(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> HarmProbe:
        return cls(
            layer=int(meta["layer"]), weight=tensors["probe.weight"].float(), bias=float(meta["bias"]),
            mean=tensors["probe.mean"].float(), std=tensors["probe.std"].float(), scale=float(meta["scale"]),
            offset=float(meta["offset"]), report=meta.get("report", {}),
        )  # fmt: skip


@dataclass
class ProbeData:
    prompts: list[str]
    labels: list[int]
    attacks: list[str]  # which template wrapped each prompt ("direct": none)
    families: list[str]


def augmented(
    harmful: Sequence[str], harmless: Sequence[str], attack_names: Sequence[str], per_goal: int, seed: int
) -> ProbeData:
    """Each instruction as it is, plus wrapped in `per_goal` templates drawn (seeded) from `attack_names`;
    a pair's harmful and harmless sides get the same templates, so templates carry no label."""
    from .eval.attacks import get_attacks

    attacks = get_attacks(list(attack_names))
    rng = random.Random(seed)
    data = ProbeData([], [], [], [])
    for bad, good in zip(harmful, harmless):
        chosen = rng.sample(attacks, min(per_goal, len(attacks)))
        for attack in [None, *chosen]:
            for text, label in ((bad, 1), (good, 0)):
                data.prompts.append(attack(text) if attack else text)
                data.labels.append(label)
                data.attacks.append(attack.name if attack else "direct")
                data.families.append(attack.family if attack else "none")
    return data


def per_group_auroc(scores: torch.Tensor, data: ProbeData, groups: list[str]) -> dict[str, float]:
    """AUROC within each attack (or family): that group's harmful vs its harmless prompts."""
    labels = torch.tensor(data.labels)
    result = {}
    for group in sorted(set(groups)):
        index = torch.tensor([i for i, g in enumerate(groups) if g == group])
        if labels[index].unique().numel() == 2:
            result[group] = round(auroc(scores[index], labels[index]), 4)
    return result


def fit_probe(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    per_goal: int = 3,
    validation_fraction: float = 0.3,
    train_attacks: Sequence[str] = TRAIN_ATTACKS,
    held_out_attacks: Sequence[str] = HELD_OUT_ATTACKS,
    seed: int = 0,
    batch_size: int = 16,
    system: str | None = None,
) -> HarmProbe:
    """Train on the training goals x training templates, choose the layer and calibrate on the other goals
    wrapped in held-out templates (never seen in training: neither the goal nor the template)."""
    check_pairs(list(harmful), list(harmless))
    if not 0 < validation_fraction < 1:
        raise InvalidParameter(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    if set(train_attacks) & set(held_out_attacks):
        raise InvalidParameter("a template cannot be both a training and a held-out template")
    depth = len(decoder_blocks(model))
    layers = list(range(depth)) if layers is None else list(layers)
    order = list(range(len(harmful)))
    random.Random(seed).shuffle(order)
    cut = int(len(order) * (1 - validation_fraction))
    split = {"train": order[:cut], "validation": order[cut:]}
    train = augmented([harmful[i] for i in split["train"]], [harmless[i] for i in split["train"]], train_attacks,
                      per_goal, seed)  # fmt: skip
    valid = augmented([harmful[i] for i in split["validation"]], [harmless[i] for i in split["validation"]],
                      held_out_attacks, per_goal, seed + 1)  # fmt: skip
    states = last_token_states(model, tokenizer, train.prompts + valid.prompts, layers, system=system,
                               batch_size=batch_size)  # fmt: skip
    train_states, valid_states = states[: len(train.prompts)], states[len(train.prompts) :]
    y_train, y_valid = torch.tensor(train.labels), torch.tensor(valid.labels)
    candidates: dict[int, HarmProbe] = {}
    layer_auroc: dict[str, float] = {}
    for i, layer in enumerate(layers):
        x = train_states[:, i]
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        weight, bias = train_logistic((x - mean) / std, y_train)
        probe = HarmProbe(layer, weight, bias, mean, std)
        candidates[layer] = probe
        layer_auroc[str(layer)] = round(auroc(probe.raw_scores(valid_states[:, i]), y_valid), 4)
    best = max(layers, key=lambda layer: layer_auroc[str(layer)])
    probe = candidates[best]
    raw = probe.raw_scores(valid_states[:, layers.index(best)])
    probe.scale, probe.offset = _platt(raw, y_valid)
    probe.report = {
        "validation_auroc": layer_auroc[str(best)],
        "validation_auroc_per_layer": layer_auroc,
        "validation_auroc_per_attack": per_group_auroc(raw, valid, valid.attacks),
        "validation_auroc_per_family": per_group_auroc(raw, valid, valid.families),
        "train_attacks": list(train_attacks),
        "held_out_attacks": list(held_out_attacks),
        "n_train": len(train.prompts),
        "n_validation": len(valid.prompts),
        "seed": seed,
    }
    return probe


def _platt(raw: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Fit p = sigmoid(a * raw + b) on validation scores, so that the probability is calibrated."""
    weight, bias = train_logistic(raw.unsqueeze(1), labels, l2=0.0)
    return float(weight[0]), bias
