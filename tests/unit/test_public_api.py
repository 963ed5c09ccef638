"""The public surface: what ``taskq`` exports, and every exception in taskq.errors."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
from types import ModuleType

import pytest

import taskq
from taskq import errors

# Example user code shipped with taskq (its DemoFailure is the demo's own error,
# as an application's would be); private classes never leave their module.
NOT_TASKQ_ERRORS = {"taskq.demo"}


def modules() -> list[ModuleType]:
    names = [
        info.name
        for info in pkgutil.walk_packages(taskq.__path__, "taskq.")
        if info.name not in ("taskq.__main__", "taskq.sql")
    ]
    return [importlib.import_module(name) for name in sorted(names)]


def exception_classes() -> list[type[BaseException]]:
    found = []
    for module in modules():
        for _, value in inspect.getmembers(module, inspect.isclass):
            if value.__module__ == module.__name__ and issubclass(value, BaseException):
                found.append(value)
    return found


@pytest.mark.parametrize("name", taskq.__all__)
def test_every_name_in_all_exists(name: str) -> None:
    assert getattr(taskq, name) is not None


def test_what_users_touch_is_exported() -> None:
    from taskq.client import Client
    from taskq.handlers import Context, Registry
    from taskq.settings import Settings
    from taskq.testing import run_handler

    assert taskq.Client is Client
    assert taskq.Registry is Registry
    assert taskq.Context is Context
    assert taskq.Settings is Settings
    assert taskq.run_handler is run_handler
    assert taskq.Retry is errors.Retry and taskq.Fail is errors.Fail


def test_every_exception_class_lives_in_errors() -> None:
    outside = [
        f"{cls.__module__}.{cls.__qualname__}"
        for cls in exception_classes()
        if cls.__module__ != "taskq.errors"
        and cls.__module__ not in NOT_TASKQ_ERRORS
        and not cls.__name__.startswith("_")
    ]
    assert outside == []


def test_every_error_is_exported_and_drawn_in_the_tree() -> None:
    tree = errors.__doc__ or ""
    for name, cls in inspect.getmembers(errors, inspect.isclass):
        if cls.__module__ == "taskq.errors" and issubclass(cls, BaseException):
            assert name in taskq.__all__, name
            assert f" {name} " in tree or f"{name} (" in tree, name


def test_the_tree_draws_each_error_under_its_base() -> None:
    drawn = [line for line in (errors.__doc__ or "").splitlines() if "── " in line]
    assert drawn
    above: list[tuple[int, str]] = [(-1, "TaskqError")]  # (column, name), outermost first
    for line in drawn:
        column = line.index("── ")
        name = line[column + 3 :].split()[0]
        while above[-1][0] >= column:
            above.pop()
        assert getattr(errors, name).__bases__[0].__name__ == above[-1][1], name
        above.append((column, name))


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("taskq.handlers", "Retry"),
        ("taskq.handlers", "Fail"),
        ("taskq.handlers", "HandlerError"),
        ("taskq.enqueue.validation", "InvalidRequest"),
        ("taskq.enqueue.validation", "FieldError"),
        ("taskq.enqueue.validation", "TooLarge"),
        ("taskq.web.http", "Problem"),
        ("taskq.amqp.envelope", "InvalidEnvelope"),
        ("taskq.enqueue.offload", "Busy"),
        ("taskq.enqueue.offload", "Overrun"),
        ("taskq.enqueue.schemas", "SchemaProblem"),
        ("taskq.worker.execution", "NoHandler"),
    ],
)
def test_old_import_paths_still_work(module: str, name: str) -> None:
    assert getattr(importlib.import_module(module), name) is getattr(errors, name)


def test_importing_taskq_stays_light() -> None:
    code = (
        "import sys, taskq; print(sorted({'aio_pika', 'asyncpg', 'starlette'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = taskq.Nope
