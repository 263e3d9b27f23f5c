"""The public embedding API: ``from kvgate import ...`` routes token lists with no HTTP, as the README shows."""

from __future__ import annotations

import re
from pathlib import Path

import kvgate

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_example_runs_and_routes_to_the_holder(capsys) -> None:
    text = README.read_text()
    section = text[text.index("### Embedding") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    scope: dict[str, object] = {}
    exec(compile(code.group(1), "README.md#embedding", "exec"), scope)
    decision = scope["decision"]
    assert str(decision.chosen) == "w1"  # type: ignore[attr-defined]
    assert capsys.readouterr().out.startswith("w1 {")


def test_every_exported_name_resolves_lazily() -> None:
    for name in kvgate.__all__:
        assert getattr(kvgate, name) is not None
    assert "Router" in dir(kvgate)
    try:
        kvgate.NotAThing  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as err:
        assert "NotAThing" in str(err)
    else:
        raise AssertionError("unknown names must raise AttributeError")
