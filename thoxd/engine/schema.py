"""JSON Schema -> a llama.cpp grammar (GBNF) that only lets valid documents through.

The conversion is llama-cpp-python's port of llama.cpp's own converter. It ignores what it does
not know, so a schema first passes `check_schema`: every keyword must be one the grammar
enforces, or an annotation that constrains nothing (title, description, ...). Anything else is
refused by name, so a client never gets output that merely looks constrained:

    enforced      type (one or a list), properties, required, additionalProperties, items,
                  prefixItems, minItems, maxItems, enum, const, anyOf, oneOf (branches that
                  exclude each other, as discriminated unions do), allOf (of objects),
                  $ref (to #/$defs or #/definitions), minLength, maxLength, pattern (^...$),
                  format (date, time, date-time, uuid)
    refused       minimum, maximum, multipleOf, not, if/then/else, patternProperties,
                  uniqueItems, contains, other formats, remote $ref, and any keyword the
                  converter would ignore beside another (minLength beside pattern, ...)

An object without `additionalProperties` gets only its listed properties: a document the schema
accepts, if a narrower one than it allows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from llama_cpp.llama_grammar import json_schema_to_gbnf

# Keywords that describe and never constrain.
_ANNOTATIONS = frozenset(
    {
        "title", "description", "default", "examples", "$schema", "$id", "$comment",
        "deprecated", "readOnly", "writeOnly", "discriminator", "$defs", "definitions",
        "strict", "nullable",
    }
)  # fmt: skip
_TYPES = frozenset({"string", "number", "integer", "boolean", "null", "object", "array"})
_FORMATS = frozenset({"date", "time", "date-time", "uuid", *(f"uuid{n}" for n in range(1, 6))})
# Keywords beside which the converter reads nothing else (but annotations and, where it
# agrees, `type`).
_EXCLUSIVE = ("$ref", "anyOf", "oneOf", "const", "enum", "allOf")
_OBJECT = frozenset({"type", "properties", "required", "additionalProperties"})
_ARRAY = frozenset({"type", "items", "prefixItems", "minItems", "maxItems"})
_STRING = frozenset({"type", "minLength", "maxLength"})
_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_JSON_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'
_MAX_SCHEMA_BYTES = 64 * 1024
_MAX_DEPTH = 32


class UnsupportedSchema(ValueError):
    """A schema the grammar cannot enforce; `where` is a JSON pointer into it."""

    def __init__(self, message: str, where: str) -> None:
        super().__init__(message)
        self.where = where


def json_grammar(schema: dict[str, Any] | None) -> str:
    """The GBNF grammar for documents valid against `schema` (any JSON object when None)."""
    if schema is None:
        schema = {"type": "object"}
    check_schema(schema)
    try:
        grammar = str(json_schema_to_gbnf(json.dumps(schema)))
    except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
        # The converter asserts on what it cannot read (a pattern without ^...$, a bad $ref).
        raise UnsupportedSchema(
            f"the schema could not be turned into a grammar: {exc}", ""
        ) from None
    # JSON strings may not hold raw control characters; the port's rule lets them through
    # (llama.cpp's own converter has since been fixed the same way).
    return grammar.replace(_LOOSE_CHAR, _JSON_CHAR)


def check_schema(schema: object) -> None:
    if len(json.dumps(schema)) > _MAX_SCHEMA_BYTES:
        raise UnsupportedSchema(f"a schema is at most {_MAX_SCHEMA_BYTES} bytes", "")
    for node, where, depth in _nodes(schema, "", 0):
        if depth > _MAX_DEPTH:
            raise UnsupportedSchema(f"a schema nests at most {_MAX_DEPTH} levels", where)
        _check_node(node, where)


def _check_node(node: object, where: str) -> None:
    if isinstance(node, bool):
        raise UnsupportedSchema("a schema of true or false is not supported", where)
    if not isinstance(node, dict):
        raise UnsupportedSchema("a schema must be an object", where)
    keys = set(node) - _ANNOTATIONS
    exclusive = [k for k in _EXCLUSIVE if k in keys]
    if exclusive:
        rest = keys - {exclusive[0]} - ({"type"} if exclusive[0] in ("const", "enum") else set())
        if exclusive[0] == "allOf":
            rest -= {"type"}
        if rest:
            raise UnsupportedSchema(
                f"'{sorted(rest)[0]}' beside '{exclusive[0]}' is not supported", where
            )
        _check_exclusive(node, exclusive[0], where)
        return
    kind = node.get("type")
    kinds = set(kind) if isinstance(kind, list) else {kind}
    if not kinds <= _TYPES | {None}:
        raise UnsupportedSchema(f"unknown type {kind!r}", where)
    if isinstance(kind, list):
        allowed: frozenset[str] = frozenset({"type"})
    elif kind == "string" or (kind is None and keys & {"pattern", "format"}):
        allowed = _string_keys(node, where)
    elif kind == "object" or (kind is None and keys & _OBJECT):
        allowed = _OBJECT
    elif kind == "array" or (kind is None and keys & _ARRAY):
        allowed = _ARRAY
    else:
        allowed = frozenset({"type"})
    for key in sorted(keys - allowed):
        raise UnsupportedSchema(f"'{key}' is not supported", where)
    if kind == "array" and node.get("prefixItems") and node.get("items") not in (None, False):
        raise UnsupportedSchema("'items' beside 'prefixItems' is not supported", where)


def _string_keys(node: dict[str, Any], where: str) -> frozenset[str]:
    if "pattern" in node:
        pattern = node["pattern"]
        if not isinstance(pattern, str) or not (pattern.startswith("^") and pattern.endswith("$")):
            raise UnsupportedSchema("a 'pattern' must be anchored: ^...$", where)
        return frozenset({"type", "pattern"})
    if "format" in node:
        if node["format"] not in _FORMATS:
            raise UnsupportedSchema(f"the format {node['format']!r} is not supported", where)
        return frozenset({"type", "format"})
    return _STRING


def _check_exclusive(node: dict[str, Any], key: str, where: str) -> None:
    value = node[key]
    if key == "$ref" and not (
        isinstance(value, str) and value.startswith(("#/$defs/", "#/definitions/"))
    ):
        raise UnsupportedSchema("only local references (#/$defs/...) are supported", where)
    if key in ("anyOf", "oneOf", "allOf") and not (isinstance(value, list) and value):
        raise UnsupportedSchema(f"'{key}' must be a non-empty list", where)
    if key == "enum" and not (isinstance(value, list) and value):
        raise UnsupportedSchema("'enum' must be a non-empty list", where)
    if key == "allOf":
        for i, part in enumerate(value):
            if not isinstance(part, dict) or set(part) - _ANNOTATIONS - _OBJECT - {"$ref"}:
                raise UnsupportedSchema("'allOf' of anything but objects", f"{where}/allOf/{i}")


def _nodes(node: object, where: str, depth: int) -> Iterator[tuple[object, str, int]]:
    """Every subschema with its JSON pointer and depth."""
    yield node, where, depth
    if not isinstance(node, dict):
        return
    for key in ("properties", "$defs", "definitions"):
        children = node.get(key)
        if isinstance(children, dict):
            for name, child in children.items():
                yield from _nodes(child, f"{where}/{key}/{name}", depth + 1)
    for key in ("items", "additionalProperties"):
        child = node.get(key)
        if isinstance(child, dict):
            yield from _nodes(child, f"{where}/{key}", depth + 1)
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        children = node.get(key)
        if isinstance(children, list):
            for i, child in enumerate(children):
                yield from _nodes(child, f"{where}/{key}/{i}", depth + 1)
