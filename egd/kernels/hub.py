"""The clients of one kernel: fan-out, a bounded backlog per client, and replay for reconnecting sessions.

A client is identified by the ``session_id`` it connects with (a connection without one gets a random key: it
can never come back, so nothing is kept for it when it leaves). The kernel's iopub is always read: one slow
client never holds up the others. While a client's send buffer is full its messages wait in egd, in a queue
bounded by ``client_backlog_bytes``/``client_backlog_messages``; a client that falls further behind is
disconnected with close code 4008 (:data:`TOO_SLOW`), and what it had not been sent goes to its session's
replay buffer. While a session is away its messages are kept, within limits that apply to all absent
sessions of the kernel together, in one log shared by them (a message kept for several sessions is kept
once); when it comes back with the same ``session_id`` it receives them in order, after a notice of how many
were dropped, if any. A newer connection with the same ``session_id`` replaces a stale one.

A large output can be *previewed*: while egd checks its signature in a thread, the clients that are ready get
all of its frame but the last bytes (:meth:`ClientHub.preview`), so the copy to them overlaps the check. Such
a client is held: whatever else comes for it waits until the check ends. Then :meth:`ClientHub.broadcast`
sends the last bytes, or :meth:`ClientHub.reject` drops the connection, and no client ever gets a whole
message that the kernel did not sign.
"""

from __future__ import annotations

import uuid
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from egd.kernels import wire

log = Logger()

#: The close code of a client that fell too far behind its kernel's output (4000-4999: application codes).
TOO_SLOW = 4008

#: A message on its way to clients: sequence number, the one session it is for ("" for every client), channel,
#: message. One tuple is shared by every client queue and the replay log that hold it.
_Entry = tuple[int, str, str, wire.RawMessage]


class KernelClient(Protocol):
    """What the hub needs of a connected client (the WebSocket protocol implements it)."""

    #: The session (``session_id``), or a random key that is never reused for a connection without one.
    session_key: str
    #: Whether the client named its session, i.e. can come back for what it missed.
    replayable: bool

    def deliver(self, channel: str, message: wire.RawMessage) -> None:
        """Send one kernel message to the client now (the hub queues while the client is blocked)."""

    def deliver_head(self, channel: str, message: wire.RawMessage) -> bool:
        """Send all of the message's frame but its last bytes, and hold those; False if the client cannot (then
        nothing was sent)."""

    def deliver_tail(self) -> None:
        """Send the held last bytes: the message is whole."""

    def disconnect(self, code: int, reason: str) -> None:
        """Close the client's connection."""


def anonymous_key() -> str:
    """A session key for a connection without a ``session_id``: random, so never another connection's."""
    return f"anonymous-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class ReplayLimits:
    """What egd keeps for one kernel's clients.

    ``messages``/``size`` bound the replay buffers of all the kernel's absent sessions together; each absent
    session is kept ``seconds``, at most ``sessions`` of them. ``client_messages``/``client_bytes`` bound what
    waits in egd for one connected client whose send buffer is full.
    """

    messages: int = 10_000
    size: int = 64 * 1024 * 1024
    seconds: float = 300.0
    sessions: int = 16
    client_messages: int = 20_000
    client_bytes: int = 16 * 1024 * 1024


class _Link:
    """A connected client and what waits for it while its send buffer is full, or while it holds the last bytes
    of a previewed message."""

    __slots__ = ("blocked", "client", "held", "queue", "size")

    def __init__(self, client: KernelClient) -> None:
        self.client = client
        self.blocked = False
        self.held = False
        self.queue: deque[_Entry] = deque()
        self.size = 0


class _Absent:
    """An absent session: where its part of the replay log starts, and how many of its messages were dropped."""

    __slots__ = ("dropped", "expiry", "start")

    def __init__(self, start: int) -> None:
        self.start = start
        self.dropped = 0
        self.expiry: IDelayedCall | None = None


class Preview:
    """The clients that got all but the last bytes of one message whose signature is being checked."""

    __slots__ = ("links",)

    def __init__(self, links: list[_Link]) -> None:
        self.links = links


class ClientHub:
    """The connected clients and absent sessions of one kernel."""

    def __init__(self, kernel_id: str, clock: IReactorTime, limits: ReplayLimits) -> None:
        self._kernel_id = kernel_id
        self._clock = clock
        self._limits = limits
        self._links: dict[str, _Link] = {}
        self._absent: dict[str, _Absent] = {}  # oldest first
        self._log: deque[_Entry] = deque()  # kept for absent sessions, oldest first
        self._log_size = 0
        self._seq = 0

    def __len__(self) -> int:
        return len(self._links)

    @property
    def clients(self) -> dict[str, KernelClient]:
        """The connected clients by session key (a snapshot)."""
        return {key: link.client for key, link in self._links.items()}

    def client(self, key: str) -> KernelClient | None:
        """The connected client of session ``key``, if there is one."""
        link = self._links.get(key)
        return None if link is None else link.client

    @property
    def absent_sessions(self) -> int:
        """How many absent sessions have a replay buffer."""
        return len(self._absent)

    # -- clients coming and going -------------------------------------------------------------------------

    def attach(self, client: KernelClient) -> None:
        """Add a client; replace a stale one with the same session; replay what it missed."""
        key = client.session_key
        link = _Link(client)
        stale = self._links.pop(key, None)
        self._links[key] = link
        if stale is not None and stale.client is not client:
            log.info("kernel {kernel_id}: session {session} reconnected, closing its stale connection",
                     kernel_id=self._kernel_id, session=key)
            # What the stale connection had not been sent yet is the new one's, in order.
            for entry in stale.queue:
                self._send(link, entry)
            stale.client.disconnect(1000, "replaced by a newer connection of the same session")
        absent = self._absent.pop(key, None)
        if absent is None:
            return
        if absent.expiry is not None and absent.expiry.active():
            absent.expiry.cancel()
        missed = [entry for entry in self._log if entry[0] >= absent.start and entry[1] in ("", key)]
        self._prune()
        if absent.dropped:
            note = wire.new_message("stream", {"name": "stderr", "text": (
                f"[egd] {absent.dropped} older message(s) were dropped while this client was disconnected\n")},
                "egd")
            client.deliver("iopub", note)
        log.info("kernel {kernel_id}: replaying {count} message(s) to session {session}",
                 kernel_id=self._kernel_id, count=len(missed), session=key)
        # Straight to the connection (bounded by the replay limits), ahead of anything queued after it.
        for _, _, channel, message in missed:
            client.deliver(channel, message)

    def detach(self, client: KernelClient, keep_buffer: bool = True) -> None:
        """Remove a client; unless told not to (or it has no session), keep its session's messages a while."""
        key = client.session_key
        link = self._links.get(key)
        if link is None or link.client is not client:
            return
        del self._links[key]
        if keep_buffer:
            self._keep(key, client, list(link.queue))

    def _keep(self, key: str, client: KernelClient, unsent: list[_Entry]) -> None:
        """Start a replay buffer for the session ``key`` that just left, beginning with ``unsent``."""
        limits = self._limits
        if not client.replayable or limits.messages <= 0 or limits.seconds <= 0 or limits.sessions <= 0:
            return
        while len(self._absent) >= limits.sessions:
            oldest = next(iter(self._absent))
            log.info("kernel {kernel_id}: dropped the replay buffer of session {session} (more than {limit} "
                     "absent sessions)", kernel_id=self._kernel_id, session=oldest, limit=limits.sessions)
            self._forget(oldest)
        absent = _Absent(unsent[0][0] if unsent else self._seq + 1)
        absent.expiry = self._clock.callLater(limits.seconds, self._expire, key, absent)
        self._absent[key] = absent
        log.debug("kernel {kernel_id}: keeping output for session {session} while it is away ({count} absent)",
                  kernel_id=self._kernel_id, session=key, count=len(self._absent))
        if unsent:
            self._merge(key, unsent)

    def _merge(self, key: str, unsent: list[_Entry]) -> None:
        """Put a leaving client's unsent messages into the log, in order, as messages for that session."""
        logged = {entry[0] for entry in self._log}
        extra = [entry if entry[1] == key else (entry[0], key, entry[2], entry[3])
                 for entry in unsent if entry[0] not in logged]
        if not extra:
            return
        self._log = deque(sorted((*self._log, *extra), key=lambda entry: entry[0]))
        self._log_size += sum(entry[3].size for entry in extra)
        self._trim()

    def _expire(self, key: str, absent: _Absent) -> None:
        if self._absent.get(key) is absent:
            log.debug("kernel {kernel_id}: replay buffer of session {session} expired", kernel_id=self._kernel_id,
                      session=key)
            self._forget(key)

    def _forget(self, key: str) -> None:
        """Drop an absent session's replay buffer."""
        absent = self._absent.pop(key)
        if absent.expiry is not None and absent.expiry.active():
            absent.expiry.cancel()
        self._prune()

    def _prune(self) -> None:
        """Drop from the log what no absent session needs any more."""
        if not self._absent:
            self._log.clear()
            self._log_size = 0
            return
        start = min(absent.start for absent in self._absent.values())
        kept = deque(entry for entry in self._log
                     if entry[0] >= start and (not entry[1] or entry[1] in self._absent))
        if len(kept) != len(self._log):
            self._log = kept
            self._log_size = sum(entry[3].size for entry in kept)

    def _trim(self) -> None:
        """Drop the oldest kept messages while over the limits, counting them for the sessions that lose them."""
        limits = self._limits
        while self._log and (len(self._log) > limits.messages or self._log_size > limits.size):
            seq, target, _, message = self._log.popleft()
            self._log_size -= message.size
            for key, absent in self._absent.items():
                if seq >= absent.start and target in ("", key):
                    absent.dropped += 1

    # -- messages -----------------------------------------------------------------------------------------

    def preview(self, channel: str, message: wire.RawMessage) -> Preview:
        """Send the head of ``message`` (not signature-checked yet) to the clients that have nothing waiting, and
        hold them until :meth:`broadcast` with this preview or :meth:`reject`."""
        links = []
        for link in self._links.values():
            if not link.blocked and not link.held and not link.queue and link.client.deliver_head(channel, message):
                link.held = True
                links.append(link)
        return Preview(links)

    def reject(self, preview: Preview) -> None:
        """The previewed message was forged: drop the connections that hold part of it (a WebSocket frame cannot
        be taken back). Their sessions keep what waited for them, as for any dropped connection."""
        for link in preview.links:
            if self._links.get(link.client.session_key) is link:
                self.detach(link.client)
                link.client.disconnect(1011, "the kernel sent a message with a bad signature")

    def broadcast(self, channel: str, message: wire.RawMessage, preview: Preview | None = None) -> None:
        """Send to every client and keep for every absent session; the clients of ``preview`` (which already
        have the head of ``message``) get its last bytes."""
        self._seq += 1
        entry = (self._seq, "", channel, message)
        if self._absent:  # first: a client that overflows below finds the entry logged already
            self._log.append(entry)
            self._log_size += message.size
            self._trim()
        held = preview.links if preview is not None else ()
        for link in list(self._links.values()):
            if link in held:
                link.held = False
                link.client.deliver_tail()
                self._flush(link)
            else:
                self._send(link, entry)

    def deliver_to(self, key: str, channel: str, message: wire.RawMessage) -> bool:
        """Send to one session (connected or absent); False if egd knows no such session."""
        self._seq += 1
        link = self._links.get(key)
        if link is not None:
            self._send(link, (self._seq, key, channel, message))
            return True
        if key in self._absent:
            self._log.append((self._seq, key, channel, message))
            self._log_size += message.size
            self._trim()
            return True
        return False

    def _send(self, link: _Link, entry: _Entry) -> None:
        """Write to a client now, or queue while it is blocked; past the backlog limits it is disconnected."""
        if not link.blocked and not link.held and not link.queue:
            link.client.deliver(entry[2], entry[3])
            return
        link.queue.append(entry)
        link.size += entry[3].size
        limits = self._limits
        # One message is never too much (a kernel may send a larger one than the limit, once): it exists anyway.
        if len(link.queue) > limits.client_messages or (link.size > limits.client_bytes and len(link.queue) > 1):
            self._too_slow(link)

    def _too_slow(self, link: _Link) -> None:
        client = link.client
        key = client.session_key
        log.warn("kernel {kernel_id}: disconnecting session {session} (close code {code}): {count} message(s), "
                 "{size} bytes of output waiting for it (limits {max_count} messages, {max_size} bytes)",
                 kernel_id=self._kernel_id, session=key, code=TOO_SLOW, count=len(link.queue), size=link.size,
                 max_count=self._limits.client_messages, max_size=self._limits.client_bytes)
        self.detach(client)
        client.disconnect(TOO_SLOW, "client too slow: its backlog of kernel output passed egd's limit")

    # -- flow control -------------------------------------------------------------------------------------

    def mark_slow(self, client: KernelClient) -> None:
        """A client's send buffer is full: queue its messages in egd (bounded) until it drains."""
        link = self._links.get(client.session_key)
        if link is not None and link.client is client:
            link.blocked = True

    def mark_fast(self, client: KernelClient) -> None:
        """A client's send buffer drained: send what waits for it until it is full again."""
        link = self._links.get(client.session_key)
        if link is None or link.client is not client:
            return
        link.blocked = False
        self._flush(link)

    @staticmethod
    def _flush(link: _Link) -> None:
        """Send what waits for a client until its send buffer is full again (or it holds a preview)."""
        queue = link.queue
        while queue and not link.blocked and not link.held:  # deliver() calls mark_slow when the buffer fills
            _, _, channel, message = queue.popleft()
            link.size -= message.size
            link.client.deliver(channel, message)

    def close_all(self, code: int, reason: str) -> None:
        """Disconnect every client and forget absent sessions (the kernel is gone)."""
        clients = [link.client for link in self._links.values()]
        self._links.clear()
        for client in clients:
            client.disconnect(code, reason)
        for absent in self._absent.values():
            if absent.expiry is not None and absent.expiry.active():
                absent.expiry.cancel()
        self._absent.clear()
        self._prune()
