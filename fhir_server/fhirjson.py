"""FHIR JSON text <-> Python without changing a value: decimals keep their exact text.

R4 (datatypes.html#decimal): a decimal's precision is part of its value (`1.50` is not `1.5`),
and its range is not a binary double's. `loads` turns every JSON number with a fraction or
exponent into a FhirDecimal: a float (so comparisons, indexing and arithmetic keep working) that
remembers the text it was written as; `dumps` writes that text back verbatim. Everything that
stores or answers a resource goes through these two (storage, FHIR responses).

The standard library's C encoder cannot emit a custom number text, so `dumps` uses the pure
Python encoder with our float formatter: strings are still escaped by the C helpers, which is
where the time goes for large (base64) resources.
"""

from __future__ import annotations

import json
from json.encoder import _make_iterencode, encode_basestring, encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any


class FhirDecimal(float):
    """A JSON number with its original text (`1.50`, `-1e+245`)."""

    __slots__ = ("text",)
    text: str

    def __new__(cls, text: str | float) -> "FhirDecimal":
        value = super().__new__(cls, text)
        value.text = text if isinstance(text, str) else float.__repr__(value)
        return value

    def __repr__(self) -> str:
        return self.text

    def __reduce__(self) -> tuple[Any, ...]:  # copy / deepcopy / pickle keep the text
        return (FhirDecimal, (self.text,))


class NonFiniteNumber(ValueError):
    """NaN / Infinity literals: not JSON, not FHIR."""


def _refuse_constant(name: str) -> Any:
    raise NonFiniteNumber(f"{name} is not a JSON number")


def loads(text: str | bytes) -> Any:
    """json.loads with exact decimals; NaN/Infinity raise NonFiniteNumber (a ValueError)."""
    return json.loads(text, parse_float=FhirDecimal, parse_constant=_refuse_constant)


def _floatstr(value: float) -> str:
    if isinstance(value, FhirDecimal):
        return value.text
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{value!r} cannot be written as JSON")
    return float.__repr__(value)


def dumps(value: Any, *, indent: int | None = None, ensure_ascii: bool = False) -> str:
    """json.dumps (compact unless `indent`) that writes FhirDecimals as their original text."""
    item_separator, key_separator = ((",", ": ") if indent is not None else (",", ":"))
    iterencode = _make_iterencode(
        {}, _no_default, encode_basestring_ascii if ensure_ascii else encode_basestring, " " * indent if indent else indent,
        _floatstr, key_separator, item_separator, False, False, True,
    )
    return "".join(iterencode(value, 0))


def _no_default(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
