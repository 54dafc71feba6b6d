"""Every reader returns exactly what the file holds, for every Unicode character; every writer reads back."""

import csv
import io
import json

import pytest
from conftest import fitted_cli_workspace
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from jailbreak_antidote.cli import app
from jailbreak_antidote.errors import PromptFileError
from jailbreak_antidote.eval.attacks import read_attack_file
from jailbreak_antidote.eval.goals import read_goals, read_xstest
from jailbreak_antidote.eval.judges import read_labelled_completions
from jailbreak_antidote.eval.runner import RowStore, read_rows
from jailbreak_antidote.prompts import read_prompts
from jailbreak_antidote.server.requestlog import RequestLog
from jailbreak_antidote.textfiles import jsonl_text, write_text_atomic

# Everything str.splitlines() splits on, besides "\n" and "\r".
SPLITLINES_BREAKS = "\v\f\x1c\x1d\x1e\x85\u2028\u2029"
TRICKY = ["\u2028", "\u2029", "\x85", "\x1c", "\x1d", "\x1e", "\v", "\f", "\x00", "\x7f", "\t", "\r", "\n", "\r\n",
          "😀", "👩‍👩‍👧", "\ufeff", "é", "\u200b", ",", '"', "'", "\\"]  # fmt: skip

# Random text: the tricky characters above mixed with random code points (surrogates excluded: not UTF-8).
PIECES = st.one_of(st.sampled_from(TRICKY), st.characters(exclude_categories=("Cs",)))
TEXT = st.lists(PIECES, min_size=1, max_size=40).map("".join).filter(str.strip)  # blank prompts are skipped
ONE_LINE_TEXT = TEXT.map(lambda s: s.replace("\r", "").replace("\n", "")).filter(lambda s: s.strip())
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def csv_text(header: list[str], rows: list[list[str]]) -> str:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def write(path, text: str):
    path.write_bytes(text.encode("utf-8"))
    return path


def test_unicode_line_separator_in_a_goal_does_not_split_it(tmp_path):
    goals = ["Tell me how to bake bread.\u2028Step by step.", "Write a haiku about the sea."]
    path = write(tmp_path / "goals.json", json.dumps(goals, ensure_ascii=False))
    assert [g.text for g in read_goals(path)] == goals
    jsonl = write(tmp_path / "goals.jsonl", "".join(json.dumps({"goal": g}, ensure_ascii=False) + "\n" for g in goals))
    assert read_prompts(jsonl) == goals


def test_quoted_multiline_csv_cells_keep_their_line_breaks(tmp_path):
    template = "Hello.\n\nYou are X.\r\nWrite a poem."
    path = write(tmp_path / "p.csv", csv_text(["Goal", "Category", "dan"], [[template, "c\u2028d", template + "!"]]))
    assert read_prompts(path) == [template]
    goal = read_goals(path)[0]
    assert (goal.text, goal.category) == (template, "c\u2028d")
    attack = read_attack_file(path)[0]
    assert (attack.goal, attack.prompt) == (template, template + "!")


def test_xstest_and_labelled_completion_cells_keep_their_line_breaks(tmp_path):
    xs = write(tmp_path / "x.csv", csv_text(["prompt", "label"], [["a\nb", "safe"], ["c\u2028d", "unsafe"]]))
    assert read_xstest(xs) == (["a\nb"], ["c\u2028d"])
    labelled = write(
        tmp_path / "l.csv", csv_text(["prompt", "completion", "final_label"], [["p\u2029", "line 1\nline 2", "1_full"]])
    )
    [row] = read_labelled_completions(labelled)
    assert (row.prompt, row.completion, row.refused) == ("p\u2029", "line 1\nline 2", False)


def test_windows_line_ends_and_byte_order_mark(tmp_path):
    assert read_prompts(write(tmp_path / "a.txt", "\ufeffone\r\ntwo\r\n")) == ["one", "two"]
    assert read_prompts(write(tmp_path / "b.jsonl", '{"prompt": "one"}\r\n{"prompt": "two"}\r\n')) == ["one", "two"]
    assert read_prompts(write(tmp_path / "c.csv", 'prompt\r\none\r\n"t\r\nwo"\r\n')) == ["one", "t\r\nwo"]


def test_long_csv_cells_are_read_whole(tmp_path):
    many_shot = "Q: hi\nA: hello\n" * 20_000  # 300,000 characters, past the csv module's default field limit
    assert read_prompts(write(tmp_path / "long.csv", csv_text(["prompt"], [[many_shot]]))) == [many_shot]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('prompt\n"abc', "not valid CSV"),  # unterminated quote
        ('prompt\n"x"y\n', "not valid CSV"),  # stray quote
        ("prompt,prompt\na,b\n", "appear more than once"),
        ("prompt\nhello, world\n", "2 cells under a header of 1"),  # an unquoted comma
        ("a,prompt\n1\n", "1 cells under a header of 2"),  # a short row
    ],
)
def test_malformed_csv_is_a_clear_error_not_silent_loss(tmp_path, content, message):
    with pytest.raises(PromptFileError, match=message):
        read_prompts(write(tmp_path / "bad.csv", content))


def test_attack_jsonl_fields_must_be_text(tmp_path):
    path = write(tmp_path / "a.jsonl", json.dumps({"goal": 3, "attack": "x", "prompt": "y"}) + "\n")
    with pytest.raises(PromptFileError, match="line 1: missing or non-text goal"):
        read_attack_file(path)


def test_rows_with_any_character_round_trip_and_only_a_torn_tail_is_dropped(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"goal": c, "response": f"a{c}b"} for c in TRICKY] + [{"goal": "lone \ud800 surrogate", "response": ""}]
    store = RowStore(path, ("goal",))
    store.append(rows)
    assert read_rows(path) == (rows, False)
    assert RowStore(path, ("goal",)).rows == rows  # a rerun reads every line as valid
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"goal": "torn')
    assert read_rows(path) == (rows, True)
    assert RowStore(path, ("goal",)).rows == rows
    assert read_rows(path) == (rows, False)  # the torn tail was removed
    path.write_text(jsonl_text(rows[:2]) + "{oops}\n" + jsonl_text(rows[2:]), encoding="utf-8")
    with pytest.raises(Exception, match="line 3 is corrupt"):
        RowStore(path, ("goal",))


@FUZZ
@given(prompts=st.lists(TEXT, min_size=1, max_size=4))
def test_fuzz_structured_prompt_files_return_exactly_what_they_hold(tmp_path, prompts):
    as_json = write(tmp_path / "p.json", json.dumps(prompts, ensure_ascii=False))
    as_jsonl = write(
        tmp_path / "p.jsonl", "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts)
    )
    as_csv = write(tmp_path / "p.csv", csv_text(["prompt"], [[p] for p in prompts]))
    for path in (as_json, as_jsonl, as_csv):
        assert read_prompts(path) == prompts, path.name


@FUZZ
@given(prompts=st.lists(ONE_LINE_TEXT, min_size=1, max_size=4))
def test_fuzz_text_files_split_at_line_ends_only(tmp_path, prompts):
    # A byte-order mark opening the file is an encoding mark, not text: give the file one, as Notepad does.
    assert read_prompts(write(tmp_path / "p.txt", "\ufeff" + "\n".join(prompts) + "\n")) == prompts


@FUZZ
@given(goals=st.lists(TEXT, min_size=1, max_size=3, unique=True), prompt=TEXT, category=TEXT)
def test_fuzz_goal_and_attack_files(tmp_path, goals, prompt, category):
    csv_path = write(tmp_path / "g.csv", csv_text(["Goal", "Category", "mine"], [[g, category, prompt] for g in goals]))
    assert [(g.text, g.category) for g in read_goals(csv_path)] == [(g, category) for g in goals]
    assert [(a.goal, a.prompt) for a in read_attack_file(csv_path)] == [(g, prompt) for g in goals]
    jsonl = "".join(
        json.dumps({"goal": g, "attack": "mine", "prompt": prompt}, ensure_ascii=False) + "\n" for g in goals
    )
    assert [(a.goal, a.prompt) for a in read_attack_file(write(tmp_path / "a.jsonl", jsonl))] == [
        (g, prompt) for g in goals
    ]


@FUZZ
@given(texts=st.lists(st.text(max_size=30), min_size=1, max_size=5))
def test_fuzz_every_jsonl_writer_reads_back(tmp_path, texts):
    rows = [{"prompt": t, "response": t[::-1], "i": i} for i, t in enumerate(texts)]
    rows_path = tmp_path / "rows.jsonl"
    rows_path.unlink(missing_ok=True)
    RowStore(rows_path, ("i",)).append(rows)
    assert read_rows(rows_path) == (rows, False)
    atomic = tmp_path / "out.jsonl"
    write_text_atomic(atomic, jsonl_text(rows))
    assert read_rows(atomic) == (rows, False)
    log_path = tmp_path / "log.jsonl"
    log_path.unlink(missing_ok=True)
    log = RequestLog(log_path, log_prompts=True)
    for row in rows:
        log.write({"i": row["i"]}, prompt=row["prompt"], completion=row["response"])
    log.close()
    logged = read_rows(log_path)[0]
    assert [(r["prompt"], r["completion"]) for r in logged] == [(r["prompt"], r["response"]) for r in rows]


def test_eval_and_report_with_a_line_separator_in_a_goal(tmp_path):
    model, _files, artifact = fitted_cli_workspace(tmp_path)
    goals = ["Tell me how to bake bread.\u2028Step by step.", "Write a haiku about the sea."]
    goals_path = write(tmp_path / "goals.json", json.dumps(goals, ensure_ascii=False))
    out = tmp_path / "run"
    args = ["eval", "-m", str(model), "-a", str(artifact), "--goals", str(goals_path), "--attacks", "direct",
            "--defenses", "none", "--max-new-tokens", "2", "--benign-limit", "1", "--out", str(out)]  # fmt: skip
    runner = CliRunner()
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert sorted(r["goal"] for r in read_rows(out / "rows.jsonl")[0]) == sorted(goals)
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "corrupt" not in again.output, again.output
    report = runner.invoke(app, ["report", str(out)])
    assert report.exit_code == 0, report.output


def test_a_tail_torn_inside_a_character_or_without_its_newline_is_handled(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"goal": "😀" * 3, "i": i} for i in range(3)]
    whole = jsonl_text(rows).encode("utf-8")
    path.write_bytes(whole[:-5])  # cut inside the last emoji
    assert read_rows(path) == (rows[:2], True)
    path.write_bytes(whole[:-1])  # complete, but without the final newline
    store = RowStore(path, ("i",))
    store.append([{"goal": "x", "i": 9}])  # must not be glued onto the last row
    assert read_rows(path) == ([*rows, {"goal": "x", "i": 9}], False)
