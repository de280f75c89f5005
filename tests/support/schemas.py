"""Thirty JSON schemas of varied features (nested objects, arrays with bounds, enums, anyOf,
patterns, required and optional fields, string formats), for the structured-output tests and
benchmarks. Every string and array is bounded, so a constrained small model always reaches the
end of the document within a few dozen tokens (an unbounded string can run to max_tokens). The
formats are ones with a bounded length (date, uuid, ipv4): xgrammar ignores maxLength next to a
format, so `email` (and `time` and `date-time`, with their free fractional seconds) can run on."""

from __future__ import annotations

from typing import Any

_S = {"type": "string", "maxLength": 12}
_NAME = {"type": "string", "minLength": 1, "maxLength": 12}
_SMALL = {"type": "integer", "minimum": 0, "maximum": 999}


def _obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        "additionalProperties": False,
    }


SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    ("person", _obj({"name": _NAME, "age": _SMALL})),
    ("city", _obj({"city": _NAME, "country": _NAME})),
    ("flag", _obj({"ok": {"type": "boolean"}})),
    ("color_enum", _obj({"color": {"enum": ["red", "green", "blue"]}})),
    ("int_range", _obj({"year": {"type": "integer", "minimum": 1900, "maximum": 2100}})),
    ("number", _obj({"price": {"type": "number", "minimum": 0, "maximum": 100}})),
    ("tags", _obj({"tags": {"type": "array", "items": _S, "minItems": 1, "maxItems": 3}})),
    ("ints", _obj({"values": {"type": "array", "items": _SMALL, "minItems": 2, "maxItems": 4}})),
    ("nested", _obj({"user": _obj({"name": _NAME, "id": _SMALL})})),
    ("deep", _obj({"a": _obj({"b": _obj({"c": {"type": "boolean"}})})})),
    ("optional", _obj({"name": _NAME, "nickname": _S}, required=["name"])),
    ("all_optional", _obj({"x": _SMALL, "y": _SMALL}, required=[])),
    ("any_of", _obj({"id": {"anyOf": [_SMALL, {"type": "string", "maxLength": 8}]}})),
    (
        "any_of_objects",
        _obj(
            {
                "shape": {
                    "anyOf": [
                        _obj({"kind": {"const": "circle"}, "r": _SMALL}),
                        _obj({"kind": {"const": "square"}, "side": _SMALL}),
                    ]
                }
            }
        ),
    ),
    ("zip_pattern", _obj({"zip": {"type": "string", "pattern": "^[0-9]{5}$"}})),
    ("code_pattern", _obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}})),
    ("date", _obj({"day": {"type": "string", "format": "date"}})),
    (
        "date_range",
        _obj(
            {
                "start": {"type": "string", "format": "date"},
                "end": {"type": "string", "format": "date"},
            }
        ),
    ),
    ("uuid", _obj({"id": {"type": "string", "format": "uuid"}})),
    ("ipv4", _obj({"ip": {"type": "string", "format": "ipv4"}})),
    ("clock_pattern", _obj({"at": {"type": "string", "pattern": "^[01][0-9]:[0-5][0-9]$"}})),
    (
        "objects_array",
        _obj(
            {
                "items": {
                    "type": "array",
                    "items": _obj({"sku": _NAME, "qty": _SMALL}),
                    "minItems": 1,
                    "maxItems": 2,
                }
            }
        ),
    ),
    ("nullable", _obj({"note": {"anyOf": [_S, {"type": "null"}]}})),
    ("const", _obj({"version": {"const": 2}, "name": _NAME})),
    ("int_enum", _obj({"level": {"enum": [1, 2, 3]}})),
    ("bool_and_enum", _obj({"done": {"type": "boolean"}, "mode": {"enum": ["fast", "slow"]}})),
    ("top_array", {"type": "array", "items": _NAME, "minItems": 1, "maxItems": 3}),
    (
        "mixed",
        _obj(
            {
                "title": _NAME,
                "rating": {"type": "integer", "minimum": 1, "maximum": 5},
                "genres": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 2},
            },
            required=["title", "rating"],
        ),
    ),
    (
        "defs_ref",
        {
            "$defs": {"point": _obj({"x": _SMALL, "y": _SMALL})},
            **_obj({"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}}),
        },
    ),
    ("string_bounds", _obj({"word": {"type": "string", "minLength": 3, "maxLength": 6}})),
]

assert len(SCHEMAS) == 30
