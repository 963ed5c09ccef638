"""taskq's SQL: numbered migrations and the named query blocks of ``queries.sql``.

This directory ships inside the wheel as the ``taskq.sql`` package. A query block
starts with ``-- name: <name>`` and ends where the next one starts; its header
comment lists its ``$n`` parameters, since asyncpg has no named parameters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

_BLOCK = re.compile(r"^-- name: (?P<name>[a-z_][a-z0-9_]*)\s*$", re.MULTILINE)
_MIGRATION = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


@cache
def queries() -> dict[str, str]:
    """Every named block of ``queries.sql``, by name."""
    text = resources.files(__name__).joinpath("queries.sql").read_text(encoding="utf-8")
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
