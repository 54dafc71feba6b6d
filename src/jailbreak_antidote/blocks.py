"""Locate the decoder blocks (and the stack that owns them) inside a Hugging Face causal LM."""

from __future__ import annotations

from torch import nn

from .errors import UnsupportedArchitecture

# Attribute paths to the stack module whose `.layers`/`.h` holds the decoder blocks, most common first.
_STACK_PATHS = (
    "model",  # Llama, Qwen2, Mistral, Gemma2, Gemma3 (text), Phi3, ...
    "model.language_model",  # Gemma3 / multimodal wrappers
    "model.model",  # PEFT-style double wrapping
    "transformer",  # GPT-2, Falcon, Bloom
    "gpt_neox",
)
_LAYER_ATTRS = ("layers", "h", "blocks")


def _get_path(obj: object, path: str) -> object | None:
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def find_decoder(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """Return (stack, blocks): the module that runs the blocks, and the ModuleList of decoder blocks."""
    candidates = [model] + [m for p in _STACK_PATHS if isinstance(m := _get_path(model, p), nn.Module)]
    for stack in candidates:
        for attr in _LAYER_ATTRS:
            blocks = getattr(stack, attr, None)
            if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
                return stack, blocks
    raise UnsupportedArchitecture(
        f"cannot find the decoder blocks of {type(model).__name__}: looked for a ModuleList at "
        f"{', '.join(p + '.layers' for p in _STACK_PATHS)}. Use a Hugging Face causal LM with a standard "
        "layout (Llama, Qwen2, Mistral, Gemma2/3, Phi3, ...), or open an issue naming the architecture."
    )


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    return find_decoder(model)[1]
