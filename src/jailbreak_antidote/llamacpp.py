"""The llama.cpp backend (extra `[llamacpp]`): the original GGUF file, steered by the antidote as a llama.cpp
control vector set on the context at the requested alpha.

Prompts are rendered with the transformers tokenizer's chat template (as the transformers backend does) and
fed to llama.cpp as token ids; decoding, sampling and stop handling are the server engine's, so both
backends answer through one code path. The KV cache of the previous prompt is reused for a shared prefix,
but only while alpha is unchanged: cached states computed under another vector are thrown away.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from . import bundled
from .antidote import Antidote
from .context import check_lengths, prompt_names
from .errors import ArtifactMismatch, InvalidParameter, ModelLoadError
from .generate import FIX_TOO_LONG, Sampling, row_alphas
from .models import Chat, prepare_tokenizer, render_prompt
from .server.engine import BatchEngine, DecodeRow, Finished, GenerationRequest, choose_tokens

INSTALL_HINT = (
    "the llama.cpp backend needs llama-cpp-python: pip install -e '.[llamacpp]' "
    "(it compiles llama.cpp, about 11 minutes on 2 cores; see README)"
)


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise ModelLoadError(INSTALL_HINT) from None
    return llama_cpp


def extra_buffer_types_safe(llama_cpp: Any) -> bool:
    """Whether to let llama.cpp use its "extra" CPU buffer types (repacked weights: faster matmuls).

    Not with a build that has AMX: on machines here that report AMX under a hypervisor, ggml's AMX matmul
    dies with SIGILL (`tilezero` on an unconfigured tile). scripts/install-llamacpp.sh builds without AMX.
    ANTIDOTE_LLAMACPP_EXTRA_BUFTS=1 or =0 overrides the check."""
    override = os.environ.get("ANTIDOTE_LLAMACPP_EXTRA_BUFTS")
    if override in ("0", "1"):
        return override == "1"
    return "AMX_INT8 = 1" not in llama_cpp.llama_print_system_info().decode(errors="replace")


@contextlib.contextmanager
def _model_params(llama_cpp: Any, use_extra_bufts: bool) -> Iterator[None]:
    """The binding has no switch for `use_extra_bufts`, so its default-params factory is wrapped."""
    low_level = llama_cpp.llama_cpp
    original = low_level.llama_model_default_params

    def params() -> Any:
        value = original()
        value.use_extra_bufts = use_extra_bufts
        return value

    low_level.llama_model_default_params = params
    try:
        yield
    finally:
        low_level.llama_model_default_params = original


def resolve_gguf(spec: str | None) -> tuple[Path, str]:
    """(GGUF file, display name) for a bundled name or a .gguf path."""
    spec = spec or bundled.DEFAULT_MODEL
    if spec.startswith("bundled:") or spec in bundled.BUNDLED:
        model = bundled.get(spec)
        return bundled.assemble_gguf(model), model.name
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path, path.name
    raise ModelLoadError(
        f"the llama.cpp backend runs GGUF files: give a bundled name ({', '.join(bundled.BUNDLED)}) "
        f"or a .gguf file, not {spec!r}"
    )


def _tokenizer_for(spec: str | None, gguf_path: Path) -> PreTrainedTokenizerBase:
    """The transformers tokenizer of the same model (for its chat template and for decoding)."""
    spec = spec or bundled.DEFAULT_MODEL
    if spec.startswith("bundled:") or spec in bundled.BUNDLED:
        source, kwargs = bundled.converted_dir(bundled.get(spec)), {}
    else:
        source, kwargs = gguf_path.parent, {"gguf_file": gguf_path.name}
    return prepare_tokenizer(AutoTokenizer.from_pretrained(source, **kwargs))


class LlamaCppModel:
    """One llama.cpp context over a GGUF file, with the antidote as a context-level control vector."""

    backend_name = "llamacpp"

    def __init__(self, gguf_path: Path, name: str, tokenizer: PreTrainedTokenizerBase, n_ctx: int = 4096):
        llama_cpp = _llama_cpp()
        self.llama_cpp = llama_cpp
        self.name, self.gguf_path, self.tokenizer = name, gguf_path, tokenizer
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        with _model_params(llama_cpp, use_extra_bufts=extra_buffer_types_safe(llama_cpp)):
            self.llm = llama_cpp.Llama(
                model_path=str(gguf_path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False
            )
        self.n_embd = self.llm.n_embd()
        self.n_layer = int(llama_cpp.llama_model_n_layer(self.llm.model))
        self.n_vocab = self.llm.n_vocab()
        self.context_length = n_ctx
        self._vector: tuple[int, float] | None = None  # (id of the antidote, alpha) now set on the context
        self._cached: list[int] = []  # tokens whose states sit in the KV cache, under self._vector

    @classmethod
    def load(cls, spec: str | None = None, n_ctx: int = 4096) -> LlamaCppModel:
        gguf_path, name = resolve_gguf(spec)
        tokenizer = _tokenizer_for(spec, gguf_path)
        return cls(gguf_path, name, tokenizer, n_ctx=n_ctx)

    # ----- the antidote as a control vector -------------------------------------------------------------
    def validate(self, antidote: Antidote) -> None:
        """Refuse an antidote of a model with another width or depth (weights cannot be compared: quantised)."""
        if antidote.hidden_size != self.n_embd or antidote.model.get("num_layers", self.n_layer) != self.n_layer:
            raise ArtifactMismatch(
                f"the antidote was fitted on {antidote.model.get('name')!r} (hidden size {antidote.hidden_size}, "
                f"{antidote.model.get('num_layers')} layers) but {self.name} has hidden size {self.n_embd} and "
                f"{self.n_layer} layers; fit an antidote for this model"
            )
        if 0 in antidote.layers:
            raise InvalidParameter(
                "this antidote steers block 0, which llama.cpp cannot steer; refit with a smaller --layer-top-p"
            )

    def set_steering(self, antidote: Antidote | None, alpha: float) -> None:
        """Put alpha * antidote on the context (alpha 0 or no antidote: no vector at all)."""
        key = None if antidote is None or alpha == 0 else (id(antidote), float(alpha))
        if key == self._vector:
            return
        ctx = self.llm.ctx
        if key is None:
            result = self.llama_cpp.llama_set_adapter_cvec(ctx, None, 0, self.n_embd, -1, -1)
        else:
            assert antidote is not None
            data = np.zeros((self.n_layer - 1, self.n_embd), dtype=np.float32)  # llama.cpp's layout: from layer 1
            for layer, vector in antidote.vectors().items():
                data[layer - 1] = float(alpha) * vector.float().numpy()
            self._data = np.ascontiguousarray(data.reshape(-1))  # keep the buffer alive while llama.cpp copies it
            pointer = self._data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            result = self.llama_cpp.llama_set_adapter_cvec(
                ctx, pointer, self._data.size, self.n_embd, 1, self.n_layer - 1
            )
        if result != 0:
            raise ModelLoadError(f"llama.cpp refused the control vector (error {result})")
        self._vector = key
        self._antidote = antidote  # held, so that the id in the key cannot be reused by another object
        self._cached = []  # states cached under the old vector are stale

    def forget(self) -> None:
        """Evaluate the next prompt from scratch (no prefix reuse)."""
        self._cached = []

    # ----- forward passes ---------------------------------------------------------------------------------
    def prefill(self, prompt_ids: Sequence[int]) -> np.ndarray:
        """Evaluate the prompt (reusing a cached prefix computed under the same vector); next-token logits."""
        ids = list(prompt_ids)
        if len(ids) >= self.context_length:
            raise InvalidParameter(f"prompt of {len(ids)} tokens does not fit the {self.context_length}-token context")
        common = 0
        for mine, theirs in zip(self._cached, ids[:-1]):  # keep at least one token to evaluate
            if mine != theirs:
                break
            common += 1
        self.llm.n_tokens = common  # eval() drops the KV cache beyond this point
        self.llm.eval(ids[common:])
        self._cached = ids
        return self._last_logits()

    def step(self, token: int) -> np.ndarray:
        self.llm.eval([token])
        self._cached.append(token)
        return self._last_logits()

    def _last_logits(self) -> np.ndarray:
        pointer = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).copy()

    def next_token_logprobs(self, chat: Chat, antidote: Antidote | None = None, alpha: float = 0.0) -> np.ndarray:
        """log-softmax of the first answer token's logits (for parity checks against transformers)."""
        self.set_steering(antidote, alpha)
        logits = torch.from_numpy(self.prefill(self.encode(chat)))
        return torch.log_softmax(logits.double(), dim=-1).numpy()

    def encode(self, chat: Chat, system: str | None = None) -> list[int]:
        return self.tokenizer(render_prompt(self.tokenizer, chat, system), add_special_tokens=False)["input_ids"]


class LlamaCppEngine(BatchEngine):
    """The server engine over llama.cpp: requests run one after another (llama-cpp-python decodes one
    sequence per context), each under its own alpha, with the same decoding as the transformers engine."""

    def __init__(self, backend: LlamaCppModel, antidote: Antidote | None = None, **kwargs: Any):
        self.backend = backend
        self.antidote = antidote
        kwargs["max_batch"] = 1
        self._init_common(backend.tokenizer, **kwargs)
        self.model = None
        self.eos_ids.add(int(backend.llm.token_eos()))

    def run_batch(self, requests: list[GenerationRequest]) -> None:
        for request in requests:
            self.backend.set_steering(self.antidote, request.alpha)
            row = DecodeRow(request, self.tokenizer)
            logits = self.backend.prefill(request.prompt_ids)
            while True:
                token = choose_tokens(torch.from_numpy(logits).unsqueeze(0), [row])[0]
                if request.cancelled.is_set():
                    break
                reason = row.add(token, self.eos_ids)
                if reason is not None:
                    row.finish(reason)
                    break
                logits = self.backend.step(token)


def llamacpp_generate(
    backend: LlamaCppModel,
    prompts: Sequence[Chat],
    *,
    antidote: Antidote | None = None,
    alphas: Sequence[float] | float | None = None,
    max_new_tokens: int = 64,
    system: str | None = None,
    sampling: Sampling | None = None,
) -> list[str]:
    """`generate.generate` on llama.cpp: same arguments, same stripped answers."""
    sampling = sampling or Sampling()
    alphas = row_alphas(antidote, alphas, len(prompts))
    if antidote is not None:
        backend.validate(antidote)
    encoded = [backend.encode(prompt, system) for prompt in prompts]
    check_lengths(backend, [len(ids) for ids in encoded], prompt_names(prompts), max_new_tokens, FIX_TOO_LONG)
    engine = LlamaCppEngine(backend, antidote)
    order = sorted(range(len(prompts)), key=lambda i: alphas[i])  # fewer control-vector switches
    results: dict[int, str] = {}
    for i in order:
        finished: list[Finished] = []
        ids = encoded[i]
        request = GenerationRequest(
            prompt_ids=ids, max_tokens=max_new_tokens, alpha=float(alphas[i]),
            temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed + i,
            on_event=lambda event, sink=finished: sink.append(event) if isinstance(event, Finished) else None,
        )  # fmt: skip
        engine.run_batch([request])
        results[i] = finished[-1].text.strip()
    return [results[i] for i in range(len(prompts))]
