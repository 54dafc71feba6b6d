"""The OpenAI-compatible HTTP API: /v1/chat/completions (plain and streaming), /v1/models, /health, /metrics,
and the playground page (/playground).

Per-request strength: the extra body field `{"antidote": {"alpha": 0.4}}` (`extra_body` in the openai
client), within what the caller's tenant policy allows (policy.py; one `default` tenant without --policy).
Every error is an OpenAI-style JSON envelope (4xx; 500 `server_error` for a fault of the server, whatever
it is); the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import math
import queue
import secrets
import signal
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..antidote import Antidote
from ..context import context_length, vocabulary_size
from ..errors import InvalidParameter
from ..eval.judges import is_refusal
from ..models import render_prompt
from ..steer import MODES, POSITIONS
from .engine import CONTENT_FILTER, BatchEngine, Delta, Finished, GenerationRequest
from .metrics import ServerMetrics
from .policy import ARMS, NEVER, SETTING_KEYS, PolicyStore, ServerLimits, Setting, Tenant
from .requestlog import RequestLog
from .schemas import ChatCompletionRequest, error_body

try:
    from jinja2 import TemplateError, TemplateSyntaxError
except ImportError:  # pragma: no cover - without jinja2 there are no chat templates to fail
    TemplateError = TemplateSyntaxError = ()  # type: ignore[assignment,misc]

CHAT_PATH = "/v1/chat/completions"


@dataclass
class ServerConfig:
    model_name: str
    default_alpha: float = 0.0
    default_mode: str = "fixed"
    default_threshold: float = 0.5
    default_positions: str = "all"
    default_refuse_threshold: float | None = None  # harm probability from which a prompt is refused outright
    alpha_min: float = 0.0
    alpha_max: float = 0.0
    api_key: str | None = None
    max_tokens: int = 1024  # the most a request may ask for; a request that does not say gets up to this
    max_batch: int = 16
    batch_wait_s: float = 0.01
    max_queue: int = 256
    request_log: Path | None = None
    log_prompts: bool = False
    policy: Path | None = None  # tenants, their settings and rollouts (policy.py); None: one default tenant


class ErrorResponse(JSONResponse):
    """An error envelope in ASCII JSON: a message that quotes the request cannot fail to encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


class ApiError(Exception):
    """Answered as an OpenAI-style error envelope with this status."""

    def __init__(
        self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
        code: str | None = None,
    ):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


def create_app(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, antidote: Antidote | None, config: ServerConfig
) -> FastAPI:
    on_llamacpp = getattr(model, "backend_name", "transformers") == "llamacpp"
    policies = PolicyStore(config.policy, server_limits(config, antidote, on_llamacpp))  # PolicyError: bad file
    metrics = ServerMetrics(config.alpha_max)
    metrics.declare(policies.current.labels, ARMS)
    engine = _engine(model, tokenizer, antidote, config, metrics)
    log = RequestLog(config.request_log, config.log_prompts)
    context, vocabulary = context_length(model), vocabulary_size(model)

    def reload_policy() -> bool:
        """Read the policy file again (SIGHUP); a bad file leaves the last good policy in force."""
        problem = policies.reload()
        metrics.policy_reloads.labels("failed" if problem else "ok").inc()
        if problem:
            print(f"policy reload failed, the last good policy stays in force: {problem}", file=sys.stderr)
            return False
        metrics.declare(policies.current.labels, ARMS)
        print(f"policy reloaded from {config.policy}: tenants {', '.join(policies.current.labels)}", file=sys.stderr)
        return True

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        hangup = config.policy is not None and threading.current_thread() is threading.main_thread()
        if hangup:  # signals reach only the main thread's loop (`antidote serve`); tests call reload_policy
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload_policy)
        try:
            yield
        finally:
            if hangup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            engine.stop()
            log.close()

    app = FastAPI(title="jailbreak-antidote", lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, config
    app.state.policies, app.state.reload_policy = policies, reload_policy

    # ----- errors: always the OpenAI envelope, never a traceback ----------------------------------
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return ErrorResponse(error_body(exc.message, exc.kind, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return ErrorResponse(error_body(*_describe_validation(exc.errors())), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ErrorResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_fault(_request: Request, _exc: Exception) -> JSONResponse:
        # Starlette re-raises the exception after sending this, so the server log gets the traceback.
        message = "the server failed on this request (its fault, not the request's); the server log has the details"
        return ErrorResponse(error_body(message, "server_error"), status_code=500)

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Any) -> Response:
        try:
            response = await call_next(request)
        except Exception:  # answered by server_fault, outside this middleware
            if request.url.path == CHAT_PATH:
                metrics.requests.labels("500").inc()
            raise
        if request.url.path == CHAT_PATH:
            metrics.requests.labels(str(response.status_code)).inc()
        return response

    def authorize(request: Request) -> Tenant:
        """The caller's tenant: by API key, by the policy's tenant header, or the one default tenant; else 401."""
        policy = policies.current
        token = _bearer(request)
        if policy.keys:
            name = next((n for key, n in policy.keys.items() if _same(token, key)), None)
            if name is None:
                raise ApiError(401, "missing or unknown API key (send 'Authorization: Bearer KEY' with a key the "
                               "server's policy lists)", kind="authentication_error")  # fmt: skip
            return policy.tenants[name]
        if config.api_key is not None and not _same(token, config.api_key):
            raise ApiError(
                401, "missing or wrong API key (send 'Authorization: Bearer KEY')", kind="authentication_error"
            )
        if policy.tenant_header is None:
            return next(iter(policy.tenants.values()))
        value = request.headers.get(policy.tenant_header, "").strip()
        if value not in policy.tenants:
            shown = f"unknown tenant {value[:64]!r}" if value else "no tenant named"
            raise ApiError(401, f"{shown} in the {policy.tenant_header} header; send the name of a tenant in the "
                           "server's policy", kind="authentication_error")  # fmt: skip
        return policy.tenants[value]

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
        tenant = authorize(request)
        card: dict[str, Any] = {"id": config.model_name, "object": "model", "created": 0, "owned_by": "local"}
        if antidote is not None:
            default = tenant.setting
            card["antidote"] = {
                "default_alpha": default.alpha, "alpha_range": list(tenant.alpha_range),
                "default_mode": default.mode, "default_threshold": default.threshold,
                "default_positions": default.positions, "default_refuse_threshold": default.refuse_threshold,
                "method": antidote.method,
                "harm_probe": antidote.probe is not None, "layers": len(antidote.layers), "k": antidote.k,
                "tenant": tenant.name, "allow_override": tenant.allow_override,
                "tune_curve": _tune_curve(antidote),
            }  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.get("/playground")
    async def playground() -> HTMLResponse:
        page = resources.files("jailbreak_antidote.server").joinpath("static/playground.html")
        return HTMLResponse(page.read_text(encoding="utf-8"))

    @app.post(CHAT_PATH)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        tenant = authorize(request)
        started = time.perf_counter()
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        job, arm = _prepare(body, tenant, request_id)
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
        record = _Record(metrics, log, request_id, body, job, started, tenant.name, arm)
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
        return JSONResponse(_completion(request_id, config.model_name, event, job, record))

    # ----- helpers that close over the model and the config ----------------------------------------
    def _prepare(body: ChatCompletionRequest, tenant: Tenant, request_id: str) -> tuple[GenerationRequest, str]:
        """The generation job and the arm that serves it: the tenant's arm setting, or what the request set
        (arm "override") where its policy allows that."""
        if body.model not in (None, config.model_name):
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves {config.model_name!r}",
                           param="model", kind="not_found_error")  # fmt: skip
        arm, setting = tenant.assign(body.user, request_id)
        given = {key: getattr(body.antidote, key) for key in SETTING_KEYS if body.antidote is not None}
        asked = {key: None if value == NEVER else value for key, value in given.items()}  # "never": no refusing
        changed = [key for key in asked if given[key] is not None and asked[key] != getattr(setting, key)]
        if changed and not tenant.allow_override:
            key = changed[0]
            raise ApiError(400, f"the policy of tenant {tenant.name!r} does not let a request choose its setting: this "
                           f"request is served antidote.{key} = {getattr(setting, key)!r} (rollout arm {arm}); leave "
                           f"antidote.{key} out", f"antidote.{key}")  # fmt: skip
        if changed:
            arm = "override"
            setting = Setting(**{key: asked[key] if key in changed else getattr(setting, key) for key in SETTING_KEYS})
        alpha, mode, threshold, positions = setting.alpha, setting.mode, setting.threshold, setting.positions
        if setting.refuse_threshold is not None and (antidote is None or antidote.probe is None or on_llamacpp):
            raise ApiError(400, "antidote.refuse_threshold reads the harm probe, which needs an antidote with one "
                           '(`antidote probe`) on the transformers backend; send "never" or leave it out',
                           "antidote.refuse_threshold")  # fmt: skip
        if positions != "all" and on_llamacpp:
            raise ApiError(400, f"antidote.positions {positions!r} needs the transformers backend (a llama.cpp "
                           "control vector steers every position); use 'all'", "antidote.positions")  # fmt: skip
        if mode != "fixed" and (antidote is None or antidote.probe is None or on_llamacpp):
            raise ApiError(400, f"antidote.mode {mode!r} needs an antidote with a harm probe (`antidote probe`) on "
                           "the transformers backend; use mode 'fixed'", "antidote.mode")  # fmt: skip
        if antidote is None and alpha != 0:
            raise ApiError(400, "this server runs without an antidote; antidote.alpha must be 0", "antidote.alpha")
        low, high = tenant.alpha_range
        if not low <= alpha <= high:
            source = (f"of tenant {tenant.name!r} (its policy's alpha_range)" if config.policy is not None
                      else "set when the server started (--alpha-min / --alpha-max)")  # fmt: skip
            raise ApiError(400, f"antidote.alpha {alpha} is outside the allowed range [{low}, {high}] {source}",
                           "antidote.alpha")  # fmt: skip
        requested, field = body.requested_tokens(), body.token_field()
        if requested is not None and requested > config.max_tokens:
            raise ApiError(400, f"{field} {requested} is above this server's limit of {config.max_tokens} "
                           f"(--max-tokens); ask for at most {config.max_tokens}", field)  # fmt: skip
        prompt_ids = tokenizer(_render(tokenizer, body.chat()), add_special_tokens=False)["input_ids"]
        if not prompt_ids:
            raise ApiError(400, "the model's chat template renders this conversation as an empty prompt; send at "
                           "least one user message with text", "messages")  # fmt: skip
        if vocabulary is not None and max(prompt_ids) >= vocabulary:
            raise ApiError(400, f"the messages hold token id {max(prompt_ids)}, outside the model's vocabulary of "
                           f"{vocabulary} ids: the served tokenizer does not match the model", "messages")  # fmt: skip
        max_tokens = _answer_room(len(prompt_ids), requested, field, context, config.max_tokens)
        job = GenerationRequest(
            prompt_ids=prompt_ids, max_tokens=max_tokens, alpha=float(alpha), temperature=body.temperature,
            top_p=body.top_p, seed=body.seed, stop=body.stop, ignore_eos=body.ignore_eos, mode=mode,
            threshold=threshold, positions=positions, refuse_threshold=setting.refuse_threshold,
        )  # fmt: skip
        return job, arm

    async def _stream(events: asyncio.Queue, record: _Record) -> AsyncIterator[str]:
        job, body = record.job, record.body
        created = int(time.time())

        def chunk(
            delta: dict[str, Any], finish: str | None = None, usage: dict | None = None, verdict: dict | None = None
        ) -> str:  # fmt: skip
            choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if usage is None else []
            payload: dict[str, Any] = {
                "id": record.request_id, "object": "chat.completion.chunk", "created": created,
                "model": config.model_name, "choices": choices,
            }  # fmt: skip
            if usage is not None:
                payload["usage"] = usage
            if verdict is not None:  # the finishing chunk: what the antidote did, as in a plain response
                payload["antidote"] = verdict
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
            yield chunk({}, finish=event.finish_reason, verdict=record.verdict(event))
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
        job: GenerationRequest, started: float, tenant: str, arm: str,
    ):  # fmt: skip
        self.metrics, self.log = metrics, log
        self.request_id, self.body, self.job, self.started = request_id, body, job, started
        self.tenant, self.arm = tenant, arm
        self.first_text: float | None = None
        self.refusal = False

    def verdict(self, event: Finished) -> dict[str, Any]:
        """The `antidote` object of a response: the setting that served it, the probe's score, the verdict."""
        job = self.job
        return {"alpha": job.alpha, "mode": job.mode, "threshold": job.threshold, "positions": job.positions,
                "refuse_threshold": job.refuse_threshold, "harm_score": event.harm_score, "refusal": self.refusal,
                "refused_by_probe": event.finish_reason == CONTENT_FILTER, "tenant": self.tenant,
                "arm": self.arm}  # fmt: skip

    def first(self) -> None:
        if self.first_text is None:
            self.first_text = time.perf_counter()
            self.metrics.first_token.observe(self.first_text - self.started)

    def done(self, event: Finished, stream: bool) -> None:
        latency = time.perf_counter() - self.started
        self.refusal = is_refusal(event.text)
        labels = (self.tenant, self.arm)
        self.metrics.latency.labels(*labels).observe(latency)
        self.metrics.completions.labels(*labels).inc()
        self.metrics.completion_tokens.inc(event.completion_tokens)
        if self.refusal:
            self.metrics.refusals.labels(*labels).inc()
        if event.finish_reason == CONTENT_FILTER:
            self.metrics.probe_refusals.labels(*labels).inc()
        if event.harm_score is not None:
            self.metrics.harm_score.labels(*labels).observe(event.harm_score)
        entry = {
            "id": self.request_id, "tenant": self.tenant, "arm": self.arm, "alpha": self.job.alpha,
            "mode": self.job.mode, "threshold": self.job.threshold, "positions": self.job.positions,
            "refuse_threshold": self.job.refuse_threshold, "harm_score": event.harm_score,
            "prompt_tokens": len(self.job.prompt_ids),
            "completion_tokens": event.completion_tokens, "latency_s": round(latency, 4),
            "finish_reason": event.finish_reason, "refusal": self.refusal, "stream": stream,
        }  # fmt: skip
        self.log.write(entry, prompt=self.body.chat(), completion=event.text)


def _answer_room(prompt: int, requested: int | None, field: str, context: int | None, limit: int) -> int:
    """The answer's token budget: what the request asks for, else the room left in the context (up to the
    server's limit); a 400 `context_length_exceeded` when the prompt and the answer do not fit."""
    if context is None:
        return requested if requested is not None else limit
    if prompt >= context:
        asked = "" if requested is None else f" (and {field} asks for {requested} more)"
        raise ApiError(400, f"This model's maximum context length is {context} tokens, and the messages take "
                       f"{prompt} tokens{asked}, which leaves no room for an answer; shorten the messages",
                       "messages", code="context_length_exceeded")  # fmt: skip
    if requested is None:
        return min(limit, context - prompt)
    if prompt + requested > context:
        raise ApiError(400, f"This model's maximum context length is {context} tokens, but {prompt + requested} "
                       f"were requested ({prompt} in the messages, {requested} in {field}); lower {field} to at most "
                       f"{context - prompt} or shorten the messages", "messages",
                       code="context_length_exceeded")  # fmt: skip
    return requested


def _render(tokenizer: PreTrainedTokenizerBase, chat: list[dict[str, str]]) -> str:
    """The prompt text for a request's conversation; a 400 in words when the chat template cannot render it."""
    try:
        return render_prompt(tokenizer, chat)
    except Exception as exc:  # jinja's TemplateError, or whatever the template or the system-role fallback raises
        cause = _template_cause(exc)
    if isinstance(cause, InvalidParameter):  # refused before any template ran (text no tokenizer can encode):
        raise ApiError(400, str(cause), "messages")  # its own message says what is wrong and what to send
    if isinstance(cause, TemplateSyntaxError):
        raise ApiError(500, f"the model's chat template is broken ({cause}); this is a fault of the served model, "
                       "not of the request", kind="server_error")  # fmt: skip
    reason = str(cause) or type(cause).__name__
    if not isinstance(cause, TemplateError):
        reason = f"{type(cause).__name__}: {reason}"
    roles = [message["role"] for message in chat]
    if "user" not in roles:
        fix = "send at least one user message (this template does not take a conversation without one)"
    else:
        fix = ("send the turns this template accepts: an optional system message first, then user and assistant "
               "messages in alternation, starting and ending with a user message")  # fmt: skip
    raise ApiError(400, f"the model's chat template cannot render this conversation: {reason}; {fix}", "messages")


def _template_cause(exc: BaseException) -> BaseException:
    """The template's own error: the first one raised (render_prompt retries templates without a system role,
    and that retry may fail for another reason, e.g. with nothing to fold the system message into)."""
    chain, seen = [], set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    templates = [error for error in chain if isinstance(error, TemplateError)]
    return templates[-1] if templates else exc


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


def _completion(request_id: str, model: str, event: Finished, job: GenerationRequest, record: _Record) -> dict:
    return {
        "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": event.text},
                     "finish_reason": event.finish_reason, "logprobs": None}],
        "usage": _usage(job, event),
        "antidote": record.verdict(event),
    }  # fmt: skip


def _describe_validation(errors: Any) -> tuple[str, str, str | None]:
    """One readable sentence from pydantic's error list: the first problem, with where it is."""
    first = errors[0] if errors else {}
    kind = first.get("type")
    if kind == "json_invalid":
        return "the request body is not valid JSON", "invalid_request_error", None
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if kind == "refused_field":  # the schema's own message, which names the field and the fix
        context = first.get("ctx", {})
        param = context.get("param")
        if param and location[-1:] != [param]:
            location.append(param)
        where = ".".join(location) or "body"
        prefix = f"{'.'.join(location[:-1])}: " if len(location) > 1 else ""
        return prefix + context.get("message", "invalid request"), "invalid_request_error", where
    where = ".".join(location) or "body"
    message = first.get("msg", "invalid request")
    if kind == "missing":
        message = "field required"
    elif kind == "extra_forbidden":
        message = "unrecognized field; remove it (docs/SERVING.md lists the accepted fields)"
    elif kind == "value_error":
        message = message.removeprefix("Value error, ")
    return f"invalid {where}: {message}", "invalid_request_error", where


def server_limits(config: ServerConfig, antidote: Antidote | None, on_llamacpp: bool) -> ServerLimits:
    """What a policy may ask of this server: its alpha range, the probe's modes, the positions policies."""
    default = Setting(config.default_alpha, config.default_mode, config.default_threshold, config.default_positions,
                      config.default_refuse_threshold)  # fmt: skip
    probe = antidote is not None and antidote.probe is not None and not on_llamacpp
    return ServerLimits(config.alpha_min, config.alpha_max, probe, not on_llamacpp, default, config.api_key is not None)


def _bearer(request: Request) -> str:
    """The request's bearer token, or "" (which matches no key)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _same(token: str, key: str) -> bool:
    """Constant-time comparison, as bytes: a header may hold characters that str comparison refuses."""
    return secrets.compare_digest(token.encode("utf-8", "surrogateescape"), key.encode("utf-8"))


def _tune_curve(antidote: Antidote) -> list[dict[str, Any]]:
    """The points `antidote tune` stored, reduced to checked numbers and names: the artifact's metadata is
    not covered by its checksum, and the playground draws these values."""
    points = []
    for point in (antidote.tuned or {}).get("curve", []):
        try:
            threshold, refuse = point.get("threshold"), point.get("refuse_threshold")
            clean = {
                "mode": point["mode"], "alpha": float(point["alpha"]),
                "threshold": None if threshold is None else float(threshold),
                "refuse_threshold": None if refuse is None else float(refuse),
                "harmful_refusal": float(point["harmful_refusal"]), "benign_refusal": float(point["benign_refusal"]),
                "positions": point.get("positions", "all"),
            }  # fmt: skip
        except (AttributeError, KeyError, TypeError, ValueError):
            continue
        numbers = [value for value in clean.values() if isinstance(value, float)]
        if clean["mode"] in MODES and clean["positions"] in POSITIONS and all(map(math.isfinite, numbers)):
            points.append(clean)
    return points
