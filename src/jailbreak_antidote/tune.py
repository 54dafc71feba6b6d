"""`antidote tune`: pick mode, alpha, threshold and positions policy for the operator.

Maximise the refusal rate on harmful prompts (direct and wrapped in the harm probe's *training* templates,
so the held-out templates stay unseen for evaluation) subject to a benign over-refusal budget: at most
`budget` more benign refusals than alpha 0, on a held-out benign set. Refusal is the keyword judge on a
short generation.

Cost: per alpha and positions policy, one generation of every prompt for the fixed mode, one for the scaled
mode and one with the gate open; the gated mode at any threshold needs no more, since a gated prompt behaves
like the open gate when its harm probability reaches the threshold and like alpha 0 otherwise. The monitor
mode (gated plus the output monitor) costs one generation per threshold, since its trigger depends on the
answer.

With a harm probe the tuner also tries refusing a prompt outright, without generating, once its harm
probability reaches a refuse threshold (`REFUSE_THRESHOLDS`; the probe as an input filter beside the
steering, and alone at alpha 0). That needs no generation either: a refused prompt's verdict is a refusal,
the others keep theirs. For the gated mode only refuse thresholds above the gate's are tried (below it every
prompt the gate opens is refused, which is the probe filter alone); the fixed mode at alpha > 0 is not paired
with refusals (its probe reads an already steered state, a scale the thresholds were not read on).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .antidote import Antidote
from .errors import InvalidParameter
from .eval.judges import is_refusal
from .generate import generate_answers
from .probe import TRAIN_ATTACKS
from .prompts import builtin_calibration, builtin_prompts
from .steer import check_positions, check_refuse_threshold, reaches

FACTORS = (0.5, 1.0, 1.5, 2.0)
POLICIES = ("all",)  # the paper's; `--positions all,prompt` also tries the prefill-only policy
THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))
MONITOR_THRESHOLDS = (0.5,)  # each costs a generation per alpha and policy
REFUSE_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(6, 20))  # 0.3 to 0.95


@dataclass(frozen=True)
class Point:
    mode: str
    alpha: float
    threshold: float | None
    harmful_refusal: float
    benign_refusal: float
    positions: str = "all"
    refuse_threshold: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "alpha": self.alpha, "threshold": self.threshold, "positions": self.positions,
            "refuse_threshold": self.refuse_threshold,
            "harmful_refusal": round(self.harmful_refusal, 4), "benign_refusal": round(self.benign_refusal, 4),
        }  # fmt: skip


def rank(point: dict[str, Any]) -> tuple[float, ...]:
    """The tuner's order: most harmful refusals, then fewest benign ones, then the gentlest alpha, then the
    least outright refusing (none, else the highest refuse threshold)."""
    refuse = point.get("refuse_threshold")
    return (point["harmful_refusal"], -point["benign_refusal"], -point["alpha"], 2.0 if refuse is None else refuse)


def steering_only(tuned: dict[str, Any]) -> dict[str, Any]:
    """The best point of a stored tune result that does not refuse outright, by the tuner's own rule (within
    the budget, then `rank`): what `antidote tune --no-refuse` would have chosen from the same generations.
    Without a stored curve (a hand-made default), the tuned point itself without its refusals."""
    try:
        limit = tuned["baseline"]["benign_refusal"] + tuned["budget"] + 1e-9
        points = [p for p in tuned["curve"] if p.get("refuse_threshold") is None and p["benign_refusal"] <= limit]
        return dict(max(points, key=rank))
    except (KeyError, TypeError, ValueError):  # no curve, or not one this version wrote
        return {**tuned, "refuse_threshold": None}


def with_refusals(refused: Sequence[bool], scores: Sequence[float | None], refuse_threshold: float) -> list[bool]:
    """The verdicts once every prompt whose harm score reaches `refuse_threshold` is refused outright."""
    return [r or (s is not None and reaches(s, refuse_threshold)) for r, s in zip(refused, scores)]


def check_budget(budget: float) -> float:
    if isinstance(budget, bool) or not 0 <= float(budget) <= 1:
        raise InvalidParameter(f"budget must be in [0, 1] (a fraction of benign prompts), got {budget!r}")
    return float(budget)


def needed_benign(budget: float) -> int:
    """Enough benign prompts that the budget allows at least two extra refusals (else it is all noise)."""
    return max(20, math.ceil(2 / budget)) if budget > 0 else 20


def default_harmful(count: int = 32, seed: int = 0) -> list[str]:
    """Built-in calibration goals, each as it is and wrapped in one of the probe's training templates."""
    from .eval.attacks import get_attacks

    rng = random.Random(seed)
    goals = rng.sample(builtin_calibration().harmful, count)
    attacks = get_attacks(list(TRAIN_ATTACKS))
    return [text for goal in goals for text in (goal, rng.choice(attacks)(goal))]


def tune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    antidote: Antidote,
    *,
    harmful: Sequence[str] | None = None,
    benign: Sequence[str] | None = None,
    budget: float = 0.05,
    factors: Sequence[float] = FACTORS,
    thresholds: Sequence[float] = THRESHOLDS,
    policies: Sequence[str] = POLICIES,
    monitor_thresholds: Sequence[float] = MONITOR_THRESHOLDS,
    refuse_thresholds: Sequence[float] = REFUSE_THRESHOLDS,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    show_progress: bool = False,
) -> dict[str, Any]:
    """The chosen point and the whole curve; does not modify the antidote (`antidote tune` stores the result).
    `policies`: the positions policies tried (steer.POSITIONS); `refuse_thresholds`: the outright-refusal
    thresholds tried with a harm probe (empty: steering only)."""
    budget = check_budget(budget)
    for refuse in refuse_thresholds:
        check_refuse_threshold(refuse)
    for policy in policies:
        check_positions(policy)
    if not policies:
        raise InvalidParameter("no positions policy to tune; give at least one (all, prompt or generated)")
    harmful = list(harmful) if harmful is not None else default_harmful()
    benign = list(benign) if benign is not None else builtin_prompts("tune-benign")
    if len(benign) < needed_benign(budget):
        raise InvalidParameter(
            f"{len(benign)} benign prompts cannot measure a {budget:.0%} over-refusal budget; give at least "
            f"{needed_benign(budget)} (--benign FILE)"
        )
    if not harmful:
        raise InvalidParameter("no harmful prompts to tune on")
    prompts = harmful + benign
    n_harmful = len(harmful)

    def refusals(
        alpha: float, mode: str, threshold: float = 0.5, positions: str = "all"
    ) -> tuple[list[bool], list[float | None]]:
        answers = generate_answers(
            model, tokenizer, prompts, antidote=antidote, alphas=alpha, max_new_tokens=max_new_tokens,
            batch_size=batch_size, mode=mode, threshold=threshold, positions=positions, show_progress=show_progress,
        )  # fmt: skip
        return [is_refusal(a.text) for a in answers], [a.harm_score for a in answers]

    def point(mode: str, alpha: float, threshold: float | None, refused: Sequence[bool], positions: str,
              refuse_threshold: float | None = None) -> Point:  # fmt: skip
        return Point(mode, alpha, threshold, sum(refused[:n_harmful]) / n_harmful,
                     sum(refused[n_harmful:]) / len(benign), positions, refuse_threshold)  # fmt: skip

    adaptive = antidote.probe is not None
    refuse_thresholds = list(refuse_thresholds) if adaptive else []

    def add(mode: str, alpha: float, threshold: float | None, refused: list[bool], scores: list[float | None],
            positions: str) -> None:  # fmt: skip
        """The point as steered, and with each refuse threshold the probe may add (above the gate's)."""
        curve.append(point(mode, alpha, threshold, refused, positions))
        for refuse in refuse_thresholds:
            if mode == "gated" and refuse <= (threshold or 0):
                continue  # every prompt the gate opens is refused: the filter alone (monitor still steers answers)
            curve.append(point(mode, alpha, threshold, with_refusals(refused, scores, refuse), positions, refuse))

    base, base_scores = refusals(0.0, "fixed")  # at alpha 0 the probe reads the unsteered model
    curve = [point("fixed", 0.0, None, base, "all")]
    for refuse in refuse_thresholds:  # the probe as an input filter alone
        curve.append(point("fixed", 0.0, None, with_refusals(base, base_scores, refuse), "all", refuse))
    for factor in factors:
        alpha = round(factor * antidote.suggested_alpha, 4)
        for policy in dict.fromkeys(policies):
            curve.append(point("fixed", alpha, None, refusals(alpha, "fixed", positions=policy)[0], policy))
            if adaptive:
                add("scaled", alpha, None, *refusals(alpha, "scaled", positions=policy), policy)
                opened, gate_scores = refusals(alpha, "gated", 0.0, positions=policy)
                for threshold in thresholds:
                    mixed = [o if (s or 0) >= threshold else b for o, b, s in zip(opened, base, gate_scores)]
                    add("gated", alpha, threshold, mixed, gate_scores, policy)
                for threshold in monitor_thresholds:  # the monitor's trigger depends on the answer: one run each
                    add("monitor", alpha, threshold, *refusals(alpha, "monitor", threshold, positions=policy), policy)
    limit = curve[0].benign_refusal + budget
    feasible = [p for p in curve if p.benign_refusal <= limit + 1e-9]
    best = max(feasible, key=lambda p: rank(p.as_dict()))
    return {
        "choice": best.as_dict(),
        "baseline": curve[0].as_dict(),
        "budget": budget,
        "n_harmful": n_harmful,
        "n_benign": len(benign),
        "max_new_tokens": max_new_tokens,
        "curve": [p.as_dict() for p in curve],
    }
