"""The one module that imports txzmq: ZeroMQ sockets as Twisted read descriptors.

What we add to txzmq: the reactor is injected (txzmq schedules on the global one), linger is short, and both
queues are bounded: the outbound queue of a DEALER, so a kernel that stops reading cannot make egd grow without
limit, and the inbound queue of every socket. A slow WebSocket client does not stop egd reading (it gets a bounded
queue of its own, see ``egd.kernels.hub``); only a large message whose signature is being checked does, for that
kernel's sockets and for the few milliseconds of the check (:meth:`ZmqSocket.pause_reading`). So the inbound
queue fills only while the reactor is busy or a check runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import zmq
from twisted.internet.interfaces import IReactorCore, IReactorFDSet, IReactorThreads, IReactorTime, IReadDescriptor
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from txzmq import ZmqConnection, ZmqEndpoint, ZmqEndpointType, ZmqFactory
from zmq.utils.monitor import recv_monitor_message
from zope.interface import implementer

from egd.kernels.wire import Blob

log = Logger()

#: How long a closing socket may keep unsent messages (ms): kernels are local or on a LAN.
_LINGER_MS = 200
#: Bounded outbound queue per socket (messages). A full queue makes ``send`` raise :class:`QueueFull`.
_SEND_HWM = 10_000
#: Bounded inbound queue per socket (messages): egd reads as fast as the reactor turns, this only absorbs a
#: busy moment (a kernel publishing faster still drops iopub messages on its side, as ZeroMQ's PUB does).
_RECV_HWM = 10_000
#: Frames at least this large are handed on as memoryviews of ZeroMQ's message, not copied into bytes: a large
#: output then crosses egd with one copy (into the WebSocket frame) instead of three.
_ZERO_COPY_FROM = 64 * 1024
#: Reconnect quickly while a kernel is still binding its ports: start latency is the user's first wait.
_RECONNECT_IVL_MS = 20
#: Threads that check the signatures of large messages (hashing runs outside the GIL; two cores' worth).
_CHECKER_THREADS = 2


class QueueFull(Exception):
    """The socket's outbound queue is full: the kernel is not reading."""


class IKernelReactor(IReactorTime, IReactorFDSet, IReactorCore):
    """The reactor kernels are driven on: time (timeouts, heartbeats, loops), file descriptors (ZeroMQ sockets)
    and system events (txzmq's shutdown trigger)."""


class ReactorZmqFactory(ZmqFactory):
    """A txzmq factory (one ZeroMQ context) bound to an injected reactor."""

    lingerPeriod = _LINGER_MS

    def __init__(self, reactor: IKernelReactor, max_message_size: int | None = None) -> None:
        """A ZeroMQ context whose sockets are read on ``reactor`` and take no frame over ``max_message_size``
        bytes (None: any size)."""
        self.reactor = reactor
        self.max_message_size = max_message_size
        super().__init__()
        # A context option (Context.setsockopt would only set a default for new sockets): without it libzmq stops
        # at 1023 sockets, about 250 kernels.
        self.context.set(zmq.MAX_SOCKETS, self.context.get(zmq.SOCKET_LIMIT))
        self._checkers: ThreadPool | None = None

    def checker_threads(self) -> ThreadPool | None:
        """The threads that check large messages' signatures: egd's own, so that no other work on the reactor's
        pool can hold a kernel's output up (None if the reactor runs no threads, as a test's clock)."""
        if self._checkers is None and IReactorThreads.providedBy(self.reactor):
            self._checkers = ThreadPool(0, _CHECKER_THREADS, name="egd-signature-check")
            self._checkers.start()
        return self._checkers

    def shutdown(self) -> None:
        """Close every socket, terminate the context, stop the checking threads."""
        super().shutdown()
        if self._checkers is not None:
            self._checkers.stop()
            self._checkers = None


class ZmqSocket(ZmqConnection):
    """A connected ZeroMQ socket that hands each multipart message to ``on_message``."""

    highWaterMark = 0
    reconnectInterval = _RECONNECT_IVL_MS
    read_scheduled: Any

    def __init__(self, factory: ReactorZmqFactory, socket_type: int, address: str,
                 on_message: Callable[[list[Blob]], None], identity: bytes | None = None) -> None:
        self.socketType = socket_type
        self._on_message = on_message
        self._paused = False
        self._watch: _ConnectionWatch | None = None
        self._reactor: IReactorTime = factory.reactor
        super().__init__(factory, None, identity)
        self.socket.set(zmq.RCVHWM, _RECV_HWM)
        if factory.max_message_size is not None:
            # Checked as a frame's header arrives: a larger frame is never allocated. The connection is reset, and
            # ZeroMQ does not reconnect after such a protocol error (egd reopens iopub, see KernelChannels).
            self.socket.set(zmq.MAXMSGSIZE, factory.max_message_size)
        if socket_type != zmq.SUB:
            self.socket.set(zmq.SNDHWM, _SEND_HWM)
        if socket_type == zmq.SUB:
            self.socket.set(zmq.SUBSCRIBE, b"")
        self.addEndpoints([ZmqEndpoint(ZmqEndpointType.connect, address)])

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self.factory is None

    def doRead(self) -> None:  # noqa: N802 - Twisted's IReadDescriptor
        """Read every message ZeroMQ has ready (its descriptor is edge-triggered)."""
        if self.read_scheduled is not None:
            if not self.read_scheduled.called:
                self.read_scheduled.cancel()
            self.read_scheduled = None
        socket = self.socket
        recv = socket.recv
        while self.factory is not None and not self._paused:
            # Drain until EAGAIN (the descriptor only signals a change). Frame.more avoids a getsockopt call
            # per frame, which pyzmq wraps in enum conversions.
            try:
                frame = recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            frames: list[Blob] = [frame.bytes]
            while frame.more:
                frame = recv(copy=False)
                frames.append(frame.bytes if len(frame) < _ZERO_COPY_FROM else frame.buffer)
            try:
                self._on_message(frames)
            except Exception:
                log.failure("handling a message from a kernel socket")

    def pause_reading(self) -> None:
        """Read nothing more until :meth:`resume_reading`: what the kernel sends meanwhile stays in ZeroMQ's queues,
        bounded by their high-water marks, not in egd's memory (a message being handled when this is called is the
        last one read)."""
        self._paused = True

    def resume_reading(self) -> None:
        """Read again, from what queued up meanwhile (the edge-triggered descriptor would not signal it)."""
        self._paused = False
        if self.factory is not None and self.read_scheduled is None:
            self.read_scheduled = self._reactor.callLater(0, self.doRead)

    def send(self, frames: list[Blob]) -> None:
        """Queue a multipart message; :class:`QueueFull` when the bounded outbound queue is full."""
        if self.factory is None:
            raise QueueFull("socket is closed")
        try:
            self.socket.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            raise QueueFull("the kernel is not reading its socket") from None
        if self.read_scheduled is None:
            # Sending can consume the descriptor's edge; look for input once more.
            self.read_scheduled = self._reactor.callLater(0, self.doRead)

    def watch_connection(self, on_change: Callable[[bool], None]) -> None:
        """Call ``on_change(True)`` when ZeroMQ connects to the peer, ``on_change(False)`` when it loses the
        connection; :class:`SocketUnavailable` if ZeroMQ cannot open the monitor's socket."""
        if self._watch is None and self.factory is not None:
            try:
                self._watch = _ConnectionWatch(self.factory.reactor, self.socket, on_change)
            except zmq.ZMQError as exc:
                raise SocketUnavailable(str(exc)) from None

    def shutdown(self) -> None:
        """Close the socket and its watch (txzmq's factory calls this for every socket before it ends the context,
        which waits for every socket of it, the watch's too)."""
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        super().shutdown()

    def close(self) -> None:
        """Close the socket (idempotent)."""
        if self.factory is not None:
            self.shutdown()


@implementer(IReadDescriptor)
class _ConnectionWatch:
    """A socket's ZeroMQ monitor, read on the reactor for connections made and lost."""

    def __init__(self, reactor: IReactorFDSet, socket: zmq.Socket, on_change: Callable[[bool], None]) -> None:
        self._reactor = reactor
        self._socket = socket
        self._on_change = on_change
        self._monitor: zmq.Socket | None = socket.get_monitor_socket(
            zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        reactor.addReader(self)
        self.doRead()  # the descriptor is edge-triggered: take what is there already

    def fileno(self) -> int:
        """The monitor socket's descriptor (-1 once closed)."""
        return -1 if self._monitor is None else int(self._monitor.get(zmq.FD))

    def doRead(self) -> None:  # noqa: N802 - Twisted's IReadDescriptor
        """Take every event the monitor has."""
        while self._monitor is not None:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._on_change(event["event"] == zmq.EVENT_CONNECTED)
            except Exception:
                log.failure("handling a kernel socket's connection event")

    def connectionLost(self, reason: object) -> None:  # noqa: N802 - Twisted's IReadDescriptor
        """Nothing to do: :meth:`close` ends the watch."""

    def logPrefix(self) -> str:  # noqa: N802 - Twisted's ILoggingContext
        """How Twisted names this descriptor in its logs."""
        return "zmq-monitor"

    def close(self) -> None:
        """Stop watching (before the socket closes)."""
        if self._monitor is not None:
            self._reactor.removeReader(self)
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None


class SocketUnavailable(Exception):
    """ZeroMQ could not open a socket (the process is out of file descriptors, or the context of sockets)."""


def open_socket(factory: ReactorZmqFactory, kind: str, address: str,
                on_message: Callable[[list[Blob]], None], identity: bytes | None = None) -> ZmqSocket:
    """Open and connect a socket of ``kind`` (``dealer`` or ``sub``) to ``address``; :class:`SocketUnavailable`
    when ZeroMQ cannot open one."""
    socket_type = {"dealer": zmq.DEALER, "sub": zmq.SUB}[kind]
    try:
        return ZmqSocket(factory, socket_type, address, on_message, identity)
    except zmq.ZMQError as exc:
        raise SocketUnavailable(str(exc)) from None


def shutdown_factory(factory: ReactorZmqFactory) -> None:
    """Close every socket and terminate the context."""
    if factory.connections is not None:
        factory.shutdown()


