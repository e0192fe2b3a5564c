"""The gateway's side of the launcher protocol (``docs/launcher-protocol.rst``), shared by remote drivers
(part of the driver toolkit, ``docs/writing-a-driver.rst``).

- :class:`LaunchListener`: the callback listener launchers report to. Each connection is its own protocol
  with a read deadline and a line-size limit, so a slow, silent, oversized or malicious peer delays no one.
  Only a message signed with the secret of a launch egd is waiting for is accepted; replays are refused.
  The same port takes the payloads of Enterprise Gateway's launchers (:mod:`egd.egprotocol`): a connection whose
  first byte is not ``{`` is one, read to its end; it is accepted only for an EG launch egd is waiting for, once,
  from the host egd launched on.
- :func:`control_request`: a signed request to a launcher's control port, with a deadline.
- :class:`RemoteKernel`: the :class:`egd.driverapi.LaunchedKernel` of a kernel started through a launcher.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTCP
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.protocols.policies import TimeoutMixin

from egd.driverapi import ExitStatus, IDriverReactor, LaunchRequest
from egd.egprotocol import MAX_PAYLOAD, PayloadRefused, ResponseKey, decode_payload
from egd.errors import ServiceUnavailable
from egd.launchers.launcher_protocol import MAX_LINE, NonceCache, parse_message, sign, verify
from egd.util import describe, shield

log = Logger()

READ_DEADLINE = 10.0
CONTROL_DEADLINE = 5.0


def launcher_arguments(request: LaunchRequest, callback: tuple[str, int], port_range: tuple[int, int] | None,
                       argv: list[str] | tuple[str, ...], *options: str) -> list[str]:
    """The launcher's arguments (after its interpreter and script) for ``request``: where to call back, the
    driver's own ``options``, then ``--`` and the kernel's ``argv``."""
    args = ["--kernel-id", request.kernel_id, "--callback", f"{callback[0]}:{callback[1]}",
            "--startup-timeout", f"{request.timeout:g}", "--kernel-name", request.spec.name, *options]
    if port_range:
        args += ["--port-range", f"{port_range[0]}..{port_range[1]}"]
    if request.working_dir:
        args += ["--working-dir", request.working_dir]
    return [*args, "--", *argv]


class LaunchRefused(Exception):
    """A launcher's message that egd does not accept (the text says why; it is logged, never trusted)."""


#: How every EG payload begins: base64 of ``{"``.
_EG_MAGIC = b"eyJ"
#: Unverified EG payloads kept per launch while its host's address is not yet known (the first that comes
#: from that address wins; the rest are forgeries or duplicates).
_MAX_UNVERIFIED = 4


@dataclass
class Registration:
    """What egd expects from one launch: its secret, and what to do with each kind of message. An EG launch
    (``eg``) expects one payload instead, from one of ``expected_peers`` (set by the driver when it knows
    where the kernel runs; payloads that come before are held until then)."""

    kernel_id: str
    secret: bytes
    ready: Deferred[dict[str, Any]] = field(default_factory=Deferred)
    exited: Deferred[ExitStatus] = field(default_factory=Deferred)
    nonces: NonceCache = field(default_factory=NonceCache)
    eg: bool = False
    expected_peers: frozenset[str] | None = None
    unverified: list[tuple[dict[str, Any], str]] = field(default_factory=list)

    def accept(self, message: dict[str, Any]) -> None:
        """Apply an authentic message; :class:`LaunchRefused` if it does not fit the launch's state."""
        kind = message.get("type")
        if self.eg:
            raise LaunchRefused("this launch uses EG's protocol")
        if kind == "ready":
            if self.ready.called:
                raise LaunchRefused("this kernel has already reported")
            info = message.get("info")
            if not isinstance(info, dict):
                raise LaunchRefused("ready without connection info")
            self.ready.callback(info)
        elif kind == "failed":
            if self.ready.called:
                raise LaunchRefused("failure reported after ready")
            self.ready.errback(LaunchRefused(str(message.get("reason", "the launcher reported a failure"))))
        elif kind == "exited":
            if not self.ready.called or self.exited.called:
                raise LaunchRefused("exit reported out of order")
            code = message.get("code")
            self.exited.callback(ExitStatus(code if isinstance(code, int) else None))
        else:
            raise LaunchRefused(f"unknown message type {str(kind)[:20]!r}")

    def accept_eg(self, info: dict[str, Any], peer: str) -> None:
        """Apply an EG payload from ``peer``: the kernel's connection info, its address the payload's source
        (EG's launchers report 0.0.0.0). :class:`LaunchRefused` when it does not fit this launch."""
        if not self.eg:
            raise LaunchRefused("this launch uses egd's signed protocol")
        if self.ready.called:
            raise LaunchRefused("this kernel has already reported")
        if self.expected_peers is None:
            if len(self.unverified) >= _MAX_UNVERIFIED:
                raise LaunchRefused("too many payloads before the kernel's host is known")
            self.unverified.append((info, peer))
            return
        if peer not in self.expected_peers:
            raise LaunchRefused(f"it comes from {peer}, not from the kernel's host "
                                f"({', '.join(sorted(self.expected_peers))})")
        self.ready.callback(dict(info, ip=peer))

    def expect_peers(self, peers: frozenset[str]) -> None:
        """The addresses the kernel's host may report from, now known; a payload held until now is judged."""
        self.expected_peers = peers
        held, self.unverified = self.unverified, []
        for info, peer in held:
            if self.ready.called:
                break
            try:
                self.accept_eg(info, peer)
            except LaunchRefused as exc:
                log.warn("launch listener: refused an EG payload for kernel {kernel_id} from {peer}: {why}",
                         kernel_id=self.kernel_id, peer=peer, why=str(exc))


def _peer(transport: Any) -> str:
    return str(getattr(transport.getPeer(), "host", "?")) if transport is not None else "?"


class _CallbackProtocol(LineOnlyReceiver, TimeoutMixin):
    """One connection from a launcher: one line in, one line out, within a deadline (a total: it is not reset
    by the bytes of a slow peer). A connection that begins with ``eyJ`` carries an EG payload instead: read
    until the peer closes its side (at most :data:`MAX_PAYLOAD` bytes, within the same deadline), no answer."""

    MAX_LENGTH = MAX_LINE
    delimiter = b"\n"

    def __init__(self, listener: LaunchListener) -> None:
        self._listener = listener
        self._eg: bytearray | None = None
        self._sniffed = False
        self._head = bytearray()

    def connectionMade(self) -> None:  # noqa: N802 - Twisted hook
        """Start the read deadline."""
        self.setTimeout(READ_DEADLINE)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted hook
        """The first bytes tell the protocol: EG's payload is base64 of a JSON object, which always begins with
        ``eyJ`` (``{"``); anything else is a line of egd's protocol (and judged, or refused, as one)."""
        if not self._sniffed:
            self._head += data
            if len(self._head) < len(_EG_MAGIC) and _EG_MAGIC.startswith(bytes(self._head)):
                return  # too short to tell yet
            self._sniffed = True
            data, self._head = bytes(self._head), bytearray()
            if data.startswith(_EG_MAGIC):
                self._eg = bytearray()
        if self._eg is None:
            super().dataReceived(data)
            return
        self._eg += data
        if len(self._eg) > MAX_PAYLOAD:
            transport: Any = self.transport
            log.warn("launch listener: refused an oversized EG payload from {peer}", peer=_peer(transport))
            self._eg = bytearray()
            if transport is not None:
                transport.abortConnection()

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802 - Twisted hook
        """An EG payload ends with its connection (only a clean close: an aborted one is incomplete)."""
        self.setTimeout(None)
        if self._eg and reason is not None and reason.check(ConnectionDone):
            self._listener.receive_eg(bytes(self._eg), _peer(self.transport))
        self._eg = None

    def lineReceived(self, line: bytes) -> None:  # noqa: N802 - Twisted hook
        """Judge the message and answer."""
        self.setTimeout(None)
        transport: Any = self.transport
        answer = self._listener.receive(line, _peer(transport))
        self.sendLine(json.dumps(answer).encode())
        if transport is not None:
            transport.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:  # noqa: N802 - Twisted hook
        """Oversized: drop the connection."""
        transport: Any = self.transport
        log.warn("launch listener: refused an oversized message from {peer}", peer=_peer(transport))
        if transport is not None:
            transport.abortConnection()

    def timeoutConnection(self) -> None:  # noqa: N802 - Twisted hook
        """Silent or slow: drop the connection."""
        transport: Any = self.transport
        self._eg = None
        if transport is not None:
            transport.abortConnection()


class LaunchListener(Service):
    """The TCP listener launchers report to."""

    def __init__(self, reactor: IReactorTCP, host: str, port: int = 0, bind: str | None = None) -> None:
        """Launchers are told ``host``; egd listens on ``bind`` (default: ``host``), for example 0.0.0.0 when
        ``host`` is an address that comes and goes (a container bridge's) or is the pod's own."""
        self.name = "launch-listener"
        self._reactor = reactor
        self._host = host
        self._bind = bind or host
        self._port_number = port
        self._port: Any = None
        self._registrations: dict[str, Registration] = {}
        #: This gateway's key for EG's launchers, made on first use; None until it is made.
        self._eg_key: ResponseKey | None = None
        self._eg_key_made: Deferred[ResponseKey] | None = None

    async def eg_key(self) -> ResponseKey:
        """This gateway's key for EG's launchers (``{public_key}``), made on first use (in a thread)."""
        if self._eg_key is None:
            if self._eg_key_made is None:
                self._eg_key_made = ResponseKey.generate()
            self._eg_key = await shield(self._eg_key_made)
        return self._eg_key

    @property
    def address(self) -> tuple[str, int]:
        """Where launchers call back (host as configured, port as bound)."""
        if self._port is None:
            raise RuntimeError("the launch listener is not listening")
        return self._host, int(self._port.getHost().port)

    def startService(self) -> Deferred[None]:  # noqa: N802 - Twisted hook
        """Listen."""
        super().startService()
        factory = Factory.forProtocol(lambda: _CallbackProtocol(self))
        endpoint = TCP4ServerEndpoint(self._reactor, self._port_number, interface=self._bind, backlog=128)

        def listening(port: Any) -> None:
            self._port = port
            log.info("launch listener on {bind}:{port} (launchers call {host}:{port})", bind=self._bind,
                     host=self._host, port=port.getHost().port)

        return endpoint.listen(factory).addCallback(listening)

    def stopService(self) -> Deferred[None] | None:  # noqa: N802 - Twisted hook
        """Stop listening."""
        super().stopService()
        port, self._port = self._port, None
        return port.stopListening() if port is not None else None

    def register(self, kernel_id: str, secret: bytes | None = None, eg: bool = False) -> Registration:
        """Expect a launch of ``kernel_id``; its fresh secret is in the registration. With ``secret``: a launch
        that already reported (re-attached after a gateway restart), so only its exit is still expected. With
        ``eg``: a launch by one of EG's launchers, which sends an EG payload instead."""
        registration = Registration(kernel_id, secret or secrets.token_hex(32).encode(), eg=eg)
        if secret is not None:
            registration.ready.callback({})
        self._registrations[kernel_id] = registration
        return registration

    def unregister(self, registration: Registration) -> None:
        """Forget a launch (the kernel is gone)."""
        if self._registrations.get(registration.kernel_id) is registration:
            del self._registrations[registration.kernel_id]

    def receive(self, line: bytes, peer: str) -> dict[str, Any]:
        """Check and apply one launcher message; the answer to send back (never raises: a message nested too
        deeply, not JSON or of the wrong shape is refused like a forged one)."""
        message = parse_message(line)
        kernel_id = message.get("kernel_id") if isinstance(message, dict) else None
        registration = self._registrations.get(kernel_id) if isinstance(kernel_id, str) else None
        if registration is None:
            log.warn("launch listener: refused a message from {peer}: no launch of kernel {kernel_id} is expected",
                     peer=peer, kernel_id=str(kernel_id)[:40])
            return {"ok": False, "error": "refused"}
        why = verify(message, registration.secret, registration.nonces)
        if why is None:
            try:
                registration.accept(message)
            except LaunchRefused as exc:
                why = str(exc)
        if why is not None:
            log.warn("launch listener: refused a message for kernel {kernel_id} from {peer}: {why}",
                     kernel_id=kernel_id, peer=peer, why=why)
            return {"ok": False, "error": "refused"}
        log.debug("launch listener: {kind} from kernel {kernel_id} at {peer}", kind=message.get("type"),
                  kernel_id=kernel_id, peer=peer)
        return {"ok": True}


    def receive_eg(self, data: bytes, peer: str) -> None:
        """Check and apply one EG payload (never raises; what is refused is logged with the reason)."""
        key = self._eg_key
        kernel_id = "?"
        try:
            if key is None:
                raise LaunchRefused("no EG launch is expected")
            info = decode_payload(data, key)
            kernel_id = str(info["kernel_id"])[:40]
            registration = self._registrations.get(kernel_id)
            if registration is None:
                raise LaunchRefused(f"no launch of kernel {kernel_id} is expected")
            registration.accept_eg(info, peer)
        except (LaunchRefused, PayloadRefused) as exc:
            log.warn("launch listener: refused an EG payload for kernel {kernel_id} from {peer}: {why}",
                     kernel_id=kernel_id, peer=peer, why=str(exc))
            return
        log.info("launch listener: EG payload for kernel {kernel_id} from {peer}", kernel_id=kernel_id, peer=peer)


async def await_report(reactor: IDriverReactor, registration: Registration, ended: Deferred[Any],
                       remaining: float) -> tuple[str, Any]:
    """What comes first for a launch: the launcher's report (``("ready", info)``, or ``("refused", exception)``),
    the end of what runs the kernel (``("ended", what ended fired with)``: a container, pod or application), or
    ``remaining`` seconds (``("timeout", None)``). Each driver words its own errors from it."""
    outcome: Deferred[tuple[str, Any]] = Deferred()

    def settle(kind: str, value: Any) -> Any:
        if not outcome.called:
            outcome.callback((kind, value))
        return value

    registration.ready.addCallbacks(lambda info: settle("ready", info),
                                    lambda failure: settle("refused", failure.value))
    ended.addCallback(lambda value: settle("ended", value))
    timer = reactor.callLater(max(0.0, remaining), settle, "timeout", None)
    try:
        return await outcome
    finally:
        if timer.active():
            timer.cancel()


class _ControlClient(LineOnlyReceiver):
    MAX_LENGTH = MAX_LINE
    delimiter = b"\n"

    def __init__(self, request: bytes) -> None:
        self._request = request
        self.answer: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:  # noqa: N802 - Twisted hook
        self.sendLine(self._request)

    def lineReceived(self, line: bytes) -> None:  # noqa: N802 - Twisted hook
        if not self.answer.called:
            self.answer.callback(line)
        transport: Any = self.transport
        if transport is not None:
            transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802 - Twisted hook
        if not self.answer.called:
            self.answer.errback(ConnectionError("the launcher closed the connection without answering"))


async def control_request(reactor: IDriverReactor, host: str, port: int, kernel_id: str, secret: bytes,
                          nonces: NonceCache, op: str, **fields: Any) -> dict[str, Any]:
    """Send a signed ``op`` to a launcher and return its verified answer (``ConnectionError``/timeout if not)."""
    request = sign({"kernel_id": kernel_id, "op": op, **fields}, secret)
    client = _ControlClient(json.dumps(request).encode())
    endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=CONTROL_DEADLINE)
    connecting = connectProtocol(endpoint, client)
    connecting.addTimeout(CONTROL_DEADLINE, reactor)
    await connecting
    client.answer.addTimeout(CONTROL_DEADLINE, reactor)
    try:
        line = await client.answer
    finally:
        transport: Any = client.transport
        if transport is not None:
            transport.abortConnection()
    answer = parse_message(line)
    why = verify(answer, secret, nonces)
    if why is None and answer.get("reply_to") != request["nonce"]:
        why = "answer to another request"
    if why is not None:
        raise ConnectionError(f"launcher answer refused: {why}")
    return dict(answer)


class RemoteKernel:
    """A kernel started through a launcher; signals and shutdown go through the launcher's control port."""

    def __init__(self, reactor: IDriverReactor, registration: Registration, info: dict[str, Any], key: str, where: str,
                 on_cleanup: Callable[[RemoteKernel], None],
                 force_kill: Callable[[RemoteKernel], Awaitable[None]]) -> None:
        self._reactor = reactor
        self.registration = registration
        self.info = info
        self.where = where
        self.connection_info: dict[str, Any] = {
            "transport": "tcp", "ip": info["ip"], "key": key, "signature_scheme": "hmac-sha256",
            **{name: int(info[name]) for name in ("shell_port", "iopub_port", "stdin_port", "control_port",
                                                  "hb_port")},
        }
        self.exited: Deferred[ExitStatus] = Deferred()
        registration.exited.addCallback(self._ended)
        self._on_cleanup = on_cleanup
        self._force_kill = force_kill
        self._nonces = NonceCache()
        self.detail = ""
        self.login: str | None = None

    def _ended(self, status: ExitStatus) -> ExitStatus:
        if not self.exited.called:
            self.exited.callback(status)
        return status

    def describe(self) -> str:
        """Host and pid."""
        return f"{self.where} ({self.info.get('hostname', '?')} {self.info['ip']}) pid {self.info.get('pid')}"

    def failure_detail(self) -> str:
        """What the launcher or ssh said last."""
        return self.detail

    async def _control(self, op: str, **fields: Any) -> dict[str, Any]:
        return await control_request(self._reactor, str(self.info["ip"]), int(self.info["launcher_port"]),
                                     self.registration.kernel_id, self.registration.secret, self._nonces, op,
                                     **fields)

    def signal(self, signum: int) -> Deferred[None]:
        """Ask the launcher to signal the kernel's process group; fails with
        :class:`egd.errors.ServiceUnavailable` when the signal was not delivered (launcher unreachable, no
        valid answer, or the launcher says the kernel process is gone). The caller logs the failure, once."""
        async def send() -> None:
            kernel_id = self.registration.kernel_id
            try:
                answer = await self._control("signal", signum=signum)
            except Exception as exc:
                raise ServiceUnavailable(f"Signal {signum} was not delivered to kernel {kernel_id}: its launcher "
                                         f"on {self.where} did not answer ({describe(exc)})") from None
            if not answer.get("ok") or not answer.get("delivered"):
                why = "its process is gone" if answer.get("ok") else "its launcher refused the request"
                raise ServiceUnavailable(f"Signal {signum} was not delivered to kernel {kernel_id} on {self.where}: "
                                         f"{why}")

        return Deferred.fromCoroutine(send())

    def kill(self) -> Deferred[None]:
        """Stop the kernel through its launcher, else by force; the kernel counts as ended either way."""
        async def kill() -> None:
            if self.exited.called:
                return
            try:
                await self._control("shutdown")
            except Exception as exc:
                log.warn("kernel {kernel_id}: launcher unreachable ({why}); trying harder",
                         kernel_id=self.registration.kernel_id, why=describe(exc))
                try:
                    await self._force_kill(self)
                except Exception as exc2:
                    log.warn("kernel {kernel_id}: could not reach its host to kill it: {why}",
                             kernel_id=self.registration.kernel_id, why=describe(exc2))
                    self._ended(ExitStatus(None, None, lost=True))
                    return
            self._ended(ExitStatus(None, 9))

        if self.exited.called:
            return succeed(None)
        return Deferred.fromCoroutine(kill())

    def cleanup(self) -> None:
        """Forget the launch."""
        self._on_cleanup(self)

    def persistent_state(self) -> dict[str, Any]:
        """What a restarted gateway needs to reach this kernel's launcher again (the secret is stored
        encrypted; see ``egd.state``)."""
        return {"where": self.where, "info": self.info, "secret": self.registration.secret.decode(),
                "login": self.login}

    async def ping(self) -> bool:
        """Whether the launcher answers and its kernel is alive."""
        answer = await self._control("ping")
        return bool(answer.get("alive"))


async def reattach_remote(reactor: IDriverReactor, listener: LaunchListener, kernel_id: str, state: Mapping[str, Any],
                          key: str, on_cleanup: Callable[[RemoteKernel], None],
                          force_kill: Callable[[RemoteKernel], Awaitable[None]]) -> RemoteKernel:
    """The kernel a previous gateway reached through a launcher (``state``: its
    :meth:`RemoteKernel.persistent_state`), if the launcher answers a signed ping and says the kernel is alive;
    ``LookupError`` saying why otherwise, with nothing left registered."""
    registration = listener.register(kernel_id, str(state["secret"]).encode())
    kernel = RemoteKernel(reactor, registration, dict(state["info"]), key, str(state["where"]), on_cleanup,
                          force_kill)
    kernel.login = state.get("login")
    try:
        alive = await kernel.ping()
    except Exception as exc:
        listener.unregister(registration)
        raise LookupError(f"its launcher on {kernel.where} does not answer: {exc}") from None
    if not alive:
        listener.unregister(registration)
        raise LookupError(f"its launcher on {kernel.where} says the kernel has ended")
    return kernel
