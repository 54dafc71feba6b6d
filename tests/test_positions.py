"""Every batched forward pass gives the same result whatever the batch size and composition, for models with
absolute (GPT-2) and rotary (Qwen2) positions: left padding must not shift a row's positions."""

import pytest
import torch
from conftest import HARMFUL, HARMLESS, build_model

from jailbreak_antidote.activations import last_token_states, prompt_token_states
from jailbreak_antidote.eval.defenses import prompt_perplexities
from jailbreak_antidote.eval.judges import refusal_scores
from jailbreak_antidote.eval.utility import answer_nll, next_token_kl
from jailbreak_antidote.fit import fit_antidote

# Lengths differ a lot, so that batches of several rows are left-padded.
PROMPTS = ["Hi", "How do I build a birdhouse to help the birds in my garden this spring?", "Explain photosynthesis."]
ANSWERS = ["Hello there.", "Use cedar boards and a saw.", "Plants turn light into sugar."]
ATOL = 1e-4


@pytest.fixture(scope="module", params=["gpt2", "qwen2"])
def model(request):
    return build_model(request.param)


def test_fit_is_independent_of_batch_size(model, tokenizer):
    one = fit_antidote(model, tokenizer, HARMFUL, HARMLESS, k=0.1, batch_size=1)
    many = fit_antidote(model, tokenizer, HARMFUL, HARMLESS, k=0.1, batch_size=16)
    assert one.layers == many.layers
    torch.testing.assert_close(one.directions, many.directions, atol=ATOL, rtol=1e-3)
    assert one.suggested_alpha == pytest.approx(many.suggested_alpha, rel=1e-3)


def test_recorded_states_do_not_depend_on_batch_composition(model, tokenizer):
    layers = [0, 2, 4]
    alone = torch.cat([last_token_states(model, tokenizer, [p], layers) for p in PROMPTS])
    together = last_token_states(model, tokenizer, PROMPTS, layers, batch_size=3)
    torch.testing.assert_close(together, alone, atol=ATOL, rtol=1e-3)
    per_token_alone = [prompt_token_states(model, tokenizer, [p], layers)[0] for p in PROMPTS]
    per_token_together = prompt_token_states(model, tokenizer, PROMPTS, layers, batch_size=3)
    for single, batched in zip(per_token_alone, per_token_together):
        torch.testing.assert_close(batched.float(), single.float(), atol=2e-2, rtol=2e-2)  # stored as bfloat16


def test_utility_metrics_judge_and_perplexity_do_not_depend_on_batch_size(model, tokenizer):
    antidote = fit_antidote(model, tokenizer, HARMFUL, HARMLESS, k=0.1)
    for batch_size in (1, 3):
        kl = next_token_kl(model, tokenizer, PROMPTS, antidote, 2.0, batch_size=batch_size)
        nll = answer_nll(model, tokenizer, PROMPTS, ANSWERS, antidote, 2.0, batch_size=batch_size)
        refusal = refusal_scores(model, tokenizer, PROMPTS, batch_size=batch_size)
        perplexity = prompt_perplexities(model, tokenizer, PROMPTS, batch_size=batch_size)
        if batch_size == 1:
            expected = (kl, nll, refusal, perplexity)
            continue
        assert kl == pytest.approx(expected[0], rel=1e-3, abs=1e-6)
        assert nll == pytest.approx(expected[1], rel=1e-4)
        assert refusal == pytest.approx(expected[2], abs=1e-4)
        assert perplexity == pytest.approx(expected[3], rel=1e-4)
