"""Install each patch once: vLLM may call the plugin's register() more than once in a process."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def wrap_once(owner: Any, name: str, wrap: Callable[[Callable], Callable], *, own: bool = False) -> None:
    """Replace `owner.name` (a class's method, a module's function) by `wrap(original)`, unless it is already
    ours. own=True: only where `owner` itself defines `name` (an override), never an inherited one."""
    original = owner.__dict__.get(name) if own else getattr(owner, name, None)
    if original is None or getattr(original, "_antidote", False):
        return
    wrapped = wrap(original)
    wrapped._antidote = True
    setattr(owner, name, wrapped)
