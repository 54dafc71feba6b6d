"""Where converted models and fitted antidotes are cached: $JAILBREAK_ANTIDOTE_CACHE or the user cache dir."""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_cache_dir


def cache_root() -> Path:
    root = os.environ.get("JAILBREAK_ANTIDOTE_CACHE") or user_cache_dir("jailbreak-antidote")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
