"""Fuzz the HTTP API: schemathesis against /openapi.json, then hand-written hostile requests.

Promise 6 of the design: bad input gets a clear error and changes nothing. No
request may produce a 5xx; every 4xx is problem+json naming the field at fault;
the ``tasks`` table grows only for a valid request, by exactly the tasks it created.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast
from urllib.parse import quote

import asyncpg
import httpx
import hypothesis
import orjson
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis.errors import Unsatisfiable
from schemathesis.specs.openapi.checks import positive_data_acceptance

from taskq.enqueue.validation import TYPE_NAME
from taskq.settings import Settings
from taskq.web.api import BATCH_BODY_FACTOR
from tests.support.api_fixtures import declare_topology, put_type, running_api
from tests.support.services import delete_namespace, make_settings

pytestmark = [pytest.mark.integration, pytest.mark.fault]

T = TypeVar("T")
TYPE = "fuzz.echo"
PROBLEM = "application/problem+json"
JSON = {"content-type": "application/json"}
MiB = 1024 * 1024


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    await declare_topology(settings)
    async with running_api(settings, relay=False) as client:
        await put_type(client, TYPE)
        yield client


async def count_tasks(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT count(*) FROM tasks"))


def assert_problem(response: httpx.Response, status: int | None = None) -> dict[str, Any]:
    """A 4xx problem+json that names the field at fault."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    if status is not None:
        assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith(PROBLEM), response.headers
    body: dict[str, Any] = response.json()
    assert body["status"] == response.status_code, body
    assert isinstance(body["title"], str) and body["title"], body
    assert isinstance(body["detail"], str) and body["detail"], body
    assert isinstance(body.get("field"), str) and body["field"], f"no field named: {body}"
    assert body["errors"] and all(e["field"] and e["message"] for e in body["errors"]), body
    return body


async def refused(
    api: httpx.AsyncClient,
    db: asyncpg.Connection,
    method: str,
    path: str,
    *,
    status: int | None = None,
    field: str | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Send a bad request: a problem naming ``field`` (or a field under it), and no new task."""
    before = await count_tasks(db)
    body = assert_problem(await api.request(method, path, **kwargs), status)
    if field is not None:
        named = [e["field"] for e in body["errors"]]
        assert any(name.startswith(field) for name in named), (field, body)
    assert await count_tasks(db) == before, "a refused request changed the tasks table"
    return body


async def accepted(
    api: httpx.AsyncClient,
    db: asyncpg.Connection,
    method: str,
    path: str,
    *,
    created: int = 1,
    **kwargs: Any,
) -> httpx.Response:
    """Send a valid request: 2xx, and exactly ``created`` new tasks."""
    before = await count_tasks(db)
    response = await api.request(method, path, **kwargs)
    assert response.status_code in (200, 201), (response.status_code, response.text[:500])
    assert await count_tasks(db) == before + created
    return response


async def stored_payload(api: httpx.AsyncClient, response: httpx.Response) -> Any:
    task = (await api.get(f"/tasks/{response.json()['id']}")).json()
    return task["payload"]


def task(**fields: Any) -> dict[str, Any]:
    return {"type": TYPE, "payload": {}, **fields}


# --- schemathesis -----------------------------------------------------------------------------

FUZZ_SETTINGS = hypothesis.settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI is reproducible
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
    print_blob=False,
)

OPERATIONS = {
    "GET /",
    "GET /healthz",
    "GET /metrics",
    "GET /openapi.json",
    "POST /enqueue",
    "POST /enqueue/batch",
    "GET /tasks/{id}",
    "GET /tasks/{id}/events",
    "GET /types",
    "GET /types/{name}",
    "PUT /types/{name}",
    "POST /types/{name}/pause",
    "POST /types/{name}/resume",
    "GET /types/{name}/concurrency",
    "GET /tasks",
    "POST /tasks/{id}/cancel",
    "POST /tasks/{id}/retry",
    "GET /dlq",
    "POST /dlq/replay",
    "DELETE /queues/{name}",
    "GET /queues",
    "POST /queues/{name}/pause",
    "POST /queues/{name}/resume",
    "GET /workers",
    "GET /stats",
    "GET /stream",
    "GET /schedules",
    "GET /schedules/{name}",
    "PUT /schedules/{name}",
    "DELETE /schedules/{name}",
    "POST /schedules/{name}/pause",
    "POST /schedules/{name}/resume",
    "POST /schedules/{name}/trigger",
    "GET /limits",
    "GET /limits/{name}",
    "PUT /limits/{name}",
    "DELETE /limits/{name}",
    "POST /workflows",
    "GET /workflows",
    "GET /workflows/{id}",
    "POST /workflows/{id}/cancel",
}
# An endless event stream: the in-process transport would wait for its end.
# tests/test_stream.py drives it on a real server.
NOT_FUZZED = {"GET /stream"}


def _problem_check(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """Every 4xx is problem+json with status, title and detail."""
    if 400 <= response.status_code < 500:
        content_type = response.headers.get("content-type", [""])[0]
        assert content_type.startswith(PROBLEM), f"a {response.status_code} as {content_type!r}"
        body = response.json()
        assert body["status"] == response.status_code, body
        assert body["title"] and body["detail"], body


def _unknowable(response: httpx.Response) -> bool:
    """A 400 only for what the schema cannot say: run_at beyond TASKQ_MAX_DELAY (which
    depends on the clock), a cursor the API never issued, a confirm that does not
    repeat the queue's name, a schedule's cron expression, time zone or interval
    (the schema gives their form, not their sense), or cron and every both or
    neither given; a unique key's payload path that the payload lacks, or a unique
    "for" duration out of range (as every); a rate limit's burst above its limit, a
    duration beyond its maximum, or a limiter's name that no limiter has; a workflow's
    graph (a cycle, a dependency on no node, a name two nodes share, more edges than
    TASKQ_MAX_WORKFLOW_EDGES): the schema gives each node's form, not the graph's."""
    if response.status_code != 400:
        return False
    errors = response.json().get("errors", [])
    return bool(errors) and all(
        (e["field"].endswith("run_at") and "ahead" in e["message"])
        or e["field"] in ("cursor", "confirm", "cron", "timezone", "every")
        or (e["field"].endswith("unique.key") and "payload has no value" in e["message"])
        or e["field"].endswith("unique.for")
        or e["field"] in ("burst", "per", "rate_limit.burst", "rate_limit.per")
        or (e["field"] == "rate_limit" and "no rate limiter" in e["message"])
        or (
            e["field"].startswith("nodes[")
            and any(
                words in e["message"]
                for words in ("cycle", "no node of the workflow", "names nodes[", "_EDGES")
            )
        )
        for e in errors
    )


def _use_registered_type(case: schemathesis.Case) -> None:
    """Name the registered type wherever the generated one is merely unknown.

    The schema cannot know the registry. A type that matches the schema is not
    what a negative case negated, so replacing it keeps a negative case negative,
    and lets both positive and negative cases reach past the registry lookup.
    """
    body = case.body
    items = (
        body.get("tasks") if case.path == "/enqueue/batch" and isinstance(body, dict) else [body]
    )
    if case.path == "/workflows":
        items = body.get("nodes") if isinstance(body, dict) else None
    for item in items if isinstance(items, list) else []:
        name = item.get("type") if isinstance(item, dict) else None
        if isinstance(item, dict) and isinstance(name, str) and TYPE_NAME.fullmatch(name):
            item["type"] = TYPE


def _created(case: schemathesis.Case, response: httpx.Response) -> int:
    """How many tasks a response says it created."""
    if response.status_code not in (200, 201):
        return 0
    if case.path == "/enqueue":
        return 1 if response.status_code == 201 else 0
    return sum(not t["replayed"] and not t.get("duplicate") for t in response.json()["tasks"])


# Every operation of /openapi.json (workflows added four): well past the default 120 s
# on a loaded machine.
@pytest.mark.timeout(600)
async def test_schemathesis_all_operations(
    api: httpx.AsyncClient, settings: Settings, db: asyncpg.Connection
) -> None:
    document = (await api.get("/openapi.json")).json()
    schema = schemathesis.openapi.from_dict(document, config=schemathesis.Config())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} == OPERATIONS
    loop = asyncio.get_running_loop()

    # Hypothesis runs in a thread; requests and queries run on the test's loop, where the app lives.
    def run(coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result()

    def send(case: schemathesis.Case) -> httpx.Response:
        prepared = requests.Request(
            **case.as_transport_kwargs(base_url="http://localhost")
        ).prepare()
        return run(
            api.request(
                prepared.method or "",
                prepared.url or "",
                headers=cast(dict[str, str], dict(prepared.headers)),
                content=cast(bytes | str | None, prepared.body),
            )
        )

    def check(case: schemathesis.Case, mode: schemathesis.GenerationMode) -> None:
        enqueues = case.path in ("/enqueue", "/enqueue/batch")
        if enqueues or case.path in ("/schedules/{name}", "/workflows"):
            _use_registered_type(case)
        before = run(count_tasks(db)) if enqueues else 0
        response = send(case)
        excluded: list[Any] = [positive_data_acceptance] if _unknowable(response) else []
        case.validate_response(
            response, additional_checks=[_problem_check], excluded_checks=excluded
        )
        if enqueues:
            assert run(count_tasks(db)) - before == _created(case, response), response.text

    def fuzz_all() -> tuple[list[str], set[str]]:
        failures, negated = [], set()
        for operation in operations:
            if operation.label in NOT_FUZZED:
                continue
            for mode in schemathesis.GenerationMode:

                @FUZZ_SETTINGS
                @given(case=operation.as_strategy(generation_mode=mode))
                def fuzz(case: schemathesis.Case) -> None:
                    check(case, mode)  # noqa: B023 (runs before the loop moves on)

                try:
                    fuzz()
                    if mode.is_negative:
                        negated.add(operation.label)
                except Unsatisfiable:
                    # Nothing can be negated in an operation without parameters or body.
                    assert mode.is_negative, operation.label
                except (Exception, BaseExceptionGroup) as exc:
                    failures.append(f"{operation.label} [{mode.value}]: {exc}")
        return failures, negated

    failures, negated = await asyncio.to_thread(fuzz_all)
    assert not failures, "\n\n".join(failures)
    assert {"POST /enqueue", "POST /enqueue/batch", "PUT /types/{name}"} <= negated
    assert await count_tasks(db) > 0, "no enqueue succeeded: the fuzzing never reached the insert"


async def test_open_and_protected_operations_match_the_document(
    database_url: str, amqp_url: str, namespace: str, db: asyncpg.Connection
) -> None:
    settings = make_settings(
        database_url=database_url, amqp_url=amqp_url, namespace=namespace, api_keys="k1"
    )
    await declare_topology(settings)
    try:
        async with running_api(settings, relay=False) as api:
            document = (await api.get("/openapi.json")).json()
            for path, item in document["paths"].items():
                url = path.format(id=uuid.uuid4(), name=TYPE)
                for method, operation in item.items():
                    protected = operation.get("security", document["security"]) != []
                    body: dict[str, Any] = {"json": task()} if method in ("post", "put") else {}
                    if path == "/enqueue/batch":
                        body = {"json": {"tasks": [task()]}}
                    response = await api.request(method, url, **body)
                    if protected:
                        assert_problem(response, 401)
                        assert response.headers["www-authenticate"].startswith("Bearer")
                    else:
                        assert response.status_code == 200, (method, path, response.text)
            assert await count_tasks(db) == 0
    finally:
        await delete_namespace(settings)


# --- hand-written hostile requests ------------------------------------------------------------

ENQUEUE_PATHS = ("/enqueue", "/enqueue/batch")


def as_request(path: str, item: bytes) -> bytes:
    """One raw enqueue item as the body of ``path``."""
    return b'{"tasks": [' + item + b"]}" if path == "/enqueue/batch" else item


def prefix(path: str) -> str:
    return "tasks[0]." if path == "/enqueue/batch" else ""


async def test_invalid_utf8_and_lone_surrogates(
    api: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    bad_strings = [
        b'"\xff"',  # never valid in UTF-8
        b'"\xc0\xaf"',  # an overlong "/"
        b'"\xed\xa0\x80"',  # a surrogate encoded in UTF-8
        b'"\xe2\x82"',  # truncated sequence
        b'"\\ud800"',  # lone high surrogate, escaped
        b'"\\udc00\\ud800"',  # a pair in the wrong order
        b'"a\\ud83d"',  # high surrogate at the end
    ]
    for path in ENQUEUE_PATHS:
        for bad in bad_strings:
            for item in (
                b'{"type": ' + bad + b', "payload": {}}',
                b'{"type": "fuzz.echo", "payload": {}, "idempotency_key": ' + bad + b"}",
                b'{"type": "fuzz.echo", "payload": {' + bad + b": 1}}",
                b'{"type": "fuzz.echo", "payload": {"s": ' + bad + b"}}",
                b'{"type": "fuzz.echo", "payload": {"a": [1, {"b": ' + bad + b"}]}}",
            ):
                content = as_request(path, item)
                await refused(api, db, "POST", path, content=content, headers=JSON, field="body")
    for bad in bad_strings:
        content = b'{"queue": ' + bad + b"}"
        await refused(api, db, "PUT", "/types/fuzz.x", content=content, headers=JSON, field="body")
    # A valid surrogate pair is a character like any other, and round-trips.
    for path in ENQUEUE_PATHS:
        item = b'{"type": "fuzz.echo", "payload": {"\\ud83d\\ude00": "\\ud83d\\ude00"}}'
        response = await accepted(
            api, db, "POST", path, content=as_request(path, item), headers=JSON
        )
        if path == "/enqueue":
            assert await stored_payload(api, response) == {"\U0001f600": "\U0001f600"}


def nested(depth: int, kind: str) -> bytes:
    if kind == "array":
        return b"[" * depth + b"]" * depth
    return b'{"a": ' * depth + b"1" + b"}" * depth


async def test_deep_nesting(api: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    for kind in ("array", "object"):
        deep = nested(10_000, kind)
        for path in ENQUEUE_PATHS:
            await refused(api, db, "POST", path, content=deep, headers=JSON, field="body")
            item = b'{"type": "fuzz.echo", "payload": {"deep": ' + deep + b"}}"
            content = as_request(path, item)
            await refused(api, db, "POST", path, content=content, headers=JSON, field="body")
        await refused(api, db, "PUT", "/types/fuzz.x", content=deep, headers=JSON, field="body")
        content = b'{"payload_schema": {"items": ' + deep + b"}}"
        await refused(api, db, "PUT", "/types/fuzz.x", content=content, headers=JSON, field="body")

        # Deeper than taskq stores, yet shallow enough for the parser: refused, never a 500.
        for depth in (300, 1000):
            for path in ENQUEUE_PATHS:
                item = b'{"type": "fuzz.echo", "payload": {"deep": ' + nested(depth, kind) + b"}}"
                content = as_request(path, item)
                field = prefix(path) + "payload"
                await refused(api, db, "POST", path, content=content, headers=JSON, field=field)
                keyed = item[:-1] + b', "idempotency_key": "deep"}'
                content = as_request(path, keyed)
                await refused(api, db, "POST", path, content=content, headers=JSON, field=field)

        # Deep but small and valid: accepted, with and without an idempotency key.
        for path in ENQUEUE_PATHS:
            for key in (b"", b', "idempotency_key": "deep-' + kind.encode() + path.encode() + b'"'):
                item = b'{"type": "fuzz.echo", "payload": {"deep": ' + nested(100, kind) + b"}"
                content = as_request(path, item + key + b"}")
                response = await accepted(api, db, "POST", path, content=content, headers=JSON)
                if path == "/enqueue":
                    expected = orjson.loads(nested(100, kind))
                    assert await stored_payload(api, response) == {"deep": expected}
        schema = b'{"payload_schema": {"items": ' + b'{"items": ' * 99 + b"{}" + b"}" * 101
        response = await api.put("/types/fuzz.deep", content=schema, headers=JSON)
        assert response.status_code in (200, 201), response.text


async def test_deep_payload_against_a_recursive_schema(
    api: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    await put_type(api, "fuzz.tree", payload_schema={"additionalProperties": {"$ref": "#"}})
    for path in ENQUEUE_PATHS:
        for depth, valid in ((20, True), (250, False)):
            tree = nested(depth, "object").replace(b"1", b"{}")
            item = b'{"type": "fuzz.tree", "payload": ' + tree + b"}"
            content = as_request(path, item)
            if valid:
                await accepted(api, db, "POST", path, content=content, headers=JSON)
            else:  # deeper than the schema validator can recurse
                field = prefix(path) + "payload"
                await refused(api, db, "POST", path, content=content, headers=JSON, field=field)


async def test_payload_schema_with_a_dangling_ref(
    api: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    # check_schema accepts these; a payload that reaches the $ref cannot be checked.
    for n, schema in enumerate(
        [
            {"$ref": "#/nowhere"},
            {"$ref": "https://example.invalid/schema.json"},  # never fetched
            {"properties": {"a": {"$ref": "#/$defs/missing"}}},
        ]
    ):
        await put_type(api, f"fuzz.ref{n}", payload_schema=schema)
        for path in ENQUEUE_PATHS:
            item = b'{"type": "fuzz.ref%d", "payload": {"a": 1}}' % n
            content = as_request(path, item)
            field = prefix(path) + "type"
            await refused(api, db, "POST", path, content=content, headers=JSON, field=field)
    await refused(
        api, db, "PUT", "/types/fuzz.re", json={"payload_schema": {"pattern": "("}},
        status=400, field="payload_schema",
    )  # fmt: skip


async def test_ten_megabyte_bodies_are_refused(
    api: httpx.AsyncClient, db: asyncpg.Connection, settings: Settings
) -> None:
    size = 10 * MiB
    chunk = b" " * (64 * 1024)
    for path, method, limit in (
        ("/enqueue", "POST", settings.max_payload_bytes),
        ("/types/fuzz.big", "PUT", settings.max_payload_bytes),
        ("/enqueue/batch", "POST", settings.max_payload_bytes * BATCH_BODY_FACTOR),
    ):
        total = max(size, limit + MiB)
        for announce in (True, False):
            pulled = 0

            async def body() -> AsyncIterator[bytes]:
                nonlocal pulled
                while pulled < total:  # noqa: B023 (consumed within this iteration)
                    pulled += len(chunk)
                    yield chunk

            headers = {**JSON, **({"content-length": str(total)} if announce else {})}
            await refused(
                api, db, method, path, content=body(), headers=headers, status=413, field="body"
            )
            if announce:  # refused from the header alone
                assert pulled <= len(chunk), f"{path}: read {pulled} bytes of a refused body"
            else:  # read up to the limit, not to the end
                assert pulled <= limit + 2 * len(chunk), f"{path}: read {pulled} bytes"

    # A 10 MB batch is within the batch's body limit; its 10 MB payload is not.
    big = {"tasks": [{"type": TYPE, "payload": {"s": "x" * size}}]}
    await refused(api, db, "POST", "/enqueue/batch", json=big, status=413, field="tasks[0].payload")


async def test_payload_size_counts_bytes(
    api: httpx.AsyncClient, db: asyncpg.Connection, settings: Settings
) -> None:
    # 0.6 M three-byte characters: fewer characters than TASKQ_MAX_PAYLOAD_BYTES, more bytes.
    text = "\u20ac" * (settings.max_payload_bytes * 6 // 10)
    batch = {"tasks": [{"type": TYPE, "payload": {"s": text}}]}
    await refused(
        api, db, "POST", "/enqueue/batch", json=batch, status=413, field="tasks[0].payload"
    )


NUMBERS = [
    b"1e308",
    b"-1e308",
    b"9223372036854775808",  # 2**63
    b"18446744073709551616",  # 2**64: orjson reads integers beyond 64 bits as floats
    b"-0",
    b"-0.0",
    b"1e-320",  # subnormal
    b"3.0",  # an integer, as far as JSON is concerned
]


def _int_between(low: int, high: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int | float) and float(v).is_integer() and low <= v <= high


def _duration(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v) and v >= 0


async def test_huge_and_negative_numbers(
    api: httpx.AsyncClient, db: asyncpg.Connection, settings: Settings
) -> None:
    enqueue_fields: dict[str, Callable[[Any], bool]] = {
        "max_attempts": _int_between(1, 100),
        "delay": lambda v: _duration(v) and v <= settings.max_delay,
        "timeout": lambda v: isinstance(v, int | float) and 0 < v <= 7 * 86400,
    }
    for literal in NUMBERS:
        value = orjson.loads(literal)
        for path in ENQUEUE_PATHS:
            for name, valid in enqueue_fields.items():
                item = b'{"type": "fuzz.echo", "payload": {}, "%s": %s}' % (name.encode(), literal)
                content = as_request(path, item)
                if valid(value):
                    await accepted(api, db, "POST", path, content=content, headers=JSON)
                else:
                    field = prefix(path) + name
                    await refused(api, db, "POST", path, content=content, headers=JSON, field=field)
            # Any number is a valid payload value and reads back as the parser read it.
            item = b'{"type": "fuzz.echo", "payload": {"n": %s, "a": [%s]}}' % (literal, literal)
            response = await accepted(
                api, db, "POST", path, content=as_request(path, item), headers=JSON
            )
            if path == "/enqueue":
                assert await stored_payload(api, response) == {"n": value, "a": [value]}

        type_fields: dict[bytes, tuple[str, Callable[[Any], bool]]] = {
            b'{"max_attempts": %s}': ("max_attempts", _int_between(1, 100)),
            b'{"timeout": %s}': ("timeout", enqueue_fields["timeout"]),
            b'{"backoff": {"strategy": "fixed", "delay": %s}}': ("backoff", _duration),
            b'{"backoff": {"strategy": "list", "delays": [1, %s]}}': ("backoff", _duration),
            b'{"backoff": {"strategy": "exponential", "base": %s}}': ("backoff", _duration),
            b'{"backoff": {"strategy": "exponential", "max": %s}}': ("backoff", _duration),
            b'{"backoff": {"strategy": "exponential", "factor": %s}}': (
                "backoff",
                lambda v: 1 <= v <= 100,
            ),
            b'{"backoff": {"strategy": "exponential", "jitter": %s}}': (
                "backoff",
                lambda v: 0 <= v <= 1,
            ),
        }
        for template, (field, valid) in type_fields.items():
            content = template % literal
            if valid(value):
                response = await api.put("/types/fuzz.num", content=content, headers=JSON)
                assert response.status_code in (200, 201), (content, response.text)
            else:
                await refused(
                    api, db, "PUT", "/types/fuzz.num", content=content, headers=JSON, field=field
                )


NUL_CASES = [
    (task(type="fuzz\u0000echo"), "type"),
    (task(type="fuzz.echo\u0000"), "type"),
    (task(idempotency_key="k\u0000"), "idempotency_key"),
    (task(idempotency_key="\u0000"), "idempotency_key"),
    (task(payload={"k\u0000": 1}), "payload"),
    (task(payload={"k": "v\u0000"}), "payload"),
    (task(payload={"k": [{"deep\u0000": None}]}), "payload"),
    (task(queue="default\u0000"), "queue"),
    (task(run_at="2030-01-01T00:00:00Z\u0000"), "run_at"),
]


async def test_nul_characters(api: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    for body, field in NUL_CASES:
        await refused(api, db, "POST", "/enqueue", json=body, status=400, field=field)
        await refused(
            api, db, "POST", "/enqueue/batch", json={"tasks": [task(), body]}, status=400,
            field=f"tasks[1].{field}",
        )  # fmt: skip
    # A raw NUL byte inside a JSON string is malformed JSON.
    await refused(
        api, db, "POST", "/enqueue", content=b'{"type": "a\x00", "payload": {}}', headers=JSON,
        status=400, field="body",
    )  # fmt: skip
    for definition, field in [
        ({"queue": "default\u0000"}, "queue"),
        ({"payload_schema": {"description": "\u0000"}}, "payload_schema"),
        ({"payload_schema": {"properties": {"a\u0000": {}}}}, "payload_schema"),
        ({"backoff": {"strategy": "fixed", "delay": "5s\u0000"}}, "backoff"),
        ({"backoff": {"strategy": "list", "delays": ["\u0000"]}}, "backoff"),
    ]:
        await refused(api, db, "PUT", "/types/fuzz.nul", json=definition, status=400, field=field)
    await refused(api, db, "PUT", "/types/fuzz%00nul", json={}, status=400, field="name")
    assert (await api.get("/types/fuzz.nul")).status_code == 404


METACHARACTERS = [
    "'; DROP TABLE tasks; --",
    '"; DROP TABLE tasks; --',
    "$(rm -rf /)",
    "`rm -rf /`",
    "%s%s%s%n",
    "$1",
    "\\",
    "' OR '1'='1",
    "{}",
    "a\r\nX-Injected: 1",
    "../../etc/passwd",
    "$$ LANGUAGE plpgsql $$",
]


async def test_sql_and_shell_metacharacters(api: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    for text in METACHARACTERS:
        await refused(api, db, "POST", "/enqueue", json=task(type=text), status=400, field="type")
        await refused(
            api, db, "POST", "/enqueue/batch", json={"tasks": [task(type=text)]}, status=400,
            field="tasks[0].type",
        )  # fmt: skip
        # A key with metacharacters is a legal key: stored and replayed exactly.
        request = task(idempotency_key=text, payload={text: text})
        first = await accepted(api, db, "POST", "/enqueue", json=request)
        assert first.status_code == 201
        stored = (await api.get(f"/tasks/{first.json()['id']}")).json()
        assert stored["idempotency_key"] == text and stored["payload"] == {text: text}
        again = await accepted(api, db, "POST", "/enqueue", json=request, created=0)
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        batch = {"tasks": [request, task(idempotency_key=text + " (batch)")]}
        replay = await accepted(api, db, "POST", "/enqueue/batch", json=batch, created=1)
        assert replay.json()["tasks"][0]["id"] == first.json()["id"]
        await refused(
            api, db, "POST", "/enqueue", json={**request, "payload": {}}, status=409,
            field="idempotency_key",
        )  # fmt: skip
    assert (await api.get("/types/fuzz.echo")).status_code == 200  # the registry is intact
    for text in ("'; DROP TABLE task_type; --", "$(id)", "a b", "a\nb", "abc\n"):
        path = "/types/" + quote(text, safe="")
        await refused(api, db, "PUT", path, json={}, status=400, field="name")
    assert [t["name"] for t in (await api.get("/types")).json()["types"]] == [TYPE]


async def test_wrong_content_types(api: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    valid = orjson.dumps(task())
    for path, method in (("/enqueue", "POST"), ("/enqueue/batch", "POST"), ("/types/x", "PUT")):
        for headers in (
            {},  # no content type
            {"content-type": "text/plain"},
            {"content-type": "text/json"},
            {"content-type": "application/x-www-form-urlencoded"},
            {"content-type": "application/jsonx"},
            {"content-type": ""},
        ):
            await refused(
                api, db, method, path, content=valid, headers=headers, status=415,
                field="content-type",
            )  # fmt: skip
        await refused(
            api, db, method, path, files={"type": (None, TYPE)}, status=415, field="content-type"
        )
        await refused(api, db, method, path, data={"type": TYPE}, status=415, field="content-type")
        # JSON is UTF-8 whatever the charset parameter says: latin-1 bytes are malformed.
        latin1 = '{"type": "fuzz.echo", "payload": {"s": "caf\u00e9"}}'.encode("latin-1")
        await refused(
            api, db, method, path, content=latin1,
            headers={"content-type": "application/json; charset=latin-1"}, status=400,
            field="body",
        )  # fmt: skip
    # Media types are case-insensitive, and +json types are JSON.
    for media in (
        "Application/JSON",
        "application/problem+json",
        "application/json; charset=utf-8",
    ):
        await accepted(api, db, "POST", "/enqueue", content=valid, headers={"content-type": media})


async def test_duplicate_keys_take_the_last_value(
    api: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    body = b'{"type": "nope", "type": "fuzz.echo", "payload": {"a": 1, "a": 2}}'
    response = await accepted(api, db, "POST", "/enqueue", content=body, headers=JSON)
    assert response.json()["type"] == TYPE
    assert await stored_payload(api, response) == {"a": 2}
    body = b'{"type": "fuzz.echo", "payload": {}, "payload": 5}'
    await refused(api, db, "POST", "/enqueue", content=body, headers=JSON, field="payload")
    body = b'{"tasks": [], "tasks": [{"type": "fuzz.echo", "payload": {}}]}'
    await accepted(api, db, "POST", "/enqueue/batch", content=body, headers=JSON)
    body = b'{"tasks": [{"type": "fuzz.echo", "payload": {}}], "tasks": 1}'
    await refused(api, db, "POST", "/enqueue/batch", content=body, headers=JSON, field="tasks")


async def test_very_long_strings(api: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    long = "x" * 100_000
    for path in ENQUEUE_PATHS:
        for name in ("type", "queue", "idempotency_key", "run_at"):
            item = orjson.dumps(task(**{name: long}))
            content = as_request(path, item)
            field = prefix(path) + name
            await refused(api, db, "POST", path, content=content, headers=JSON, field=field)
        await refused(
            api, db, "POST", path, content=as_request(path, orjson.dumps({long: 1})),
            headers=JSON, field=prefix(path) + long[:50],
        )  # fmt: skip
        # Long keys and values inside the payload are fine below the size limit.
        payload, key = {long: long * 5}, path[-1] * 255  # the longest key allowed
        item = orjson.dumps(task(payload=payload, idempotency_key=key))
        await accepted(api, db, "POST", path, content=as_request(path, item), headers=JSON)
        stored = await db.fetchrow(
            "SELECT payload::text FROM tasks WHERE idempotency_key = $1", key
        )
        assert orjson.loads(stored["payload"]) == payload
    for body, field in [
        ({"queue": long}, "queue"),
        ({"backoff": {"strategy": long}}, "backoff"),
        ({"backoff": {"strategy": "fixed", "delay": long}}, "backoff"),
        ({"backoff": {"strategy": "fixed", "delay": "9" * 10_000}}, "backoff"),
        ({"backoff": {"strategy": "list", "delays": ["1" * 10_000 + "x"]}}, "backoff"),
        ({long: 1}, long[:50]),
    ]:
        await refused(api, db, "PUT", "/types/fuzz.long", json=body, status=400, field=field)
    await refused(api, db, "PUT", "/types/" + "a" * 10_000, json={}, status=400, field="name")
    response = await api.put("/types/fuzz.long", json={"payload_schema": {"description": long}})
    assert response.status_code == 201, response.text


async def test_run_at_at_the_edges_of_time(api: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    soon = (datetime.now(UTC) + timedelta(seconds=5)).isoformat()
    for run_at, valid in [
        ("1970-01-01T00:00:00Z", True),  # the past: due now
        ("0001-01-01T00:00:00.000001Z", True),
        ("2000-02-29T23:59:59.999999999-23:59", True),
        ("2016-12-31T23:59:60Z", True),  # a leap second
        (soon, True),
        ("0001-01-01T00:00:00Z", False),  # what asyncpg sends as -infinity
        ("0001-01-01T00:00:00+01:00", False),  # before year 1 in UTC
        ("9999-12-31T23:59:59.999999Z", False),
        ("9999-12-31T23:59:60Z", False),
        ("9999-12-31T23:59:59-23:59", False),
        ("2030-02-30T00:00:00Z", False),
        ("2030-01-01T24:00:00Z", False),
        ("2030-01-01T00:00:00Z\n", False),
        ("2030-01-01", False),
    ]:
        for path in ENQUEUE_PATHS:
            content = as_request(path, orjson.dumps(task(run_at=run_at)))
            if valid:
                await accepted(api, db, "POST", path, content=content, headers=JSON)
            else:
                field = prefix(path) + "run_at"
                await refused(api, db, "POST", path, content=content, headers=JSON, field=field)


async def test_a_bad_request_cannot_spoil_concurrent_good_ones(
    api: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    # Concurrent single enqueues share one INSERT: anything that passed validation
    # yet failed in the database would fail every request of that INSERT with it.
    hostile = [
        task(run_at="0001-01-01T00:00:00Z"),
        task(run_at="0001-01-01T00:00:00+01:00"),
        task(payload={"deep": orjson.loads(nested(300, "array"))}),
        task(payload={"s": "\\\u0000"}),
        task(idempotency_key="x\u0000"),
    ] * 4
    good = [task(payload={"i": i}) for i in range(40)]
    responses = await asyncio.gather(
        *(
            api.post("/enqueue", json=body)
            for pair in zip(good, hostile * 2, strict=True)
            for body in pair
        )
    )
    codes = [r.status_code for r in responses]
    assert codes == [201, 400] * 40, codes
    assert await count_tasks(db) == 40


async def test_batch_shapes(api: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    for body in (
        {"tasks": None},
        {"tasks": 1},
        {"tasks": "abc"},
        {"tasks": {"type": TYPE, "payload": {}}},
        {"tasks": [1]},
        {"tasks": [None]},
        {"tasks": [[task()]]},
        {"task": [task()]},
        {},
    ):
        await refused(api, db, "POST", "/enqueue/batch", json=body, status=400, field="tasks")
    for raw in (b"null", b"[]", orjson.dumps([task()]), b'"tasks"', b"1", b"true"):
        await refused(
            api, db, "POST", "/enqueue/batch", content=raw, headers=JSON, status=400, field="body"
        )
    # A literal backslash before "u0000" is text, not a NUL, and is stored as sent.
    response = await accepted(api, db, "POST", "/enqueue", json=task(payload={"s": "\\u0000"}))
    assert await stored_payload(api, response) == {"s": "\\u0000"}


async def test_bearer_tokens(
    database_url: str, amqp_url: str, namespace: str, db: asyncpg.Connection
) -> None:
    settings = make_settings(
        database_url=database_url, amqp_url=amqp_url, namespace=namespace, api_keys="k1,k2"
    )
    await declare_topology(settings)
    good = {"authorization": "Bearer k2"}
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/enqueue", {"json": task()}),
        ("POST", "/enqueue/batch", {"json": {"tasks": [task()]}}),
        ("PUT", f"/types/{TYPE}", {"json": {}}),
        # Authentication comes first: a bad body does not get a 400 or a 413 before it.
        ("POST", "/enqueue", {"content": b"\xff" * 2 * MiB, "headers": JSON}),
        ("POST", "/enqueue/batch", {"content": b"{", "headers": {"content-type": "text/plain"}}),
    ]
    wrong: list[str | bytes | None] = [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer k3",
        "Bearer k",  # a prefix of a key
        "Bearer k1k2",
        "Bearer k1,k2",
        "Basic azE6",
        "k1",
        "Token k1",
        "Bearer\tk1",
        "Bearer k1\u00ff".encode("latin-1"),
    ]
    try:
        async with running_api(settings, relay=False) as api:
            assert (await api.put(f"/types/{TYPE}", json={}, headers=good)).status_code == 201
            for method, path, kwargs in calls:
                for authorization in wrong:
                    headers = dict(kwargs.get("headers", {}))
                    if authorization is not None:
                        headers["authorization"] = authorization
                    arguments = {**kwargs, "headers": headers}
                    body = await refused(
                        api, db, method, path, status=401, field="authorization", **arguments
                    )
                    assert "Bearer" in body["detail"]
                    response = await api.request(method, path, **arguments)
                    assert response.headers["www-authenticate"] == 'Bearer realm="taskq"'
            for key in ("k1", "k2"):
                auth = {"authorization": f"Bearer {key}"}
                await accepted(api, db, "POST", "/enqueue", json=task(), headers=auth)
                batch = {"tasks": [task(), task()]}
                await accepted(
                    api, db, "POST", "/enqueue/batch", json=batch, headers=auth, created=2
                )
    finally:
        await delete_namespace(settings)
