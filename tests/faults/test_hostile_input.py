"""The API process under about a MiB of hostile text for each parser: `/healthz` keeps
answering meanwhile, and every hostile request gets a 4xx, never a 5xx or silence."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from taskq.settings import Settings
from tests.support.api_fixtures import assert_problem, declare_topology, put_type, running_api
from tests.support.browser_fixtures import Process, wait_until_up
from tests.support.services import free_port, subprocess_env

pytestmark = [pytest.mark.integration, pytest.mark.fault]

KEY = "hostile-test-key"
KEYED = {"Authorization": f"Bearer {KEY}"}
MiB = 1024 * 1024
N = MiB - 4096  # what fits under TASKQ_MAX_PAYLOAD_BYTES with the JSON around it
SAMPLE_EVERY = 0.05
ATTACK_TIMEOUT = 10.0
ATTACKS_WITHIN = 45.0  # attacks not sent by then count as unanswered (a frozen server)
TYPES = {
    # Patterns that backtrack exponentially in Python's re; RE2 runs them in linear time.
    "h.regex": {
        "properties": {"s": {"pattern": "^(a+)+$"}},
        "patternProperties": {"^(a|aa)+$": {"type": "integer"}},
        "additionalProperties": False,
    },
    # Quadratic in Python for distinct objects: the check overruns its deadline.
    "h.unique": {"properties": {"items": {"uniqueItems": True}}},
}


def attacks() -> list[tuple[str, str, dict[str, Any]]]:
    """One request per parser, each with about a MiB of text made to be slow."""
    duration = "1" + " " * N + "x"
    fraction = "2030-01-01T00:00:00." + "1" * N
    enqueue = {"type": "h.regex", "payload": {}}
    distinct = [{"n": n} for n in range(N // 12)]
    return [
        ("PUT", "/types/h.fixed", {"json": {"backoff": {"strategy": "fixed", "delay": duration}}}),
        ("PUT", "/types/h.list", {"json": {"backoff": {"strategy": "list", "delays": [duration]}}}),
        (
            "PUT",
            "/types/h.exp",
            {"json": {"backoff": {"strategy": "exponential", "max": duration}}},
        ),
        ("PUT", "/types/h.long", {"json": {"payload_schema": {"pattern": "(a|" * (N // 3)}}}),
        (
            "PUT",
            "/types/h.many",
            {"json": {"payload_schema": {"anyOf": [TYPES["h.regex"]] * 9000}}},
        ),
        ("PUT", "/types/" + "a" * N, {"raw": b"{}"}),
        ("POST", "/enqueue", {"json": {**enqueue, "payload": {"s": "a" * N + "!"}}}),
        ("POST", "/enqueue", {"json": {**enqueue, "payload": {"a" * N + "!": 1}}}),
        ("POST", "/enqueue", {"json": {**enqueue, "payload": {"s": "\\" * (N // 2) + "u0000"}}}),
        ("POST", "/enqueue", {"json": {"type": "h.unique", "payload": {"items": distinct}}}),
        ("POST", "/enqueue", {"json": {**enqueue, "run_at": fraction + "Q"}}),
        ("POST", "/enqueue", {"json": {**enqueue, "type": "h." + "a" * N}}),
        ("POST", "/enqueue", {"json": {**enqueue, "idempotency_key": "k" * N}}),
        (
            "POST",
            "/enqueue/batch",
            {"json": {"tasks": [{**enqueue, "run_at": fraction[:9000]}] * 900}},
        ),
        ("POST", "/dlq/replay", {"json": {"type": "a" * N}}),
        (
            "POST",
            "/tasks/00000000-0000-4000-8000-000000000000/cancel",
            {"json": {"reason": duration}},
        ),
        ("GET", "/tasks?status=" + ",".join(["ENQUEUED"] * (N // 9)), {"raw": b""}),
        ("GET", "/tasks?type=" + "a" * N, {"raw": b""}),
        ("GET", "/tasks?cursor=" + "A" * N, {"raw": b""}),
        ("GET", "/tasks?created_after=" + fraction + "Z", {"raw": b""}),
        ("GET", "/tasks?limit=" + "9" * N, {"raw": b""}),
        ("GET", "/dlq?queue=" + "a" * N, {"raw": b""}),
        ("GET", "/types", {"raw": b"", "headers": {"Authorization": "Bearer " + "k" * N}}),
        ("GET", "/types", {"raw": b"", "headers": {"Host": "h" * N}}),
        ("GET", "/types", {"raw": b"", "headers": {"Host": "[" + ":" * N + "]"}}),
        ("POST", "/enqueue", {"raw": b"{}", "headers": {"Content-Type": "a/b;" + " " * N + "x"}}),
    ]


def attack_and_sample(url: str) -> tuple[list[float], list[tuple[str, int | None]]]:
    """Send every attack (twice, four at a time) while sampling /healthz's latency."""
    stop = threading.Event()
    latencies: list[float] = []

    def sample() -> None:
        with httpx.Client(base_url=url, timeout=5.0) as http:
            while not stop.is_set():
                started = time.monotonic()
                with contextlib.suppress(httpx.TransportError):  # counted as slow as it was
                    http.get("/healthz")
                latencies.append(time.monotonic() - started)
                stop.wait(SAMPLE_EVERY)

    give_up = time.monotonic() + ATTACKS_WITHIN

    def attack(request: tuple[str, str, dict[str, Any]]) -> tuple[str, int | None]:
        method, path, options = request
        options = {**options, "headers": {**KEYED, **options.get("headers", {})}}
        label = f"{method} {path[:40]} {str(options)[:120]}"
        if time.monotonic() > give_up:
            return label, None
        if "raw" in options:  # longer URLs and headers than httpx sends
            return label, raw(url, method, path, options["raw"], options["headers"])
        with httpx.Client(base_url=url, timeout=ATTACK_TIMEOUT) as http:
            try:
                return label, http.request(method, path, **options).status_code
            except httpx.TransportError:
                return label, None

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(attack, attacks() * 2))
    finally:
        stop.set()
        sampler.join()
    return latencies, answers


def raw(url: str, method: str, target: str, body: bytes, headers: dict[str, str]) -> int | None:
    """Send one request over a plain socket; the answer's status code (None: no answer)."""
    host, port = url.removeprefix("http://").split(":")
    fields = {"Host": host, "Content-Type": "application/json", **headers}
    fields |= {"Content-Length": str(len(body)), "Connection": "close"}
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    head += "\r\n"
    try:
        with socket.create_connection((host, int(port)), timeout=ATTACK_TIMEOUT) as sock:
            sock.sendall(head.encode() + body)
            answer = sock.makefile("rb").readline()
    except OSError:
        return None
    parts = answer.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


async def test_health_answers_while_every_parser_is_attacked(
    settings: Settings, tmp_path: Path
) -> None:
    await declare_topology(settings)
    port = free_port()
    env = subprocess_env(settings, TASKQ_API_KEYS=KEY)
    process = Process(["api", "--port", str(port)], env, tmp_path / "api.log").start()
    url = f"http://127.0.0.1:{port}"
    try:
        await asyncio.to_thread(wait_until_up, url, process)
        async with httpx.AsyncClient(base_url=url, headers=KEYED, timeout=30) as http:
            for name, schema in TYPES.items():
                response = await http.put(f"/types/{name}", json={"payload_schema": schema})
                assert response.status_code == 201, response.text
        latencies, answers = await asyncio.to_thread(attack_and_sample, url)
    finally:
        process.popen.kill()  # a frozen loop ignores SIGTERM
        process.popen.wait()
    median, worst = statistics.median(latencies), max(latencies)
    print(
        f"\n[fault] hostile input: attacks = {len(answers)}, /healthz samples = {len(latencies)},"
        f" median = {median * 1000:.1f} ms, worst = {worst * 1000:.1f} ms,"
        f" answers = {sorted(collections.Counter(code for _, code in answers).items())}"
    )
    assert median < 0.1 and worst < 1.0, (
        f"/healthz took {median:.3f}s (median) and {worst:.3f}s (worst) of {len(latencies)}"
    )
    unanswered = [label for label, code in answers if code is None or code >= 500]
    assert not unanswered, unanswered
    accepted = [(label, code) for label, code in answers if code and code < 400]
    assert all("status=" in label for label, _ in accepted), accepted  # only that one is valid


async def test_payload_schemas_run_on_re2_with_a_deadline(settings: Settings) -> None:
    await declare_topology(settings)
    async with running_api(settings, relay=False) as api:
        # What RE2 cannot run is refused when the type is written, naming where.
        for schema, where in [
            ({"properties": {"code": {"pattern": "^(?!0)\\d+$"}}}, "properties.code.pattern"),
            ({"patternProperties": {"(a)\\1": {}}}, "patternProperties"),
        ]:
            response = await api.put("/types/h.bad", json={"payload_schema": schema})
            body = assert_problem(response, 400, "payload_schema")
            assert f"at {where}:" in body["detail"] and "RE2" in body["detail"], body
        assert (await api.get("/types/h.bad")).status_code == 404

        for name, schema in TYPES.items():
            await put_type(api, name, payload_schema=schema)
        near_miss = {"type": "h.regex", "payload": {"s": "a" * 100_000 + "!"}}
        assert_problem(await api.post("/enqueue", json=near_miss), 400, "payload.s")
        near_miss = {"type": "h.regex", "payload": {"a" * 100_000 + "b": 1}}
        assert_problem(await api.post("/enqueue", json=near_miss), 400, "payload")
        fine = {"type": "h.regex", "payload": {"s": "aaa", "aa": 2}}
        assert (await api.post("/enqueue", json=fine)).status_code == 201
        # Quadratic in jsonschema: interrupted at the deadline, answered 400.
        slow = {"items": [{"n": n} for n in range(60_000)]}
        started = time.monotonic()
        response = await api.post("/enqueue", json={"type": "h.unique", "payload": slow})
        body = assert_problem(response, 400, "payload")
        assert "took over" in body["detail"] and time.monotonic() - started < 10
        batch = {
            "tasks": [{"type": "h.regex", "payload": {}}, {"type": "h.unique", "payload": slow}]
        }
        assert_problem(await api.post("/enqueue/batch", json=batch), 400, "tasks[1].payload")
        assert (await api.post("/enqueue", json=fine)).status_code == 201  # checks go on
