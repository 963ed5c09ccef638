"""The operator dashboard at ``/ui``: static HTML, CSS and JavaScript modules.

The files ship inside the package (``taskq/web/static/ui``), so an installed taskq
serves them with no build step and nothing fetched at run time. They hold no
data: serving them needs no API key. The page reads everything through the API
with the operator's key, so the API's own authentication protects the data.
"""

from __future__ import annotations

from pathlib import Path

from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STATIC = Path(__file__).parent / "static" / "ui"

# Only this origin's own files; no inline script, no framing by other sites.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    # Revalidate on each load (the ETag makes that cheap), so an upgrade shows at once.
    "cache-control": "no-cache",
}


class _Headers:
    """Add the security and caching headers to every response of the wrapped app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def dashboard() -> ASGIApp:
    """The ASGI app to mount at ``/ui``: ``/ui/`` answers index.html."""
    return _Headers(StaticFiles(directory=STATIC, html=True))
