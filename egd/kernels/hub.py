"""The clients of one kernel: fan-out, replay for reconnecting sessions, and backpressure.

A client is identified by the ``session_id`` it connects with. While it is away its messages go to a bounded
replay buffer; when it comes back with the same ``session_id`` it receives them, in order, and a newer
connection with the same ``session_id`` replaces a stale one. When any connected client cannot keep up, the
kernel's iopub socket is paused (messages wait in ZeroMQ's queue) until it drains: nothing is dropped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.logger import Logger

from egd.kernels import wire

log = Logger()


class KernelClient(Protocol):
    """What the hub needs of a connected client (the WebSocket protocol implements it)."""

    session_key: str

    def deliver(self, channel: str, message: wire.RawMessage) -> None:
        """Send one kernel message to the client."""

    def disconnect(self, code: int, reason: str) -> None:
        """Close the client's connection."""


@dataclass(frozen=True)
class ReplayLimits:
    """Bounds of one absent session's replay buffer."""

    messages: int = 10_000
    size: int = 64 * 1024 * 1024
    seconds: float = 300.0


class ReplayBuffer:
    """Messages for an absent session, oldest first; the oldest are dropped (and counted) past the limits."""

    def __init__(self, limits: ReplayLimits) -> None:
        self._limits = limits
        self.items: deque[tuple[str, wire.RawMessage]] = deque()
        self.size = 0
        self.dropped = 0
        self.expiry: Any = None

    def append(self, channel: str, message: wire.RawMessage) -> None:
        """Keep ``message``, dropping the oldest while over the limits."""
        self.items.append((channel, message))
        self.size += message.size
        while self.items and (len(self.items) > self._limits.messages or self.size > self._limits.size):
            _, old = self.items.popleft()
            self.size -= old.size
            self.dropped += 1


class ClientHub:
    """The connected clients and absent sessions of one kernel."""

    def __init__(self, kernel_id: str, clock: Any, limits: ReplayLimits,
                 pause: Callable[[], None], resume: Callable[[], None]) -> None:
        self._kernel_id = kernel_id
        self._clock = clock
        self._limits = limits
        self._pause = pause
        self._resume = resume
        self.clients: dict[str, KernelClient] = {}
        self._absent: dict[str, ReplayBuffer] = {}
        self._slow: set[int] = set()  # id() of clients whose send buffer is full

    def __len__(self) -> int:
        return len(self.clients)

    def set_flow_control(self, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        """Point backpressure at the kernel's current iopub socket (it changes on restart)."""
        self._pause, self._resume = pause, resume
        if self._slow:
            pause()

    def attach(self, client: KernelClient) -> None:
        """Add a client; replace a stale one with the same session; replay what it missed."""
        key = client.session_key
        stale = self.clients.pop(key, None)
        if stale is not None and stale is not client:
            log.info("kernel {kernel_id}: session {session} reconnected, closing its stale connection",
                     kernel_id=self._kernel_id, session=key)
            self.mark_fast(stale)
            stale.disconnect(1000, "replaced by a newer connection of the same session")
        self.clients[key] = client
        buffered = self._absent.pop(key, None)
        if buffered is None:
            return
        if buffered.expiry is not None and buffered.expiry.active():
            buffered.expiry.cancel()
        if buffered.dropped:
            note = wire.new_message("stream", {"name": "stderr", "text": (
                f"[egd] {buffered.dropped} older message(s) were dropped while this client was disconnected\n")},
                "egd")
            client.deliver("iopub", note)
        log.info("kernel {kernel_id}: replaying {count} message(s) to session {session}",
                 kernel_id=self._kernel_id, count=len(buffered.items), session=key)
        for channel, message in buffered.items:
            client.deliver(channel, message)

    def detach(self, client: KernelClient, keep_buffer: bool = True) -> None:
        """Remove a client; unless told not to, buffer its session's messages for a while."""
        key = client.session_key
        if self.clients.get(key) is not client:
            return
        del self.clients[key]
        self.mark_fast(client)
        if keep_buffer and self._limits.messages > 0 and self._limits.seconds > 0:
            buffer = ReplayBuffer(self._limits)
            buffer.expiry = self._clock.callLater(self._limits.seconds, self._expire, key, buffer)
            self._absent[key] = buffer

    def _expire(self, key: str, buffer: ReplayBuffer) -> None:
        if self._absent.get(key) is buffer:
            del self._absent[key]

    def broadcast(self, channel: str, message: wire.RawMessage) -> None:
        """Send to every client and buffer for every absent session."""
        for client in list(self.clients.values()):
            client.deliver(channel, message)
        for buffer in self._absent.values():
            buffer.append(channel, message)

    def deliver_to(self, key: str, channel: str, message: wire.RawMessage) -> bool:
        """Send to one session (connected or absent); False if egd knows no such session."""
        client = self.clients.get(key)
        if client is not None:
            client.deliver(channel, message)
            return True
        buffer = self._absent.get(key)
        if buffer is not None:
            buffer.append(channel, message)
            return True
        return False

    def mark_slow(self, client: KernelClient) -> None:
        """A client's send buffer is full: pause the kernel's iopub until it drains."""
        if not self._slow:
            self._pause()
        self._slow.add(id(client))

    def mark_fast(self, client: KernelClient) -> None:
        """A client drained (or left): resume iopub when no client is slow."""
        if id(client) in self._slow:
            self._slow.discard(id(client))
            if not self._slow:
                self._resume()

    def close_all(self, code: int, reason: str) -> None:
        """Disconnect every client and forget absent sessions (the kernel is gone)."""
        for client in list(self.clients.values()):
            client.disconnect(code, reason)
        self.clients.clear()
        for buffer in self._absent.values():
            if buffer.expiry is not None and buffer.expiry.active():
                buffer.expiry.cancel()
        self._absent.clear()
        if self._slow:
            self._slow.clear()
            self._resume()
