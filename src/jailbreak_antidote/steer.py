"""Run-time application: add alpha * (sparse vector) to the output of selected decoder blocks.

Which positions are steered is a policy (`POSITIONS`): "all" (the paper: prompt and generated tokens alike),
"prompt" (the prefill only, as AlphaSteer, AdaSteer and CAST do: generated tokens attend to the steered
prompt's keys/values but are not steered themselves) or "generated" (only the tokens the model writes).
The KV cache stays on: cached keys/values were computed from the states as steered under the policy.
Padding is found from the attention mask that the decoder stack receives (captured by a pre-hook).

An input-dependent antidote (method null_space) also has a readout per layer: the vector added at block l
is alpha * (h_l . w_l) * v_l, where h_l is block l's output at the prompt's last token (read in the prefill,
kept for the generated tokens), so it is near zero for prompts like the benign ones it was fitted on.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .activations import block_output
from .blocks import find_decoder
from .errors import InvalidParameter

Alpha = float | int | torch.Tensor
MODES = ("fixed", "gated", "scaled", "monitor")
POSITIONS = ("all", "prompt", "generated")


def check_positions(positions: str) -> str:
    if positions not in POSITIONS:
        raise InvalidParameter(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
    return positions


@dataclass
class Gate:
    """Adaptive strength from a harm probe read during the prompt's forward pass (no second pass).

    `probability(hidden, mask)` maps block `layer`'s output over the prompt ([batch, seq, hidden], left
    padded; mask [batch, seq], 1 = real token, or None) to p(harmful) per row, on the CPU. Each row's
    alpha is multiplied by 1 (fixed), by [p >= threshold] (gated) or by p (scaled). The score exists only
    once block `layer` has run on the prompt, so in the gated and scaled modes the prompt tokens are steered
    only at the blocks after `layer`; generated tokens are steered at every selected block. In the fixed
    mode (the paper) every block is steered as without a gate, and the score is only reported (it is then
    read from an already steered state).

    "monitor" is the gated mode plus an output monitor: the probe also reads each generated token's state at
    block `layer` during decoding (no extra pass), and a row whose prompt did not open the gate is steered
    from the first generated token at which p reaches `threshold` on (from the blocks after `layer` for that
    token, every selected block afterwards): attacks whose harm shows only in the answer (nesting, payload
    splitting, style and prefix injection) are caught as the answer turns harmful. With `running` (a
    HarmProbe with max pooling) p is the probe's smooth maximum over the prompt and the answer so far, the
    scale its threshold was calibrated on; without it, p of the newest token alone.
    """

    layer: int
    probability: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    mode: str = "gated"
    threshold: float = 0.5
    running: Any = None  # an object with running_start / running_step (probe.HarmProbe), for the monitor

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidParameter(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if isinstance(self.threshold, bool) or not 0 <= float(self.threshold) <= 1:
            raise InvalidParameter(f"threshold must be in [0, 1], got {self.threshold!r}")

    def factor(self, probability: torch.Tensor) -> torch.Tensor:
        if self.mode in ("gated", "monitor"):
            # The raw probability, as the vLLM plugin's branch-free gate compares it; `antidote tune` reads the
            # 4-decimal scores answers report, which can differ only within 5e-5 of the threshold.
            return (probability >= self.threshold).float()
        if self.mode == "scaled":
            return probability.float()
        return torch.ones_like(probability, dtype=torch.float32)


def check_refuse_threshold(threshold: float | None) -> float | None:
    """None (never refuse outright) or a probability in [0, 1]: prompts whose harm probability reaches it
    are answered with a fixed refusal instead of being generated (the probe as an input filter)."""
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0 <= threshold <= 1:
        raise InvalidParameter(f"refuse_threshold must be a probability in [0, 1] (or none), got {threshold!r}")
    return float(threshold)


def reaches(score: float, threshold: float) -> bool:
    """Whether a harm score reaches a refuse threshold, compared at the 4 decimals every answer reports, so
    that a row whose reported score equals the threshold is refused and `antidote tune`, which reads reported
    scores, agrees with a real run."""
    return round(float(score), 4) >= threshold


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


def _input_length(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    tokens = kwargs.get("input_ids")
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if tokens is None and args and isinstance(args[0], torch.Tensor):
        tokens = args[0]
    return int(tokens.shape[1]) if isinstance(tokens, torch.Tensor) and tokens.dim() >= 2 else 1


class Steering:
    """Hooks that steer `model` with `vectors` ({block index: vector}) at strength `alpha`.

    Use as a context manager (hooks are removed on exit, also after an exception) or call `remove()`.
    `set_alpha` changes the strength between forward passes without touching the hooks. `positions` is the
    policy of the module docstring; `readouts` ({block index: vector [hidden]}) makes the strength at each
    block input-dependent (method null_space).
    """

    def __init__(
        self,
        model: nn.Module,
        vectors: Mapping[int, torch.Tensor],
        alpha: Alpha = 1.0,
        gate: Gate | None = None,
        positions: str = "all",
        readouts: Mapping[int, torch.Tensor] | None = None,
    ):
        stack, blocks = find_decoder(model)
        bad = [layer for layer in vectors if not 0 <= layer < len(blocks)]
        if bad:
            raise InvalidParameter(f"layers {bad} do not exist; the model has {len(blocks)} decoder blocks")
        self.positions = check_positions(positions)
        param = next(blocks[0].parameters())
        self._vectors = {layer: v.to(device=param.device, dtype=param.dtype) for layer, v in vectors.items()}
        if readouts is not None and set(readouts) != set(vectors):
            raise InvalidParameter("readouts must cover exactly the steered layers")
        self._readouts = {
            layer: w.to(device=param.device, dtype=torch.float32) for layer, w in (readouts or {}).items()
        }
        self.readout_scores: dict[int, torch.Tensor] = {}  # per layer: h . w at each row's last prompt token
        self._prefill = True  # whether the current forward call reads a prompt (more than one new position)
        self._mask: torch.Tensor | None = None
        self._scale: float | torch.Tensor | None = None  # per forward call: alpha times non-padding mask
        self._deltas: dict[int, torch.Tensor] = {}
        self.gate = gate
        self.scores: torch.Tensor | None = None  # the gate's p(harmful) per row, from the last prompt pass
        self._factor: torch.Tensor | None = None  # the gate's per-row multiplier; None until the probe ran
        self.triggered: torch.Tensor | None = None  # monitor mode: rows the output monitor opened
        self._running: torch.Tensor | None = None  # monitor mode: the probe's running pooled score per row
        self.set_alpha(alpha)
        self._handles = [stack.register_forward_pre_hook(self._capture_mask, with_kwargs=True)]
        if gate is not None:  # registered first: it reads block `gate.layer` before that block is steered
            if not 0 <= gate.layer < len(blocks):
                raise InvalidParameter(f"probe layer {gate.layer} does not exist; the model has {len(blocks)} blocks")
            self._handles.append(blocks[gate.layer].register_forward_hook(self._probe_hook))
        self._handles += [blocks[layer].register_forward_hook(self._hook(layer)) for layer in self._vectors]

    @property
    def alpha(self) -> float | torch.Tensor:
        return self._alpha

    def set_alpha(self, alpha: Alpha) -> None:
        self._alpha = check_alpha(alpha)
        if isinstance(self._alpha, float):  # the common case: precompute alpha * v once, not every token
            self._deltas = {layer: self._alpha * v for layer, v in self._vectors.items()}

    def keep_rows(self, index: torch.Tensor) -> None:
        """Batch rows `index` continue (the others finished): subset per-row alpha, gate factor and scores."""
        if isinstance(self._alpha, torch.Tensor):
            self.set_alpha(self._alpha[index.cpu()])
        if self._factor is not None:
            self._factor = self._factor[index.to(self._factor.device)]
        if self.scores is not None:
            self.scores = self.scores[index.cpu()]
        if self.triggered is not None:
            self.triggered = self.triggered[index.cpu()]
        if self._running is not None:
            self._running = self._running[index.to(self._running.device)]
        self.readout_scores = {layer: s[index.to(s.device)] for layer, s in self.readout_scores.items()}

    def _capture_mask(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._mask = _attention_mask(args, kwargs)
        self._scale = None
        self._prefill = _input_length(args, kwargs) > 1
        if self.gate is not None and self._prefill:  # a new prompt: its score is not known yet
            self._factor = None

    def _probe_hook(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        hidden = block_output(output)
        assert self.gate is not None
        if self.gate.mode == "monitor" and self._factor is not None and not self._prefill:
            if self._running is not None:
                self._running, probability = self.gate.running.running_step(self._running, hidden)
            else:
                probability = self.gate.probability(hidden, None)
            opened = self.gate.factor(probability.float()).to(self._factor.device)
            if bool((opened > self._factor).any()):
                self.triggered = self.triggered | (opened > self._factor).cpu()
                self._factor = torch.maximum(self._factor, opened)
                self._scale = None  # the rest of this token's pass is steered for the rows that just opened
            return
        if self._factor is not None or hidden.shape[1] <= 1:
            return
        mask = self._mask
        if mask is not None and (mask.shape[0] != hidden.shape[0] or mask.shape[1] < hidden.shape[1]):
            mask = None  # not this call's mask
        if mask is not None:
            mask = mask[:, -hidden.shape[1] :]
        self.scores = self.gate.probability(hidden, mask).float()
        self._factor = self.gate.factor(self.scores).to(hidden.device)
        if self.gate.mode == "monitor" and self.gate.running is not None:
            self._running = self.gate.running.running_start(hidden, mask)
        self.triggered = torch.zeros(len(self.scores), dtype=torch.bool)
        self._scale = None  # the rest of this pass is steered with the gated strength

    def _scale_for(self, hidden: torch.Tensor) -> float | torch.Tensor:
        batch, length = hidden.shape[:2]
        mask = self._mask
        if mask is not None and (mask.shape[0] != batch or mask.shape[1] < length):
            mask = None  # not this call's mask (e.g. a block run on its own): steer every position
        if mask is not None:
            mask = mask[:, -length:]  # with a KV cache the mask covers past + current positions
            if bool(mask.all()):
                mask = None
        alpha: float | torch.Tensor = self._alpha
        if self._factor is not None:
            alpha = self._factor.float().cpu() * alpha
        if isinstance(alpha, float) and mask is None:
            return alpha
        if isinstance(alpha, torch.Tensor) and alpha.shape[0] != batch:
            raise InvalidParameter(f"alpha has {alpha.shape[0]} values but the batch has {batch} rows")
        rows = alpha.to(hidden.device).view(-1, 1) if isinstance(alpha, torch.Tensor) else alpha
        weights = mask.to(hidden.dtype) if mask is not None else hidden.new_ones(batch, length)
        return (weights * rows).to(hidden.dtype).unsqueeze(-1)

    def _read(self, layer: int, readout: torch.Tensor, hidden: torch.Tensor) -> None:
        """Keep h . w at each row's last prompt token (left padding: position -1), read in the prefill; with
        no prefill seen for these rows, read at the current token."""
        known = self.readout_scores.get(layer)
        if self._prefill or known is None or known.shape[0] != hidden.shape[0]:
            self.readout_scores[layer] = hidden[:, -1, :].float() @ readout

    def _hook(self, layer: int):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            hidden = block_output(output)
            readout = self._readouts.get(layer)
            if readout is not None:
                self._read(layer, readout, hidden)
            if self.positions == ("generated" if self._prefill else "prompt"):
                return output
            if self.gate is not None and self._factor is None and self.gate.mode != "fixed":
                return output  # prompt blocks before the probe: strength not known yet
            if self._scale is None:
                self._scale = self._scale_for(hidden)
            if readout is not None:
                per_row = self.readout_scores[layer].to(hidden.dtype).view(-1, 1, 1)
                steered = hidden + per_row * self._scale * self._vectors[layer]
            elif isinstance(self._scale, float):
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
