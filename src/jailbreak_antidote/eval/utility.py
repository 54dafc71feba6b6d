"""Utility metrics: how much a defense costs benign users.

- benign compliance: share of benign prompts answered (keyword judge) under a defense;
- next-token KL at the last prompt token versus alpha 0 (steered defenses), on benign prompts;
- mean per-token negative log-likelihood of the undefended model's own benign answers under the
  defended model (how much the defense changes what the model would have said).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..antidote import Antidote
from ..context import check_batch, describe, prompt_names
from ..models import encode_prompts, render_prompt, with_positions


def _maybe_steered(antidote: Antidote | None, model: PreTrainedModel, alpha: float, mode: str, threshold: float):
    if antidote is None:
        return contextlib.nullcontext()
    return antidote.maybe_applied(model, alpha, mode, threshold)


@torch.no_grad()
def next_token_kl(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    antidote: Antidote,
    alpha: float,
    batch_size: int = 16,
    mode: str = "fixed",
    threshold: float = 0.5,
) -> float:
    """Mean KL(p_0 || p_alpha) of the next-token distribution at the last prompt token (gated / scaled
    modes: with each prompt's own gate)."""
    total, count = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        batch = encode_prompts(tokenizer, chunk)
        check_batch(model, batch, prompt_names(chunk, range(start, start + len(chunk))))
        batch = with_positions(batch)
        base = torch.log_softmax(model(**batch, logits_to_keep=1).logits[:, -1].float(), dim=-1)
        with _maybe_steered(antidote, model, alpha, mode, threshold):
            steered = torch.log_softmax(model(**batch, logits_to_keep=1).logits[:, -1].float(), dim=-1)
        total += float((base.exp() * (base - steered)).sum(-1).sum())
        count += base.shape[0]
    return total / max(1, count)


@torch.no_grad()
def answer_nll(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    antidote: Antidote | None,
    alpha: float,
    batch_size: int = 8,
    mode: str = "fixed",
    threshold: float = 0.5,
) -> float:
    """Mean per-token NLL of `answers` (the undefended model's own) given their prompts, under steering.
    In gated / scaled modes prompt and answer go through in one pass, so the probe reads both."""
    total, tokens = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        texts, answer_lengths, names = [], [], []
        for number, prompt, answer in zip(
            range(start, len(prompts)), prompts[start : start + batch_size], answers[start : start + batch_size]
        ):
            ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
            if not ids:
                continue
            texts.append(render_prompt(tokenizer, prompt) + answer)
            answer_lengths.append(len(ids))
            names.append(f"prompt {number + 1} with its answer ({describe(prompt)})")
        if not texts:
            continue
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        check_batch(model, encoded, names)
        encoded = with_positions(encoded)
        with _maybe_steered(antidote, model, alpha, mode, threshold):
            logits = model(**encoded, logits_to_keep=max(answer_lengths) + 1).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
        for row, n in enumerate(answer_lengths):
            targets = encoded["input_ids"][row, -n:]
            total -= float(logprobs[row, -n - 1 : -1].gather(-1, targets[:, None]).sum())
            tokens += n
    return total / max(1, tokens)
