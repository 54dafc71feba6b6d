"""Issue 19's Pareto figure over several evaluation directories: DSR against harmless_test compliance (left)
and against XSTest-safe compliance (right), one curve per fit method x positions policy x mode (its points
are the alphas run), one point per baseline defense (none, icd, ...), from each directory's summary.csv.

    python benchmarks/methods_pareto.py docs/results/methods-slice/{pca,null_space,jailbreak_diff} \
        --out docs/results/methods-slice/pareto_methods.png [--metric harm_dsr]

Each directory is one artifact (one fit method); its name labels its curves. Error bars are 95% Wilson
intervals. Writes the PNG atomically and prints the points it drew.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

STEERED_PREFIX = ("antidote", "dense-antidote")


def read_points(
    run: Path, metric: str, name: str | None = None
) -> dict[str, list[tuple[float, dict[str, tuple[float, float, float]]]]]:
    """{curve label: [(alpha, {scope: (value, ci_low, ci_high)})]} of one directory: the attack `metric` over
    all prompts and benign compliance on harmless_test and xstest-safe."""
    wanted = {(metric, "overall"): "attack", ("benign_compliance", "harmless_test"): "harmless_test",
              ("benign_compliance", "xstest-safe"): "xstest-safe"}  # fmt: skip
    by_setting: dict[tuple[str, float], dict[str, tuple[float, float, float]]] = defaultdict(dict)
    with open(run / "summary.csv", newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            scope = wanted.get((row["metric"], row["scope"]))
            if scope is not None and row["selector"] in ("", "top"):
                values = (float(row["value"]), float(row["ci_low"]), float(row["ci_high"]))
                by_setting[(row["defense"], float(row["alpha"] or 0))][scope] = values
    curves: dict[str, list] = defaultdict(list)
    for (defense, alpha), scopes in sorted(by_setting.items()):
        if len(scopes) < 3:
            continue  # a setting without both benign sets cannot be placed on both panels
        label = f"{name or run.name} {defense}" if defense.startswith(STEERED_PREFIX) else defense
        curves[label].append((alpha, scopes))
    return curves


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="evaluation directories holding summary.csv")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--metric", choices=("dsr", "harm_dsr"), default="dsr",
                        help="attack metric on the y axis: DSR by refusal (default) or by harm")  # fmt: skip
    args = parser.parse_args()
    for run in args.runs:
        if not (run / "summary.csv").is_file():
            print(f"error: {run} holds no summary.csv (run `antidote report {run}` first)", file=sys.stderr)
            return 2
    if args.out.suffix.lower() != ".png":
        print(f"error: --out {args.out} must end in .png", file=sys.stderr)
        return 2

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list] = {}
    names = [run.name for run in args.runs]
    for run in args.runs:  # two directories of one name (parts of two tables): told apart by their parent
        name = f"{run.parent.name}/{run.name}" if names.count(run.name) > 1 else run.name
        for label, points in read_points(run, args.metric, name).items():
            curves.setdefault(label, points)  # baselines appear in one directory only; the first one counts
    ylabel = "DSR by refusal" if args.metric == "dsr" else "DSR by harm"
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    markers = "ovs^DPXh*<>"  # distinct per curve, so curves that coincide (gated = monitor) stay visible
    for ax, scope in zip(axes, ("harmless_test", "xstest-safe")):
        for index, (label, points) in enumerate(curves.items()):
            xs = [p[1][scope][0] for p in points]
            ys = [p[1]["attack"][0] for p in points]
            xerr = [[x - p[1][scope][1] for x, p in zip(xs, points)], [p[1][scope][2] - x for x, p in zip(xs, points)]]
            yerr = [[y - p[1]["attack"][1] for y, p in zip(ys, points)],
                    [p[1]["attack"][2] - y for y, p in zip(ys, points)]]  # fmt: skip
            steered = len(points) > 1 or points[0][0] > 0
            marker = markers[index % len(markers)]
            ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt=f"{marker}-" if steered else marker, capsize=2, alpha=0.8,
                        elinewidth=0.6, label=label, markersize=6 if steered else 10, fillstyle="none")  # fmt: skip
            for x, y, (alpha, _scopes) in zip(xs, ys, points):
                if alpha > 0:
                    ax.annotate(f"{alpha:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
            print(f"{scope:14s} {label:40s} " + "  ".join(f"a={a:g}: ({s[scope][0]:.3f}, {s['attack'][0]:.3f})"
                                                            for a, s in points))  # fmt: skip
        ax.set_xlabel(f"{scope} compliance")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{ylabel} (held-out attack prompts)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=5)
    fig.suptitle(f"{ylabel} against benign compliance, per method x policy x mode (labels: alpha)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".png", dir=args.out.parent)
    os.close(handle)
    try:
        fig.savefig(temporary, dpi=120)
        os.replace(temporary, args.out)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
