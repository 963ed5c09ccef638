"""Opaque, signed page cursors: a listing accepts only the cursors it handed out.

A cursor is ``<base64url JSON [listing, time, id]>.<base64url HMAC-SHA256, 16 bytes>``.
Anything else (edited, truncated, from another listing, another deployment or no
cursor at all) is refused before it is parsed, so a forged cursor can neither
make the API fail nor steer a query.

The key is ``TASKQ_CURSOR_SECRET`` when set. Otherwise it is derived from the
database URL and the namespace, which every replica serving the same tasks shares,
so replicas behind a load balancer accept each other's cursors. That is enough: a
cursor holds no secret and opens nothing its holder cannot list anyway (the
listing needs the same API key, and its filters reach every position); the
signature is there so that taskq reads only what it wrote. Set the secret when
replicas reach the database under different URLs, or to keep cursors valid
across a change of the URL (a new password makes old cursors a 400).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import uuid
from datetime import datetime

import orjson

from taskq.settings import Settings

MAX_CHARS = 256
TAG_BYTES = 16


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Cursors:
    """Makes and checks the cursors of one deployment."""

    def __init__(self, settings: Settings) -> None:
        secret = settings.cursor_secret or "\0".join(
            ("taskq cursor", settings.database_url, settings.namespace)
        )
        self._key = hashlib.sha256(secret.encode()).digest()

    def _tag(self, body: str) -> str:
        return _b64(hmac.digest(self._key, body.encode(), "sha256")[:TAG_BYTES])

    def encode(self, listing: str, at: datetime, row_id: uuid.UUID) -> str:
        """The cursor of ``listing`` for the page after the row ``(at, row_id)``."""
        body = _b64(orjson.dumps([listing, at.isoformat(), str(row_id)]))
        return f"{body}.{self._tag(body)}"

    def decode(self, listing: str, text: str) -> tuple[datetime, uuid.UUID]:
        """The position a cursor of ``listing`` holds.

        Raises:
            ValueError: it is not a cursor this deployment made for ``listing``.
        """
        body, _, tag = text.partition(".")
        valid = len(text) <= MAX_CHARS and text.isascii()
        if not valid or not hmac.compare_digest(tag, self._tag(body)):
            raise ValueError("not a cursor this API returned")
        try:
            kind, at, row_id = orjson.loads(_unb64(body))
            position = datetime.fromisoformat(at), uuid.UUID(row_id)
        except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
            raise ValueError("not a cursor this API returned") from None
        if kind != listing or position[0].tzinfo is None:
            raise ValueError(f"not a cursor of {listing}")
        return position
