"""Harm probe: how likely a prompt is harmful, read from one decoder block's hidden states over the prompt,
including prompts wrapped in jailbreak templates.

The antidote direction alone does not flag jailbreaks (templates push the state toward "harmless"; that is
how they work), so the probe is a logistic regression trained on template-augmented data: the calibration
pairs wrapped in attack templates on *both* sides, harmful and harmless, so that the template itself
carries no label. What we measured on the bundled 0.5B model (docs/ADAPTIVE.md):
- reading only the last prompt token fails on unseen templates that bury the request in a long wrapper (a
  LaTeX table, split strings): the last state is about the wrapper. So the probe scores every prompt token
  and pools them with a smooth maximum (log-sum-exp), trained as multiple-instance learning: a harmful
  prompt has some harmful token, a harmless one has none;
- a few templates teach the templates' surface, so training draws from many wrappers
  (`probe_templates.WRAPPERS` plus the training attacks), some nested two deep.
- the probe block should be early: gated and scaled modes steer the prompt only after it. With the probe
  at block 16 of 24, gated steering at 4x the suggested alpha refused 73% of the tuning set's harmful
  prompts; at block 10, 88% (as many as fixed alpha, which also refused 81% of benign prompts). So the
  candidates sit at a third to 40% of the depth (`LAYER_FRACTIONS`).
Among the candidates the layer is chosen by AUROC on held-out calibration goals wrapped in the probe's
*validation* templates (`PROBE_VALIDATION_ATTACKS`: training attacks the probe itself does not train on), and
the score is calibrated to a probability on that validation set (Platt scaling). The evaluation's held-out
templates (`HELD_OUT_ATTACKS`) take no part in fitting, probing or tuning.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .activations import prompt_token_states
from .blocks import decoder_blocks
from .context import describe
from .errors import ArtifactError, InvalidParameter
from .prompts import check_pairs

# Built-in attacks that fitting, probing and tuning may read; the held-out ones are kept for evaluation only.
TRAIN_ATTACKS = (
    "aim", "dan", "prefix-injection", "refusal-suppression", "base64", "past-tense", "deep-inception",
    "code-nesting", "few-shot",
)  # fmt: skip
HELD_OUT_ATTACKS = ("developer-mode", "opposite-mode", "style-injection", "future-tense", "table-nesting",
                    "payload-splitting")  # fmt: skip
# Of the training attacks, those the probe keeps out of its own training to choose its block and calibrate on.
PROBE_VALIDATION_ATTACKS = ("past-tense", "code-nesting", "few-shot")
PROBE_TRAIN_ATTACKS = tuple(attack for attack in TRAIN_ATTACKS if attack not in PROBE_VALIDATION_ATTACKS)


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


POOLINGS = ("max", "last")
LAYER_FRACTIONS = (0.33, 0.42)  # candidate probe blocks, as a share of the depth (early: see fit_probe)
NEST_PROBABILITY = 0.25  # share of training wrappers nested inside a second one


def smooth_max(scores: torch.Tensor, segments: torch.Tensor, count: int, tau: float) -> torch.Tensor:
    """tau * log(sum(exp(score / tau))) over each segment's tokens: a differentiable maximum per prompt."""
    peak = torch.full((count,), -torch.inf, dtype=scores.dtype).scatter_reduce(0, segments, scores.detach(), "amax")
    total = torch.zeros(count, dtype=scores.dtype).index_add(0, segments, torch.exp((scores - peak[segments]) / tau))
    return peak + tau * torch.log(total)


@dataclass
class HarmProbe:
    """p(harmful | prompt) = sigmoid(scale * pooled + offset), where each prompt token t of block `layer`'s
    output scores z_t = w . (h_t - mean) / std + bias, and pooled = tau * logsumexp(z / tau) over the prompt's
    tokens ("max" pooling), or z at the last prompt token ("last", artifacts of version 0.1)."""

    layer: int
    weight: torch.Tensor
    bias: float
    mean: torch.Tensor
    std: torch.Tensor
    scale: float = 1.0
    offset: float = 0.0
    pooling: str = "max"
    tau: float = 1.0
    report: dict[str, Any] = field(default_factory=dict)

    def token_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., hidden_size] -> z [...] (computed on hidden's device)."""
        device = hidden.device
        standardised = (hidden.float() - self.mean.to(device)) / self.std.to(device)
        return standardised @ self.weight.to(device) + self.bias

    def raw_scores(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [batch, seq, hidden_size]: block `layer`'s output over left-padded prompts; mask [batch, seq]
        (1 = real token; None = no padding)."""
        if self.pooling == "last":
            return self.token_scores(hidden[:, -1, :])
        scores = self.token_scores(hidden)
        if mask is not None:
            scores = scores.masked_fill(~mask.to(scores.device).bool(), -torch.inf)
        return self.tau * torch.logsumexp(scores / self.tau, dim=1)

    def probability(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self.scale * self.raw_scores(hidden, mask) + self.offset).float().cpu()

    # The output monitor's reading: the same smooth maximum, over the prompt and the answer written so far, kept
    # as a running log-sum-exp per row (one [batch, hidden] product per generated token, no extra pass).
    def running_start(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """The running state after the prompt ([batch]; None for "last" pooling, which has no running form)."""
        if self.pooling != "max":
            return None
        return self.raw_scores(hidden, mask).float() / self.tau

    def running_step(self, state: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold the newest token's state (hidden [batch, 1, hidden_size]) in: (new state, p(harmful) on the CPU)."""
        token = self.token_scores(hidden[:, -1, :]).float().to(state.device) / self.tau
        state = torch.logaddexp(state, token)
        return state, torch.sigmoid(self.scale * self.tau * state + self.offset).cpu()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"probe.weight": self.weight, "probe.mean": self.mean, "probe.std": self.std}

    def metadata(self) -> dict[str, Any]:
        return {"layer": self.layer, "bias": self.bias, "scale": self.scale, "offset": self.offset,
                "pooling": self.pooling, "tau": self.tau, "report": self.report}  # fmt: skip

    @classmethod
    def from_parts(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> HarmProbe:
        pooling = meta.get("pooling", "last")  # artifacts written before max pooling read the last token
        if pooling not in POOLINGS:
            raise ArtifactError(
                f"the artifact's harm probe uses pooling {pooling!r}, which this version does not know (it knows "
                f"{', '.join(POOLINGS)}); upgrade jailbreak-antidote, or add a new probe with `antidote probe`"
            )
        return cls(
            layer=int(meta["layer"]), weight=tensors["probe.weight"].float(), bias=float(meta["bias"]),
            mean=tensors["probe.mean"].float(), std=tensors["probe.std"].float(), scale=float(meta["scale"]),
            offset=float(meta["offset"]), pooling=pooling, tau=float(meta.get("tau", 1.0)),
            report=meta.get("report", {}),
        )  # fmt: skip


@dataclass(frozen=True)
class Wrapper:
    name: str
    family: str
    wrap: Callable[[str], str]


def training_wrappers(attack_names: Sequence[str]) -> list[Wrapper]:
    """The training attacks plus the probe-only wrappers."""
    from .eval.attacks import get_attacks
    from .probe_templates import WRAPPERS

    attacks = [Wrapper(a.name, a.family, a.transform) for a in get_attacks(list(attack_names))]
    return attacks + [Wrapper(f"wrapper-{i}", "probe-template", wrap) for i, wrap in enumerate(WRAPPERS)]


def attack_wrappers(attack_names: Sequence[str]) -> list[Wrapper]:
    from .eval.attacks import get_attacks

    return [Wrapper(a.name, a.family, a.transform) for a in get_attacks(list(attack_names))]


def _nested(outer: Wrapper, inner: Wrapper) -> Wrapper:
    return Wrapper(f"{outer.name}+{inner.name}", outer.family, lambda text: outer.wrap(inner.wrap(text)))


@dataclass
class ProbeData:
    prompts: list[str]
    labels: list[int]
    attacks: list[str]  # which template wrapped each prompt ("direct": none)
    families: list[str]


def augmented(
    harmful: Sequence[str],
    harmless: Sequence[str],
    wrappers: Sequence[Wrapper],
    per_goal: int,
    seed: int,
    nest_probability: float = 0.0,
) -> ProbeData:
    """Each instruction as it is, plus wrapped in `per_goal` wrappers drawn (seeded) from `wrappers`, each
    nested inside a second one with `nest_probability`; a pair's harmful and harmless sides get the same
    wrappers, so wrappers carry no label."""
    rng = random.Random(seed)
    data = ProbeData([], [], [], [])
    for bad, good in zip(harmful, harmless):
        chosen = [w if rng.random() >= nest_probability else _nested(rng.choice(wrappers), w)
                  for w in rng.sample(list(wrappers), min(per_goal, len(wrappers)))]  # fmt: skip
        for wrapper in [None, *chosen]:
            for text, label in ((bad, 1), (good, 0)):
                data.prompts.append(wrapper.wrap(text) if wrapper else text)
                data.labels.append(label)
                data.attacks.append(wrapper.name if wrapper else "direct")
                data.families.append(wrapper.family if wrapper else "none")
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


def against_direct_benign(scores: torch.Tensor, data: ProbeData) -> float:
    """AUROC of wrapped harmful prompts against plain harmless ones: jailbreaks among everyday traffic."""
    index = [i for i, (label, attack) in enumerate(zip(data.labels, data.attacks)) if (attack == "direct") != label]
    return round(auroc(scores[index], torch.tensor(data.labels)[index]), 4)


@dataclass
class _Packed:
    """Every prompt's token states at one layer, concatenated: features [tokens, hidden], segments [tokens]."""

    features: torch.Tensor
    segments: torch.Tensor
    count: int

    @classmethod
    def of(cls, states: Sequence[torch.Tensor], column: int) -> _Packed:
        lengths = torch.tensor([len(s) for s in states])
        features = torch.cat([s[:, column] for s in states]).float()
        return cls(features, torch.repeat_interleave(torch.arange(len(states)), lengths), len(states))


def train_max_pooled(
    packed: _Packed, labels: torch.Tensor, tau: float = 1.0, l2: float = 1e-3, steps: int = 300, lr: float = 0.01
) -> tuple[torch.Tensor, float]:
    """Logistic regression on the smooth maximum of per-token scores (multiple-instance learning);
    features standardised. Adam, full batch, a fixed number of steps (the loss is not smooth enough for
    L-BFGS' line search early on)."""
    weight = torch.zeros(packed.features.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    targets = labels.float()
    for _ in range(steps):
        optimizer.zero_grad()
        pooled = smooth_max(packed.features @ weight + bias, packed.segments, packed.count, tau)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(pooled, targets) + l2 * weight.square().sum()
        loss.backward()
        optimizer.step()
    return weight.detach(), float(bias.detach())


def candidate_layers(depth: int) -> list[int]:
    return sorted({min(depth - 1, round(depth * fraction)) for fraction in LAYER_FRACTIONS})


def fit_probe(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    per_goal: int = 8,
    validation_fraction: float = 0.3,
    train_attacks: Sequence[str] = PROBE_TRAIN_ATTACKS,
    validation_attacks: Sequence[str] = PROBE_VALIDATION_ATTACKS,
    seed: int = 0,
    batch_size: int = 16,
    system: str | None = None,
    tau: float = 1.0,
    progress: Any = None,
) -> HarmProbe:
    """Train on the training goals x training wrappers, choose the layer and calibrate on the other goals
    wrapped in the validation templates (never seen in training: neither the goal nor the template). The
    defaults leave the evaluation's `HELD_OUT_ATTACKS` out of both.

    Raises InvalidParameter when a template is both a training and a validation template."""
    check_pairs(list(harmful), list(harmless))
    if not 0 < validation_fraction < 1:
        raise InvalidParameter(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    if set(train_attacks) & set(validation_attacks):
        raise InvalidParameter("a template cannot be both a training and a validation template")
    depth = len(decoder_blocks(model))
    layers = candidate_layers(depth) if layers is None else list(layers)
    order = list(range(len(harmful)))
    random.Random(seed).shuffle(order)
    cut = int(len(order) * (1 - validation_fraction))
    if cut < 1 or cut == len(order):
        raise InvalidParameter(f"{len(order)} pairs cannot be split into training and validation goals")
    split = {"train": order[:cut], "validation": order[cut:]}
    train = augmented([harmful[i] for i in split["train"]], [harmless[i] for i in split["train"]],
                      training_wrappers(train_attacks), per_goal, seed, NEST_PROBABILITY)  # fmt: skip
    valid = augmented([harmful[i] for i in split["validation"]], [harmless[i] for i in split["validation"]],
                      attack_wrappers(validation_attacks), len(validation_attacks), seed + 1)  # fmt: skip
    states = prompt_token_states(
        model, tokenizer, train.prompts + valid.prompts, layers, system=system, batch_size=batch_size,
        progress=progress, description="probe forward passes",
        names=[f"{kind} prompt {i + 1}, as wrapped for the probe ({describe(p)})"
               for kind, prompts in (("training", train.prompts), ("validation", valid.prompts))
               for i, p in enumerate(prompts)],
        fix="the probe wraps each calibration prompt in jailbreak templates; use shorter calibration prompts or a "
        "model with a longer context",
    )  # fmt: skip
    train_states, valid_states = states[: len(train.prompts)], states[len(train.prompts) :]
    y_train, y_valid = torch.tensor(train.labels), torch.tensor(valid.labels)
    candidates: dict[int, tuple[HarmProbe, torch.Tensor]] = {}
    task = progress.add_task("probe training", total=len(layers)) if progress is not None else None
    for column, layer in enumerate(layers):
        packed = _Packed.of(train_states, column)
        mean, std = packed.features.mean(0), packed.features.std(0).clamp_min(1e-4)
        packed.features = (packed.features - mean) / std
        weight, bias = train_max_pooled(packed, y_train, tau=tau)
        probe = HarmProbe(layer, weight, bias, mean, std, tau=tau)
        valid_packed = _Packed.of(valid_states, column)
        raw = smooth_max(probe.token_scores(valid_packed.features), valid_packed.segments, valid_packed.count, tau)
        candidates[layer] = (probe, raw)
        if progress is not None and task is not None:
            progress.advance(task)
    layer_auroc = {str(layer): round(auroc(raw, y_valid), 4) for layer, (_, raw) in candidates.items()}
    best = max(layers, key=lambda layer: layer_auroc[str(layer)])
    probe, raw = candidates[best]
    probe.scale, probe.offset = _platt(raw, y_valid)
    probe.report = {
        "validation_auroc": layer_auroc[str(best)],
        "validation_auroc_per_layer": layer_auroc,
        "validation_auroc_per_attack": per_group_auroc(raw, valid, valid.attacks),
        "validation_auroc_per_family": per_group_auroc(raw, valid, valid.families),
        "validation_auroc_attacks_vs_plain_benign": against_direct_benign(raw, valid),
        "pooling": "max",
        "train_attacks": list(train_attacks),
        "probe_only_wrappers": len(training_wrappers(train_attacks)) - len(train_attacks),
        "validation_attacks": list(validation_attacks),
        "n_train": len(train.prompts),
        "n_validation": len(valid.prompts),
        "seed": seed,
    }
    return probe


def _platt(raw: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Fit p = sigmoid(a * raw + b) on validation scores, so that the probability is calibrated."""
    weight, bias = train_logistic(raw.unsqueeze(1), labels, l2=0.0)
    return float(weight[0]), bias
