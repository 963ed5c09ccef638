"""The worker's sizes at their defaults: they follow the concurrency (no service needed)."""

from __future__ import annotations

import pytest

from taskq import cli
from taskq.errors import ConfigError
from taskq.handlers import Registry
from taskq.settings import load_settings
from taskq.worker.worker import DEFAULT_THREADS, Worker


def worker(monkeypatch: pytest.MonkeyPatch, **kwargs: float | str) -> Worker:
    for key in (
        "TASKQ_WORKER_CONCURRENCY",
        "TASKQ_WORKER_PREFETCH",
        "TASKQ_WORKER_THREADS",
        "TASKQ_WORKER_INLINE_WINDOW",
    ):
        monkeypatch.delenv(key, raising=False)
    env = {k: v for k, v in kwargs.items() if k.startswith("TASKQ_")}
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    args = {k: v for k, v in kwargs.items() if not k.startswith("TASKQ_")}
    return Worker(load_settings(_env_file=None), Registry(), **args)  # type: ignore[arg-type]


def test_defaults_buffer_and_thread_as_many_as_the_concurrency(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    w = worker(monkeypatch)
    assert (w.concurrency, w.prefetch, w.threads) == (100, 100, DEFAULT_THREADS)


def test_prefetch_and_threads_follow_a_chosen_concurrency(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (
        worker(monkeypatch, concurrency=8).prefetch,
        worker(monkeypatch, concurrency=8).threads,
    ) == (8, 8)
    w = worker(monkeypatch, TASKQ_WORKER_CONCURRENCY=500)
    assert (w.prefetch, w.threads) == (500, DEFAULT_THREADS)


def test_explicit_sizes_win(monkeypatch: pytest.MonkeyPatch) -> None:
    w = worker(monkeypatch, TASKQ_WORKER_PREFETCH=7, TASKQ_WORKER_THREADS=64)
    assert (w.concurrency, w.prefetch, w.threads) == (100, 7, 64)
    w = worker(monkeypatch, concurrency=4, prefetch=2, threads=3, TASKQ_WORKER_PREFETCH=7)
    assert (w.concurrency, w.prefetch, w.threads) == (4, 2, 3)


def test_the_inline_window_is_on_by_default_and_may_be_turned_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert worker(monkeypatch).inline_window == 0.005
    assert worker(monkeypatch, TASKQ_WORKER_INLINE_WINDOW="20ms").inline_window == 0.02
    assert (
        worker(monkeypatch, TASKQ_WORKER_INLINE_WINDOW="20ms", inline_window=0).inline_window == 0
    )


@pytest.mark.parametrize("seconds", [-0.001, 1.5])
def test_an_inline_window_out_of_range_is_refused(
    monkeypatch: pytest.MonkeyPatch, seconds: float
) -> None:
    with pytest.raises(ConfigError) as caught:
        worker(monkeypatch, inline_window=seconds)
    assert caught.value.variable == "--inline-window"


def test_the_inline_window_flag_takes_a_duration(capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli._parser()
    assert parser.parse_args(["worker", "m", "--inline-window", "20ms"]).inline_window == 0.02
    assert parser.parse_args(["worker", "m"]).inline_window is None  # the setting decides
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["worker", "m", "--inline-window", "soon"])
    assert exited.value.code == 2
    assert "not a duration" in capsys.readouterr().err
