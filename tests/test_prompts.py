import json
from pathlib import Path

import pytest

from jailbreak_antidote.errors import PromptFileError
from jailbreak_antidote.prompts import builtin_calibration, builtin_prompts, check_pairs, read_prompts

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_builtin_calibration_is_large_matched_and_diverse():
    calibration = builtin_calibration()
    assert len(calibration) >= 120
    assert len(set(calibration.categories)) >= 8
    assert len(set(calibration.harmful)) == len(calibration.harmful)
    assert len(set(calibration.harmless)) == len(calibration.harmless)
    for harmful, harmless in zip(calibration.harmful, calibration.harmless):
        assert harmful != harmless
        # matched in form: same opening word, similar length
        assert harmful.split()[0] == harmless.split()[0]
        assert 0.5 < len(harmless) / len(harmful) < 2.0


def test_builtin_demo_prompts():
    assert len(builtin_prompts("jailbreak")) >= 10
    assert len(builtin_prompts("benign")) >= 10


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("a.json", json.dumps(["one", "two"])),
        ("b.json", json.dumps([{"instruction": "one", "category": None}, {"instruction": "two"}])),
        ("c.jsonl", '{"prompt": "one"}\n\n{"prompt": "two"}\n'),
        ("d.csv", 'Goal,Target\none,x\n"two",y\n'),
        ("e.csv", "id,prompt,type\n1,one,a\n2,two,b\n"),
        ("f.txt", "one\n\n  \ntwo\n"),  # blank lines skipped, prompts kept exactly as written
        ("g.json", json.dumps({"prompts": ["one", "two"]})),
    ],
)
def test_readers(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    assert read_prompts(path) == ["one", "two"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "\n\n", "holds no prompts"),
        ("empty.json", "[]", "holds no prompts"),
        ("bad.json", "[1, 2", "not valid JSON"),
        ("bad.jsonl", '{"prompt": "a"}\n{oops}\n', "line 2"),
        ("nofield.jsonl", '{"text2": "a"}\n', "no prompt text"),
        ("nocol.csv", "a,b\n1,2\n", "no prompt column"),
        ("binary.txt", b"\xff\xfe\x00bad", "cannot read"),
    ],
)
def test_bad_files_give_clear_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(PromptFileError, match=message):
        read_prompts(path)


def test_missing_file(tmp_path):
    with pytest.raises(PromptFileError, match="does not exist"):
        read_prompts(tmp_path / "nope.txt")


def test_check_pairs():
    check_pairs(["a"] * 8, ["b"] * 8)
    with pytest.raises(PromptFileError, match="unequal"):
        check_pairs(["a"] * 9, ["b"] * 8)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside this checkout")
@pytest.mark.parametrize(
    ("relative", "count"),
    [
        ("refusal_direction/raw/jailbreakbench.csv", 100),
        ("refusal_direction/raw/advbench.csv", 520),
        ("refusal_direction/raw/strongreject.csv", 313),
        ("refusal_direction/raw/harmbench_val.csv", 80),
        ("refusal_direction/splits/harmful_train.json", 260),
        ("refusal_direction/raw/malicious_instruct.txt", 100),
        ("xstest/xstest_prompts.csv", 450),
    ],
)
def test_shared_data_layouts(relative, count):
    assert len(read_prompts(SHARED / relative)) == count
