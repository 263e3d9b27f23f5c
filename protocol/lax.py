"""Request field values as vLLM's request models take them: pydantic's lax mode.

vLLM 0.32 validates a request with pydantic in lax mode, so ``"max_tokens": "3"`` and ``3.0`` are the
integer 3, ``"stream": "yes"`` and ``1`` are true, and ``"temperature": "0.5"`` is a number; ``2.5``
tokens, ``"four"`` tokens or ``"maybe"`` are refused (recorded from a real engine:
``tests/fixtures/vllm-0.32/http/conformance.json``). The gateway and the simulated worker read the fields
they use through these functions, so neither refuses what the engine takes nor takes what it refuses.

Each function returns the coerced value or raises ``LaxError`` with pydantic's error type and message.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # the integers pydantic reads from a float, and a seed's bounds

_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})
# What pydantic reads as an integer from a string: ASCII digits (underscores between them), an optional
# sign, and a fractional part of zeros only ("3.0"); "3.", "1e3" and "3.5" are not.
_INTEGER = re.compile(r"[+-]?[0-9](?:_?[0-9])*(?:\.0+)?")


class LaxError(ValueError):
    """A value pydantic's lax mode refuses for a field: ``kind`` is its error type, ``msg`` its words."""

    def __init__(self, kind: str, msg: str, at: int | None = None, value: Any = None) -> None:
        super().__init__(msg)
        self.kind = kind
        self.msg = msg
        self.at = at  # the item of a list that was refused (its index), None for the value itself
        self.value = value  # that item


def as_int(value: Any) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise LaxError("finite_number", "Input should be a finite number")
        if not value.is_integer():
            raise LaxError("int_from_float", "Input should be a valid integer, got a number with a fractional part")
        if not INT64_MIN <= value <= INT64_MAX:  # a float past the 64-bit integers
            raise LaxError("int_parsing_size", "Unable to parse input string as an integer, exceeded maximum size")
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if _INTEGER.fullmatch(text):
            return int(text.split(".", 1)[0])
        raise LaxError("int_parsing", "Input should be a valid integer, unable to parse string as an integer")
    raise LaxError("int_type", "Input should be a valid integer")


def as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if value in (0, 1):
            return bool(value)
        raise LaxError("bool_parsing", "Input should be a valid boolean, unable to interpret input")
    if isinstance(value, float) and value.is_integer() and INT64_MIN <= value <= INT64_MAX:
        if value in (0.0, 1.0):
            return bool(value)
        raise LaxError("bool_parsing", "Input should be a valid boolean, unable to interpret input")
    if isinstance(value, str):
        text = value.lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise LaxError("bool_parsing", "Input should be a valid boolean, unable to interpret input")
    raise LaxError("bool_type", "Input should be a valid boolean")


def as_float(value: Any) -> float:
    if isinstance(value, (bool, int, float)):
        return float(value)
    if isinstance(value, str):
        if value.isascii():  # Python's float() reads other digits too; pydantic does not
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise LaxError("float_parsing", "Input should be a valid number, unable to parse string as a number")
    raise LaxError("float_type", "Input should be a valid number")


def as_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise LaxError("string_type", "Input should be a valid string")


def as_list(value: Any) -> list[Any]:
    if isinstance(value, list):
        return value
    raise LaxError("list_type", "Input should be a valid list")


def as_dict(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    raise LaxError("dict_type", "Input should be a valid dictionary")


def list_of(read: Callable[[Any], T], value: Any) -> list[T]:
    """A list whose every item ``read`` takes; the first refused item names its index."""
    items = as_list(value)
    out = []
    for i, item in enumerate(items):
        try:
            out.append(read(item))
        except LaxError as err:
            raise LaxError(err.kind, err.msg, i, item) from None
    return out


__all__ = ["LaxError", "as_bool", "as_dict", "as_float", "as_int", "as_list", "as_str", "list_of"]
