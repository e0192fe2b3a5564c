"""Builds egd's service tree from a config: drivers -> kernel manager -> HTTP listener."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from functools import partial
from typing import Any

from jupyter_core.paths import jupyter_runtime_dir
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
)
from twisted.internet.interfaces import IReactorSocket, IReactorTCP
from twisted.logger import Logger

from egd.api.app import GatewayAPI, IAPIReactor
from egd.api.site import limit_connections, make_site
from egd.auth import Authenticator
from egd.config import Config
from egd.driverapi import IDriverReactor
from egd.kernels.manager import KernelManager
from egd.kernels.specs import KernelSpecStore
from egd.kernels.zmqio import IKernelReactor
from egd.registry import DriverRegistry
from egd.service import AsyncMultiService
from egd.state import store_from_config
from egd.systemd import passed_socket
from egd.tenancy import check_tenancy

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


class IListenerReactor(IReactorTCP, IReactorSocket):
    """The reactor the HTTP listener binds on: TCP (ip:port) and sockets (one systemd passed)."""


class IGatewayReactor(IKernelReactor, IDriverReactor, IAPIReactor, IListenerReactor):
    """The reactor a gateway runs on: what its kernels, drivers, API and listener each need of it."""


class HTTPListener(Service):
    """Listens for HTTP and WebSocket connections; the last to start, the first to stop."""

    def __init__(self, site: Any, reactor: IListenerReactor, ip: str, port: int, base_url: str = "/",
                 tls: Any = None, fd: int | None = None, wrap: Callable[[Any], Any] | None = None) -> None:
        """``wrap``: puts the connection factory (the site, behind TLS when there is TLS) behind the listener's
        connection limit, which so sees every TCP connection from its start, TLS handshake included."""
        self.name = "http"
        self._wrap = wrap
        #: A listening socket passed by systemd (socket activation): served instead of binding ip:port.
        self._fd = fd
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
        factory: Any = self._site
        if self._tls is not None:  # what SSL4ServerEndpoint does, with the connection limit outside TLS
            from twisted.protocols.tls import TLSMemoryBIOFactory

            factory = TLSMemoryBIOFactory(self._tls, False, self._site)
        if self._wrap is not None:
            factory = self._wrap(factory)
        if self._fd is not None:
            endpoint = AdoptedStreamServerEndpoint(self._reactor, self._fd, passed_socket(self._fd)[0])
        else:
            endpoint_type = TCP6ServerEndpoint if ":" in self._ip else TCP4ServerEndpoint
            endpoint = endpoint_type(self._reactor, self._port, interface=self._ip, backlog=256)

        async def listen() -> None:
            self.port = await endpoint.listen(factory)
            host, port = self.address
            shown = f"[{host}]" if ":" in host else host
            scheme = "https" if self._tls is not None else "http"
            log.info("egd is listening on {scheme}://{host}:{port}{base}{how}", scheme=scheme, host=shown, port=port,
                     base=self._base_url, how=f" (socket fd {self._fd} from systemd)" if self._fd is not None else "")

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

    def __init__(self, config: Config, reactor: IGatewayReactor, listen_fd: int | None = None) -> None:
        super().__init__()
        self.config = config
        runtime_dir = config.kernels.runtime_dir or os.path.join(jupyter_runtime_dir(), "egd")
        threadpool = reactor.getThreadPool()
        self.drivers = DriverRegistry(config, reactor, runtime_dir)
        self.drivers.setServiceParent(self)
        check_tenancy(config, self.drivers.names)  # ValueError: users would not be apart beneath the API
        specs = KernelSpecStore(config.kernels, reactor, threadpool)
        self.kernels = KernelManager(config, reactor, specs, self.drivers,
                                     store=store_from_config(config.state, runtime_dir))
        self.kernels.setServiceParent(self)
        self.api = GatewayAPI(config, self.kernels, reactor, threadpool)
        ip = config.server.ip
        if listen_fd is not None:  # socket activation: systemd's socket decides the address, not server.ip
            ip = passed_socket(listen_fd)[1]
            if not config.auth.configured and not ipaddress.ip_address(ip).is_loopback:
                raise ValueError(f"the socket passed by systemd listens on {ip}, but no credentials are configured "
                                 "(auth.token / EGD_AUTH_TOKEN): without them egd serves loopback only")
        if not config.auth.configured and not ipaddress.ip_address(ip).is_loopback:
            log.warn("no credentials are configured (auth.token / EGD_AUTH_TOKEN): serving on 127.0.0.1 only, "
                     "not on {ip}, so that nobody else can run code through this gateway", ip=ip)
            ip = "127.0.0.1"
        elif not config.auth.configured:
            log.info("no credentials are configured: anyone who can reach {ip} can use this gateway; it listens "
                     "on loopback only", ip=ip)
        site = make_site(self.api.resource(), config.server, Authenticator(config.auth))
        self.http = HTTPListener(site, reactor, ip, config.server.port, config.server.base_url,
                                 tls_options(config), listen_fd,
                                 wrap=partial(limit_connections, server=config.server, clock=reactor))
        self.http.setServiceParent(self)

    def stopService(self) -> Deferred[None]:  # noqa: N802 - Twisted hook
        """Abandon the launches in flight first and let their clients have their 503s, then stop the services
        in reverse order."""
        self.kernels.abandon_launches()

        async def stop() -> None:
            await self.api.answered()
            await super(Gateway, self).stopService()

        return Deferred.fromCoroutine(stop())

    def reconfigure(self, config: Config) -> None:
        """Run with ``config`` from now on, where it is read at use time (see ``egd.systemd.LIVE_KEYS``): the
        kernel manager and the API look up their limits, user lists and defaults per request."""
        self.config = config
        self.kernels.reconfigure(config)
        self.api.reconfigure(config)
