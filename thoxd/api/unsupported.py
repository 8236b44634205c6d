"""Fields the OpenAI API defines that thoxd does not honour: refused by name, never ignored.

A client that sets one expects something of the answer (audio, stored completions, a reasoning
budget) and would otherwise take a plain answer for it. Each field passes with a value that asks
for nothing (`store: false`, `modalities: ["text"]`, `service_tier: "auto"`); any other value is a
400 `unsupported_parameter` naming it. Fields that ask nothing of the answer (`metadata` without
`store`, `user`, `safety_identifier`, `prompt_cache_key`: the prefix cache is automatic) and fields
the API does not define stay accepted and ignored, as OpenAI's own server does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from thoxd.errors import UnsupportedParameter

# field -> (values that ask for nothing, what the field asks for that thoxd does not do)
Table = Mapping[str, tuple[tuple[Any, ...], str]]

CHAT: Table = {
    "audio": ((None,), "audio output (no model here speaks)"),
    "modalities": ((None, ["text"]), "output other than text"),
    "functions": ((None,), "the deprecated 'functions'; send 'tools'"),
    "function_call": ((None,), "the deprecated 'function_call'; send 'tool_choice'"),
    "prediction": ((None,), "predicted outputs"),
    "reasoning_effort": ((None, "none"), "a reasoning budget (no model here reasons apart)"),
    "verbosity": ((None, "medium"), "a verbosity setting"),
    "service_tier": ((None, "auto", "default"), "service tiers (every request runs alike)"),
    "store": ((None, False), "stored completions"),
    "web_search_options": ((None,), "web search (the device answers from its models only)"),
}

COMPLETIONS: Table = {
    "best_of": ((None, 1), "'best_of' (send 'n' for several choices)"),
}


def refuse(data: object, table: Table) -> None:
    """Raise UnsupportedParameter for the first field of a decoded body that `table` names and
    that asks for something; anything else (a body that is no object, too) is left to the
    schema."""
    if not isinstance(data, dict):
        return
    for name, (neutral, what) in table.items():
        if name in data and not any(_same(data[name], value) for value in neutral):
            raise UnsupportedParameter(f"This device does not support {what}.", param=name)


def _same(given: object, neutral: object) -> bool:
    # Not `==`: `store: 0` is no `false`, and `True == 1`.
    return type(given) is type(neutral) and given == neutral


# The seed dialects' names for /v1 fields (the /generate server's): renamed where the meaning is
# the same, refused with the /v1 field to send otherwise; never silently dropped.
RENAMED = {"repetition_penalty": "repeat_penalty"}
FOREIGN: Table = {
    "max_length": ((None,), "send 'max_tokens'"),
    "model_id": ((None,), "send 'model'"),
    "do_sample": ((None, True), "send 'temperature': 0 for greedy decoding"),
}


def foreign_fields(data: object) -> object:
    """A decoded body with the seed dialects' fields renamed to /v1's, or UnsupportedParameter
    naming one /v1 does not take."""
    if not isinstance(data, dict):
        return data
    for name, (neutral, what) in FOREIGN.items():
        if name in data and not any(_same(data[name], value) for value in neutral):
            raise UnsupportedParameter(
                f"'{name}' is the /generate server's field, not this API's: {what}.", param=name
            )
    for name, ours in RENAMED.items():
        if data.get(name) is not None:
            if data.get(ours) is not None and data[ours] != data[name]:
                raise UnsupportedParameter(
                    f"'{name}' and '{ours}' are the same setting: send one.", param=name
                )
            data = {**{k: v for k, v in data.items() if k != name}, ours: data[name]}
    return data
