"""`antidote probe` (registered in cli.py): add a jailbreak-robust harm probe to an antidote artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from . import bundled
from .cli import DtypeOption, ModelOption, _load, app, friendly_errors, out
from .errors import InvalidParameter


@app.command()
@friendly_errors
def probe(
    antidote_path: Annotated[Path, typer.Argument(help="The .antidote file to add the probe to")],
    model: ModelOption = None,
    dtype: DtypeOption = "float32",
    harmful: Annotated[
        Path | None, typer.Option(help="Harmful prompts, .json/.jsonl/.csv/.txt [default: the built-in set]")
    ] = None,
    harmless: Annotated[
        Path | None, typer.Option(help="Harmless prompts, paired with --harmful [default: the built-in set]")
    ] = None,
    per_goal: Annotated[int, typer.Option(help="Training wrappers drawn for each instruction")] = 8,
    validation_fraction: Annotated[
        float,
        typer.Option(
            help="Share of calibration goals kept out of training, wrapped in the probe's validation templates, "
            "to choose the block and calibrate on"
        ),
    ] = 0.3,
    seed: Annotated[int, typer.Option(help="Seed for the split and the template draw")] = 0,
    layer: Annotated[
        list[int] | None,
        typer.Option(
            help="Candidate probe block(s), repeatable [default: at 33% and 42% of the depth]. An "
            "earlier block lets gated / scaled modes steer more of the prompt's blocks"
        ),
    ] = None,
    out_path: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write here instead of updating the file in place")
    ] = None,
    from_path: Annotated[
        Path | None,
        typer.Option(
            "--from",
            help="Copy the harm probe of this .antidote (fitted on the same model) instead of training one: "
            "the probe reads the unsteered model, so one probe serves every fit method",
        ),
    ] = None,
) -> None:
    """Train a harm probe on template-augmented calibration pairs, choose its layer by AUROC on held-out goals
    wrapped in validation templates it did not train on (never the evaluation's held-out attacks), calibrate
    it, and store it in the artifact (or, with --from, copy another artifact's probe)."""
    from .antidote import Antidote
    from .cli import _check
    from .probe import fit_probe
    from .prompts import builtin_calibration, read_prompts

    if per_goal < 0:
        raise InvalidParameter(f"--per-goal must be 0 or more, got {per_goal}")
    if (harmful is None) != (harmless is None):
        raise InvalidParameter("give both --harmful and --harmless, or neither (to use the built-in set)")
    antidote = Antidote.load(antidote_path)
    if from_path is not None:
        if harmful is not None or harmless is not None or layer:
            raise InvalidParameter("--from copies a trained probe: drop --harmful, --harmless and --layer")
        antidote.probe = Antidote.load(from_path).probe_for(antidote)
        path = antidote.save(out_path or antidote_path)
        out.print(f"saved {path} (probe on block {antidote.probe.layer}, copied from {from_path})")
        return
    if harmful is not None and harmless is not None:
        positives, negatives = read_prompts(harmful), read_prompts(harmless)
    else:
        calibration = builtin_calibration()
        positives, negatives = calibration.harmful, calibration.harmless
    if model is None and antidote.model.get("name") in bundled.BUNDLED:
        model = antidote.model["name"]
    lm, tokenizer = _load(model, dtype)
    _check(antidote, lm)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True, console=Console(stderr=True)) as progress:
        antidote.probe = fit_probe(
            lm, tokenizer, positives, negatives, per_goal=per_goal, validation_fraction=validation_fraction,
            seed=seed, layers=layer or None, progress=progress,
        )  # fmt: skip
    path = antidote.save(out_path or antidote_path)
    report = antidote.probe.report
    table = Table(
        title=f"Harm probe: validation AUROC (held-out goals x validation templates), layer {antidote.probe.layer}"
    )
    table.add_column("attack family")
    table.add_column("AUROC (harmful vs harmless, both wrapped)", justify="right")
    for family, value in report["validation_auroc_per_family"].items():
        table.add_row(family, f"{value:.3f}")
    table.add_row("all, pooled", f"{report['validation_auroc']:.3f}")
    table.add_row("wrapped harmful vs plain harmless", f"{report['validation_auroc_attacks_vs_plain_benign']:.3f}")
    out.print(table)
    out.print(f"saved {path} (probe on block {antidote.probe.layer}; {report['n_train']} training prompts, "
              f"{report['n_validation']} validation prompts)")  # fmt: skip
