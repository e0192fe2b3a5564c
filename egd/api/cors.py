"""Browsers: CORS for the REST API and the origin check of kernel WebSockets (``server.allow_origin``).

Non-browser clients (Jupyter Server's gateway client, scripts) send no ``Origin`` and are unaffected. A browser
page may call the API, or open a kernel's WebSocket, only from an origin listed in ``allow_origin`` (``*``:
any) or from egd's own origin. A WebSocket is not covered by CORS at all, which is why its origin is checked
here: otherwise any web page could drive a kernel with the credentials its browser holds.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from twisted.logger import Logger
from twisted.web.resource import Resource

from egd.api.errors import error_response
from egd.config import ServerConfig

security_log = Logger(namespace="egd.audit")


class CorsPolicy:
    """Which browser origins may use the gateway."""

    def __init__(self, server: ServerConfig) -> None:
        self._origins = frozenset(server.allow_origin)
        self._server = server

    def allowed(self, origin: str | None, host: str | None) -> bool:
        """Whether a request with this ``Origin`` (None: not a browser) to this ``Host`` may proceed."""
        if not origin:
            return True
        if "*" in self._origins or origin.rstrip("/") in self._origins:
            return True
        parts = urlsplit(origin)
        return bool(host) and parts.netloc.lower() == str(host).lower()

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
            origin = (request.getHeader(b"origin") or b"").decode("latin-1")[:200]
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
