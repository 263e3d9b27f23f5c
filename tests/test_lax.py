"""``protocol.lax`` reads a field as pydantic's lax mode (vLLM's request models) does: checked against pydantic."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from kvgate.protocol import lax


class Model(BaseModel):
    i: int | None = None
    b: bool | None = None
    f: float | None = None
    s: str | None = None


READERS = {"i": lax.as_int, "b": lax.as_bool, "f": lax.as_float, "s": lax.as_str}


def pydantic_reads(field: str, value: Any) -> tuple[str, Any]:
    try:
        return "ok", getattr(Model(**{field: value}), field)
    except ValidationError as err:
        first = err.errors()[0]
        return "error", (first["type"], first["msg"])


def lax_reads(field: str, value: Any) -> tuple[str, Any]:
    try:
        return "ok", READERS[field](value)
    except lax.LaxError as err:
        return "error", (err.kind, err.msg)


SAMPLES = [
    True, False, 0, 1, 2, -3, 3.0, 3.5, float("inf"), "3", " 3 ", "+3", "-3", "3.0", "3.00", "3.50", "3.", "1e3",
    "1_000", "1__0", "_1", "0x10", "", "  ", "x", "٣", "007", "yes", "YES", "No", "on", "OFF", "t", "F", "y",
    "true", "maybe", 0.0, 1.0, 0.5, "0.5", "nan", [1], {}, [],
]  # fmt: skip


@pytest.mark.parametrize("field", sorted(READERS))
@pytest.mark.parametrize("value", SAMPLES, ids=repr)
def test_each_sample_reads_as_pydantic_reads_it(field: str, value: Any) -> None:
    expected, got = pydantic_reads(field, value), lax_reads(field, value)
    if field == "f" and expected[0] == "ok" and expected[1] != expected[1]:  # nan
        assert got[0] == "ok" and got[1] != got[1]
    else:
        assert got == expected


@given(st.one_of(st.text(max_size=8), st.integers(-(10**6), 10**6), st.floats(allow_nan=False), st.booleans()))
def test_any_scalar_reads_as_pydantic_reads_it(value: Any) -> None:
    for field in READERS:
        assert lax_reads(field, value) == pydantic_reads(field, value), (field, value)
