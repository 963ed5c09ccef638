"""Which ``Host`` headers the API answers (``TASKQ_ALLOWED_HOSTS``), against DNS rebinding.

A page on ``http://evil.example`` can point that name at 127.0.0.1 once it has
loaded; its scripts then reach the API as "the same origin", with
``Host: evil.example``. Answering only the names the API is known by closes that
door. An IP address as the Host cannot be rebound (the browser's origin is that
address itself), so it is safe wherever the server listens on it.

The default (an empty list) is the loopback names (``localhost``, ``127.0.0.1``,
``::1``) and the bind address (``TASKQ_HTTP_HOST``, or ``--host``). A wildcard bind
address (``0.0.0.0``, ``::``) names no host, so it adds every IP address instead:
the API answers whatever address it is reached at, and by name only as localhost.
A list replaces the default: names, ``.example.com`` for a domain and its
subdomains, IP addresses; ``*`` turns the check off. Ports are ignored. A request
without a Host header (HTTP/1.0) is answered: no browser sends one.
"""

from __future__ import annotations

import ipaddress

from taskq.settings import Settings

LOOPBACK = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::", "")
MAX_HOST_CHARS = 300
MAX_SEEN = 256


def host_name(value: str) -> str | None:
    """The name of a Host header without its port, lower-cased; None if malformed."""
    value = value.strip().lower()
    if not value or len(value) > MAX_HOST_CHARS:
        return None
    if value.startswith("["):  # an IPv6 literal: [::1]:8000
        name, bracket, port = value[1:].partition("]")
        if not bracket:
            return None
    else:
        name, colon, port = value.partition(":")
        port = colon + port
    if port and not (port.startswith(":") and port[1:].isdigit() and len(port) <= 6):
        return None
    return name.removesuffix(".") or None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostCheck:
    """Decides from the settings whether a Host header may be answered."""

    def __init__(self, settings: Settings) -> None:
        entries = [e.strip().lower() for e in settings.allowed_hosts if e.strip()]
        self.any = "*" in entries
        self.any_ip = False
        if not entries:
            entries = list(LOOPBACK)
            bind = settings.http_host.strip().lower().strip("[]")
            if bind in WILDCARD_BINDS:
                self.any_ip = True
            else:
                entries.append(bind)
        self.names = frozenset(e.strip("[]") for e in entries if not e.startswith("."))
        self.domains = tuple(e for e in entries if e.startswith("."))
        # Answers for the Host headers seen lately: the same one or few, request after request.
        self._seen: dict[str, bool] = {}

    def allows(self, header: str | None) -> bool:
        if self.any or header is None:
            return True
        known = self._seen.get(header)
        if known is None:
            if len(self._seen) >= MAX_SEEN:  # hostile hosts cannot grow it
                self._seen.clear()
            known = self._seen[header] = self._allows(header)
        return known

    def _allows(self, header: str) -> bool:
        name = host_name(header)
        if name is None:
            return False
        if name in self.names or any(name == d[1:] or name.endswith(d) for d in self.domains):
            return True
        return self.any_ip and _is_ip(name)
