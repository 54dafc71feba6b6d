"""The antidote inside vLLM's model runner (engine-core / worker processes).

After the model loads, a forward hook on each selected decoder layer adds `scale[t] * v_l` to the layer's
first output. vLLM's decoder layers return (mlp output, residual) and the next layer's fused add-norm forms
their sum, the residual stream; adding to exactly one of the two adds once to the block output that the
transformers path steers. `scale` is one persistent buffer, a float per token of the flattened batch, written
before each forward from each request's setting (alpha, and the positions policy: prompt tokens are those
before the request's prompt length). The hook has no Python branch on request state, so torch.compile and
CUDA graphs keep it (they record the buffer, whose contents change in place); a token at alpha 0 gets
`h + 0 * v`, the same number.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import POSITIONS_CODE, PluginConfig
from .identity import check_served_model

logger = logging.getLogger("jailbreak_antidote.vllm")


class TokenSteering(nn.Module):
    """The persistent buffers: per-token scale [max_tokens] and the sparse vector of each steered layer."""

    def __init__(self, vectors: dict[int, torch.Tensor], max_tokens: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.register_buffer("scale", torch.zeros(max_tokens, dtype=dtype, device=device), persistent=False)
        for layer, vector in vectors.items():
            self.register_buffer(f"vector_{layer}", vector.to(device=device, dtype=dtype), persistent=False)
        self.layers = sorted(vectors)
        self._host = torch.zeros(max_tokens, dtype=torch.float32)

    def hook(self, layer: int):
        vector = getattr(self, f"vector_{layer}")
        scale = self.scale

        def add(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            hidden, residual = output
            return hidden + scale[: hidden.shape[0]].unsqueeze(-1) * vector, residual

        return add

    def write(self, per_token: np.ndarray) -> None:
        """Set the scale of the first len(per_token) tokens and zero the rest (padding)."""
        count = len(per_token)
        if count > self._host.shape[0]:
            raise RuntimeError(f"{count} tokens in one step, but the steering buffer holds {self._host.shape[0]}")
        self._host.zero_()
        self._host[:count] = torch.from_numpy(per_token)
        self.scale.copy_(self._host, non_blocking=True)


def decoder_layers(model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The model's decoder layers (a ModuleList of `num_layers`, named `layers`), for any vLLM decoder."""
    for name, module in model.named_modules():
        if name.split(".")[-1] == "layers" and isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise RuntimeError(f"no list of {num_layers} decoder layers found in {type(model).__name__}")


def attach(runner: Any, config: PluginConfig) -> None:
    """Check the served model against the antidote, then hook the steered layers this rank holds."""
    from ..antidote import Antidote

    antidote = Antidote.load(config.path)
    hf_config = runner.model_config.hf_config
    check_served_model(antidote, runner.model_config.model, hf_config)
    model = runner.get_model()
    layers = decoder_layers(model, hf_config.num_hidden_layers)
    start = getattr(getattr(model, "model", model), "start_layer", 0)
    end = getattr(getattr(model, "model", model), "end_layer", len(layers))
    vectors = {layer: v for layer, v in antidote.vectors().items() if start <= layer < end}  # pipeline stage
    max_tokens = int(runner.max_num_tokens) + int(getattr(runner, "max_num_reqs", 0)) + 512  # room for padding
    # the activations' dtype and device (a quantised or offloaded first parameter would mislead)
    steering = TokenSteering(vectors, max_tokens, runner.model_config.dtype, runner.device)
    model.add_module("antidote_steering", steering)
    runner._antidote = (config, steering, {})
    for layer in vectors:
        layers[layer].register_forward_hook(steering.hook(layer))
    logger.info("antidote %s on layers %s (of %d here), default %s", config.path, sorted(vectors), end - start,
                config.default)  # fmt: skip


def write_token_scales(runner: Any, num_scheduled_tokens: np.ndarray) -> None:
    """Each scheduled token's alpha under its request's setting and positions policy, into the buffer."""
    config, steering, settings = runner._antidote
    batch = runner.input_batch
    num_reqs = batch.num_reqs
    alphas = np.zeros(num_reqs, dtype=np.float32)
    prompt_lengths = np.zeros(num_reqs, dtype=np.int64)
    policies = np.zeros(num_reqs, dtype=np.int8)
    live = set(batch.req_ids[:num_reqs])
    for stale in [r for r in settings if r not in live]:
        del settings[stale]  # finished or preempted requests
    for i, request_id in enumerate(batch.req_ids[:num_reqs]):
        state = runner.requests[request_id]
        setting = settings.get(request_id)
        if setting is None:
            params = state.sampling_params
            setting = settings[request_id] = config.setting(params.extra_args if params is not None else None)
        alphas[i], policies[i], prompt_lengths[i] = (
            setting.alpha,
            POSITIONS_CODE[setting.positions],
            state.num_prompt_tokens,
        )
    counts = np.asarray(num_scheduled_tokens[:num_reqs], dtype=np.int64)
    owner = np.repeat(np.arange(num_reqs), counts)
    offset = np.arange(owner.shape[0]) - np.repeat(np.cumsum(counts) - counts, counts)
    position = batch.num_computed_tokens_cpu[:num_reqs][owner] + offset
    in_prompt = position < prompt_lengths[owner]
    policy = policies[owner]
    keep = np.where(
        policy == POSITIONS_CODE["all"], True, np.where(policy == POSITIONS_CODE["prompt"], in_prompt, ~in_prompt)
    )
    steering.write((alphas[owner] * keep).astype(np.float32))


def patch_model_runners() -> None:
    """Wrap load_model (attach) and _prepare_inputs (write scales) of vLLM's GPU and CPU model runners."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    classes: list[type] = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        classes.append(CPUModelRunner)
    except ImportError:  # a GPU build without the CPU runner
        pass
    for cls in classes:
        load = cls.__dict__.get("load_model")
        if load is not None and not getattr(load, "_antidote", False):
            cls.load_model = _after_load(load)
    prepare = GPUModelRunner._prepare_inputs
    if not getattr(prepare, "_antidote", False):
        GPUModelRunner._prepare_inputs = _after_prepare(prepare)


def _after_load(load):
    @functools.wraps(load)
    def load_model(self, *args: Any, **kwargs: Any) -> None:
        from .config import config_from_environment

        load(self, *args, **kwargs)
        config = config_from_environment()
        if config is not None and not hasattr(self, "_antidote"):
            attach(self, config)

    load_model._antidote = True
    return load_model


def _after_prepare(prepare):
    @functools.wraps(prepare)
    def _prepare_inputs(self, scheduler_output: Any, num_scheduled_tokens: np.ndarray, *args: Any, **kwargs: Any):
        result = prepare(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        if getattr(self, "_antidote", None) is not None:
            write_token_scales(self, num_scheduled_tokens)
        return result

    _prepare_inputs._antidote = True
    return _prepare_inputs
