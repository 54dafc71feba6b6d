"""Batched chat generation with an optional antidote, one alpha per row (used by the CLI, demo and eval)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from .antidote import Antidote
from .context import check_token_ids, prompt_names
from .errors import InvalidParameter
from .models import Chat, encode_prompts, prompt_token_ids
from .steer import Steering, check_alpha, check_refuse_threshold, reaches


@dataclass(frozen=True)
class Sampling:
    """Greedy by default; temperature > 0 samples (seeded for reproducibility)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidParameter(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidParameter(f"top_p must be in (0, 1], got {self.top_p}")

    def kwargs(self) -> dict[str, object]:
        if self.temperature <= 0:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": None}


def row_alphas(antidote: Antidote | None, alphas: Sequence[float] | float | None, count: int) -> list[float]:
    """One checked alpha per prompt: the given list, one value for all, or the antidote's default."""
    if alphas is None or isinstance(alphas, int | float):
        default = antidote.default_alpha if antidote is not None else 0.0
        alphas = [default if alphas is None else float(alphas)] * count
    if len(alphas) != count:
        raise InvalidParameter(f"got {len(alphas)} alphas for {count} prompts")
    return [float(check_alpha(a)) for a in alphas]


FIX_TOO_LONG = "shorten the prompt, or generate fewer new tokens (--max-new-tokens)"


# What a prompt refused outright by the harm probe (refuse_threshold) is answered: a plain refusal, which
# every refusal judge reads as one. The OpenAI-compatible server also marks it finish_reason "content_filter".
REFUSAL_MESSAGE = "Sorry, I cannot help with that request."


@dataclass(frozen=True)
class Answer:
    text: str
    harm_score: float | None = None  # the harm probe's p(harmful) for the prompt, when the antidote has one
    monitor_triggered: bool | None = None  # monitor mode: the output monitor opened steering mid-answer
    refused_by_probe: bool = False  # the prompt's harm score reached refuse_threshold: REFUSAL_MESSAGE, not generated


def refusal_stopping(steering: Steering, threshold: float) -> StoppingCriteriaList:
    """Stopping criteria for `model.generate` under `steering`: a row ends once its prompt's harm score
    reaches `threshold` (it will be answered REFUSAL_MESSAGE)."""
    return StoppingCriteriaList([_StopRefused(steering, threshold)])


class _StopRefused(StoppingCriteria):
    """Ends the rows the probe refuses after their first token: their answer is REFUSAL_MESSAGE anyway, and a
    batch of refused rows costs one prefill, not a generation."""

    def __init__(self, steering: Steering, threshold: float):
        self.steering, self.threshold = steering, threshold

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        harm = self.steering.scores
        if harm is None:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return torch.tensor([reaches(x, self.threshold) for x in harm.tolist()], device=input_ids.device)


def generate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Chat], **kwargs
) -> list[str]:
    """Answer each prompt; see `generate_answers` for the options. Returns the answer texts."""
    return [answer.text for answer in generate_answers(model, tokenizer, prompts, **kwargs)]


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Chat],
    *,
    antidote: Antidote | None = None,
    alphas: Sequence[float] | float | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    system: str | None = None,
    sampling: Sampling | None = None,
    show_progress: bool = False,
    mode: str = "fixed",
    threshold: float = 0.5,
    positions: str | None = None,
    refuse_threshold: float | None = None,
    too_long_fix: str = FIX_TOO_LONG,
) -> list[Answer]:
    """Answer each prompt (a user message or a list of chat messages).

    With an antidote, prompt i is steered at alphas[i] (or one alpha for all; default: the antidote's
    tuned, else suggested alpha). Rows of different alpha share batches. `mode`, `threshold` and `positions`
    (None: the antidote's default): see `Antidote.applied`; with a harm probe in the antidote each answer
    carries its prompt's harm score. `refuse_threshold` (needs the probe; None: never): a prompt whose harm
    score reaches it is answered REFUSAL_MESSAGE instead of its generation (`Answer.refused_by_probe`), the
    probe used as an input filter beside the steering.

    Raises ContextLengthError before generating anything if a prompt plus max_new_tokens does not fit the
    model's context (the message ends with `too_long_fix`), and InvalidParameter for token ids outside
    the model's vocabulary, text no tokenizer can encode, or a refuse_threshold that is not a probability,
    has no harm probe to read, or is asked of the llama.cpp backend."""
    if max_new_tokens < 1:
        raise InvalidParameter(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if getattr(model, "backend_name", "transformers") == "llamacpp":  # a LlamaCppModel: same contract
        from .llamacpp import llamacpp_generate

        if mode != "fixed" or refuse_threshold is not None:
            what = f"mode {mode!r}" if mode != "fixed" else "refuse_threshold"
            raise InvalidParameter(f"{what} (harm probe) needs the transformers backend")
        if antidote is not None:
            check_control_vector(antidote, positions)
        texts = llamacpp_generate(
            model, prompts, antidote=antidote, alphas=alphas, max_new_tokens=max_new_tokens, system=system,
            sampling=sampling,
        )  # fmt: skip
        return [Answer(text) for text in texts]
    if batch_size < 1:
        raise InvalidParameter(f"batch_size must be at least 1, got {batch_size}")
    sampling = sampling or Sampling()
    alpha_values = row_alphas(antidote, alphas, len(prompts))
    if antidote is not None:
        antidote.validate(model)
        antidote.gate(mode, threshold)  # fail early on a bad mode or threshold
    refuse_threshold = check_refuse_threshold(refuse_threshold)
    if refuse_threshold is not None and (antidote is None or antidote.probe is None):
        raise InvalidParameter(
            "refuse_threshold reads the harm probe, and there is none; add one with `antidote probe FILE`"
        )
    names = prompt_names(prompts)
    check_token_ids(model, prompt_token_ids(tokenizer, prompts, system), names, max_new_tokens, too_long_fix)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(str(prompts[i])))  # less padding per batch
    answers = [Answer("")] * len(prompts)
    columns = (TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not show_progress, transient=True, console=Console(stderr=True)) as progress:
        task = progress.add_task("generating", total=len(prompts))
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            encoded = encode_prompts(tokenizer, [prompts[i] for i in index], system).to(device)
            torch.manual_seed(sampling.seed + start)
            kwargs = dict(
                **encoded, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling.kwargs()
            )
            scores: list[float | None] = [None] * len(index)
            triggered: list[bool | None] = [None] * len(index)
            refused = [False] * len(index)
            if antidote is None:
                output = model.generate(**kwargs)
            else:
                row_alpha = torch.tensor([alpha_values[i] for i in index])
                with antidote.applied(model, row_alpha, validate=False, mode=mode, threshold=threshold,
                              positions=positions) as steering:  # fmt: skip
                    if refuse_threshold is not None:
                        kwargs["stopping_criteria"] = refusal_stopping(steering, refuse_threshold)
                    output = model.generate(**kwargs)
                if steering.scores is not None:
                    scores = [round(float(x), 4) for x in steering.scores]
                    if refuse_threshold is not None:
                        refused = [reaches(x, refuse_threshold) for x in steering.scores.tolist()]
                if mode == "monitor" and steering.triggered is not None:
                    triggered = [bool(x) for x in steering.triggered]
            new_tokens = output[:, encoded["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for i, text, score, opened, refuse in zip(index, texts, scores, triggered, refused):
                answers[i] = Answer(REFUSAL_MESSAGE if refuse else text.strip(), score, opened, refuse)
            progress.advance(task, len(index))
    return answers


def check_control_vector(antidote: Antidote, positions: str | None) -> None:
    """InvalidParameter unless the antidote can run as a control vector (llama.cpp): those are added at
    every position with one strength, so no prompt-only policy and no input-dependent method."""
    policy = positions or antidote.default_positions
    if policy != "all":
        raise InvalidParameter(
            f"positions {policy!r} needs the transformers backend (a llama.cpp control vector steers every "
            "position); use --positions all"
        )
    if antidote.readouts is not None:
        raise InvalidParameter(
            f"the {antidote.method} method reads each prompt to set its strength, which a llama.cpp control "
            "vector cannot; use the transformers backend or an antidote fitted with --method pca"
        )


def generate_grid(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    alphas: Sequence[float],
    *,
    antidote: Antidote | None = None,
    **kwargs: object,
) -> list[dict[str, object]]:
    """Every (prompt, alpha) combination in shared batches; rows ordered by prompt, then alpha."""
    rows = [(p, a) for p in prompts for a in alphas]
    answers = generate_answers(
        model, tokenizer, [p for p, _ in rows], antidote=antidote, alphas=[a for _, a in rows], **kwargs
    )
    return [
        {"prompt": p, "alpha": a, "response": answer.text}
        | ({"harm_score": answer.harm_score} if answer.harm_score is not None else {})
        | ({"refused_by_probe": True} if answer.refused_by_probe else {})
        for (p, a), answer in zip(rows, answers)
    ]
