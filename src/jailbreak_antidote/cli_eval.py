"""`antidote eval`, `antidote sweep`, `antidote judge-agreement` and `antidote report` (registered in cli.py)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from . import bundled
from .cli import BackendOption, DtypeOption, ModelOption, _check, _load, app, err, friendly_errors, out
from .cli_judge import HarmJudgeOption, harm_judge_missing, judge_run_for_harm, require_harm_judge
from .errors import InvalidParameter
from .eval.attacks import BUILTIN
from .textfiles import write_text_atomic

SWEEP_KS = [0.01, 0.025, 0.05, 0.1, 0.25, 1.0]
SWEEP_FACTORS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0]

GoalsOption = Annotated[
    Path, typer.Option(help="Harmful goals: JailbreakBench/HarmBench/AdvBench CSV or any prompt file")
]
OutOption = Annotated[Path, typer.Option("--out", "-o", help="Output directory (resumable: rerun to continue)")]
AntidoteOption = Annotated[
    Path | None,
    typer.Option("--antidote", "-a", help="A .antidote file [default: none; needed by the antidote defenses]"),
]
AttacksOption = Annotated[
    str,
    typer.Option(
        help="Comma-separated built-in attack names, 'all', or an attack file (.csv/.jsonl); built-in: "
        + ", ".join(BUILTIN)
    ),
]
LimitOption = Annotated[int | None, typer.Option(help="Only the first N goals (after --stride) [default: all]")]
StrideOption = Annotated[int, typer.Option(help="Every S-th goal (a slice spread over all categories)")]
TokensOption = Annotated[int, typer.Option(help="New tokens per answer")]
BatchOption = Annotated[int, typer.Option(help="Rows per generation batch")]
BenignOption = Annotated[
    list[Path] | None,
    typer.Option(
        help="Benign prompt file(s) for compliance, repeatable; .json, .jsonl, .csv or .txt [default: built-in list]"
    ),
]
XSTestOption = Annotated[
    Path | None, typer.Option(help="XSTest prompts CSV: adds xstest-safe and xstest-unsafe sets [default: none]")
]
BenignLimitOption = Annotated[
    int | None, typer.Option(help="Only the first N prompts of each benign set [default: all]")
]


def _distinct(prompts: list[str], where: str) -> list[str]:
    """A prompt set without repeats: a repeated prompt would count twice in every rate."""
    repeated = [p for p, n in Counter(prompts).items() if n > 1]
    if repeated:
        raise InvalidParameter(f"{where} repeats {len(repeated)} prompt(s), e.g. {repeated[0][:60]!r}; remove the "
                               "duplicates so every prompt counts once")  # fmt: skip
    return prompts


def _check_counts(**values: int | None) -> None:
    """--limit, --stride and the like: absent, or a positive count."""
    for name, value in values.items():
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise InvalidParameter(f"{flag} must be at least 1, got {value} (leave it out for all)")


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _attack_prompts(attacks: str, goals_path: Path, limit: int | None, stride: int = 1):
    from .eval.attacks import AttackPrompt, get_attacks, read_attack_file
    from .eval.goals import read_goals

    path = Path(attacks)
    if path.suffix.lower() in (".csv", ".jsonl") or path.is_file():
        prompts = read_attack_file(path)
        pairs = [(p.goal, p.attack) for p in prompts]
        repeated = [pair for pair, n in Counter(pairs).items() if n > 1]
        if repeated:
            raise InvalidParameter(f"attack file {str(path)!r} holds goal {repeated[0][0][:60]!r} under attack "
                                   f"{repeated[0][1]!r} more than once; keep one row per goal and attack")  # fmt: skip
        goals = list(dict.fromkeys(p.goal for p in prompts))[::stride][:limit]
        keep = set(goals)
        return [p for p in prompts if p.goal in keep]
    chosen = get_attacks(_split(attacks))
    goals = read_goals(goals_path)[::stride][:limit]
    return [AttackPrompt(g.text, a.name, a(g.text), g.category) for g in goals for a in chosen]


def _benign_sets(benign: list[Path] | None, xstest: Path | None, limit: int | None) -> dict[str, list[str]]:
    from .eval.goals import read_xstest
    from .prompts import builtin_prompts, read_prompts

    sets: dict[str, list[str]] = {}
    for path in benign or []:
        if path.stem in sets or path.stem.startswith("xstest"):
            raise InvalidParameter(f"two benign sets would both be named {path.stem!r} (sets are named by file "
                                   f"name): rename {str(path)!r}")  # fmt: skip
        sets[path.stem] = _distinct(read_prompts(path), f"benign file {str(path)!r}")
    if xstest is not None:
        sets["xstest-safe"], sets["xstest-unsafe"] = read_xstest(xstest)
    if not sets:
        sets["builtin-benign"] = builtin_prompts("benign")
    return {name: prompts[:limit] for name, prompts in sets.items()}


def _run(
    *, model, dtype, backend, antidote_path, goals, attacks, defenses, alphas, ks, selectors, out_dir, max_new_tokens,
    batch_size, limit, benign, xstest, benign_limit, temperature, seed, factors=None, stride=1, threshold=0.5,
    harm_judge="builtin", refuse_threshold=None,
) -> None:  # fmt: skip
    from .antidote import Antidote
    from .eval.defenses import DefenseRunner, build_settings, is_steered, mode_of, positions_of
    from .eval.report import build_report
    from .eval.runner import Evaluation, RunConfig, file_sha256
    from .generate import Sampling, check_control_vector
    from .models import weights_digest
    from .prompts import builtin_calibration
    from .steer import check_alpha, check_refuse_threshold

    _check_counts(stride=stride, limit=limit, benign_limit=benign_limit, max_new_tokens=max_new_tokens,
                  batch_size=batch_size)  # fmt: skip
    sampling = Sampling(temperature=temperature, seed=seed)  # checks the temperature
    attack_prompts = _attack_prompts(attacks, goals, limit, stride)
    benign_sets = _benign_sets(benign, xstest, benign_limit)
    antidote = Antidote.load(antidote_path) if antidote_path else None
    if antidote is None and any(is_steered(d) for d in defenses):
        raise InvalidParameter("the antidote defenses need --antidote PATH (create one with `antidote fit`)")
    for defense in defenses:
        if antidote is not None and is_steered(defense):
            antidote.gate(mode_of(defense), threshold)  # needs a harm probe; fail before the model loads
            if backend == "llamacpp":
                check_control_vector(antidote, positions_of(defense))
    if check_refuse_threshold(refuse_threshold) is not None:
        if not any(is_steered(d) for d in defenses):
            raise InvalidParameter("--refuse-threshold applies to the steered defenses (antidote, antidote-gated, "
                                   "...) and none is selected; drop it or add one to --defenses")  # fmt: skip
        if antidote is None or antidote.probe is None:
            raise InvalidParameter("--refuse-threshold reads the antidote's harm probe, and it has none; add one "
                                   "with `antidote probe FILE`")  # fmt: skip
        if backend == "llamacpp":
            raise InvalidParameter("--refuse-threshold (harm probe) needs --backend transformers")
    if antidote is not None:
        if factors is not None:
            alphas = [round(f * antidote.suggested_alpha, 4) for f in factors]
        alphas = alphas or [antidote.default_alpha]
        ks = ks or [antidote.k]
    for value in alphas or []:
        check_alpha(value)
    settings = build_settings(defenses, alphas or [0.0], ks or [0.05], selectors)
    harm_judge = _usable_harm_judge(harm_judge)
    if model is None and antidote is not None and antidote.model.get("name") in bundled.BUNDLED:
        model = antidote.model["name"]
    lm, tokenizer = _load(model, dtype, backend)
    if antidote is not None:
        _check(antidote, lm)
    on_llamacpp = backend == "llamacpp"
    config = RunConfig(
        model=lm.name if on_llamacpp else str(lm.config.antidote_source),
        model_sha256=file_sha256(lm.gguf_path) if on_llamacpp else weights_digest(lm),
        dtype="gguf" if on_llamacpp else dtype, backend=backend, threshold=threshold, refuse_threshold=refuse_threshold,
        antidote_fingerprint=antidote.fingerprint() if antidote is not None else None,
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0, seed=seed,
    )  # fmt: skip
    runner = DefenseRunner(
        lm, tokenizer, antidote, max_new_tokens=max_new_tokens, batch_size=batch_size,
        sampling=sampling,
        perplexity_reference=builtin_calibration().harmless, threshold=threshold, refuse_threshold=refuse_threshold,
    )  # fmt: skip
    err.print(
        f"{len(attack_prompts)} attack prompts x {len(settings)} settings, "
        f"{sum(map(len, benign_sets.values()))} benign prompts x {len(settings)} settings"
    )
    Evaluation(runner, settings, attack_prompts, benign_sets).run(out_dir, config)
    if harm_judge is not None:
        del runner, lm  # the generating model is done: free its memory for the judge's
        judge_run_for_harm(out_dir, harm_judge)
    report = build_report(out_dir)
    _print_overview(out_dir)
    out.print(f"report: {report}  rows: {out_dir / 'rows.jsonl'}  summary: {out_dir / 'summary.csv'}")


def _usable_harm_judge(spec: str) -> str | None:
    """The harm judge an eval will use, checked before any generation: None for 'none', and for the built-in
    judge when its feature model is not installed (with a note: `antidote rejudge` adds the verdicts later)."""
    if spec == "none":
        return None
    if spec != "builtin":
        require_harm_judge(spec, "; or pass --harm-judge none")
        return spec
    missing = harm_judge_missing(spec)
    if missing is None:
        return spec
    err.print(f"[yellow]note:[/] answers are not judged for harm: {missing}; then add the verdicts with "
              "`antidote rejudge DIR`", highlight=False, soft_wrap=True)  # fmt: skip
    return None


def _print_overview(out_dir: Path, summary: list[dict] | None = None) -> None:
    from .eval.report import _fmt, _lookup, setting_label, summarize

    summary = summary if summary is not None else summarize(out_dir)
    overall = _lookup(summary, "dsr", "overall")
    harm = _lookup(summary, "harm_dsr", "overall")
    scopes = sorted({r["scope"] for r in summary if r["metric"] == "benign_compliance"})
    table = Table(title="Defense success rate and benign compliance (%; 95% Wilson interval)")
    table.add_column("setting")
    table.add_column("DSR (refusal)")
    if harm:
        table.add_column("harm-DSR")
    for scope in scopes:
        table.add_column(f"compliance {scope}")
    keys = set(overall) | {k for s in scopes for k in _lookup(summary, "benign_compliance", s)}
    for key in sorted(keys, key=lambda k: (k[0] != "none", k[0], k[1], k[2] or 0, k[3] or "")):
        cells = [_fmt(overall.get(key))] + ([_fmt(harm.get(key))] if harm else [])
        cells += [_fmt(_lookup(summary, "benign_compliance", s).get(key)) for s in scopes]
        table.add_row(setting_label(key), *cells)
    out.print(table)


@app.command("eval")
@friendly_errors
def eval_command(
    goals: GoalsOption,
    out_dir: OutOption,
    model: ModelOption = None,
    dtype: DtypeOption = "float32",
    backend: BackendOption = "transformers",
    antidote_path: AntidoteOption = None,
    attacks: AttacksOption = "all",
    defenses: Annotated[
        str,
        typer.Option(
            help="Comma-separated: none, antidote, antidote+self-reminder, self-reminder, icd, smoothllm, "
            "perplexity, paraphrase, dense-antidote, antidote-gated, antidote-scaled, antidote-monitor (the last "
            "three need a harm probe: `antidote probe`); a steered one may end in @prompt or @generated to "
            "steer only those positions (antidote@prompt), else it steers all"
        ),
    ] = "none,antidote",
    alpha: Annotated[
        list[float] | None, typer.Option(help="Antidote strength(s) [default: the tuned alpha, else the suggested one]")
    ] = None,
    k: Annotated[list[float] | None, typer.Option(help="Sparsity value(s) [default: the artifact's]")] = None,
    selector: Annotated[list[str] | None, typer.Option(help="top and/or random [default: top]")] = None,
    max_new_tokens: TokensOption = 64,
    batch_size: BatchOption = 16,
    limit: LimitOption = None,
    stride: StrideOption = 1,
    benign: BenignOption = None,
    xstest: XSTestOption = None,
    benign_limit: BenignLimitOption = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy; > 0 samples with --seed")] = 0.0,
    seed: Annotated[int, typer.Option(help="Sampling seed")] = 0,
    threshold: Annotated[float, typer.Option(help="Harm probability from which antidote-gated steers")] = 0.5,
    refuse_threshold: Annotated[
        float | None,
        typer.Option(
            help="Harm probability from which the steered defenses refuse a prompt outright, without generating "
            "(needs the harm probe) [default: never; the tuned value is in `antidote inspect`]"
        ),
    ] = None,
    harm_judge: HarmJudgeOption = "builtin",
) -> None:
    """Attack success and defense success per attack and defense, plus benign compliance; resumable.

    Every answer gets two verdicts: refused (keyword judge) and harmful (the harm judge, after generation)."""
    _run(
        model=model, dtype=dtype, backend=backend, antidote_path=antidote_path, goals=goals, attacks=attacks,
        defenses=_split(defenses),
        alphas=alpha, ks=k, selectors=selector or ["top"], out_dir=out_dir, max_new_tokens=max_new_tokens,
        batch_size=batch_size, limit=limit, benign=benign, xstest=xstest, benign_limit=benign_limit,
        temperature=temperature, seed=seed, stride=stride, threshold=threshold, harm_judge=harm_judge,
        refuse_threshold=refuse_threshold,
    )  # fmt: skip


@app.command()
@friendly_errors
def sweep(
    goals: GoalsOption,
    out_dir: OutOption,
    antidote_path: Annotated[Path, typer.Option("--antidote", "-a", help="A .antidote file")],
    model: ModelOption = None,
    dtype: DtypeOption = "float32",
    backend: BackendOption = "transformers",
    attacks: AttacksOption = "all",
    factor: Annotated[
        list[float] | None,
        typer.Option(help="Alphas as multiples of the suggested alpha [default: 0 .25 .5 .75 1 1.5 2]"),
    ] = None,
    alpha: Annotated[
        list[float] | None, typer.Option(help="Absolute alphas (instead of --factor) [default: none, --factor is used]")
    ] = None,
    k: Annotated[list[float] | None, typer.Option(help="Sparsity grid [default: 0.01 0.025 0.05 0.1 0.25 1]")] = None,
    selector: Annotated[
        list[str] | None,
        typer.Option(help="Coordinate selectors [default: top random]; k = 1 runs once, as top (both keep all)"),
    ] = None,
    max_new_tokens: TokensOption = 64,
    batch_size: BatchOption = 16,
    limit: LimitOption = None,
    stride: StrideOption = 1,
    benign: BenignOption = None,
    xstest: XSTestOption = None,
    benign_limit: BenignLimitOption = None,
    harm_judge: HarmJudgeOption = "builtin",
) -> None:
    """alpha x k x selector grid of the antidote (plus the undefended model), with plots of the trade-off."""
    _run(
        model=model, dtype=dtype, backend=backend, antidote_path=antidote_path, goals=goals, attacks=attacks,
        defenses=["none", "antidote"],
        alphas=alpha, ks=k or SWEEP_KS, selectors=selector or ["top", "random"], out_dir=out_dir,
        max_new_tokens=max_new_tokens, batch_size=batch_size, limit=limit, benign=benign, xstest=xstest,
        benign_limit=benign_limit, temperature=0.0, seed=0, factors=None if alpha else (factor or SWEEP_FACTORS),
        stride=stride, harm_judge=harm_judge,
    )  # fmt: skip


@app.command("report")
@friendly_errors
def report_command(
    sources: Annotated[
        list[Path],
        typer.Argument(help="Evaluation directories, or report directories written by `antidote report --out`"),
    ],
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Write the report here [default: into the one source given]"),
    ] = None,
) -> None:
    """Rebuild summary.csv, report.md and the plots of an evaluation directory, or combine several.

    Several parts (a long run split over sessions or machines) combine only if they were run with the same
    configuration; a setting found in more than one part must have identical numbers in each."""
    from .eval.combine import SUMMARY_FILE, build_combined_report, read_summary_csv

    if out_dir is None:
        if len(sources) > 1:
            raise InvalidParameter("combining several directories needs --out DIR for the combined report")
        out_dir = sources[0]
    path = build_combined_report(sources, out_dir)
    _print_overview(out_dir, read_summary_csv(out_dir / SUMMARY_FILE))
    out.print(f"report: {path}")


@app.command("judge-agreement")
@friendly_errors
def judge_agreement(
    label_files: Annotated[
        list[Path],
        typer.Argument(
            help="Files with human labels: XSTest v2 completion CSVs (prompt, completion, final_label: refusal "
            "labels) and/or harm label CSVs (question, answer, label with 1 = harmful answer, as JailbreakEval's "
            "JAILJUDGEmini.csv and Safe-RLHFmini.csv)"
        ),
    ],
    llm_judge: Annotated[
        str | None,
        typer.Option(
            help="Also rate with an LLM judge (PAIR rubric): a bundled name or local path, or the URL of "
            "an OpenAI-compatible endpoint you run (http://host:port/v1; --llm-judge-model picks its model, "
            "$OPENAI_API_KEY its key) [default: none]"
        ),
    ] = None,
    llm_judge_model: Annotated[
        str | None, typer.Option(help="Model name at the --llm-judge endpoint [default: the first it lists]")
    ] = None,
    llm_threshold: Annotated[
        int, typer.Option(help="LLM rating (1-10) at or above which an answer counts as complying (harmful)")
    ] = 5,
    harm_judge: Annotated[
        str | None,
        typer.Option(
            help="Also the harm judge: 'builtin' or a .npz from `antidote train-judge`; refused if it was "
            "trained on a file's rows (train-judge reports held-out agreement) [default: none]"
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N rows of each file [default: all]")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON instead of tables")] = False,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Also write judge_agreement.json and judge_agreement.png here [default: none]"
        ),
    ] = None,
) -> None:
    """How often the judges agree with human labels: refusal (accuracy, recall of each class) on XSTest
    completions; harm (accuracy, Cohen's kappa, precision and recall of "harmful") on harm label files."""
    from .eval.judge_agreement import agreement_rows, label_kind, plot_agreement
    from .eval.judges import llm_judge_ratings

    _check_counts(limit=limit)
    if not 1 <= llm_threshold <= 10:
        raise InvalidParameter(f"--llm-threshold is a rating from 1 to 10, got {llm_threshold}")
    for path in label_files:
        label_kind(path)  # every file readable and of a known layout before any model loads
    judge = None
    if harm_judge is not None:
        from .eval.harm_judge import HarmJudge
        from .eval.judge_agreement import check_held_out

        require_harm_judge(harm_judge)
        judge = HarmJudge.load(harm_judge)
        check_held_out(label_files, limit, judge)
    llm = None
    if llm_judge and llm_judge.startswith(("http://", "https://")):
        from .eval.judges import endpoint_ratings

        url = llm_judge
        llm = (url, lambda goals, answers: endpoint_ratings(url, goals, answers, model=llm_judge_model))
    elif llm_judge:
        judge_model, judge_tokenizer = _load(llm_judge)
        llm = (llm_judge, lambda goals, answers: llm_judge_ratings(judge_model, judge_tokenizer, goals, answers))
    rows = agreement_rows(label_files, limit, llm, llm_threshold, judge)
    if as_json:
        print(json.dumps({"rows": rows}, indent=2))
    else:
        _print_agreement(rows)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / "judge_agreement.json", json.dumps({"rows": rows}, indent=2))
        plot_agreement(rows, out_dir / "judge_agreement.png")


def _print_agreement(rows: list[dict]) -> None:
    tables = {
        "refusal": ("Refusal judges against XSTest human labels", ("accuracy", "refusal_recall", "compliance_recall")),
        "harm": ("Harm judges against human harm labels", ("accuracy", "kappa", "precision", "recall")),
    }
    for kind, (title, metrics) in tables.items():
        chosen = [row for row in rows if row["labels"] == kind]
        if not chosen:
            continue
        table = Table(title=title)
        for column in ("judge", "file", "n", *(m.replace("_", " ") for m in metrics)):
            table.add_column(column)
        for row in chosen:
            table.add_row(row["judge"], row["file"], str(row["n"]), *(f"{row[m]:.3f}" for m in metrics))
        out.print(table)
