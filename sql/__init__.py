"""taskq's SQL: numbered migrations and the named query blocks of ``queries.sql``.

This directory ships inside the wheel as the ``taskq.sql`` package. A query block
starts with ``-- name: <name>`` and ends where the next one starts. Its
statement names its parameters (``:ids``), and its header comment lists them,
in the order the store passes them, on lines that start with ``-- :``
(``-- :ids uuid[], :claim_tokens uuid[]``). asyncpg has no named parameters:
:func:`queries` turns each name into ``$n``, its place in that list, and
refuses a block whose list and statement name different parameters (or that
still numbers its own). psycopg 3 has named parameters but spells them
``%(ids)s``: :func:`psycopg_queries` compiles the same blocks to that style, for
an enqueue on a caller's psycopg connection (:class:`taskq.SyncClient`).

Every object taskq creates lives in one Postgres schema, ``taskq`` unless
``TASKQ_DB_SCHEMA`` names another, so that it cannot clash with an
application's tables in the same database. The SQL names them qualified
(``taskq.tasks``), never through ``search_path``: a client's enqueue runs on
the application's own connection, whose ``search_path`` taskq does not set, and
PgBouncer in transaction mode does not keep one per client. In the files the
word ``taskq`` used as an identifier (outside string literals, quoted
identifiers and comments) is the schema: :func:`compile_schema` replaces it
with the configured name, validated by :func:`check_schema` and quoted as an
identifier. That is the only text substituted into the SQL, and it is an
identifier, which cannot be a bind parameter; values are always ``$n``
parameters. (``taskq_`` prefixes and ``'taskq.actor'`` setting names are other
words and stay as they are.)

A migration runs in one transaction with its record, unless a line of it reads
``-- taskq:no-transaction``: then its statements run one by one, outside any
transaction, as ``CREATE INDEX CONCURRENTLY`` must (it builds an index on a
large table without blocking writes). Such a file may fail half way and run
again, so each of its statements must be idempotent (``IF NOT EXISTS``,
``IF EXISTS``); each ends with ``;`` at the end of a line, and it has no
dollar-quoted bodies. An index such a migration builds concurrently that a
failed run left invalid is dropped before the file runs again (taskq.migrate).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

DEFAULT_SCHEMA = "taskq"
# A plain lower-case identifier: what Postgres takes unquoted and keeps as
# written. pg_ names are reserved for the system's schemas; 50 characters leave
# room for the notification channel <schema>_enqueued within Postgres' 63.
SCHEMA_NAME = re.compile(r"^(?!pg_)[a-z_][a-z0-9_]{0,49}$")
# What may hold the word taskq without naming the schema: a string literal
# (E'' strings are not used), a quoted identifier, a comment; else the word.
_SCHEMA_WORD = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|--[^\n]*|\b(taskq)\b""")
# A parameter (not a :: cast), and what may hold one without being one.
_PARAMETER = re.compile(
    r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|--[^\n]*|(?<![:\w]):(?P<name>[a-z_][a-z0-9_]*)|\$(?P<n>\d+)"""
)
_LISTED = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")
_BLOCK = re.compile(r"^-- name: (?P<name>[a-z_][a-z0-9_]*)\s*$", re.MULTILINE)
_MIGRATION = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")
_NO_TRANSACTION = re.compile(r"^-- taskq:no-transaction\s*$", re.MULTILINE)
_CONCURRENT_INDEX = re.compile(
    r"\bCREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+(?:IF\s+NOT\s+EXISTS\s+)?"
    r"(?P<name>[a-z_][a-z0-9_]*)\b",
    re.IGNORECASE,
)


def check_schema(name: str) -> str:
    """Return ``name`` if it can name taskq's schema.

    Raises:
        ValueError: unless it is 1-50 lower-case letters, digits and ``_``, not
            starting with a digit or ``pg_``.
    """
    if not SCHEMA_NAME.fullmatch(name):
        raise ValueError(
            "use 1-50 lower-case letters, digits or '_', not starting with a digit or 'pg_'"
        )
    return name


def compile_schema(text: str, schema: str) -> str:
    """``text`` with its schema word (see the module) naming ``schema``, quoted."""
    quoted = '"' + schema.replace('"', '""') + '"'
    return _SCHEMA_WORD.sub(lambda m: quoted if m[1] else m[0], text)


def positional(name: str, block: str) -> str:
    """``block`` with its named parameters numbered ``$n`` (see the module).

    Raises:
        ValueError: naming the block, if its header and its statement disagree.
    """
    return _compile(name, block, lambda parameter, n: f"${n}")[0]


@dataclass(frozen=True)
class NamedQuery:
    """A block compiled for psycopg: ``%(name)s`` placeholders, and the names in the
    order of its header, which is the order the store passes the values in."""

    text: str
    parameters: tuple[str, ...]

    def bind(self, values: Sequence[Any]) -> dict[str, Any]:
        """The parameters psycopg takes for ``values`` given in the header's order.

        Raises:
            ValueError: if there are not as many values as parameters.
        """
        if len(values) != len(self.parameters):
            raise ValueError(f"{len(self.parameters)} parameters, {len(values)} values")
        return dict(zip(self.parameters, values, strict=True))


def pyformat(name: str, block: str) -> NamedQuery:
    """``block`` with its named parameters spelled ``%(name)s``, as psycopg takes them.

    psycopg reads every ``%`` of a statement as the start of a placeholder (it does
    not know SQL's literals and comments), so each one of the block is doubled.

    Raises:
        ValueError: naming the block, if its header and its statement disagree.
    """
    text, listed = _compile(name, block.replace("%", "%%"), lambda p, n: f"%({p})s")
    return NamedQuery(text, tuple(listed))


def _compile(
    name: str, block: str, placeholder: Callable[[str, int], str]
) -> tuple[str, list[str]]:
    """``block`` with each named parameter replaced by ``placeholder(name, n)`` (``n``:
    its place in the header, from 1), and the names the header lists."""
    header = []
    for line in block.splitlines():
        if not line.startswith("--"):
            break
        if line.startswith("-- :"):
            header.append(line)
    listed: list[str] = []
    for parameter in _LISTED.findall("\n".join(header)):
        if parameter in listed:
            raise ValueError(f"query {name!r} lists :{parameter} twice")
        listed.append(parameter)
    used: set[str] = set()

    def replace(match: re.Match[str]) -> str:
        if match["n"]:
            raise ValueError(f"query {name!r} numbers a parameter (${match['n']}): name it")
        if not match["name"]:
            return match[0]
        parameter = match["name"]
        if parameter not in listed:
            raise ValueError(f"query {name!r} uses :{parameter}, which its header does not list")
        used.add(parameter)
        return placeholder(parameter, listed.index(parameter) + 1)

    text = _PARAMETER.sub(replace, block)
    unused = [parameter for parameter in listed if parameter not in used]
    if unused:
        raise ValueError(f"query {name!r} never uses :{', :'.join(unused)}, which its header lists")
    return text, listed


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    def compiled(self, schema: str) -> Migration:
        """The migration naming ``schema`` (its checksum stays the file's, see taskq.migrate)."""
        return Migration(self.version, self.name, compile_schema(self.sql, schema))

    @property
    def transactional(self) -> bool:
        """False for a file marked ``-- taskq:no-transaction``."""
        return _NO_TRANSACTION.search(self.sql) is None

    def statements(self) -> list[str]:
        """The statements of a file run outside a transaction, one per item.

        Raises:
            ValueError: if the file has a dollar-quoted body, which this splitting
                cannot tell apart (such statements belong in a transactional file).
        """
        if "$$" in self.sql:
            raise ValueError("a no-transaction migration may not hold dollar-quoted bodies")
        statements, current = [], []
        for line in self.sql.splitlines():
            if line.lstrip().startswith("--") or not line.strip():
                continue
            current.append(line)
            if line.rstrip().endswith(";"):
                statements.append("\n".join(current))
                current = []
        if current:
            statements.append("\n".join(current))
        return statements

    def concurrent_indexes(self) -> list[str]:
        """The names of the indexes the file builds ``CONCURRENTLY``."""
        return [match["name"] for match in _CONCURRENT_INDEX.finditer(self.sql)]


@cache
def queries(schema: str = DEFAULT_SCHEMA) -> dict[str, str]:
    """Every named block of ``queries.sql``, by name, naming taskq's objects in ``schema``."""
    return {name: positional(name, block) for name, block in _blocks(schema).items()}


@cache
def psycopg_queries(schema: str = DEFAULT_SCHEMA) -> dict[str, NamedQuery]:
    """:func:`queries` compiled for psycopg 3 (see :func:`pyformat`)."""
    return {name: pyformat(name, block) for name, block in _blocks(schema).items()}


def _blocks(schema: str) -> dict[str, str]:
    """The named blocks of ``queries.sql`` as written, naming taskq's objects in ``schema``."""
    text = resources.files(__name__).joinpath("queries.sql").read_text(encoding="utf-8")
    text = compile_schema(text, schema)
    starts = list(_BLOCK.finditer(text))
    blocks = {}
    for match, following in zip(starts, [*starts[1:], None], strict=True):
        end = following.start() if following else len(text)
        blocks[match["name"]] = text[match.end() : end].strip()
    return blocks


def migrations() -> list[Migration]:
    """The migration files, in version order."""
    found = []
    for entry in resources.files(__name__).joinpath("migrations").iterdir():
        match = _MIGRATION.match(entry.name)
        if match:
            sql = entry.read_text(encoding="utf-8")
            found.append(Migration(int(match["version"]), match["name"], sql))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migration files share a version: {versions}")
    return found
