"""Fault scenarios that drive ``taskq api`` over HTTP: the enqueue load, and reading the
outcome back from Postgres on fresh connections (a restarted server kills old ones)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg
import httpx

from taskq.amqp import broker
from taskq.migrate import migrate
from taskq.settings import Settings
from taskq.store import Store

from .faults import Processes, eventually
from .services import free_port, read_unqualified

# (time sent, seconds taken, status or the transport error's name, content type)
Answer = tuple[float, float, int | str, str]
TRANSPORT_ERRORS = (OSError, EOFError, TimeoutError, ValueError, IndexError)


class Connection:
    """A minimal HTTP/1.1 keep-alive client for the load.

    httpx's connection pool spends more CPU than the API it measures once 100
    coroutines share it; this one costs next to nothing. It reconnects after a
    transport error.
    """

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.port = port
        self.timeout = timeout
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """Status, headers (lower-case names) and body; raises one of ``TRANSPORT_ERRORS``."""
        try:
            async with asyncio.timeout(self.timeout):
                if self._streams is None:
                    self._streams = await asyncio.open_connection("127.0.0.1", self.port)
                reader, writer = self._streams
                head = (
                    f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                )
                writer.write(head.encode() + body)
                status = int((await reader.readline()).split()[1])
                headers = {}
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                content = await reader.readexactly(int(headers.get("content-length", "0")))
        except BaseException:
            self.close()
            raise
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, content

    def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None


@dataclass
class Load:
    """``clients`` coroutines enqueueing ``demo.record`` through the API until :meth:`finish`.

    Each waits ``pause`` seconds between its requests (0: as fast as answers come).
    Every answer is kept with its timing; the ids of the 201s in :attr:`accepted`.
    """

    port: int
    clients: int = 8
    pause: float = 0.05
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    accepted: list[uuid.UUID] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client(n)) for n in range(self.clients)]

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self._tasks)

    async def _client(self, n: int) -> None:
        connection = Connection(self.port)
        i = 0
        while not self.stop.is_set():
            payload = {"run": self.marker, "n": n, "i": i}
            body = json.dumps({"type": "demo.record", "payload": payload}).encode()
            i += 1
            sent = time.monotonic()
            try:
                status, headers, content = await connection.post("/enqueue", body)
            except TRANSPORT_ERRORS as exc:
                self.answers.append((sent, time.monotonic() - sent, type(exc).__name__, ""))
            else:
                took = time.monotonic() - sent
                self.answers.append((sent, took, status, headers.get("content-type", "")))
                if status == 201:
                    self.accepted.append(uuid.UUID(json.loads(content)["id"]))
            if self.pause:
                await asyncio.sleep(self.pause)
        connection.close()

    def during(self, start: float, end: float) -> list[Answer]:
        """The answers to requests sent between ``start`` and ``end`` (monotonic)."""
        return [a for a in self.answers if start <= a[0] <= end]

    def statuses(self, answers: list[Answer] | None = None) -> dict[str, int]:
        """How many answers had each status (or transport error)."""
        counts: dict[str, int] = {}
        for _, _, status, _ in self.answers if answers is None else answers:
            counts[str(status)] = counts.get(str(status), 0) + 1
        return counts

    def percentile(self, p: float) -> float:
        """The ``p``-th percentile of the latencies, in seconds (nearest rank)."""
        latencies = sorted(a[1] for a in self.answers)
        rank = max(0, min(len(latencies) - 1, round(p / 100 * len(latencies)) - 1))
        return latencies[rank]


@contextlib.asynccontextmanager
async def api_process(procs: Processes) -> AsyncIterator[httpx.AsyncClient]:
    """``taskq api`` on a free port, answering /healthz, behind a client."""
    port = free_port()
    await procs.start("api", "--port", str(port))
    # Not reused after 2 s idle: the API closes a connection idle for 5 s (see
    # tests/support/browser_fixtures.py).
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200, keepalive_expiry=2.0)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", timeout=30, limits=limits
    ) as http:

        async def up() -> bool:
            try:
                return (await http.get("/healthz")).status_code == 200
            except httpx.TransportError:
                return False

        await eventually(up, 30, "the API answering /healthz")
        yield http


async def consumers(settings: Settings, queue: str = "default") -> int:
    """Consumers of the work queue ``queue``, on a connection of its own (0 if unreachable)."""
    try:
        connection = await asyncio.wait_for(
            broker.connect(settings.amqp_urls, name="test-consumers", robust=False), 10
        )
    except Exception:
        return 0
    try:
        channel = await connection.channel()
        raw = await channel.get_underlay_channel()
        declared = await raw.queue_declare(settings.topology().names.queue(queue), passive=True)
        return declared.consumer_count or 0
    except Exception:
        return 0
    finally:
        await connection.close()


async def with_db(url: str, use: Callable[[asyncpg.Connection], Awaitable[object]]) -> object:
    """Run ``use`` on a fresh connection (the test's own die with a restarted server)."""
    connection = await asyncpg.connect(url, timeout=5)
    try:
        return await use(connection)
    finally:
        await connection.close()


async def committed(url: str, marker: str) -> list[uuid.UUID]:
    async def ids(db: asyncpg.Connection) -> list[uuid.UUID]:
        rows = await db.fetch("SELECT id FROM tasks WHERE payload->>'run' = $1", marker)
        return [row["id"] for row in rows]

    result = await with_db(url, ids)
    assert isinstance(result, list)
    return result


async def succeeded(url: str, marker: str) -> int:
    async def count(db: asyncpg.Connection) -> int:
        return int(
            await db.fetchval(
                "SELECT count(*) FROM tasks WHERE payload->>'run' = $1 AND status = 'SUCCEEDED'",
                marker,
            )
        )

    try:
        result = await with_db(url, count)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
        return -1
    assert isinstance(result, int)
    return result


async def finishes(url: str, marker: str) -> list[float]:
    """When each task of the run ``marker`` SUCCEEDED (epoch seconds), in order."""
    connection = await asyncpg.connect(url, timeout=10)
    try:
        rows = await connection.fetch(
            "SELECT finished_at FROM tasks WHERE payload->>'run' = $1 AND status = 'SUCCEEDED'"
            " ORDER BY finished_at",
            marker,
        )
    finally:
        await connection.close()
    return [row["finished_at"].timestamp() for row in rows]


async def progress(url: str, marker: str, what: str, timeout: float = 60) -> None:
    """Wait until more tasks of the run have SUCCEEDED than now: the workers work again."""
    before = await succeeded(url, marker)

    async def more() -> bool:
        return await succeeded(url, marker) > max(before, 0) + 20

    await eventually(more, timeout, what, every=0.5)


async def health(http: httpx.AsyncClient) -> tuple[int, dict[str, object]]:
    try:
        response = await http.get("/healthz", timeout=10)
    except httpx.TransportError as exc:
        return 0, {"error": type(exc).__name__}
    return response.status_code, response.json()


async def put_record_type(database_url: str) -> None:
    store = await Store.connect(database_url)
    try:
        await store.put_task_type(
            "demo.record",
            queue="default",
            max_attempts=20,  # failed attempts during an outage count; the promise is about loss
            timeout_seconds=60,
            backoff_json=None,
            payload_schema_json=None,
            enabled=True,
        )
    finally:
        await store.close()


async def migrated_database(server_url: str) -> str:
    name = f"taskq_fault_{uuid.uuid4().hex[:10]}"
    url = server_url.rsplit("/", 1)[0] + "/" + name
    await migrate(url)
    connection = await asyncpg.connect(server_url)
    try:
        await read_unqualified(connection, name)
    finally:
        await connection.close()
    return url
