"""thoxd/api/start.py: fill-in-the-middle prompts (laid out, and served by a real daemon on a
copy of the Gemma file whose vocabulary names FIM tokens), and `echo`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import gguf
import httpx
import pytest
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

from tests.conftest import Daemon
from thoxd.api.start import infill
from thoxd.engine.model import LoadedModel

# Gemma's vocabulary has no FIM tokens; the copy names three of its unused control tokens.
FIM = (6, 7, 8)  # prefix, suffix, middle
PREFIX = "def add(a, b):\n    "
SUFFIX = "\n    return total\n"


def _model(add_bos: bool) -> LoadedModel:
    llama = SimpleNamespace(fim=FIM, bos=2, add_bos=add_bos)
    return cast(LoadedModel, SimpleNamespace(llama=llama))


def test_infill_puts_prefix_then_suffix_then_asks_for_the_middle() -> None:
    assert infill(_model(True), [10, 11], [20]) == [2, 6, 10, 11, 7, 20, 8]
    assert infill(_model(False), [10], []) == [6, 10, 7, 8]


@pytest.fixture(scope="module")
def fim_box(tmp_path_factory: pytest.TempPathFactory, gemma_file: Path) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("fim")
    models = tmp / "models"
    models.mkdir()
    reader = gguf.GGUFReader(gemma_file)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    assert arch is not None
    writer = gguf.GGUFWriter(models / "fim.gguf", arch.contents())
    tok = gguf.Keys.Tokenizer
    keys = (tok.FIM_PRE_ID, tok.FIM_SUF_ID, tok.FIM_MID_ID)
    new = {k: MetadataDetails(gguf.GGUFValueType.UINT32, v) for k, v in zip(keys, FIM, strict=True)}
    copy_with_new_metadata(reader, writer, new, [])
    catalog = tmp / "models.toml"
    catalog.write_text(
        '[[models]]\nid = "fim"\npath = "fim.gguf"\nn_ctx = 512\ncapabilities = ["completion"]\n'
    )
    d = Daemon(tmp, models, "--catalog", str(catalog), "--default-model", "fim", "--slots", "1")
    try:
        d.wait_ready()
        yield d
    finally:
        d.stop()


def _complete(box: Daemon, **fields: Any) -> httpx.Response:
    body = {"model": "fim", "max_tokens": 4, "temperature": 0, **fields}
    return httpx.post(box.url + "/v1/completions", json=body, timeout=60)


def test_suffix_on_a_model_with_fim_tokens_builds_the_infill_prompt(fim_box: Daemon) -> None:
    def prompt_tokens(**fields: Any) -> int:
        response = _complete(fim_box, **fields)
        assert response.status_code == 200, response.text
        return int(response.json()["usage"]["prompt_tokens"])

    prefix, suffix = prompt_tokens(prompt=PREFIX), prompt_tokens(prompt=SUFFIX)
    # BOS, FIM_PRE, prefix, FIM_SUF, suffix, FIM_MID: each text counted above with one BOS.
    assert prompt_tokens(prompt=PREFIX, suffix=SUFFIX) == prefix + suffix + 2
    # An empty suffix is no suffix (OpenAI's default): a plain completion.
    assert prompt_tokens(prompt=PREFIX, suffix="") == prefix


def test_echo_puts_the_prompt_before_the_completion(fim_box: Daemon) -> None:
    plain = _complete(fim_box, prompt=PREFIX).json()["choices"][0]["text"]
    echoed = _complete(fim_box, prompt=PREFIX, echo=True).json()["choices"][0]["text"]
    assert echoed == PREFIX + plain
    # Token ids echo as their text; BOS, a control token, as nothing.
    tokens = [2, 9259, 993]  # BOS "Hello" " there"
    text = _complete(fim_box, prompt=tokens, echo=True).json()["choices"][0]["text"]
    assert text.startswith("Hello there") and len(text) > len("Hello there")
    with httpx.stream(
        "POST",
        fim_box.url + "/v1/completions",
        json={"model": "fim", "prompt": PREFIX, "max_tokens": 4, "temperature": 0,
              "echo": True, "stream": True},
        timeout=60,
    ) as response:  # fmt: skip
        chunks = [line for line in response.iter_lines() if line.startswith("data: {")]
    assert '"text":"def add(a, b):\\n    "' in chunks[0]
