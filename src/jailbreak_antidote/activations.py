"""Batched forward passes that record each decoder block's output at the last prompt token."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from rich.progress import Progress
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .blocks import find_decoder
from .models import encode_prompts, hidden_size


def block_output(output: object) -> torch.Tensor:
    """Decoder blocks return the hidden states alone or as the first item of a tuple."""
    return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value]


@torch.no_grad()
def last_token_states(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    layers: Sequence[int],
    *,
    system: str | None = None,
    batch_size: int = 16,
    progress: Progress | None = None,
    description: str = "forward passes",
) -> torch.Tensor:
    """Float32 tensor [len(prompts), len(layers), hidden]: output of block l at the last prompt token.

    Left padding puts every prompt's last token at position -1. Only the decoder stack runs (no LM head).
    """
    stack, blocks = find_decoder(model)
    device = next(model.parameters()).device
    captured: dict[int, torch.Tensor] = {}

    def make_hook(layer: int):
        def hook(_module, _inputs, output):
            captured[layer] = block_output(output)[:, -1, :].float().cpu()

        return hook

    handles = [blocks[layer].register_forward_hook(make_hook(layer)) for layer in layers]
    # Batch prompts of similar length together: less padding, fewer wasted FLOPs.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    states = torch.empty(len(prompts), len(layers), hidden_size(model))
    task = progress.add_task(description, total=len(prompts)) if progress else None
    try:
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            encoded = encode_prompts(tokenizer, [prompts[i] for i in index], system).to(device)
            stack(**encoded, use_cache=False)
            states[index] = torch.stack([captured[layer] for layer in layers], dim=1)
            captured.clear()
            if progress is not None and task is not None:
                progress.advance(task, len(index))
    finally:
        for handle in handles:
            handle.remove()
    return states
