"""Fit methods beyond the paper's (METHOD.md, "Fit methods"): the data they need and their linear algebra.

- null_space (after AlphaSteer, Sheng et al., ICLR 2026, github.com/AlphaLab-USTC/AlphaSteer,
  src/utils/steering_utils.py): the direction is the harmful-minus-harmless mean difference; a *readout* w
  per layer makes the strength input-dependent. AlphaSteer's steering matrix is S = P @ D, P projecting onto
  the low-variance (approximate null) space of benign activations and D the ridge solution of
  ||H_harmful P D - 1 r^T||^2 + lambda ||P D||^2. Because that target has rank one, D = u r^T and
  h @ S = (h . P u) r: a scalar readout times the refusal vector. We store the readout w = P u (target 1, so
  alpha keeps the paper's scale) instead of a [hidden, hidden] matrix per layer; the added vector is
  alpha * (h . w) * v, near zero for prompts like the benign ones by construction.
- jailbreak_diff: the direction is the mean of plain harmful prompts minus the mean of the same prompts
  wrapped in jailbreak templates (the "jailbreak vector" contrast of Ball et al., 2024, arXiv 2406.09289,
  read with the opposite sign): steering adds back what the wrapper takes away.

Both read harmful *and* harmless prompts wrapped in the built-in training attacks (`probe.TRAIN_ATTACKS`);
the held-out attacks (`probe.HELD_OUT_ATTACKS`) are never used, so evaluations on them stay held out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import InvalidParameter

WRAPPED_METHODS = ("null_space", "jailbreak_diff")
NULL_SPACE_RATIO = 0.6  # AlphaSteer's most common setting (const.py: 0.3 to 0.6 per layer)
RIDGE = 1.0  # lambda relative to the mean diagonal of X^T X (AlphaSteer: 10, absolute, for 8B models)
WRAPS_PER_PROMPT = 2


@dataclass
class WrappedPrompts:
    """Each calibration pair plain and wrapped: prompts[i] belongs to pair[i], is harmful if label[i]."""

    prompts: list[str]
    labels: list[int]
    pairs: list[int]
    wrapped: list[bool]
    per_prompt: int


def wrapped_calibration(
    harmful: Sequence[str],
    harmless: Sequence[str],
    attacks: Sequence[str],
    seed: int,
    per_prompt: int = WRAPS_PER_PROMPT,
) -> WrappedPrompts:
    """Every pair plain, plus wrapped in `per_prompt` of `attacks` (drawn per pair, seeded); both members of a
    pair get the same wrappers, so a wrapper carries no label."""
    from .probe import attack_wrappers, augmented

    data = augmented(harmful, harmless, attack_wrappers(attacks), per_prompt, seed)
    pairs = [i // (2 * (per_prompt + 1)) for i in range(len(data.prompts))]
    return WrappedPrompts(data.prompts, data.labels, pairs, [a != "direct" for a in data.attacks], per_prompt)


def null_space_basis(benign: torch.Tensor, ratio: float) -> torch.Tensor:
    """[hidden, m] orthonormal basis of the m = int(ratio * hidden) directions along which the benign states
    ([n, hidden], uncentred as in AlphaSteer) vary least."""
    if not 0 < ratio < 1:
        raise InvalidParameter(f"null-space ratio must be in (0, 1), got {ratio}")
    hidden = benign.shape[1]
    keep = max(1, int(ratio * hidden))
    gram = benign.double().T @ benign.double()
    _values, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues
    return vectors[:, :keep]


def null_space_readout(benign: torch.Tensor, harmful: torch.Tensor, ratio: float, ridge: float) -> torch.Tensor:
    """w [hidden] in the benign null space with harmful . w close to 1: argmin over w = Q c of
    ||harmful Q c - 1||^2 + lambda ||c||^2, lambda = ridge * mean diagonal of (harmful Q)^T (harmful Q)."""
    if not ridge > 0:
        raise InvalidParameter(f"ridge must be positive, got {ridge}")
    basis = null_space_basis(benign, ratio)
    x = harmful.double() @ basis  # [n, m]
    gram = x.T @ x
    lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
    coef = torch.linalg.solve(
        gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), x.T @ torch.ones(len(x), 1, dtype=x.dtype)
    )
    return (basis @ coef).squeeze(1).float()


def null_space_readouts(
    states: torch.Tensor, labels: torch.Tensor, ratio: float = NULL_SPACE_RATIO, ridge: float = RIDGE
) -> torch.Tensor:
    """Per layer readouts [layers, hidden] from states [n, layers, hidden] with labels [n] (1 = harmful)."""
    harmful, benign = states[labels == 1], states[labels == 0]
    if len(harmful) < 2 or len(benign) < 2:
        raise InvalidParameter("the null_space method needs at least 2 harmful and 2 harmless prompts")
    return torch.stack([null_space_readout(benign[:, i], harmful[:, i], ratio, ridge) for i in range(states.shape[1])])
