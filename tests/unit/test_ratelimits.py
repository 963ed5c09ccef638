"""The GCRA arithmetic of rate limits (taskq.ratelimits.slots, the claim's reference)
and the checks of a rate limit's JSON shape."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from taskq import ratelimits
from taskq.handlers import HandlerError, Registry
from taskq.ratelimits import RateLimit, slots

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def ms(value: timedelta) -> float:
    return round(value.total_seconds() * 1000, 6)


def test_an_unused_bucket_starts_one_now_and_spaces_the_rest() -> None:
    starts, tat = slots(None, NOW, 4, RateLimit(50, 1.0))
    assert [ms(s - NOW) for s in starts] == [0, 20, 40, 60]
    assert ms(tat - NOW) == 80


def test_a_busy_bucket_continues_from_its_tat() -> None:
    starts, tat = slots(NOW + timedelta(milliseconds=30), NOW, 2, RateLimit(10, 1.0))
    assert [ms(s - NOW) for s in starts] == [30, 130]
    assert ms(tat - NOW) == 230


def test_an_idle_bucket_forgets_its_past() -> None:
    # A tat long passed is as good as none: no credit piles up.
    starts, tat = slots(NOW - timedelta(hours=1), NOW, 3, RateLimit(10, 1.0))
    assert [ms(s - NOW) for s in starts] == [0, 100, 200]
    assert ms(tat - NOW) == 300


def test_a_burst_lets_so_many_start_at_once() -> None:
    starts, _ = slots(None, NOW, 5, RateLimit(10, 1.0, burst=3))
    assert [ms(s - NOW) for s in starts] == [0, 0, 0, 100, 200]


def test_batches_one_after_another_match_one_batch() -> None:
    """Taking 3 then 2 slots gives what taking 5 at once does (the claim takes a
    bucket's slots for a whole batch in one update)."""
    limit = RateLimit(100, 60.0, burst=4)
    together, tat_together = slots(None, NOW, 5, limit)
    first, tat = slots(None, NOW, 3, limit)
    second, tat = slots(tat, NOW, 2, limit)
    assert first + second == together and tat == tat_together


@pytest.mark.parametrize(("limit", "burst"), [(50, 1), (7, 3), (1000, 10)])
def test_no_window_of_per_holds_more_than_limit_plus_burst(limit: int, burst: int) -> None:
    rate = RateLimit(limit, 1.0, burst=burst)
    starts, tat = slots(None, NOW, limit, rate)
    more, _ = slots(tat, NOW + timedelta(seconds=0.5), 2 * limit, rate)
    every = sorted(starts + more)
    window = timedelta(seconds=1)
    most = max(sum(1 for s in every if t <= s < t + window) for t in every)
    assert most <= limit + burst


def test_the_json_shape_is_checked_field_by_field() -> None:
    assert ratelimits.parse({"limit": 100, "per": "1m"}) == RateLimit(100, 60.0)
    assert ratelimits.parse({"limit": 5, "per": 0.5, "burst": 5, "key": "customer_id"}) == (
        RateLimit(5, 0.5, 5, "customer_id")
    )
    bad = {"limit": 0, "per": "soon", "burst": 0, "key": "a b", "extra": 1}
    fields = [e.field for e in ratelimits.problems(bad, "rate_limit")]
    assert fields == [
        "rate_limit.extra",
        "rate_limit.limit",
        "rate_limit.per",
        "rate_limit.burst",
        "rate_limit.key",
    ]
    assert [e.field for e in ratelimits.problems({"limit": 2, "per": 0}, "")] == ["per"]
    assert [e.field for e in ratelimits.problems({"limit": True, "per": 1}, "")] == ["limit"]
    assert [e.field for e in ratelimits.problems({"limit": 2.5, "per": 1}, "")] == ["limit"]
    # JSON has one number type: 3.0 is the integer 3, as JSON Schema says.
    assert ratelimits.parse({"limit": 3.0, "per": 1, "burst": 2.0}) == RateLimit(3, 1.0, 2)
    assert [e.field for e in ratelimits.problems([], "")] == ["body"]
    assert [e.field for e in ratelimits.problems({"limit": 2, "per": "31d"}, "")] == ["per"]
    with pytest.raises(ValueError, match="burst"):
        ratelimits.parse({"limit": 2, "per": 1, "burst": 3})


def test_the_decorator_takes_a_limit_or_a_limiters_name() -> None:
    registry = Registry()

    @registry.task("a.v1", rate_limit={"limit": 100, "per": "1m"})
    async def a(payload: dict[str, object], ctx: object) -> None: ...

    @registry.task("b.v1", rate_limit="stripe")
    async def b(payload: dict[str, object], ctx: object) -> None: ...

    assert registry.get("a.v1").rate_limit == RateLimit(100, 60.0)
    assert registry.get("b.v1").rate_limit == "stripe"
    with pytest.raises(HandlerError, match="rate_limit"):
        registry.task("c.v1", rate_limit={"limit": 1})
    with pytest.raises(HandlerError, match="limiter name"):
        registry.task("d.v1", rate_limit="no spaces")
