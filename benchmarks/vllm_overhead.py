"""vLLM throughput with the antidote plugin steering every request versus the same vLLM without the plugin,
side by side in one run (issue 20's target: steered / unsteered >= 0.98 at batch 1 and 8).

Two engines on the same model live at once, one started with JAILBREAK_ANTIDOTE_VLLM set (every request at
alpha A) and one without; rounds alternate between them (and which goes first), so machine noise hits both
alike. Each round generates exactly N tokens per request (ignore_eos), greedy. Prints the median
tokens/s of each side and the median of the per-round ratios.

    python benchmarks/vllm_overhead.py ANTIDOTE [--model DIR] [--batch-sizes 1 8] [--tokens 64] [--rounds 6]
        [--alpha A] [--compile]     # --compile: torch.compile (and CUDA graphs on a GPU); default eager
        [--mode gated --threshold 0]  # the probe-read modes, gated, scaled or monitor (ANTIDOTE with a probe):
                                      # both engines then run without chunked prefill, as those modes need;
                                      # threshold 0 steers all

Run in the vLLM environment (scripts/test-vllm.sh makes one); on CPU set VLLM_CPU_KVCACHE_SPACE (GiB).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def start(model: str, antidote: str | None, eager: bool, dtype: str, **engine_args: object):
    from vllm import LLM

    if antidote is None:
        os.environ.pop("JAILBREAK_ANTIDOTE_VLLM", None)
    else:
        os.environ["JAILBREAK_ANTIDOTE_VLLM"] = antidote
    return LLM(model=model, dtype=dtype, max_model_len=1024, max_num_seqs=16, enforce_eager=eager, seed=0,
               **engine_args)  # fmt: skip


def timed(llm, batch: int, tokens: int, alpha: float | None, mode: str = "fixed", threshold: float = 0.0) -> float:
    from vllm import SamplingParams

    extra = None if alpha is None else {"antidote_alpha": alpha, "antidote_mode": mode, "antidote_threshold": threshold}
    params = SamplingParams(max_tokens=tokens, min_tokens=tokens, ignore_eos=True, temperature=0, extra_args=extra)
    started = time.perf_counter()
    outputs = llm.generate([f"{PROMPT} ({i})" for i in range(batch)], params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    assert all(len(o.outputs[0].token_ids) == tokens for o in outputs)
    return batch * tokens / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("antidote", help=".antidote file fitted on --model")
    parser.add_argument("--model", default=None, help="model directory [default: the bundled 0.5B, converted]")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--alpha", type=float, default=None, help="[default: the artifact's suggested alpha]")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--compile", action="store_true", help="torch.compile / CUDA graphs instead of eager")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--memory-utilization", type=float, default=None,
                        help="vLLM's gpu_memory_utilization (on the CPU build: the share of RAM it expects free at "
                        "start; lower it when other jobs run) [default: vLLM's]")  # fmt: skip
    parser.add_argument("--mode", choices=["fixed", "gated", "scaled", "monitor"], default="fixed")
    parser.add_argument("--threshold", type=float, default=0.0,
                        help="gated, monitor: 0 steers every request (the full cost; the monitor still reads every "
                        "answer token)")  # fmt: skip
    args = parser.parse_args()
    if not Path(args.antidote).is_file():
        print(f"error: {args.antidote} is not a file (fit one with `antidote fit --out FILE`)", file=sys.stderr)
        return 2
    from jailbreak_antidote import bundled
    from jailbreak_antidote.antidote import Antidote

    antidote = Antidote.load(args.antidote)
    alpha = antidote.suggested_alpha if args.alpha is None else args.alpha
    os.environ["JAILBREAK_ANTIDOTE_VLLM_ALPHA_MAX"] = str(max(alpha, 1e-9))
    model = args.model or str(bundled.converted_dir(bundled.get(bundled.DEFAULT_MODEL)))
    engine_args: dict[str, object] = {"tensor_parallel_size": args.tensor_parallel_size}
    if args.memory_utilization is not None:
        engine_args["gpu_memory_utilization"] = args.memory_utilization
    if args.mode != "fixed":
        if antidote.probe is None:
            print(f"error: --mode {args.mode} needs a harm probe in {args.antidote}; add one with `antidote probe`",
                  file=sys.stderr)  # fmt: skip
            return 2
        engine_args |= {"enable_chunked_prefill": False, "max_num_batched_tokens": 1024}
    plain = start(model, None, not args.compile, args.dtype, **engine_args)
    steered = start(model, args.antidote, not args.compile, args.dtype, **engine_args)
    import platform

    mode = "compiled" if args.compile else "eager"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus; model {model}, "
          f"{args.dtype}, {mode}, alpha {alpha:g}, mode {args.mode}, {args.tokens} tokens/request")  # fmt: skip
    print(f"{'batch':>5} {'plain tok/s':>12} {'steered tok/s':>14} {'steered/plain':>14}")
    for batch in args.batch_sizes:
        steer = {"mode": args.mode, "threshold": args.threshold}
        timed(plain, batch, 4, None), timed(steered, batch, 4, alpha, **steer)  # warm-up
        rates: dict[str, list[float]] = {"plain": [], "steered": []}
        ratios = []
        for round_index in range(args.rounds):
            order = ["plain", "steered"] if round_index % 2 == 0 else ["steered", "plain"]
            measured = {}
            for side in order:
                llm, side_alpha = (plain, None) if side == "plain" else (steered, alpha)
                measured[side] = timed(llm, batch, args.tokens, side_alpha, **steer)
                rates[side].append(measured[side])
            ratios.append(measured["steered"] / measured["plain"])
        print(f"{batch:>5} {statistics.median(rates['plain']):>12.1f} {statistics.median(rates['steered']):>14.1f} "
              f"{statistics.median(ratios):>14.3f}")  # fmt: skip
    for llm in (plain, steered):
        llm.llm_engine.engine_core.shutdown()
    gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
