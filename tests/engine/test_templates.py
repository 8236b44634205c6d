"""thoxd/engine/templates.py: chat templates, rendered only in the sandbox."""

from __future__ import annotations

from pathlib import Path

import pytest

from thoxd.engine.templates import ChatTemplate
from thoxd.errors import InvalidRequest

SYSTEM = {"role": "system", "content": "You are terse."}
USER = {"role": "user", "content": "Hi"}


def test_gemma_system_and_user_exact() -> None:
    prompt = ChatTemplate("gemma", bos_token="<bos>").render([SYSTEM, USER])
    assert prompt == (
        "<bos><start_of_turn>user\nYou are terse.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    )


def test_gemma_multi_turn_exact() -> None:
    messages = [USER, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Q"}]
    prompt = ChatTemplate("gemma", bos_token="<bos>").render(messages)
    assert prompt == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nQ<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_chatml_exact() -> None:
    prompt = ChatTemplate("chatml").render([SYSTEM, USER])
    assert prompt == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_gemma_structure() -> None:
    # What holds with or without the newline fix above.
    prompt = ChatTemplate("gemma", bos_token="<bos>").render([SYSTEM, USER])
    assert prompt.startswith("<bos><start_of_turn>user\nYou are terse.\n\nHi<end_of_turn>")
    assert prompt.rstrip("\n").endswith("<start_of_turn>model")
    assert prompt.count("<start_of_turn>") == 2
    assert "system" not in prompt


def test_gemma_assistant_role_becomes_model() -> None:
    messages = [USER, {"role": "assistant", "content": "Hello."}]
    prompt = ChatTemplate("gemma").render(messages, add_generation_prompt=False)
    assert "<start_of_turn>model\nHello.<end_of_turn>" in prompt
    assert "assistant" not in prompt
    assert prompt.count("<start_of_turn>model") == 1


def test_gemma_without_system_and_without_generation_prompt() -> None:
    prompt = ChatTemplate("gemma").render([USER], add_generation_prompt=False)
    assert prompt.startswith("<start_of_turn>user\nHi<end_of_turn>")
    assert "model" not in prompt


def test_chatml_structure() -> None:
    prompt = ChatTemplate("chatml").render([SYSTEM, USER])
    assert "<|im_start|>system\nYou are terse.<|im_end|>" in prompt
    assert "<|im_start|>user\nHi<|im_end|>" in prompt
    assert prompt.rstrip("\n").endswith("<|im_start|>assistant")


def test_custom_template_gets_tokens_and_messages() -> None:
    source = "{{ bos_token }}{% for m in messages %}[{{ m.role }}:{{ m.content }}]{% endfor %}"
    source += "{% if add_generation_prompt %}{{ eos_token }}{% endif %}"
    template = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    assert template.render([USER]) == "<s>[user:Hi]</s>"
    assert template.render([USER], add_generation_prompt=False) == "<s>[user:Hi]"


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.append(1) }}",
        "{{ messages.pop() }}",
        "{% set d = {} %}{{ d.update(a=1) }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ lipsum.__globals__['os'] }}",
    ],
)
def test_hostile_template_is_refused(source: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        ChatTemplate(source).render([USER])
    assert info.value.status == 400
    assert info.value.param == "messages"
    assert "<class" not in info.value.message


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages.__class__ }}",
        "{{ raise_exception.__globals__ }}",
        "{{ messages[0].__class__ }}",
    ],
)
def test_reading_an_unsafe_attribute_shows_nothing(source: str) -> None:
    # The sandbox turns the read into an undefined value: it prints as nothing, and any further
    # use of it (an attribute, a call) raises, as the tests above show.
    assert ChatTemplate(source + "|").render([USER]) == "|"


def test_hostile_template_never_executes_anything(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    attempts = [
        f"{{{{ cycler.__init__.__globals__.os.system('touch {marker}') }}}}",
        f"{{{{ lipsum.__globals__['os'].popen('touch {marker}').read() }}}}",
        "{{ ''.__class__.__mro__[1].__subclasses__()[0]"
        f".__init__.__globals__['sys'].modules['os'].system('touch {marker}') }}}}",
    ]
    for source in attempts:
        with pytest.raises(InvalidRequest):
            ChatTemplate(source).render([USER])
    assert not marker.exists()


def test_template_cannot_mutate_the_callers_messages() -> None:
    messages = [dict(USER)]
    with pytest.raises(InvalidRequest):
        ChatTemplate("{{ messages[0].update(content='changed') }}").render(messages)
    assert messages == [USER]


def test_raise_exception_gives_invalid_request_with_the_message() -> None:
    source = "{% if messages[0].role != 'system' %}{{ raise_exception('first must be system') }}"
    source += "{% endif %}ok"
    template = ChatTemplate(source)
    with pytest.raises(InvalidRequest) as info:
        template.render([USER])
    assert info.value.param == "messages"
    assert "first must be system" in info.value.message
    assert template.render([SYSTEM, USER]) == "ok"


def test_runtime_error_in_template_is_invalid_request() -> None:
    with pytest.raises(InvalidRequest) as info:
        ChatTemplate("{{ 1 / 0 }}").render([USER])
    assert info.value.param == "messages"
    assert "ZeroDivision" not in info.value.message
