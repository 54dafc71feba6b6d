"""Dynamic batching for the server: one worker thread runs a token-by-token decode loop over a batch of
requests, each row with its own alpha, sampling settings, stop strings and token budget.

Requests that arrive while a batch runs wait for the next one (the worker collects for `batch_wait_s`
after the first arrival). Finished rows leave the batch at once (their KV-cache rows are dropped), so a
short answer is not held back by a long one. Rows never see each other: left padding is masked out and
positions are counted per row, so a greedy request gets the answer it would get alone.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from ..antidote import Antidote
from ..generate import REFUSAL_MESSAGE
from ..models import cache_argument, returned_cache
from ..steer import Steering, reaches

# The finish reason of a prompt the harm probe refused outright (OpenAI's name for a filtered answer).
CONTENT_FILTER = "content_filter"


@dataclass
class Delta:
    """New answer text for a streaming client."""

    text: str


@dataclass
class Finished:
    """The end of one request: its whole answer and why it stopped ("stop", "length", "error" or
    CONTENT_FILTER: refused outright by the harm probe)."""

    text: str
    finish_reason: str
    completion_tokens: int
    error: str | None = None
    harm_score: float | None = None  # the harm probe's p(harmful) for the prompt, if the antidote has a probe


Event = Delta | Finished


@dataclass
class GenerationRequest:
    """One chat completion as the engine sees it: token ids in, events out (called on the worker thread)."""

    prompt_ids: list[int]
    max_tokens: int
    alpha: float = 0.0
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks)
    mode: str = "fixed"  # fixed | gated | scaled (needs the antidote's harm probe)
    threshold: float = 0.5
    positions: str = "all"  # all | prompt | generated (steer.POSITIONS)
    refuse_threshold: float | None = None  # harm probability from which the prompt is refused outright
    on_event: Callable[[Event], None] = lambda event: None
    cancelled: threading.Event = field(default_factory=threading.Event)


class DecodeRow:
    """Decode state of one request inside a batch."""

    def __init__(self, request: GenerationRequest, tokenizer: PreTrainedTokenizerBase):
        self.request = request
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0  # characters already streamed
        self.generator = None
        if request.temperature > 0:
            seed = request.seed if request.seed is not None else int(torch.seed() % 2**63)
            self.generator = torch.Generator().manual_seed(seed)
        self.stops = [s for s in dict.fromkeys(request.stop) if s]  # "" would match anywhere: it stops nothing
        # A stop string that is not in the text yet may still begin in its last len(stop) - 1 characters.
        self.holdback = max((len(s) - 1 for s in self.stops), default=0)
        # With cleanup on, decode drops the space before punctuation (" ." -> ".") once the punctuation comes.
        self.cleanup = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self.harm_score: float | None = None

    def add(self, token: int, eos_ids: set[int]) -> str | None:
        """Take one token; return the finish reason when this row is done."""
        if token in eos_ids and not self.request.ignore_eos:
            return "stop"
        self.tokens.append(token)
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return "stop"
        if len(self.tokens) >= self.request.max_tokens:
            return "length"
        self._stream(final=False)
        return None

    def _stream(self, final: bool) -> None:
        """Send the text that can no longer change, so the deltas always add up to the final answer."""
        end = len(self.text) if final else self.settled() - self.holdback
        if end > self.sent:
            self.request.on_event(Delta(self.text[self.sent : end]))
            self.sent = end

    def settled(self) -> int:
        """How much of the decoded text more tokens cannot change: not a trailing half-decoded multi-byte
        character (U+FFFD until its last byte comes), nor, with cleanup on, a space that may yet be dropped."""
        end = len(self.text.rstrip("\ufffd"))
        if self.cleanup:  # the longest unfinished cleanup pattern is 3 characters (" n'" of " n't")
            spaces = [i for i in range(max(0, end - 3), end) if self.text[i] == " "]
            end = spaces[0] if spaces else end
        return end

    def refuse(self) -> None:
        """Answer REFUSAL_MESSAGE instead of the generation (the probe refused the prompt outright)."""
        self.tokens, self.text = [], REFUSAL_MESSAGE
        self.finish(CONTENT_FILTER)

    def finish(self, reason: str) -> None:
        self._stream(final=True)
        self.request.on_event(Finished(self.text, reason, len(self.tokens), harm_score=self.harm_score))


def choose_tokens(logits: torch.Tensor, rows: list[DecodeRow]) -> list[int]:
    """Greedy for temperature 0, else seeded nucleus sampling, per row."""
    choice = logits.argmax(dim=-1).tolist()
    for i, row in enumerate(rows):
        request = row.request
        if request.temperature <= 0:
            continue
        probs = torch.softmax(logits[i].float() / request.temperature, dim=-1)
        if request.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(0) - sorted_probs >= request.top_p  # keep the smallest nucleus
            outside[0] = False  # and always the likeliest token (top_p 0 is greedy)
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        choice[i] = int(torch.multinomial(probs, 1, generator=row.generator))
    return choice


class BatchEngine:
    """Owns the model; `submit` from any thread, results arrive through each request's `on_event`."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        antidote: Antidote | None = None,
        *,
        max_batch: int = 16,
        batch_wait_s: float = 0.01,
        max_queue: int = 256,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.model = model
        self.antidote = antidote
        self.device = next(model.parameters()).device
        self._cache_kwarg = cache_argument(model)
        self._init_common(tokenizer, max_batch, batch_wait_s, max_queue, on_batch)
        self.eos_ids |= eos_ids(tokenizer, getattr(model.generation_config, "eos_token_id", None))

    def _init_common(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_batch: int = 16,
        batch_wait_s: float = 0.01,
        max_queue: int = 256,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        """What every engine has, whatever runs the model: the queue, the worker, end-of-turn tokens."""
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.on_batch = on_batch or (lambda size: None)
        self._queue: queue.Queue[GenerationRequest] = queue.Queue(maxsize=max_queue)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._held: list[GenerationRequest] = []  # taken from the queue, waiting for a batch of their gate
        self.eos_ids = eos_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids, default=0)

    # ----- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="antidote-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queued(self) -> int:
        return self._queue.qsize() + len(self._held)

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; raises queue.Full when the server is saturated (the caller answers 429)."""
        self._queue.put_nowait(request)

    # ----- worker ---------------------------------------------------------------------------------
    def _next_batch(self) -> list[GenerationRequest]:
        """Requests that can share a batch: same gate (mode, threshold) and positions policy; others wait for
        the next one."""
        if self._held:
            first = self._held.pop(0)
        else:
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                return []
        gate = _batch_key(first)
        batch, others = [first], []
        for request in self._held:
            (batch if _batch_key(request) == gate and len(batch) < self.max_batch else others).append(request)
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.max_batch:
            try:
                request = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            (batch if _batch_key(request) == gate else others).append(request)
        self._held = others
        return [r for r in batch if not r.cancelled.is_set()]

    def _work(self) -> None:
        while not self._stopping.is_set():
            batch = self._next_batch()
            if not batch:
                continue
            self.on_batch(len(batch))
            try:
                self.run_batch(batch)
            except Exception as exc:  # keep serving: fail this batch's requests, not the server
                for request in batch:
                    request.on_event(Finished("", "error", 0, error=f"{type(exc).__name__}: {exc}"))

    @torch.no_grad()
    def run_batch(self, requests: list[GenerationRequest]) -> None:
        rows = [DecodeRow(r, self.tokenizer) for r in requests]
        length = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, request in enumerate(requests):
            ids[i, length - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
            mask[i, length - len(request.prompt_ids) :] = 1
        alphas = torch.tensor([r.alpha for r in requests], dtype=torch.float32)
        steering = None
        # Steer when some row has alpha; with a harm probe always (alpha-0 rows are untouched: + 0 * v).
        if self.antidote is not None and (bool((alphas != 0).any()) or self.antidote.probe is not None):
            gate = self.antidote.gate(requests[0].mode, requests[0].threshold)
            steering = Steering(self.model, self.antidote.vectors(), _alpha_argument(alphas), gate=gate,
                                positions=requests[0].positions, readouts=self.antidote.readout_vectors())  # fmt: skip
        try:
            self._decode(rows, ids, mask, alphas, steering)
        finally:
            if steering is not None:
                steering.remove()

    def _decode(
        self,
        rows: list[DecodeRow],
        ids: torch.Tensor,
        mask: torch.Tensor,
        alphas: torch.Tensor,
        steering: Steering | None,
    ) -> None:
        cache = DynamicCache()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        while rows:
            output = self.model(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device), use_cache=True, logits_to_keep=1, **{self._cache_kwarg: cache},
            )  # fmt: skip
            cache = returned_cache(output)
            refused: set[int] = set()
            if steering is not None and steering.scores is not None and rows[0].harm_score is None:
                for i, (row, score) in enumerate(zip(rows, steering.scores.tolist())):
                    row.harm_score = round(score, 4)
                    if row.request.refuse_threshold is not None and reaches(score, row.request.refuse_threshold):
                        refused.add(i)
            tokens = choose_tokens(output.logits[:, -1, :], rows)
            keep = []
            for i, (row, token) in enumerate(zip(rows, tokens)):
                if i in refused and not row.request.cancelled.is_set():
                    row.refuse()
                    continue
                reason = "cancelled" if row.request.cancelled.is_set() else row.add(token, self.eos_ids)
                if reason is None:
                    keep.append(i)
                elif reason != "cancelled":
                    row.finish(reason)
            if not keep:
                return
            if len(keep) < len(rows):  # drop finished rows from every tensor, the KV cache and the steering
                index = torch.tensor(keep)
                cache.batch_select_indices(index.to(self.device))
                rows, mask, positions, alphas = [rows[i] for i in keep], mask[index], positions[index], alphas[index]
                tokens = [tokens[i] for i in keep]
                if steering is not None:
                    steering.keep_rows(index)
            ids = torch.tensor(tokens, dtype=torch.long).unsqueeze(1)
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            positions = positions[:, -1:] + 1


def _batch_key(request: GenerationRequest) -> tuple[str, float, str]:
    return (request.mode, request.threshold, request.positions)


def _alpha_argument(alphas: torch.Tensor) -> float | torch.Tensor:
    """One number when every row has the same alpha (steering then precomputes alpha * v once)."""
    return float(alphas[0]) if bool((alphas == alphas[0]).all()) else alphas


def eos_ids(tokenizer: PreTrainedTokenizerBase, extra: int | Sequence[int] | None = None) -> set[int]:
    """End-of-turn tokens: the tokenizer's plus those of the generation config (chat models often have several)."""
    ids: set[int] = set()
    for value in (extra, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids
