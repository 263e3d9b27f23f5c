"""The house rules, checked: one import root, imports that flow one way, a pure protocol layer.

Every product module is parsed (not imported) and each of its imports is checked
against the layering in the README: ``protocol`` at the bottom, the shared clients
(``kvgate.bus``, ``kvgate.etcd``, ``kvgate.stats``, ``kvgate.tasks``) on it, then ``indexer``, ``router``,
``gateway``; ``worker`` beside them on ``indexer``; ``loadtest`` on nothing but the dev
launchers; ``dev`` (tooling) on anything, and nothing in the product on ``dev`` except
benchmark modules.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PACKAGES = ("protocol", "indexer", "router", "gateway", "worker", "loadtest", "dev", "kvgate")
SHARED_CLIENTS = {"kvgate.bus", "kvgate.etcd", "kvgate.secret", "kvgate.stats", "kvgate.tasks"}

# package -> kvgate modules (prefixes) it may import, besides itself
ALLOWED: dict[str, set[str]] = {
    "protocol": set(),
    "kvgate": {"kvgate.protocol"},
    "indexer": {"kvgate.protocol", *SHARED_CLIENTS},
    "router": {"kvgate.protocol", "kvgate.indexer", *SHARED_CLIENTS},
    "gateway": {"kvgate.protocol", "kvgate.indexer", "kvgate.router", *SHARED_CLIENTS},
    "worker": {"kvgate.protocol", "kvgate.indexer", *SHARED_CLIENTS},
    "loadtest": {"kvgate.dev"},
    "dev": {"kvgate"},
}
OLD_ROOTS = ("gateway", "router", "indexer", "worker", "loadtest", "protocol", "dev")
NO_IO_IN_PROTOCOL = {"asyncio", "socket", "zmq", "nats", "aiohttp", "aetcd", "subprocess", "threading"}


def product_files() -> list[Path]:
    # kvgate/ links the other packages; only its own modules belong to the root package.
    files = list((REPO / "kvgate").glob("*.py"))
    for package in OLD_ROOTS:
        files += [p for p in (REPO / package).rglob("*.py") if "__pycache__" not in p.parts]
    return sorted(files)


def own_package(path: Path) -> str:
    return path.relative_to(REPO).parts[0]


def imports_of(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            if node.module == "kvgate":
                found += [(node.lineno, f"kvgate.{alias.name}") for alias in node.names]
    return found


def in_scope(module: str, prefixes: set[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


FILES = product_files()


def test_the_layout_is_found() -> None:
    names = {str(p.relative_to(REPO)) for p in FILES}
    assert {
        "protocol/wire.py",
        "indexer/kv_indexer.py",
        "router/routing.py",
        "gateway/app.py",
        "worker/sidecar/service.py",
        "kvgate/bus.py",
        "dev/launch.py",
    } <= names
    for package in OLD_ROOTS:
        link = REPO / "kvgate" / package
        assert link.is_symlink() and link.resolve() == REPO / package


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_imports_use_one_root_and_flow_one_way(path: Path) -> None:
    package = own_package(path)
    allowed = {f"kvgate.{package}" if package != "kvgate" else "kvgate", *ALLOWED[package]}
    is_bench = path.name.endswith("bench.py")
    for line, module in imports_of(path):
        root = module.split(".")[0]
        assert root not in OLD_ROOTS, f"{path}:{line} imports {module!r}: use the kvgate root"
        if root != "kvgate" or (package == "kvgate" and module == "kvgate"):
            continue
        if package == "protocol":
            assert in_scope(module, {"kvgate.protocol"}), f"{path}:{line}: protocol imports {module}"
            continue
        if is_bench and in_scope(module, {"kvgate.dev"}):
            continue  # benchmarks are dev tooling that sits beside what they measure
        assert in_scope(module, allowed), f"{path}:{line}: {package}/ may not import {module}"


@pytest.mark.parametrize("path", [p for p in FILES if own_package(p) == "protocol"], ids=lambda p: p.name)
def test_the_protocol_layer_does_no_io(path: Path) -> None:
    for line, module in imports_of(path):
        assert module.split(".")[0] not in NO_IO_IN_PROTOCOL, f"{path}:{line} imports {module}"


def repository_lines(suffixes: set[str]) -> list[tuple[str, int, str]]:
    """Every line of the repository's own text files with these suffixes: tracked files and
    new ones git does not ignore (never .venv/), symlinks left out."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    out = []
    for name in filter(None, listed.split("\0")):
        path = REPO / name
        if path.is_symlink() or not path.is_file() or path.suffix not in suffixes:
            continue
        out += [(name, n, line) for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)]
    return out


def test_nothing_points_outside_the_repository() -> None:
    outside = re.compile(r"/wor[k]/|\.\./share[d]\b")  # the classes keep this line from matching itself
    lines = repository_lines({".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".json", ".cfg", ".jinja", ""})
    offenders = [f"{name}:{n}" for name, n, line in lines if outside.search(line)]
    assert not offenders, f"paths outside the repository: {offenders}"


def test_commands_start_modules_by_their_installed_name() -> None:
    # A rootless name (worker.sim) run from a checkout imports the folder as a second package.
    old = re.compile(r"""-m["',\s]+(?:gateway|router|indexer|worker|loadtest|protocol|dev)\b(?!/)""")
    lines = repository_lines({".py", ".md", ".yaml", ".yml", ".sh", ""})
    offenders = [f"{name}:{n}" for name, n, line in lines if old.search(line)]
    assert not offenders, f"commands naming a module without the kvgate root: {offenders}"
