"""thoxd/engine/schema.py: JSON Schema -> GBNF, and the schemas refused by name because their
constraints could not be enforced."""

from __future__ import annotations

from typing import Any

import pytest

from thoxd.engine.schema import UnsupportedSchema, check_schema, json_grammar

ENFORCED: list[dict[str, Any]] = [
    {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
    {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
    {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 3},
    {"enum": ["red", "green"]},
    {"type": "string", "enum": ["red", "green"]},
    {"const": 3},
    {"anyOf": [{"type": "string"}, {"type": "null"}]},
    {"type": ["string", "null"]},
    {"type": "string", "minLength": 2, "maxLength": 5},
    {"type": "string", "pattern": "^[a-z]+$"},
    {"type": "string", "format": "date-time"},
    {
        "$defs": {"p": {"type": "integer"}},
        "type": "object",
        "properties": {"p": {"$ref": "#/$defs/p"}},
    },
    {"title": "T", "description": "annotations constrain nothing", "type": "boolean"},
    {},
]


@pytest.mark.parametrize("schema", ENFORCED)
def test_enforceable_schemas_become_grammars(schema: dict[str, Any]) -> None:
    grammar = json_grammar(schema)
    assert "root ::=" in grammar


REFUSED: list[tuple[dict[str, Any], str, str]] = [
    ({"type": "integer", "minimum": 0}, "minimum", ""),
    ({"type": "number", "multipleOf": 2}, "multipleOf", ""),
    ({"type": "object", "properties": {"a": {"not": {"type": "null"}}}}, "not", "/properties/a"),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems", ""),
    ({"type": "object", "patternProperties": {"^x": {}}}, "patternProperties", ""),
    ({"type": "string", "format": "email"}, "email", ""),
    ({"type": "string", "pattern": "abc"}, "anchored", ""),
    ({"type": "string", "pattern": "^a$", "minLength": 1}, "minLength", ""),
    ({"$ref": "https://example.com/s.json"}, "local", ""),
    ({"anyOf": [{"type": "string"}], "minProperties": 1}, "minProperties", ""),
    ({"if": {}, "then": {}}, "if", ""),
    ({"type": "tuple"}, "unknown type", ""),
    ({"type": "object", "properties": {"a": True}}, "true or false", "/properties/a"),
]


@pytest.mark.parametrize(("schema", "named", "where"), REFUSED)
def test_unenforceable_schemas_are_refused_by_name(
    schema: dict[str, Any], named: str, where: str
) -> None:
    with pytest.raises(UnsupportedSchema) as refused:
        json_grammar(schema)
    assert named in str(refused.value)
    assert refused.value.where == where


def test_json_strings_may_not_hold_control_characters() -> None:
    grammar = json_grammar({"type": "string"})
    char = next(line for line in grammar.splitlines() if line.startswith("char ::="))
    assert "\\x00-\\x1F" in char


def test_bounds_on_size_and_depth() -> None:
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(40):
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(UnsupportedSchema, match="nests"):
        check_schema(deep)
    huge = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(5000)}}
    with pytest.raises(UnsupportedSchema, match="bytes"):
        check_schema(huge)
