"""The one chat-template renderer, with transformers' jinja settings and the model's special tokens:
serving renders requests with it and the model build records the golden prompts with it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from services.common.errors import InvalidInput
from services.common.generation import ChatMessage, Role
from services.inference.chat_template import ChatTemplate
from services.inference.modelbuild.manifest import Manifest, TokenIds
from tests.unit.inference.test_modelbuild_manifest import fake_model_dir

# Llama 3's shape: the template itself writes the BOS token.
LLAMA3 = ("{{- bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Mistral's shape: roles must alternate, the template says so through raise_exception.
ALTERNATING = ("{{ bos_token }}{% for message in messages %}"
               "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
               "{% endif %}{{ '[' + message['role'] + '] ' + message['content'] + eos_token }}{% endfor %}")
FIRST_SYSTEM = ("{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}"
                "{% break %}{% endif %}{% endfor %}|{{ messages | tojson }}")
HI = (ChatMessage(Role.USER, "Hi"),)


@pytest.fixture
def tokenizer() -> Tokenizer:
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, "[UNK]": 3}
    return Tokenizer(WordLevel(vocab, unk_token="[UNK]"))


def model(tmp_path: Path, template: str | None) -> Manifest:
    return replace(fake_model_dir(tmp_path), chat_template=template, tokens=TokenIds(bos=0, eos=[1], pad=2))


def test_the_template_gets_the_models_special_tokens(tmp_path: Path, tokenizer: Tokenizer) -> None:
    template = ChatTemplate.for_model(model(tmp_path, LLAMA3), tokenizer)
    assert template.render(HI) == ("<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                                   "<|start_header_id|>assistant<|end_header_id|>\n\n")
    alternating = ChatTemplate.for_model(model(tmp_path, ALTERNATING), tokenizer)
    assert alternating.render(HI, add_generation_prompt=False) == "<s>[user] Hi</s>"


def test_a_template_that_rejects_the_conversation_is_invalid_input_naming_messages(
        tmp_path: Path, tokenizer: Tokenizer) -> None:
    template = ChatTemplate.for_model(model(tmp_path, ALTERNATING), tokenizer)
    with pytest.raises(InvalidInput, match="roles must alternate") as err:
        template.render((ChatMessage(Role.USER, "a"), ChatMessage(Role.USER, "b")))
    assert err.value.field == "messages"


def test_loop_controls_and_tojson_behave_as_in_transformers() -> None:
    rendered = ChatTemplate(FIRST_SYSTEM).render(
        (ChatMessage(Role.SYSTEM, "one"), ChatMessage(Role.SYSTEM, "two"), ChatMessage(Role.USER, "café")))
    assert rendered == ('one|[{"role": "system", "content": "one"}, {"role": "system", "content": "two"}, '
                        '{"role": "user", "content": "café"}]')


def test_a_model_without_a_template_gets_chatml(tmp_path: Path, tokenizer: Tokenizer) -> None:
    template = ChatTemplate.for_model(model(tmp_path, None), tokenizer)
    assert template.render(HI) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
