"""Browsers: the Host check (DNS rebinding), CORS for the REST API and the origin check of kernel WebSockets
(``server.allowed_hosts``, ``server.allow_origin``).

Non-browser clients (Jupyter Server's gateway client, scripts) send no ``Origin`` and are unaffected. A browser
page may call the API, or open a kernel's WebSocket, only from an origin listed in ``allow_origin`` (``*``:
any) or from egd's own origin. A WebSocket is not covered by CORS at all, which is why its origin is checked
here: otherwise any web page could drive a kernel with the credentials its browser holds.

DNS rebinding: a page on ``rebind.example`` whose name then resolves to 127.0.0.1 talks to egd as a same-origin
page (its ``Origin`` equals its ``Host``). Only the ``Host`` header betrays it, so egd serves only the host names
it knows (:class:`HostPolicy`), and egd's "own origin" is never a ``Host`` it does not serve.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from twisted.logger import Logger
from twisted.web.resource import Resource

from egd.api.errors import error_response
from egd.api.redact import printable
from egd.config import ServerConfig

security_log = Logger(namespace="egd.audit")

#: Host names that always reach egd (besides loopback IP literals): no page elsewhere can rebind them.
LOOPBACK_NAMES = frozenset({"localhost"})
#: A Host header: a bracketed IPv6 literal or a name (no ":" or brackets), then an optional port.
_HOST = re.compile(r"^(?:\[(?P<v6>[0-9a-f:.%]+)\]|(?P<name>[^:\[\]/@\s]+))(?::[0-9]{0,5})?$", re.IGNORECASE)


def host_name(host: str) -> str | None:
    """The name in a ``Host`` header value (lower case, without port, brackets or a final dot); None when the
    value is not a host."""
    found = _HOST.match(host.strip())
    if found is None:
        return None
    return (found.group("v6") or found.group("name")).lower().rstrip(".") or None


class HostPolicy:
    """Which ``Host`` names egd serves: against DNS rebinding, a browser must have reached egd by a name the
    operator chose. Without credentials: the loopback names and ``server.allowed_hosts``; with credentials:
    any host when ``allowed_hosts`` is empty, else those and the loopback names (a stolen DNS name is not
    enough to reach a gateway that needs a token, but an operator may still pin the names)."""

    def __init__(self, allowed_hosts: Iterable[str], secured: bool) -> None:
        self._names = frozenset(filter(None, (host_name(h) for h in allowed_hosts)))
        self._any = secured and not self._names

    def allowed(self, host: str | None) -> bool:
        """Whether a request to this ``Host`` (None: no Host header) is served."""
        if self._any:
            return True
        name = host_name(host) if host else None
        if name is None:
            return False
        if name in LOOPBACK_NAMES or name in self._names:
            return True
        try:
            return ipaddress.ip_address(name).is_loopback  # an IP literal cannot be rebound
        except ValueError:
            return False

    def allows_request(self, request: Any) -> bool:
        """Whether ``request``'s ``Host`` is served. Exactly one Host header is needed, except from an HTTP/1.0
        client (no browser is one), which may send none."""
        hosts = request.requestHeaders.getRawHeaders(b"host") or []
        if not hosts and request.clientproto == b"HTTP/1.0":
            return True
        return len(hosts) == 1 and self.allowed(hosts[0].decode("latin-1"))


class CorsPolicy:
    """Which browser origins may use the gateway."""

    def __init__(self, server: ServerConfig, hosts: HostPolicy) -> None:
        self._origins = frozenset(server.allow_origin)
        self._server = server
        self._hosts = hosts

    def allowed(self, origin: str | None, host: str | None) -> bool:
        """Whether a request with this ``Origin`` (None: not a browser) to this ``Host`` may proceed. The
        request's own origin counts only for a ``Host`` egd serves (else it is a rebound name)."""
        if not origin:
            return True
        if "*" in self._origins or origin.rstrip("/") in self._origins:
            return True
        parts = urlsplit(origin)
        return bool(host) and parts.netloc.lower() == str(host).lower() and self._hosts.allowed(host)

    def headers(self, request: Any) -> bool:
        """Add the CORS response headers for an allowed cross-origin request; False if it is not allowed."""
        origin = (request.getHeader(b"origin") or b"").decode("latin-1")
        host = (request.getHeader(b"host") or b"").decode("latin-1")
        if not origin:
            return True
        if not self.allowed(origin, host):
            return False
        if not self._origins:
            return True  # same origin: no CORS headers needed
        wildcard = "*" in self._origins and not self._server.allow_credentials
        request.setHeader(b"Access-Control-Allow-Origin", b"*" if wildcard else origin.encode("latin-1"))
        if not wildcard:
            request.setHeader(b"Vary", b"Origin")
        if self._server.allow_credentials:
            request.setHeader(b"Access-Control-Allow-Credentials", b"true")
        return True


class CorsResource(Resource):
    """Answers preflights and adds CORS headers around the wrapped (leaf) resource."""

    isLeaf = True

    def __init__(self, wrapped: Any, policy: CorsPolicy, server: ServerConfig) -> None:
        super().__init__()
        self._wrapped = wrapped
        self._policy = policy
        self._server = server

    def render(self, request: Any) -> Any:
        """Preflight: 204 with the allowed methods and headers; a request from an origin that is not allowed:
        403; else pass on."""
        allowed = self._policy.headers(request)
        if not allowed and request.method != b"OPTIONS":
            origin = printable((request.getHeader(b"origin") or b"").decode("latin-1"))
            security_log.warn("refused a request from origin {origin}", origin=origin)
            return error_response(request, 403, "Forbidden", "Requests from this origin are not allowed")
        if request.method == b"OPTIONS":
            request.setResponseCode(204 if allowed else 403)
            if allowed:
                request.setHeader(b"Access-Control-Allow-Methods", ", ".join(self._server.allow_methods).encode())
                request.setHeader(b"Access-Control-Allow-Headers", ", ".join(self._server.allow_headers).encode())
                request.setHeader(b"Access-Control-Max-Age", str(self._server.cors_max_age).encode())
            return b""
        return self._wrapped.render(request)
