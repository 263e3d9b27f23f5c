"""Secrets read from a file or an environment variable, never shown.

``Secret`` wraps a value so that ``repr``, ``str`` and f-strings print ``***``: a
config or credentials object holding one can be logged whole. ``read_secret`` takes the
one place a secret may come from (inline value, typically an environment variable, or
a file path) and refuses two. Knows nothing of what the secret unlocks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

HIDDEN: Final = "***"


class Secret:
    """A value that does not print; ``reveal()`` is the only way to read it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not value:
            raise ValueError("a secret must not be empty")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({HIDDEN!r})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def read_secret(
    what: str, *, value: str | None = None, file: str | os.PathLike[str] | None = None, env: str | None = None
) -> Secret | None:
    """The secret ``what`` from exactly one of ``value``, ``file`` (its content, outer
    whitespace stripped) or the environment variable ``env``; None when none is set.

    Errors name the source, never the content.
    """
    from_env = os.environ.get(env) if env else None
    sources = [s for s in (value, file, from_env) if s]
    if len(sources) > 1:
        raise ValueError(f"{what} is given more than once (inline, file{f', ${env}' if env else ''}): pick one")
    if file:
        try:
            text = Path(file).read_text(encoding="utf-8").strip()
        except OSError as err:
            raise ValueError(f"cannot read {what} file {file}: {err.strerror}") from None
        if not text:
            raise ValueError(f"{what} file {file} is empty")
        return Secret(text)
    raw = value or from_env
    return Secret(raw) if raw else None
