"""Payload schemas (JSON Schema 2020-12) whose regular expressions run on RE2.

Python's ``re`` backtracks: a pattern such as ``^(a+)+$`` takes exponential time
on a string that almost matches, and holds the GIL while it does. So the keywords
that run a user's pattern (``pattern``, ``patternProperties``, and
``additionalProperties`` next to ``patternProperties``) are evaluated here with
RE2, whose time is linear in the input; a pattern RE2 cannot compile (a
lookaround, a backreference) is refused when the type is written.
``unevaluatedProperties`` next to ``patternProperties`` is refused too: jsonschema
evaluates that pair with ``re``.

Everything here is slow on purpose-built input (it is pure Python), so callers
run it through :class:`taskq.enqueue.offload.Offload`, off the event loop, with a deadline.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import re2
from jsonschema import Draft202012Validator, FormatChecker, ValidationError, validators
from jsonschema.exceptions import best_match

from taskq._utils import preview

# Defined in taskq.errors; importing them from here keeps working.
from taskq.errors import SchemaProblem as SchemaProblem

MAX_PATTERN_CHARS = 10_000
MAX_MESSAGE_CHARS = 300
_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # errors are answered, not printed on stderr
_OPTIONS.never_capture = True


@functools.lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> Any:
    """The RE2 program of a JSON Schema pattern. Raises ValueError if RE2 cannot run it."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"a pattern of at most {MAX_PATTERN_CHARS} characters")
    try:
        return re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        cause = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
        raise ValueError(f"RE2 cannot run the pattern {preview(pattern)}: {cause}") from None


def _search(pattern: str, text: str) -> bool:
    return compile_pattern(pattern).search(text) is not None


# ---------------------------------------------------------------- keywords on RE2


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _search(pattern, instance):
        yield ValidationError(f"{preview(instance)} does not match {preview(pattern)}")


def _pattern_properties(
    validator: Any, patterns: dict[str, Any], instance: Any, schema: Any
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _search(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(
    validator: Any, additional: Any, instance: Any, schema: Any
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    extras = [
        key
        for key in instance
        if key not in properties and not any(_search(p, key) for p in patterns)
    ]
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        names = ", ".join(preview(key) for key in sorted(extras)[:5])
        more = f" and {len(extras) - 5} more" if len(extras) > 5 else ""
        yield ValidationError(f"unexpected properties: {names}{more}")


PayloadValidator = validators.extend(  # type: ignore[no-untyped-call]
    Draft202012Validator,
    {
        "pattern": _pattern,
        "patternProperties": _pattern_properties,
        "additionalProperties": _additional_properties,
    },
)


def _regex_format(instance: object) -> bool:
    if isinstance(instance, str):
        compile_pattern(instance)
    return True


# The meta-schema marks every pattern (and patternProperties' names) as format
# "regex": checking a schema compiles them with RE2 instead of Python's re.
_FORMATS = FormatChecker(formats=())
for _name, _check in Draft202012Validator.FORMAT_CHECKER.checkers.items():
    if _name != "regex":
        _FORMATS.checkers[_name] = _check
_FORMATS.checks("regex", raises=ValueError)(_regex_format)


def _path(parts: Any) -> str:
    """``.a[0].b`` for the parts ``a, 0, b``."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


def check_schema(schema: dict[str, Any]) -> None:
    """Refuse a payload schema that is invalid or that taskq cannot evaluate safely.

    Raises:
        SchemaProblem: where in the schema, and why.
        RecursionError: the schema is nested too deeply.
    """
    meta = PayloadValidator(PayloadValidator.META_SCHEMA, format_checker=_FORMATS)
    error = best_match(meta.iter_errors(schema))
    if error is not None:
        where = _path(error.absolute_path).lstrip(".")
        if error.validator == "format" and error.cause is not None:
            raise SchemaProblem(where, str(error.cause))
        raise SchemaProblem(where, message(error))
    check_runnable(schema)


def check_runnable(schema: Any) -> None:
    """Refuse what jsonschema would evaluate with Python's ``re`` (cheap: one walk).

    Raises:
        SchemaProblem: saying what.
    """
    if _uses(schema, "unevaluatedProperties") and _uses(schema, "patternProperties"):
        raise SchemaProblem(
            "", "unevaluatedProperties together with patternProperties is not supported"
        )


def _uses(schema: Any, keyword: str) -> bool:
    """Whether ``keyword`` is a key anywhere in ``schema`` (walked without recursion)."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if keyword in node:
                return True
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def message(error: ValidationError) -> str:
    """A validation error's message, cut to a size fit for an answer."""
    return cut(str(error.message))


def cut(text: str) -> str:
    """``text`` cut to a size fit for an answer."""
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…"


def payload_errors(validator: Any, payload: dict[str, Any]) -> tuple[str, str] | None:
    """The first error of ``payload`` against a type's schema, or None.

    The path is relative to the payload: ``.to``, ``.items[3]``, or empty.

    Raises:
        ValueError: the schema holds a pattern RE2 cannot run (stored before taskq checked).
        RecursionError, referencing.exceptions.Unresolvable: as jsonschema raises them.
    """
    error = next(iter(validator.iter_errors(payload)), None)
    if error is None:
        return None
    return _path(error.absolute_path), message(error)
