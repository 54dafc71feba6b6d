"""The OpenAI chat-completions request schema (the part we serve), plus the `antidote` extension field.

Every request field is normalised here, once, by the validators below, so the rest of the server sees one
form of each field:

- `null` for any optional field means the field's default (as in the OpenAI API);
- `stop` is a list of distinct, non-empty strings (a string becomes a one-element list, `""` is dropped);
- numbers are JSON numbers: a boolean or a string (`true`, `"0.5"`) is refused, not coerced;
- no string holds a lone surrogate (JSON's `"\\ud800"`), which no tokenizer can encode;
- `stream_options` comes only with `stream: true`;
- the OpenAI fields this server does not implement (`UNSUPPORTED`) are accepted at their no-op value and
  refused otherwise, with a message naming the field; metadata fields (`IGNORED`) are accepted and have no
  effect on the answer; any other field is refused as unrecognised (as the OpenAI API does).

docs/SERVING.md lists the same fields; keep the two in step.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, field_validator, model_validator
from pydantic_core import PydanticCustomError

# Accepted and ignored: they describe the caller or the bill, not the answer.
IGNORED = frozenset(
    {"metadata", "store", "service_tier", "prompt_cache_key", "prompt_cache_retention", "safety_identifier"}
)


def _number(value: Any, target: float) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == target


# OpenAI fields this server does not implement: field -> (is this value a no-op?, what to send instead).
# A no-op value (and null) is accepted; any other value is a 400 naming the field.
UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (lambda v: _number(v, 1), "this server returns one choice per request; send n = 1 or leave it out"),
    "logprobs": (lambda v: v is False, "log probabilities are not returned; send logprobs false or leave it out"),
    "top_logprobs": (lambda v: _number(v, 0), "log probabilities are not returned; leave top_logprobs out"),
    "logit_bias": (lambda v: v == {}, "logit bias is not implemented; send an empty object or leave it out"),
    "presence_penalty": (lambda v: _number(v, 0), "penalties are not implemented; send 0 or leave it out"),
    "frequency_penalty": (lambda v: _number(v, 0), "penalties are not implemented; send 0 or leave it out"),
    "response_format": (
        lambda v: v == {"type": "text"},
        'structured output (JSON mode, JSON schema) is not implemented; send {"type": "text"} or leave it out',
    ),
    "tools": (lambda v: v == [], "tool calling is not implemented; leave tools out"),
    "tool_choice": (lambda v: v in ("none", "auto"), "tool calling is not implemented; leave tool_choice out"),
    "parallel_tool_calls": (lambda v: v is True, "tool calling is not implemented; leave parallel_tool_calls out"),
    "functions": (lambda v: v == [], "function calling is not implemented; leave functions out"),
    "function_call": (lambda v: v in ("none", "auto"), "function calling is not implemented; leave it out"),
    "modalities": (lambda v: v == ["text"], 'this server answers in text only; send ["text"] or leave it out'),
    "audio": (lambda v: False, "this server answers in text only; leave audio out"),
    "prediction": (lambda v: False, "predicted outputs are not implemented; leave prediction out"),
    "reasoning_effort": (lambda v: False, "this server has no reasoning-effort setting; leave it out"),
    "verbosity": (lambda v: v == "medium", "this server has no verbosity setting; leave it out"),
    "web_search_options": (lambda v: False, "web search is not implemented; leave web_search_options out"),
}


def _refuse(param: str, message: str) -> PydanticCustomError:
    """A validation error that the app turns into a 400 with `param` and this message as they are."""
    return PydanticCustomError("refused_field", "{message}", {"message": message, "param": param})


def _json_number(value: Any) -> Any:
    """Numbers are JSON numbers: pydantic's lax mode would read `true` as 1 and `"0.5"` as 0.5."""
    if isinstance(value, bool):
        raise PydanticCustomError("number_type", "must be a number, not a boolean ({value})", {"value": _show(value)})
    if isinstance(value, str):
        raise PydanticCustomError(
            "number_type", "must be a number, not a string ({value}); send the number without quotes",
            {"value": _show(value)},
        )  # fmt: skip
    return value


# The numeric request fields: a float field takes integers too ("temperature": 0), an integer field takes 2.0.
Number = Annotated[float, BeforeValidator(_json_number)]
Integer = Annotated[int, BeforeValidator(_json_number)]


def _lone_surrogate(data: Any) -> tuple[str, bool] | None:
    """Where the first string holding a lone surrogate is, as a dotted path, and whether it is a field name."""
    stack: list[tuple[tuple[str, ...], Any]] = [((), data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str) and _unencodable(value):
            return ".".join(path), False
        if isinstance(value, dict):
            for key in value:
                if isinstance(key, str) and _unencodable(key):
                    return ".".join(path), True
            stack.extend(((*path, str(key)), item) for key, item in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend(((*path, str(i)), item) for i, item in reversed(list(enumerate(value))))
    return None


def _unencodable(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # only a lone surrogate cannot be encoded
        return True
    return False


def _without_nulls(data: Any) -> Any:
    return {key: value for key, value in data.items() if value is not None} if isinstance(data, dict) else data


class _Strict(BaseModel):
    """Unknown fields are refused; `null` for an optional field means its default."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        return _without_nulls(data)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None  # accepted; the chat templates have no place for it

    @model_validator(mode="before")
    @classmethod
    def _no_tool_turns(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if data.get("role") in ("tool", "function"):
            raise _refuse("role", f"role {data['role']!r} is for tool calling, which this server does not "
                          "implement; use system, developer, user or assistant")  # fmt: skip
        for field in ("tool_calls", "function_call", "tool_call_id", "audio"):
            if data.get(field) not in (None, []):
                raise _refuse(field, f"{field} in a message needs tool calling or audio, which this server does not "
                              f"implement; leave {field} out")  # fmt: skip
        return {k: v for k, v in data.items() if k not in ("tool_calls", "function_call", "tool_call_id", "audio")}

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        shape = "a string, or a list of parts {'type': 'text', 'text': '...'}"
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise _refuse("content", f"content must be {shape}")
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind is not None and kind != "text":
                raise _refuse("content", f"content parts of type {kind!r} are not supported; this server takes "
                              f"text only ({shape})")  # fmt: skip
            if kind is None or not isinstance(part.get("text"), str):
                raise _refuse("content", f"content part {i} is not a text part; content must be {shape}")
            if extra := sorted(set(part) - {"type", "text"}):
                raise _refuse("content", f"content part {i} has fields this server does not implement: "
                              f"{', '.join(map(repr, extra))}; remove them")  # fmt: skip
        return value

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise _refuse("content", f"a {self.role} message needs content (a string or a list of text parts)")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class AntidoteOptions(_Strict):
    alpha: Number | None = Field(default=None, allow_inf_nan=False, description="Steering strength for this request")
    mode: Literal["fixed", "gated", "scaled", "monitor"] | None = Field(
        default=None, description="How the harm probe sets it"
    )
    threshold: Number | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False, description="Gated mode")
    positions: Literal["all", "prompt", "generated"] | None = Field(
        default=None, description="Which positions are steered: all (the paper), prompt (the prefill) or generated"
    )
    refuse_threshold: float | Literal["never"] | None = Field(
        default=None, description='Harm probability from which the prompt is refused outright, or "never"'
    )

    @field_validator("refuse_threshold", mode="before")
    @classmethod
    def _probability_or_never(cls, value: Any) -> Any:
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if value is None or value == "never" or (is_number and 0 <= value <= 1):  # NaN fails it
            return value
        raise _refuse("antidote.refuse_threshold", f'must be a harm probability in [0, 1] or "never" (do not '
                      f'refuse outright), got {_show(value)}')  # fmt: skip


class StreamOptions(_Strict):
    include_usage: StrictBool = False
    include_obfuscation: StrictBool = False  # accepted; server-sent events here carry no padding


class ChatCompletionRequest(_Strict):
    """What OpenAI clients send, normalised: see the module docstring for nulls, `stop` and unknown fields."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Integer | None = Field(default=None, ge=1)
    max_completion_tokens: Integer | None = Field(default=None, ge=1)
    temperature: Number = Field(default=0.0, ge=0.0, le=2.0, allow_inf_nan=False, description="0: greedy")
    top_p: Number = Field(default=1.0, ge=0.0, le=1.0, allow_inf_nan=False)
    seed: Integer | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    stop: list[str] = Field(default_factory=list, description="Distinct, non-empty stop strings")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    antidote: AntidoteOptions | None = None
    ignore_eos: StrictBool = Field(default=False, description="Generate exactly max_tokens (vLLM's benchmark field)")
    user: str | None = Field(
        default=None, max_length=256, description="The end user's id: a staged rollout assigns its arm by it"
    )

    @model_validator(mode="before")
    @classmethod
    def _openai_fields(cls, data: Any) -> Any:
        """Lone surrogates refused, nulls dropped, unsupported fields checked and dropped at their no-op values,
        unknown fields refused."""
        if (found := _lone_surrogate(data)) is not None:
            where, in_name = found
            what = f"a field name in {where or 'the request'}" if in_name else where
            raise _refuse(where or "body", f"{what} holds a lone surrogate (an unpaired UTF-16 escape such as "
                          "\\ud800), which no tokenizer can encode; send valid Unicode (an escaped emoji is a "
                          "pair, high then low: \\ud83d\\ude00)")  # fmt: skip
        if not isinstance(data, dict):
            return data
        data = _without_nulls(data)  # here too: the no-op checks below must not see a null
        for field, (no_op, hint) in UNSUPPORTED.items():
            if field in data:
                if not no_op(data[field]):
                    raise _refuse(field, f"{field} = {_show(data[field])} is not supported: {hint}")
                del data[field]
        known = set(cls.model_fields) | IGNORED
        unknown = [key for key in data if key not in known]
        if unknown:
            names, them = ", ".join(repr(key) for key in unknown), "them" if len(unknown) > 1 else "it"
            raise _refuse(unknown[0], f"unrecognized request field{'s' if len(unknown) > 1 else ''} {names}: this "
                          f"server does not implement {them}; remove {them} (docs/SERVING.md lists the accepted "
                          "fields)")  # fmt: skip
        return {key: value for key, value in data.items() if key not in IGNORED}

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _distinct_stops(cls, value: list[str]) -> list[str]:
        stops = list(dict.fromkeys(s for s in value if s))  # "" would match everywhere: it means no stop
        if len(stops) > 4:
            raise _refuse("stop", f"{len(stops)} stop sequences given; at most 4 are allowed")
        return stops

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> ChatCompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise _refuse("stream_options", "stream_options is only allowed when stream is true; send stream true "
                          "or leave stream_options out")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _one_token_limit(self) -> ChatCompletionRequest:
        both = self.max_tokens is not None and self.max_completion_tokens is not None
        if both and self.max_tokens != self.max_completion_tokens:
            raise _refuse("max_completion_tokens", f"max_tokens ({self.max_tokens}) and max_completion_tokens "
                          f"({self.max_completion_tokens}) disagree; send one of them")  # fmt: skip
        return self

    def requested_tokens(self) -> int | None:
        """The answer length the request asks for; None: as much as the context and the server allow."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def token_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def chat(self) -> list[dict[str, str]]:
        """Messages for the chat template; `developer` is OpenAI's newer name for `system`."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: Any = None) -> dict:
    """OpenAI's error envelope, which its clients turn into typed exceptions."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
