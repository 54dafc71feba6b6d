"""`antidote export` (registered in cli.py): write an antidote in another tool's format."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .cli import app, friendly_errors, out
from .errors import InvalidParameter

FORMATS = ("gguf",)


@app.command()
@friendly_errors
def export(
    antidote_path: Annotated[Path, typer.Argument(help="A .antidote file")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Where to write, e.g. safety.gguf")],
    kind: Annotated[str, typer.Option("--format", help="gguf: a llama.cpp control vector")] = "gguf",
    alpha: Annotated[float | None, typer.Option(help="Strength baked into the file [default: suggested]")] = None,
    skip_layer_0: Annotated[
        bool, typer.Option(help="Drop block 0, which llama.cpp cannot steer (changes the steering)")
    ] = False,
) -> None:
    """Export to a llama.cpp control vector: `llama-cli -m model.gguf --control-vector FILE` applies the
    antidote at the baked-in alpha, `--control-vector-scaled FILE S` at S times it."""
    from .antidote import Antidote
    from .export import export_gguf

    if kind not in FORMATS:
        raise InvalidParameter(f"unknown format {kind!r}; formats: {', '.join(FORMATS)}")
    antidote = Antidote.load(antidote_path)
    strength = antidote.suggested_alpha if alpha is None else alpha
    path = export_gguf(antidote, out_path, alpha=strength, skip_layer_0=skip_layer_0)
    layers = [layer for layer in antidote.layers if layer != 0 or not skip_layer_0]
    out.print(
        f"wrote {path}: llama.cpp control vector, {len(layers)} layers (direction.{layers[0]} .. "
        f"direction.{layers[-1]}), alpha {strength} baked in\n"
        f"use: llama-cli -m MODEL.gguf --control-vector {path}   (or --control-vector-scaled {path} SCALE)"
    )
