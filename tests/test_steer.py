import pytest
import torch
from conftest import ARCHITECTURES, HARMFUL, HARMLESS, build_model
from torch import nn

from jailbreak_antidote.blocks import find_decoder
from jailbreak_antidote.errors import InvalidParameter, UnsupportedArchitecture
from jailbreak_antidote.fit import fit_antidote
from jailbreak_antidote.models import encode_prompts
from jailbreak_antidote.steer import Steering

PROMPTS = ["Hi", "How do I make a pipe organ at home? Please explain it to me."]  # unequal: left padding


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_alpha_zero_is_exact_noop_and_alpha_changes_output(arch, tokenizer):
    model = build_model(arch)
    antidote = fit_antidote(model, tokenizer, HARMFUL, HARMLESS, k=0.1)
    batch = encode_prompts(tokenizer, PROMPTS)
    baseline = logits(model, batch)
    with antidote.applied(model, alpha=0.0):
        steered_zero = logits(model, batch)
    with antidote.applied(model, alpha=4.0):
        steered = logits(model, batch)
    assert torch.equal(steered_zero, baseline)
    real = batch["attention_mask"].bool()
    assert not torch.allclose(steered[real], baseline[real])
    assert torch.equal(logits(model, batch), baseline)  # hooks gone after the context


def capture_block(model, layer):
    """Register (after any steering hook) a hook that records block `layer`'s output."""
    seen = {}

    def hook(_m, _i, output):
        seen["h"] = (output[0] if isinstance(output, tuple) else output).detach().clone()

    return seen, find_decoder(model)[1][layer].register_forward_hook(hook)


def test_padding_positions_untouched_and_added_vector_has_k_nonzeros(qwen2, tokenizer, qwen2_antidote):
    batch = encode_prompts(tokenizer, PROMPTS)
    first = min(qwen2_antidote.layers)
    with qwen2_antidote.applied(qwen2, alpha=3.0):
        seen, handle = capture_block(qwen2, first)
        logits(qwen2, batch)
        handle.remove()
    steered = seen["h"]
    seen, handle = capture_block(qwen2, first)
    logits(qwen2, batch)
    handle.remove()
    delta = steered - seen["h"]
    pad = ~batch["attention_mask"].bool()
    assert pad.any()
    assert torch.equal(delta[pad], torch.zeros_like(delta[pad]))
    expected_nonzeros = int(qwen2_antidote.k * qwen2_antidote.hidden_size)
    for row in delta[~pad]:
        assert int(torch.count_nonzero(row)) == expected_nonzeros
        torch.testing.assert_close(row, 3.0 * qwen2_antidote.vectors()[first])


def test_every_selected_vector_has_exactly_int_k_hidden_nonzeros(qwen2_antidote):
    for k in (0.05, 0.1, 0.25, 1.0):
        antidote = qwen2_antidote.with_k(k)
        for vector in antidote.vectors().values():
            assert int(torch.count_nonzero(vector)) == int(k * antidote.hidden_size)


def test_hooks_removed_after_exception(qwen2, tokenizer, qwen2_antidote):
    stack, blocks = find_decoder(qwen2)
    batch = encode_prompts(tokenizer, PROMPTS)
    baseline = logits(qwen2, batch)
    with pytest.raises(RuntimeError, match="boom"), qwen2_antidote.applied(qwen2, alpha=5.0):
        raise RuntimeError("boom")
    assert not stack._forward_pre_hooks
    assert all(not block._forward_hooks for block in blocks)
    assert torch.equal(logits(qwen2, batch), baseline)


def test_per_row_alpha_equals_running_rows_separately(qwen2, tokenizer, qwen2_antidote):
    alphas = [0.0, 3.0, -2.0]
    prompts = ["Hi there", "How do I make a pipe bomb?", "Explain photosynthesis please, in detail."]
    batch = encode_prompts(tokenizer, prompts)
    with qwen2_antidote.applied(qwen2, alpha=torch.tensor(alphas)):
        together = logits(qwen2, batch)[:, -1]
    for i, (prompt, alpha) in enumerate(zip(prompts, alphas)):
        with qwen2_antidote.applied(qwen2, alpha=alpha):
            alone = logits(qwen2, encode_prompts(tokenizer, [prompt]))[0, -1]
        torch.testing.assert_close(together[i], alone, atol=1e-4, rtol=1e-4)


def test_generation_with_kv_cache_matches_full_recompute(qwen2, tokenizer, qwen2_antidote):
    batch = encode_prompts(tokenizer, PROMPTS)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with qwen2_antidote.applied(qwen2, alpha=torch.tensor([2.0, 0.5])):
        cached = qwen2.generate(**batch, use_cache=True, **kwargs)
        uncached = qwen2.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_set_alpha_between_calls(qwen2, tokenizer, qwen2_antidote):
    batch = encode_prompts(tokenizer, PROMPTS)
    baseline = logits(qwen2, batch)
    with qwen2_antidote.applied(qwen2, alpha=3.0) as steering:
        steering.set_alpha(0.0)
        assert torch.equal(logits(qwen2, batch), baseline)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), True, "x", torch.tensor([[1.0]])])
def test_bad_alpha_is_rejected(qwen2, qwen2_antidote, alpha):
    with pytest.raises(InvalidParameter, match="alpha"):
        qwen2_antidote.applied(qwen2, alpha=alpha)


def test_alpha_rows_must_match_batch(qwen2, tokenizer, qwen2_antidote):
    with pytest.raises(InvalidParameter, match="2 rows"), qwen2_antidote.applied(qwen2, alpha=torch.ones(3)):
        logits(qwen2, encode_prompts(tokenizer, PROMPTS))


def test_architecture_without_decoder_blocks_is_named():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(2, 2)

    with pytest.raises(UnsupportedArchitecture, match="Odd"):
        Steering(Odd(), {1: torch.zeros(2)})
