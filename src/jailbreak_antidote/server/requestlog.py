"""JSON-lines request log for operators watching a rollout: one line per finished request."""

from __future__ import annotations

import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from ..textfiles import jsonl_line


class RequestLog:
    """Appends one JSON object per line to `path` (or stderr); prompt and answer text only if asked."""

    def __init__(self, path: Path | None, log_prompts: bool = False):
        self.log_prompts = log_prompts
        self._lock = threading.Lock()
        self._handle: TextIO = sys.stderr
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(path, "a", encoding="utf-8", newline="")  # noqa: SIM115 - kept open for the server's life
        self._owned = path is not None

    def write(self, entry: dict[str, Any], prompt: Any = None, completion: str | None = None) -> None:
        line = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), **entry}
        if self.log_prompts:
            line["prompt"], line["completion"] = prompt, completion
        with self._lock:
            self._handle.write(jsonl_line(line))
            self._handle.flush()

    def close(self) -> None:
        if self._owned:
            self._handle.close()
