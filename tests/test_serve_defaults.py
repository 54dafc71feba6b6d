"""`antidote serve` never steers by default at a strength nobody checked against ordinary answers."""

import dataclasses

import pytest

from jailbreak_antidote.cli_serve import strength_defaults, strength_summary
from jailbreak_antidote.errors import InvalidParameter


def test_untuned_antidote_serves_unsteered_by_default_and_says_so(qwen2_antidote):
    assert not qwen2_antidote.tuned
    default, low, high = strength_defaults(qwen2_antidote, None, 0.0, None)
    assert default == 0.0 and low == 0.0
    assert high >= qwen2_antidote.suggested_alpha  # requests may still ask for the suggestion, or more
    line = strength_summary(qwen2_antidote, default, low, high, "fixed", 0.5, explicit=False)
    assert "alpha 0 (unsteered)" in line and "antidote tune" in line and "--alpha" in line


def test_tuned_alpha_and_explicit_alpha_are_used_and_printed(qwen2_antidote):
    tuned = dataclasses.replace(
        qwen2_antidote, alpha={**qwen2_antidote.alpha, "tuned": {"mode": "fixed", "alpha": 0.7, "threshold": None}}
    )
    default, low, high = strength_defaults(tuned, None, 0.0, None)
    assert default == 0.7
    assert "alpha 0.7" in strength_summary(tuned, default, low, high, "fixed", 0.5, explicit=False)
    default, low, high = strength_defaults(qwen2_antidote, 0.3, 0.0, None)
    assert default == 0.3
    assert "alpha 0.3 (--alpha)" in strength_summary(qwen2_antidote, default, low, high, "fixed", 0.5, explicit=True)
    with pytest.raises(InvalidParameter, match="outside"):
        strength_defaults(qwen2_antidote, 0.3, 0.5, None)
