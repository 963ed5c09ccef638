"""Configuration from ``TASKQ_*`` environment variables and an optional ``.env`` file.

Every field here is listed, with its default and meaning, in ``.env.example``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import SplitResult, urlsplit

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

import taskq.sql as sql
from taskq._utils import format_duration, mask_url, parse_duration
from taskq.amqp.topology import RESERVED_QUEUE_NAMES, Topology, plan
from taskq.errors import ConfigError

ENV_PREFIX = "TASKQ_"

# Queue names end up as the last word of topic routing keys and as a suffix of
# queue names, so they may not contain dots or wildcards.
QUEUE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

Duration = Annotated[float, Field(ge=0)]

# The fields written as durations (``5s``, ``2m``) in the environment and by describe().
_DURATIONS = (
    "amqp_heartbeat",
    "max_delay",
    "max_wait",
    "progress_interval",
    "backoff_fixed",
    "backoff_base",
    "backoff_max",
    "lease_seconds",
    "worker_shutdown_grace",
    "worker_inline_window",
    "sweeper_overdue_after",
    "sweeper_check_every",
    "retention",
    "history_partition",
)


def _csv(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Effective taskq configuration."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
        # Values may hold passwords (the URLs): no error message repeats one.
        hide_input_in_errors=True,
    )

    # Secrets, here and in api_keys, stay out of repr() (describe() masks them).
    database_url: str = Field("postgresql://postgres@127.0.0.1:5432/taskq", repr=False)
    # Empty: database_url. For the connections that keep session state (see
    # session_database_url); a direct one when database_url is a transaction pooler.
    database_session_url: str = Field("", repr=False)
    # What database_url reaches: Postgres itself ("none") or PgBouncer in transaction
    # pooling mode ("pgbouncer": pools keep no named prepared statements).
    database_pooler: Literal["none", "pgbouncer"] = "none"
    db_schema: str = sql.DEFAULT_SCHEMA
    # One URL, or one per node of a cluster, comma-separated (see amqp_urls).
    amqp_url: str = Field("amqp://guest:guest@127.0.0.1:5672/", repr=False)
    amqp_heartbeat: Duration = 10.0
    namespace: str = "taskq"
    queues: Annotated[list[str], NoDecode] = ["critical", "high", "default", "low"]
    queue_type: Literal["quorum", "classic"] = "quorum"
    delivery_limit: int = Field(20, ge=1, le=1000)
    max_delay: Duration = 30 * 86400.0

    http_host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=0, le=65535)
    api_keys: Annotated[list[str], NoDecode, Field(repr=False)] = []
    max_payload_bytes: int = Field(1024 * 1024, ge=1)
    cursor_secret: str = ""
    allowed_hosts: Annotated[list[str], NoDecode] = []
    max_streams: int = Field(100, ge=1)
    max_wait: Duration = 60.0
    max_waiters: int = Field(1000, ge=1)
    max_task_types: int = Field(500, ge=1)
    otel: Literal["auto", "off"] = "auto"
    max_schedules: int = Field(1000, ge=1)
    max_workflow_nodes: int = Field(20000, ge=1, le=1_000_000)
    max_workflow_edges: int = Field(100000, ge=1, le=10_000_000)

    backoff_strategy: Literal["list", "fixed", "exponential"] = "list"
    backoffs: Annotated[list[Duration], NoDecode] = [5.0, 30.0, 120.0, 600.0, 3600.0]
    backoff_fixed: Duration = 10.0
    backoff_base: Duration = 1.0
    backoff_factor: float = Field(2.0, ge=1.0)
    backoff_max: Duration = 3600.0
    backoff_jitter: float = Field(0.1, ge=0.0, le=1.0)

    # 0: as many as the concurrency (per work queue).
    worker_prefetch: int = Field(0, ge=0, le=65535)
    worker_concurrency: int = Field(100, ge=1, le=10000)
    worker_processes: int = Field(1, ge=1, le=1024)
    # 0: as many as TASKQ_WORKER_CONCURRENCY, at most 32
    # (taskq.worker.worker.DEFAULT_THREADS).
    worker_threads: int = Field(0, ge=0, le=10000)
    max_result_bytes: int = Field(1024 * 1024, ge=1)
    max_parent_results_bytes: int = Field(64 * 1024 * 1024, ge=1)
    progress_interval: Duration = 1.0
    lease_seconds: Duration = 30.0
    worker_shutdown_grace: Duration = 30.0
    # 0: off. At most a second: the claim's transaction stays open that long.
    worker_inline_window: Annotated[float, Field(ge=0, le=1.0)] = 0.005
    sweeper_overdue_after: Duration = 60.0
    sweeper_check_every: Duration = 5.0
    retention: Duration = 7 * 86400.0
    # The length of each partition of the task history (task_events): retention
    # drops a partition once it ended longer ago than TASKQ_RETENTION.
    history_partition: Annotated[float, Field(ge=60.0, le=30 * 86400.0)] = 86400.0

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        return _check_postgres_url(value)

    @field_validator("database_session_url")
    @classmethod
    def _check_database_session_url(cls, value: str) -> str:
        return _check_postgres_url(value) if value else value

    @field_validator("database_pooler")
    @classmethod
    def _check_database_pooler(cls, value: str, info: ValidationInfo) -> str:
        # A LISTEN or a session lock through a transaction pooler lands on whichever
        # server connection the pooler lends: notifications get lost and two leaders
        # may run at once. So pgbouncer needs a session URL that is not the pooled one.
        if value == "pgbouncer":
            session, pooled = info.data.get("database_session_url"), info.data.get("database_url")
            if not session:
                raise ValueError(
                    "pgbouncer needs TASKQ_DATABASE_SESSION_URL too: a URL of a session"
                    " connection (Postgres itself, or a pool_mode=session pool) for LISTEN"
                    " and the leader locks"
                )
            if session == pooled:
                raise ValueError(
                    "pgbouncer needs a TASKQ_DATABASE_SESSION_URL other than"
                    " TASKQ_DATABASE_URL (the transaction-pooled one)"
                )
        return value

    @field_validator("db_schema")
    @classmethod
    def _check_db_schema(cls, value: str) -> str:
        sql.check_schema(value)
        return value

    @field_validator("amqp_url")
    @classmethod
    def _check_amqp_url(cls, value: str) -> str:
        split_amqp_urls(value)
        return value

    @field_validator("namespace")
    @classmethod
    def _check_namespace(cls, value: str) -> str:
        if not NAMESPACE.fullmatch(value):
            raise ValueError("use 1-63 letters, digits, '.', '_' or '-'")
        return value

    @field_validator("queues", mode="before")
    @classmethod
    def _split_queues(cls, value: Any) -> Any:
        return _csv(value)

    @field_validator("queues")
    @classmethod
    def _check_queues(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("the queue list is empty")
        for name in value:
            if not QUEUE_NAME.fullmatch(name):
                raise ValueError(f"bad queue name {name!r}: use lowercase letters, digits, _ or -")
            if name in RESERVED_QUEUE_NAMES:
                raise ValueError(f"queue name {name!r} is reserved for taskq's own objects")
        if len(set(value)) != len(value):
            raise ValueError("a queue is listed twice")
        return value

    @field_validator("api_keys", "allowed_hosts", mode="before")
    @classmethod
    def _split_lists(cls, value: Any) -> Any:
        return _csv(value)

    @field_validator("backoffs", mode="before")
    @classmethod
    def _parse_backoffs(cls, value: Any) -> Any:
        items = _csv(value)
        if not items:
            raise ValueError("the backoff list is empty")
        return [parse_duration(item) for item in items]

    @field_validator(*_DURATIONS, mode="before")
    @classmethod
    def _parse_duration(cls, value: Any) -> Any:
        if isinstance(value, str | int | float):
            return parse_duration(value)
        return value

    @field_validator("max_delay")
    @classmethod
    def _check_max_delay(cls, value: float) -> float:
        if value < 1:
            raise ValueError("must be at least 1s")
        return value

    @field_validator("amqp_heartbeat")
    @classmethod
    def _check_heartbeat(cls, value: float) -> float:
        if value != 0 and not 1 <= value <= 65535:
            raise ValueError("0 (off) or from 1s to 65535s")
        return value

    @field_validator("lease_seconds")
    @classmethod
    def _check_lease(cls, value: float) -> float:
        if value < 1:
            raise ValueError("must be at least 1s")
        return value

    @property
    def amqp_urls(self) -> list[str]:
        """The broker's URLs: one, or one per node of a cluster. Every AMQP connection
        starts at one of them and moves to the next when it fails or is lost."""
        return split_amqp_urls(self.amqp_url)

    @property
    def session_database_url(self) -> str:
        """The URL of the dedicated connections that keep session state: LISTEN, the
        relay, sweeper and schedule leader locks, ``taskq migrate``."""
        return self.database_session_url or self.database_url

    @property
    def statement_cache(self) -> bool:
        """Whether pools on ``database_url`` may keep named prepared statements: not
        through PgBouncer 1.18 in transaction mode, whose next transaction may run on
        another server connection, where the statement does not exist."""
        return self.database_pooler == "none"

    @property
    def default_queue(self) -> str:
        """The queue a task type lands in unless it names one: ``default`` if listed."""
        return "default" if "default" in self.queues else self.queues[len(self.queues) // 2]

    def topology(self) -> Topology:
        """The RabbitMQ topology these settings ask for."""
        return plan(
            self.namespace,
            self.queues,
            queue_type=self.queue_type,
            delivery_limit=self.delivery_limit,
            max_delay=self.max_delay,
        )

    def describe(self) -> dict[str, str]:
        """The effective settings as ``TASKQ_*`` variables, passwords masked."""
        out: dict[str, str] = {}
        for name, value in self.model_dump().items():
            key = ENV_PREFIX + name.upper()
            if name in ("database_url", "database_session_url"):
                out[key] = mask_url(value)
            elif name == "amqp_url":
                out[key] = ",".join(mask_url(url) for url in self.amqp_urls)
            elif name == "api_keys":
                out[key] = ",".join("***" for _ in value)
            elif name == "cursor_secret":
                out[key] = "***" if value else ""
            elif name == "backoffs":
                out[key] = ",".join(format_duration(v) for v in value)
            elif name in _DURATIONS:
                out[key] = format_duration(value)
            elif isinstance(value, list):
                out[key] = ",".join(value)
            else:
                out[key] = str(value)
            if not out[key]:
                out[key] = _UNSET.get(name, "(none)")
        return out


# What an empty value means, as `taskq config` prints it.
_UNSET = {
    "api_keys": "(none: every route answers without a key)",
    "cursor_secret": "(derived from TASKQ_DATABASE_URL and TASKQ_NAMESPACE)",
    "allowed_hosts": "(default: localhost, 127.0.0.1, ::1 and TASKQ_HTTP_HOST)",
    "database_session_url": "(TASKQ_DATABASE_URL)",
}


_AMQP_EXAMPLE = "amqp://user:password@host:port/vhost"
# Where one URL of a list ends: a comma (or a semicolon, as Celery and Kombu write
# their failover lists) before the next URL's scheme. A comma within a password
# (RFC 3986 allows one unencoded) stays where it is.
_URL_SEPARATOR = re.compile(r"\s*[,;]\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def split_amqp_urls(value: str) -> list[str]:
    """The URLs of ``TASKQ_AMQP_URL``: one, or several separated by commas.

    Each must be a whole URL (``amqp://u:p@node1:5672/,amqp://u:p@node2:5672/``);
    a list of hosts within one URL, as Postgres URLs allow, is refused, and so is a
    comma after a URL's host (write one in a vhost as ``%2C``).

    Raises:
        ValueError: saying which URL is wrong and how, never repeating any part of it.
    """
    urls = _URL_SEPARATOR.split(value.strip())
    for n, url in enumerate(urls, 1):
        which = f"URL {n} of {len(urls)}: " if len(urls) > 1 else ""
        one_host = ValueError(
            which + "one host per URL: list a whole URL for each node of a cluster,"
            " comma-separated (amqp://user:password@node1/,amqp://user:password@node2/)"
        )
        try:
            parts = check_url(url, ("amqp", "amqps"), _AMQP_EXAMPLE)
        except ValueError as exc:
            hosts = url.partition("://")[2].rpartition("@")[2].partition("/")[0]
            raise (one_host if "," in hosts else ValueError(which + str(exc))) from None
        if "," in parts.netloc.rpartition("@")[2]:
            raise one_host
        if "," in url[len(parts.scheme) + 3 + len(parts.netloc) :]:
            raise ValueError(
                which + "a comma after the host: separate whole URLs with commas"
                " (amqp://node1/,amqp://node2/); write a comma in a vhost as %2C"
            )
    if len(set(urls)) != len(urls):
        raise ValueError("a URL is listed twice")
    return urls


def _check_postgres_url(value: str) -> str:
    parts = check_url(value, ("postgres", "postgresql"), "postgresql://user@host:port/database")
    if not parts.path.strip("/"):
        raise ValueError("the URL names no database")
    return value


def check_url(value: str, schemes: tuple[str, ...], example: str) -> SplitResult:
    """Check a service URL and return its parts.

    The messages never repeat any part of the URL, which may hold a password:
    one with an unencoded ``/``, ``?`` or ``#`` is split elsewhere than its
    author meant, and what a parser calls its port may be a piece of it.
    Postgres URLs may list several ``host:port`` pairs, comma-separated.

    Raises:
        ValueError: saying what is wrong.
    """
    try:
        parts = urlsplit(value)
    except ValueError:
        raise ValueError(f"not a URL; expected {example}") from None
    if parts.scheme not in schemes:
        raise ValueError(f"expected {example}")
    if "@" in value.partition("://")[2][len(parts.netloc) :]:
        raise ValueError(
            "an '@' after the host: write '/', '?', '#' and '@' in a user name or password"
            " percent-encoded (%2F, %3F, %23, %40)"
        )
    hosts = parts.netloc.rpartition("@")[2]
    pairs = hosts.split(",") if parts.scheme.startswith("postgres") else [hosts]
    for n, pair in enumerate(pairs, 1):
        host, port = _host_port(pair)
        which = f" (host {n})" if len(pairs) > 1 else ""
        if not host:
            raise ValueError(f"the URL names no host{which}; expected {example}")
        if port and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"the port{which} is not a number from 1 to 65535")
    return parts


def _host_port(pair: str) -> tuple[str, str]:
    """``host:port`` (or ``[v6]:port``) split in two; the port may be empty."""
    if pair.startswith("["):
        host, _, rest = pair.partition("]")
        return host + "]", rest.removeprefix(":") if rest.startswith(":") else rest
    host, colon, port = pair.rpartition(":")
    return (host, port) if colon else (pair, "")


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, turning the first validation error into a :class:`ConfigError`.

    Raises:
        ConfigError: naming the ``TASKQ_*`` variable at fault.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else "?"
        message = str(error["msg"]).removeprefix("Value error, ")
        raise ConfigError(ENV_PREFIX + field.upper(), message) from None
