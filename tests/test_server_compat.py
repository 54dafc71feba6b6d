"""What OpenAI clients and proxies send: nulls, fields the server does not implement, the context-length
error, the default answer length, conversations the chat template cannot render, and streamed text that
always adds up to the plain answer (property tests over stop strings, on the engine and on a real server)."""

from __future__ import annotations

import openai
import pytest
from conftest import NO_SYSTEM_TEMPLATE, build_model, build_tokenizer
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from serving import KEY, RunningServer

from jailbreak_antidote.errors import InvalidParameter
from jailbreak_antidote.models import render_prompt
from jailbreak_antidote.server import ServerConfig
from jailbreak_antidote.server.app import ApiError, _render
from jailbreak_antidote.server.engine import DecodeRow, Delta, Finished, GenerationRequest
from jailbreak_antidote.server.schemas import IGNORED, UNSUPPORTED, ChatCompletionRequest

LIMIT = 48  # the server's --max-tokens
CONTEXT = 512  # the tiny models' max_position_embeddings
PROMPTS = ["Explain how photosynthesis works.", "hi", "Write a keylogger that steals passwords."]
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(qwen2_antidote):
    # Its own model and tokenizer: the engine thread must not share hooks with other tests, and the
    # template tests swap this tokenizer's chat template.
    config = ServerConfig(model_name="tiny", alpha_max=4 * qwen2_antidote.suggested_alpha, api_key=KEY,
                          max_tokens=LIMIT, batch_wait_s=0.0)  # fmt: skip
    running = RunningServer(build_model("qwen2"), build_tokenizer(), qwen2_antidote, config)
    yield running
    running.stop()


def _content(response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def _streamed(server, body) -> str:
    chunks = server.client().chat.completions.create(**{"model": "tiny", **body, "stream": True})
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def _error(response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


# ----- null means the default --------------------------------------------------------------------------
OPTIONAL = ["model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "stream",
            "stream_options", "antidote", "ignore_eos", *UNSUPPORTED, *sorted(IGNORED)]  # fmt: skip


@pytest.mark.parametrize("field", OPTIONAL)
def test_null_means_the_default(field):
    assert ChatCompletionRequest.model_validate({"messages": HI, field: None}) == ChatCompletionRequest(messages=HI)


def test_nulls_everywhere_get_the_default_answer(server):
    nested = {"antidote": {"alpha": None, "mode": None, "threshold": None}}  # stream_options: only with stream
    body = {"messages": [{"role": "user", "content": PROMPTS[0], "name": None}], "max_tokens": 8}
    nulls = {field: None for field in OPTIONAL if field != "max_tokens"}
    assert _content(server.post({**body, **nulls})) == _content(server.post(body))
    assert _content(server.post({**body, **nulls, **nested})) == _content(server.post(body))


# ----- fields the server does not implement: accepted at their no-op value, else a 400 naming them -------
NO_OP = {
    "n": 1, "logprobs": False, "top_logprobs": 0, "logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0.0,
    "response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "parallel_tool_calls": True,
    "functions": [], "function_call": "none", "modalities": ["text"], "verbosity": "medium",
    "user": "someone", "metadata": {"a": "b"}, "store": False, "service_tier": "auto", "prompt_cache_key": "k",
    "safety_identifier": "s",
}  # fmt: skip
REFUSED = [
    ("n", 2), ("logprobs", True), ("top_logprobs", 3), ("logit_bias", {"50": 10}), ("presence_penalty", 0.5),
    ("frequency_penalty", -1), ("response_format", {"type": "json_object"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]), ("tool_choice", "required"),
    ("tool_choice", {"type": "function", "function": {"name": "f"}}), ("parallel_tool_calls", False),
    ("functions", [{"name": "f"}]), ("function_call", {"name": "f"}), ("modalities", ["text", "audio"]),
    ("audio", {"voice": "alloy", "format": "wav"}), ("prediction", {"type": "content", "content": "x"}),
    ("reasoning_effort", "low"), ("verbosity", "high"), ("web_search_options", {}), ("n", True),
    ("top_k", 40), ("repetition_penalty", 1.1), ("min_p", 0.1),
]  # fmt: skip


def test_the_policy_covers_every_openai_field_once():
    assert not set(UNSUPPORTED) & set(IGNORED)
    assert not (set(UNSUPPORTED) | set(IGNORED)) & set(ChatCompletionRequest.model_fields)
    assert {field for field, _ in REFUSED} - {"top_k", "repetition_penalty", "min_p"} == set(UNSUPPORTED)


def test_no_op_values_and_metadata_are_accepted(server):
    body = {"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 8}
    plain = _content(server.post(body))
    assert _content(server.post({**body, **NO_OP})) == plain
    assert _content(server.post({**body, "tool_choice": "auto", "function_call": "auto"})) == plain


@pytest.mark.parametrize(("field", "value"), REFUSED)
def test_unsupported_values_are_refused_by_name(server, field, value):
    error = _error(server.post({"messages": HI, "max_tokens": 4, field: value}))
    assert error["param"] == field and field in error["message"] and error["type"] == "invalid_request_error"


def test_several_unknown_fields_are_named_together(server):
    error = _error(server.post({"messages": HI, "top_k": 4, "best_of": 2}))
    assert "'top_k', 'best_of'" in error["message"] and "unrecognized" in error["message"]


@pytest.mark.parametrize(
    ("message", "param", "needle"),
    [
        ({"role": "tool", "content": "42", "tool_call_id": "c1"}, "messages.0.role", "tool calling"),
        ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]},
         "messages.0.content", "image_url"),
        ({"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
         "messages.0.tool_calls", "tool_calls"),
        ({"role": "user"}, "messages.0.content", "needs content"),
        ({"role": "user", "content": 5}, "messages.0.content", "content must be a string"),
        ({"role": "user", "content": [{"type": "text"}]}, "messages.0.content", "part 0 is not a text part"),
        ({"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}]}, "messages.0.content",
         "'cache_control'"),
        ({"role": "user", "content": "hi", "colour": "red"}, "messages.0.colour", "unrecognized"),
    ],
)  # fmt: skip
def test_message_fields_the_server_cannot_use_are_refused(server, message, param, needle):
    error = _error(server.post({"messages": [message]}))
    assert error["param"] == param and needle in error["message"]


def test_message_names_and_null_assistant_content_are_accepted(server):
    messages = [{"role": "user", "content": "hi", "name": "ann"}, {"role": "assistant", "content": None},
                {"role": "user", "content": [{"type": "text", "text": "hello"}]}]  # fmt: skip
    assert server.post({"messages": messages, "max_tokens": 4}).status_code == 200


@pytest.mark.parametrize(
    ("value", "expected"),
    [("", []), ([""], []), ("a", ["a"]), (["a", "", "a", "b"], ["a", "b"]), (None, []), (["x"] * 6, ["x"])],
)
def test_stop_is_normalised_in_one_place(value, expected):
    assert ChatCompletionRequest.model_validate({"messages": HI, "stop": value}).stop == expected


def test_bad_values_name_the_field_and_the_fix(server):
    error = _error(server.post({"messages": HI, "stop": ["a", "b", "c", "d", "e"]}))
    assert error["param"] == "stop" and "at most 4" in error["message"]
    error = _error(server.post({"messages": HI, "max_tokens": 4, "max_completion_tokens": 5}))
    assert "max_tokens (4) and max_completion_tokens (5)" in error["message"]
    error = _error(server.post({"messages": HI, "max_completion_tokens": 1000}))
    assert error["param"] == "max_completion_tokens" and f"at most {LIMIT}" in error["message"]
    error = _error(server.post({"messages": HI, "seed": 2**70}))  # once a 500: torch cannot take such a seed
    assert error["param"] == "seed"


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("max_tokens", True, "max_tokens"), ("max_tokens", "2", "max_tokens"), ("max_completion_tokens", "2",
        "max_completion_tokens"), ("temperature", "0.5", "temperature"), ("temperature", False, "temperature"),
        ("top_p", "1", "top_p"), ("seed", "3", "seed"), ("seed", True, "seed"),
        ("antidote", {"alpha": "0.1"}, "antidote.alpha"), ("antidote", {"threshold": True}, "antidote.threshold"),
    ],
)  # fmt: skip
def test_numbers_must_be_json_numbers(server, field, value, param):
    # Once coerced: `true` was max_tokens 1, "0.5" a temperature.
    error = _error(server.post({"messages": HI, field: value}))
    assert error["param"] == param and "must be a number" in error["message"]


def test_integers_are_numbers_for_float_fields():
    body = {"messages": HI, "temperature": 0, "top_p": 1, "antidote": {"alpha": 0, "threshold": 1}}
    request = ChatCompletionRequest.model_validate(body)
    assert (request.temperature, request.top_p, request.antidote.alpha) == (0.0, 1.0, 0.0)
    assert ChatCompletionRequest.model_validate({"messages": HI, "max_tokens": 2.0}).max_tokens == 2


@pytest.mark.parametrize("stream", [False, None, "absent"])
def test_stream_options_need_stream(server, stream):
    body = {"messages": HI, "stream_options": {"include_usage": True}}
    if stream != "absent":
        body["stream"] = stream
    error = _error(server.post(body))
    assert error["param"] == "stream_options" and "only allowed when stream is true" in error["message"]


def test_stream_options_with_stream_or_null_are_accepted():
    for extra in (
        {"stream_options": None},
        {"stream": True, "stream_options": {"include_usage": None}},
        {"stream": True, "stream_options": {"include_usage": False, "include_obfuscation": True}},
    ):
        ChatCompletionRequest.model_validate({"messages": HI, **extra})


# ----- text no tokenizer can encode, and faults of the server --------------------------------------------
LONE = '"a\\ud800b"'  # the JSON escape of an unpaired UTF-16 surrogate (json.dumps would not let one through)


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        (f'[{{"role": "user", "content": {LONE}}}]', "messages.0.content"),
        (f'[{{"role": "system", "content": {LONE}}}, {{"role": "user", "content": "hi"}}]', "messages.0.content"),
        (f'[{{"role": "user", "content": [{{"type": "text", "text": "hi"}}, {{"type": "text", "text": {LONE}}}]}}]',
         "messages.0.content.1.text"),
        (f'[{{"role": "user", "content": "hi"}}], "stop": {LONE}', "stop"),
        (f'[{{"role": "user", "content": "hi"}}], "tool_choice": {LONE}', "tool_choice"),
    ],
)  # fmt: skip
def test_a_lone_surrogate_is_a_400_naming_the_field(server, messages, param):
    raw = f'{{"messages": {messages}, "max_tokens": 2}}'.encode()
    error = _error(server.post(None, content=raw, headers={"Content-Type": "application/json"}))
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert "lone surrogate" in error["message"] and "valid Unicode" in error["message"]
    assert "chat template" not in error["message"]


def test_render_turns_invalid_text_into_a_400_in_its_own_words(monkeypatch):
    def refuse(*_args):
        raise InvalidParameter("a prompt holds a lone surrogate; fix the text to valid Unicode")

    monkeypatch.setattr("jailbreak_antidote.server.app.render_prompt", refuse)
    with pytest.raises(ApiError) as raised:
        _render(None, HI)
    assert (raised.value.status, raised.value.param) == (400, "messages")
    assert raised.value.message == "a prompt holds a lone surrogate; fix the text to valid Unicode"


def test_an_unexpected_fault_is_a_500_envelope(server, monkeypatch):
    def fail(_job):
        raise RuntimeError("boom")

    monkeypatch.setattr(server.server.config.app.state.engine, "submit", fail)
    response = server.post({"messages": HI, "max_tokens": 1})
    assert response.headers["content-type"] == "application/json"
    error = _error(response, 500)
    assert error["type"] == "server_error" and "boom" not in error["message"]
    monkeypatch.undo()
    assert server.post({"messages": HI, "max_tokens": 1}).status_code == 200  # and it keeps serving


def test_top_p_zero_is_greedy(server):
    body = {"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 8}
    assert _content(server.post({**body, "temperature": 1.0, "top_p": 0})) == _content(server.post(body))


# ----- context length and the default answer length ---------------------------------------------------
def _prompt_of(server, tokens: int) -> list[dict[str, str]]:
    """The longest conversation of repeated words whose rendered prompt takes at most `tokens` tokens."""

    def chat(words: int) -> list[dict[str, str]]:
        return [{"role": "user", "content": "hi " * words}]

    def length(words: int) -> int:
        text = render_prompt(server.tokenizer, chat(words))
        return len(server.tokenizer(text, add_special_tokens=False)["input_ids"])

    low, high = 0, tokens  # length(low) <= tokens < length(high + 1), as every word takes a token at least
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if length(middle) <= tokens else (low, middle - 1)
    return chat(low)


def test_without_max_tokens_the_answer_gets_the_room_left(server):
    short = server.post({"messages": HI, "ignore_eos": True}).json()
    assert short["usage"]["completion_tokens"] == LIMIT  # plenty of room: the server's limit
    long_prompt = _prompt_of(server, CONTEXT - 10)
    answer = server.post({"messages": long_prompt, "ignore_eos": True}).json()
    prompt = answer["usage"]["prompt_tokens"]
    assert CONTEXT - LIMIT < prompt < CONTEXT
    assert answer["usage"]["completion_tokens"] == CONTEXT - prompt  # what is left, not a fixed reserve
    assert answer["choices"][0]["finish_reason"] == "length"


def test_context_length_exceeded_is_openais_error(server):
    long_prompt = _prompt_of(server, CONTEXT - 10)
    error = _error(server.post({"messages": long_prompt, "max_tokens": 20}))
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert str(CONTEXT) in error["message"] and "in the messages, 20 in max_tokens" in error["message"]
    full = [{"role": "user", "content": "hi " * 600}]
    for body in ({"messages": full}, {"messages": full, "max_completion_tokens": 4}):
        error = _error(server.post(body))
        assert error["code"] == "context_length_exceeded" and f"maximum context length is {CONTEXT}" in error["message"]
    with pytest.raises(openai.BadRequestError) as raised:
        server.client().chat.completions.create(model="tiny", messages=full)
    assert raised.value.code == "context_length_exceeded"


# ----- conversations the chat template cannot render -----------------------------------------------------
RAISES = "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
DIVIDES = "{{ 1 // 0 }}"
UNDEFINED = "{{ messages[0]['content'].nothing.deeper }}"
EMPTY = "{% for m in messages %}{% endfor %}"


@pytest.mark.parametrize(
    ("template", "messages", "needle"),
    [
        (NO_SYSTEM_TEMPLATE, [{"role": "system", "content": "Be safe."}], "System role not supported"),
        (NO_SYSTEM_TEMPLATE, [{"role": "developer", "content": "Be safe."}], "System role not supported"),
        (RAISES, HI, "Conversation roles must alternate"),
        (DIVIDES, HI, "ZeroDivisionError"),
        (UNDEFINED, HI, "nothing"),
        (EMPTY, HI, "empty prompt"),
    ],
)
def test_a_conversation_the_template_cannot_render_is_a_400_in_words(server, template, messages, needle):
    original = server.tokenizer.chat_template
    server.tokenizer.chat_template = template
    try:
        error = _error(server.post({"messages": messages, "max_tokens": 4}))
    finally:
        server.tokenizer.chat_template = original
    assert needle in error["message"] and error["param"] == "messages"
    assert "unpack" not in error["message"]
    if template != EMPTY:
        assert error["message"].startswith("the model's chat template cannot render this conversation: ")


def test_a_system_message_is_folded_where_the_template_has_no_system_role(server):
    original = server.tokenizer.chat_template
    server.tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    try:
        messages = [{"role": "system", "content": "Be safe."}, {"role": "user", "content": "hi"}]
        assert server.post({"messages": messages, "max_tokens": 4}).status_code == 200
    finally:
        server.tokenizer.chat_template = original


def test_a_broken_template_is_the_servers_fault():
    tokenizer = build_tokenizer("{% for m in messages %}")
    with pytest.raises(ApiError) as raised:
        _render(tokenizer, HI)
    assert raised.value.status == 500 and "broken" in raised.value.message


# ----- streamed text adds up to the plain answer ----------------------------------------------------------
class ByteTokenizer:
    """Tokens are byte strings, decoded together as lossy UTF-8 (as byte-level BPE decodes), optionally with
    transformers' clean-up of spaces before punctuation."""

    VOCAB = (b"a", b"b", b" ", b".", b"?", b"'", b"s", b"n't", b" n", b"ab", b" .", b"\xe2", b"\x82", b"\xac",
             b"\xe2\x82", b"\x82\xac", b"\xf0\x9f", b"\x98\x80", b"\x80", b"\xff", b"\xc3\xa9")  # fmt: skip

    def __init__(self, cleanup: bool):
        self.clean_up_tokenization_spaces = cleanup

    def decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        text = b"".join(self.VOCAB[t] for t in tokens).decode("utf-8", errors="replace")
        if self.clean_up_tokenization_spaces:  # transformers' clean_up_tokenization
            for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
                text = text.replace(old, new)
        return text


def _decode_row(tokens: list[int], stops: list[str], cleanup: bool) -> tuple[str, Finished]:
    events: list = []
    request = GenerationRequest(prompt_ids=[0], max_tokens=len(tokens), stop=stops, on_event=events.append)
    row = DecodeRow(request, ByteTokenizer(cleanup))
    for token in tokens:
        if (reason := row.add(token, eos_ids=set())) is not None:
            row.finish(reason)
            break
    assert isinstance(events[-1], Finished) and all(isinstance(event, Delta) for event in events[:-1])
    return "".join(event.text for event in events[:-1]), events[-1]


TOKENS = st.lists(st.integers(0, len(ByteTokenizer.VOCAB) - 1), min_size=1, max_size=12)
STOP_TEXT = st.text(alphabet="ab .?'sné€😀\ufffd", max_size=4)
SLICES = st.lists(st.tuples(st.integers(0, 12), st.integers(1, 4)), max_size=2)  # stops cut from the answer


@settings(max_examples=300, deadline=None, database=None)
@given(tokens=TOKENS, stops=st.lists(STOP_TEXT, max_size=3), slices=SLICES, cleanup=st.booleans())
@example(tokens=[0, 1], stops=[""], slices=[], cleanup=False)  # once: every delta after the first lost a character
@example(tokens=[2, 0, 11, 15], stops=["a€"], slices=[], cleanup=False)  # once: "a" sent while "€" was half decoded
@example(tokens=[0, 2, 3], stops=[], slices=[], cleanup=True)  # once: " " streamed, then cleaned up into "a."
def test_engine_deltas_add_up_to_the_answer(tokens, stops, slices, cleanup):
    full = ByteTokenizer(cleanup).decode(tokens)
    stops = stops + [full[start : start + size] for start, size in slices if start < len(full)]  # text it will meet
    streamed, finished = _decode_row(tokens, stops, cleanup)
    event(f"finish: {finished.finish_reason}")
    assert streamed == finished.text
    if not any("\ufffd" in stop for stop in stops):  # a provisional U+FFFD may match such a stop early
        # Generation stops at the first token after which some stop string is in the text, cut at the first one.
        prefixes = (ByteTokenizer(cleanup).decode(tokens[:k]) for k in range(1, len(tokens) + 1))
        text = next((text for text in prefixes if any(s and s in text for s in stops)), None)
        if text is None:
            assert (finished.text, finished.finish_reason) == (full, "length")
        else:
            cut = min(text.find(s) for s in stops if s and s in text)
            assert (finished.text, finished.finish_reason) == (text[:cut], "stop")


@pytest.fixture(scope="module")
def answers(server):
    """The plain greedy answer to each prompt, without stop strings."""
    return {prompt: _content(server.post(_stop_body(prompt, None))) for prompt in PROMPTS}


def _stop_body(prompt: str, stop) -> dict:
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": 10, "temperature": 0, "stop": stop}


def _stops_for(answer: str):
    inside = st.integers(0, len(answer)).flatmap(
        lambda i: st.integers(i, min(len(answer), i + 4)).map(lambda j: answer[i:j])
    )
    one = st.one_of(st.just(""), st.text(max_size=1), st.text(min_size=2, max_size=5), inside, inside)
    return st.one_of(one, st.lists(one, max_size=4))


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_streamed_text_equals_the_plain_answer_for_any_stop(server, answers, data):
    prompt = data.draw(st.sampled_from(PROMPTS), label="prompt")
    stop = data.draw(_stops_for(answers[prompt]), label="stop")
    plain = _content(server.post(_stop_body(prompt, stop)))
    assert _streamed(server, _stop_body(prompt, stop)) == plain
    event("a stop string cuts the answer" if plain != answers[prompt] else "the answer is not cut")
    stops = {s for s in ([stop] if isinstance(stop, str) else stop) if s}
    if len(stops) == 1 and "\ufffd" not in (only := stops.pop()):  # then the first match is the first to end
        full = answers[prompt]
        assert plain == (full[: full.index(only)] if only in full else full)


UNICODE_PROMPTS = st.lists(
    st.one_of(st.sampled_from(["\u2028", "\u2029", "\x85", "\x1c", "\r\n", "\x00", "\t", "😀", "👩‍👩‍👧", "\ufeff"]),
              st.characters(exclude_categories=("Cs",))),
    min_size=1, max_size=30,
).map("".join)  # fmt: skip


@settings(max_examples=15, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=UNICODE_PROMPTS)
def test_streamed_text_equals_the_plain_answer_for_any_prompt(server, prompt):
    body = _stop_body(prompt, None)
    assert _streamed(server, body) == _content(server.post(body))
