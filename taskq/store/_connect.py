"""Opening a connection when the URL lists several hosts and asks for the writable one.

A URL such as ``postgresql://u@h1:5432,h2:5432/db?target_session_attrs=read-write``
names a primary and its standbys; after a failover the writable one is another
host. asyncpg tries the hosts one after the other *within one timeout*: a host
that does not answer at all (its machine is down or cut off, or its server is
frozen, so the TCP handshake or the startup never completes) uses up the whole
timeout, and the hosts after it are never tried. Every new connection then fails
while the promoted standby waits, a few milliseconds away.

:func:`open_connection` therefore tries the hosts of such a URL **at once**, each
with the whole timeout of its own, and keeps the first that accepts writes; it
terminates the others. At most one host accepts writes in a healthy replica set,
so which answered first does not matter. Any other URL (one host, or another
``target_session_attrs``, whose order of preference counts) goes to asyncpg as is.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg

from taskq.store._errors import _DOWN

# The target_session_attrs for which a single host qualifies: the one primary.
WRITABLE = frozenset({"read-write", "primary"})
# asyncpg's default timeout of a connect (seconds).
DEFAULT_TIMEOUT = 60.0


def writable_hosts(url: str) -> list[str] | None:
    """``url`` as one URL per host if it lists several and asks for a writable one
    (each keeps the query, target_session_attrs with it); else None."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    listed = [host for host in hosts.split(",") if host]
    if len(listed) < 2:
        return None
    attrs = parse_qs(parts.query).get("target_session_attrs", [])
    if not attrs or attrs[-1] not in WRITABLE:
        return None
    return [urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host}")) for host in listed]


async def open_connection(
    dsn: str, *, timeout: float = DEFAULT_TIMEOUT, **kwargs: Any
) -> asyncpg.Connection:
    """``asyncpg.connect(dsn, timeout=timeout, **kwargs)``, but for a URL of several hosts
    that asks for the writable one, the hosts are tried at once (see above).

    Usable as ``asyncpg.create_pool(connect=open_connection)``.

    Raises:
        what ``asyncpg.connect`` raises; for a URL tried host by host, the error of
        a host that could not be reached if any, else asyncpg's
        ``TargetServerAttributeNotMatched`` (every host answered, none writable).
    """
    hosts = writable_hosts(dsn)
    if hosts is None:
        connection: asyncpg.Connection = await asyncpg.connect(dsn, timeout=timeout, **kwargs)
        return connection
    attempts = [
        asyncio.ensure_future(asyncpg.connect(host, timeout=timeout, **kwargs)) for host in hosts
    ]
    errors: list[BaseException] = []
    chosen: asyncpg.Connection | None = None
    try:
        pending = set(attempts)
        while pending and chosen is None:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for attempt in attempts:  # in the URL's order, when several end at once
                if attempt not in done:
                    continue
                error = attempt.exception()
                if error is None:
                    # Two writable hosts (a split brain): the first is kept.
                    chosen = chosen or attempt.result()
                elif isinstance(error, _DOWN):
                    errors.append(error)
                else:
                    raise error
    finally:
        await _abandon(attempts, chosen)
    if chosen is not None:
        return chosen
    unreachable = [e for e in errors if not isinstance(e, asyncpg.TargetServerAttributeNotMatched)]
    raise (unreachable or errors)[-1]


async def _abandon(attempts: list[asyncio.Future[Any]], chosen: object) -> None:
    """Cancel the attempts still running and close the connections not ``chosen``."""
    for attempt in attempts:
        attempt.cancel()
    results = await asyncio.gather(*attempts, return_exceptions=True)
    for result in results:
        if isinstance(result, asyncpg.Connection) and result is not chosen:
            result.terminate()
