"""The ``taskq`` and ``taskq-rmq-init`` commands.

Exit codes: 0 success, 1 a runtime failure (database or broker unreachable,
topology conflict), 2 invalid configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from taskq import migrate
from taskq._utils import parse_duration, redact
from taskq.amqp import broker
from taskq.amqp.topology import Topology
from taskq.errors import ConfigError, HandlerError, TaskqError
from taskq.settings import Settings, load_settings

# Allocations (net of frees) between young-generation collections; CPython's default is 700.
GC_THRESHOLD = 20_000

Command = Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]]


def _print(*lines: str) -> None:
    for line in lines:
        print(line, flush=True)


async def cmd_config(settings: Settings, args: argparse.Namespace) -> int:
    width = max(len(key) for key in settings.describe())
    _print(*(f"{key:<{width}}  {value}" for key, value in settings.describe().items()))
    return 0


async def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    report = await migrate.migrate(
        settings.session_database_url,
        schema=settings.db_schema,
        history_partition=settings.history_partition,
    )
    if report.created_database:
        _print("created the database")
    if report.applied:
        _print(*(f"applied {label}" for label in report.applied))
    else:
        _print(f"nothing to apply: the schema is at migration {report.current:04d}")
    return 0


def describe_plan(topology: Topology) -> list[str]:
    """The lines ``taskq rmq-init --dry-run`` prints."""
    lines = [f"exchange {e.name} ({e.type}, durable)" for e in topology.exchanges]
    for queue in topology.queues:
        args = " ".join(f"{k}={v}" for k, v in queue.arguments.items())
        lines.append(f"queue    {queue.name} ({queue.purpose}) {args}")
    for b in topology.bindings:
        lines.append(f"bind     {b.source} -> {b.destination} [{b.routing_key}]")
    return lines


async def cmd_rmq_init(settings: Settings, args: argparse.Namespace) -> int:
    topology = settings.topology()
    if args.dry_run:
        _print(*describe_plan(topology))
        _print(
            f"dry run: {len(topology.exchanges)} exchanges, {len(topology.queues)} queues, "
            f"{len(topology.bindings)} bindings planned; nothing was declared"
        )
        return 0
    await _rmq_init(settings, topology)
    return 0


async def _rmq_init(settings: Settings, topology: Topology) -> None:
    connection = await broker.connect(
        settings.amqp_urls, name="taskq-rmq-init", robust=False, heartbeat=settings.amqp_heartbeat
    )
    try:
        report = await broker.declare(connection, topology)
    finally:
        await connection.close()
    if report.changed:
        _print(*(f"declared {name}" for name in report.created))
        _print(
            f"declared {len(report.created)} new objects; {len(report.existing)} already "
            f"existed as planned; {report.bindings} bindings in place"
        )
    else:
        _print(
            f"no changes: all {len(report.existing)} exchanges and queues already exist "
            f"as planned; {report.bindings} bindings in place"
        )


def _server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, telling the app when it begins to stop.

        uvicorn's graceful shutdown waits for open responses to end; the app's
        event streams end when ``stopping`` is set, instead of holding it up.
        """

        stopping: asyncio.Event | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.stopping is not None:
                # No loop running: nothing is streaming.
                with contextlib.suppress(RuntimeError):
                    asyncio.get_running_loop().call_soon_threadsafe(self.stopping.set)
            super().handle_exit(sig, frame)

    return Server


async def cmd_api(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from taskq import logs
    from taskq.web.api import create_app

    logs.configure(settings.log_level)
    if args.host:  # the app's default allowed hosts include the bind address
        settings = settings.model_copy(update={"http_host": args.host})
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.http_host,
        port=args.port if args.port is not None else settings.http_port,
        log_level=settings.log_level.lower(),
        access_log=False,
        log_config=None,  # the JSON logs configured above
        lifespan="on",
    )
    server = _server_class()(config)
    server.stopping = app.state.stopping
    # uvicorn re-raises the signal it stopped for once it has shut down; a
    # graceful stop is a success, so that re-raise lands in a no-op handler.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    await server.serve()
    return 0 if server.started else 1


async def cmd_enqueue(settings: Settings, args: argparse.Namespace) -> int:
    from taskq.client import Client

    try:
        payload = json.loads(args.payload)
        unique = None if args.unique is None else json.loads(args.unique)
    except ValueError as exc:
        print(f"taskq: the payload or --unique is not JSON: {exc}", file=sys.stderr)
        return 2
    async with Client.connect(settings) as client:
        result = await client.enqueue(
            args.type,
            payload,
            queue=args.queue,
            idempotency_key=args.idempotency_key,
            delay=args.delay,
            max_attempts=args.max_attempts,
            unique=unique,
        )
    replayed = not result.created and not result.duplicate
    _print(json.dumps({**result.task, "replayed": replayed}, default=str))
    return 0


async def cmd_types(settings: Settings, args: argparse.Namespace) -> int:
    from taskq.store import Store

    if args.action != "list" and args.name is None:
        print(f"taskq: types {args.action} needs the type's name", file=sys.stderr)
        return 2
    store = await Store.connect(
        settings.database_url,
        min_size=1,
        max_size=1,
        statement_cache=settings.statement_cache,
        schema=settings.db_schema,
    )
    try:
        if args.action != "list":
            changed = await store.pause_type(args.name, args.action == "pause")
            if changed is None:
                print(f"taskq: no task type {args.name!r}", file=sys.stderr)
                return 1
            _print(f"{args.name} {'paused' if changed.paused else 'resumed'}")
            return 0
        types = await store.task_types()
    finally:
        await store.close()
    if not types:
        _print("no task types registered (workers register theirs at start)")
    for task_type in types:
        state = "enabled" if task_type.enabled else "disabled"
        limit = task_type.concurrency
        gates = " paused" if task_type.paused else ""
        if limit is not None:
            gates += f" concurrency={limit.limit}" + (f" per {limit.key}" if limit.key else "")
        _print(
            f"{task_type.name:<32} queue={task_type.queue:<10}"
            f" max_attempts={task_type.max_attempts:<3}"
            f" timeout={task_type.timeout_seconds:g}s {state}{gates}"
            + (f" unique={task_type.unique_spec}" if task_type.unique_spec else "")
            + (f" rate_limit={task_type.limiter}" if task_type.limiter else "")
        )
    return 0


async def cmd_limits(settings: Settings, args: argparse.Namespace) -> int:
    from taskq import ratelimits
    from taskq.errors import LimiterInUse
    from taskq.store import Store

    if args.action != "list" and args.name is None:
        print(f"taskq: limits {args.action} needs the limiter's name", file=sys.stderr)
        return 2
    limit = None
    if args.action == "set":
        body = {"limit": args.limit, "per": args.per, "burst": args.burst, "key": args.key}
        problems = ratelimits.problems(body, "")
        if not ratelimits.LIMITER_NAME.match(args.name):
            print("taskq: a limiter name is letters, digits, '.', '_' or '-'", file=sys.stderr)
            return 2
        if problems:
            print(f"taskq: --{problems[0].field}: {problems[0].message}", file=sys.stderr)
            return 2
        limit = ratelimits.parse(body)
    store = await Store.connect(
        settings.database_url,
        min_size=1,
        max_size=1,
        statement_cache=settings.statement_cache,
        schema=settings.db_schema,
    )
    try:
        if args.action == "list":
            found = await store.limiters()
            if not found:
                _print("no rate limiters (PUT /limits/{name}, or rate_limit= on a handler)")
            for r in found:
                _print(
                    f"{r.name:<32} {r.rate}/{r.per_seconds:g}s burst={r.burst}"
                    + (f" key={r.key}" if r.key else "")
                    + f" types={','.join(r.types) or '-'}"
                )
            return 0
        if limit is not None:
            created = await store.put_limiter(args.name, limit)
            _print(f"{'created' if created else 'replaced'} rate limiter {args.name}")
            return 0
        try:
            deleted = await store.delete_limiter(args.name)
        except LimiterInUse as exc:
            print(f"taskq: {exc}", file=sys.stderr)
            return 1
    finally:
        await store.close()
    if not deleted:
        print(f"taskq: no rate limiter {args.name!r}", file=sys.stderr)
        return 1
    _print(f"deleted rate limiter {args.name}")
    return 0


async def cmd_schedules(settings: Settings, args: argparse.Namespace) -> int:
    from taskq.client import Client
    from taskq.fleet import schedules

    if args.action != "list" and args.name is None:
        print(f"taskq: schedules {args.action} needs the schedule's name", file=sys.stderr)
        return 2
    async with Client.connect(settings) as client:
        store = client.store
        if args.action == "list":
            found = await store.schedules("", 10_000)
            if not found:
                _print("no schedules (PUT /schedules/{name}, or schedule= on a handler)")
            for s in found:
                when = s.cron if s.cron is not None else f"every {s.every_seconds:g}s"
                state = "paused" if s.paused else f"next {s.next_fire_at.isoformat()}"
                _print(
                    f"{s.name:<28} {when:<20} {s.timezone:<16} {s.type:<24} {state}"
                    f" fires={s.fires} skipped={s.skipped}"
                    + (f" error: {s.last_error}" if s.last_error else "")
                )
            return 0
        if args.action == "delete":
            done = await store.delete_schedule(args.name)
        elif args.action == "trigger":
            fired = await schedules.fire_now(store, client.publisher, args.name)
            done = fired is not None
            if fired is not None and fired[1] is None:
                print(f"taskq: {fired[0].last_error}", file=sys.stderr)
                return 1
            if fired is not None:
                _print(f"enqueued task {fired[1]}")
        else:
            paused = args.action == "pause"
            done = await schedules.set_paused(store, args.name, paused=paused) is not None
    if not done:
        print(f"taskq: no schedule {args.name!r}", file=sys.stderr)
        return 1
    return 0


async def cmd_queues(settings: Settings, args: argparse.Namespace) -> int:
    """List the work queues with their pauses, or pause or resume one (as
    ``POST /queues/{name}/pause|resume`` does, the author recorded as ``cli``)."""
    from taskq.settings import QUEUE_NAME
    from taskq.store import Store

    name = args.name
    if args.action != "list" and (name is None or not QUEUE_NAME.fullmatch(name)):
        print(f"taskq: queues {args.action} needs a queue's name", file=sys.stderr)
        return 2
    if args.reason is not None and len(args.reason) > 1000:
        print("taskq: --reason takes at most 1000 characters", file=sys.stderr)
        return 2
    store = await Store.connect(
        settings.database_url,
        min_size=1,
        max_size=1,
        statement_cache=settings.statement_cache,
        schema=settings.db_schema,
    )
    try:
        if args.action == "list":
            pauses = {pause.queue: pause for pause in await store.queue_pauses()}
            for queue in [*settings.queues, *sorted(set(pauses) - set(settings.queues))]:
                pause = pauses.get(queue)
                state = (
                    "consumed" if pause is None else f"paused since {pause.paused_at.isoformat()}"
                )
                if pause is not None:
                    state += f" by {pause.paused_by}" + (
                        f": {pause.reason}" if pause.reason else ""
                    )
                if queue not in settings.queues:
                    state += " (not in TASKQ_QUEUES)"
                _print(f"{queue:<16} {state}")
            return 0
        if args.action == "pause":
            if name not in settings.queues:
                print(f"taskq: no work queue {name!r} (see TASKQ_QUEUES)", file=sys.stderr)
                return 1
            _, changed = await store.pause_queue(name, paused_by="cli", reason=args.reason)
            _print(f"paused {name}" if changed else f"{name} was paused already")
            return 0
        ended = await store.resume_queue(name)
    finally:
        await store.close()
    if ended is None and name not in settings.queues:
        print(f"taskq: no work queue {name!r} (see TASKQ_QUEUES)", file=sys.stderr)
        return 1
    _print(f"resumed {name}" if ended is not None else f"{name} was not paused")
    return 0


async def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from prometheus_client import start_http_server

    from taskq import handlers, logs
    from taskq.worker import supervisor
    from taskq.worker.worker import Worker

    logs.configure(settings.log_level)
    processes = args.processes or settings.worker_processes
    if processes > 1:
        return await supervisor.supervise(settings, args.argv, processes, args.metrics_port)
    link = None if args.supervisor_fd is None else supervisor.SupervisorLink(args.supervisor_fd)
    queues = [q.strip() for q in args.queues.split(",") if q.strip()] if args.queues else None
    try:
        worker = Worker(
            settings,
            handlers.load(args.module),
            queues=queues,
            concurrency=args.concurrency,
            threads=args.threads,
            prefetch=args.prefetch,
            inline_window=args.inline_window,
        )
    except HandlerError as exc:
        print(f"taskq: {exc}", file=sys.stderr)
        return 2
    if args.metrics_port is not None:
        host = args.metrics_host or settings.http_host
        try:
            start_http_server(args.metrics_port, addr=host, registry=worker.metrics.registry)
        except OSError as exc:
            where = f"{host}:{args.metrics_port}"
            print(f"taskq: cannot serve metrics on {where}: {exc}", file=sys.stderr)
            return 1
    stop = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        # SIGTERM or SIGINT stops gracefully. A second Ctrl-C cuts the grace short;
        # a repeated SIGTERM does not (`taskq run` sends one after the terminal's SIGINT).
        if stop.is_set() and sig == signal.SIGINT:
            worker.hurry()
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    if link is not None:
        link.watch(stop)  # a worker of `--processes N` stops when its supervisor is gone
    await worker.run(stop, on_started=None if link is None else link.ready)
    if worker.runaways():
        # The event loop's close would wait for abandoned handlers for ever.
        logging.shutdown()
        os._exit(0)
    return 0


async def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    """Migrate, declare the topology, then run the API and a demo worker until stopped."""
    await cmd_migrate(settings, args)
    await _rmq_init(settings, settings.topology())
    if args.setup_only:
        _print("taskq is set up: database migrated and topology declared")
        return 0
    commands = {
        "api": ["api"],
        "worker": ["worker", args.handlers],
    }
    processes = {
        name: await asyncio.create_subprocess_exec(sys.executable, "-m", "taskq", *argv)
        for name, argv in commands.items()
    }
    _print(
        f"taskq is running: API on http://{settings.http_host}:{settings.http_port}, "
        f"a worker with the handlers of {args.handlers}; Ctrl-C stops both"
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waits = {asyncio.create_task(p.wait()): name for name, p in processes.items()}
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([*waits, stopper], return_when=asyncio.FIRST_COMPLETED)
    died = [waits[task] for task in done if task in waits]
    for process in processes.values():
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
    codes = [await process.wait() for process in processes.values()]
    stopper.cancel()
    if died:
        print(f"taskq: {', '.join(died)} stopped unexpectedly; stopped the rest", file=sys.stderr)
        return 1
    return 0 if all(code == 0 for code in codes) else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskq", description="Durable background tasks on RabbitMQ and Postgres."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("config", help="print the effective settings, passwords masked")
    sub.add_parser("migrate", help="create the database if needed and apply pending migrations")
    rmq = sub.add_parser("rmq-init", help="declare the RabbitMQ topology (idempotent)")
    _add_rmq_init_arguments(rmq)
    api = sub.add_parser("api", help="serve the HTTP API")
    api.add_argument("--host", help="default: TASKQ_HTTP_HOST")
    api.add_argument("--port", type=int, help="default: TASKQ_HTTP_PORT")
    enqueue = sub.add_parser("enqueue", help="enqueue one task from the command line")
    enqueue.add_argument("type", help="task type, e.g. demo.echo")
    enqueue.add_argument("payload", help='JSON object, e.g. \'{"to": "a@example.com"}\'')
    enqueue.add_argument("--queue")
    enqueue.add_argument("--idempotency-key")
    enqueue.add_argument("--delay", type=float, help="seconds")
    enqueue.add_argument("--max-attempts", type=int)
    enqueue.add_argument(
        "--unique", help='JSON object, e.g. \'{"key": "$.to", "while": "queued"}\''
    )
    types = sub.add_parser("types", help="list the registered task types, pause or resume one")
    types.add_argument("action", nargs="?", default="list", choices=["list", "pause", "resume"])
    types.add_argument("name", nargs="?", help="the task type (pause, resume)")
    schedules = sub.add_parser("schedules", help="list, pause, resume, trigger or delete schedules")
    schedules.add_argument(
        "action",
        nargs="?",
        default="list",
        choices=["list", "pause", "resume", "trigger", "delete"],
    )
    schedules.add_argument("name", nargs="?", help="the schedule (all but list)")
    queues = sub.add_parser("queues", help="list the work queues, or pause or resume one")
    queues.add_argument("action", nargs="?", default="list", choices=["list", "pause", "resume"])
    queues.add_argument("name", nargs="?", help="the queue (pause and resume)")
    queues.add_argument("--reason", help="why (pause), shown by GET /queues and the dashboard")
    limits = sub.add_parser("limits", help="list, set or delete rate limiters")
    limits.add_argument("action", nargs="?", default="list", choices=["list", "set", "delete"])
    limits.add_argument("name", nargs="?", help="the limiter (set and delete)")
    limits.add_argument("--limit", type=int, help="starts allowed per --per (set)")
    limits.add_argument("--per", default="1s", help="the interval, e.g. 1s, 1m (default 1s)")
    limits.add_argument("--burst", type=int, default=1, help="starts at once (default 1)")
    limits.add_argument("--key", help="a payload field: one bucket per value of it")
    worker = sub.add_parser("worker", help="run tasks with the handlers of MODULE[:ATTR]")
    worker.add_argument(
        "module", help="module with a taskq.handlers.Registry (attribute 'handlers' by default)"
    )
    worker.add_argument(
        "--queues", help="comma-separated, highest priority first (default: TASKQ_QUEUES)"
    )
    worker.add_argument(
        "--concurrency", type=_positive, help="tasks running at once (TASKQ_WORKER_CONCURRENCY)"
    )
    worker.add_argument(
        "--threads",
        type=_positive,
        help="sync handlers running at once"
        " (TASKQ_WORKER_THREADS; default: the concurrency, at most 32)",
    )
    worker.add_argument(
        "--prefetch",
        type=_positive,
        help="envelopes buffered per queue (TASKQ_WORKER_PREFETCH; default: the concurrency)",
    )
    worker.add_argument(
        "--inline-window",
        type=_duration,
        help="how long a claim's transaction waits for its handlers, so that quick successes"
        " commit with it, e.g. 5ms; 0: off (TASKQ_WORKER_INLINE_WINDOW; at most 1s)",
    )
    worker.add_argument(
        "--processes",
        type=_positive,
        help="worker processes under one supervisor (TASKQ_WORKER_PROCESSES)",
    )
    worker.add_argument(
        "--metrics-port", type=int, help="serve /metrics on this port (the i-th process: +i)"
    )
    worker.add_argument("--supervisor-fd", type=int, help=argparse.SUPPRESS)
    worker.add_argument("--metrics-host", help="default: TASKQ_HTTP_HOST")
    run = sub.add_parser(
        "run", help="run the whole system locally: migrate, topology, API and a demo worker"
    )
    run.add_argument(
        "--handlers", default="taskq.demo", help="the worker's handler module (default taskq.demo)"
    )
    run.add_argument(
        "--setup-only", action="store_true", help="migrate and declare the topology, then exit"
    )
    return parser


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _add_rmq_init_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dry-run", action="store_true", help="print the plan without touching the broker"
    )


COMMANDS: dict[str, Command] = {
    "config": cmd_config,
    "migrate": cmd_migrate,
    "rmq-init": cmd_rmq_init,
    "run": cmd_run,
    "api": cmd_api,
    "enqueue": cmd_enqueue,
    "types": cmd_types,
    "schedules": cmd_schedules,
    "queues": cmd_queues,
    "limits": cmd_limits,
    "worker": cmd_worker,
}


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        return None
    return uvloop.new_event_loop


def _tune_gc() -> None:
    """Collect garbage less often than CPython's default of every 700 allocations.

    A busy API or worker allocates a few objects per request or delivery that
    live until it is answered; collections every 700 allocations kept scanning
    them. What is loaded by now (modules, settings) lives as long as the process:
    frozen, no collection scans it again.
    """
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)


def _execute(command: Command, args: argparse.Namespace) -> int:
    urls: list[str] = []
    try:
        # aiormq narrates connection failures on stderr; the one-line error says it.
        for noisy in ("aio_pika", "aiormq"):
            logging.getLogger(noisy).setLevel(logging.CRITICAL)
        settings = load_settings()
        urls = [settings.database_url, settings.session_database_url, *settings.amqp_urls]
        _tune_gc()
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(command(settings, args))
    except ConfigError as exc:
        print(f"taskq: {exc}", file=sys.stderr)
        return 2
    except TaskqError as exc:
        # A driver's message should not hold a password; never print one if it does.
        print(f"taskq: error: {redact(str(exc), urls)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for `worker --processes N`
    return _execute(COMMANDS[args.command], args)


def rmq_init_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="taskq-rmq-init", description="Declare the taskq RabbitMQ topology (idempotent)."
    )
    _add_rmq_init_arguments(parser)
    return _execute(cmd_rmq_init, parser.parse_args(argv))
