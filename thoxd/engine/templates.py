"""Chat templates: messages -> prompt text, rendered only in a sandboxed Jinja environment.

Templates come from the catalog or from a GGUF file's metadata, so they are untrusted: the
immutable sandbox refuses attribute access to Python internals and mutation of the inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from thoxd.errors import InvalidRequest

# Gemma's turn format. The Gemma 3 base model has no template in its metadata; this is the one
# the instruction-tuned Gemma 3 ships, made lenient about role order.
GEMMA = (
    "{{ bos_token }}"
    "{%- if messages and messages[0].role == 'system' -%}"
    "{%- set prefix = messages[0].content ~ '\\n\\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}"
    "{{ '<start_of_turn>' ~ ('model' if m.role == 'assistant' else m.role) ~ '\\n' }}"
    "{{ (prefix if loop.first else '') ~ (m.content | trim) ~ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

# ChatML, for the many models that use it.
CHATML = (
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' ~ m.role ~ '\\n' ~ m.content ~ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

BUILT_IN = {"gemma": GEMMA, "chatml": CHATML}


class TemplateInvalid(Exception):
    """A chat template that does not even compile (a catalog or model file problem)."""


def _raise(message: str) -> None:
    raise TemplateError(message)


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self.source = BUILT_IN.get(source, source)
        try:
            self._template = env.from_string(self.source)
        except TemplateError as exc:
            raise TemplateInvalid(f"the chat template does not compile: {exc}") from None
        self._tokens = {"bos_token": bos_token, "eos_token": eos_token}

    def render(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt for `messages`; `tools` (OpenAI's tool objects) only for a template that
        renders them itself (thoxd.api.tools decides)."""
        extra: dict[str, Any] = {"tools": list(tools)} if tools is not None else {}
        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                **self._tokens,
                **extra,
            )
        except TemplateError as exc:
            # SecurityError is a TemplateError too: a template reaching for internals ends here.
            raise InvalidRequest(
                f"The model's chat template could not render these messages: {exc.message}",
                param="messages",
            ) from None
        except Exception:
            raise InvalidRequest(
                "The model's chat template failed on these messages.", param="messages"
            ) from None
