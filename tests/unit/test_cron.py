"""Cron expressions: parsing, refusals, and fire times across daylight-saving changes."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from taskq import cron
from taskq.errors import CronProblem

PARIS = ZoneInfo("Europe/Paris")
# 2026 in Paris: the clocks jump from 02:00 to 03:00 on 29 March and go back from
# 03:00 to 02:00 on 25 October.
SPRING = datetime(2026, 3, 29, tzinfo=PARIS)
AUTUMN = datetime(2026, 10, 25, tzinfo=PARIS)


def fires(expression: str, after: datetime, count: int, zone: ZoneInfo = PARIS) -> list[str]:
    """The next ``count`` fires, as local times with their offsets."""
    found = itertools.islice(cron.parse(expression).fires(after, zone), count)
    return [f.astimezone(zone).isoformat(timespec="minutes") for f in found]


def test_every_five_minutes() -> None:
    after = datetime(2026, 5, 4, 10, 2, tzinfo=UTC)
    assert fires("*/5 * * * *", after, 3, ZoneInfo("UTC")) == [
        "2026-05-04T10:05+00:00",
        "2026-05-04T10:10+00:00",
        "2026-05-04T10:15+00:00",
    ]


def test_next_fire_is_strictly_after() -> None:
    after = datetime(2026, 5, 4, 10, 5, tzinfo=UTC)
    fire = cron.parse("*/5 * * * *").next_fire(after, ZoneInfo("UTC"))
    assert fire == datetime(2026, 5, 4, 10, 10, tzinfo=UTC)
    assert fire.tzinfo is UTC or fire.utcoffset() == timedelta(0)


def test_lists_ranges_steps_and_names() -> None:
    parsed = cron.parse("0,30 9-17/4 * jan-mar mon-fri")
    assert parsed.minutes == (0, 30)
    assert parsed.hours == (9, 13, 17)
    assert parsed.months == {1, 2, 3}
    assert parsed.weekdays == {0, 1, 2, 3, 4}
    assert cron.parse("5/20 * * * *").minutes == (5, 25, 45)


@pytest.mark.parametrize("sunday", ["0", "7", "sun", "SUN"])
def test_sunday_is_0_or_7(sunday: str) -> None:
    assert cron.parse(f"0 0 * * {sunday}").weekdays == {6}


@pytest.mark.parametrize(
    ("macro", "same_as"),
    [
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("@monthly", "0 0 1 * *"),
        ("@weekly", "0 0 * * 0"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@hourly", "0 * * * *"),
    ],
)
def test_macros(macro: str, same_as: str) -> None:
    after = datetime(2026, 5, 4, 10, 2, tzinfo=UTC)
    assert fires(macro, after, 3) == fires(same_as, after, 3)


def test_day_of_month_or_day_of_week_when_both_are_restricted() -> None:
    # The 13th of each month, and every Friday (Vixie cron's "or").
    after = datetime(2026, 2, 1, tzinfo=UTC)
    assert [f[:10] for f in fires("0 12 13 * fri", after, 5, ZoneInfo("UTC"))] == [
        "2026-02-06",
        "2026-02-13",
        "2026-02-20",
        "2026-02-27",
        "2026-03-06",
    ]


def test_day_of_month_and_a_star_day_of_week() -> None:
    after = datetime(2026, 2, 1, tzinfo=UTC)
    assert [f[:10] for f in fires("0 0 31 * *", after, 3, ZoneInfo("UTC"))] == [
        "2026-03-31",
        "2026-05-31",
        "2026-07-31",
    ]


def test_leap_day() -> None:
    after = datetime(2026, 1, 1, tzinfo=UTC)
    assert fires("0 0 29 2 *", after, 2, ZoneInfo("UTC")) == [
        "2028-02-29T00:00+00:00",
        "2032-02-29T00:00+00:00",
    ]


def test_time_zone_offset_applies() -> None:
    after = datetime(2026, 7, 1, tzinfo=UTC)
    fire = cron.parse("0 9 * * *").next_fire(after, PARIS)
    assert fire == datetime(2026, 7, 1, 7, 0, tzinfo=UTC)  # 09:00 CEST


# Spring forward: 02:00-02:59 does not exist on 29 March 2026 in Paris.


def test_fixed_time_in_the_skipped_hour_fires_once_at_the_jump() -> None:
    assert fires("30 2 * * *", SPRING - timedelta(days=1), 3) == [
        "2026-03-28T02:30+01:00",
        "2026-03-29T03:00+02:00",
        "2026-03-30T02:30+02:00",
    ]


def test_fixed_times_in_the_skipped_hour_fire_once_together() -> None:
    # 02:00, 02:15 and 02:45 all map to the jump: one fire, then 03:15 as usual.
    assert fires("0,15,45 2,3 * * *", SPRING, 4) == [
        "2026-03-29T03:00+02:00",
        "2026-03-29T03:15+02:00",
        "2026-03-29T03:45+02:00",
        "2026-03-30T02:00+02:00",
    ]


def test_every_fifteen_minutes_follows_the_clock_over_the_jump() -> None:
    after = SPRING + timedelta(hours=1, minutes=40)  # 01:40 CET
    assert fires("*/15 * * * *", after, 3) == [
        "2026-03-29T01:45+01:00",
        "2026-03-29T03:00+02:00",
        "2026-03-29T03:15+02:00",
    ]


# Fall back: 02:00-02:59 happens twice on 25 October 2026 in Paris.


def test_fixed_time_in_the_repeated_hour_fires_once() -> None:
    assert fires("30 2 * * *", AUTUMN, 2) == [
        "2026-10-25T02:30+02:00",
        "2026-10-26T02:30+01:00",
    ]


def test_every_thirty_minutes_fires_in_both_passes_of_the_repeated_hour() -> None:
    after = AUTUMN + timedelta(hours=1, minutes=40)  # 01:40 CEST
    assert fires("*/30 * * * *", after, 6) == [
        "2026-10-25T02:00+02:00",
        "2026-10-25T02:30+02:00",
        "2026-10-25T02:00+01:00",
        "2026-10-25T02:30+01:00",
        "2026-10-25T03:00+01:00",
        "2026-10-25T03:30+01:00",
    ]


def test_fires_from_inside_the_second_pass() -> None:
    # 02:10 CET, the second pass: the next fire is 02:30 CET, not 02:30 CEST (past).
    after = datetime(2026, 10, 25, 1, 10, tzinfo=UTC)
    assert fires("*/30 * * * *", after, 1) == ["2026-10-25T02:30+01:00"]
    assert fires("30 2 * * *", after, 1) == ["2026-10-26T02:30+01:00"]


def test_every_fire_of_a_day_is_an_hour_apart_across_both_changes() -> None:
    for day in (SPRING, AUTUMN):
        found = list(itertools.islice(cron.parse("0 * * * *").fires(day, PARIS), 30))
        gaps = {b - a for a, b in itertools.pairwise(found)}
        assert gaps == {timedelta(hours=1)}


def test_naive_after_is_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        cron.parse("* * * * *").next_fire(datetime(2026, 1, 1), PARIS)


@pytest.mark.parametrize(
    ("expression", "field", "says"),
    [
        ("", "", "needs 5 fields"),
        ("* * * *", "", "got 4"),
        ("* * * * * *", "", "got 6"),
        ("60 * * * *", "minute", "out of range 0-59"),
        ("* 24 * * *", "hour", "out of range 0-23"),
        ("* * 0 * *", "day of month", "out of range 1-31"),
        ("* * * 13 *", "month", "out of range 1-12"),
        ("* * * * 8", "day of week", "out of range 0-7"),
        ("5-1 * * * *", "minute", "runs backwards"),
        ("*/0 * * * *", "minute", "out of range 1-60"),
        ("1,,2 * * * *", "minute", "empty item"),
        ("a * * * *", "minute", "not a number"),
        ("-1 * * * *", "minute", "not a number"),
        ("\u0661 * * * *", "minute", "not a number"),  # an Arabic-Indic digit
        ("* * * foo *", "month", "not a number"),
        ("0 0 30 2 *", "day of month", "never fires"),
        ("0 0 31 4,6,9,11 *", "day of month", "never fires"),
        ("@often", "", "unknown macro"),
        ("0" * 300, "", "at most 200 characters"),
    ],
)
def test_refused(expression: str, field: str, says: str) -> None:
    with pytest.raises(CronProblem, match=says) as caught:
        cron.parse(expression)
    assert caught.value.field == field


def test_not_a_string() -> None:
    with pytest.raises(CronProblem, match="must be a string"):
        cron.parse(5)  # type: ignore[arg-type]


def test_feb_30_fires_when_day_of_week_is_restricted_too() -> None:
    # "or": every Monday, since 30 February never comes.
    after = datetime(2026, 2, 1, tzinfo=UTC)
    assert len(fires("0 0 30 2 mon", after, 4, ZoneInfo("UTC"))) == 4


def test_zones() -> None:
    assert cron.zone("Europe/Paris") == PARIS
    for bad in ("Mars/Olympus", "../../etc/passwd", "", "x" * 100, 7):
        with pytest.raises(CronProblem) as caught:
            cron.zone(bad)  # type: ignore[arg-type]
        assert caught.value.field == "timezone"


@pytest.mark.parametrize(
    "expression",
    ["*/7 * * * *", "0 */5 * * *", "15 3,15 * * mon-fri", "0 0 1,15 * 0", "*/20 9-11 10-12 * *"],
)
def test_matches_a_minute_by_minute_scan(expression: str) -> None:
    parsed = cron.parse(expression)
    start = datetime(2026, 3, 9, 23, 50, tzinfo=UTC)
    scanned = []
    minute = start + timedelta(minutes=1)
    while minute < start + timedelta(days=8):
        day_ok = parsed.matches_day(minute.date())
        if day_ok and minute.hour in parsed.hours and minute.minute in parsed.minutes:
            scanned.append(minute)
        minute += timedelta(minutes=1)
    found = list(itertools.islice(parsed.fires(start, ZoneInfo("UTC")), len(scanned)))
    assert scanned
    assert found == scanned
