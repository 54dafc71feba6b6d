"""Batched forward passes that record decoder block outputs: at the last prompt token, or at every token."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from rich.progress import Progress
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .blocks import find_decoder
from .context import check_token_ids, prompt_names
from .models import encode_prompts, hidden_size, prompt_token_ids, with_positions


def block_output(output: object) -> torch.Tensor:
    """Decoder blocks return the hidden states alone or as the first item of a tuple."""
    return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value]


def _block_outputs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    layers: Sequence[int],
    system: str | None,
    batch_size: int,
    progress: Progress | None,
    description: str,
    names: Sequence[str] | None = None,
    fix: str = "shorten it",
) -> Iterator[tuple[list[int], dict[int, torch.Tensor], torch.Tensor]]:
    """Yield (prompt indices, {layer: block output [batch, seq, hidden]}, attention mask) per batch.

    Prompts of similar length are batched together (less padding, fewer wasted FLOPs); left padding puts
    every prompt's last token at position -1. Only the decoder stack runs (no LM head). Every prompt is
    checked against the context and vocabulary first (ContextLengthError / InvalidParameter naming it by
    `names`, default "prompt N")."""
    names = list(names) if names is not None else prompt_names(prompts)
    check_token_ids(model, prompt_token_ids(tokenizer, prompts, system), names, fix=fix)
    stack, blocks = find_decoder(model)
    device = next(model.parameters()).device
    captured: dict[int, torch.Tensor] = {}

    def make_hook(layer: int):
        def hook(_module, _inputs, output):
            captured[layer] = block_output(output)

        return hook

    handles = [blocks[layer].register_forward_hook(make_hook(layer)) for layer in layers]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    task = progress.add_task(description, total=len(prompts)) if progress else None
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                index = order[start : start + batch_size]
                encoded = encode_prompts(tokenizer, [prompts[i] for i in index], system).to(device)
                stack(**with_positions(encoded), use_cache=False)
                yield index, dict(captured), encoded["attention_mask"]
                captured.clear()
                if progress is not None and task is not None:
                    progress.advance(task, len(index))
    finally:
        for handle in handles:
            handle.remove()


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
    names: Sequence[str] | None = None,
    fix: str = "shorten it",
) -> torch.Tensor:
    """Float32 tensor [len(prompts), len(layers), hidden]: output of block l at the last prompt token."""
    states = torch.empty(len(prompts), len(layers), hidden_size(model))
    for index, outputs, _mask in _block_outputs(model, tokenizer, prompts, layers, system, batch_size, progress,
                                                description, names, fix):  # fmt: skip
        states[index] = torch.stack([outputs[layer][:, -1, :].float().cpu() for layer in layers], dim=1)
    return states


def prompt_token_states(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    layers: Sequence[int],
    *,
    system: str | None = None,
    batch_size: int = 16,
    progress: Progress | None = None,
    description: str = "forward passes",
    names: Sequence[str] | None = None,
    fix: str = "shorten it",
) -> list[torch.Tensor]:
    """Per prompt, a bfloat16 tensor [tokens, len(layers), hidden]: block outputs at every non-padding token
    of the rendered prompt (bfloat16 halves the memory and keeps float32's range)."""
    states: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
    for index, outputs, mask in _block_outputs(model, tokenizer, prompts, layers, system, batch_size, progress,
                                               description, names, fix):  # fmt: skip
        stacked = torch.stack([outputs[layer] for layer in layers], dim=2).to("cpu", torch.bfloat16)
        real = mask.bool().cpu()
        for row, i in enumerate(index):
            states[i] = stacked[row][real[row]].clone()
    return states
