"""Generation speed, transformers (float32) versus llama.cpp (the original GGUF), each without and with the
antidote, one prompt at a time, in one process, interleaved.

    python benchmarks/llamacpp_speed.py [--models qwen2.5-coder-0.5b-instruct qwen2.5-coder-1.5b-instruct]
                                        [--tokens 32] [--repeats 9]

Every run generates exactly --tokens tokens (end-of-turn ignored) for the same benign prompt. The antidote is
the built-in one (fitted once per model and cached). Prints tokens/s per setting and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import machine

from jailbreak_antidote import bundled
from jailbreak_antidote.fit import builtin_antidote
from jailbreak_antidote.llamacpp import LlamaCppEngine, LlamaCppModel
from jailbreak_antidote.models import encode_prompts, load_model
from jailbreak_antidote.server.engine import GenerationRequest

PROMPT = "Explain how a bicycle gear works, step by step."


@torch.no_grad()
def transformers_run(model, tokenizer, antidote, alpha: float, tokens: int) -> float:
    encoded = encode_prompts(tokenizer, [PROMPT])
    started = time.perf_counter()
    with antidote.maybe_applied(model, alpha):
        model.generate(
            **encoded, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None,
        )  # fmt: skip
    return tokens / (time.perf_counter() - started)


def llamacpp_run(engine: LlamaCppEngine, ids: list[int], alpha: float, tokens: int) -> float:
    engine.backend.forget()  # a fresh prompt state each run, as on the transformers side
    request = GenerationRequest(prompt_ids=ids, max_tokens=tokens, alpha=alpha, ignore_eos=True)
    started = time.perf_counter()
    engine.run_batch([request])
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[bundled.DEFAULT_MODEL, "qwen2.5-coder-1.5b-instruct"])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"one prompt at a time, exactly {args.tokens} new tokens, greedy, median of {args.repeats} interleaved runs")
    for name in args.models:
        if bundled.is_installed(bundled.get(name)):
            bench_model(name, args.tokens, args.repeats)
        else:
            print(f"{name}: not installed ({bundled.get(name).install}); skipped")


def bench_model(name: str, tokens: int, repeats: int) -> None:
    model, tokenizer = load_model(name)
    antidote = builtin_antidote(model, tokenizer, name, log=lambda _: None)
    alpha = antidote.suggested_alpha
    llama = LlamaCppModel.load(name, n_ctx=1024)
    engine = LlamaCppEngine(llama, antidote)
    ids = llama.encode(PROMPT)
    settings = {
        "transformers": lambda a: transformers_run(model, tokenizer, antidote, a, tokens),
        "llama.cpp": lambda a: llamacpp_run(engine, ids, a, tokens),
    }
    for run in settings.values():
        run(0.0)  # warm-up
    runs: dict[str, list[float]] = {}
    for _ in range(repeats):
        for label, run in settings.items():
            for value in (0.0, alpha):
                runs.setdefault(f"{label} alpha {value:g}", []).append(run(value))
    rate = {key: statistics.median(values) for key, values in runs.items()}
    print(f"\n{name} (antidote: {len(antidote.layers)} layers, k={antidote.k}, alpha {alpha})")
    for key, value in rate.items():
        print(f"  {key:<28} {value:7.2f} tokens/s")
    t0, t1 = rate["transformers alpha 0"], rate[f"transformers alpha {alpha:g}"]
    l0, l1 = rate["llama.cpp alpha 0"], rate[f"llama.cpp alpha {alpha:g}"]
    cost = {  # median over repeats of the per-repeat ratio: each pair ran back to back, so drift cancels
        label: statistics.median(a / b - 1 for a, b in zip(runs[f"{label} alpha 0"], runs[f"{label} alpha {alpha:g}"]))
        for label in settings
    }
    print(
        f"  control-vector cost in llama.cpp: {cost['llama.cpp']:+.1%}; "
        f"steering cost in transformers: {cost['transformers']:+.1%} (median of per-repeat pair ratios)"
    )
    print(f"  llama.cpp vs transformers: {l0 / t0:.2f}x unsteered, {l1 / t1:.2f}x with the antidote")


if __name__ == "__main__":
    main()
