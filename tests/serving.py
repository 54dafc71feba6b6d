"""A real server on a free loopback port, run in a thread, for tests that talk HTTP to it."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import openai
import uvicorn

from jailbreak_antidote.server import ServerConfig, create_app

KEY = "test-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningServer:
    def __init__(self, model, tokenizer, antidote, config: ServerConfig):
        self.model, self.tokenizer, self.antidote, self.config = model, tokenizer, antidote, config
        self.port = free_port()
        app = create_app(model, tokenizer, antidote, config)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=60)

    def post(self, body, headers=None, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {KEY}", **(headers or {})}
        return httpx.post(f"{self.url}/v1/chat/completions", headers=headers, timeout=60, **kwargs, json=body)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
