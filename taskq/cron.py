"""Cron expressions: parsing, and the fire times of a schedule in its time zone.

Five fields, as in Vixie cron: minute (0-59), hour (0-23), day of month (1-31),
month (1-12 or ``jan``-``dec``) and day of week (0-7 or ``sun``-``sat``; 0 and
7 are Sunday). Each field is ``*``, a value, a range ``a-b``, any of those with
a step (``*/5``, ``10-50/20``, ``5/15`` meaning ``5-max/15``), or a
comma-separated list of them. ``@yearly`` (``@annually``), ``@monthly``,
``@weekly``, ``@daily`` (``@midnight``) and ``@hourly`` stand for their usual
expressions. When both day of month and day of week are restricted, a day
matches if either does (Vixie cron's rule).

Times are wall-clock times in the schedule's zone, so daylight-saving changes
follow cron's custom (cronie's):

- a fixed-time schedule (its hour field is not ``*``) whose time falls in the
  hour that the clocks skip fires at the moment of the jump, once; one whose
  time occurs twice fires at the first occurrence only;
- a schedule whose hour field starts with ``*`` (``*``, ``*/2``) follows the real
  clock: nothing in the skipped hour, and both passes of a repeated hour.

:func:`parse` refuses an expression that can never fire (``0 0 30 2 *``). The
parser reads a bounded input in one pass: an expression is at most
:data:`MAX_LENGTH` characters.
"""

from __future__ import annotations

import calendar
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from taskq.errors import CronProblem

MAX_LENGTH = 200
# How far ahead a fire is looked for: the rarest schedule that parse() accepts
# (29 February on a given weekday, with both day fields restricted it is an
# "or") fires within 8 years; a bound keeps a bug from looping forever.
_SEARCH_DAYS = 8 * 366 + 1

_FIELDS = (
    # name, low, high, names
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, tuple(m.lower() for m in calendar.month_abbr[1:])),
    ("day of week", 0, 7, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")),
)
_MONTH_OFFSET = 1  # "jan" is 1
_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
# The longest month of each month (February in a leap year).
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


@dataclass(frozen=True, slots=True)
class Cron:
    """A parsed cron expression: the values each field allows."""

    text: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Monday, as date.weekday()
    days_restricted: bool
    weekdays_restricted: bool
    hourly: bool  # the hour field starts with "*": follows the real clock across DST changes

    def matches_day(self, day: date) -> bool:
        """Whether a fire may happen on ``day`` (a local date)."""
        if day.month not in self.months:
            return False
        in_days = day.day in self.days
        in_weekdays = day.weekday() in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return in_days or in_weekdays
        return in_days and in_weekdays

    def next_fire(self, after: datetime, zone: tzinfo) -> datetime:
        """The first fire strictly after ``after`` (aware), as an aware UTC time."""
        return next(self.fires(after, zone))

    def fires(self, after: datetime, zone: tzinfo) -> Iterator[datetime]:
        """The fires strictly after ``after`` (aware), in order, as aware UTC times."""
        if after.tzinfo is None:
            raise ValueError("after must be an aware datetime")
        after = after.astimezone(UTC)
        # Start a day early: a local time of the day before may still lie ahead
        # of `after` when the zone's offset changed in between.
        day = after.astimezone(zone).date() - timedelta(days=1)
        for _ in range(_SEARCH_DAYS):
            next_midnight = datetime.combine(day + timedelta(days=1), time()).replace(tzinfo=zone)
            if next_midnight > after and self.matches_day(day):
                for fire in self._fires_on(day, zone, after):
                    if fire > after:
                        yield fire
            day += timedelta(days=1)
        raise RuntimeError(f"cron {self.text!r}: no fire found within {_SEARCH_DAYS} days")

    def _fires_on(self, day: date, zone: tzinfo, after: datetime) -> Iterator[datetime]:
        midnight = datetime.combine(day, time()).replace(tzinfo=zone)
        offset = midnight.utcoffset()
        if offset is not None and (midnight + timedelta(days=1)).utcoffset() == offset:
            # No change of offset that day: local order is time order.
            local_after = after.astimezone(zone)
            first_hour = local_after.hour if local_after.date() == day else 0
            for hour in self.hours:
                if hour < first_hour:
                    continue
                for minute in self.minutes:
                    yield (datetime.combine(day, time(hour, minute)) - offset).replace(tzinfo=UTC)
            return
        # The day of a change: each instant once (several skipped times map to
        # the jump), sorted (the two passes of a repeated hour interleave).
        yield from sorted(
            {
                fire
                for hour in self.hours
                for minute in self.minutes
                for fire in self._instants(datetime.combine(day, time(hour, minute)), zone)
            }
        )

    def _instants(self, local: datetime, zone: tzinfo) -> tuple[datetime, ...]:
        """The UTC instants at which the naive local time ``local`` fires."""
        first = local.replace(tzinfo=zone, fold=0).astimezone(UTC)
        second = local.replace(tzinfo=zone, fold=1).astimezone(UTC)
        if first == second:
            return (first,)
        if _exists(local, zone):  # it occurs twice (the clocks went back)
            return (first, second) if self.hourly else (first,)
        # It does not exist (the clocks jumped over it).
        if self.hourly:
            return ()
        return (_after_gap(local, zone),)


def _exists(local: datetime, zone: tzinfo) -> bool:
    aware = local.replace(tzinfo=zone)
    return aware.astimezone(UTC).astimezone(zone).replace(tzinfo=None) == local


def _after_gap(local: datetime, zone: tzinfo) -> datetime:
    """The instant the clocks jumped over ``local``: the first local time after it that exists."""
    probe = local
    for _ in range(24 * 60):
        probe += timedelta(minutes=1)
        if _exists(probe, zone):
            # The jump happened at the start of this minute, or earlier within it
            # for zones whose changes are not on a minute; the minute's start is the
            # jump for every zone in use.
            return probe.replace(tzinfo=zone).astimezone(UTC)
    raise RuntimeError(f"no local time after {local} exists in {zone}")  # pragma: no cover


def parse(text: str) -> Cron:
    """Parse a cron expression; :class:`CronProblem` says what is wrong and where."""
    if not isinstance(text, str):
        raise CronProblem("", "must be a string")
    if len(text) > MAX_LENGTH:
        raise CronProblem("", f"at most {MAX_LENGTH} characters")
    expression = text.strip()
    if expression.startswith("@"):
        macro = _MACROS.get(expression.lower())
        if macro is None:
            raise CronProblem("", f"unknown macro {expression!r}; known: {', '.join(_MACROS)}")
        expression = macro
    parts = expression.split()
    if len(parts) != len(_FIELDS):
        raise CronProblem(
            "", f"needs 5 fields (minute hour day-of-month month day-of-week), got {len(parts)}"
        )
    values = [
        _field(part, name, low, high, names)
        for part, (name, low, high, names) in zip(parts, _FIELDS, strict=True)
    ]
    minutes, hours, days, months, weekdays = values
    cron = Cron(
        text=text.strip(),
        minutes=tuple(sorted(minutes)),
        hours=tuple(sorted(hours)),
        days=frozenset(days),
        months=frozenset(months),
        # cron's 0 and 7 are Sunday; date.weekday() says 6.
        weekdays=frozenset((w - 1) % 7 for w in weekdays),
        # As in Vixie cron, a field that starts with "*" ("*/2" too) is unrestricted.
        days_restricted=not parts[2].startswith("*"),
        weekdays_restricted=not parts[4].startswith("*"),
        hourly=parts[1].startswith("*"),
    )
    if not (cron.days_restricted and cron.weekdays_restricted) and not any(
        day <= _MONTH_DAYS[month - 1] for month in cron.months for day in cron.days
    ):
        raise CronProblem("day of month", "never fires: no chosen month has such a day")
    return cron


def _field(part: str, name: str, low: int, high: int, names: tuple[str, ...]) -> set[int]:
    chosen: set[int] = set()
    for item in part.split(","):
        if not item:
            raise CronProblem(name, f"empty item in {part!r}")
        chosen.update(_item(item, name, low, high, names))
    return chosen


def _item(item: str, name: str, low: int, high: int, names: tuple[str, ...]) -> range:
    span, slash, step_text = item.partition("/")
    step = 1
    if slash:
        step = _number(step_text, name, 1, high - low + 1, ())
    if span == "*":
        first, last = low, high
    elif "-" in span:
        start, _, end = span.partition("-")
        first = _number(start, name, low, high, names)
        last = _number(end, name, low, high, names)
        if last < first:
            raise CronProblem(name, f"range {span!r} runs backwards")
    else:
        first = _number(span, name, low, high, names)
        # "5/15" is "5-max/15"; a bare value is itself.
        last = high if slash else first
    return range(first, last + 1, step)


def _number(text: str, name: str, low: int, high: int, names: tuple[str, ...]) -> int:
    word = text.lower()
    if word in names:
        return names.index(word) + (_MONTH_OFFSET if name == "month" else 0)
    if not text.isascii() or not text.isdigit() or len(text) > 2:
        raise CronProblem(name, f"{text!r} is not a number from {low} to {high}")
    value = int(text)
    if not low <= value <= high:
        raise CronProblem(name, f"{value} is out of range {low}-{high}")
    return value


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name`` (``Europe/Paris``, ``UTC``); :class:`CronProblem` if unknown."""
    if not isinstance(name, str) or not 0 < len(name) <= 64 or not name.isascii():
        raise CronProblem("timezone", "must be an IANA time zone name such as Europe/Paris")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise CronProblem("timezone", f"unknown time zone {name!r}") from exc
