"""Backoff: how long a task waits before its next attempt after a retryable failure.

Three strategies, stored per task type in ``task_type.backoff`` as JSON (the
shapes are documented in the initial migration)::

    {"strategy": "list", "delays": [5, 30, 120, 600, 3600]}
    {"strategy": "fixed", "delay": 10}
    {"strategy": "exponential", "base": 1, "factor": 2, "max": 3600, "jitter": 0.1}

A type without one uses the global default from settings (``TASKQ_BACKOFF_*``).
Everything here is pure: the random source is a parameter, so tests are exact.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from taskq._utils import parse_duration
from taskq.settings import Settings

Random: TypeAlias = Callable[[], float]


@dataclass(frozen=True, slots=True)
class ListBackoff:
    """The n-th retry waits ``delays[n-1]``; retries beyond the list wait its last delay."""

    delays: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.delays:
            raise ValueError("a backoff list needs at least one delay")
        if any(delay < 0 for delay in self.delays):
            raise ValueError("backoff delays cannot be negative")

    def delay(self, attempt: int, rand: Random = random.random) -> float:
        """The wait after failed attempt ``attempt`` (1-based)."""
        return self.delays[min(max(attempt, 1), len(self.delays)) - 1]

    def to_json(self) -> dict[str, Any]:
        return {"strategy": "list", "delays": list(self.delays)}


@dataclass(frozen=True, slots=True)
class FixedBackoff:
    """Every retry waits the same ``seconds``."""

    seconds: float

    def __post_init__(self) -> None:
        if self.seconds < 0:
            raise ValueError("a backoff delay cannot be negative")

    def delay(self, attempt: int, rand: Random = random.random) -> float:
        return self.seconds

    def to_json(self) -> dict[str, Any]:
        return {"strategy": "fixed", "delay": self.seconds}


@dataclass(frozen=True, slots=True)
class ExponentialBackoff:
    """Retry n waits ``base * factor**(n-1)``, spread by ±``jitter`` and capped at ``max``.

    Jitter keeps a burst of tasks that failed together (a dependency went
    down) from all coming back in the same second.
    """

    base: float = 1.0
    factor: float = 2.0
    max: float = 3600.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.base < 0 or self.max < 0:
            raise ValueError("backoff base and max cannot be negative")
        if self.factor < 1:
            raise ValueError("the backoff factor must be at least 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("the backoff jitter must be between 0 and 1")

    def delay(self, attempt: int, rand: Random = random.random) -> float:
        exponent = max(attempt, 1) - 1
        # Past the cap the power only overflows; stop computing it there.
        try:
            raw = min(self.max, self.base * self.factor**exponent)
        except OverflowError:
            raw = self.max
        spread = raw * (1.0 + self.jitter * (2.0 * rand() - 1.0))
        return min(self.max, max(0.0, spread))

    def to_json(self) -> dict[str, Any]:
        return {
            "strategy": "exponential",
            "base": self.base,
            "factor": self.factor,
            "max": self.max,
            "jitter": self.jitter,
        }


Backoff: TypeAlias = ListBackoff | FixedBackoff | ExponentialBackoff


def from_json(data: Mapping[str, Any]) -> Backoff:
    """Read a backoff from its JSON shape; durations may be numbers or strings like ``"5s"``.

    Raises:
        ValueError: naming what is wrong.
    """
    strategy = data.get("strategy")
    if strategy == "list":
        delays = data.get("delays")
        if not isinstance(delays, list):
            raise ValueError("a list backoff needs 'delays': a list of durations")
        return ListBackoff(tuple(parse_duration(d) for d in delays))
    if strategy == "fixed":
        if "delay" not in data:
            raise ValueError("a fixed backoff needs 'delay'")
        return FixedBackoff(parse_duration(data["delay"]))
    if strategy == "exponential":
        return ExponentialBackoff(
            base=parse_duration(data.get("base", 1.0)),
            factor=float(data.get("factor", 2.0)),
            max=parse_duration(data.get("max", 3600.0)),
            jitter=float(data.get("jitter", 0.1)),
        )
    raise ValueError(f"unknown backoff strategy {strategy!r}: use list, fixed or exponential")


def coerce(value: Backoff | Mapping[str, Any] | Sequence[float | str] | float | str) -> Backoff:
    """A backoff from the shorthands a handler may give.

    A :class:`Backoff` is returned as is; a mapping is read by :func:`from_json`;
    a list of durations is a list backoff; a single duration is a fixed backoff.

    Raises:
        ValueError: for anything else.
    """
    if isinstance(value, ListBackoff | FixedBackoff | ExponentialBackoff):
        return value
    if isinstance(value, Mapping):
        return from_json(value)
    if isinstance(value, str | int | float):
        return FixedBackoff(parse_duration(value))
    return ListBackoff(tuple(parse_duration(d) for d in value))


def from_settings(settings: Settings) -> Backoff:
    """The global default backoff (``TASKQ_BACKOFF_STRATEGY`` and friends)."""
    if settings.backoff_strategy == "fixed":
        return FixedBackoff(settings.backoff_fixed)
    if settings.backoff_strategy == "exponential":
        return ExponentialBackoff(
            base=settings.backoff_base,
            factor=settings.backoff_factor,
            max=settings.backoff_max,
            jitter=settings.backoff_jitter,
        )
    return ListBackoff(tuple(settings.backoffs))
