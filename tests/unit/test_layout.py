"""The package layout docs/architecture.md draws: each side of the system stays in its folder."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import taskq.store

PACKAGE = Path(__file__).resolve().parents[2] / "taskq"

# Which of taskq's packages each package may import (the root's modules always).
ALLOWED = {
    "amqp": set(),
    "enqueue": {"amqp"},
    "fleet": {"amqp"},
    "worker": {"amqp", "fleet"},
    "web": {"amqp", "enqueue", "fleet"},
    # The store imports none of the packages: each of them may import it (ROOT).
    "store": set(),
}
# Parts of the root that are packages (a module split into private modules): every
# package may import them, as it may import the root's modules.
ROOT = {"store"}


def imported_packages(path: Path) -> set[str]:
    """taskq's packages that a module imports (``taskq.<package>...``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "taskq" and len(parts) > 1 and parts[1] in ALLOWED:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_packages_below_it(package: str) -> None:
    modules = sorted((PACKAGE / package).glob("*.py"))
    assert modules, package
    for module in modules:
        wrong = imported_packages(module) - ALLOWED[package] - ROOT - {package}
        assert not wrong, f"taskq/{package}/{module.name} imports taskq.{wrong}"


def test_the_packages_are_the_ones_drawn() -> None:
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(ALLOWED)
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    for package in ALLOWED:
        assert f"  {package}/ " in text, package


def test_the_stores_modules_are_private_and_mapped() -> None:
    """Code outside taskq/store/ imports ``taskq.store`` only (what its ``__all__`` says);
    the package docstring names each of its modules."""
    store = PACKAGE / "store"
    outside = [
        path
        for folder in ("taskq", "tests", "scripts", "examples")
        for path in sorted((PACKAGE.parent / folder).rglob("*.py"))
        if store not in path.parents
    ]
    assert outside
    for path in outside:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            wrong = [n for n in names if n.startswith("taskq.store._")]
            assert not wrong, f"{path} imports {wrong}"
    doc = taskq.store.__doc__ or ""
    for module in sorted(store.glob("_*.py")):
        if module.stem != "__init__":
            assert f"``{module.stem}``" in doc, module.name
