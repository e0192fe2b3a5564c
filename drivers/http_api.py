"""A JSON-over-HTTP client on treq for the resource managers' REST APIs (Kubernetes, the Docker Engine), never
blocking the reactor: :meth:`JsonApi.call` for request and answer, :meth:`JsonApi.stream` for the long-lived,
line-delimited answers that watches and event streams are (one JSON document per line).

Every request is counted (``requests``), so that benchmarks and tests can show what a driver costs its API.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlencode

import treq
from treq.client import HTTPClient
from twisted.internet import ssl
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IPolicyForHTTPS
from zope.interface import implementer

from egd.driverapi import IDriverReactor

log = Logger()

#: The longest line a stream may send (a pod or container document is a few KB; a watch event carries one).
MAX_LINE = 16 * 1024 * 1024


class ApiUnavailable(ConnectionError):
    """The API did not answer (the text says where and why)."""


class ApiError(Exception):
    """The API answered with an error status; ``reason`` is its machine-readable reason where it has one
    (Kubernetes' ``Status.reason``, such as ``AlreadyExists``), ``message`` its own words."""

    def __init__(self, code: int, message: str, reason: str = "") -> None:
        super().__init__(f"HTTP {code}: {message}")
        self.code = code
        self.message = message
        self.reason = reason


def error_of(code: int, body: bytes) -> ApiError:
    """The :class:`ApiError` of an error answer: the ``message`` (and ``reason``) of a JSON body, else its start."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and data.get("message"):
        return ApiError(code, str(data["message"])[:1000], str(data.get("reason") or ""))
    # slurmrestd: {"errors": [{"error": "...", "description": "...", "error_number": N}]}
    errors = data.get("errors") if isinstance(data, dict) else None
    if isinstance(errors, list) and errors and all(isinstance(e, dict) for e in errors):
        words = "; ".join(" ".join(str(e.get(k) or "") for k in ("description", "error")).strip() for e in errors)
        return ApiError(code, words[:1000] or f"HTTP {code}", str(errors[0].get("error_number") or ""))
    return ApiError(code, body[:300].decode("utf-8", "replace").strip() or f"HTTP {code}")


class LineStream(Protocol):
    """Receives a streamed body and hands each complete line, decoded as JSON, to ``on_item``; ``done`` fires
    when the body ends (with None) or fails. :meth:`stop` closes the connection."""

    def __init__(self, on_item: Callable[[Any], None]) -> None:
        self._on_item = on_item
        self._buffer = b""
        self.done: Deferred[None] = Deferred()
        self.stopped = False

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted hook
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            if line.strip():
                self._item(line)
        if len(self._buffer) > MAX_LINE:
            log.warn("API stream: a line longer than {limit} bytes; closing the stream", limit=MAX_LINE)
            self.stop()

    def _item(self, line: bytes) -> None:
        try:
            item = json.loads(line)
        except ValueError:
            log.warn("API stream: a line that is not JSON: {start!r}", start=line[:80])
            return
        try:
            self._on_item(item)
        except Exception:
            log.failure("API stream: handling an item failed")

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: N802 - Twisted hook
        if self._buffer.strip() and not self.stopped:
            self._item(self._buffer)
        self._buffer = b""
        if self.done.called:
            return
        if self.stopped or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)

    def stop(self) -> None:
        """Close the stream (``done`` then fires with None)."""
        self.stopped = True
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()


@implementer(IPolicyForHTTPS)
class ServerTLS:
    """TLS to an API server: its certificate checked against ``ca_pem`` (None: the system's trust store), the
    client certificate sent when given; ``insecure`` (with no CA) skips the check, as kubectl's
    ``insecure-skip-tls-verify`` does."""

    def __init__(self, ca_pem: bytes | None = None, client_cert_pem: bytes | None = None,
                 client_key_pem: bytes | None = None, insecure: bool = False) -> None:
        self._trust: Any = ssl.Certificate.loadPEM(ca_pem) if ca_pem else None
        if self._trust is None and not insecure:
            self._trust = ssl.platformTrust()
        self._client: Any = None
        if client_cert_pem and client_key_pem:
            self._client = ssl.PrivateCertificate.loadPEM(client_key_pem + b"\n" + client_cert_pem)
        self._insecure = insecure and not ca_pem

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:  # noqa: N802 - Twisted interface
        """The TLS connection creator for the server."""
        if self._insecure:
            extra = ({"privateKey": self._client.privateKey.original, "certificate": self._client.original}
                     if self._client else {})
            return _UncheckedTLS(ssl.CertificateOptions(verify=False, **extra))
        return ssl.optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._trust,
                                       clientCertificate=self._client)


class _UncheckedTLS:
    """TLS that accepts any server certificate (only where the operator said so)."""

    def __init__(self, options: ssl.CertificateOptions) -> None:
        self._options = options

    def clientConnectionForTLS(self, protocol: Any) -> Any:  # noqa: N802 - Twisted interface
        """An OpenSSL connection that does not check the server."""
        from OpenSSL import SSL

        connection = SSL.Connection(self._options.getContext(), None)
        connection.set_app_data(protocol)
        return connection


class JsonApi:
    """Requests to one REST API at ``base_url`` through ``agent`` (its TLS or unix-socket endpoint), with the
    ``headers`` every request carries (:meth:`headers` may compute them per request)."""

    def __init__(self, reactor: IDriverReactor, base_url: str, agent: IAgent, pool: HTTPConnectionPool,
                 timeout: float = 10.0, what: str = "API") -> None:
        self._reactor = reactor
        self.base_url = base_url.rstrip("/")
        self._pool = pool
        self._http = HTTPClient(agent)
        self._timeout = timeout
        self.what = what
        self.requests = 0

    def headers(self) -> dict[str, str]:
        """Headers of every request (subclasses add authentication)."""
        return {"Accept": "application/json"}

    def url(self, path: str, params: Mapping[str, str] | None = None) -> str:
        """The full URL of ``path`` with ``params``."""
        query = f"?{urlencode(dict(params))}" if params else ""
        return f"{self.base_url}{path}{query}"

    async def close(self) -> None:
        """Close the kept-alive connections."""
        await self._pool.closeCachedConnections()

    async def call(self, method: str, path: str, params: Mapping[str, str] | None = None, body: Any = None,
                   content_type: str = "application/json", raw: bytes | None = None,
                   ok: tuple[int, ...] = (), headers: Mapping[str, str] | None = None) -> tuple[int, Any]:
        """``(status, decoded JSON or None)``; :class:`ApiError` for an error status not in ``ok``,
        :class:`ApiUnavailable` when no answer came. ``raw`` sends bytes as they are (for example a tar);
        ``headers`` are this request's own (another identity), over :meth:`headers`."""
        headers = {**self.headers(), **(headers or {})}
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            headers["Content-Type"] = content_type
        self.requests += 1
        try:
            response = await self._http.request(
                method, self.url(path, params), data=data, allow_redirects=False,
                headers=Headers({k: [v] for k, v in headers.items()}), timeout=self._timeout)
            content = await treq.content(response)
        except CancelledError:
            raise ApiUnavailable(f"{self.what} at {self.base_url} did not answer within {self._timeout:g}s") from None
        except Exception as exc:
            raise ApiUnavailable(f"{self.what} at {self.base_url}: {str(exc) or type(exc).__name__}") from None
        if response.code >= 400 and response.code not in ok:
            raise error_of(response.code, content)
        if not content.strip():
            return response.code, None
        try:
            return response.code, json.loads(content)
        except ValueError:
            if response.code in ok:
                return response.code, None
            raise ApiError(response.code, f"the answer of {method} {path} is not JSON") from None

    async def content(self, path: str, params: Mapping[str, str] | None = None) -> bytes:
        """The raw body of a ``GET`` (a log); :class:`ApiError` or :class:`ApiUnavailable` if not."""
        self.requests += 1
        headers = Headers({k: [v] for k, v in self.headers().items() if k != "Accept"})
        try:
            response = await self._http.request("GET", self.url(path, params), headers=headers,
                                                timeout=self._timeout)
            content = await treq.content(response)
        except CancelledError:
            raise ApiUnavailable(f"{self.what} at {self.base_url} did not answer within {self._timeout:g}s") from None
        except Exception as exc:
            raise ApiUnavailable(f"{self.what} at {self.base_url}: {str(exc) or type(exc).__name__}") from None
        if response.code >= 400:
            raise error_of(response.code, content)
        return bytes(content)

    async def text(self, path: str, params: Mapping[str, str] | None = None) -> str:
        """The body of a ``GET`` that answers text (a log), decoded."""
        return (await self.content(path, params)).decode("utf-8", "replace")

    async def stream(self, path: str, params: Mapping[str, str] | None, on_item: Callable[[Any], None]) -> LineStream:
        """Open a streamed ``GET`` whose lines go to ``on_item``; the returned stream's ``done`` fires when it
        ends. :class:`ApiError` if it is refused, :class:`ApiUnavailable` if no answer came."""
        self.requests += 1
        headers = Headers({k: [v] for k, v in self.headers().items()})
        try:
            response = await self._http.request("GET", self.url(path, params), headers=headers,
                                                timeout=self._timeout, unbuffered=True)
        except CancelledError:
            raise ApiUnavailable(f"{self.what} at {self.base_url} did not answer within {self._timeout:g}s") from None
        except Exception as exc:
            raise ApiUnavailable(f"{self.what} at {self.base_url}: {str(exc) or type(exc).__name__}") from None
        if response.code >= 400:
            raise error_of(response.code, await treq.content(response))
        stream = LineStream(on_item)
        response.deliverBody(stream)
        return stream
