"""The HTTP site: the Host check, TCP_NODELAY on every connection, the configurable base URL, and the limits
that keep connections from being exhausted (a cap per listener, a deadline for a request's headers and body).

Requests outside the base URL get the same JSON 404 as unknown paths inside it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site
from zope.interface import implementer

from egd.api.cors import CorsPolicy, CorsResource, HostPolicy
from egd.api.errors import error_response
from egd.api.redact import loggable, printable
from egd.auth import LOCAL_OPERATOR, AuthenticationFailed, Authenticator, Identity
from egd.config import ServerConfig

access_log = Logger(namespace="egd.access")
security_log = Logger(namespace="egd.audit")
log = Logger()
#: Paths below the base URL that answer without credentials (GET; other methods get their 405 without one
#: too): liveness and readiness probes (Kubernetes, systemd, load balancers) carry none, and they reveal nothing
#: about kernels or users. They are also served for any Host: a kubelet names the pod's IP.
PROBE_PATHS = frozenset({b"healthz", b"readyz"})
#: Seconds between two log lines about a listener at its connection cap (an attack would flood the log).
CAP_REPORT_INTERVAL = 60.0


class GatewayHTTPChannel(HTTPChannel):
    """An HTTP channel that disables Nagle's algorithm (small replies must not wait 40 ms for an ACK) and tells
    its listener's :class:`ConnectionLimit` where each request stands: the request deadline and the choice of
    the connection to evict depend on it."""

    #: The connection's place in its listener's :class:`ConnectionLimit` (None when not counted).
    slot: LimitedConnection | None = None

    def connectionMade(self) -> None:  # noqa: N802 - Twisted hook
        """Set TCP_NODELAY, then carry on as usual."""
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        super().connectionMade()

    def allHeadersReceived(self) -> None:  # noqa: N802 - Twisted hook
        """The header block is complete: the body's deadline starts."""
        if self.slot is not None:
            self.slot.headers_received()
        super().allHeadersReceived()

    def allContentReceived(self) -> None:  # noqa: N802 - Twisted hook
        """The request is complete: no deadline while it is served (a kernel start takes its time, a WebSocket
        lasts). Called before the request is processed, so before a WebSocket takes the connection over."""
        if self.slot is not None:
            self.slot.request_received()
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:  # noqa: N802 - Twisted hook
        """The response is sent: on a kept-alive connection the next request has its deadline from now. Before
        Twisted's own handling, which may parse a pipelined next request at once."""
        if self.persistent and self.slot is not None:
            self.slot.awaiting_request()
        super().requestDone(request)


class LimitedConnection(ProtocolWrapper):
    """One connection counted by a :class:`ConnectionLimit`: it carries the connection's request deadline.

    It wraps the TCP connection (outside TLS): whatever protocol serves the connection later (a WebSocket takes
    over from the HTTP channel by replacing a ``wrappedProtocol``), the end of every connection is counted.
    """

    factory: ConnectionLimit

    def __init__(self, factory: ConnectionLimit, wrapped: Any) -> None:
        super().__init__(factory, wrapped)
        self._deadline: Any = None  # an IDelayedCall while a deadline runs
        inner = wrapped
        while inner is not None and not isinstance(inner, GatewayHTTPChannel):
            inner = getattr(inner, "wrappedProtocol", None)  # TLS between this and the HTTP channel
        if inner is not None:
            inner.slot = self

    @property
    def SEND_LIMIT(self) -> int:  # noqa: N802 - Twisted's name
        """The real transport's write limit per reactor turn (a WebSocket raises it)."""
        return int(getattr(self.transport, "SEND_LIMIT", 0))

    @SEND_LIMIT.setter
    def SEND_LIMIT(self, value: int) -> None:  # noqa: N802 - Twisted's name
        self.transport.SEND_LIMIT = value  # type: ignore[union-attr]

    def _start_deadline(self) -> None:
        self.cancel_deadline()
        self._deadline = self.factory.clock.callLater(self.factory.header_timeout, self._expired)

    def cancel_deadline(self) -> None:
        """No deadline (any more)."""
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def awaiting_request(self) -> None:
        """A request may start now (a new connection, or the previous response is sent): its header block must
        arrive within ``header_timeout``, and until the request is complete the connection may be evicted."""
        self.factory.awaiting(self)
        self._start_deadline()

    def headers_received(self) -> None:
        """The header block is complete; the body (if any) must arrive within ``header_timeout`` from now."""
        self._start_deadline()

    def request_received(self) -> None:
        """The request is complete: it is served without a deadline and cannot be evicted."""
        self.cancel_deadline()
        self.factory.busy(self)

    def _expired(self) -> None:
        self._deadline = None
        self.factory.busy(self)  # closing: not a candidate for eviction any more
        log.debug("closed a connection from {peer} that did not send its request within {timeout}s",
                  peer=str(self.getPeer()), timeout=self.factory.header_timeout)
        self.loseConnection()

    def evict(self) -> None:
        """Drop the connection at once (the listener needs its place)."""
        self.cancel_deadline()
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            self.loseConnection()


class _Refused(Protocol):
    """A connection past the cap while every counted connection is busy: closed at once."""

    def makeConnection(self, transport: Any) -> None:  # noqa: N802 - Twisted hook
        """Close without a word (an HTTP answer would need the request first)."""
        transport.abortConnection()


class ConnectionLimit(WrappingFactory[LimitedConnection]):
    """At most ``max_connections`` open connections on one listener, and a deadline for every request.

    A request's header block must arrive within ``header_timeout`` of the connection (or of the previous
    response on a kept-alive connection), and its body within ``header_timeout`` of its headers; else the
    connection is closed (Twisted's idle timer restarts with every byte, so one byte now and then would hold a
    connection for ever). At the cap, a new connection takes the place of the oldest one that has not sent a
    complete request yet (a slowloris fills the cap with those; a real client sends its request at once, and
    at most a listen backlog of connections arrive before egd reads it); when every connection is busy (being
    served, or a WebSocket), the new one is closed at once.
    """

    protocol = LimitedConnection
    noisy = False

    def __init__(self, factory: Any, max_connections: int, header_timeout: float, clock: IReactorTime) -> None:
        """``factory``: the site, or TLS in front of it."""
        super().__init__(factory)
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.clock = clock
        self._open: set[LimitedConnection] = set()
        #: Connections still sending a request, oldest first: the candidates for eviction.
        self._waiting: OrderedDict[LimitedConnection, None] = OrderedDict()
        self._evicted = 0
        self._refused = 0
        self._reported_at: float | None = None

    @property
    def open_connections(self) -> int:
        """Connections counted now."""
        return len(self._open)

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802 - Twisted hook
        """A counted connection; at the cap, in place of the oldest incomplete request, or refused."""
        if len(self._open) >= self.max_connections:
            if self._waiting:
                oldest, _ = self._waiting.popitem(last=False)
                self._open.discard(oldest)
                oldest.evict()
                self._evicted += 1
            else:
                self._refused += 1
                self._report()
                return _Refused()
            self._report()
        return super().buildProtocol(addr)

    def registerProtocol(self, p: Any) -> None:  # noqa: N802 - Twisted hook
        """A connection is open: count it; its first request's deadline starts."""
        self._open.add(p)
        p.awaiting_request()

    def unregisterProtocol(self, p: Any) -> None:  # noqa: N802 - Twisted hook
        """A connection is closed (or was evicted before): it counts no more."""
        self._open.discard(p)
        self._waiting.pop(p, None)
        p.cancel_deadline()

    def awaiting(self, connection: LimitedConnection) -> None:
        """``connection`` waits for (the rest of) a request: the newest candidate for eviction."""
        if connection in self._open:
            self._waiting[connection] = None
            self._waiting.move_to_end(connection)

    def busy(self, connection: LimitedConnection) -> None:
        """``connection`` has a complete request (or is closing): never evicted."""
        self._waiting.pop(connection, None)

    def _report(self) -> None:
        """A log line when the cap is first reached, then at most one per interval with the counts."""
        now = self.clock.seconds()
        if self._reported_at is not None and now - self._reported_at < CAP_REPORT_INTERVAL:
            return
        self._reported_at = now
        log.warn("{max} connections open on this listener (server.max_connections): {evicted} connections that "
                 "had not sent their request were dropped and {refused} new ones refused since the last report",
                 max=self.max_connections, evicted=self._evicted, refused=self._refused)
        self._evicted = self._refused = 0


def limit_connections(factory: Any, server: ServerConfig, clock: IReactorTime) -> ConnectionLimit:
    """``factory`` (the site, or TLS in front of it) behind the connection cap and request deadline of
    ``server``."""
    return ConnectionLimit(factory, server.max_connections, server.header_timeout, clock)


@implementer(IResource)
class JSONError:
    """A JSON error for any path."""

    isLeaf = True

    def __init__(self, status: int = 404, reason: str = "Not Found", message: str = "") -> None:
        self._status = status
        self._reason = reason
        self._message = message

    def getChildWithDefault(self, name: bytes, request: Any) -> Any:  # noqa: N802 - IResource
        """Every child is the same error."""
        return self

    def putChild(self, path: bytes, child: Any) -> None:  # noqa: N802 - IResource
        """No children."""

    def render(self, request: Any) -> bytes:
        """The error body."""
        return error_response(request, self._status, self._reason, self._message)


class JSONNotFound(JSONError):
    """A JSON 404 for any path."""


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
    """The request's URI with every ``token`` parameter masked, in any case or encoding (it is a credential)."""
    return loggable(request.uri)


class GatewaySite(Site):
    """A Site that serves only the Host names of its :class:`HostPolicy` (the probes excepted) and whose access
    log goes through twisted.logger at debug level (clients poll often)."""

    def __init__(self, resource: Any, hosts: HostPolicy, probe_paths: frozenset[bytes] = frozenset(),
                 **kwargs: Any) -> None:
        """``probe_paths``: full paths (base URL included) served for any Host."""
        super().__init__(resource, **kwargs)
        self._hosts = hosts
        self._probe_paths = probe_paths

    def getResourceFor(self, request: Any) -> Any:  # noqa: N802 - Twisted hook
        """The resource for ``request``; a JSON 403 when its Host is not served (DNS rebinding)."""
        resource = super().getResourceFor(request)
        if self._hosts.allows_request(request) or request.path in self._probe_paths:
            return resource
        host = b", ".join(request.requestHeaders.getRawHeaders(b"host") or [b"(none)"])
        security_log.warn("refused a request for Host {host} from {client}: {method} {uri} (not in "
                          "server.allowed_hosts)", host=printable(host.decode("latin-1")), client=client_host(request),
                          method=printable(request.method.decode("latin-1")), uri=loggable_uri(request))
        return JSONError(403, "Forbidden", "This gateway is not served under this host name (server.allowed_hosts)")

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
        """Whether ``request`` reads a public path (exactly one segment below the base URL), or is for a probe
        path by any method (the answer to another method is its 405)."""
        postpath = request.postpath
        if len(postpath) != 1:
            return False
        return postpath[0] in PROBE_PATHS or (request.method in (b"GET", b"HEAD") and postpath[0] in self._public)

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
    hosts = HostPolicy(server.allowed_hosts, authenticator.required)
    app_resource = CorsResource(app_resource, CorsPolicy(server, hosts), server)
    segments = [s.encode() for s in base_url.strip("/").split("/") if s]
    root = app_resource if not segments else BaseURLResource(segments, app_resource)
    prefix = b"/" + b"".join(segment + b"/" for segment in segments)
    site = GatewaySite(root, hosts, frozenset(prefix + path for path in PROBE_PATHS))
    site.protocol = GatewayHTTPChannel  # type: ignore[method-assign,assignment]
    site.displayTracebacks = False
    site.noisy = False
    return site
