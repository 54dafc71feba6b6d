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
from ..context import check_batch, check_token_ids, context_length, prompt_names
from ..models import encode_prompts, prompt_token_ids, with_positions


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
    In gated / scaled modes prompt and answer go through in one pass, so the probe reads both.

    The answer is scored as its own tokens after the prompt's; an answer that would run past the model's
    context (re-tokenised text can be longer than what was generated) is scored up to the context's end."""
    limit = context_length(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, tokens = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        prompt_ids = prompt_token_ids(tokenizer, chunk)
        check_token_ids(model, prompt_ids, prompt_names(chunk, range(start, start + len(chunk))), new_tokens=1)
        rows, answer_lengths = [], []
        for ids, answer in zip(prompt_ids, answers[start : start + batch_size]):
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
            if limit is not None:
                answer_ids = answer_ids[: limit - len(ids)]
            if answer_ids:
                rows.append(ids + answer_ids)
                answer_lengths.append(len(answer_ids))
        if not rows:
            continue
        width = max(len(row) for row in rows)
        input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows])  # left padding
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
        encoded = with_positions({"input_ids": input_ids, "attention_mask": mask})
        with _maybe_steered(antidote, model, alpha, mode, threshold):
            logits = model(**encoded, logits_to_keep=max(answer_lengths) + 1).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
        for row, n in enumerate(answer_lengths):
            targets = input_ids[row, -n:]
            total -= float(logprobs[row, -n - 1 : -1].gather(-1, targets[:, None]).sum())
            tokens += n
    return total / max(1, tokens)
