"""Fit an antidote (METHOD.md section 2): directions, sign, layer scores and selection, sparse masks.

The suggested alpha is derived from the model's own statistics (see `suggest_alpha`), not hard-coded.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import bundled
from .activations import last_token_states
from .antidote import SELECTORS, Antidote, check_k, sparse_mask
from .blocks import decoder_blocks
from .context import describe
from .errors import AntidoteError, InvalidParameter
from .fit_methods import (
    NULL_SPACE_RATIO,
    RIDGE,
    WRAPPED_METHODS,
    WrappedPrompts,
    null_space_readouts,
    wrapped_calibration,
)
from .models import model_identity, weights_digest
from .probe import TRAIN_ATTACKS
from .prompts import builtin_calibration, check_pairs

METHODS = ("pca", "mean_diff", "null_space", "jailbreak_diff")
# The suggested alpha closes this fraction of the harmful-harmless projection gap (see suggest_alpha).
GAP_FRACTION = 0.5


def _package_version() -> str:
    try:
        return version("jailbreak-antidote")
    except PackageNotFoundError:
        return "unknown"


def check_layer_top_p(layer_top_p: float, name: str = "layer_top_p") -> float:
    if not 0 < layer_top_p <= 1:
        raise InvalidParameter(f"{name} must be in (0, 1] (fraction of layers kept), got {layer_top_p}")
    return layer_top_p


def directions_from_differences(diffs: torch.Tensor, method: str) -> torch.Tensor:
    """Unit directions [layers, hidden] from paired differences diffs [pairs, layers, hidden].

    pca: the first right singular vector of the *uncentred* differences (centring would erase the
    signal, since every pair has the same harmful-minus-harmless order). mean_diff: their mean.
    Both are oriented so the mean difference projects positively (harmful projects higher).
    """
    mean = diffs.mean(dim=0)
    if method == "pca":
        per_layer = diffs.transpose(0, 1).double()  # [layers, pairs, hidden]
        _, _, vh = torch.linalg.svd(per_layer, full_matrices=False)
        direction = vh[:, 0, :].float()
    elif method == "mean_diff":
        direction = mean.clone()
    else:
        raise InvalidParameter(f"method must be pca or mean_diff, got {method!r}")
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sign = torch.sign((direction * mean).sum(dim=1))
    sign[sign == 0] = 1
    return direction * sign[:, None]


def paired_accuracy(
    harmful: torch.Tensor, harmless: torch.Tensor, direction: torch.Tensor, readouts: torch.Tensor | None = None
) -> torch.Tensor:
    """Per layer: fraction of pairs whose harmful member projects higher than its harmless partner (onto the
    readout instead of the direction, where the method has one: that is what decides its strength)."""
    read = direction if readouts is None else readouts
    diff = ((harmful - harmless) * read[None]).sum(dim=-1)  # [pairs, layers]
    return (diff > 0).float().mean(dim=0)


def separation(
    harmful: torch.Tensor, harmless: torch.Tensor, direction: torch.Tensor, readouts: torch.Tensor | None = None
) -> torch.Tensor:
    """Per layer: projection gap between the classes in units of their pooled standard deviation (onto the
    readout where there is one)."""
    read = direction if readouts is None else readouts
    pos = (harmful * read[None]).sum(dim=-1)
    neg = (harmless * read[None]).sum(dim=-1)
    pooled = ((pos.var(dim=0) + neg.var(dim=0)) / 2).sqrt().clamp_min(1e-6)
    return (pos.mean(dim=0) - neg.mean(dim=0)) / pooled


def suggest_alpha(
    directions: torch.Tensor, masks: torch.Tensor, layers: list[int], gaps: torch.Tensor
) -> dict[str, object]:
    """Suggested alpha from the model's own statistics.

    Steering adds alpha * v_j (v_j = d_j * m_j) after every selected block j, and what is added stays in
    the residual stream, so at selected layer l the projection onto d_l moves by about
    alpha * c_l with c_l = sum over selected j <= l of v_j . d_l (ignoring the blocks' own response).
    alpha_close_l = gap_l / c_l would move a harmless-looking prompt all the way to the harmful class
    mean at layer l. The suggestion is GAP_FRACTION of the median alpha_close over selected layers; the
    range spans a quarter to twice that (from a light touch to where over-refusal sets in).
    """
    vectors = directions * masks
    order = sorted(range(len(layers)), key=lambda i: layers[i])
    closes = []
    for pos, i in enumerate(order):
        cumulative = vectors[[order[j] for j in range(pos + 1)]].sum(dim=0)
        shift = float(cumulative @ directions[i])
        if shift > 0 and float(gaps[i]) > 0:
            closes.append(float(gaps[i]) / shift)
    if not closes:
        raise InvalidParameter("cannot suggest an alpha: no selected layer separates the two prompt sets")
    close = float(torch.tensor(closes).median())
    suggested = GAP_FRACTION * close
    return {
        "suggested": round(suggested, 4),
        "range": [round(suggested / 4, 4), round(suggested * 2, 4)],
        "alpha_close_median": round(close, 4),
        "how": f"{GAP_FRACTION} x median over selected layers of (class projection gap) / (projection of "
        "the accumulated steering vectors per unit alpha); range: 1/4x to 2x the suggestion",
    }


def fit_antidote(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    k: float = 0.05,
    layer_top_p: float = 0.9,
    method: str = "pca",
    selector: str = "top",
    val_fraction: float = 0.25,
    seed: int = 0,
    system: str | None = None,
    batch_size: int = 16,
    show_progress: bool = False,
    source: str = "custom",
    null_space_ratio: float = NULL_SPACE_RATIO,
    ridge: float = RIDGE,
) -> Antidote:
    """Fit an antidote from paired prompts: harmful[i] is matched with harmless[i].

    Works for any concept: 'harmful' is the side that +alpha pushes towards. Methods (METHOD.md): pca and
    mean_diff (the paper); null_space and jailbreak_diff (fit_methods.py) also read every pair wrapped in
    the built-in training attacks. Raises InvalidParameter for an unknown method or too few pairs.
    """
    check_k(k)
    check_layer_top_p(layer_top_p)
    if method not in METHODS:
        raise InvalidParameter(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if selector not in SELECTORS:
        raise InvalidParameter(f"selector must be one of {SELECTORS}, got {selector!r}")
    if not 0 < val_fraction < 1:
        raise InvalidParameter(f"val_fraction must be in (0, 1), got {val_fraction}")
    harmful, harmless = list(harmful), list(harmless)
    check_pairs(harmful, harmless)

    started = time.perf_counter()
    candidates = list(range(1, len(decoder_blocks(model))))  # block 0 is never steered
    if not candidates:
        raise InvalidParameter("the model has a single decoder block; the antidote needs at least two")
    if method in WRAPPED_METHODS:
        calibration = wrapped_calibration(harmful, harmless, TRAIN_ATTACKS, seed)
        prompts = calibration.prompts
        names = [f"calibration prompt {i + 1} ({describe(p)})" for i, p in enumerate(prompts)]
    else:
        prompts = harmful + harmless
        names = [f"harmful prompt {i + 1} ({describe(p)})" for i, p in enumerate(harmful)] + [
            f"harmless prompt {i + 1} ({describe(p)})" for i, p in enumerate(harmless)
        ]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not show_progress, transient=True, console=Console(stderr=True)) as progress:
        states = last_token_states(model, tokenizer, prompts, candidates, system=system, batch_size=batch_size,
                                   progress=progress, description="reading hidden states", names=names)  # fmt: skip

    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(harmful), generator=generator)
    n_val = max(2, round(val_fraction * len(harmful)))
    val, train = perm[:n_val], perm[n_val:]
    readouts = None
    if method in WRAPPED_METHODS:
        fitted = _wrapped_directions(states, calibration, train, val, method, null_space_ratio, ridge)
        directions, readouts, pos, neg, val_pos, val_neg, extra = fitted
    else:
        pos, neg = states[: len(harmful)], states[len(harmful) :]
        directions = directions_from_differences(pos[train] - neg[train], method)
        val_pos, val_neg = pos[val], neg[val]
        other = "mean_diff" if method == "pca" else "pca"
        other_directions = directions_from_differences(pos[train] - neg[train], other)
        extra = {
            "method_accuracy_mean": {other: round(float(paired_accuracy(val_pos, val_neg, other_directions).mean()), 4)}
        }
    accuracy = paired_accuracy(val_pos, val_neg, directions, readouts)
    val_separation = separation(val_pos, val_neg, directions, readouts)
    extra.setdefault("method_accuracy_mean", {})[method] = round(float(accuracy.mean()), 4)

    n_keep = max(1, round(layer_top_p * len(candidates)))
    ranking = sorted(range(len(candidates)), key=lambda i: (-float(accuracy[i]), -float(val_separation[i])))
    chosen = sorted(ranking[:n_keep])
    layers = [candidates[i] for i in chosen]
    chosen_dirs = directions[chosen]
    masks = torch.stack([sparse_mask(d, k, selector, seed + layer) for d, layer in zip(chosen_dirs, layers)])

    proj_pos = (pos * directions[None]).sum(-1)  # [prompts, candidates]
    proj_neg = (neg * directions[None]).sum(-1)
    gaps = proj_pos.mean(0) - proj_neg.mean(0)
    # Readouts are fitted to read 1 on harmful prompts, so per unit alpha a harmful prompt moves as with a
    # fixed antidote: the same suggestion applies.
    alpha = suggest_alpha(chosen_dirs, masks, layers, gaps[chosen])

    def per_layer(values: torch.Tensor, digits: int = 4) -> dict[str, float]:
        return {str(layer): round(float(v), digits) for layer, v in zip(candidates, values)}

    stats = {
        "layer_accuracy": per_layer(accuracy),
        "layer_separation": per_layer(val_separation),
        **{key: value for key, value in extra.items() if key != "per_layer"},
        **{key: per_layer(value) for key, value in extra.get("per_layer", {}).items()},
        "harmful_projection_mean": per_layer(proj_pos.mean(0)),
        "harmful_projection_std": per_layer(proj_pos.std(0)),
        "harmless_projection_mean": per_layer(proj_neg.mean(0)),
        "harmless_projection_std": per_layer(proj_neg.std(0)),
        "residual_norm_mean": per_layer(states.norm(dim=-1).mean(0)),
        "n_train_pairs": len(train),
        "n_val_pairs": len(val),
    }
    provenance = {
        "calibration": source,
        "n_pairs": len(harmful),
        "layer_top_p": layer_top_p,
        "val_fraction": val_fraction,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "package_version": _package_version(),
        "fit_seconds": round(time.perf_counter() - started, 2),
    }
    if method in WRAPPED_METHODS:
        provenance["wrapped_in"] = {"attacks": list(TRAIN_ATTACKS), "per_prompt": calibration.per_prompt}
    if method == "null_space":
        provenance["null_space"] = {"ratio": null_space_ratio, "ridge": ridge}
    return Antidote(
        layers=layers,
        directions=chosen_dirs.contiguous(),
        masks=masks,
        k=float(k),
        selector=selector,
        method=method,
        seed=seed,
        model=model_identity(model),
        alpha=alpha,
        stats=stats,
        chat={
            "system": system,
            "template": "chat_template" if getattr(tokenizer, "chat_template", None) else "plain",
        },
        provenance=provenance,
        readouts=None if readouts is None else readouts[chosen].contiguous(),
    )


def _wrapped_directions(
    states: torch.Tensor,
    calibration: WrappedPrompts,
    train: torch.Tensor,
    val: torch.Tensor,
    method: str,
    null_space_ratio: float,
    ridge: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Directions (and readouts) of the wrapped methods, fitted on the training pairs' prompts only, with what
    the layer ranking compares on the validation pairs: (directions, readouts, pos, neg, val_pos, val_neg,
    extra stats). null_space: harmful vs harmless prompts, plain and wrapped alike; jailbreak_diff: plain
    harmful prompts vs the same prompts wrapped."""
    labels = torch.tensor(calibration.labels)
    pairs = torch.tensor(calibration.pairs)
    wrapped = torch.tensor(calibration.wrapped)
    in_train = torch.isin(pairs, train)
    in_val = torch.isin(pairs, val)
    harmful = labels == 1
    if method == "null_space":
        plain = ~wrapped
        pos, neg = states[harmful & plain & in_train], states[~harmful & plain & in_train]
        directions = directions_from_differences(pos - neg, "mean_diff")
        readouts = null_space_readouts(states[in_train], labels[in_train], null_space_ratio, ridge)
        val_pos, val_neg = states[harmful & in_val], states[~harmful & in_val]  # paired: same order both sides
        scores = {
            "harmful": (val_pos * readouts[None]).sum(-1).mean(0),
            "harmless": (val_neg * readouts[None]).sum(-1).mean(0),
        }
        extra = {"per_layer": {"readout_harmful_mean": scores["harmful"], "readout_harmless_mean": scores["harmless"]}}
        return directions, readouts, pos, neg, val_pos, val_neg, extra
    # jailbreak_diff: each wrapped harmful prompt against its own plain version
    plain_of = {int(p): i for i, p in enumerate(pairs.tolist()) if harmful[i] and not wrapped[i]}
    index = [i for i in range(len(pairs)) if harmful[i] and wrapped[i]]
    plain_rows = torch.tensor([plain_of[int(pairs[i])] for i in index])
    wrapped_rows = torch.tensor(index)
    train_rows = torch.isin(pairs[wrapped_rows], train)
    pos, neg = states[plain_rows[train_rows]], states[wrapped_rows[train_rows]]
    directions = directions_from_differences(pos - neg, "mean_diff")
    val_rows = torch.isin(pairs[wrapped_rows], val)
    return directions, None, pos, neg, states[plain_rows[val_rows]], states[wrapped_rows[val_rows]], {}


def builtin_antidote(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, model_name: str, log: Callable[[str], None] = print
) -> Antidote:
    """An antidote fitted on the built-in calibration set, cached per model weights and calibration data
    (the demo and the server use it when no .antidote file is given)."""
    calibration = builtin_calibration()
    key = hashlib.sha256(
        json.dumps([weights_digest(model), calibration.harmful, calibration.harmless]).encode()
    ).hexdigest()[:16]
    path = bundled.cache_root() / "antidotes" / f"{Path(model_name).name}-builtin-{key}.antidote"
    if path.is_file():
        try:
            log(f"reusing cached antidote {path}")
            return Antidote.load(path, model=model)
        except AntidoteError as exc:
            log(f"cached antidote unusable ({exc}); refitting")
    log("fitting an antidote on the built-in calibration set (once; cached afterwards)")
    antidote = fit_antidote(
        model, tokenizer, calibration.harmful, calibration.harmless, show_progress=True, source="builtin"
    )
    antidote.save(path)
    return antidote
