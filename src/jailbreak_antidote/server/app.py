"""The OpenAI-compatible HTTP API: /v1/chat/completions (plain and streaming), /v1/models, /health, /metrics.

Per-request strength: the extra body field `{"antidote": {"alpha": 0.4}}` (`extra_body` in the openai
client). Every error is an OpenAI-style JSON envelope with a 4xx status; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import queue
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..antidote import Antidote
from ..eval.judges import is_refusal
from ..models import render_prompt
from .engine import BatchEngine, Delta, Finished, GenerationRequest
from .metrics import ServerMetrics
from .requestlog import RequestLog
from .schemas import ChatCompletionRequest, error_body

CHAT_PATH = "/v1/chat/completions"


@dataclass
class ServerConfig:
    model_name: str
    default_alpha: float = 0.0
    default_mode: str = "fixed"
    default_threshold: float = 0.5
    alpha_min: float = 0.0
    alpha_max: float = 0.0
    api_key: str | None = None
    max_tokens: int = 1024  # the most a request may ask for
    default_max_tokens: int = 256  # when a request does not say
    max_batch: int = 16
    batch_wait_s: float = 0.01
    max_queue: int = 256
    request_log: Path | None = None
    log_prompts: bool = False


class ApiError(Exception):
    """Answered as an OpenAI-style error envelope with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def create_app(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, antidote: Antidote | None, config: ServerConfig
) -> FastAPI:
    metrics = ServerMetrics(config.alpha_max)
    engine = _engine(model, tokenizer, antidote, config, metrics)
    log = RequestLog(config.request_log, config.log_prompts)
    context = getattr(model, "context_length", None) or getattr(model.config, "max_position_embeddings", None)
    on_llamacpp = getattr(model, "backend_name", "transformers") == "llamacpp"

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()
            log.close()

    app = FastAPI(title="jailbreak-antidote", lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, config

    # ----- errors: always the OpenAI envelope, never a traceback ----------------------------------
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.kind, exc.param), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(*_describe_validation(exc.errors())), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        if request.url.path == CHAT_PATH:
            metrics.requests.labels(str(response.status_code)).inc()
        return response

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), config.api_key):
            raise ApiError(
                401, "missing or wrong API key (send 'Authorization: Bearer KEY')", kind="authentication_error"
            )

    # ----- endpoints --------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        status = "ok" if engine.alive else "engine stopped"
        body = {"status": status, "model": config.model_name, "antidote": antidote is not None, "queued": engine.queued}
        return JSONResponse(body, status_code=200 if engine.alive else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.queued.set(engine.queued)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        authorize(request)
        card: dict[str, Any] = {"id": config.model_name, "object": "model", "created": 0, "owned_by": "local"}
        if antidote is not None:
            card["antidote"] = {
                "default_alpha": config.default_alpha, "alpha_range": [config.alpha_min, config.alpha_max],
                "default_mode": config.default_mode, "default_threshold": config.default_threshold,
                "harm_probe": antidote.probe is not None, "layers": len(antidote.layers), "k": antidote.k,
            }  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.post(CHAT_PATH)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        authorize(request)
        started = time.perf_counter()
        job = _prepare(body)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        events: asyncio.Queue[Delta | Finished] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job.on_event = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
        try:
            engine.submit(job)
        except queue.Full:
            raise ApiError(
                429, "the server is busy (request queue full); retry shortly", kind="rate_limit_error"
            ) from None
        metrics.alpha.observe(job.alpha)
        metrics.prompt_tokens.inc(len(job.prompt_ids))
        record = _Record(metrics, log, request_id, body, job, started)
        if body.stream:
            return StreamingResponse(_stream(events, record), media_type="text/event-stream")
        try:
            while not isinstance(event := await events.get(), Finished):
                pass
        finally:
            job.cancelled.set()  # a client that went away stops costing compute
        if event.finish_reason == "error":
            raise ApiError(500, f"generation failed: {event.error}", kind="server_error")
        record.done(event, stream=False)
        return JSONResponse(_completion(request_id, config.model_name, event, job, record.refusal))

    # ----- helpers that close over the model and the config ----------------------------------------
    def _prepare(body: ChatCompletionRequest) -> GenerationRequest:
        if body.model not in (None, config.model_name):
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves {config.model_name!r}",
                           param="model", kind="not_found_error")  # fmt: skip
        options = body.antidote
        alpha = options.alpha if options and options.alpha is not None else config.default_alpha
        mode = options.mode if options and options.mode is not None else config.default_mode
        threshold = options.threshold if options and options.threshold is not None else config.default_threshold
        if mode != "fixed" and (antidote is None or antidote.probe is None or on_llamacpp):
            raise ApiError(400, f"antidote.mode {mode!r} needs an antidote with a harm probe (`antidote probe`) on "
                           "the transformers backend; use mode 'fixed'", "antidote.mode")  # fmt: skip
        if antidote is None and alpha != 0:
            raise ApiError(400, "this server runs without an antidote; antidote.alpha must be 0", "antidote.alpha")
        if not config.alpha_min <= alpha <= config.alpha_max:
            raise ApiError(
                400, f"antidote.alpha {alpha} is outside the allowed range [{config.alpha_min}, {config.alpha_max}] "
                "set when the server started (--alpha-min / --alpha-max)", "antidote.alpha",
            )  # fmt: skip
        max_tokens = body.requested_tokens() or config.default_max_tokens
        if max_tokens > config.max_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} is above this server's limit of {config.max_tokens}",
                           "max_tokens")  # fmt: skip
        try:
            text = render_prompt(tokenizer, body.chat())
        except Exception as exc:  # the chat template rejects this conversation (e.g. roles out of order)
            raise ApiError(400, f"the model's chat template rejects these messages: {exc}", "messages") from None
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if context is not None and len(prompt_ids) + max_tokens > context:
            raise ApiError(400, f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds the "
                           f"model's context of {context} tokens", "messages")  # fmt: skip
        return GenerationRequest(
            prompt_ids=prompt_ids, max_tokens=max_tokens, alpha=float(alpha), temperature=body.temperature,
            top_p=body.top_p, seed=body.seed, stop=body.stop_list(), ignore_eos=body.ignore_eos, mode=mode,
            threshold=threshold,
        )  # fmt: skip

    async def _stream(events: asyncio.Queue, record: _Record) -> AsyncIterator[str]:
        job, body = record.job, record.body
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict | None = None) -> str:
            choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if usage is None else []
            payload: dict[str, Any] = {
                "id": record.request_id, "object": "chat.completion.chunk", "created": created,
                "model": config.model_name, "choices": choices,
            }  # fmt: skip
            if usage is not None:
                payload["usage"] = usage
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            while not isinstance(event := await events.get(), Finished):
                record.first()
                yield chunk({"content": event.text})
            if event.finish_reason == "error":
                yield f"data: {json.dumps(error_body(f'generation failed: {event.error}', 'server_error'))}\n\n"
                return
            record.done(event, stream=True)
            yield chunk({}, finish=event.finish_reason)
            if body.stream_options and body.stream_options.include_usage:
                yield chunk({}, usage=_usage(job, event))
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()

    return app


class _Record:
    """Metrics and the request log for one request, written once it finishes."""

    def __init__(
        self, metrics: ServerMetrics, log: RequestLog, request_id: str, body: ChatCompletionRequest,
        job: GenerationRequest, started: float,
    ):  # fmt: skip
        self.metrics, self.log = metrics, log
        self.request_id, self.body, self.job, self.started = request_id, body, job, started
        self.first_text: float | None = None
        self.refusal = False

    def first(self) -> None:
        if self.first_text is None:
            self.first_text = time.perf_counter()
            self.metrics.first_token.observe(self.first_text - self.started)

    def done(self, event: Finished, stream: bool) -> None:
        latency = time.perf_counter() - self.started
        self.refusal = is_refusal(event.text)
        self.metrics.latency.observe(latency)
        self.metrics.completion_tokens.inc(event.completion_tokens)
        if self.refusal:
            self.metrics.refusals.inc()
        entry = {
            "id": self.request_id, "alpha": self.job.alpha, "mode": self.job.mode, "harm_score": event.harm_score,
            "prompt_tokens": len(self.job.prompt_ids),
            "completion_tokens": event.completion_tokens, "latency_s": round(latency, 4),
            "finish_reason": event.finish_reason, "refusal": self.refusal, "stream": stream,
        }  # fmt: skip
        self.log.write(entry, prompt=self.body.chat(), completion=event.text)


def _engine(model: Any, tokenizer: Any, antidote: Antidote | None, config: ServerConfig, metrics: ServerMetrics):
    options = dict(batch_wait_s=config.batch_wait_s, max_queue=config.max_queue, on_batch=metrics.batch_size.observe)
    if getattr(model, "backend_name", "transformers") == "llamacpp":
        from ..llamacpp import LlamaCppEngine

        return LlamaCppEngine(model, antidote, **options)
    return BatchEngine(model, tokenizer, antidote, max_batch=config.max_batch, **options)


def _usage(job: GenerationRequest, event: Finished) -> dict[str, int]:
    prompt = len(job.prompt_ids)
    return {"prompt_tokens": prompt, "completion_tokens": event.completion_tokens,
            "total_tokens": prompt + event.completion_tokens}  # fmt: skip


def _completion(request_id: str, model: str, event: Finished, job: GenerationRequest, refusal: bool) -> dict[str, Any]:
    return {
        "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": event.text},
                     "finish_reason": event.finish_reason, "logprobs": None}],
        "usage": _usage(job, event),
        "antidote": {"alpha": job.alpha, "mode": job.mode, "harm_score": event.harm_score, "refusal": refusal},
    }  # fmt: skip


def _describe_validation(errors: Any) -> tuple[str, str, str | None]:
    """One readable sentence from pydantic's error list: the first problem, with where it is."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", "invalid_request_error", None
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    where = ".".join(location) or "body"
    message = first.get("msg", "invalid request")
    if first.get("type") == "missing":
        message = "field required"
    return f"invalid {where}: {message}", "invalid_request_error", where
