"""Run-time application: add alpha * (sparse vector) to the output of selected decoder blocks.

Every non-padding position is steered, prompt and generated tokens alike, with the KV cache on: the
cached keys/values of earlier positions were computed from steered states, so they stay consistent.
Padding is found from the attention mask that the decoder stack receives (captured by a pre-hook).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .activations import block_output
from .blocks import find_decoder
from .errors import InvalidParameter

Alpha = float | int | torch.Tensor


def check_alpha(alpha: Alpha) -> float | torch.Tensor:
    """A finite number, or a 1-D tensor of finite numbers (one per batch row)."""
    if isinstance(alpha, bool):
        raise InvalidParameter(f"alpha must be a number, not {alpha!r}")
    if isinstance(alpha, torch.Tensor):
        if alpha.dim() == 0:
            return check_alpha(float(alpha))
        if alpha.dim() != 1 or not torch.isfinite(alpha).all():
            raise InvalidParameter("alpha tensor must be 1-D (one value per batch row) and finite")
        return alpha.detach().float()
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise InvalidParameter(f"alpha must be a number, not {alpha!r}") from None
    if not math.isfinite(value):
        raise InvalidParameter(f"alpha must be finite, got {value}")
    return value


def _attention_mask(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
        mask = args[1]  # forward(input_ids, attention_mask, ...) called positionally
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


class Steering:
    """Hooks that steer `model` with `vectors` ({block index: vector}) at strength `alpha`.

    Use as a context manager (hooks are removed on exit, also after an exception) or call `remove()`.
    `set_alpha` changes the strength between forward passes without touching the hooks.
    """

    def __init__(self, model: nn.Module, vectors: Mapping[int, torch.Tensor], alpha: Alpha = 1.0):
        stack, blocks = find_decoder(model)
        bad = [layer for layer in vectors if not 0 <= layer < len(blocks)]
        if bad:
            raise InvalidParameter(f"layers {bad} do not exist; the model has {len(blocks)} decoder blocks")
        param = next(blocks[0].parameters())
        self._vectors = {layer: v.to(device=param.device, dtype=param.dtype) for layer, v in vectors.items()}
        self._mask: torch.Tensor | None = None
        self._scale: float | torch.Tensor | None = None  # per forward call: alpha times non-padding mask
        self._deltas: dict[int, torch.Tensor] = {}
        self.set_alpha(alpha)
        self._handles = [stack.register_forward_pre_hook(self._capture_mask, with_kwargs=True)]
        self._handles += [blocks[layer].register_forward_hook(self._hook(layer)) for layer in self._vectors]

    @property
    def alpha(self) -> float | torch.Tensor:
        return self._alpha

    def set_alpha(self, alpha: Alpha) -> None:
        self._alpha = check_alpha(alpha)
        if isinstance(self._alpha, float):  # the common case: precompute alpha * v once, not every token
            self._deltas = {layer: self._alpha * v for layer, v in self._vectors.items()}

    def _capture_mask(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._mask = _attention_mask(args, kwargs)
        self._scale = None

    def _scale_for(self, hidden: torch.Tensor) -> float | torch.Tensor:
        batch, length = hidden.shape[:2]
        mask = self._mask
        if mask is not None and (mask.shape[0] != batch or mask.shape[1] < length):
            mask = None  # not this call's mask (e.g. a block run on its own): steer every position
        if mask is not None:
            mask = mask[:, -length:]  # with a KV cache the mask covers past + current positions
            if bool(mask.all()):
                mask = None
        alpha = self._alpha
        if isinstance(alpha, float) and mask is None:
            return alpha
        if isinstance(alpha, torch.Tensor) and alpha.shape[0] != batch:
            raise InvalidParameter(f"alpha has {alpha.shape[0]} values but the batch has {batch} rows")
        rows = alpha.to(hidden.device).view(-1, 1) if isinstance(alpha, torch.Tensor) else alpha
        weights = mask.to(hidden.dtype) if mask is not None else hidden.new_ones(batch, length)
        return (weights * rows).to(hidden.dtype).unsqueeze(-1)

    def _hook(self, layer: int):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            hidden = block_output(output)
            if self._scale is None:
                self._scale = self._scale_for(hidden)
            if isinstance(self._scale, float):
                steered = hidden + self._deltas[layer]
            else:
                steered = hidden + self._scale * self._vectors[layer]
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> Steering:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
