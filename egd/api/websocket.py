"""The kernel WebSocket ``/api/kernels/{id}/channels`` on Autobahn.

Speaks the legacy JSON protocol (what Jupyter Server's gateway client uses) and
``v1.kernel.websocket.jupyter.org`` when the client offers it. Each connection is a client of the kernel's
:class:`egd.kernels.hub.ClientHub`; its TCP send buffer is watched (a push producer): while it is full the
hub queues the client's messages (bounded; past the bound the client is disconnected with close code 4008), so
a slow client neither holds up the kernel's other clients nor grows egd's memory without limit.

A message egd cannot parse is ignored with one warning (the connection stays; after
``_MAX_BAD_MESSAGES`` of them it is closed with 4400); a frame that breaks the WebSocket protocol itself
(invalid UTF-8 in a text frame, bad opcodes, unmasked frames, too large) is closed by Autobahn with the
standard code (1007, 1002, 1009).
"""

from __future__ import annotations

import struct
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.web.resource import IResource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from egd.config import ServerConfig
from egd.kernels import wire
from egd.kernels.hub import anonymous_key
from egd.kernels.kernel import Kernel
from egd.metrics import RelayCounters

log = Logger()

_MAX_BAD_MESSAGES = 100
_SEND_LIMIT = 4 * 1024 * 1024
#: How much of a previewed message's frame is held back until its signature is checked: any byte keeps a client
#: from reading the message; a few more cost nothing.
_HELD_BYTES = 1024
_SHORT = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")


@implementer(IPushProducer)
class _SendBufferWatch:
    """Told by the TCP transport when the client's send buffer is full or drained."""

    def __init__(self, connection: KernelWebSocket) -> None:
        self._connection = connection

    def pauseProducing(self) -> None:  # noqa: N802 - Twisted interface
        """The client's buffer is full: its messages wait in the hub."""
        self._connection.kernel.hub.mark_slow(self._connection)

    def resumeProducing(self) -> None:  # noqa: N802 - Twisted interface
        """The client's buffer drained."""
        self._connection.kernel.hub.mark_fast(self._connection)

    def stopProducing(self) -> None:  # noqa: N802 - Twisted interface
        """The connection is going away: onClose detaches it (what still waits for it is kept for its session,
        so it must not be flushed into the closed connection here)."""


class KernelWebSocket(WebSocketServerProtocol):
    """One client connection to one kernel."""

    kernel: Kernel
    #: The gateway's relay counters (the factory's), from onOpen on.
    _relay: RelayCounters

    def __init__(self) -> None:
        super().__init__()
        self.session_key = ""
        self.replayable = False
        self._counted = False
        self._v1 = False
        self._attached = False
        self._bad_messages = 0
        #: The last bytes of a previewed message's frame, while its signature is being checked.
        self._held: bytes | None = None
        #: What Autobahn wrote meanwhile (a ping, a pong, a close frame): it follows the held frame.
        self._after_held: list[bytes] = []

    def onConnect(self, request: Any) -> str | None:  # noqa: N802 - Autobahn hook
        """Choose the protocol and the session; refuse if the kernel is gone meanwhile."""
        if self.kernel.state.value in ("terminating", "terminated", "dead"):
            raise ConnectionDeny(404, f"Kernel does not exist: {self.kernel.id}")
        session = (request.params.get("session_id") or [""])[0]
        # Without a session_id the client can never come back for a replay; its key must never be another
        # connection's (id() values are reused), or that one would get its replies.
        self.replayable = bool(session)
        self.session_key = session if session else anonymous_key()
        if wire.V1_SUBPROTOCOL in request.protocols:
            self._v1 = True
            return wire.V1_SUBPROTOCOL
        return None

    def onOpen(self) -> None:  # noqa: N802 - Autobahn hook
        """Join the kernel's clients (which replays what this session missed)."""
        transport: Any = self.transport
        transport.setTcpNoDelay(True)
        # Twisted writes at most SEND_LIMIT bytes per reactor turn (128 KiB); a large output (a 10 MiB
        # stream) then needs dozens of turns. Let the kernel's socket buffer take what it can in one.
        transport.SEND_LIMIT = _SEND_LIMIT
        transport.registerProducer(_SendBufferWatch(self), True)
        self._relay = self.factory.relay
        self._relay.opened += 1
        self._counted = True
        self._attached = True
        log.info("kernel {kernel_id}: client connected (session {session}, {protocol} protocol, {n} connected)",
                 kernel_id=self.kernel.id, session=self.session_key, protocol="v1" if self._v1 else "legacy",
                 n=len(self.kernel.hub) + 1)
        self.kernel.attach(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802,N803 - Autobahn hook
        """Parse a client message once and hand it to the kernel (synchronous: Autobahn drops coroutines)."""
        try:
            if self._v1:
                channel, message = wire.from_v1(payload)
            elif isBinary:
                channel, message = wire.from_legacy_binary(payload)
            else:
                channel, message = wire.from_legacy_text(payload)
        except Exception as exc:  # WireError, or a parser bug: one line, never a traceback per hostile frame
            self._bad_messages += 1
            why = str(exc) if isinstance(exc, wire.WireError) else f"unexpected {type(exc).__name__}"
            log.warn("kernel {kernel_id}: ignored a message from session {session}: {why}",
                     kernel_id=self.kernel.id, session=self.session_key, why=why)
            if self._bad_messages >= _MAX_BAD_MESSAGES:
                self.sendClose(4400, "too many invalid messages")
            return
        relay = self._relay  # plain integers: the cheapest count there is on the hot path
        relay.messages_from_clients += 1
        relay.bytes_from_clients += len(payload)
        self.kernel.send_from_client(self, channel, message)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:  # noqa: N802,N803
        """Leave the kernel's clients; the session's messages are buffered for a reconnect."""
        if self._counted:  # Autobahn calls onClose also for a connection that never opened
            self._counted = False
            self._relay.closed += 1
        if self._attached:
            self._attached = False
            self.kernel.detach(self)
            log.info("kernel {kernel_id}: client disconnected (session {session}, code {code})",
                     kernel_id=self.kernel.id, session=self.session_key, code=code)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted hook
        """Feed Autobahn without its per-read debug line (its arguments are formatted even when unused)."""
        self._dataReceived(data)

    def _framing_is_ours(self) -> bool:
        """Whether egd may write a frame itself: Autobahn is not in the middle of a message, has nothing queued,
        and does not compress."""
        return self.send_state == self.SEND_STATE_GROUND and not self.send_queue and self._perMessageCompress is None

    def _write_frame(self, pieces: list[wire.Blob], binary: bool, hold: int = 0) -> None:
        """Write one whole unmasked frame whose payload is the concatenation of ``pieces``: the hot path,
        kernel -> client. With ``hold``, keep that many last bytes back in :attr:`_held` (the caller checked
        :meth:`_framing_is_ours`).

        Autobahn's ``sendMessage`` formats a debug log line's arguments on every call, which costs more than
        the rest of the relay. egd never fragments, compresses or queues outgoing messages, so outside those
        states a frame is just a header and the payload. Header and pieces are joined once here, into the one
        bytes object the transport sends from (a single buffered write is not copied again by Twisted): a
        10 MiB output is copied once between ZeroMQ and the socket.
        """
        length = 0
        for piece in pieces:
            length += len(piece)
        relay = self._relay  # plain integers: the cheapest count there is on the hot path
        relay.messages_to_clients += 1
        relay.bytes_to_clients += length
        if not self._framing_is_ours():
            self.sendMessage(b"".join(pieces), binary)
            return
        opcode = 0x82 if binary else 0x81
        if length < 126:
            header = bytes((opcode, length))
        elif length < 65536:
            header = _SHORT.pack(opcode, 126, length)
        else:
            header = _LONG.pack(opcode, 127, length)
        pieces.insert(0, header)
        transport: Any = self.transport
        if hold:
            pieces, tail = _split_tail(pieces, hold)
            self._held = b"".join(tail)
        transport.write(b"".join(pieces))

    # KernelClient ----------------------------------------------------------------------------------------

    def deliver(self, channel: str, message: wire.RawMessage, hold: int = 0) -> None:
        """Send a kernel message in this client's protocol (``hold``: see :meth:`_write_frame`)."""
        if self.state != self.STATE_OPEN:
            return
        if self._v1:
            self._write_frame(wire.v1_pieces(message, channel), True, hold)
        else:
            pieces, binary = wire.legacy_pieces(message, channel)
            self._write_frame(pieces, binary, hold)

    def deliver_head(self, channel: str, message: wire.RawMessage) -> bool:
        """Send all of a message's frame but its last bytes, which wait for :meth:`deliver_tail`."""
        if self.state != self.STATE_OPEN or self._held is not None or not self._framing_is_ours():
            return False
        self.deliver(channel, message, _HELD_BYTES)
        return True

    def deliver_tail(self) -> None:
        """Send the held last bytes of the previewed message, then what Autobahn wrote meanwhile."""
        held, self._held = self._held, None
        after, self._after_held = self._after_held, []
        if held is not None and self.transport is not None:
            transport: Any = self.transport
            transport.writeSequence([held, *after])

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:  # noqa: N802
        """Autobahn's every write (control frames, the handshake, ``sendMessage``): while part of a frame is held,
        it waits behind that frame."""
        if self._held is not None:
            self._after_held.append(data)
            return
        super().sendData(data, sync, chopsize)

    def disconnect(self, code: int, reason: str) -> None:
        """Close this connection (kernel gone, or replaced by a newer connection of the session). One that holds
        part of a frame cannot send a close frame after it: its TCP connection is dropped."""
        if self._attached:
            self._attached = False
        if self._held is not None:
            self._held = None
            self._after_held = []
            log.warn("kernel {kernel_id}: dropping the connection of session {session}: {reason}",
                     kernel_id=self.kernel.id, session=self.session_key, reason=reason)
            transport: Any = self.transport
            if transport is not None:
                transport.abortConnection()
        elif self.state == self.STATE_OPEN:
            self.sendClose(code, reason)


def _split_tail(pieces: list[wire.Blob], size: int) -> tuple[list[wire.Blob], list[wire.Blob]]:
    """``pieces`` cut before their last ``size`` bytes (without copying: large pieces are sliced as views)."""
    head = list(pieces)
    tail: list[wire.Blob] = []
    while size > 0 and head:
        last = head.pop()
        if len(last) <= size:
            tail.insert(0, last)
            size -= len(last)
        else:
            view = memoryview(last)
            head.append(view[: len(last) - size])
            tail.insert(0, view[len(last) - size :])
            size = 0
    return head, tail


def make_factory(config: ServerConfig, reactor: IReactorTime,
                 relay: RelayCounters | None = None) -> WebSocketServerFactory:
    """The Autobahn factory with explicit limits (Autobahn's defaults are unbounded); its connections count
    their messages in ``relay``."""
    factory = WebSocketServerFactory(reactor=reactor)
    factory.protocol = KernelWebSocket
    factory.relay = RelayCounters() if relay is None else relay  # type: ignore[attr-defined]
    factory.setProtocolOptions(
        maxMessagePayloadSize=config.ws_max_message_size,
        maxFramePayloadSize=config.ws_max_message_size,
        autoPingInterval=config.ws_ping_interval or 0,
        autoPingTimeout=config.ws_ping_timeout,
        openHandshakeTimeout=config.ws_handshake_timeout,
        closeHandshakeTimeout=5,
        # A protocol violation gets a close frame with its RFC 6455 code (1002, 1007, 1009), so that the client
        # sees why, instead of a dropped connection (1006).
        failByDrop=False,
        tcpNoDelay=True,
        perMessageCompressionAccept=lambda offers: None,
    )
    return factory


@implementer(IResource)
class KernelChannelsResource:
    """Hands a request's connection over to a :class:`KernelWebSocket` for ``kernel``."""

    isLeaf = True

    def __init__(self, factory: WebSocketServerFactory, kernel: Kernel) -> None:
        self._factory = factory
        self._kernel = kernel

    def getChildWithDefault(self, name: bytes, request: Any) -> Any:  # noqa: N802 - IResource
        """No children."""
        raise NotImplementedError

    def putChild(self, path: bytes, child: Any) -> None:  # noqa: N802 - IResource
        """No children."""
        raise NotImplementedError

    def render(self, request: Any) -> Any:
        """Take the transport away from twisted.web and replay the handshake into Autobahn."""
        channel = request.channel
        transport = channel.transport
        if transport is None:
            request.setResponseCode(426)
            return b""
        protocol: Any = self._factory.buildProtocol(transport.getPeer())
        protocol.kernel = self._kernel
        channel.setTimeout(None)  # the HTTP channel's idle timer must not fire on a long-lived WebSocket
        channel.transport = None
        transport.unregisterProducer()  # twisted.web's channel was the producer; the WebSocket is now
        wrapped = getattr(transport, "wrappedProtocol", None)
        if wrapped is not None:
            transport.wrappedProtocol = protocol
        else:
            transport.protocol = protocol
        protocol.makeConnection(transport)
        resume = getattr(transport, "resumeProducing", None)
        if resume is not None:
            resume()  # twisted.web paused reading while it served the upgrade request
        head = [request.method + b" " + request.uri + b" HTTP/1.1"]
        head += [name + b": " + b",".join(values) for name, values in request.requestHeaders.getAllRawHeaders()]
        protocol.dataReceived(b"\r\n".join(head) + b"\r\n\r\n" + request.content.read())
        return NOT_DONE_YET
