"""Load a causal LM and its tokenizer (bundled name, GGUF file, local directory or hub id); chat formatting."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from . import bundled
from .blocks import decoder_blocks
from .errors import InvalidParameter, ModelLoadError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_fast_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AMX or AVX512-BF16). Without either, torch
    converts on the fly and bfloat16 runs slower than float32 (docs/BENCHMARKS.md)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # a torch without these probes: no grounds to warn
        return True


def load_model(
    spec: str | None = None, *, dtype: str = "float32", device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load `spec`: a bundled name (optionally `bundled:`-prefixed), a .gguf file, a local dir or a hub id.

    Returns the model in eval mode and a tokenizer that pads on the left (needed for batched generation).
    """
    spec = spec or bundled.DEFAULT_MODEL
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    path = Path(spec).expanduser()
    kwargs: dict[str, Any] = {}
    if spec.startswith("bundled:") or spec in bundled.BUNDLED:
        source = bundled.converted_dir(bundled.get(spec))
    elif path.is_file() and path.suffix == ".gguf":
        source, kwargs["gguf_file"] = path.parent, path.name
    elif path.is_dir():
        source = path
    elif not_a_model_path(spec):
        raise ModelLoadError(
            f"model path {spec!r} is not a model directory or a .gguf file; "
            f"bundled models are: {', '.join(bundled.BUNDLED)}"
        )
    else:
        source = spec  # a hub id; only works with network access or a filled HF cache
    hf_logging.disable_progress_bar()  # per-load "Loading weights" bars are noise in a CLI
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=_DTYPES[dtype], **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"could not load model {spec!r}: {str(exc).splitlines()[0]} "
            f"(give a bundled name ({', '.join(bundled.BUNDLED)}), a local directory, a .gguf file, "
            "or a hub id reachable from this machine)"
        ) from exc
    model.to(device).eval()
    model.config.antidote_source = spec
    prepare_tokenizer(tokenizer)
    return model, tokenizer


def not_a_model_path(spec: str) -> bool:
    """True if `spec` names a local path (or a .gguf) that is not a model directory or .gguf file: it cannot
    load, and is not a bundled name or hub id either. Checked before long work that loads the model later."""
    if spec.startswith("bundled:") or spec in bundled.BUNDLED:
        return False
    path = Path(spec).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return False
    return path.exists() or spec.endswith(".gguf") or spec.startswith((".", "/", "~"))


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Left padding so the last prompt token sits at position -1 of every row; a pad token if missing."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


Message = dict[str, str]
Chat = str | list[Message]  # a single user prompt, or a whole conversation


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Chat, system: str | None = None) -> str:
    """The prompt as the model sees it: chat template with the generation prompt appended.

    `prompt` is one user message or a list of messages (role/content). Templates that reject a system
    role (Gemma) get the system text folded into the first user turn.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    for message in messages:
        _check_encodable(message["content"])
    if not getattr(tokenizer, "chat_template", None):
        return _plain_format(messages)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja raises TemplateError("System role not supported") from the template
        if messages[0]["role"] != "system":
            raise
        if len(messages) == 1 or messages[1]["role"] != "user":
            raise InvalidParameter(
                f"the chat template has no system role ({exc}), and the system message can only be folded into "
                "a user message that follows it; start the conversation with a user message after the system one"
            ) from exc
        return tokenizer.apply_chat_template(_fold_system(messages), tokenize=False, add_generation_prompt=True)


def _check_encodable(text: str) -> None:
    """Text a tokenizer can encode: no lone surrogates (a JSON escape such as \\ud800 without its pair)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidParameter(
            f"a prompt holds a lone surrogate {text[exc.start]!r} at character {exc.start} (an unpaired UTF-16 escape "
            f"such as \\ud800), which no tokenizer can encode: {text[:50]!r}; fix the text to valid Unicode"
        ) from None


def _fold_system(messages: list[Message]) -> list[Message]:
    system, first, *rest = messages
    return [{"role": first["role"], "content": f"{system['content']}\n\n{first['content']}"}, *rest]


def _plain_format(messages: list[Message]) -> str:
    if messages[0]["role"] == "system" and len(messages) > 1:
        messages = _fold_system(messages)
    labels = {"system": "System", "user": "User"}
    turns = [f"{labels.get(m['role'], 'Assistant')}: {m['content']}" for m in messages]
    return "\n".join(turns) + "\nAssistant:"


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[Chat], system: str | None = None
) -> dict[str, torch.Tensor]:
    """Chat-format and tokenize a batch with left padding. The template already holds special tokens."""
    texts = [render_prompt(tokenizer, p, system) for p in prompts]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token counted from the first real token of its row: [batch, seq], padding at 0.

    A bare `model(**encoded)` on a left-padded batch numbers positions from the first column, so models with
    absolute position embeddings (GPT-2 family) read every shorter prompt at the wrong positions; `generate`
    does this counting itself. Rotary models only see relative offsets and are unaffected either way."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def with_positions(encoded: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tokenizer's batch plus `position_ids`, ready for a forward pass over a left-padded batch."""
    return {**encoded, "position_ids": position_ids(encoded["attention_mask"])}


def prompt_token_ids(
    tokenizer: PreTrainedTokenizerBase, prompts: list[Chat], system: str | None = None
) -> list[list[int]]:
    """Each prompt's token ids as the model reads it (chat template and generation prompt included)."""
    texts = [render_prompt(tokenizer, p, system) for p in prompts]
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def hidden_size(model: PreTrainedModel) -> int:
    return int(model.get_input_embeddings().weight.shape[1])


def model_identity_light(model: PreTrainedModel) -> dict[str, Any]:
    """The cheap part of the identity, enough to check an antidote against a model."""
    return {
        "name": str(getattr(model.config, "antidote_source", None) or model.config.name_or_path or ""),
        "architecture": type(model).__name__,
        "model_type": str(getattr(model.config, "model_type", "")),
        "hidden_size": hidden_size(model),
        "num_layers": len(decoder_blocks(model)),
        "weights_probe": weights_probe(model),
    }


def model_identity(model: PreTrainedModel) -> dict[str, Any]:
    """What an antidote records about the model it was fitted on, to refuse being applied to another."""
    return {**model_identity_light(model), "weights_sha256": weights_digest(model)}


def _probe_tensors(model: PreTrainedModel) -> list[torch.Tensor]:
    last_block_matrix = next(p for p in decoder_blocks(model)[-1].parameters() if p.dim() == 2)
    return [model.get_input_embeddings().weight, last_block_matrix]


def weights_probe(
    model: PreTrainedModel | None, per_tensor: int = 32, tensors: list[torch.Tensor] | None = None
) -> list[float]:
    """A few weights at fixed, evenly spaced positions of `model`'s probe tensors (or of `tensors`, the same
    tensors read from a checkpoint). Compared with a tolerance, so a bfloat16 load of the same weights still
    matches while a different model does not."""
    values: list[float] = []
    for weight in tensors if tensors is not None else _probe_tensors(model):
        flat = weight.detach().reshape(-1)
        index = (torch.arange(per_tensor) * (flat.numel() - 1) // (per_tensor - 1)).to(flat.device)
        values += flat[index].float().cpu().tolist()
    return values


def weights_digest(model: PreTrainedModel) -> str:
    """Exact sha256 of the probed tensors, for provenance (the check itself uses weights_probe)."""
    digest = hashlib.sha256()
    for weight in _probe_tensors(model):
        digest.update(weight.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def cache_argument(model: PreTrainedModel) -> str:
    """transformers 5.x renamed `past_key_values` to `cache`; use whichever this version takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(output: object) -> object:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values  # type: ignore[attr-defined]
