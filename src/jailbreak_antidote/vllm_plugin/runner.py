"""The antidote inside vLLM's model runner (engine-core / worker processes).

After the model loads, a forward hook on each selected decoder layer adds `scale[t] * v_l` to the layer's
first output. vLLM's decoder layers return (mlp output, residual) and the next layer's fused add-norm forms
their sum, the residual stream; adding to exactly one of the two adds once to the block output that the
transformers path steers. The scales are persistent buffers, a float per token of the flattened batch,
written before each forward from each request's setting (alpha, mode, and the positions policy: prompt
tokens are those before the request's prompt length). The hooks have no Python branch on request state, so
torch.compile and CUDA graphs keep them (they record the buffers, whose contents change in place); a token at
alpha 0 gets `h + 0 * v`, the same number.

Gated and scaled modes (`steer.Gate`): a hook on the harm probe's block reads the block output (the sum of the
two tensors) over each request's prompt tokens of this step, pools them per request (smooth maximum), and
turns the probability into the request's factor, all in tensors; the blocks from the probe's on steer
`base + pending * factor`, the earlier blocks `base` alone. A prompt waiting for its score has base 0 and
pending alpha (so it is steered only from the probe's block on, as in transformers); its generated tokens
know the factor (read back before the next step) and have base alpha * factor. The probe needs the whole
prompt in one step: the front end sends probe modes only to engines without chunked prefill, and skips
prefix-cache reads for them.

The output monitor (mode monitor, as `steer.Gate`): the gated prompt as above, and the probe also reads each
answer token's state at its block, folding it into the request's running smooth maximum (a per-request slot
of persistent device buffers: the running log-sum-exp and the position at which the monitor opened). An answer
token at or after that position is steered from the probe's block on, one after it at every block. Everything
stays on the device, so a decode step reads nothing back to the host.

Input-dependent antidotes (method null_space, as `steer.Steering` with readouts): each steered block reads
h . w_l from its output at the request's last prompt token, in the step that holds that token, into the
request's slot; every token of the request is steered `scale * (h . w_l) * v_l` at that block.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .config import POSITIONS_CODE, PluginConfig, Setting
from .patching import wrap_once

if TYPE_CHECKING:
    from ..probe import HarmProbe

logger = logging.getLogger("jailbreak_antidote.vllm")


NEVER_OPENED = 2**62  # the monitor's opening position of a request it has not opened
SLOTS_PER_REQUEST = 4  # persistent slots per running request (preempted requests keep theirs)


class TokenSteering(nn.Module):
    """The persistent buffers: per-token strengths `base` (every steered block) and `pending` (times the
    probe's factor, from the probe's block on), per-token request index `segment` and `probed` (a prompt token
    the probe pools), per-request `threshold` and `scaled`, and the sparse vector of each steered layer. For
    the output monitor: per-token `watch` (the strength of a monitored answer token, once the monitor opens),
    `position`, `slot` (the request's persistent slot) and `fold` (an answer token read for the first time);
    per-row `prompt_slot` (the slot whose running state this step's prompt starts); per slot `running` and
    `opened_at`. For an input-dependent antidote (readouts): per row `last_token` (where its prompt's last
    token sits in this step) and `readout_slot` (its slot, when that token is in this step); per steered layer
    and slot `read_{layer}`, h . w at the prompt's last token."""

    def __init__(self, vectors: dict[int, torch.Tensor], max_tokens: int, max_requests: int, dtype: torch.dtype,
                 device: torch.device, probe: HarmProbe | None = None,
                 readouts: dict[int, torch.Tensor] | None = None):  # fmt: skip
        super().__init__()
        rows = max_requests + 1  # a step's requests; the last row collects tokens no probe pools (padding, decode)
        # Persistent slots outlive a step: a preempted request keeps its slot while others run, hence room for
        # several times the running requests; the last slot takes writes of rows and tokens that have none.
        slots = SLOTS_PER_REQUEST * max_requests + 1
        for name, size, kind in [("base", max_tokens, torch.float32), ("pending", max_tokens, torch.float32),
                                 ("segment", max_tokens, torch.long), ("probed", max_tokens, torch.bool),
                                 ("threshold", rows, torch.float32), ("scaled", rows, torch.bool),
                                 ("watch", max_tokens, torch.float32), ("position", max_tokens, torch.long),
                                 ("slot", max_tokens, torch.long), ("fold", max_tokens, torch.bool),
                                 ("prompt_slot", rows, torch.long), ("running", slots, torch.float32),
                                 ("opened_at", slots, torch.long), ("last_token", rows, torch.long),
                                 ("readout_slot", rows, torch.long)]:  # fmt: skip
            self.register_buffer(name, torch.zeros(size, dtype=kind, device=device), persistent=False)
        for layer, vector in vectors.items():
            self.register_buffer(f"vector_{layer}", vector.to(device=device, dtype=dtype), persistent=False)
        self.layers = sorted(vectors)
        self.input_dependent = bool(readouts)
        for layer, readout in (readouts or {}).items():
            self.register_buffer(f"readout_{layer}", readout.to(device=device, dtype=torch.float32), persistent=False)
            self.register_buffer(f"read_{layer}", torch.zeros(slots, device=device), persistent=False)
        self.probe = probe
        if probe is not None:
            for name in ("weight", "mean", "std"):
                self.register_buffer(f"probe_{name}", getattr(probe, name).to(device=device, dtype=torch.float32),
                                     persistent=False)  # fmt: skip
        # the probe hook's results, read by the later blocks' hooks in the same forward and by the host after it
        self.late: dict[str, torch.Tensor] = {}
        self._host = {name: torch.zeros_like(getattr(self, name), device="cpu") for name in self.WRITTEN}
        self.dummy_row, self.dummy = rows - 1, slots - 1
        self.clear()

    # written by the host before each step (the rest are the hooks')
    WRITTEN = ("base", "pending", "segment", "probed", "threshold", "scaled", "watch", "position", "slot", "fold",
               "prompt_slot", "last_token", "readout_slot")  # fmt: skip
    SLOTS = ("slot", "prompt_slot", "readout_slot")  # slot indices, whose padding is the dummy slot

    def hook(self, layer: int):
        vector = getattr(self, f"vector_{layer}")
        base, late = self.base, self.late
        after_probe = self.probe is not None and layer >= self.probe.layer
        monitored = self.probe is not None and not after_probe  # before the probe's block: the monitor's past
        # the blocks before the probe's share one scale per forward: the first of them computes it
        first_early = monitored and layer == min(x for x in self.layers if x < self.probe.layer)
        readout = getattr(self, f"readout_{layer}", None)
        read = getattr(self, f"read_{layer}", None)

        def add(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            hidden, residual = output
            count = hidden.shape[0]
            if after_probe:
                scale = late["scale"]
            elif monitored:  # an answer token after the one at which the monitor opened: every block
                if first_early:
                    opened = self.position[:count] > self.opened_at[self.slot[:count]]
                    late["early"] = (base[:count] + self.watch[:count] * opened).to(hidden.dtype)
                scale = late["early"]
            else:
                scale = base[:count].to(hidden.dtype)
            if readout is not None:  # input-dependent: times h . w at the prompt's last token, read at this block
                last = self.last_token
                read.index_copy_(0, self.readout_slot, (hidden[last] + residual[last]).float() @ readout)
                slot = self.slot[:count]
                scale = scale * torch.where(slot == self.dummy, 0.0, read[slot]).to(hidden.dtype)
            return hidden + scale.unsqueeze(-1) * vector, residual

        return add

    def probe_hook(self):
        """Read the probe's block output (registered before that block's steering hook: the unsteered output,
        as in transformers), pool p(harmful) per request, and set the scale of the blocks from here on."""
        probe, late = self.probe, self.late
        rows = self.threshold.shape[0]

        def read(_module: nn.Module, _inputs: Any, output: Any) -> None:
            hidden, residual = output
            count = hidden.shape[0]
            state = (hidden + residual).float()
            token = (((state - self.probe_mean) / self.probe_std) @ self.probe_weight + probe.bias) / probe.tau
            segment = self.segment[:count]
            z = torch.where(self.probed[:count], token, -torch.inf)
            peak = torch.full((rows,), -torch.inf, device=z.device).scatter_reduce(0, segment, z, "amax")
            peak = torch.where(torch.isfinite(peak), peak, 0.0)
            total = torch.zeros(rows, device=z.device).index_add(0, segment, torch.exp(z - peak[segment]))
            pooled = probe.tau * (peak + torch.log(total))
            probability = torch.where(total > 0, torch.sigmoid(probe.scale * pooled + probe.offset), 0.0)
            opened = probability >= self.threshold
            factor = torch.where(self.scaled, probability, opened.float())
            # The monitor: a prompt read here starts its request's running state (opened from the start when
            # its gate opened); an answer token read for the first time folds in, and opens the monitor at its
            # position when the running p reaches the threshold.
            self.running.index_copy_(0, self.prompt_slot, peak + torch.log(total))
            self.opened_at.index_copy_(0, self.prompt_slot, torch.where(opened, -1, NEVER_OPENED))
            slot, fold, position = self.slot[:count], self.fold[:count], self.position[:count]
            running = torch.logaddexp(self.running[slot], token)
            p = torch.sigmoid(probe.scale * probe.tau * running + probe.offset)  # as HarmProbe.running_step
            reaches = fold & (p >= self.threshold[segment])
            opened_at = torch.where(reaches, torch.minimum(self.opened_at[slot], position), self.opened_at[slot])
            folded = torch.where(fold, slot, self.dummy)
            self.running.index_copy_(0, folded, running)
            self.opened_at.index_copy_(0, folded, opened_at)
            watched = self.watch[:count] * (position >= opened_at)
            late["probability"] = probability
            late["scale"] = (self.base[:count] + self.pending[:count] * factor[segment] + watched).to(hidden.dtype)

        return read

    def clear(self) -> None:
        """An empty step: no token steered, read or folded, no row or slot written (before a forward that no
        step wrote for, such as a dummy run, which must not replay the last step's writes into live slots)."""
        self.write(**{name: np.zeros(0, dtype=self._host[name].numpy().dtype) for name in self.WRITTEN})

    def write(self, **arrays: np.ndarray) -> None:
        """Set each buffer's first len(array) entries and reset the rest (padding: no steering, no probe)."""
        for name, array in arrays.items():
            host = self._host[name]
            if len(array) > host.shape[0]:
                raise RuntimeError(f"{len(array)} entries in one step, but the {name} buffer holds {host.shape[0]}")
            # padding: no request's row or slot
            host.fill_(self.dummy_row if name == "segment" else self.dummy if name in self.SLOTS else 0)
            host[: len(array)] = torch.from_numpy(array)
            getattr(self, name).copy_(host, non_blocking=True)


def decoder_layers(model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The model's decoder layers (a ModuleList of `num_layers`, named `layers`), for any vLLM decoder."""
    for name, module in model.named_modules():
        if name.split(".")[-1] == "layers" and isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise RuntimeError(f"no list of {num_layers} decoder layers found in {type(model).__name__}")


def attach(runner: Any, config: PluginConfig) -> None:
    """Check the served model against the antidote, then hook the steered layers this rank holds (and the
    probe's block, when the antidote has a probe)."""
    from ..antidote import Antidote
    from .identity import check_served_model

    antidote = Antidote.load(config.path)
    hf_config = runner.model_config.hf_config
    check_served_model(antidote, runner.model_config.model, hf_config)
    model = runner.get_model()
    layers = decoder_layers(model, hf_config.num_hidden_layers)
    start = getattr(getattr(model, "model", model), "start_layer", 0)
    end = getattr(getattr(model, "model", model), "end_layer", len(layers))
    vectors = {layer: v for layer, v in antidote.vectors().items() if start <= layer < end}  # pipeline stage
    readouts = {layer: w for layer, w in (antidote.readout_vectors() or {}).items() if layer in vectors}
    max_tokens = int(runner.max_num_tokens) + int(getattr(runner, "max_num_reqs", 0)) + 512  # room for padding
    max_requests = int(getattr(runner, "max_num_reqs", 0)) or max_tokens
    probe = antidote.probe if antidote.probe is not None and start <= antidote.probe.layer < end else None
    # the activations' dtype and device (a quantised or offloaded first parameter would mislead)
    steering = TokenSteering(vectors, max_tokens, max_requests, runner.model_config.dtype, runner.device, probe,
                             readouts)  # fmt: skip
    model.add_module("antidote_steering", steering)
    runner._antidote = RunnerState(config, steering)
    if probe is not None:  # registered first: it reads the block's output before that block is steered
        layers[probe.layer].register_forward_hook(steering.probe_hook())
    for layer in vectors:
        layers[layer].register_forward_hook(steering.hook(layer))
    logger.info("antidote %s on layers %s (of %d here), probe %s, default %s", config.path, sorted(vectors),
                end - start, None if probe is None else f"at layer {probe.layer}", config.default)  # fmt: skip


class RunnerState:
    """Per engine: each live request's setting, the probe's probability once read, which batch rows the step
    probed, and the scores read in this step (sent with the step's output to the scheduler, which returns
    them to the client: see scores.py)."""

    def __init__(self, config: PluginConfig, steering: TokenSteering):
        self.config, self.steering = config, steering
        self.settings: dict[str, Setting] = {}
        self.probability: dict[str, float] = {}
        self.last_probed: list[tuple[str, int]] = []
        self.fresh: dict[str, float] = {}
        # each monitored or input-dependent request's slot in the device buffers, and how many of a monitored
        # request's tokens the probe has read (a preempted request's tokens, computed again, fold in once)
        self.slots: dict[str, int] = {}
        self.free_slots = list(range(steering.dummy))
        self.read_until: dict[str, int] = {}

    def slot(self, request_id: str, live: Any) -> int:
        """The request's persistent slot (a new one on first sight). `live`: the runner's requests, whose
        absence marks a slot whose request ended unseen (a backstop: forget() frees them when they finish)."""
        if request_id not in self.slots:
            if not self.free_slots:
                self.forget({other for other in self.slots if other not in live})
            if not self.free_slots:
                raise RuntimeError(
                    f"jailbreak-antidote: more than {len(self.slots)} monitored or input-dependent requests alive "
                    "at once (running and preempted); lower --max-num-seqs or the load"
                )
            self.slots[request_id] = self.free_slots.pop()
        return self.slots[request_id]

    def factor(self, request_id: str) -> float | None:
        """The multiplier of the request's alpha on answer tokens (None while its probe score is not known; 0
        for the monitor, whose answer tokens the device opens)."""
        setting = self.settings[request_id]
        if setting.mode == "monitor":
            return 0.0
        if setting.mode not in ("gated", "scaled"):
            return 1.0
        probability = self.probability.get(request_id)
        if probability is None:
            return None
        if setting.mode == "scaled":
            return probability
        return 1.0 if np.float32(probability) >= np.float32(setting.threshold) else 0.0

    def read_probe(self) -> None:
        """After a step's forward: the probabilities its probe read (a small copy to the host, only in steps
        that read a prompt). A preempted request, read again, keeps the probability its answer was steered by."""
        if self.last_probed and "probability" in self.steering.late:
            values = self.steering.late["probability"].float().cpu().numpy()
            for request_id, row in self.last_probed:
                if request_id not in self.probability:
                    self.probability[request_id] = self.fresh[request_id] = float(values[row])
        self.last_probed = []

    def take_fresh(self) -> dict[str, float]:
        fresh, self.fresh = self.fresh, {}
        return fresh

    def forget(self, finished: set[str]) -> None:
        for request_id in finished:
            self.settings.pop(request_id, None)
            self.probability.pop(request_id, None)
            self.read_until.pop(request_id, None)
            if request_id in self.slots:
                self.free_slots.append(self.slots.pop(request_id))


def write_token_scales(runner: Any, num_scheduled_tokens: np.ndarray) -> None:
    """Each scheduled token's strengths under its request's setting and positions policy, into the buffers."""
    state: RunnerState = runner._antidote
    batch = runner.input_batch
    num_reqs = batch.num_reqs
    request_ids = list(batch.req_ids[:num_reqs])
    counts = np.asarray(num_scheduled_tokens[:num_reqs], dtype=np.int64)
    computed = np.asarray(batch.num_computed_tokens_cpu[:num_reqs], dtype=np.int64)
    alphas = np.zeros(num_reqs, dtype=np.float32)
    known = np.zeros(num_reqs, dtype=np.float32)  # the factor (0 while a probe mode's score is not known)
    waits = np.zeros(num_reqs, dtype=bool)  # the strength waits for the probe's score (gated, scaled)
    whole = np.zeros(num_reqs, dtype=bool)  # the prompt must be read whole (probe modes, refusals, readouts)
    thresholds = np.zeros(num_reqs, dtype=np.float32)
    scaled = np.zeros(num_reqs, dtype=bool)
    dummy = state.steering.dummy
    slots = np.full(num_reqs, dummy, dtype=np.int64)  # a monitored or input-dependent request's slot
    monitor = np.zeros(num_reqs, dtype=bool)
    starts = np.full(num_reqs, dummy, dtype=np.int64)  # ... when this step reads its prompt the first time
    read_until = np.zeros(num_reqs, dtype=np.int64)  # the probe has read its tokens before this position
    prompt_lengths = np.zeros(num_reqs, dtype=np.int64)
    policies = np.zeros(num_reqs, dtype=np.int8)
    for i, request_id in enumerate(request_ids):
        request = runner.requests[request_id]
        setting = state.settings.get(request_id)
        if setting is None:
            params = request.sampling_params
            setting = state.settings[request_id] = state.config.setting(params.extra_args if params else None)
        factor = state.factor(request_id)
        alphas[i], known[i] = setting.alpha, 0.0 if factor is None else factor
        waits[i], whole[i] = setting.waits_for_probe, setting.reads_whole_prompt
        thresholds[i], scaled[i] = setting.threshold, setting.mode == "scaled"
        policies[i], prompt_lengths[i] = POSITIONS_CODE[setting.positions], request.num_prompt_tokens
        if setting.steered and (setting.mode == "monitor" or state.steering.input_dependent):
            slots[i] = state.slot(request_id, runner.requests)
        if setting.mode == "monitor" and setting.steered:
            monitor[i] = True
            read_until[i] = state.read_until.get(request_id, 0)
            starts[i] = slots[i] if request_id not in state.read_until else dummy
            state.read_until[request_id] = max(read_until[i], int(computed[i] + counts[i]))
    owner = np.repeat(np.arange(num_reqs), counts)
    position = computed[owner] + np.arange(owner.shape[0]) - np.repeat(np.cumsum(counts) - counts, counts)
    in_prompt = position < prompt_lengths[owner]
    policy = policies[owner]
    keep = np.where(
        policy == POSITIONS_CODE["all"], True, np.where(policy == POSITIONS_CODE["prompt"], in_prompt, ~in_prompt)
    )
    strength = alphas[owner] * keep
    monitored = monitor[owner] & ~in_prompt
    # input-dependent: the rows whose prompt's last token is in this step read h . w there, at every block
    first = np.cumsum(counts) - counts  # each row's first token in the flattened step
    last_in_step = (computed < prompt_lengths) & (computed + counts >= prompt_lengths)
    last_token = np.where(last_in_step, first + prompt_lengths - 1 - computed, 0)
    readout_slots = np.where(last_in_step, slots, dummy)
    # The probe pools a prompt read whole in this step: a probe mode's or a refusing request's always is (the
    # front end sends those only to engines without chunked prefill, and skips their prefix-cache reads); a
    # fixed request's prompt read in parts gets no score. A probe mode's prompt tokens wait for this step's
    # factor, also when a preempted request's prompt is read again; its generated tokens take the factor read
    # before.
    reads = ((computed == 0) & (counts >= prompt_lengths)) | (whole & (computed < prompt_lengths))
    pending = in_prompt & waits[owner]
    state.steering.write(
        base=np.where(pending, 0.0, strength * known[owner]).astype(np.float32),
        pending=np.where(pending, strength, 0.0).astype(np.float32),
        segment=owner.astype(np.int64),
        probed=in_prompt & reads[owner],
        threshold=thresholds,
        scaled=scaled,
        watch=np.where(monitored, strength, 0.0).astype(np.float32),
        position=position.astype(np.int64),
        slot=slots[owner],
        fold=monitored & (position >= read_until[owner]),
        prompt_slot=starts,
        last_token=last_token.astype(np.int64),
        readout_slot=readout_slots,
    )
    if state.steering.probe is not None:
        state.last_probed = [(request_ids[i], int(i)) for i in np.flatnonzero(reads)]


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
        wrap_once(cls, "load_model", _after_load, own=True)
    wrap_once(GPUModelRunner, "_update_states", _forgetting_finished)
    wrap_once(GPUModelRunner, "_dummy_run", _cleared_first)
    wrap_once(GPUModelRunner, "_prepare_inputs", _after_prepare)
    wrap_once(GPUModelRunner, "execute_model", _after_execute)
    wrap_once(GPUModelRunner, "sample_tokens", _after_sample)


def _after_load(load):
    @functools.wraps(load)
    def load_model(self, *args: Any, **kwargs: Any) -> None:
        from .config import config_from_environment

        load(self, *args, **kwargs)
        config = config_from_environment()
        if config is not None and not hasattr(self, "_antidote"):
            attach(self, config)

    return load_model


def _forgetting_finished(update):
    """Forget finished requests (settings, scores, slots) at every step: a step that schedules nothing (the last
    requests finishing) skips _prepare_inputs but still reports them here."""

    @functools.wraps(update)
    def _update_states(self, scheduler_output: Any, *args: Any, **kwargs: Any):
        if getattr(self, "_antidote", None) is not None:
            self._antidote.forget(set(scheduler_output.finished_req_ids))
        return update(self, scheduler_output, *args, **kwargs)

    return _update_states


def _cleared_first(dummy_run):
    """A dummy forward (warm-up, profiling, graph capture, an idle data-parallel rank) steers nothing and writes
    no slot: without this it would replay the last real step's buffers."""

    @functools.wraps(dummy_run)
    def _dummy_run(self, *args: Any, **kwargs: Any):
        if getattr(self, "_antidote", None) is not None:
            self._antidote.steering.clear()
        return dummy_run(self, *args, **kwargs)

    return _dummy_run


def _after_prepare(prepare):
    @functools.wraps(prepare)
    def _prepare_inputs(self, scheduler_output: Any, num_scheduled_tokens: np.ndarray, *args: Any, **kwargs: Any):
        result = prepare(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        if getattr(self, "_antidote", None) is not None:
            write_token_scales(self, num_scheduled_tokens)
        return result

    return _prepare_inputs


def _after_execute(execute):
    @functools.wraps(execute)
    def execute_model(self, *args: Any, **kwargs: Any):
        result = execute(self, *args, **kwargs)
        if getattr(self, "_antidote", None) is not None:
            self._antidote.read_probe()  # before any later forward (a dummy run) overwrites the probe's result
        return result

    return execute_model


def _after_sample(sample):
    """The step's output carries the harm scores read in it, {request id: p}, to the scheduler."""

    @functools.wraps(sample)
    def sample_tokens(self, *args: Any, **kwargs: Any):
        output = sample(self, *args, **kwargs)
        fresh = self._antidote.take_fresh() if getattr(self, "_antidote", None) is not None else {}
        if fresh and hasattr(output, "get_output"):  # async scheduling: the output is built later
            built = output.get_output

            def get_output() -> Any:
                return _with_scores(built(), fresh)

            output.get_output = get_output
        elif fresh and output is not None:
            _with_scores(output, fresh)
        return output

    return sample_tokens


def _with_scores(output: Any, scores: dict[str, float]) -> Any:
    from .scores import OUTPUT_FIELD

    setattr(output, OUTPUT_FIELD, scores)
    return output
