"""Rate limits: at most ``limit`` starts per ``per`` for the tasks of a type.

A type has a limit of its own (``@handlers.task(..., rate_limit={"limit": 100,
"per": "1m"})`` or ``rate_limit`` in ``PUT /types/{name}``), or names a limiter
that several types share (``PUT /limits/{name}``, ``rate_limit="stripe"``). With
``key`` (a top-level payload field) each value of the field has a bucket of its own,
e.g. one per customer.

The worker's ``claim_gated`` statement enforces them by GCRA (the generic cell
rate algorithm; sql/migrations/0012_rate_limits.sql): a bucket keeps a theoretical
arrival time ``tat``; the next start is ``max(now, tat - tolerance)`` and each
start moves ``tat`` on by ``spacing = per / limit``. A task whose slot is later
than now keeps it as a reservation (``limited_until``): its ``run_at`` moves
:data:`CLAIM_AHEAD_SECONDS` before it, when it is claimed without taking a second
slot, and its worker starts it at the slot. A new task takes a slot only within
:data:`HOLD_SECONDS` (the deliveries a worker holds); one whose slot would be
later waits without one (sql/migrations/0018_rate_limit_waits.sql): its
``run_at`` moves to about when its slot would be (the bucket's ``promised``), its
delivery goes through the delay levels, and back then it takes the next slot,
however far. So a delivery never holds a slot it cannot be back for: sent back
while its work queue has a backlog, it would come back behind it. :func:`slots`
is the GCRA arithmetic in Python (the statement's reference, tested against it).

With ``burst`` 1 (the default) starts are evenly spaced, so any window of ``per``
seconds holds at most ``limit`` + 1 starts (the one at each end); ``burst`` b lets
b start at once after an idle spell, and a window then holds at most
``limit`` + b starts. A reservation claimed more than one spacing late (a stalled
worker) takes the next slot rather than start late, which keeps those bounds.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from taskq._utils import parse_duration
from taskq.errors import FieldError

LIMITER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
KEY_FIELD = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
MAX_LIMIT = 1_000_000
MAX_PER = 30 * 86400.0
# How many limiters an operator may create (a type's own are bounded by the types).
MAX_LIMITERS = 1000
OWN_PREFIX = "type:"
# A worker holds (unacked) an early or limited delivery due within this many seconds,
# and sends a later one back through the delay levels. The claim gives a new task a
# slot only within it (see the module's docstring).
HOLD_SECONDS = 1.25
# A task holding a slot is claimed this long before it, and its worker starts it at
# the slot: a claim at the slot would start it late by the claim's own time.
CLAIM_AHEAD_SECONDS = 0.5


@dataclass(frozen=True, slots=True)
class RateLimit:
    """``limit`` starts per ``per`` seconds, ``burst`` at once, one bucket per value
    of payload field ``key`` (None: one bucket)."""

    limit: int
    per: float
    burst: int = 1
    key: str | None = None

    @property
    def spacing(self) -> float:
        """Seconds between two starts of one bucket."""
        return self.per / self.limit

    @property
    def tolerance(self) -> float:
        """How far before ``tat`` a start may be (GCRA's burst tolerance), in seconds."""
        return (self.burst - 1) * self.spacing

    def to_json(self) -> dict[str, Any]:
        return {"limit": self.limit, "per": self.per, "burst": self.burst, "key": self.key}


def own_limiter(type_name: str) -> str:
    """The name of a type's own limiter."""
    return OWN_PREFIX + type_name


def parse(value: object, field: str = "rate_limit") -> RateLimit:
    """A rate limit from its JSON shape ``{"limit", "per", "burst"?, "key"?}``, ``per``
    in seconds or a duration such as ``"1m"``.

    Raises:
        ValueError: its message names the field at fault.
    """
    errors = problems(value, field)
    if errors:
        raise ValueError("; ".join(f"{e.field}: {e.message}" for e in errors))
    assert isinstance(value, Mapping)
    limit, burst = _whole(value["limit"]), _whole(value.get("burst", 1))
    assert limit is not None and burst is not None
    return RateLimit(limit, parse_duration(value["per"]), burst, value.get("key"))


def problems(value: object, field: str) -> list[FieldError]:
    """What is wrong with a rate limit's JSON shape, each naming its field (``field``
    "": the request body is the rate limit)."""
    if not isinstance(value, Mapping):
        return [FieldError(field or "body", 'an object {"limit": N, "per": "1m"}')]

    def at(name: str) -> str:
        return f"{field}.{name}" if field else name

    errors = []
    unknown = sorted(set(value) - {"limit", "per", "burst", "key"})
    if unknown:
        errors.append(FieldError(at(unknown[0]), "unknown field"))
    limit = _whole(value.get("limit"))
    if limit is None or not 1 <= limit <= MAX_LIMIT:
        limit = None
        errors.append(FieldError(at("limit"), f"an integer from 1 to {MAX_LIMIT}"))
    per = None
    with contextlib.suppress(ValueError, TypeError):
        per = parse_duration(value.get("per"))  # type: ignore[arg-type]
    if per is None or not 0 < per <= MAX_PER:
        errors.append(
            FieldError(at("per"), "a duration up to 30 days: seconds, or e.g. 500ms, 1s, 1m")
        )
    burst = _whole(value.get("burst", 1))
    if burst is None or not 1 <= burst <= (limit or MAX_LIMIT):
        errors.append(FieldError(at("burst"), "an integer from 1 to limit"))
    key = value.get("key")
    if key is not None and not (isinstance(key, str) and KEY_FIELD.match(key)):
        errors.append(FieldError(at("key"), "a payload field name (letters, digits, ._-)"))
    return errors


def _whole(value: object) -> int | None:
    """An integer given as JSON gives it (``3`` or ``3.0``); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def slots(
    tat: datetime | None, now: datetime, count: int, limit: RateLimit
) -> tuple[list[datetime], datetime]:
    """The start slots of ``count`` tasks taken from a bucket at ``now``, and its new
    ``tat`` (``tat`` None: a bucket not used yet).

    Task i (from 0) starts at ``max(now, A + i * spacing - tolerance)`` where
    ``A = max(tat, now)``; the new ``tat`` is ``A + count * spacing``. A slot equal
    to ``now`` starts now; a later one is a reservation.
    """
    spacing = timedelta(seconds=limit.spacing)
    tolerance = timedelta(seconds=limit.tolerance)
    start = now if tat is None else max(tat, now)
    return (
        [max(now, start + i * spacing - tolerance) for i in range(count)],
        start + count * spacing,
    )
