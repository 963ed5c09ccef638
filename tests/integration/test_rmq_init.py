"""`taskq-rmq-init` against the real broker, read back through the management API.

Every test works in a namespace of its own (deleted afterwards) and runs the CLI
as a subprocess from an empty directory, so no ``.env`` is read.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aio_pika
import httpx
import pytest

from taskq.settings import Settings
from tests.support.services import delete_namespace, make_settings, subprocess_env

pytestmark = pytest.mark.integration

RMQ_INIT = Path(sys.executable).parent / "taskq-rmq-init"
TASKQ = Path(sys.executable).parent / "taskq"
ROOT_VHOST = "%2F"
UNREACHABLE = "amqp://guest:guest@127.0.0.1:1/"


async def run(
    command: list[str | Path], env: dict[str, str], cwd: Path, timeout: float = 60
) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *command,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def rmq_init(settings: Settings, cwd: Path, *args: str, **env: str) -> tuple[int, str, str]:
    return await run([RMQ_INIT, *args], subprocess_env(settings, **env), cwd)


class Management:
    """The parts of the RabbitMQ management API these tests read."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def get(self, path: str) -> Any:
        response = await self.client.get(path)
        response.raise_for_status()
        return response.json()

    async def queues(self, namespace: str, vhost: str = ROOT_VHOST) -> dict[str, dict[str, Any]]:
        rows = await self.get(f"/api/queues/{vhost}")
        return {q["name"]: q for q in rows if q["name"].startswith(namespace + ".")}

    async def exchanges(self, namespace: str, vhost: str = ROOT_VHOST) -> dict[str, dict[str, Any]]:
        rows = await self.get(f"/api/exchanges/{vhost}")
        return {e["name"]: e for e in rows if e["name"].startswith(namespace + ".")}

    async def bindings(
        self, namespace: str, vhost: str = ROOT_VHOST
    ) -> set[tuple[str, str, str, str]]:
        rows = await self.get(f"/api/bindings/{vhost}")
        return {
            (b["source"], b["destination"], b["destination_type"], b["routing_key"])
            for b in rows
            if b["source"].startswith(namespace + ".")
        }

    async def namespace_objects(self, namespace: str) -> set[str]:
        queues = await self.queues(namespace)
        exchanges = await self.exchanges(namespace)
        return {f"queue {n}" for n in queues} | {f"exchange {n}" for n in exchanges}


@pytest.fixture
async def management(management_url: str) -> AsyncIterator[Management]:
    async with httpx.AsyncClient(base_url=management_url, timeout=10) as client:
        yield Management(client)


def test_console_scripts_are_installed() -> None:
    assert RMQ_INIT.is_file(), f"the console script {RMQ_INIT} is not installed"
    assert TASKQ.is_file(), f"the console script {TASKQ} is not installed"


async def assert_declared_as_planned(
    management: Management, settings: Settings, vhost: str = ROOT_VHOST
) -> None:
    topology = settings.topology()
    namespace = settings.namespace

    queues = await management.queues(namespace, vhost)
    assert set(queues) == {q.name for q in topology.queues}
    for planned in topology.queues:
        actual = queues[planned.name]
        assert actual["type"] == settings.queue_type, planned.name
        assert actual["durable"] is True, planned.name
        assert actual["auto_delete"] is False, planned.name
        assert actual["arguments"] == planned.arguments, planned.name

    exchanges = await management.exchanges(namespace, vhost)
    assert {(name, e["type"], e["durable"]) for name, e in exchanges.items()} == {
        (e.name, e.type, True) for e in topology.exchanges
    }

    bindings = await management.bindings(namespace, vhost)
    assert bindings == {
        (b.source, b.destination, b.destination_type, b.routing_key) for b in topology.bindings
    }


# -- idempotence --------------------------------------------------------------------------------


async def test_second_run_changes_nothing_and_says_so(
    amqp_settings: Settings, management: Management, tmp_path: Path
) -> None:
    topology = amqp_settings.topology()
    ns = amqp_settings.namespace
    total = len(topology.exchanges) + len(topology.queues)

    code, out, err = await rmq_init(amqp_settings, tmp_path)
    assert code == 0, err
    assert err == ""
    for name in [ns + ".direct", ns + ".dlx", ns + ".delay.deliver", ns + ".delay.21"]:
        assert f"declared exchange {name}\n" in out
    for name in [ns + ".default", ns + ".critical", ns + ".dlq", ns + ".delay.00"]:
        assert f"declared queue {name}\n" in out
    assert f"declared {total} new objects; 0 already existed" in out
    assert f"{len(topology.bindings)} bindings in place" in out
    assert "no changes" not in out
    first = await management.namespace_objects(ns)
    assert len(first) == total

    code, out, err = await rmq_init(amqp_settings, tmp_path)
    assert code == 0, err
    assert "no changes" in out
    assert f"all {total} exchanges and queues already exist as planned" in out
    assert not any(line.startswith("declared") for line in out.splitlines())
    assert await management.namespace_objects(ns) == first
    await assert_declared_as_planned(management, amqp_settings)

    # `taskq rmq-init` is the same command.
    code, out, err = await run(
        [sys.executable, "-m", "taskq", "rmq-init"], subprocess_env(amqp_settings), tmp_path
    )
    assert code == 0, err
    assert out.startswith("no changes")


async def test_missing_objects_are_declared_next_to_existing_ones(
    amqp_settings: Settings, management: Management, tmp_path: Path
) -> None:
    ns = amqp_settings.namespace
    connection = await aio_pika.connect(amqp_settings.amqp_url)
    try:
        channel = await connection.channel()
        await channel.declare_exchange(ns + ".direct", "direct", durable=True)
    finally:
        await connection.close()

    code, out, err = await rmq_init(amqp_settings, tmp_path)
    assert code == 0, err
    assert f"declared exchange {ns}.direct" not in out
    assert f"declared queue {ns}.default" in out
    assert "1 already existed as planned" in out
    await assert_declared_as_planned(management, amqp_settings)


# -- what the broker holds ----------------------------------------------------------------------


@pytest.fixture(params=["quorum", "classic"])
async def typed_settings(
    request: pytest.FixtureRequest, amqp_url: str, namespace: str
) -> AsyncIterator[Settings]:
    value = make_settings(
        amqp_url=amqp_url, namespace=namespace, queue_type=request.param, delivery_limit=7
    )
    yield value
    await delete_namespace(value)


async def test_declarations_read_back_from_the_broker(
    typed_settings: Settings, management: Management, tmp_path: Path
) -> None:
    settings = typed_settings
    ns = settings.namespace
    code, _, err = await rmq_init(settings, tmp_path)
    assert code == 0, err

    await assert_declared_as_planned(management, settings)

    # The same, spelled out for the objects that matter most.
    queues = await management.queues(ns)
    default = queues[ns + ".default"]
    assert default["type"] == settings.queue_type
    assert default["arguments"]["x-queue-type"] == settings.queue_type
    assert default["arguments"]["x-dead-letter-exchange"] == ns + ".dlx"
    if settings.queue_type == "quorum":
        assert default["arguments"]["x-delivery-limit"] == 7
        assert default["arguments"]["x-dead-letter-strategy"] == "at-least-once"
        assert default["arguments"]["x-overflow"] == "reject-publish"
    else:
        assert "x-delivery-limit" not in default["arguments"]
    assert queues[ns + ".delay.00"]["arguments"]["x-message-ttl"] == 1000
    assert queues[ns + ".delay.00"]["arguments"]["x-dead-letter-exchange"] == ns + ".delay.deliver"
    assert queues[ns + ".delay.05"]["arguments"]["x-message-ttl"] == 32_000
    assert queues[ns + ".delay.05"]["arguments"]["x-dead-letter-exchange"] == ns + ".delay.04"
    assert queues[ns + ".delay.21"]["arguments"]["x-message-ttl"] == 2**21 * 1000
    assert ns + ".delay.22" not in queues
    assert queues[ns + ".dlq"]["type"] == settings.queue_type

    exchanges = await management.exchanges(ns)
    assert exchanges[ns + ".direct"]["type"] == "direct"
    assert exchanges[ns + ".dlx"]["type"] == "fanout"
    assert exchanges[ns + ".delay.deliver"]["type"] == "topic"
    assert exchanges[ns + ".delay.21"]["type"] == "topic"

    bindings = await management.bindings(ns)
    assert (ns + ".direct", ns + ".default", "queue", "default") in bindings
    assert (ns + ".dlx", ns + ".dlq", "queue", "") in bindings
    assert (ns + ".delay.20", ns + ".delay.20", "queue", "*.1.#") in bindings
    assert (ns + ".delay.20", ns + ".delay.19", "exchange", "*.0.#") in bindings
    assert (ns + ".delay.00", ns + ".delay.deliver", "exchange", "*." * 21 + "0.#") in bindings
    for queue in settings.queues:
        assert (ns + ".delay.deliver", f"{ns}.{queue}", "queue", f"#.{queue}") in bindings


# -- conflicts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("existing", "env", "kind", "name", "words"),
    [
        ("classic queue", {}, "queue", "default", ["classic", "quorum", "x-queue-type"]),
        (
            "quorum queue",
            {"TASKQ_QUEUE_TYPE": "classic"},
            "queue",
            "default",
            ["x-queue-type=quorum", "x-queue-type=classic"],
        ),
        (
            "other delivery limit",
            {"TASKQ_DELIVERY_LIMIT": "5"},
            "queue",
            "default",
            ["x-delivery-limit=20", "x-delivery-limit=5"],
        ),
        ("topic exchange", {}, "exchange", "direct", ["topic", "direct"]),
        ("transient exchange", {}, "exchange", "direct", ["durable"]),
    ],
)
async def test_conflict_is_one_line_and_declares_nothing(
    amqp_settings: Settings,
    management: Management,
    tmp_path: Path,
    existing: str,
    env: dict[str, str],
    kind: str,
    name: str,
    words: list[str],
) -> None:
    ns = amqp_settings.namespace
    connection = await aio_pika.connect(amqp_settings.amqp_url)
    try:
        channel = await connection.channel()
        if existing == "classic queue":
            await channel.declare_queue(ns + ".default", durable=True)
        elif existing == "quorum queue":
            await channel.declare_queue(
                ns + ".default", durable=True, arguments={"x-queue-type": "quorum"}
            )
        elif existing == "other delivery limit":
            planned = {q.name: q for q in amqp_settings.topology().queues}[ns + ".default"]
            assert planned.arguments["x-delivery-limit"] == 20
            await channel.declare_queue(ns + ".default", durable=True, arguments=planned.arguments)
        elif existing == "topic exchange":
            await channel.declare_exchange(ns + ".direct", "topic", durable=True)
        else:
            await channel.declare_exchange(ns + ".direct", "direct", durable=False)
    finally:
        await connection.close()
    before = await management.namespace_objects(ns)
    assert before == {f"{kind} {ns}.{name}"}

    code, out, err = await rmq_init(amqp_settings, tmp_path, **env)

    assert code == 1, (out, err)
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert f"{kind} '{ns}.{name}'" in err
    for word in words:
        assert word in err
    assert "wants" in err  # what exists and what is wanted
    assert not any(line.startswith("declared") for line in out.splitlines())
    # Nothing else of the namespace exists: no exchange, no queue, no binding.
    assert await management.namespace_objects(ns) == before
    assert await management.bindings(ns) == set()


async def test_conflict_leaves_the_existing_queue_alone(
    amqp_settings: Settings, management: Management, tmp_path: Path
) -> None:
    ns = amqp_settings.namespace
    connection = await aio_pika.connect(amqp_settings.amqp_url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(ns + ".default", durable=True)
    finally:
        await connection.close()
    code, _, err = await rmq_init(amqp_settings, tmp_path)
    assert code == 1
    assert "classic" in err and "quorum" in err
    queue = (await management.queues(ns))[ns + ".default"]
    assert queue["type"] == "classic"
    assert queue["arguments"] == {}


# -- dry run ------------------------------------------------------------------------------------


async def test_dry_run_prints_the_plan_and_declares_nothing(
    amqp_settings: Settings, management: Management, tmp_path: Path
) -> None:
    ns = amqp_settings.namespace
    topology = amqp_settings.topology()
    code, out, err = await rmq_init(amqp_settings, tmp_path, "--dry-run")
    assert code == 0, err
    assert f"exchange {ns}.direct (direct, durable)" in out
    assert f"exchange {ns}.dlx (fanout, durable)" in out
    for queue in topology.queues:
        assert f"queue    {queue.name} " in out
    assert "x-message-ttl=2097152000" in out
    assert f"bind     {ns}.direct -> {ns}.default [default]" in out
    assert f"bind     {ns}.delay.deliver -> {ns}.low [#.low]" in out
    assert (
        f"dry run: {len(topology.exchanges)} exchanges, {len(topology.queues)} queues, "
        f"{len(topology.bindings)} bindings planned; nothing was declared"
    ) in out
    assert await management.namespace_objects(ns) == set()
    assert await management.bindings(ns) == set()


async def test_dry_run_needs_no_broker(tmp_path: Path) -> None:
    settings = make_settings(amqp_url=UNREACHABLE, namespace="dry")
    code, out, err = await rmq_init(settings, tmp_path, "--dry-run")
    assert code == 0, err
    assert "nothing was declared" in out


async def test_unreachable_broker_is_a_runtime_error(tmp_path: Path) -> None:
    settings = make_settings(amqp_url=UNREACHABLE, namespace="gone")
    code, _, err = await rmq_init(settings, tmp_path)
    assert code == 1
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("taskq: error: cannot connect to the broker")


async def test_unreachable_broker_is_a_one_line_error(tmp_path: Path) -> None:
    settings = make_settings(amqp_url=UNREACHABLE, namespace="gone")
    code, _, err = await rmq_init(settings, tmp_path)
    assert code == 1
    assert err.count("\n") == 1, err


# -- vhost --------------------------------------------------------------------------------------


@pytest.fixture
async def vhost(management: Management) -> AsyncIterator[str]:
    name = f"taskq-test-{uuid.uuid4().hex[:8]}"
    quoted = quote(name, safe="")
    response = await management.client.put(f"/api/vhosts/{quoted}", json={})
    response.raise_for_status()
    try:
        response = await management.client.put(
            f"/api/permissions/{quoted}/guest",
            json={"configure": ".*", "write": ".*", "read": ".*"},
        )
        response.raise_for_status()
        yield name
    finally:
        response = await management.client.delete(f"/api/vhosts/{quoted}")
        assert response.status_code in (204, 404)


async def test_the_amqp_url_vhost_is_honoured(
    amqp_url: str, namespace: str, vhost: str, management: Management, tmp_path: Path
) -> None:
    base = amqp_url.rstrip("/")
    settings = make_settings(amqp_url=f"{base}/{vhost}", namespace=namespace, max_delay="1h")
    code, out, err = await rmq_init(settings, tmp_path)
    assert code == 0, err
    assert "declared queue" in out

    await assert_declared_as_planned(management, settings, vhost=quote(vhost, safe=""))
    # ...and nothing of it in the default vhost.
    assert await management.namespace_objects(namespace) == set()

    code, out, err = await rmq_init(settings, tmp_path)
    assert code == 0, err
    assert "no changes" in out


# -- configuration errors -----------------------------------------------------------------------

COMMANDS: dict[str, list[str | Path]] = {
    "taskq-rmq-init": [RMQ_INIT],
    "taskq rmq-init": [TASKQ, "rmq-init"],
    "taskq migrate": [TASKQ, "migrate"],
    "taskq config": [TASKQ, "config"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize(
    ("variable", "value"), [("TASKQ_QUEUE_TYPE", "bogus"), ("TASKQ_QUEUES", "")]
)
async def test_bad_configuration_is_one_line_and_exit_2(
    command: str, variable: str, value: str, tmp_path: Path
) -> None:
    code, out, err = await run(COMMANDS[command], subprocess_env(**{variable: value}), tmp_path)
    assert code == 2, (out, err)
    assert out == ""
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(f"taskq: invalid {variable}: ")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TASKQ_QUEUES", " , "),
        ("TASKQ_QUEUES", "default,dlq"),
        ("TASKQ_QUEUES", "a.b"),
        ("TASKQ_AMQP_URL", "http://127.0.0.1:5672/"),
        ("TASKQ_AMQP_URL", "amqp://127.0.0.1:notaport/"),
        ("TASKQ_NAMESPACE", "has space"),
        ("TASKQ_DELIVERY_LIMIT", "0"),
        ("TASKQ_MAX_DELAY", "forever"),
    ],
)
async def test_rmq_init_names_the_bad_variable(variable: str, value: str, tmp_path: Path) -> None:
    code, out, err = await run([RMQ_INIT], subprocess_env(**{variable: value}), tmp_path)
    assert code == 2, (out, err)
    assert "Traceback" not in err
    assert err.count("\n") == 1, err
    assert err.startswith(f"taskq: invalid {variable}: ")


# -- taskq config -------------------------------------------------------------------------------


async def test_config_masks_passwords(tmp_path: Path) -> None:
    env = subprocess_env(
        TASKQ_AMQP_URL="amqp://guest:hunter2@127.0.0.1:5672/prod",
        TASKQ_DATABASE_URL="postgresql://postgres:s3cret@127.0.0.1:5432/taskq",
        TASKQ_API_KEYS="key-one,key-two",
        TASKQ_QUEUE_TYPE="classic",
    )
    code, out, err = await run([TASKQ, "config"], env, tmp_path)
    assert code == 0, err
    assert "hunter2" not in out
    assert "s3cret" not in out
    assert "key-one" not in out and "key-two" not in out
    lines = {line.split()[0]: line.split()[1] for line in out.splitlines()}
    assert lines["TASKQ_AMQP_URL"] == "amqp://guest:***@127.0.0.1:5672/prod"
    assert lines["TASKQ_DATABASE_URL"] == "postgresql://postgres:***@127.0.0.1:5432/taskq"
    assert lines["TASKQ_API_KEYS"] == "***,***"
    assert lines["TASKQ_QUEUE_TYPE"] == "classic"
    assert lines["TASKQ_NAMESPACE"] == "taskq"
