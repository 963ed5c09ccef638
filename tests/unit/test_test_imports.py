"""Tests import no other test module: what several test modules share (fakes, fixtures,
service helpers) lives in ``tests/support/``, the only part of ``tests`` that any
module under ``tests/`` may import.

A test module importing another one runs that module's collection-time code, ties
two files' fakes together and hides which helpers are shared; the import is read
from the source (AST), so no test module is imported here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
SUPPORT = "tests.support"


def module_name(path: Path) -> str:
    """The dotted name of a module under the repository's root (``tests.unit.test_x``)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, *, package: bool = False) -> list[str]:
    """Every module a source imports, relative imports resolved against ``module``
    (itself a package's ``__init__`` when ``package``); ``from m import n`` counts
    as ``m.n`` too, since ``n`` may be a module."""
    found: list[str] = []
    here = module.split(".") if package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                origin = ".".join([*base, *([node.module] if node.module else [])])
            else:
                origin = node.module or ""
            found.append(origin)
            found.extend(f"{origin}.{alias.name}" for alias in node.names)
    return found


def forbidden(name: str) -> bool:
    """Whether an imported name is a module of ``tests`` other than ``tests.support``."""
    if name != "tests" and not name.startswith("tests."):
        return False
    return not (name == SUPPORT or name.startswith(SUPPORT + "."))


def violations(source: str, module: str, *, package: bool = False) -> list[str]:
    # `from tests import support` is fine: its origin `tests` is only the package.
    names = imported_modules(source, module, package=package)
    return sorted({n for n in names if forbidden(n) and n != "tests"})


@pytest.mark.parametrize(
    "path", sorted(TESTS.rglob("*.py")), ids=lambda p: str(p.relative_to(TESTS))
)
def test_no_module_under_tests_imports_a_test_module(path: Path) -> None:
    module = module_name(path)
    found = violations(path.read_text(), module, package=path.name == "__init__.py")
    assert found == [], (
        f"{module} imports {', '.join(found)}: move what is shared to tests/support/"
    )


@pytest.mark.parametrize(
    "source",
    [
        "from tests.unit.test_claims import Store",
        "import tests.integration.test_api",
        "from tests.unit import test_claims",
        "from tests import conftest",
        "from .test_claims import Store",
        "from . import test_claims",
        "from ..integration.test_api import client",
        "def f():\n    from tests.conftest import DEFAULT_AMQP_URL\n",
    ],
)
def test_an_import_of_another_test_module_is_found(source: str) -> None:
    assert violations(source, "tests.unit.test_queue_pauses") != []


@pytest.mark.parametrize(
    "source",
    [
        "from tests.support.claiming import Store",
        "import tests.support.services",
        "from tests import support",
        "from tests.support import faults",
        "from .services import free_port",
        "import asyncio\nfrom taskq.model import TaskStatus",
    ],
)
def test_imports_of_support_and_of_other_packages_pass(source: str) -> None:
    assert violations(source, "tests.support.faults") == []


def test_a_relative_import_in_a_package_init_resolves_inside_it() -> None:
    assert violations("from .claiming import Store", "tests.support", package=True) == []
    assert violations("from .test_x import y", "tests.unit", package=True) == [
        "tests.unit.test_x",
        "tests.unit.test_x.y",
    ]
