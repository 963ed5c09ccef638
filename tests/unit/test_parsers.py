"""Parsers of user input take time linear in it: durations (in requests and in
settings), names, and the regular expressions of payload schemas (run on RE2).

Each input is large enough that a backtracking parser takes seconds on it (the
parsers before this file took hours on a MiB), and each bound is tens of times
what a linear parser needs, so a loaded machine does not break it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import pytest

from taskq._utils import parse_duration
from taskq.enqueue import schemas
from taskq.errors import ConfigError, TaskqError
from taskq.settings import load_settings

N = 64 * 1024
MiB = 1024 * 1024
BOUND = 1.0  # seconds; a linear parser needs a few milliseconds for any of these


def quick(parse: Callable[[], Any]) -> None:
    """``parse()`` (which may refuse its input) ends within BOUND seconds."""
    started = time.perf_counter()
    with contextlib.suppress(ValueError, TaskqError):
        parse()
    elapsed = time.perf_counter() - started
    assert elapsed < BOUND, f"took {elapsed:.2f}s"


@pytest.mark.parametrize(
    "text",
    [
        "1" + " " * N + "x",  # spaces that either side of the unit could take
        "1" + "\t" * N + "ms!",
        " " * N + "1" * N + " " * N + "y",
        "1." + "0" * N + "q",
        "9" * MiB,
    ],
)
def test_durations_are_read_in_linear_time(text: str) -> None:
    quick(lambda: parse_duration(text))
    with pytest.raises(ValueError) as error:
        parse_duration(text)
    assert len(str(error.value)) < 200  # the message does not echo the input


def test_duration_spellings() -> None:
    for text, seconds in [(" 1 s ", 1), ("1\tms\n", 0.001), ("2.5m", 150), ("30 d", 2592000)]:
        assert parse_duration(text) == seconds
    for text in ("1e3", "\u0661", "1_0", ".5", "5.", "1 ms s", "5 5s", "0x10", "+1"):
        with pytest.raises(ValueError):
            parse_duration(text)


@pytest.mark.parametrize(
    "variable", ["TASKQ_LEASE_SECONDS", "TASKQ_BACKOFFS", "TASKQ_MAX_DELAY", "TASKQ_RETENTION"]
)
def test_settings_are_read_in_linear_time(variable: str) -> None:
    value = "1" + " " * N + "x"
    field = variable.removeprefix("TASKQ_").lower()
    quick(lambda: load_settings(_env_file=None, **{field: value}))
    with pytest.raises(ConfigError):
        load_settings(_env_file=None, **{field: value})


def test_names_take_no_trailing_newline() -> None:
    # ``$`` also matches before a final newline: every name is matched whole.
    with pytest.raises(ConfigError):
        load_settings(_env_file=None, namespace="taskq\n")


# ---------------------------------------------------------------- payload schemas on RE2


def errors(schema: dict[str, Any], payload: Any) -> tuple[str, str] | None:
    return schemas.payload_errors(schemas.PayloadValidator(schema), payload)


def test_patterns_run_on_re2_in_linear_time() -> None:
    nested = {"properties": {"s": {"pattern": "^(a+)+$"}}}
    quick(lambda: errors(nested, {"s": "a" * MiB + "!"}))
    assert errors(nested, {"s": "a" * MiB + "!"})[0] == ".s"
    assert errors(nested, {"s": "aaa"}) is None

    names = {"patternProperties": {"^(a|aa)+$": {"type": "integer"}}}
    quick(lambda: errors(names, {"a" * N + "b": "x"}))
    assert errors(names, {"aaaa": "x"}) == (".aaaa", "'x' is not of type 'integer'")
    assert errors(names, {"aaab": "x"}) is None

    closed = {"patternProperties": {"^x-(a+)+$": {}}, "additionalProperties": False}
    quick(lambda: errors(closed, {"x-" + "a" * MiB + "!": 1}))
    assert errors(closed, {"x-aa": 1}) is None
    problem = errors(closed, {"y": 1, "z": 2})
    assert problem is not None and "'y', 'z'" in problem[1]
    # ECMA 262 and RE2 agree on the common syntax: classes, anchors, counts, Unicode.
    assert errors({"pattern": "^[0-9]{3}-\\d+$"}, "123-45") is None
    assert errors({"pattern": "^\\p{L}+$"}, "caf\u00e9") is None
    assert errors({"pattern": "b"}, "abc") is None  # unanchored, as JSON Schema says


@pytest.mark.parametrize(
    ("schema", "where"),
    [
        ({"pattern": "(?=lookahead)"}, "pattern"),
        ({"properties": {"a": {"pattern": "(a)\\1"}}}, "properties.a.pattern"),
        ({"patternProperties": {"(?<!x)y": {}}}, "patternProperties"),
        ({"pattern": "(" * 20_000}, "pattern"),
        ({"pattern": "a{1000}{1000}"}, "pattern"),  # RE2 refuses what would be huge
        ({"unevaluatedProperties": False, "patternProperties": {"a": {}}}, ""),
    ],
)
def test_schemas_re2_cannot_run_are_refused(schema: dict[str, Any], where: str) -> None:
    quick(lambda: schemas.check_schema(schema))
    with pytest.raises(schemas.SchemaProblem) as problem:
        schemas.check_schema(schema)
    assert problem.value.path == where
    assert len(str(problem.value)) < 500
