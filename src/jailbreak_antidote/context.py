"""Check token sequences against what the model can read: its context length and its vocabulary.

Past its position table a GPT-2-style model dies with a bare `IndexError` from an embedding lookup, and a
rotary model silently reads positions it was never trained on; a token id past the embedding matrix (a
tokenizer that does not match the model) fails the same way. Every path that runs the model checks first
and raises a ContextLengthError or InvalidParameter naming the prompt, its length and the limit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import ContextLengthError, InvalidParameter

# Config attributes that hold the longest sequence a model was built for, most common first.
_CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def context_length(model: object) -> int | None:
    """Positions the model can read (prompt plus generated tokens), or None where nothing says.

    A LlamaCppModel gives its context's `n_ctx`; a transformers model the first of its config's
    max_position_embeddings (GPT-2: n_positions), max_sequence_length, seq_length or n_ctx."""
    own = getattr(model, "context_length", None)
    if isinstance(own, int):
        return own
    config = getattr(model, "config", None)
    for name in _CONTEXT_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def vocabulary_size(model: object) -> int | None:
    """Rows of the input embedding matrix: token ids must be below this."""
    embeddings = getattr(model, "get_input_embeddings", None)
    if embeddings is None:
        return None
    return int(embeddings().weight.shape[0])


def describe(prompt: object, width: int = 50) -> str:
    """A short quote of a prompt (a string, or the last message of a conversation) for error messages."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        prompt = prompt[-1].get("content", "")
    text = " ".join(str(prompt).split())
    return repr(text if len(text) <= width else text[: width - 3] + "...")


def check_lengths(
    model: object,
    lengths: Sequence[int],
    names: Sequence[str],
    new_tokens: int = 0,
    fix: str = "shorten it",
) -> None:
    """Raise ContextLengthError if any prompt of `lengths` tokens, plus `new_tokens` to generate, does not
    fit the model's context. `names[i]` says which prompt lengths[i] is, e.g. "prompt 3 ('How do I ...')"."""
    limit = context_length(model)
    if limit is None:
        return
    too_long = [i for i, n in enumerate(lengths) if n + new_tokens > limit]
    if not too_long:
        return
    first = too_long[0]
    need = f"{lengths[first]:,} tokens" + (f" + {new_tokens:,} new tokens" if new_tokens else "")
    more = len(too_long) - 1
    others = f" (and {more} more prompt{'s' if more > 1 else ''})" if more else ""
    raise ContextLengthError(
        f"{names[first]} is too long: {need} do not fit the model's context of {limit:,} positions{others}; {fix}"
    )


def check_token_ids(
    model: object,
    token_ids: Sequence[Sequence[int]],
    names: Sequence[str],
    new_tokens: int = 0,
    fix: str = "shorten it",
) -> None:
    """Check unpadded token sequences: lengths against the context, ids against the vocabulary.
    Raises ContextLengthError or InvalidParameter naming the first offending sequence."""
    check_lengths(model, [len(ids) for ids in token_ids], names, new_tokens, fix)
    vocabulary = vocabulary_size(model)
    if vocabulary is None:
        return
    for name, ids in zip(names, token_ids):
        if ids and max(ids) >= vocabulary:
            raise _outside_vocabulary(name, max(ids), vocabulary)


def _outside_vocabulary(name: str, token: int, vocabulary: int) -> InvalidParameter:
    return InvalidParameter(
        f"{name} holds token id {token}, outside the model's vocabulary of {vocabulary:,} ids: the tokenizer "
        "does not match the model; load both from the same checkpoint"
    )


def check_batch(
    model: object,
    encoded: dict[str, torch.Tensor],
    names: Sequence[str],
    new_tokens: int = 0,
    fix: str = "shorten it",
) -> None:
    """Check a tokenized, padded batch: every row's length (its attention mask) against the context, and
    every token id against the vocabulary. Raises ContextLengthError or InvalidParameter naming the row."""
    lengths = encoded["attention_mask"].sum(-1).tolist()
    check_lengths(model, lengths, names, new_tokens, fix)
    vocabulary = vocabulary_size(model)
    ids = encoded["input_ids"]
    if vocabulary is not None and ids.numel() and int(ids.max()) >= vocabulary:
        row = int((ids >= vocabulary).any(-1).nonzero()[0])
        raise _outside_vocabulary(names[row], int(ids[row].max()), vocabulary)


def prompt_names(prompts: Sequence[object], numbers: Sequence[int] | None = None) -> list[str]:
    """ "prompt N ('...')" for each prompt, numbered from 1 (or by `numbers`, 0-based positions in a file)."""
    numbers = range(len(prompts)) if numbers is None else numbers
    return [f"prompt {n + 1} ({describe(p)})" for n, p in zip(numbers, prompts)]
