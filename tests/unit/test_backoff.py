"""Backoff strategies: pure functions, exact with a fixed random source."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from taskq import backoff
from taskq.backoff import ExponentialBackoff, FixedBackoff, ListBackoff
from tests.support.services import make_settings


def test_list_walks_the_delays_and_repeats_the_last() -> None:
    strategy = ListBackoff((5.0, 30.0, 120.0))
    assert [strategy.delay(n) for n in range(1, 6)] == [5.0, 30.0, 120.0, 120.0, 120.0]
    assert strategy.delay(0) == 5.0  # defensive: an attempt number below 1


def test_fixed_is_constant() -> None:
    assert {FixedBackoff(1.5).delay(n) for n in range(1, 10)} == {1.5}


def test_exponential_grows_and_caps() -> None:
    strategy = ExponentialBackoff(base=1, factor=2, max=10, jitter=0)
    assert [strategy.delay(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    # Far beyond the cap the power would overflow a float; it must not raise.
    assert strategy.delay(5000) == 10


@pytest.mark.parametrize(("rand", "expected"), [(0.0, 3.6), (0.5, 4.0), (1.0, 4.4)])
def test_exponential_jitter_spreads_both_ways(rand: float, expected: float) -> None:
    strategy = ExponentialBackoff(base=1, factor=2, max=100, jitter=0.1)
    assert strategy.delay(3, lambda: rand) == pytest.approx(expected)


def test_jitter_never_exceeds_the_cap() -> None:
    strategy = ExponentialBackoff(base=1, factor=2, max=8, jitter=0.5)
    assert strategy.delay(10, lambda: 1.0) == 8


@pytest.mark.parametrize(
    "strategy",
    [ListBackoff((1.0, 2.0)), FixedBackoff(3.0), ExponentialBackoff(2.0, 3.0, 60.0, 0.2)],
)
def test_json_round_trip(strategy: backoff.Backoff) -> None:
    assert backoff.from_json(strategy.to_json()) == strategy


def test_from_json_reads_duration_strings() -> None:
    assert backoff.from_json({"strategy": "list", "delays": ["5s", "2m"]}) == ListBackoff(
        (5.0, 120.0)
    )
    assert backoff.from_json({"strategy": "fixed", "delay": "500ms"}) == FixedBackoff(0.5)
    assert backoff.from_json({"strategy": "exponential"}) == ExponentialBackoff()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"strategy": "linear"}, "unknown backoff strategy"),
        ({"strategy": "list", "delays": []}, "at least one delay"),
        ({"strategy": "list"}, "needs 'delays'"),
        ({"strategy": "fixed"}, "needs 'delay'"),
        ({"strategy": "fixed", "delay": "soon"}, "not a duration"),
        ({"strategy": "exponential", "factor": 0.5}, "factor"),
        ({"strategy": "exponential", "jitter": 2}, "jitter"),
    ],
)
def test_from_json_rejects_bad_shapes(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        backoff.from_json(data)


def test_coerce_accepts_shorthands() -> None:
    assert backoff.coerce(2) == FixedBackoff(2.0)
    assert backoff.coerce("1m") == FixedBackoff(60.0)
    assert backoff.coerce([1, "10s"]) == ListBackoff((1.0, 10.0))
    assert backoff.coerce({"strategy": "fixed", "delay": 3}) == FixedBackoff(3.0)
    exponential = ExponentialBackoff()
    assert backoff.coerce(exponential) is exponential


def test_global_default_comes_from_settings() -> None:
    assert backoff.from_settings(make_settings()) == ListBackoff((5.0, 30.0, 120.0, 600.0, 3600.0))
    fixed = make_settings(backoff_strategy="fixed", backoff_fixed="2s")
    assert backoff.from_settings(fixed) == FixedBackoff(2.0)
    exponential = make_settings(
        backoff_strategy="exponential", backoff_base=2, backoff_factor=3, backoff_max="1m"
    )
    assert backoff.from_settings(exponential) == ExponentialBackoff(2.0, 3.0, 60.0, 0.1)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ListBackoff(()), "at least one delay"),
        (lambda: ListBackoff((1.0, -1.0)), "negative"),
        (lambda: FixedBackoff(-0.5), "negative"),
        (lambda: ExponentialBackoff(base=-1), "negative"),
        (lambda: ExponentialBackoff(max=-1), "negative"),
        (lambda: ExponentialBackoff(factor=0.9), "factor"),
        (lambda: ExponentialBackoff(jitter=-0.1), "jitter"),
    ],
)
def test_strategies_refuse_what_no_wait_can_be(
    make: Callable[[], backoff.Backoff], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_the_default_random_source_keeps_within_the_jitter() -> None:
    strategy = ExponentialBackoff(base=10, factor=1, max=100, jitter=0.2)
    delays = [strategy.delay(1) for _ in range(500)]
    assert all(8.0 <= d <= 12.0 for d in delays)
    assert len(set(delays)) > 1  # spread, not one value


def test_a_coerce_of_what_is_no_duration_is_refused() -> None:
    with pytest.raises(ValueError):
        backoff.coerce("soon")
    with pytest.raises(ValueError):
        backoff.coerce([1, "later"])
