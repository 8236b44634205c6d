"""thoxd/api/roxy.py: the OpenAI routes under /api and /api/v1, through the OpenAI SDK; model
ids with a '/' (vendor/model aliases in models.toml)."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import Daemon


@pytest.mark.parametrize("prefix", ["/api", "/api/v1"])
def test_chat_streams_with_usage_under_the_prefix(daemon: Daemon, prefix: str) -> None:
    client = openai.OpenAI(base_url=daemon.url + prefix, api_key="none")
    chunks = list(
        client.chat.completions.create(
            model="thox-coder",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 4
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    assert {m.id for m in client.models.list()} >= {"smollm2-135m-instruct", "gemma-3-270m"}


def test_a_vendor_slash_model_alias(daemon: Daemon) -> None:
    client = openai.OpenAI(base_url=daemon.url + "/api/v1", api_key="none")
    answer = client.chat.completions.create(
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=2,
    )
    assert answer.model == "HuggingFaceTB/SmolLM2-135M-Instruct"  # as the client asked
    one = httpx.get(daemon.url + "/v1/models/google/gemma-3-270m").json()
    assert one["id"] == "gemma-3-270m"
