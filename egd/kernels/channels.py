"""The ZeroMQ side of one kernel: shell, control, stdin, iopub and heartbeat sockets.

One set of sockets per kernel, shared by all its WebSocket clients: replies are routed back to the client
that asked by their parent ``msg_id`` (see ``egd.kernels.kernel``), iopub is fanned out. shell and stdin share
one ZeroMQ identity, because a kernel sends ``input_request`` to the identity that sent the execute request.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from egd.errors import ServiceUnavailable
from egd.kernels import wire
from egd.kernels.zmqio import ReactorZmqFactory, SocketUnavailable, ZmqSocket, open_socket

log = Logger()

_MessageHandler = Callable[[str, wire.RawMessage], None]

#: An iopub message whose signed parts are at least this large has its signature checked in a thread while its
#: clients already receive all of it but the last bytes: the check (about 0.7 ms per MiB) and the copy to the
#: clients then overlap, instead of adding up. Below it the thread hand-off costs more than it saves.
CUT_THROUGH_FROM = 1024 * 1024
#: How long after its iopub connection was reset a kernel that is still there is told about in the log (a kernel
#: that ended has its channels closed by then, unless it is remote and its end not noticed yet).
_RESET_SETTLE_SECONDS = 1.0


def _worth_a_line(count: int) -> bool:
    """Whether the ``count``-th occurrence of a repeated event is logged: the first ten, then every thousandth."""
    return count <= 10 or count % 1000 == 0


class Previewer(Protocol):
    """Who shows a large iopub message to clients before its signature is checked (the kernel, with its hub).
    What :meth:`preview` returns is handed back, unlooked at, to :meth:`confirm` or :meth:`reject`."""

    def preview(self, message: wire.RawMessage) -> Any:
        """Start sending ``message`` (not checked yet)."""

    def confirm(self, message: wire.RawMessage, preview: Any) -> None:
        """The signature is right: handle ``message`` as any other, finishing the preview."""

    def reject(self, preview: Any) -> None:
        """The signature is wrong: take back what the preview started."""


def _channel_address(info: dict[str, Any], channel: str) -> str:
    """The ZeroMQ address of a kernel's channel from its connection info."""
    transport, ip, port = info.get("transport", "tcp"), info["ip"], info[f"{channel}_port"]
    if transport == "ipc":
        return f"ipc://{ip}-{port}"
    if ip in ("0.0.0.0", ""):
        ip = "127.0.0.1"
    return f"{transport}://{ip}:{port}"


class KernelChannels:
    """Connected sockets to one kernel; delivers verified messages to ``on_message(channel, message)``."""

    def __init__(self, factory: ReactorZmqFactory, connection_info: dict[str, Any], kernel_id: str,
                 on_message: _MessageHandler, previewer: Previewer | None = None) -> None:
        """``previewer``: if given, large iopub messages are checked in a thread (see :data:`CUT_THROUGH_FROM`)
        and handed to it instead of ``on_message``."""
        key = connection_info.get("key", "")
        self.signer = wire.Signer(key.encode() if isinstance(key, str) else key,
                                  connection_info.get("signature_scheme", "hmac-sha256"))
        self._kernel_id = kernel_id
        self._on_message = on_message
        self._bad_signatures = 0
        self._resets = 0
        self._reactor = factory.reactor
        checkers = factory.checker_threads() if previewer is not None else None
        #: Who previews large iopub messages and the threads that check them; None: every message is checked here.
        self._cut_through = (previewer, checkers) if previewer is not None and checkers is not None else None
        self._closed = False
        self._checking = False
        self._factory = factory
        self._iopub_address = _channel_address(connection_info, "iopub")
        self._iopub_connected = False
        identity = f"egd-{uuid.uuid4().hex}".encode()
        self._sockets: dict[str, ZmqSocket] = {}
        try:
            self._open_iopub()
            for channel in ("shell", "control", "stdin"):
                self._sockets[channel] = open_socket(
                    factory, "dealer", _channel_address(connection_info, channel), self._receiver(channel),
                    identity if channel in ("shell", "stdin") else None)
        except SocketUnavailable as exc:
            self.close()
            # Out of file descriptors (or sockets): a condition of this gateway, not a fault of the request.
            raise ServiceUnavailable(f"the gateway cannot open the kernel's sockets: {exc}; raise its open-file "
                                     "limit (LimitNOFILE=) or lower kernels.max_kernels") from None

    def _receiver(self, channel: str) -> Callable[[list[wire.Blob]], None]:
        return lambda frames: self._receive(channel, frames)

    def _receive(self, channel: str, frames: list[wire.Blob]) -> None:
        try:
            signed = wire.split_zmq(frames)
            if self._cut_through is not None and channel == "iopub" and signed.signed_size >= CUT_THROUGH_FROM:
                self._check_in_thread(signed, *self._cut_through)
                return
            message = signed.checked(self.signer)
        except wire.WireError as exc:
            self._dropped(channel, str(exc))
            return
        self._on_message(channel, message)

    def _open_iopub(self) -> None:
        """(Re)open the iopub socket, watched: ZeroMQ reconnects a connection that broke by itself, but not one it
        reset for a protocol error, such as a frame over ``kernels.max_message_size``."""
        socket = open_socket(self._factory, "sub", self._iopub_address, self._receiver("iopub"))
        self._sockets = {"iopub": socket, **self._sockets}  # first: read first after a check
        if self._checking:
            socket.pause_reading()
        self._iopub_connected = False
        socket.watch_connection(lambda connected: self._iopub_connection(socket, connected))

    def _iopub_connection(self, socket: ZmqSocket, connected: bool) -> None:
        self._iopub_connected = connected
        if not connected:
            self._reactor.callLater(_RESET_SETTLE_SECONDS, self._after_iopub_loss, socket)

    def _after_iopub_loss(self, socket: ZmqSocket) -> None:
        # Reconnected by ZeroMQ meanwhile (a network hiccup), the kernel ended (its channels are closed), or this
        # socket was replaced already: nothing to do.
        if self._closed or self._iopub_connected or self._sockets.get("iopub") is not socket:
            return
        self._resets += 1
        if _worth_a_line(self._resets):
            log.warn("kernel {kernel_id}: its iopub connection was reset and not restored ({count} so far): ZeroMQ "
                     "does that when the kernel sends a frame over kernels.max_message_size ({limit} bytes), and "
                     "that output is lost, with what the kernel published until egd reconnected; or the kernel is "
                     "unreachable. egd reconnects.", kernel_id=self._kernel_id, count=self._resets,
                     limit=self._factory.max_message_size)
        try:
            self._sockets.pop("iopub").close()
            self._open_iopub()
        except SocketUnavailable as exc:
            log.error("kernel {kernel_id}: cannot reopen its iopub socket: {error}", kernel_id=self._kernel_id,
                      error=str(exc))

    def _dropped(self, channel: str, why: str) -> None:
        self._bad_signatures += 1
        if _worth_a_line(self._bad_signatures):
            log.warn("kernel {kernel_id}: dropped a {channel} message: {why} ({count} so far)",
                     kernel_id=self._kernel_id, channel=channel, why=why, count=self._bad_signatures)

    def _check_in_thread(self, signed: wire.SignedMessage, previewer: Previewer, checkers: ThreadPool) -> None:
        """Preview the iopub message ``signed`` and check its signature in a thread (:class:`WireError` if its header
        cannot be parsed: then nothing was started).

        Meanwhile none of the kernel's sockets is read: nothing the kernel sends later can overtake the message,
        and what it sends waits in ZeroMQ's bounded queues, so a kernel that floods large messages faster than they
        are checked costs egd no memory beyond them."""
        message = signed.parse()
        preview = previewer.preview(message)
        self._checking = True
        for socket in self._sockets.values():
            socket.pause_reading()
        reactor: Any = self._reactor
        checked = deferToThreadPool(reactor, checkers, signed.verify, self.signer)

        def settle(good: bool) -> None:
            # Also after close(): clients held by the preview (the kernel restarting) must be let go.
            if good:
                previewer.confirm(message, preview)
            else:
                previewer.reject(preview)
                self._dropped("iopub", "bad signature")

        def failed(failure: Any) -> None:
            log.failure("kernel {kernel_id}: checking a large message's signature", failure,
                        kernel_id=self._kernel_id)
            previewer.reject(preview)  # no client may stay held

        checked.addCallback(settle)
        checked.addErrback(failed)
        checked.addBoth(lambda _: self._resume())

    def _resume(self) -> None:
        """Read the kernel's sockets again, iopub first: what queued up behind the checked message follows it."""
        self._checking = False
        if not self._closed:
            for socket in self._sockets.values():
                socket.resume_reading()

    def send(self, channel: str, message: wire.RawMessage) -> None:
        """Sign and send ``message`` on a client channel; ``QueueFull`` if the kernel is not reading."""
        self._sockets[channel].send(wire.to_zmq(message, self.signer))

    def close(self) -> None:
        """Close every socket (a message still being checked is dropped)."""
        self._closed = True
        for socket in self._sockets.values():
            socket.close()


class Heartbeat:
    """Pings the kernel's heartbeat echo; calls ``on_silence`` once when echoes stop for too long.

    The ping carries an empty delimiter frame, as jupyter_client's REQ socket sends it: ipykernel's echo (a ROUTER
    device) returns any frames, but a REP socket (IRkernel and other kernels) drops a message without it.
    Silence is only a question, not a verdict: kernels that answer the heartbeat from their main loop (IRkernel)
    are silent while they run a cell, so the caller asks the driver whether the process is alive. After a
    report, the next one comes after another full window of silence (:meth:`rearm`) or after an echo.
    """

    def __init__(self, factory: ReactorZmqFactory, connection_info: dict[str, Any], clock: IReactorTime,
                 interval: float, misses: int, on_silence: Callable[[float], None]) -> None:
        self._clock = clock
        self._interval = interval
        self._allowed_silence = interval * misses
        self._on_silence = on_silence
        self._last_echo = clock.seconds()
        #: When the current window of silence began (an echo, or the last report).
        self._window_start = self._last_echo
        self._reported = False
        try:
            self._socket = open_socket(factory, "dealer", _channel_address(connection_info, "hb"), self._echo)
        except SocketUnavailable as exc:
            raise ServiceUnavailable(f"the gateway cannot open the kernel's heartbeat socket: {exc}") from None
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock

    def start(self) -> None:
        """Begin pinging (after the kernel answered its first request)."""
        if self._interval > 0:
            self._last_echo = self._window_start = self._clock.seconds()
            self._loop.start(self._interval, now=False).addErrback(
                lambda f: log.failure("heartbeat loop failed", f))

    @property
    def silence(self) -> float:
        """Seconds since the last echo."""
        return self._clock.seconds() - self._last_echo

    def _echo(self, frames: list[wire.Blob]) -> None:
        self._last_echo = self._window_start = self._clock.seconds()
        self._reported = False

    def rearm(self) -> None:
        """Report again if the silence lasts another full window (the kernel was found alive)."""
        self._window_start = self._clock.seconds()
        self._reported = False

    def _tick(self) -> None:
        if not self._reported and self._clock.seconds() - self._window_start > self._allowed_silence:
            self._reported = True
            self._on_silence(self.silence)
        try:
            self._socket.send([b"", b"ping"])
        except Exception:
            log.failure("heartbeat ping failed")

    def stop(self) -> None:
        """Stop pinging and close the socket."""
        if self._loop.running:
            self._loop.stop()
        self._socket.close()
