"""The HTTP site: TCP_NODELAY on every connection and the configurable base URL.

Requests outside the base URL get the same JSON 404 as unknown paths inside it.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site
from zope.interface import implementer

from egd.api.cors import CorsPolicy, CorsResource
from egd.api.errors import error_response
from egd.auth import LOCAL_OPERATOR, AuthenticationFailed, Authenticator, Identity
from egd.config import ServerConfig

access_log = Logger(namespace="egd.access")
security_log = Logger(namespace="egd.audit")
_TOKEN_IN_QUERY = re.compile(r"([?&]token=)[^&]*")
#: Paths below the base URL that GET without credentials: liveness and readiness probes (Kubernetes, systemd,
#: load balancers) carry none, and they reveal nothing about kernels or users.
PROBE_PATHS = frozenset({b"healthz", b"readyz"})


class NoDelayHTTPChannel(HTTPChannel):
    """An HTTP channel that disables Nagle's algorithm: small replies must not wait 40 ms for an ACK."""

    def connectionMade(self) -> None:  # noqa: N802 - Twisted hook
        """Set TCP_NODELAY, then carry on as usual."""
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        super().connectionMade()


@implementer(IResource)
class JSONNotFound:
    """A JSON 404 for any path."""

    isLeaf = True

    def getChildWithDefault(self, name: bytes, request: Any) -> Any:  # noqa: N802 - IResource
        """Every child is also not found."""
        return self

    def putChild(self, path: bytes, child: Any) -> None:  # noqa: N802 - IResource
        """No children."""

    def render(self, request: Any) -> bytes:
        """The 404 body."""
        return error_response(request, 404, "Not Found", "")


class BaseURLResource(Resource):
    """Routes ``/<base...>/`` to the application and everything else to a JSON 404."""

    def __init__(self, segments: list[bytes], app: Any) -> None:
        super().__init__()
        self._segments = segments
        self._app = app

    def getChild(self, path: bytes, request: Any) -> Any:  # noqa: N802 - Twisted hook
        """Descend one segment of the base URL, or reach the application."""
        if path != self._segments[0]:
            return JSONNotFound()
        if len(self._segments) == 1:
            return self._app
        return BaseURLResource(self._segments[1:], self._app)

    def render(self, request: Any) -> bytes:
        """The base URL itself without its trailing part."""
        return error_response(request, 404, "Not Found", "")


def client_host(request: Any) -> str:
    """The client's address, for logs."""
    return str(getattr(request.getClientAddress(), "host", "-"))


def loggable_uri(request: Any) -> str:
    """The request's URI with any ``token`` query value masked (it is a credential)."""
    return _TOKEN_IN_QUERY.sub(r"\1***", request.uri.decode("utf-8", "replace"))


class GatewaySite(Site):
    """A Site whose access log goes through twisted.logger at debug level (clients poll often)."""

    def log(self, request: Any) -> None:
        """One structured line per request."""
        access_log.debug("{client} {method} {uri} {status} {size}", client=client_host(request),
                         method=request.method.decode("ascii", "replace"), uri=loggable_uri(request),
                         status=request.code, size=request.sentLength)


def identity_of(request: Any) -> Identity:
    """Who sent ``request`` (set by :class:`AuthGuard`; the local operator when no auth is configured)."""
    return getattr(request, "egd_identity", LOCAL_OPERATOR)


class AuthGuard(Resource):
    """Lets a request through only with a valid credential: ``Authorization: token <t>`` (also ``Bearer``)
    or ``?token=<t>``, as Enterprise Gateway and Jupyter Server's gateway client send it; the caller's
    :class:`egd.auth.Identity` goes on the request. CORS preflights (OPTIONS) pass. A refusal is logged with
    the reason, never the credential."""

    isLeaf = True

    def __init__(self, wrapped: Any, authenticator: Authenticator, public: frozenset[bytes] = frozenset()) -> None:
        """``public``: paths (one segment below the base URL) that GET and HEAD reach without a credential."""
        super().__init__()
        self._wrapped = wrapped
        self._authenticator = authenticator
        self._public = public

    def _is_public(self, request: Any) -> bool:
        """Whether ``request`` reads a public path (exactly one segment below the base URL)."""
        postpath = request.postpath
        return request.method in (b"GET", b"HEAD") and len(postpath) == 1 and postpath[0] in self._public

    def _presented(self, request: Any) -> bytes | None:
        header = request.getHeader(b"authorization") or b""
        scheme, _, value = header.partition(b" ")
        if scheme.lower() in (b"token", b"bearer") and value.strip():
            return bytes(value.strip())
        values = request.args.get(b"token")
        return bytes(values[0]) if values else None

    def render(self, request: Any) -> Any:
        """Authenticate, then hand the request to the application."""
        if request.method != b"OPTIONS" and not self._is_public(request):
            try:
                request.egd_identity = self._authenticator.authenticate(self._presented(request))
            except AuthenticationFailed as exc:
                security_log.warn("refused authentication from {client} for {method} {uri} ({why})",
                                  client=client_host(request), method=request.method.decode("ascii", "replace"),
                                  uri=loggable_uri(request), why=str(exc))
                return error_response(request, 401, "Unauthorized", "A valid token is required: send the header "
                                      "'Authorization: token <token>' or the query parameter token=<token>")
        return self._wrapped.render(request)


def make_site(app_resource: Any, server: ServerConfig, authenticator: Authenticator) -> Site:
    """The Site serving ``app_resource`` under ``server.base_url``, behind ``authenticator`` when it requires a
    credential, with CORS as ``server.allow_origin`` says."""
    base_url = server.base_url
    if authenticator.required:
        public = PROBE_PATHS | ({b"metrics"} if server.metrics_public else frozenset())
        app_resource = AuthGuard(app_resource, authenticator, public)
    app_resource = CorsResource(app_resource, CorsPolicy(server), server)
    segments = [s.encode() for s in base_url.strip("/").split("/") if s]
    root = app_resource if not segments else BaseURLResource(segments, app_resource)
    site = GatewaySite(root)
    site.protocol = NoDelayHTTPChannel  # type: ignore[method-assign,assignment]
    site.displayTracebacks = False
    site.noisy = False
    return site
