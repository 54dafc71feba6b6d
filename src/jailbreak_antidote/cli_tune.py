"""`antidote tune` (registered in cli.py): choose method, mode, alpha, threshold and positions under a benign-refusal
budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from . import bundled
from .cli import DtypeOption, ModelOption, _check, _load, app, err, friendly_errors, out
from .errors import InvalidParameter


@app.command()
@friendly_errors
def tune(
    antidote_path: Annotated[Path, typer.Argument(help="The .antidote file; the choice is stored in it")],
    model: ModelOption = None,
    dtype: DtypeOption = "float32",
    harmful: Annotated[
        Path | None, typer.Option(help="Harmful prompts [default: 32 built-in goals, direct and template-wrapped]")
    ] = None,
    benign: Annotated[
        Path | None, typer.Option(help="Held-out benign prompts [default: the built-in 48-prompt tuning set]")
    ] = None,
    budget: Annotated[float, typer.Option(help="Allowed extra benign refusals over alpha 0, as a fraction")] = 0.05,
    factor: Annotated[
        list[float] | None, typer.Option(help="Alphas as multiples of the suggested alpha [default: 0.5 1 1.5 2]")
    ] = None,
    positions: Annotated[
        str,
        typer.Option(
            help="Comma-separated positions policies to try: all (the paper), prompt (the prefill only), generated"
        ),
    ] = "all",
    candidate: Annotated[
        list[Path] | None,
        typer.Option(
            help="Another .antidote of the same model (another --method), repeatable: each is tuned on the same "
            "prompts and the best one, with its choice, is written to --out (then required)"
        ),
    ] = None,
    refuse: Annotated[
        bool,
        typer.Option(
            help="Also try refusing prompts outright, without generating, from a harm probability on (needs the "
            "harm probe); --no-refuse: steering only"
        ),
    ] = True,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per prompt for the refusal judge")] = 16,
    batch_size: Annotated[int, typer.Option(help="Prompts per batch")] = 16,
    out_path: Annotated[Path | None, typer.Option("--out", "-o", help="Write here instead of in place")] = None,
) -> None:
    """Pick the mode (fixed, gated, scaled, monitor), alpha, threshold, positions policy and refuse threshold
    (and, with --candidate, the fit method) that refuse the most harmful prompts while refusing at most --budget
    more benign prompts than alpha 0; store it as the artifact's default."""
    from .antidote import Antidote
    from .prompts import read_prompts
    from .steer import check_positions
    from .tune import FACTORS, REFUSE_THRESHOLDS, check_budget, needed_benign, rank
    from .tune import tune as run_tune

    check_budget(budget)
    policies = [p.strip() for p in positions.split(",") if p.strip()]
    for policy in policies or [""]:
        check_positions(policy)
    if candidate and out_path is None:
        raise InvalidParameter("with --candidate give --out FILE: the winner may be any of the artifacts")
    # A broken tuned default is what tune replaces: it must not stop tune from reading the file.
    artifacts = [Antidote.load(path, drop_bad_tuned=True) for path in [antidote_path, *(candidate or [])]]
    harmful_prompts = read_prompts(harmful) if harmful else None
    benign_prompts = read_prompts(benign) if benign else None
    if benign_prompts is not None and len(benign_prompts) < needed_benign(budget):
        raise InvalidParameter(
            f"{benign} holds {len(benign_prompts)} prompts; a {budget:.0%} budget needs at least "
            f"{needed_benign(budget)}"
        )
    if any(a.probe is None for a in artifacts):
        err.print("an antidote without a harm probe is tuned in the fixed mode only (add one with `antidote probe`)")
    antidote = artifacts[0]
    if model is None and antidote.model.get("name") in bundled.BUNDLED:
        model = antidote.model["name"]
    lm, tokenizer = _load(model, dtype)
    for artifact in artifacts:
        _check(artifact, lm)
    results = []
    for artifact in artifacts:
        results.append(run_tune(
            lm, tokenizer, artifact, harmful=harmful_prompts, benign=benign_prompts, budget=budget,
            factors=factor or FACTORS, policies=policies, max_new_tokens=max_new_tokens, batch_size=batch_size,
            refuse_thresholds=REFUSE_THRESHOLDS if refuse else (), show_progress=True,
        ))  # fmt: skip
    best = max(range(len(artifacts)), key=lambda i: rank(results[i]["choice"]))
    antidote, result = artifacts[best], results[best]
    _print_curves(artifacts, results, best, budget)
    choice = result["choice"]
    antidote.alpha = {**antidote.alpha, "tuned": {**choice, **{k: v for k, v in result.items() if k != "choice"}}}
    path = antidote.save(out_path or antidote_path)
    threshold = f", threshold {choice['threshold']:g}" if choice["threshold"] is not None else ""
    if choice.get("refuse_threshold") is not None:
        threshold += f", refusing outright from harm probability {choice['refuse_threshold']:g}"
    method = f"method {antidote.method}, " if candidate else ""
    out.print(f"chosen: {method}mode {choice['mode']}, positions {choice['positions']}, alpha {choice['alpha']:g}"
              f"{threshold}: harmful refused "
              f"{choice['harmful_refusal']:.0%}, benign refused {choice['benign_refusal']:.0%} (alpha 0: "
              f"{result['baseline']['benign_refusal']:.0%}, budget +{budget:.0%}); stored in {path} as the default "
              "for generate, eval and serve")  # fmt: skip


def _print_curves(artifacts: list, results: list[dict], best: int, budget: float) -> None:
    first = results[0]
    table = Table(title=f"Refusal rates ({first['n_harmful']} harmful, {first['n_benign']} benign prompts)")
    columns = ("method", "mode", "positions", "alpha", "threshold", "refuse from", "harmful refused",
               "benign refused", "")  # fmt: skip
    for column in columns if len(artifacts) > 1 else columns[1:]:
        table.add_column(column)
    for i, (artifact, result) in enumerate(zip(artifacts, results)):
        limit = result["baseline"]["benign_refusal"] + budget
        for point in result["curve"]:
            chosen = i == best and point == result["choice"]
            refuse = point.get("refuse_threshold")
            shown = (point["mode"] != "gated" or point["threshold"] in (0.25, 0.5, 0.75)) and refuse in (None, 0.6, 0.8)
            if not (shown or chosen):  # the table shows a sample of the curve; all of it is stored
                continue
            mark = "chosen" if chosen else ("over budget" if point["benign_refusal"] > limit + 1e-9 else "")
            shown_threshold = "-" if point["threshold"] is None else f"{point['threshold']:g}"
            cells = [point["mode"], point["positions"], f"{point['alpha']:g}", shown_threshold,
                     "-" if refuse is None else f"{refuse:g}",
                     f"{point['harmful_refusal']:.0%}", f"{point['benign_refusal']:.0%}", mark]  # fmt: skip
            table.add_row(*([artifact.method] if len(artifacts) > 1 else []), *cells)
    out.print(table)
