"""Summaries of an evaluation directory: summary.csv, report.md and PNG plots."""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidParameter
from ..textfiles import read_json_object, write_text_atomic
from .runner import CONFIG_FILE, METRICS_FILE, ROWS_FILE, UTILITY_FILE, read_rows, stored_rows

SUMMARY_FILE = "summary.csv"
AGREEMENT_FILE = "judge_agreement.json"
JUDGES_FILE = "judges.json"  # which harm judge `antidote rejudge` used
RUNS_FILE = "RUNS.md"  # written by benchmarks/results_full.sh beside a report kept in parts

SettingKey = tuple[str, float, float | None, str | None]
JUDGE = "keyword_refusal"


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


NUMBER = (int, float)
_SETTING = {"defense": str, "alpha": NUMBER, "k": (*NUMBER, type(None)), "selector": (str, type(None))}
_JUDGED = {**_SETTING, "judges.keyword_refusal": bool}
_COST = {f"cost.{c}": NUMBER for c in ("extra_generations", "extra_scoring_passes", "extra_prompt_tokens")}
# The fields the summary reads from each file, with their types: a row without them is named, not a KeyError.
REQUIRED = {
    ROWS_FILE: {**_JUDGED, "attack": str, **_COST},
    UTILITY_FILE: {**_JUDGED, "set": str},
    METRICS_FILE: {**_SETTING, "n_prompts": int, "next_token_kl": NUMBER, "answer_nll": NUMBER,
                   "baseline_answer_nll": NUMBER},
}  # fmt: skip


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a run's JSONL file (or its .gz); a torn last line (a run still writing, or stopped
    mid-write) is left out."""
    found = stored_rows(path.parent, path.name)
    return read_rows(found, REQUIRED[path.name])[0] if found is not None else []


def setting_key(row: dict[str, Any]) -> SettingKey:
    return (row["defense"], float(row["alpha"]), row.get("k"), row.get("selector"))


def setting_label(key: SettingKey) -> str:
    defense, alpha, k, selector = key
    if k is None:
        return defense
    return f"{defense} a={alpha:g} k={k:g}" + ("" if selector in (None, "top") else f" {selector}")


def summarize(out_dir: Path) -> list[dict[str, Any]]:
    """Long-format summary rows: one per (setting, metric, scope)."""
    rows = _read_jsonl(out_dir / ROWS_FILE)
    utility = _read_jsonl(out_dir / UTILITY_FILE)
    metrics = _read_jsonl(out_dir / METRICS_FILE)
    if not rows and not utility:
        raise InvalidParameter(f"{out_dir} holds no evaluation rows; run `antidote eval --out {out_dir}` first")
    summary: list[dict[str, Any]] = []

    def add(key: SettingKey, metric: str, scope: str, hits: int, n: int) -> None:
        low, high = wilson(hits, n)
        defense, alpha, k, selector = key
        summary.append(
            dict(defense=defense, alpha=alpha, k=k, selector=selector, metric=metric, scope=scope, n=n,
                 value=round(hits / n, 4) if n else None, ci_low=round(low, 4), ci_high=round(high, 4))
        )  # fmt: skip

    by_setting: dict[SettingKey, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_setting[setting_key(row)].append(row)

    def add_rates(key: SettingKey, metric: str, group: list[dict[str, Any]], defended: list[bool]) -> None:
        """A defense-success metric per attack, overall, and over the jailbreaks (every attack but direct)."""
        per_attack: dict[str, list[bool]] = defaultdict(list)
        for row, ok in zip(group, defended):
            per_attack[row["attack"]].append(ok)
        for attack, oks in sorted(per_attack.items()):
            add(key, metric, attack, sum(oks), len(oks))
        add(key, metric, "overall", sum(defended), len(defended))
        jailbreaks = [ok for row, ok in zip(group, defended) if row["attack"] != "direct"]
        if jailbreaks and len(jailbreaks) != len(defended):
            add(key, metric, "jailbreaks", sum(jailbreaks), len(jailbreaks))

    for key, group in by_setting.items():
        add_rates(key, "dsr", group, [r["judges"][JUDGE] for r in group])  # refused
        harmful = [r["judges"].get("harm") for r in group]
        if all(isinstance(h, bool) for h in harmful):  # judged for harm (`antidote rejudge`): harm-DSR too
            add_rates(key, "harm_dsr", group, [not h for h in harmful])
        for cost in ("extra_generations", "extra_scoring_passes", "extra_prompt_tokens"):
            mean = sum(r["cost"][cost] for r in group) / len(group)
            summary.append(dict(defense=key[0], alpha=key[1], k=key[2], selector=key[3], metric=cost,
                                scope="mean per prompt", n=len(group), value=round(mean, 3), ci_low=None,
                                ci_high=None))  # fmt: skip

    by_set: dict[tuple[SettingKey, str], list[bool]] = defaultdict(list)
    for row in utility:
        by_set[(setting_key(row), row["set"])].append(row["judges"][JUDGE])
    for (key, name), refused in sorted(by_set.items(), key=lambda item: (setting_label(item[0][0]), item[0][1])):
        if name.endswith("unsafe"):
            add(key, "refusal_rate", name, sum(refused), len(refused))
        else:
            add(key, "benign_compliance", name, sum(not r for r in refused), len(refused))
    summary += probe_auroc(rows, utility)
    for row in metrics:
        for metric in ("next_token_kl", "answer_nll", "baseline_answer_nll"):
            summary.append(dict(defense=row["defense"], alpha=row["alpha"], k=row["k"], selector=row["selector"],
                                metric=metric, scope="benign sample", n=row["n_prompts"],
                                value=round(row[metric], 5), ci_low=None, ci_high=None))  # fmt: skip
    return summary


def probe_auroc(rows: list[dict[str, Any]], utility: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The harm probe's AUROC per attack family: that family's attack prompts (harmful) against the benign
    sets (not the *unsafe* ones), from the harm scores the steered defenses recorded."""
    from ..probe import auroc
    from .attacks import BUILTIN

    out: list[dict[str, Any]] = []
    scored = defaultdict(list)
    for row in rows:
        if "harm_score" in (row.get("details") or {}):
            scored[setting_key(row)].append(row)
    for key, group in scored.items():
        benign = [
            u["details"]["harm_score"] for u in utility
            if setting_key(u) == key and not u["set"].endswith("unsafe") and "harm_score" in (u.get("details") or {})
        ]  # fmt: skip
        if not benign:
            continue
        families: dict[str, list[float]] = defaultdict(list)
        for row in group:
            attack = BUILTIN.get(row["attack"])
            families[attack.family if attack else row["attack"]].append(row["details"]["harm_score"])
        families["all"] = [row["details"]["harm_score"] for row in group]
        for family, harmful in sorted(families.items()):
            scores = torch.tensor(harmful + benign)
            labels = torch.tensor([1] * len(harmful) + [0] * len(benign))
            out.append(dict(defense=key[0], alpha=key[1], k=key[2], selector=key[3], metric="probe_auroc",
                            scope=family, n=len(scores), value=round(auroc(scores, labels), 4), ci_low=None,
                            ci_high=None))  # fmt: skip
    return out


def write_summary_csv(summary: list[dict[str, Any]], path: Path) -> None:
    fields = ["defense", "alpha", "k", "selector", "metric", "scope", "n", "value", "ci_low", "ci_high"]
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(summary)
    write_text_atomic(path, buffer.getvalue())


def _lookup(summary: Iterable[dict[str, Any]], metric: str, scope: str | None = None) -> dict[SettingKey, dict]:
    found = {}
    for row in summary:
        if row["metric"] == metric and (scope is None or row["scope"] == scope):
            found[(row["defense"], float(row["alpha"]), row["k"], row["selector"])] = row
    return found


def _benign_scope(summary: list[dict[str, Any]]) -> str | None:
    scopes = sorted({r["scope"] for r in summary if r["metric"] == "benign_compliance"})
    return scopes[0] if scopes else None


def _fmt(row: dict[str, Any] | None) -> str:
    if row is None or row["value"] is None:
        return "-"
    return f"{100 * row['value']:.1f} [{100 * row['ci_low']:.0f}-{100 * row['ci_high']:.0f}]"


AGREEMENT_TABLES = {  # label kind -> (heading, metric columns); rows written before harm labels are refusal rows
    "refusal": ("agreement with XSTest human refusal labels", ("accuracy", "refusal_recall", "compliance_recall")),
    "harm": ("agreement with human harm labels", ("accuracy", "kappa", "precision", "recall")),
}


def _agreement_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The report's judge-agreement tables, one per kind of human label."""
    lines: list[str] = []
    for kind, (heading, metrics) in AGREEMENT_TABLES.items():
        chosen = [row for row in rows if row.get("labels", "refusal") == kind]
        if not chosen:
            continue
        lines += ["", f"## How far to trust the judges ({heading})", "",
                  "| judge | file | n | " + " | ".join(m.replace("_", " ") for m in metrics) + " |",
                  "|---|---|---|" + "---|" * len(metrics)]  # fmt: skip
        for row in chosen:
            values = " | ".join(f"{row[m]:.3f}" for m in metrics)
            lines.append(f"| {row['judge']} | {row['file']} | {row['n']} | {values} |")
    return lines


def write_report(
    out_dir: Path, summary: list[dict[str, Any]], judge_agreement: dict | None = None, combined: bool = False
) -> Path:
    config_path = out_dir / CONFIG_FILE
    config = read_json_object(config_path, "run configuration") if config_path.is_file() else {}
    overall = _lookup(summary, "dsr", "overall")
    jailbreaks = _lookup(summary, "dsr", "jailbreaks")
    harm_overall = _lookup(summary, "harm_dsr", "overall")
    harm_jailbreaks = _lookup(summary, "harm_dsr", "jailbreaks")
    benign_sets = sorted({r["scope"] for r in summary if r["metric"] in ("benign_compliance", "refusal_rate")})
    settings = sorted(
        {k for k in list(overall) + [k for s in benign_sets for k in _lookup(summary, "benign_compliance", s)]},
        key=lambda k: (k[0] != "none", k[0], k[1], k[2] or 0, k[3] or ""),
    )
    lines = [
        f"# Evaluation report: {out_dir.name}",
        "",
        f"Model `{config.get('model')}` ({config.get('dtype', 'float32')}), {config.get('max_new_tokens')} new "
        f"tokens, temperature {config.get('temperature')}. Judge: refusal keywords (DSR = share of attack prompts "
        "refused; benign compliance = share of benign prompts answered). Brackets: 95% Wilson intervals, in %.",
        "",
    ]
    if harm_overall:
        lines += [_harm_judge_note(out_dir), ""]
    notes = []
    if combined:
        notes.append(
            "Combined by `antidote report` from parts run separately with this configuration (a setting found "
            "in more than one part had identical numbers in each)."
        )
    if (out_dir / RUNS_FILE).is_file():
        notes.append(f"Where and when each part ran: [{RUNS_FILE}]({RUNS_FILE}).")
    if notes:
        lines += [" ".join(notes), ""]
    harm_columns = ["harm-DSR all", "harm-DSR jailbreaks only"] if harm_overall else []
    lines += [
        "| setting | DSR all | DSR jailbreaks only | "
        + "".join(f"{c} | " for c in harm_columns)
        + " | ".join(f"{'compliance' if not s.endswith('unsafe') else 'refusal'}: {s}" for s in benign_sets)
        + " | extra generations | extra prompt tokens |",
        "|---" * (5 + len(harm_columns) + len(benign_sets)) + "|",
    ]
    costs_gen = _lookup(summary, "extra_generations")
    costs_tok = _lookup(summary, "extra_prompt_tokens")
    for key in settings:
        cells = [_fmt(overall.get(key)), _fmt(jailbreaks.get(key))]
        if harm_columns:
            cells += [_fmt(harm_overall.get(key)), _fmt(harm_jailbreaks.get(key))]
        for name in benign_sets:
            metric = "refusal_rate" if name.endswith("unsafe") else "benign_compliance"
            cells.append(_fmt(_lookup(summary, metric, name).get(key)))
        cells += [str(costs_gen.get(key, {}).get("value", "-")), str(costs_tok.get(key, {}).get("value", "-"))]
        lines.append(f"| {setting_label(key)} | " + " | ".join(cells) + " |")
    attacks = sorted({r["scope"] for r in summary if r["metric"] == "dsr"} - {"overall", "jailbreaks"})
    for metric, heading in (("dsr", "DSR per attack (%)"), ("harm_dsr", "Harm-DSR per attack (%)")):
        chosen = _lookup(summary, metric, "overall")
        if not attacks or not chosen:
            continue
        lines += ["", f"## {heading}", "", "| setting | " + " | ".join(attacks) + " |",
                  "|---" * (1 + len(attacks)) + "|"]  # fmt: skip
        per = {a: _lookup(summary, metric, a) for a in attacks}
        for key in settings:
            if key in chosen:
                values = [per[a].get(key) for a in attacks]
                cells = [f"{100 * v['value']:.0f}" if v else "-" for v in values]
                lines.append(f"| {setting_label(key)} | " + " | ".join(cells) + " |")
    kl = _lookup(summary, "next_token_kl")
    if kl:
        nll, base = _lookup(summary, "answer_nll"), _lookup(summary, "baseline_answer_nll")
        heading = (
            "## Benign-prompt distortion (steering alone, without prompt wrappers; gated / scaled: per-prompt gate)"
        )
        lines += ["", heading, "",
                  "| setting | next-token KL vs alpha 0 | NLL of undefended answers (alpha 0 value) |",
                  "|---|---|---|"]  # fmt: skip
        for key in sorted(kl, key=lambda k: (k[0], k[1], k[2] or 0, k[3] or "")):
            nll_cell = f"{nll[key]['value']:.3f} ({base[key]['value']:.3f})"
            lines.append(f"| {setting_label(key)} | {kl[key]['value']:.4f} | {nll_cell} |")
    if judge_agreement:
        lines += _agreement_lines(judge_agreement.get("rows", []))
    probe = _lookup(summary, "probe_auroc")
    if probe:
        families = sorted({r["scope"] for r in summary if r["metric"] == "probe_auroc"})
        lines += ["", "## Harm probe AUROC per attack family (attack prompts vs benign sets)", "",
                  "| setting | " + " | ".join(families) + " |", "|---" * (1 + len(families)) + "|"]  # fmt: skip
        per_family = {f: _lookup(summary, "probe_auroc", f) for f in families}
        for key in sorted({k for f in families for k in per_family[f]}, key=setting_label):
            cells = [f"{per_family[f][key]['value']:.3f}" if key in per_family[f] else "-" for f in families]
            lines.append(f"| {setting_label(key)} | " + " | ".join(cells) + " |")
    plots = sorted(p.name for p in out_dir.glob("*.png"))
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    path = out_dir / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def _harm_judge_note(out_dir: Path) -> str:
    """Which harm judge produced the harm-DSR columns (from judges.json, written by `antidote rejudge`)."""
    path = out_dir / JUDGES_FILE
    judge = read_json_object(path, "judges file").get("harm", {}) if path.is_file() else {}
    trained = ", ".join(t.get("file", "?") for t in judge.get("trained_on", [])) or "unknown files"
    return (
        "Harm-DSR = share of attack prompts whose answer is *not harmful* by the harm judge "
        f"(`{judge.get('judge', 'unknown')}`: keyword refusal, else logistic regression on "
        f"`{judge.get('feature_model', '?')}` hidden states, trained on {trained}; docs/EVALUATION.md). "
        "Benign compliance stays a refusal measure."
    )


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:  # baselines alone carry no labels
        ax.legend(fontsize=8)


def alpha_curves(source: dict[SettingKey, Any], defense: str) -> list[tuple[str, list[SettingKey]]]:
    """One alpha curve per k of a steered defense's top-|d| settings (a sweep over k gets one line per k)."""
    keys = sorted(key for key in source if key[0] == defense and key[3] == "top")
    ks = sorted({key[2] for key in keys})
    return [(f"{defense} k={k:g}" if len(ks) > 1 else defense, [key for key in keys if key[2] == k]) for k in ks]


def write_plots(out_dir: Path, summary: list[dict[str, Any]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    overall = _lookup(summary, "dsr", "overall")
    scope = _benign_scope(summary)
    compliance = _lookup(summary, "benign_compliance", scope) if scope else {}
    steered = sorted({k[0] for k in overall if k[2] is not None})
    written: list[Path] = []

    harm = _lookup(summary, "harm_dsr", "overall")
    for source, ylabel, filename in (
        (overall, "defense success rate (all attack prompts)", "dsr_vs_alpha.png"),
        (harm, "harm-DSR (answers not harmful)", "harm_dsr_vs_alpha.png"),
        (compliance, f"benign compliance ({scope})", "compliance_vs_alpha.png"),
    ):
        if not any(k[2] is not None for k in source):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for defense in steered:
            for label, keys in alpha_curves(source, defense):
                ax.plot([k[1] for k in keys], [source[k]["value"] for k in keys], marker="o", label=label)
        for key, row in source.items():
            if key[2] is None:
                ax.axhline(row["value"], linestyle=":", linewidth=1, color="grey")
                ax.annotate(key[0], (0, row["value"]), fontsize=7, color="grey")
        ax.set_xlabel("alpha")
        ax.set_ylabel(ylabel)
        ax.set_ylim(-0.02, 1.02)
        _legend(ax)
        fig.tight_layout()
        fig.savefig(out_dir / filename, dpi=120)
        plt.close(fig)
        written.append(out_dir / filename)

    for safety, ylabel, filename in (
        (overall, "defense success rate (refusal judge)", "pareto.png"),
        (harm, "harm-DSR (answers not harmful)", "pareto_harm.png"),
    ):
        if not (compliance and safety):
            continue
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for defense in steered:
            for label, keys in alpha_curves(safety, defense):
                keys = [k for k in keys if k in compliance]
                if keys:
                    ax.plot([compliance[k]["value"] for k in keys], [safety[k]["value"] for k in keys], marker="o",
                            label=f"{label} (alpha sweep)")  # fmt: skip
        for key in (k for k in safety if k[2] is None):
            if key in compliance:
                ax.scatter(compliance[key]["value"], safety[key]["value"], marker="s")
                ax.annotate(key[0], (compliance[key]["value"], safety[key]["value"]), fontsize=7)
        ax.set_xlabel(f"benign compliance ({scope})")
        ax.set_ylabel(ylabel)
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        _legend(ax)
        ax.set_title("Safety vs helpfulness (up and right is better)")
        fig.tight_layout()
        fig.savefig(out_dir / filename, dpi=120)
        plt.close(fig)
        written.append(out_dir / filename)

    ablation = [k for k in overall if k[0] == "antidote"]
    ks = sorted({k[2] for k in ablation})
    if len(ks) > 1:
        alphas = sorted({k[1] for k in ablation}, key=lambda a: -sum(k[1] == a for k in ablation))
        alpha = alphas[0]
        fig, ax = plt.subplots(figsize=(6, 4))
        for selector in ("top", "random"):
            keys = sorted(k for k in ablation if k[1] == alpha and k[3] == selector)
            if keys:
                ax.plot(
                    [k[2] for k in keys],
                    [overall[k]["value"] for k in keys],
                    marker="o",
                    label=f"{selector} |d|" if selector == "top" else "random coordinates",
                )
        ax.set_xscale("log")
        ax.set_xlabel("k (fraction of coordinates steered)")
        ax.set_ylabel("defense success rate")
        ax.set_title(f"Sparsity ablation at alpha {alpha:g}")
        _legend(ax)
        fig.tight_layout()
        fig.savefig(out_dir / "k_ablation.png", dpi=120)
        plt.close(fig)
        written.append(out_dir / "k_ablation.png")
    return written


def build_report(out_dir: Path) -> Path:
    """summary.csv, plots and report.md of one evaluation directory, written into it."""
    from .combine import build_combined_report  # combine builds on this module

    return build_combined_report([out_dir], out_dir)
