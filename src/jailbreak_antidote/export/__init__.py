"""Export an antidote to formats other tools read (llama.cpp control vectors)."""

from .gguf_vector import control_vector_rows, export_gguf, read_gguf_control_vector

__all__ = ["control_vector_rows", "export_gguf", "read_gguf_control_vector"]
