"""Serving throughput with 16 concurrent clients on loopback: (a) every request at one alpha, (b) alpha drawn
from 4 values, (c) the same load served one request at a time (--max-batch 1).

    python benchmarks/serve_throughput.py [--model NAME] [--clients 16] [--requests 32] [--tokens 32]

Each setting starts its own `antidote serve` process (the built-in antidote, cached after the first fit) and
sends the same benign prompts; every request generates exactly --tokens tokens (`ignore_eos`), so refusals,
which are shorter, cannot flatter a setting. Prints requests/s, tokens/s and the ratios, all from one run.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from _common import machine

from jailbreak_antidote.prompts import builtin_prompts


def start_server(model: str, port: int, max_batch: int, dtype: str, log: str) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "jailbreak_antidote", "serve", "--model", model, "--port", str(port),
        "--max-batch", str(max_batch), "--dtype", dtype, "--request-log", log,
    ]  # fmt: skip
    server = subprocess.Popen(command, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600  # the first start may fit the built-in antidote
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            raise SystemExit(f"server exited with {server.returncode}")
        time.sleep(0.5)
    raise SystemExit("server did not come up")


def load(port: int, prompts: list[str], alphas: list[float], clients: int, tokens: int) -> tuple[float, int]:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"

    def one(i: int) -> int:
        body = {
            "messages": [{"role": "user", "content": prompts[i % len(prompts)]}], "max_tokens": tokens,
            "ignore_eos": True, "antidote": {"alpha": alphas[i % len(alphas)]},
        }  # fmt: skip
        response = httpx.post(url, json=body, timeout=3600)
        response.raise_for_status()
        return response.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        generated = sum(pool.map(one, range(len(prompts))))
    return time.perf_counter() - started, generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32, help="requests per setting")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()

    benign = builtin_prompts("benign")
    prompts = [benign[i % len(benign)] for i in range(args.requests)]
    print(f"machine: {machine()}")
    print(f"model {args.model} ({args.dtype}): {args.clients} concurrent clients, {args.requests} requests, "
          f"{args.tokens} new tokens each")  # fmt: skip
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, max_batch, spread in (("a) batched, one alpha", args.clients, False),
                                         ("b) batched, 4 alphas", args.clients, True),
                                         ("c) one at a time", 1, False)):  # fmt: skip
            server = start_server(args.model, args.port, max_batch, args.dtype, os.path.join(tmp, "log.jsonl"))
            try:
                card = httpx.get(f"http://127.0.0.1:{args.port}/v1/models").json()["data"][0]["antidote"]
                alpha = card["default_alpha"]
                alphas = [0.0, alpha / 2, alpha, 1.5 * alpha] if spread else [alpha]
                load(args.port, prompts[:1], alphas, 1, 2)  # warm-up
                seconds, generated = load(args.port, prompts, alphas, args.clients, args.tokens)
            finally:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait()
            rates[label] = generated / seconds
            print(f"{label:<22} max-batch {max_batch:>2}: {len(prompts) / seconds:6.3f} requests/s "
                  f"{generated / seconds:7.1f} tokens/s  alphas {[round(a, 4) for a in alphas]}")  # fmt: skip
    a, b, c = rates.values()
    print(f"4 alphas vs one alpha: {b / a:.3f}   batched vs one at a time: {a / c:.2f}x")


if __name__ == "__main__":
    main()
