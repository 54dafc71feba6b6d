"""Run goals x attacks x defense settings (and benign utility sets) and store one JSON line per row.

Rows are appended as they finish, so an interrupted run loses at most one chunk; rerunning the same
command skips the rows already present. An output directory belongs to one configuration (model,
antidote, generation settings): mixing rows from another configuration is refused.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..context import check_token_ids, describe
from ..errors import InvalidParameter
from ..models import prompt_token_ids
from ..textfiles import jsonl_lines, jsonl_text, read_json_object, write_text_atomic
from .attacks import AttackPrompt
from .defenses import DefenseRunner, Setting, is_steered, mode_of, positions_of
from .judges import is_refusal

CONFIG_FILE = "config.json"
ROWS_FILE = "rows.jsonl"
UTILITY_FILE = "utility.jsonl"
METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class RunConfig:
    """What must match for rows to be comparable (and to be resumed)."""

    model: str
    model_sha256: str
    antidote_fingerprint: str | None  # Antidote.fingerprint(): the same for two fits of the same data
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    dtype: str = "float32"
    backend: str = "transformers"
    threshold: float = 0.5  # antidote-gated's harm-probability threshold
    refuse_threshold: float | None = None  # steered defenses: harm probability from which a prompt is refused

    def describe_difference(self, other: dict[str, Any]) -> str:
        mine = asdict(self)
        changed = [f"{k}: {other.get(k)!r} there vs {v!r} now" for k, v in mine.items() if other.get(k) != v]
        return ", ".join(changed + [f"{k}: {other[k]!r} there, unknown now" for k in other if k not in mine])


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_rows(path: Path, required: Mapping[str, Any] | None = None) -> tuple[list[dict[str, Any]], bool]:
    """(rows, whether the file needs rewriting) of a JSONL rows file written by this module.

    A run stopped mid-write leaves a torn last line, possibly cut inside a multi-byte character: it is
    dropped (the rerun recomputes it), so the file needs rewriting, as it does when its last row lacks the
    final newline. A bad line anywhere else, a line that is not an object, or a row without one of the
    `required` fields ("a.b" -> type) is an InvalidParameter naming the line."""
    if path.is_dir():
        raise InvalidParameter(f"{path} is a directory, not a rows file; move it out of the way")
    data = path.read_bytes()
    if path.suffix == ".gz":  # published rows (docs/results/<run>/rows.jsonl.gz)
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise InvalidParameter(
                f"{path} is not a complete gzip file ({exc}); restore it from the repository"
            ) from None
    cut = data.rfind(b"\n") + 1  # the complete lines end at the last newline
    try:
        text = data[:cut].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidParameter(f"{path}: not UTF-8 at byte {exc.start}; restore the file or delete it") from None
    rows = [_checked_row(path, number, line, required) for number, line in jsonl_lines(text)]
    tail = data[cut:]
    if not tail.strip():
        return rows, bool(tail)
    with contextlib.suppress(UnicodeDecodeError, InvalidParameter):  # a last line without its newline:
        rows.append(_checked_row(path, text.count("\n") + 1, tail.decode("utf-8"), required))  # whole, or torn
    return rows, True


def _checked_row(path: Path, number: int, line: str, required: Mapping[str, Any] | None) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidParameter(f"{path} line {number} is corrupt ({exc.msg}); delete that line or the file") from None
    if not isinstance(row, dict):
        raise InvalidParameter(f"{path} line {number} is not a JSON object; delete that line or the file")
    for name, kind in (required or {}).items():
        value = row
        for part in name.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise InvalidParameter(
                f"{path} line {number} has no valid {name!r} (found {value!r:.40}); it was not written by "
                "`antidote eval`: delete that line or the file"
            )
    return row


def stored_rows(directory: Path, name: str) -> Path | None:
    """The rows file `name` of a run directory: as `antidote eval` writes it, or gzipped as published runs
    keep it (`name`.gz); None if neither exists."""
    for path in (directory / name, directory / f"{name}.gz"):
        if path.is_file():
            return path
    return None


class RowStore:
    """Append-only JSONL rows keyed by a tuple of fields; tolerant of a torn last line after a crash."""

    def __init__(self, path: Path, key_fields: Sequence[str]):
        self.path = path
        self.key_fields = tuple(key_fields)
        self.rows: list[dict[str, Any]] = []
        if path.exists():
            self.rows, rewrite = read_rows(path)
            if rewrite:  # drop a torn tail, end with a newline: appends stay valid JSONL
                write_text_atomic(path, jsonl_text(self.rows))
        self.keys = {self.key(row) for row in self.rows}

    def key(self, row: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(row.get(name) for name in self.key_fields)

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        rows = list(rows)
        with open(self.path, "a", encoding="utf-8", newline="") as handle:
            handle.write(jsonl_text(rows))
        self.rows += rows
        self.keys |= {self.key(r) for r in rows}


SETTING_FIELDS = ("defense", "alpha", "k", "selector")


def open_output(out_dir: Path, config: RunConfig) -> tuple[RowStore, RowStore, RowStore]:
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / CONFIG_FILE
    if config_path.is_file():
        existing = read_json_object(config_path, "run configuration")
        existing.setdefault("dtype", "float32")  # directories written before these options existed
        existing.setdefault("backend", "transformers")
        existing.setdefault("threshold", 0.5)
        existing.setdefault("refuse_threshold", None)
        if "antidote_sha256" in existing:
            raise InvalidParameter(
                f"{out_dir} was written by an older jailbreak-antidote that identified the antidote by its file "
                "checksum; finish that run with the older version, or use another --out directory"
            )
        if existing != asdict(config):
            raise InvalidParameter(
                f"{out_dir} holds rows from a different configuration ({config.describe_difference(existing)}); "
                "use another --out directory, or delete this one to start over"
            )
    else:
        write_text_atomic(config_path, json.dumps(asdict(config), indent=2))
    return (
        RowStore(out_dir / ROWS_FILE, ("goal", "attack", *SETTING_FIELDS)),
        RowStore(out_dir / UTILITY_FILE, ("set", "prompt", *SETTING_FIELDS)),
        RowStore(out_dir / METRICS_FILE, SETTING_FIELDS),
    )


@dataclass
class Job:
    """Prompts to answer under one setting, with the fields each row carries besides the answer."""

    setting: Setting
    prompts: list[str]
    fields: list[dict[str, Any]]
    store: RowStore


@dataclass
class Evaluation:
    runner: DefenseRunner
    settings: list[Setting]
    attack_prompts: list[AttackPrompt]
    benign_sets: dict[str, list[str]] = field(default_factory=dict)
    chunk: int = 64
    console: Console = field(default_factory=lambda: Console(stderr=True))

    def setting_fields(self, setting: Setting) -> dict[str, Any]:
        steered = is_steered(setting.defense)
        k = (1.0 if setting.defense == "dense-antidote" else setting.k) if steered else None
        return {
            "defense": setting.defense,
            "alpha": setting.alpha if steered else 0.0,
            "k": k,
            "selector": setting.selector if steered else None,
        }

    def jobs(self, rows: RowStore, utility: RowStore) -> list[Job]:
        jobs = []
        for setting in self.settings:
            common = self.setting_fields(setting)
            attack_fields = [
                {"goal": a.goal, "category": a.category, "attack": a.attack, "prompt": a.prompt, **common}
                for a in self.attack_prompts
            ]
            benign_fields = [
                {"set": name, "prompt": p, **common} for name, prompts in self.benign_sets.items() for p in prompts
            ]
            for store, fields in ((rows, attack_fields), (utility, benign_fields)):
                pending = [f for f in fields if store.key(f) not in store.keys]
                if pending:
                    jobs.append(Job(setting, [f["prompt"] for f in pending], pending, store))
        return jobs

    def check_context(self) -> None:
        """Refuse to start, naming the rows, if any prompt under any setting (with the defense's own prompt
        text) plus max_new_tokens does not fit the model's context, or holds a token id outside its
        vocabulary: a run never stops half-way on it."""
        runner = self.runner
        rows = [(a.prompt, f"attack prompt (goal {describe(a.goal)}, attack {a.attack!r}") for a in self.attack_prompts]
        rows += [(p, f"{name} prompt ({describe(p)}") for name, group in self.benign_sets.items() for p in group]
        names: dict[str, str] = {}  # each conversation the model will read -> the first row that needs it
        for setting in self.settings:
            for prompt, where in rows:
                for chat in runner.generation_chats(setting, prompt):
                    names.setdefault(json.dumps(chat), f"{where}, defense {setting.label()!r})")
        token_ids = prompt_token_ids(runner.tokenizer, [json.loads(key) for key in names])
        fix = "leave such prompts out of their file (goals, attack or benign), or generate fewer new tokens "
        fix += "(--max-new-tokens)"
        check_token_ids(runner.model, token_ids, list(names.values()), runner.max_new_tokens, fix)

    def run(self, out_dir: Path, config: RunConfig) -> None:
        self.check_context()
        rows, utility, metrics = open_output(out_dir, config)
        jobs = self.jobs(rows, utility)
        total = sum(len(job.prompts) for job in jobs)
        done_before = len(rows.rows) + len(utility.rows)
        if done_before:
            self.console.print(f"resuming: {done_before} rows already in {out_dir}, {total} to go")
        columns = (
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        )  # fmt: skip
        with Progress(*columns, console=self.console) as progress:
            task = progress.add_task("evaluating", total=total, rate="")
            for job in jobs:
                progress.update(task, description=job.setting.label())
                for start in range(0, len(job.prompts), self.chunk):
                    prompts = job.prompts[start : start + self.chunk]
                    outcomes = self.runner.run(job.setting, prompts)
                    job.store.append(
                        self.row(fields, outcome, config)
                        for fields, outcome in zip(job.fields[start : start + self.chunk], outcomes)
                    )
                    progress.advance(task, len(prompts))
                    elapsed = progress.tasks[0].elapsed or 0
                    if elapsed:
                        progress.update(task, rate=f"{progress.tasks[0].completed / elapsed:.2f} rows/s")
        self.utility_metrics(utility, metrics)

    @staticmethod
    def row(fields: dict[str, Any], outcome, config: RunConfig) -> dict[str, Any]:
        return {
            **fields,
            "response": outcome.response,
            "judges": {"keyword_refusal": is_refusal(outcome.response)},
            "blocked": outcome.blocked,
            "cost": {
                "extra_generations": outcome.extra_generations,
                "extra_scoring_passes": outcome.extra_scoring_passes,
                "extra_prompt_tokens": outcome.extra_prompt_tokens,
            },
            "details": outcome.details,
            "config": asdict(config),
        }

    def utility_metrics(self, utility: RowStore, metrics: RowStore, sample: int = 32) -> None:
        """Next-token KL and answer NLL for steered settings, on a sample of the benign (not unsafe) prompts."""
        from .utility import answer_nll, next_token_kl

        runner = self.runner
        if runner.antidote is None or not self.benign_sets or runner.on_llamacpp:
            return  # KL and NLL need the transformers model's logits
        benign = [p for name, group in self.benign_sets.items() if not name.endswith("unsafe") for p in group]
        prompts = benign[:sample]
        if not prompts:
            return
        baseline = {r["prompt"]: r["response"] for r in utility.rows if r["defense"] == "none"}
        if not all(p in baseline for p in prompts):
            answers = runner.run(Setting("none"), prompts)
            baseline.update({p: o.response for p, o in zip(prompts, answers)})
        for setting in self.settings:
            fields = self.setting_fields(setting)
            if not is_steered(setting.defense) or metrics.key(fields) in metrics.keys:
                continue
            if positions_of(setting.defense) != "all":
                continue  # teacher-forced answers are one forward pass: prompt and answer positions not told apart
            antidote = runner.steering_antidote(setting)
            gate = {"mode": mode_of(setting.defense), "threshold": runner.threshold}
            metrics.append(
                [
                    {
                        **fields,
                        "n_prompts": len(prompts),
                        "next_token_kl": next_token_kl(
                            runner.model,
                            runner.tokenizer,
                            prompts,
                            antidote,
                            setting.alpha,
                            runner.batch_size,
                            **gate,
                        ),
                        "answer_nll": answer_nll(
                            runner.model,
                            runner.tokenizer,
                            prompts,
                            [baseline[p] for p in prompts],
                            antidote,
                            setting.alpha,
                            **gate,
                        ),
                        "baseline_answer_nll": answer_nll(
                            runner.model, runner.tokenizer, prompts, [baseline[p] for p in prompts], None, 0.0
                        ),
                    }
                ]
            )
