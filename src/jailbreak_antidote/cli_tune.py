"""`antidote tune` (registered in cli.py): choose mode, alpha and threshold under a benign-refusal budget."""

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
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per prompt for the refusal judge")] = 16,
    batch_size: Annotated[int, typer.Option(help="Prompts per batch")] = 16,
    out_path: Annotated[Path | None, typer.Option("--out", "-o", help="Write here instead of in place")] = None,
) -> None:
    """Pick the mode (fixed, gated, scaled), alpha and threshold that refuse the most harmful prompts while
    refusing at most --budget more benign prompts than alpha 0; store it as the artifact's default."""
    from .antidote import Antidote
    from .prompts import read_prompts
    from .tune import FACTORS, check_budget, needed_benign
    from .tune import tune as run_tune

    check_budget(budget)
    antidote = Antidote.load(antidote_path)
    harmful_prompts = read_prompts(harmful) if harmful else None
    benign_prompts = read_prompts(benign) if benign else None
    if benign_prompts is not None and len(benign_prompts) < needed_benign(budget):
        raise InvalidParameter(
            f"{benign} holds {len(benign_prompts)} prompts; a {budget:.0%} budget needs at least "
            f"{needed_benign(budget)}"
        )
    if antidote.probe is None:
        err.print("no harm probe in this antidote: tuning the fixed mode only (add one with `antidote probe`)")
    if model is None and antidote.model.get("name") in bundled.BUNDLED:
        model = antidote.model["name"]
    lm, tokenizer = _load(model, dtype)
    _check(antidote, lm)
    result = run_tune(
        lm, tokenizer, antidote, harmful=harmful_prompts, benign=benign_prompts, budget=budget,
        factors=factor or FACTORS, max_new_tokens=max_new_tokens, batch_size=batch_size, show_progress=True,
    )  # fmt: skip
    choice = result["choice"]
    table = Table(title=f"Refusal rates ({result['n_harmful']} harmful, {result['n_benign']} benign prompts)")
    for column in ("mode", "alpha", "threshold", "harmful refused", "benign refused", ""):
        table.add_column(column)
    limit = result["baseline"]["benign_refusal"] + budget
    for point in result["curve"]:
        shown = point["mode"] != "gated" or point["threshold"] in (0.25, 0.5, 0.75) or point == choice
        if shown:
            mark = "chosen" if point == choice else ("over budget" if point["benign_refusal"] > limit + 1e-9 else "")
            shown_threshold = "-" if point["threshold"] is None else f"{point['threshold']:g}"
            table.add_row(point["mode"], f"{point['alpha']:g}", shown_threshold, f"{point['harmful_refusal']:.0%}",
                          f"{point['benign_refusal']:.0%}", mark)  # fmt: skip
    out.print(table)
    antidote.alpha = {**antidote.alpha, "tuned": {**choice, **{k: v for k, v in result.items() if k != "choice"}}}
    path = antidote.save(out_path or antidote_path)
    threshold = f", threshold {choice['threshold']:g}" if choice["threshold"] is not None else ""
    out.print(f"chosen: mode {choice['mode']}, alpha {choice['alpha']:g}{threshold}: harmful refused "
              f"{choice['harmful_refusal']:.0%}, benign refused {choice['benign_refusal']:.0%} (alpha 0: "
              f"{result['baseline']['benign_refusal']:.0%}, budget +{budget:.0%}); stored in {path} as the default "
              "for generate, eval and serve")  # fmt: skip
