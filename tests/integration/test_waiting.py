"""The waiting state with real workers: paused types, and concurrency limits per key.

A WAITING task is parked by the claim (its delivery acked, nothing left in the
broker) and released, ENQUEUED with its publish owed, in the transaction that
frees it: a resume, or an attempt of its key ending.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from typing import Any

import httpx
import pytest

from taskq.handlers import Context, Registry
from taskq.model import ClaimedTask, Concurrency, Handoff
from taskq.settings import Settings
from taskq.store import NewTask
from tests.support.api_fixtures import JSON, running_api
from tests.support.worker_fixtures import Harness, harness, running_worker, until

pytestmark = pytest.mark.integration

handlers = Registry()
# (key, start, end) of every attempt of wait.limited, on this process's clock.
runs: list[tuple[str, float, float]] = []


@handlers.task("wait.echo", timeout=30)
async def echo(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    return payload


@handlers.task("wait.limited", timeout=30, concurrency={"key": "customer", "limit": 2})
async def limited(payload: dict[str, Any], ctx: Context) -> None:
    start = time.monotonic()
    await asyncio.sleep(payload.get("seconds", 0.05))
    runs.append((payload["customer"], start, time.monotonic()))


@handlers.task("wait.flaky", timeout=30, concurrency={"limit": 1}, max_attempts=3)
async def flaky(payload: dict[str, Any], ctx: Context) -> None:
    if ctx.attempt == 1:
        raise RuntimeError("first attempt fails")


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant (an end at t closes before a start at t)."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


async def status_counts(h: Harness, task_type: str) -> dict[str, int]:
    async with h.store.pool.acquire() as connection:
        rows = await connection.fetch(
            "SELECT status, count(*) AS n FROM taskq.tasks WHERE type = $1 GROUP BY status",
            task_type,
        )
    return {row["status"]: row["n"] for row in rows}


async def slots(h: Harness, task_type: str) -> dict[str, int]:
    async with h.store.pool.acquire() as connection:
        rows = await connection.fetch(
            "SELECT key, running FROM taskq.concurrency_slots WHERE type = $1", task_type
        )
    return {row["key"]: row["running"] for row in rows}


async def broker_ready(settings: Settings, queue: str) -> int:
    async with httpx.AsyncClient(auth=("guest", "guest")) as client:
        name = settings.topology().names.queue(queue)
        response = await client.get(f"http://127.0.0.1:15672/api/queues/%2F/{name}")
        ready: int = response.json().get("messages_ready", 0)
        return ready


async def test_a_paused_types_tasks_wait_and_run_once_resumed(settings: Settings) -> None:
    async with (
        harness(settings) as h,
        running_api(settings, relay=False) as api,
        running_worker(settings, handlers) as worker,
    ):
        await until(lambda: _registered(h, "wait.echo"), "the worker did not register its types")
        response = await api.post("/types/wait.echo/pause", headers=JSON)
        assert response.status_code == 200, response.text
        assert response.json()["paused"] is True
        ids = [await h.enqueue("wait.echo", {"n": n}) for n in range(5)]
        for task_id in ids:
            row = await h.wait_for(task_id, "WAITING")
            assert row.wait_reason == "paused" and row.attempts == 0
        # Parked: their deliveries were acked, nothing of theirs is in the broker.
        assert await broker_ready(settings, "default") == 0
        listed = (await api.get("/tasks", params={"status": "WAITING"})).json()["tasks"]
        assert {t["id"] for t in listed} == {str(i) for i in ids}
        assert {t["wait_reason"] for t in listed} == {"paused"}
        stats = (await api.get("/stats")).json()
        assert stats["paused_types"] == ["wait.echo"]
        assert stats["waiting"] == {"wait.echo": {"paused": 5}}
        assert stats["by_status"]["WAITING"] == 5
        metrics = (await api.get("/metrics")).text
        assert 'taskq_type_paused{type="wait.echo"} 1.0' in metrics
        assert 'taskq_waiting_tasks{reason="paused",type="wait.echo"} 5.0' in metrics
        # A cancel ends a waiting task at once.
        cancelled = await api.post(f"/tasks/{ids[0]}/cancel", headers=JSON, json={})
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "CANCELLED"
        assert cancelled.json()["wait_reason"] is None
        response = await api.post("/types/wait.echo/resume", headers=JSON)
        assert response.status_code == 200 and response.json()["paused"] is False
        # Released with a publish owed: the worker's relay publishes them.
        for task_id in ids[1:]:
            row = await h.wait_for(task_id, "SUCCEEDED", timeout=30)
            assert row.attempts == 1
        history = [e.status for e in await h.events(ids[1])]
        assert history == ["ENQUEUED", "WAITING", "ENQUEUED", "RUNNING", "SUCCEEDED"]
        assert (
            worker.metrics.registry.get_sample_value(
                "taskq_deliveries_total", {"queue": "default", "decision": "parked"}
            )
            == 5
        )
        after = await h.store.stats(60)  # /stats is cached for a moment
        assert after.paused_types == [] and after.waiting == {}


async def test_pause_and_resume_answer_404_for_an_unknown_type(settings: Settings) -> None:
    async with running_api(settings, relay=False) as api:
        for action in ("pause", "resume"):
            response = await api.post(f"/types/no.such/{action}", headers=JSON)
            assert response.status_code == 404
            assert response.headers["content-type"] == "application/problem+json"
        response = await api.post("/types/bad name!/pause", headers=JSON)
        assert response.status_code == 404
        response = await api.get("/types/no.such/concurrency")
        assert response.status_code == 404


async def test_a_concurrency_limit_is_set_read_and_refused_through_the_api(
    settings: Settings,
) -> None:
    async with running_api(settings, relay=False) as api:
        body = {"concurrency": {"key": "customer_id", "limit": 3}}
        response = await api.put("/types/api.limited", json=body)
        assert response.status_code == 201, response.text
        assert response.json()["concurrency"] == {
            "limit": 3, "key": "customer_id", "source": "api",
        }  # fmt: skip
        for bad in (
            {"limit": 0},
            {"limit": 10001},
            {"limit": "2"},
            {"key": "k"},
            {"limit": 1, "key": ""},
            {"limit": 1, "other": 1},
            {"limit": 1, "key": "a\u0000b"},
        ):
            response = await api.put("/types/api.limited", json={"concurrency": bad})
            assert response.status_code == 400, (bad, response.text)
            assert response.headers["content-type"] == "application/problem+json"
            assert "concurrency" in response.text
        # Nothing changed.
        kept = (await api.get("/types/api.limited")).json()["concurrency"]
        assert kept == {"limit": 3, "key": "customer_id", "source": "api"}
        response = await api.get("/types/api.limited/concurrency", params={"limit": "0"})
        assert response.status_code == 400
        keys = (await api.get("/types/api.limited/concurrency")).json()
        assert keys == {"type": "api.limited", "limit": 3, "key": "customer_id", "keys": []}


async def test_a_handlers_limit_is_registered_and_an_operators_one_kept(
    settings: Settings,
) -> None:
    async with harness(settings) as h:
        rows: list[Any] = [("reg.t", "default", 3, 30.0, None, None, None, Concurrency(2, "c"))]
        await h.store.register_task_types(rows)
        [found] = [t for t in await h.store.task_types() if t.name == "reg.t"]
        assert found.concurrency == Concurrency(2, "c", "code")
        await h.store.put_task_type(
            "reg.t", queue="default", max_attempts=3, timeout_seconds=30.0, backoff_json=None,
            payload_schema_json=None, enabled=True, concurrency=Concurrency(5, None, "api"),
        )  # fmt: skip
        await h.store.register_task_types(rows)
        [found] = [t for t in await h.store.task_types() if t.name == "reg.t"]
        assert found.concurrency == Concurrency(5, None, "api")


async def test_four_workers_never_run_more_than_the_limit_of_a_key(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    runs.clear()
    keys = [f"customer-{n}" for n in range(5)]
    per_key = 12
    caplog.set_level(logging.WARNING)
    async with harness(settings) as h:
        async with (
            running_worker(settings, handlers, concurrency=8),
            running_worker(settings, handlers, concurrency=8),
            running_worker(settings, handlers, concurrency=8),
            running_worker(settings, handlers, concurrency=8),
        ):
            await until(lambda: _registered(h, "wait.limited"), "types not registered")
            tasks = [
                NewTask(uuid.uuid4(), "wait.limited", f'{{"customer": "{key}", "seconds": 0.05}}')
                for _ in range(per_key)
                for key in keys
            ]
            results = await h.store.enqueue(tasks)
            assert all(result.outcome == "created" for result in results)
            await _publish(h, tasks)

            async def all_done() -> bool:
                counts = await status_counts(h, "wait.limited")
                return counts.get("SUCCEEDED", 0) == len(tasks)

            await until(all_done, f"not all succeeded: {runs and len(runs)}", timeout=120)
        by_key: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for key, start, end in runs:
            by_key[key].append((start, end))
        assert sorted(by_key) == keys
        assert all(len(spans) == per_key for spans in by_key.values())
        # Never more than 2 of a key at once; but 2 did run together (the limit is used).
        assert max(most_at_once(spans) for spans in by_key.values()) == 2
        assert await slots(h, "wait.limited") == dict.fromkeys(keys, 0)
        # Some waited: parked, then released by a freed slot.
        async with h.store.pool.acquire() as connection:
            parked = await connection.fetchval(
                "SELECT count(DISTINCT task_id) FROM taskq.task_events WHERE status = 'WAITING'"
            )
        assert parked > 0
    assert not [r for r in caplog.records if "deadlock" in r.getMessage()]


async def test_a_retried_attempt_gives_its_slot_back(settings: Settings) -> None:
    async with harness(settings) as h, running_worker(settings, handlers):
        await until(lambda: _registered(h, "wait.flaky"), "types not registered")
        ids = [await h.enqueue("wait.flaky", {"n": n}) for n in range(4)]
        for task_id in ids:
            row = await h.wait_for(task_id, "SUCCEEDED", timeout=60)
            assert row.attempts == 2
        assert await slots(h, "wait.flaky") == {"": 0}


async def test_a_raised_limit_releases_the_waiting_tasks(settings: Settings) -> None:
    async with harness(settings) as h:
        await h.put_type("raise.t")
        await h.store.put_task_type(
            "raise.t", queue="default", max_attempts=3, timeout_seconds=30.0, backoff_json=None,
            payload_schema_json=None, enabled=True, concurrency=Concurrency(1, None, "api"),
        )  # fmt: skip
        ids = [await h.enqueue("raise.t", {}) for _ in range(3)]
        claimed = await h.store.claim(ids, "w1", 30.0)
        decisions = sorted(row.decision for row in claimed if not hasattr(row, "payload"))
        assert decisions == ["parked", "parked"]
        await h.store.put_task_type(
            "raise.t", queue="default", max_attempts=3, timeout_seconds=30.0, backoff_json=None,
            payload_schema_json=None, enabled=True, concurrency=Concurrency(2, None, "api"),
        )  # fmt: skip
        statuses = sorted([(await h.task(i)).status for i in ids])
        assert statuses == ["ENQUEUED", "RUNNING", "WAITING"]
        # Without a limit, every waiting task is released.
        await h.put_type("raise.t")
        statuses = sorted([(await h.task(i)).status for i in ids])
        assert statuses == ["ENQUEUED", "ENQUEUED", "RUNNING"]


async def _registered(h: Harness, name: str) -> bool:
    return any(t.name == name for t in await h.store.task_types())


async def _publish(h: Harness, tasks: list[NewTask]) -> None:
    """Publish the tasks' first envelopes, as the API does after its commit."""
    from taskq.amqp.envelope import Envelope

    for task in tasks:
        await h.publisher.publish(Envelope(task.id, task.type, 0), "default", delay=0.0)
    await h.store.mark_published([(task.id, 0) for task in tasks])


async def test_concurrent_claims_outcomes_and_stale_deliveries_never_deadlock(
    settings: Settings,
) -> None:
    """Six claimers race over three keys limited to 1 each: every claim batch mixes
    due tasks with stale deliveries (ids WAITING, RUNNING or done), the outcomes give
    slots back and release waiting tasks, an operator cancels and a client waits on
    some meanwhile. Nothing raises (a deadlock would), no key ever has two RUNNING,
    and every slot is given back."""
    async with harness(settings) as h:
        await h.put_type("race.t", max_attempts=100)
        await h.store.put_task_type(
            "race.t", queue="default", max_attempts=100, timeout_seconds=30.0,
            backoff_json=None, payload_schema_json=None, enabled=True,
            concurrency=Concurrency(1, "k", "api"),
        )  # fmt: skip
        tasks = [NewTask(uuid.uuid4(), "race.t", f'{{"k": "{n % 3}"}}') for n in range(90)]
        await h.store.enqueue(tasks)
        ids = [task.id for task in tasks]
        random = __import__("random").Random(7)
        most = 0
        done = asyncio.Event()

        async def claimer(n: int) -> None:
            while not done.is_set():
                async with h.store.pool.acquire() as connection:
                    due = await connection.fetch(
                        "SELECT id FROM taskq.tasks WHERE type = 'race.t' AND status = 'ENQUEUED'"
                    )
                batch = [row["id"] for row in due][:8] + random.sample(ids, 4)
                rows = await h.store.claim(batch, f"w{n}", 30.0)
                claimed = [row for row in rows if hasattr(row, "claim_token")]
                await asyncio.sleep(random.random() * 0.01)
                if claimed and n % 2:
                    await h.store.retry(
                        [(row.id, row.claim_token, "again", 0.0) for row in claimed[:1]],
                        holds_slots=True,
                    )
                    claimed = claimed[1:]
                if claimed:
                    await h.store.complete(
                        [(row.id, row.claim_token, "null") for row in claimed], holds_slots=True
                    )
                await asyncio.sleep(0)

        async def meddler() -> None:
            while not done.is_set():
                await h.store.request_wait(random.sample(ids, 5))
                await asyncio.sleep(0.005)

        async def watcher() -> None:
            nonlocal most
            while not done.is_set():
                async with h.store.pool.acquire() as connection:
                    running = await connection.fetchval(
                        "SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM taskq.tasks"
                        " WHERE type = 'race.t' AND status = 'RUNNING'"
                        " GROUP BY payload ->> 'k') c"
                    )
                most = max(most, running)
                counts = await status_counts(h, "race.t")
                if counts.get("SUCCEEDED", 0) + counts.get("CANCELLED", 0) == len(ids):
                    done.set()
                await asyncio.sleep(0.01)

        victim = ids[-1]
        await h.store.cancel(victim, actor="test", reason=None)
        workers = [asyncio.create_task(claimer(n)) for n in range(6)]
        others = [asyncio.create_task(meddler()), asyncio.create_task(watcher())]
        try:
            await asyncio.wait_for(done.wait(), 120)
        finally:
            done.set()
            results = await asyncio.gather(*workers, *others, return_exceptions=True)
        assert [r for r in results if isinstance(r, BaseException)] == []
        assert most == 1
        assert await slots(h, "race.t") == {"0": 0, "1": 0, "2": 0}
        assert (await h.task(victim)).status == "CANCELLED"


async def test_a_crashed_workers_slot_is_freed_when_its_lease_expires(settings: Settings) -> None:
    async with harness(settings) as h:
        await h.put_type("lease.t")
        await h.store.put_task_type(
            "lease.t", queue="default", max_attempts=3, timeout_seconds=30.0, backoff_json=None,
            payload_schema_json=None, enabled=True, concurrency=Concurrency(1, None, "api"),
        )  # fmt: skip
        first, second = [await h.enqueue("lease.t", {}) for _ in range(2)]
        [held] = [r for r in await h.store.claim([first], "dead", 0.2) if hasattr(r, "payload")]
        assert held.concurrency_key == ""
        [parked] = await h.store.claim([second], "alive", 30.0)
        assert parked.decision == "parked"
        # A claim of the expired lease does not take it over: the slot is the sweeper's.
        await asyncio.sleep(0.3)
        [again] = await h.store.claim([first], "alive", 30.0)
        assert again.decision == "duplicate"
        recovered = await h.store.recover_expired(10)
        assert [r.id for r in recovered] == [first]
        assert (await h.task(first)).status == "ENQUEUED"
        # The slot was given back and the waiting task released, in that transaction.
        assert (await h.task(second)).status == "ENQUEUED"
        assert await slots(h, "lease.t") == {"": 0}


async def test_waiting_tasks_owe_nothing_and_only_cancels_and_purges_end_them(
    settings: Settings,
) -> None:
    async with harness(settings) as h, running_api(settings, relay=False) as api:
        await h.put_type("still.t")
        assert await h.store.pause_type("still.t", True) is not None
        ids = [await h.enqueue("still.t", {}) for _ in range(3)]
        rows = await h.store.claim(ids, "w1", 30.0)
        assert {row.decision for row in rows} == {"parked"}
        # A stale delivery of a WAITING task is parked again, changing nothing.
        [again] = await h.store.claim(ids[:1], "w2", 30.0)
        assert again.decision == "parked"
        # Neither the relay, nor lease recovery, nor retention, nor the overdue check
        # looks at them.
        assert await h.store.publish_owed(0.0, 100) == []
        assert await h.store.recover_expired(100) == []
        assert await h.store.delete_finished(0.0, 100) == 0
        assert await h.store.overdue_enqueued("default", 0.0, 100) == []
        assert await h.store.unpublished_count() == 0
        assert await h.store.request_wait(ids) == set(ids)
        response = await api.request(
            "DELETE", "/queues/default", params={"confirm": "default"}, headers=JSON
        )
        assert response.status_code == 200 and response.json()["cancelled"] == 3
        for task_id in ids:
            row = await h.task(task_id)
            assert row.status == "CANCELLED" and row.wait_reason is None


async def test_a_freed_slot_releases_the_oldest_waiting_task_of_its_key(
    settings: Settings,
) -> None:
    async with harness(settings) as h:
        await h.put_type("fifo.t")
        await h.store.put_task_type(
            "fifo.t", queue="default", max_attempts=3, timeout_seconds=30.0, backoff_json=None,
            payload_schema_json=None, enabled=True, concurrency=Concurrency(1, "k", "api"),
        )  # fmt: skip
        first, second, third = [await h.enqueue("fifo.t", {"k": "a"}) for _ in range(3)]
        other = await h.enqueue("fifo.t", {"k": "b"})
        rows = {row.id: row for row in await h.store.claim([third, second, first], "w", 30.0)}
        held = rows[first]
        assert isinstance(held, ClaimedTask) and held.concurrency_key == "a"
        assert rows[second].decision == rows[third].decision == "parked"
        # Another key has slots of its own.
        [b] = await h.store.claim([other], "w", 30.0)
        assert isinstance(b, ClaimedTask)
        await h.store.complete([(first, held.claim_token, "null")], holds_slots=True)
        assert (await h.task(second)).status == "ENQUEUED"
        assert (await h.task(third)).status == "WAITING"
        assert await slots(h, "fifo.t") == {"a": 0, "b": 1}
        # Released with its publish owed, named to the relay.
        [owed] = await h.store.owed_among([second])
        assert owed.id == second


@pytest.mark.parametrize("open_claim", [False, True])
async def test_a_batch_mixing_gated_and_plain_types_gets_each_its_decision(
    settings: Settings, open_claim: bool
) -> None:
    # The worker's claim statement leaves rows of gated types to `claim_gated`:
    # one batch, three kinds of rows, each decided as if claimed alone.
    async with harness(settings) as h:
        await h.put_type("mix.plain")
        await h.put_type("mix.paused")
        await h.put_type("mix.limited")
        await h.store.put_task_type(
            "mix.limited", queue="default", max_attempts=3, timeout_seconds=30.0,
            backoff_json=None, payload_schema_json=None, enabled=True,
            concurrency=Concurrency(1, "k", "api"),
        )  # fmt: skip
        await h.store.pause_type("mix.paused", True)
        plain = await h.enqueue("mix.plain", {})
        paused = await h.enqueue("mix.paused", {})
        first, second = [await h.enqueue("mix.limited", {"k": "a"}) for _ in range(2)]
        missing = uuid.uuid4()
        batch = [plain, paused, second, first, missing, plain]
        if open_claim:
            async with h.store.claim_open(batch, "w", 30.0) as claim:
                rows = {row.id: row for row in claim.rows}
        else:
            rows = {row.id: row for row in await h.store.claim(batch, "w", 30.0)}
        decisions = {
            row_id: "claimed" if isinstance(row, ClaimedTask) else row.decision
            for row_id, row in rows.items()
        }
        assert decisions == {
            plain: "claimed", paused: "parked", first: "claimed", second: "parked",
            missing: "missing",
        }  # fmt: skip
        limited_row, plain_row = rows[first], rows[plain]
        assert isinstance(limited_row, ClaimedTask) and limited_row.concurrency_key == "a"
        assert isinstance(plain_row, ClaimedTask) and plain_row.concurrency_key is None
        assert (await h.task(paused)).wait_reason == "paused"
        assert (await h.task(second)).wait_reason == "concurrency"
        assert await slots(h, "mix.limited") == {"a": 1}


async def test_a_freed_slot_hands_its_released_task_to_the_worker_that_freed_it(
    settings: Settings,
) -> None:
    async with harness(settings) as h:
        await h.put_type("hand.t")
        await h.put_type("hand.other", queue="other")
        for name, queue in (("hand.t", "default"), ("hand.other", "other")):
            await h.store.put_task_type(
                name, queue=queue, max_attempts=3, timeout_seconds=30.0, backoff_json=None,
                payload_schema_json=None, enabled=True, concurrency=Concurrency(1, "k", "api"),
            )  # fmt: skip
        first, second, third = [await h.enqueue("hand.t", {"k": "a"}) for _ in range(3)]
        rows = {row.id: row for row in await h.store.claim([first, second, third], "w1", 30.0)}
        held = rows[first]
        assert isinstance(held, ClaimedTask)
        handoff = Handoff("w2", 30.0, frozenset({"default"}), room=5)
        await h.store.complete(
            [(first, held.claim_token, "null")], holds_slots=True, handoff=handoff
        )
        # The oldest waiting task, claimed for w2 in the same transaction: RUNNING with
        # the key's one slot, nothing owed to the broker; the next one still waits.
        [taken] = handoff.claimed
        assert (taken.id, taken.concurrency_key) == (second, "a")
        row = await h.task(second)
        assert (row.status, row.worker_id, row.attempts) == ("RUNNING", "w2", 1)
        assert await h.store.owed_among([second]) == []
        assert (await h.task(third)).status == "WAITING"
        assert await slots(h, "hand.t") == {"a": 1}
        # A released task of a queue the worker does not consume is published instead.
        ids = [uuid.uuid4() for _ in range(2)]
        await h.store.enqueue([NewTask(i, "hand.other", '{"k": "b"}') for i in ids])
        [held] = [r for r in await h.store.claim(ids, "w1", 30.0) if isinstance(r, ClaimedTask)]
        one, [two] = held.id, [i for i in ids if i != held.id]
        handoff = Handoff("w2", 30.0, frozenset({"default"}), room=5)
        await h.store.complete([(one, held.claim_token, "null")], holds_slots=True, handoff=handoff)
        assert handoff.claimed == []
        assert (await h.task(two)).status == "ENQUEUED"
        [owed] = await h.store.owed_among([two])
        assert owed.id == two


async def slot_version(h: Harness, task_type: str, key: str) -> tuple[int, str]:
    """The running count of a slot row, and the transaction that wrote its version."""
    async with h.store.pool.acquire() as connection:
        row = await connection.fetchrow(
            "SELECT running, xmin::text AS xmin FROM taskq.concurrency_slots"
            " WHERE type = $1 AND key = $2",
            task_type,
            key,
        )
    assert row is not None
    return row["running"], row["xmin"]


async def test_a_handoff_passes_the_slot_on_without_writing_its_row(
    settings: Settings,
) -> None:
    async with harness(settings) as h:
        await h.put_type("pass.t")
        await h.store.put_task_type(
            "pass.t", queue="default", max_attempts=3, timeout_seconds=30.0, backoff_json=None,
            payload_schema_json=None, enabled=True, concurrency=Concurrency(2, "k", "api"),
        )  # fmt: skip
        ids = [await h.enqueue("pass.t", {"k": "a"}) for _ in range(4)]
        rows = {row.id: row for row in await h.store.claim(ids, "w1", 30.0)}
        first, second, third, fourth = ids
        held = [rows[first], rows[second]]
        assert all(isinstance(row, ClaimedTask) for row in held)
        before = await slot_version(h, "pass.t", "a")
        assert before[0] == 2
        # Two attempts end, two tasks wait: both slots pass on, the slot row untouched
        # (a claim of the key would not have waited for this transaction).
        handoff = Handoff("w2", 30.0, frozenset({"default"}), room=2)
        await h.store.complete(
            [(row.id, row.claim_token, "null") for row in held if isinstance(row, ClaimedTask)],
            holds_slots=True,
            handoff=handoff,
        )
        assert sorted(t.id for t in handoff.claimed) == sorted([third, fourth])
        assert all(t.concurrency_key == "a" for t in handoff.claimed)
        assert await slot_version(h, "pass.t", "a") == before
        for task_id in (third, fourth):
            row = await h.task(task_id)
            assert (row.status, row.worker_id, row.attempts) == ("RUNNING", "w2", 1)
        assert await h.store.owed_among([third, fourth]) == []
        # Two attempts end, one task waits: one slot passes, the other is given back.
        fifth = await h.enqueue("pass.t", {"k": "a"})
        [parked] = await h.store.claim([fifth], "w1", 30.0)
        assert not isinstance(parked, ClaimedTask)
        handoff2 = Handoff("w2", 30.0, frozenset({"default"}), room=2)
        await h.store.complete(
            [(t.id, t.claim_token, "null") for t in handoff.claimed],
            holds_slots=True,
            handoff=handoff2,
        )
        assert [t.id for t in handoff2.claimed] == [fifth]
        assert await slots(h, "pass.t") == {"a": 1}


async def test_a_slot_does_not_pass_to_a_task_whose_key_changed_or_over_a_lowered_limit(
    settings: Settings,
) -> None:
    async with harness(settings) as h:
        await h.put_type("pass.k")

        async def limit(n: int) -> None:
            await h.store.put_task_type(
                "pass.k", queue="default", max_attempts=3, timeout_seconds=30.0,
                backoff_json=None, payload_schema_json=None, enabled=True,
                concurrency=Concurrency(n, "k", "api"),
            )  # fmt: skip

        await limit(1)
        first, second = [await h.enqueue("pass.k", {"k": "a"}) for _ in range(2)]
        [held] = [r for r in await h.store.claim([first, second], "w1", 30.0) if r.id == first]
        assert isinstance(held, ClaimedTask)
        # A debounce replaced the waiting task's payload: its key is now "b".
        async with h.store.pool.acquire() as connection:
            await connection.execute(
                'UPDATE taskq.tasks SET payload = \'{"k": "b"}\' WHERE id = $1', second
            )
        handoff = Handoff("w2", 30.0, frozenset({"default"}), room=1)
        await h.store.complete(
            [(first, held.claim_token, "null")], holds_slots=True, handoff=handoff
        )
        # Not passed on under its old key: released, then claimed afresh under its new
        # key (claim_gated), as a released task is.
        [taken] = handoff.claimed
        assert (taken.id, taken.concurrency_key) == (second, "b")
        assert await slots(h, "pass.k") == {"a": 0, "b": 1}
        # A limit lowered below the key's running count: nothing passes on.
        await limit(2)
        third, fourth = [await h.enqueue("pass.k", {"k": "b"}) for _ in range(2)]
        claimed = [r for r in await h.store.claim([third, fourth], "w1", 30.0)]
        [held] = [r for r in claimed if isinstance(r, ClaimedTask)]
        waiting = fourth if held.id == third else third
        assert await slots(h, "pass.k") == {"a": 0, "b": 2}
        await limit(1)
        handoff = Handoff("w2", 30.0, frozenset({"default"}), room=1)
        await h.store.complete(
            [(held.id, held.claim_token, "null")], holds_slots=True, handoff=handoff
        )
        assert handoff.claimed == []
        assert (await h.task(waiting)).status == "WAITING"
        assert await slots(h, "pass.k") == {"a": 0, "b": 1}
