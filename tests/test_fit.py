import pytest
import torch
from conftest import HARMFUL, HARMLESS

from jailbreak_antidote.activations import last_token_states
from jailbreak_antidote.errors import InvalidParameter, PromptFileError
from jailbreak_antidote.fit import directions_from_differences, fit_antidote


def test_fit_selects_layers_masks_and_orients_harmful_higher(qwen2, tokenizer, qwen2_antidote):
    antidote = qwen2_antidote
    num_blocks = 5
    assert 0 not in antidote.layers  # block 0 is never steered
    assert len(antidote.layers) == round(0.9 * (num_blocks - 1))
    assert antidote.layers == sorted(antidote.layers)
    torch.testing.assert_close(antidote.directions.norm(dim=1), torch.ones(len(antidote.layers)))
    assert antidote.masks.sum(dim=1).tolist() == [int(0.1 * 64)] * len(antidote.layers)
    states_pos = last_token_states(qwen2, tokenizer, HARMFUL, antidote.layers)
    states_neg = last_token_states(qwen2, tokenizer, HARMLESS, antidote.layers)
    gap = ((states_pos - states_neg) * antidote.directions[None]).sum(-1).mean(0)
    assert (gap > 0).all()  # +alpha pushes towards the harmful (refusing) side
    alpha = antidote.alpha
    assert alpha["suggested"] > 0 and alpha["range"][0] < alpha["suggested"] < alpha["range"][1]
    assert set(antidote.stats["layer_accuracy"]) == {str(i) for i in range(1, num_blocks)}


def test_uncentred_pca_keeps_the_signal_that_centring_would_remove():
    torch.manual_seed(0)
    signal = torch.zeros(16)
    signal[3] = 1.0
    diffs = (signal * 5 + 0.1 * torch.randn(40, 1, 16)).float()  # [pairs, layers, hidden]
    for method in ("pca", "mean_diff"):
        direction = directions_from_differences(diffs, method)[0]
        assert direction[3] > 0.99


def test_mean_diff_and_random_selector(qwen2, tokenizer, qwen2_antidote):
    antidote = fit_antidote(qwen2, tokenizer, HARMFUL, HARMLESS, k=0.1, method="mean_diff", selector="random")
    assert antidote.method == "mean_diff" and antidote.selector == "random"
    assert antidote.masks.sum(dim=1).tolist() == [6] * len(antidote.layers)
    top = qwen2_antidote.with_k(0.1, "top")
    assert not torch.equal(top.masks, antidote.with_k(0.1, "random").masks)


def test_layer_top_p_one_keeps_every_layer_but_block_zero(qwen2, tokenizer):
    antidote = fit_antidote(qwen2, tokenizer, HARMFUL, HARMLESS, layer_top_p=1.0, k=0.1)
    assert antidote.layers == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0.0}, "k must be in"),
        ({"k": 1.5}, "k must be in"),
        ({"k": 0.001}, "keeps no coordinate"),
        ({"layer_top_p": 0.0}, "layer_top_p"),
        ({"layer_top_p": 1.2}, "layer_top_p"),
        ({"method": "ica"}, "method"),
        ({"selector": "best"}, "selector"),
    ],
)
def test_bad_parameters_are_named(qwen2, tokenizer, kwargs, message):
    with pytest.raises(InvalidParameter, match=message):
        fit_antidote(qwen2, tokenizer, HARMFUL, HARMLESS, **kwargs)


def test_unequal_or_too_few_pairs(qwen2, tokenizer):
    with pytest.raises(PromptFileError, match="unequal"):
        fit_antidote(qwen2, tokenizer, HARMFUL, HARMLESS[:-1])
    with pytest.raises(PromptFileError, match="too few pairs"):
        fit_antidote(qwen2, tokenizer, HARMFUL[:3], HARMLESS[:3])
