import pytest
from conftest import NO_SYSTEM_TEMPLATE, build_tokenizer

from jailbreak_antidote.errors import InvalidParameter
from jailbreak_antidote.models import encode_prompts, render_prompt


def test_chat_template_with_system(tokenizer):
    text = render_prompt(tokenizer, "Hello", system="Be safe.")
    assert text == "<|im_start|>system\nBe safe.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"


def test_template_without_system_role_folds_it_into_the_user_turn():
    tokenizer = build_tokenizer(NO_SYSTEM_TEMPLATE)
    assert render_prompt(tokenizer, "Hello", system="Be safe.") == "<turn>user\nBe safe.\n\nHello<end>\n<turn>model\n"
    assert render_prompt(tokenizer, "Hello") == "<turn>user\nHello<end>\n<turn>model\n"


def test_plain_format_without_template():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    assert render_prompt(tokenizer, "Hello") == "User: Hello\nAssistant:"


def test_batches_are_left_padded(tokenizer):
    batch = encode_prompts(tokenizer, ["a", "a much longer prompt than the first one"])
    mask = batch["attention_mask"]
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and mask[1].all()


def test_a_system_message_alone_is_a_clear_error_without_a_system_role():
    tokenizer = build_tokenizer(NO_SYSTEM_TEMPLATE)
    with pytest.raises(InvalidParameter, match=r"no system role.*start the conversation with a user message"):
        render_prompt(tokenizer, [{"role": "system", "content": "Be safe."}])
    plain = build_tokenizer()
    plain.chat_template = None
    assert render_prompt(plain, [{"role": "system", "content": "Be safe."}]) == "System: Be safe.\nAssistant:"
