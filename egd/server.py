"""Builds egd's service tree from a config: drivers -> kernel manager -> HTTP listener."""

from __future__ import annotations

import ipaddress
import os
from typing import Any

from jupyter_core.paths import jupyter_runtime_dir
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.logger import Logger

from egd.api.app import GatewayAPI
from egd.api.site import make_site
from egd.auth import Authenticator
from egd.config import Config
from egd.kernels.manager import KernelManager
from egd.kernels.specs import KernelSpecStore
from egd.registry import DriverRegistry
from egd.service import AsyncMultiService

log = Logger()


def tls_options(config: Config) -> Any:
    """Twisted TLS options from the configured PEM files (None without TLS); with ``client_ca``, clients must
    present a certificate signed by it."""
    server = config.server
    if not server.certfile or not server.keyfile:
        return None
    from twisted.internet import ssl

    with open(server.certfile, "rb") as cert, open(server.keyfile, "rb") as key:
        private = ssl.PrivateCertificate.loadPEM(key.read() + cert.read())
    if server.client_ca:
        with open(server.client_ca, "rb") as ca:
            return private.options(ssl.Certificate.loadPEM(ca.read()))
    return private.options()


class HTTPListener(Service):
    """Listens for HTTP and WebSocket connections; the last to start, the first to stop."""

    def __init__(self, site: Any, reactor: Any, ip: str, port: int, base_url: str = "/",
                 tls: Any = None) -> None:
        self.name = "http"
        self._base_url = base_url
        self._tls = tls
        self._site = site
        self._reactor = reactor
        self._ip = ip
        self._port = port
        self.port: Any = None

    @property
    def address(self) -> tuple[str, int]:
        """The address actually bound (the port is known after start, also when configured as 0)."""
        host = self.port.getHost()
        return host.host, host.port

    def startService(self) -> Deferred[None]:  # noqa: N802 - Twisted hook
        """Bind the port; fails (CannotListenError) if it is taken."""
        super().startService()
        endpoint: Any
        if self._tls is not None:
            endpoint = SSL4ServerEndpoint(self._reactor, self._port, self._tls, interface=self._ip, backlog=256)
        else:
            endpoint_type = TCP6ServerEndpoint if ":" in self._ip else TCP4ServerEndpoint
            endpoint = endpoint_type(self._reactor, self._port, interface=self._ip, backlog=256)

        async def listen() -> None:
            self.port = await endpoint.listen(self._site)
            host, port = self.address
            shown = f"[{host}]" if ":" in host else host
            scheme = "https" if self._tls is not None else "http"
            log.info("egd is listening on {scheme}://{host}:{port}{base}", scheme=scheme, host=shown, port=port,
                     base=self._base_url)

        return ensureDeferred(listen())

    def stopService(self) -> Deferred[None] | None:  # noqa: N802 - Twisted hook
        """Stop accepting connections."""
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


class Gateway(AsyncMultiService):
    """The root service of one egd process."""

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()
        self.config = config
        runtime_dir = config.kernels.runtime_dir or os.path.join(jupyter_runtime_dir(), "egd")
        threadpool = reactor.getThreadPool()
        self.drivers = DriverRegistry(config, reactor, runtime_dir)
        self.drivers.setServiceParent(self)
        specs = KernelSpecStore(config.kernels, reactor, threadpool)
        self.kernels = KernelManager(config, reactor, specs, self.drivers)
        self.kernels.setServiceParent(self)
        self.api = GatewayAPI(config, self.kernels, reactor, threadpool)
        ip = config.server.ip
        if not config.auth.configured and not ipaddress.ip_address(ip).is_loopback:
            log.warn("no credentials are configured (auth.token / EGD_AUTH_TOKEN): serving on 127.0.0.1 only, "
                     "not on {ip}, so that nobody else can run code through this gateway", ip=ip)
            ip = "127.0.0.1"
        elif not config.auth.configured:
            log.info("no credentials are configured: anyone who can reach {ip} can use this gateway; it listens "
                     "on loopback only", ip=ip)
        site = make_site(self.api.resource(), config.server, Authenticator(config.auth))
        self.http = HTTPListener(site, reactor, ip, config.server.port, config.server.base_url,
                                 tls_options(config))
        self.http.setServiceParent(self)
