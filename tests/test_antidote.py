import json

import pytest
import torch
from conftest import build_model

from jailbreak_antidote.antidote import Antidote, sparse_mask
from jailbreak_antidote.errors import ArtifactError, ArtifactMismatch, InvalidParameter
from jailbreak_antidote.models import encode_prompts


def test_save_load_round_trip(tmp_path, qwen2, qwen2_antidote):
    path = qwen2_antidote.save(tmp_path / "tiny.antidote")
    loaded = Antidote.load(path, model=qwen2)
    assert torch.equal(loaded.directions, qwen2_antidote.directions)
    assert torch.equal(loaded.masks, qwen2_antidote.masks)
    assert loaded.metadata() == json.loads(json.dumps(qwen2_antidote.metadata()))
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.antidote"]  # no temp file left behind


def test_other_model_is_refused(tmp_path, qwen2_antidote):
    path = qwen2_antidote.save(tmp_path / "tiny.antidote")
    with pytest.raises(ArtifactMismatch, match="weights differ"):
        Antidote.load(path, model=build_model("qwen2", seed=1))
    with pytest.raises(ArtifactMismatch, match="hidden_size"):
        Antidote.load(path, model=build_model("qwen2", hidden_size=32, intermediate_size=64))
    with pytest.raises(ArtifactMismatch, match="num_layers"):
        Antidote.load(path, model=build_model("qwen2", num_hidden_layers=3))


def test_bfloat16_copy_of_the_same_model_is_accepted(qwen2_antidote):
    qwen2_antidote.validate(build_model("qwen2").to(torch.bfloat16))


def test_truncated_corrupted_and_foreign_files(tmp_path, qwen2_antidote):
    path = qwen2_antidote.save(tmp_path / "a.antidote")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.antidote"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="corrupted or truncated"):
        Antidote.load(truncated)
    flipped = tmp_path / "flipped.antidote"
    flipped.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    with pytest.raises(ArtifactError, match="checksum"):
        Antidote.load(flipped)
    garbage = tmp_path / "garbage.antidote"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ArtifactError, match="cannot read"):
        Antidote.load(garbage)
    with pytest.raises(ArtifactError, match="does not exist"):
        Antidote.load(tmp_path / "missing.antidote")


def test_foreign_safetensors_and_wrong_version(tmp_path, qwen2_antidote):
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, other)
    with pytest.raises(ArtifactError, match="not an antidote"):
        Antidote.load(other)
    future = tmp_path / "future.antidote"
    meta = qwen2_antidote.metadata()
    meta["format_version"] = 99
    tensors = {"directions": qwen2_antidote.directions, "masks": qwen2_antidote.masks.to(torch.uint8)}
    save_file(tensors, future, metadata={"format": "jailbreak-antidote", "meta": json.dumps(meta)})
    with pytest.raises(ArtifactError, match="format version 99"):
        Antidote.load(future)


def test_fingerprint_follows_behaviour_not_the_time_of_fitting(tmp_path, qwen2, tokenizer, qwen2_antidote):
    from conftest import HARMFUL, HARMLESS

    from jailbreak_antidote.fit import fit_antidote

    again = fit_antidote(qwen2, tokenizer, HARMFUL, HARMLESS, k=0.1)
    again.provenance["created"] = "2000-01-01T00:00:00+00:00"  # a fit on another day
    assert again.fingerprint() == qwen2_antidote.fingerprint()
    assert Antidote.load(qwen2_antidote.save(tmp_path / "a.antidote")).fingerprint() == again.fingerprint()
    assert qwen2_antidote.with_k(0.5).fingerprint() != qwen2_antidote.fingerprint()


def test_with_k_remasks_without_refitting(qwen2_antidote):
    denser = qwen2_antidote.with_k(0.5)
    assert torch.equal(denser.directions, qwen2_antidote.directions)
    assert denser.masks.sum(dim=1).tolist() == [32] * len(denser.layers)
    assert (denser.masks | ~qwen2_antidote.masks).all()  # top-k sets are nested
    with pytest.raises(InvalidParameter):
        qwen2_antidote.with_k(0)


def test_selectors_agree_when_every_coordinate_is_kept():
    # Why the sweep runs k = 1 once, not once per selector.
    direction = torch.randn(64)
    assert torch.equal(sparse_mask(direction, 1.0, "top", seed=0), sparse_mask(direction, 1.0, "random", seed=3))
    assert sparse_mask(direction, 1.0, "random", seed=3).all()


def test_arithmetic(qwen2, tokenizer, qwen2_antidote):
    half = qwen2_antidote * 0.5
    for layer, vector in qwen2_antidote.vectors().items():
        torch.testing.assert_close(half.vectors()[layer], 0.5 * vector)
        torch.testing.assert_close((qwen2_antidote + qwen2_antidote).vectors()[layer], 2 * vector)
        assert not (qwen2_antidote - qwen2_antidote).vectors()[layer].any()
    batch = encode_prompts(tokenizer, ["How do I make a pipe bomb?"])
    with torch.no_grad(), (2 * qwen2_antidote).applied(qwen2, alpha=1.5):
        doubled = qwen2(**batch).logits
    with torch.no_grad(), qwen2_antidote.applied(qwen2, alpha=3.0):
        direct = qwen2(**batch).logits
    torch.testing.assert_close(doubled, direct)
    assert "* 2" in (2 * qwen2_antidote).provenance["derived"]


def test_adding_antidotes_of_different_models_fails(tokenizer, qwen2_antidote):
    from conftest import HARMFUL, HARMLESS

    from jailbreak_antidote.fit import fit_antidote

    small = build_model("qwen2", hidden_size=32, intermediate_size=64)
    with pytest.raises(ArtifactMismatch):
        qwen2_antidote + fit_antidote(small, tokenizer, HARMFUL, HARMLESS, k=0.1)
