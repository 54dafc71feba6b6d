"""OpenAI-compatible serving with a per-request antidote strength (`antidote serve`)."""

from .app import ServerConfig, create_app
from .engine import BatchEngine, GenerationRequest

__all__ = ["BatchEngine", "GenerationRequest", "ServerConfig", "create_app"]
