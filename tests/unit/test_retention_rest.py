"""How long retention rests once caught up: short retentions are not outlived by 30 s."""

from __future__ import annotations

import pytest

from taskq.fleet.sweeper import RETENTION_EVERY, retention_rest


@pytest.mark.parametrize(
    ("retention", "rest"),
    [
        (7 * 86400.0, RETENTION_EVERY),  # the default: 30 s
        (120.0, RETENTION_EVERY),
        (60.0, 15.0),  # a quarter
        (6.0, 1.5),
        (2.0, 1.0),  # at least a second
        (0.0, RETENTION_EVERY),  # keep everything: only the worker list is pruned
    ],
)
def test_retention_rests_a_quarter_of_a_short_retention(retention: float, rest: float) -> None:
    assert retention_rest(retention) == rest
