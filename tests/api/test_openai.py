"""thoxd/api/openai.py through the OpenAI SDK on the real daemon: n > 1 choices, logit_bias,
cached-token usage, embeddings' `dimensions`, refused fields and request ids."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Daemon
from thoxd.engine.llama import LlamaModel

USER = [{"role": "user", "content": "Name one fruit."}]
GREEDY = {"temperature": 0, "extra_body": {"repeat_penalty": 1.0}}


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key="not-required", max_retries=0)


@pytest.fixture(scope="module")
def vocab(model_file: Path) -> Iterator[LlamaModel]:
    """The default model's tokenizer, for token ids to bias."""
    model = LlamaModel(model_file)
    yield model
    model.close()


def refusal(call: Any) -> dict[str, Any]:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    assert isinstance(info.value.body, dict)
    return info.value.body


# -- n > 1 -----------------------------------------------------------------------------------


def test_n_choices_with_their_own_seeds(client: openai.OpenAI) -> None:
    story = [{"role": "user", "content": "Begin a story."}]
    sampled = {"temperature": 1.0, "seed": 11, "max_tokens": 8, "extra_body": {"top_k": 0}}
    answer = client.chat.completions.create(model="thox-coder", messages=story, n=2, **sampled)
    assert [c.index for c in answer.choices] == [0, 1]
    texts = [c.message.content for c in answer.choices]
    assert texts[0] != texts[1]  # seeds 11 and 12, drawing from the whole vocabulary
    one = client.chat.completions.create(model="thox-coder", messages=story, n=1, **sampled)
    assert answer.usage is not None and one.usage is not None
    # The prompt counts once, as OpenAI counts it; each choice's tokens count.
    assert answer.usage.prompt_tokens == one.usage.prompt_tokens
    assert answer.usage.completion_tokens > one.usage.completion_tokens


def test_n_choices_stream_with_their_index(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model="thox-coder",
        prompt="1, 2, 3, 4,",
        n=2,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    texts = {0: "", 1: ""}
    ends: list[int] = []
    usage = None
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason is not None:
                ends.append(choice.index)
        usage = chunk.usage or usage
    assert sorted(ends) == [0, 1]
    assert texts[0].startswith(" 5, 6") and texts[1].startswith(" 5, 6")
    assert usage is not None and usage.completion_tokens == 12


def test_n_beyond_the_slots_names_the_limit(client: openai.OpenAI) -> None:
    body = refusal(lambda: client.chat.completions.create(model="thox-coder", messages=USER, n=3))
    assert body["param"] == "n" and "at most 2" in body["message"]  # the test daemon: 2 slots


# -- logit_bias ------------------------------------------------------------------------------


def first_token(client: openai.OpenAI, **extra: Any) -> str:
    answer = client.completions.create(
        model="thox-coder", prompt="The capital of France is", max_tokens=1, **GREEDY, **extra
    )
    return answer.choices[0].text


def test_logit_bias_bans_and_forces_tokens(client: openai.OpenAI, vocab: LlamaModel) -> None:
    greedy = first_token(client)
    [banned] = vocab.tokenize(greedy, add_special=False)
    assert first_token(client, logit_bias={str(banned): -100}) != greedy
    [forced] = vocab.tokenize(" banana", add_special=False)
    assert first_token(client, logit_bias={str(forced): 100}) == " banana"


def test_logit_bias_outside_the_vocabulary_is_a_400(
    client: openai.OpenAI, vocab: LlamaModel
) -> None:
    body = refusal(lambda: first_token(client, logit_bias={str(vocab.n_vocab): 5}))
    assert body["param"] == "logit_bias"


# -- usage -----------------------------------------------------------------------------------


def test_cached_tokens_report_the_prefix_cache_hit(client: openai.OpenAI) -> None:
    # A prompt no earlier request had: nothing cached; the same again: all but its last token.
    prompt = f"Request {secrets.token_hex(8)}: " + "count the apples and the pears. " * 20
    first = client.completions.create(model="thox-coder", prompt=prompt, max_tokens=2, **GREEDY)
    again = client.completions.create(model="thox-coder", prompt=prompt, max_tokens=2, **GREEDY)
    assert first.usage is not None and again.usage is not None
    assert first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details is not None
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached == again.usage.prompt_tokens - 1
    assert cached == (again.model_extra or {})["timings"]["cache_n"]


# -- embeddings ------------------------------------------------------------------------------


def test_embedding_dimensions_only_at_full_size(client: openai.OpenAI) -> None:
    full = client.embeddings.create(model="thox-coder", input="hello")
    size = len(full.data[0].embedding)
    same = client.embeddings.create(model="thox-coder", input="hello", dimensions=size)
    assert len(same.data[0].embedding) == size
    body = refusal(lambda: client.embeddings.create(model="thox-coder", input="x", dimensions=64))
    assert body["code"] == "unsupported_parameter" and body["param"] == "dimensions"


# -- fields the API defines that thoxd does not honour -----------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("store", True), ("reasoning_effort", "high"), ("modalities", ["text", "audio"])],
)
def test_unhonoured_fields_are_refused_by_name(
    client: openai.OpenAI, field: str, value: object
) -> None:
    body = refusal(
        lambda: client.chat.completions.create(
            model="thox-coder", messages=USER, max_tokens=1, **{field: value}
        )
    )
    assert body["code"] == "unsupported_parameter" and body["param"] == field


# -- request ids ------------------------------------------------------------------------------


def test_x_request_id_is_the_body_id(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="thox-coder", messages=USER, max_tokens=2
    )
    assert raw.headers["x-request-id"] == raw.parse().id
    with client.chat.completions.with_streaming_response.create(
        model="thox-coder", messages=USER, max_tokens=2, stream=True
    ) as streamed:
        request_id = streamed.headers["x-request-id"]
        assert all(chunk.id == request_id for chunk in streamed.parse())


def test_every_answer_has_a_request_id_and_the_clients_is_logged(daemon: Daemon) -> None:
    mine = f"client-{secrets.token_hex(6)}"
    refused = httpx.post(
        daemon.url + "/v1/chat/completions", json={"model": 5}, headers={"X-Request-Id": mine}
    )
    assert refused.status_code == 400
    ours = refused.headers["x-request-id"]
    assert ours.startswith("req_") and ours != mine
    assert httpx.get(daemon.url + "/health").headers["x-request-id"].startswith("req_")
    # The journal's line for the request names both ids.
    line = next(line for line in daemon.log().splitlines() if mine in line)
    assert ours in line and "/v1/chat/completions 400" in line
