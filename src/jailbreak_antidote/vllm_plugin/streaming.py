"""The harm score in streamed OpenAI responses (API-server process).

vLLM 0.32 returns `kv_transfer_params` only in non-streaming responses; its stream generators drop it. The
finished request's RequestOutput still carries it (scores.py puts the score there), so this wraps the chat
and completion stream generators: the engine's outputs are watched on their way in, and the chunk that
finishes a choice (the one with its `finish_reason`) gets `"kv_transfer_params": {"antidote_harm_score": p}`
(and `"antidote_refused": true` for a prompt refused outright) at the top level, as a non-streaming response
has it. Chunks without a finish reason pass through as they are.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from .patching import wrap_once
from .scores import REFUSED_KEY, RESPONSE_KEY

FIELDS = (RESPONSE_KEY, REFUSED_KEY)  # what a finished request's kv_transfer_params carries from the antidote

DATA = "data: "


def patch_streams() -> None:
    try:
        from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
        from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
    except ImportError:  # an engine without the OpenAI server's dependencies: nothing streams here
        return
    # Where each generator takes the engine's outputs: chat (request, result_generator, ...) yields RequestOutput;
    # completion (request, engine_inputs, result_generator, ...) yields (prompt index, RequestOutput).
    wrap_once(OpenAIServingChat, "chat_completion_stream_generator", _scored(position=1, indexed=False))
    wrap_once(OpenAIServingCompletion, "completion_stream_generator", _scored(position=2, indexed=True))


def _scored(position: int, indexed: bool) -> Callable[[Callable], Callable]:
    def wrap(stream: Callable) -> Callable:
        @functools.wraps(stream)
        async def scored_stream(self: Any, request: Any, *args: Any, **kwargs: Any):
            scores: dict[int, dict] = {}  # prompt index -> its antidote fields, once that prompt's request finished
            args = list(args)
            where = position - 1  # `request` is taken out of args
            if where < len(args):
                args[where] = _watching(args[where], scores, indexed)
            elif "result_generator" in kwargs:
                kwargs["result_generator"] = _watching(kwargs["result_generator"], scores, indexed)
            choices = max(1, getattr(request, "n", None) or 1)
            async for event in stream(self, request, *args, **kwargs):
                yield _with_score(event, scores, choices) if scores else event

        return scored_stream

    return wrap


async def _watching(outputs: AsyncIterator[Any], scores: dict[int, dict], indexed: bool) -> AsyncIterator[Any]:
    async for item in outputs:
        prompt, output = item if indexed else (0, item)
        params = getattr(output, "kv_transfer_params", None)
        fields = {key: params[key] for key in FIELDS if key in params} if isinstance(params, dict) else {}
        if fields:
            scores[prompt] = fields
        yield item


def _with_score(event: str, scores: dict[int, dict], choices: int) -> str:
    """`event` (one server-sent event) with the score added if it finishes a choice whose prompt has one."""
    if not event.startswith(DATA) or '"finish_reason":' not in event:
        return event
    try:
        chunk = json.loads(event[len(DATA) :])
    except ValueError:
        return event
    finished = [c for c in chunk.get("choices") or [] if isinstance(c, dict) and c.get("finish_reason") is not None]
    fields = next((scores[c.get("index", 0) // choices] for c in finished if c.get("index", 0) // choices in scores),
                  None)  # fmt: skip
    if fields is None:
        return event
    chunk["kv_transfer_params"] = {**(chunk.get("kv_transfer_params") or {}), **fields}
    return f"{DATA}{json.dumps(chunk, ensure_ascii=False, separators=(',', ':'))}\n\n"
