"""Issue 10, items 3 and 10: a slow WebSocket client costs egd bounded memory and holds no one up; replay buffers
are bounded per kernel, kept only for sessions that can come back, and never handed to a stranger.

The hub tests drive :class:`egd.kernels.hub.ClientHub` directly under a controlled clock (its accounting is
exact there); the gateway tests use a real egd, a real ipykernel and real sockets: a client with a 4 KiB
receive buffer that never reads, next to one that reads.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import uuid
from typing import Any

import pytest
import websocket
from twisted.internet.task import Clock

from egd.kernels import wire
from egd.kernels.hub import TOO_SLOW, ClientHub, ReplayLimits, anonymous_key
from tests.client import GatewayClient, new_message
from tests.conftest import GatewayProcess, wait_until
from tests.procs import status_kib

pytestmark = pytest.mark.security


def line(i: int, size: int = 100) -> wire.RawMessage:
    """A stream message carrying ``i`` (about ``size`` bytes of content)."""
    return wire.new_message("stream", {"name": "stdout", "text": f"{i} " + "x" * size}, "k")


def number(message: wire.RawMessage) -> int:
    """The ``i`` of :func:`line`."""
    return int(message.json_content()["text"].split()[0])


class Client:
    """Records what the hub delivers; ``replayable`` when it has a session_id."""

    def __init__(self, key: str | None = None) -> None:
        self.replayable = key is not None
        self.session_key = key if key is not None else anonymous_key()
        self.got: list[wire.RawMessage] = []
        self.head: wire.RawMessage | None = None
        self.closed: tuple[int, str] | None = None

    def deliver(self, channel: str, message: wire.RawMessage) -> None:
        self.got.append(message)

    def deliver_head(self, channel: str, message: wire.RawMessage) -> bool:
        """Take all of a previewed message but its last bytes: it is not in :attr:`got` until the tail."""
        self.head = message
        return True

    def deliver_tail(self) -> None:
        self.got.append(self.head)

    def disconnect(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def numbers(self) -> list[int]:
        return [number(m) for m in self.got if m.msg_type == "stream" and "[egd]" not in m.content.decode()]


def test_blocked_client_is_disconnected_past_its_backlog_and_recovers_by_replay() -> None:
    """A blocked client queues up to its limit, is then closed with 4008; another client gets everything at once;
    the slow one, back with its session, gets exactly what it had not been sent, in order."""
    hub = ClientHub("k", Clock(), ReplayLimits(client_messages=10, client_bytes=10**6))
    slow, fast = Client("slow"), Client("fast")
    hub.attach(slow)
    hub.attach(fast)
    hub.broadcast("iopub", line(0))
    hub.mark_slow(slow)
    for i in range(1, 12):
        hub.broadcast("iopub", line(i))
    assert slow.closed is not None and slow.closed[0] == TOO_SLOW
    assert "slow" not in hub.clients and hub.absent_sessions == 1
    for i in range(12, 20):
        hub.broadcast("iopub", line(i))
    assert fast.numbers() == list(range(20))
    back = Client("slow")
    hub.attach(back)
    assert slow.numbers() + back.numbers() == list(range(20))
    assert hub.absent_sessions == 0


def test_a_previewed_message_keeps_its_place() -> None:
    """A large output sent ahead of its signature check (a preview) reaches the ready clients whole only when the
    check is done; what comes for them meanwhile waits behind it, even if their send buffer drains; a blocked
    client and an absent session get it in order, as any other message."""
    hub = ClientHub("k", Clock(), ReplayLimits())
    ready, blocked, away = Client("ready"), Client("blocked"), Client("away")
    for client in (ready, blocked, away):
        hub.attach(client)
    hub.detach(away)
    hub.broadcast("iopub", line(0))
    hub.mark_slow(blocked)
    preview = hub.preview("iopub", line(1))
    assert number(ready.head) == 1 and blocked.head is None
    hub.deliver_to("ready", "shell", line(2))
    hub.mark_fast(ready)  # its socket drained: still nothing may follow the held bytes
    assert ready.numbers() == [0]
    hub.broadcast("iopub", line(1), preview)
    assert ready.numbers() == [0, 1, 2]
    hub.broadcast("iopub", line(3))
    hub.mark_fast(blocked)
    assert blocked.numbers() == [0, 1, 3]
    back = Client("away")
    hub.attach(back)
    assert back.numbers() == [0, 1, 3]


def test_a_forged_preview_drops_only_the_connections_that_saw_part_of_it() -> None:
    """When the check fails, the clients that got part of the message are disconnected (a frame cannot be taken
    back); what waited for them is kept for their session; the message itself reaches no one."""
    hub = ClientHub("k", Clock(), ReplayLimits())
    ready, blocked = Client("ready"), Client("blocked")
    hub.attach(ready)
    hub.attach(blocked)
    hub.mark_slow(blocked)
    preview = hub.preview("iopub", line(1))
    hub.deliver_to("ready", "shell", line(2))
    hub.reject(preview)
    assert ready.closed is not None and ready.closed[0] == 1011 and ready.got == []
    assert "ready" not in hub.clients and blocked.closed is None
    hub.broadcast("iopub", line(3))
    hub.mark_fast(blocked)
    assert blocked.numbers() == [3]
    back = Client("ready")
    hub.attach(back)
    assert back.numbers() == [2, 3]


def test_backlog_in_bytes() -> None:
    """The byte bound applies as well as the message bound."""
    hub = ClientHub("k", Clock(), ReplayLimits(client_messages=10**6, client_bytes=5000))
    slow = Client("slow")
    hub.attach(slow)
    hub.mark_slow(slow)
    for i in range(100):
        hub.broadcast("iopub", line(i, size=1000))
        if slow.closed:
            break
    assert slow.closed is not None and slow.closed[0] == TOO_SLOW and i < 10


def test_one_large_message_is_not_too_much() -> None:
    """A single queued message larger than the byte bound does not disconnect (it exists anyway); a second does."""
    hub = ClientHub("k", Clock(), ReplayLimits(client_bytes=1000))
    client = Client("c")
    hub.attach(client)
    hub.mark_slow(client)
    hub.broadcast("iopub", line(0, size=5000))
    assert client.closed is None
    hub.broadcast("iopub", line(1))
    assert client.closed is not None and client.closed[0] == TOO_SLOW


def test_stale_connection_hands_over_its_queue() -> None:
    """A newer connection of a session gets what the stale one had not been sent yet, in order."""
    hub = ClientHub("k", Clock(), ReplayLimits())
    stale = Client("s")
    hub.attach(stale)
    hub.mark_slow(stale)
    for i in range(5):
        hub.broadcast("iopub", line(i))
    fresh = Client("s")
    hub.attach(fresh)
    hub.broadcast("iopub", line(5))
    assert stale.closed is not None and stale.got == [] and fresh.numbers() == list(range(6))


def test_drained_client_gets_its_queue_in_order() -> None:
    """Within the bound nothing is lost: a client that drains gets its queue, then new messages, in order."""
    hub = ClientHub("k", Clock(), ReplayLimits(client_messages=100))
    client = Client("c")
    hub.attach(client)
    hub.mark_slow(client)
    for i in range(50):
        hub.broadcast("iopub", line(i))
    hub.mark_fast(client)
    hub.broadcast("iopub", line(50))
    assert client.closed is None and client.numbers() == list(range(51))


def test_anonymous_clients_get_no_replay_buffer() -> None:
    """A client without a session_id can never come back: nothing is kept for it; keys are never reused."""
    hub = ClientHub("k", Clock(), ReplayLimits())
    keys = set()
    for i in range(100):
        client = Client()
        keys.add(client.session_key)
        hub.attach(client)
        hub.detach(client)
        hub.broadcast("iopub", line(i))
    assert hub.absent_sessions == 0 and len(keys) == 100


def test_replay_buffers_per_kernel_are_capped_in_number() -> None:
    """At most ``sessions`` absent sessions keep a buffer: the longest absent loses it first."""
    hub = ClientHub("k", Clock(), ReplayLimits(sessions=2))
    for key in ("a", "b", "c"):
        client = Client(key)
        hub.attach(client)
        hub.detach(client)
        hub.broadcast("iopub", line(ord(key)))
    assert hub.absent_sessions == 2
    a, c = Client("a"), Client("c")
    hub.attach(a)
    hub.attach(c)
    assert a.got == [] and c.numbers() == [ord("c")]


def test_replay_limits_are_per_kernel_in_total() -> None:
    """All absent sessions of a kernel together keep at most ``messages``; a message kept for several sessions
    counts once; each session learns how many of its messages were dropped."""
    hub = ClientHub("k", Clock(), ReplayLimits(messages=10, sessions=5))
    for key in ("a", "b", "c", "d", "e"):
        client = Client(key)
        hub.attach(client)
        hub.detach(client)
    for i in range(25):
        hub.broadcast("iopub", line(i))
    for key in ("a", "e"):
        back = Client(key)
        hub.attach(back)
        assert back.numbers() == list(range(15, 25))
        assert "15 older message(s) were dropped" in back.got[0].content.decode()


def test_expiry_and_targeted_messages() -> None:
    """Replies for an absent session are kept for it alone; an expired session gets nothing."""
    clock = Clock()
    hub = ClientHub("k", clock, ReplayLimits(seconds=60))
    a, b = Client("a"), Client("b")
    hub.attach(a)
    hub.attach(b)
    hub.detach(a)
    hub.detach(b)
    assert hub.deliver_to("a", "shell", line(1)) and hub.deliver_to("b", "shell", line(2))
    back = Client("b")
    hub.attach(back)
    assert back.numbers() == [2]
    clock.advance(61)
    again = Client("a")
    hub.attach(again)
    assert again.got == [] and hub.absent_sessions == 0


# -- against a real gateway ---------------------------------------------------------------------------------------

#: Lines of ~1 KB the kernel prints per second in the gateway tests: flushed every 10 lines (200 messages of
#: ~10 KB a second), paced every 0.1 s.
RATE = 2000
PRINTER = """
import sys, time
_line = 'x' * 1000
_t0 = time.monotonic()
for _b in range({batches}):
    for _i in range(_b * {per}, (_b + 1) * {per}):
        print(_i, _line)
        if _i % 10 == 9:
            sys.stdout.flush()
    time.sleep(max(0.0, _t0 + (_b + 1) * {pause} - time.monotonic()))
"""


def printer(seconds: float) -> tuple[str, int]:
    """Code printing ~1 KB numbered lines at :data:`RATE` per second for ``seconds``; and how many lines."""
    per, pause = RATE // 10, 0.1
    batches = int(seconds / pause)
    return PRINTER.format(batches=batches, per=per, pause=pause), batches * per



def ws_url(gw: GatewayProcess, kernel_id: str, session_id: str | None = None) -> str:
    """The kernel's WebSocket URL (without session_id unless given)."""
    query = f"?session_id={session_id}" if session_id else ""
    return gw.url.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels{query}"


def never_reading_client(gw: GatewayProcess, kernel_id: str, session_id: str) -> socket.socket:
    """A raw TCP connection with a 4 KiB receive buffer that completes the WebSocket handshake and then never
    reads again (what the issue measured)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gw.port))
    sock.sendall((f"GET /api/kernels/{kernel_id}/channels?session_id={session_id} HTTP/1.1\r\n"
                  f"Host: 127.0.0.1:{gw.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)  # byte by byte: nothing after the handshake is read
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


class Reader(threading.Thread):
    """A client that reads everything and collects the numbers of the printed lines."""

    def __init__(self, gw: GatewayProcess, kernel_id: str) -> None:
        super().__init__(daemon=True)
        self.ws = websocket.create_connection(ws_url(gw, kernel_id, uuid.uuid4().hex), timeout=30,
                                              enable_multithread=False, skip_utf8_validation=True)
        self.numbers: set[int] = set()
        self.tail = ""
        self.error: BaseException | None = None
        self.stop = False

    def run(self) -> None:
        try:
            while not self.stop:
                try:
                    msg = json.loads(self.ws.recv())
                except websocket.WebSocketTimeoutException:
                    continue
                if msg.get("msg_type") == "stream":  # a message may end in the middle of a line
                    *rows, self.tail = (self.tail + msg["content"]["text"]).split("\n")
                    self.numbers.update(int(row.split()[0]) for row in rows)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def close(self) -> None:
        self.stop = True
        self.join(40)
        self.ws.close()


def run_slow_client(gw: GatewayProcess, seconds: float) -> dict[str, Any]:
    """A never-reading client and a reading one on one kernel while it prints for ``seconds``: egd's RSS before
    and at its peak, and whether the reader got every line."""
    kernel_id = gw.client.start_kernel("python3")
    try:
        reader = Reader(gw, kernel_id)
        reader.ws.settimeout(1)
        reader.start()
        slow = never_reading_client(gw, kernel_id, "never-reads")
        wait_until(lambda: gw.client.kernel(kernel_id).json["connections"] == 2, 10, what="two connections")
        code, count = printer(seconds)
        # Sends the code and leaves (the cell runs on); without a session_id nothing is kept for it.
        driver = websocket.create_connection(ws_url(gw, kernel_id), timeout=30)
        driver.send(json.dumps(new_message("execute_request", {
            "code": code, "silent": False, "store_history": False, "user_expressions": {}, "allow_stdin": False},
            "bench")))
        driver.close()
        pid = gw.proc.pid
        before = peak = status_kib(pid, "VmRSS")
        deadline = time.monotonic() + seconds + 60
        while len(reader.numbers) < count and time.monotonic() < deadline and reader.error is None:
            time.sleep(0.2)
            peak = max(peak, status_kib(pid, "VmRSS"))
        result = {"before_kib": before, "peak_kib": peak, "lines": count, "received": len(reader.numbers),
                  "reader_error": reader.error}
        reader.close()
        slow.close()
        return result
    finally:
        gw.client.delete_kernel(kernel_id)


def test_never_reading_client_costs_bounded_memory_and_holds_no_one_up(make_gateway: Any) -> None:
    """A client with a 4 KiB receive buffer that never reads, for 15 s of 2 MB/s output (the gateway's limits
    scaled down from the defaults): egd's memory stays bounded, the client is disconnected with 4008 and a log
    line, and a second client of the kernel gets every line (before the fix: egd grew by the whole output and
    the second client received nothing while the first was blocked)."""
    gw = make_gateway({"server": {"client_backlog_bytes": 2 * 1024 * 1024, "client_backlog_messages": 2000,
                                  "replay_buffer_bytes": 4 * 1024 * 1024}})
    result = run_slow_client(gw, 15)
    assert result["reader_error"] is None, result
    assert result["received"] == result["lines"], result
    grown_mib = (result["peak_kib"] - result["before_kib"]) / 1024
    assert grown_mib < 20, result  # the output was ~30 MB; limits 2 MiB backlog + 4 MiB replay
    log = gw.log()
    assert re.search(r"disconnecting session never-reads \(close code 4008\)", log), log[-3000:]
    assert "Traceback" not in log


def test_slow_client_recovers_through_its_session_replay(make_gateway: Any) -> None:
    """A client that falls behind past its backlog is closed with 4008 (it sees the code once it reads), and
    reconnecting with its session_id (again after each 4008) gets the rest: together every line, in order, nothing
    twice."""
    gw = make_gateway({"server": {"client_backlog_bytes": 64 * 1024, "client_backlog_messages": 100}})
    client: GatewayClient = gw.client
    kernel_id = client.start_kernel("python3")
    session = uuid.uuid4().hex
    try:
        ws = websocket.create_connection(ws_url(gw, kernel_id, session), timeout=30,
                                         sockopt=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])
        code, count = printer(3)  # 6 MB: more than the socket buffers hold
        ws.send(json.dumps(new_message("execute_request", {
            "code": code, "silent": False, "store_history": False, "user_expressions": {}, "allow_stdin": False},
            "s")))
        wait_until(lambda: "disconnecting session " + session in gw.log(), 30, what="the slow client's 4008")
        seen: list[int] = []
        tail = ""

        def collect(conn: websocket.WebSocket) -> int | None:
            nonlocal tail
            while True:
                opcode, data = conn.recv_data(control_frame=True)
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    return int.from_bytes(data[:2], "big")
                if opcode == websocket.ABNF.OPCODE_TEXT:
                    msg = json.loads(data)
                    if msg["msg_type"] == "stream":
                        assert "[egd]" not in msg["content"]["text"], msg  # nothing was dropped
                        *rows, tail = (tail + msg["content"]["text"]).split("\n")
                        seen.extend(int(row.split()[0]) for row in rows)
                    if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle" and \
                            len(seen) >= count:
                        return None

        assert collect(ws) == TOO_SLOW
        ws.close()
        for _ in range(100):  # reconnect on 4008 as a client should (it may fall behind again while catching up)
            back = websocket.create_connection(ws_url(gw, kernel_id, session), timeout=30)
            closed = collect(back)
            back.close()
            if closed is None:
                break
            assert closed == TOO_SLOW
        assert seen == list(range(count))
        assert "Traceback" not in gw.log()
    finally:
        client.delete_kernel(kernel_id)


def test_anonymous_connections_leave_no_buffers_and_get_no_strangers_replay(make_gateway: Any) -> None:
    """Connections without a session_id that come and go while the kernel prints: no replay buffer is kept for
    any of them, and none receives output from before it connected (before the fix, keys built from id() were
    reused, and a new connection was handed a departed stranger's buffer)."""
    gw = make_gateway()
    client: GatewayClient = gw.client
    kernel_id = client.start_kernel("python3")
    try:
        driver = client.connect(kernel_id)
        for i in range(10):
            ws = websocket.create_connection(ws_url(gw, kernel_id), timeout=30)
            ws.close()
            wait_until(lambda: client.kernel(kernel_id).json["connections"] == 1, 10, what="the close")
            driver.execute(f"print('secret {i}')")
            fresh = websocket.create_connection(ws_url(gw, kernel_id), timeout=0.5)
            try:
                stranger = fresh.recv()
            except websocket.WebSocketTimeoutException:
                stranger = None
            assert stranger is None, stranger
            fresh.close()
            wait_until(lambda: client.kernel(kernel_id).json["connections"] == 1, 10, what="the close")
        driver.close()
        log = gw.log()
        assert "keeping output for session anonymous" not in log
        assert not re.search(r"replaying \d+ message\(s\) to session anonymous", log)
    finally:
        client.delete_kernel(kernel_id)


def test_anonymous_connection_that_left_holds_no_memory(make_gateway: Any) -> None:
    """After a connection without a session_id has left, 32 MiB of output to another client leave egd's memory
    where it was (before the fix, the departed connection's replay buffer kept up to replay_buffer_bytes of it for
    replay_buffer_seconds, for a client that can never come back)."""
    gw = make_gateway()
    client: GatewayClient = gw.client
    kernel_id = client.start_kernel("python3")
    try:
        # A client fast enough for 20 MiB/s (websocket-client's own UTF-8 check is not).
        driver = websocket.create_connection(ws_url(gw, kernel_id, "driver"), timeout=60,
                                             skip_utf8_validation=True)
        websocket.create_connection(ws_url(gw, kernel_id), timeout=30).close()
        wait_until(lambda: client.kernel(kernel_id).json["connections"] == 1, 10, what="the close")

        def run(code: str) -> int:
            request = new_message("execute_request", {"code": code, "silent": False, "store_history": False,
                                                      "user_expressions": {}, "allow_stdin": False}, "driver")
            driver.send(json.dumps(request))
            received = 0
            while True:
                msg = json.loads(driver.recv())
                if msg["parent_header"].get("msg_id") != request["header"]["msg_id"]:
                    continue
                if msg["msg_type"] == "stream":
                    received += len(msg["content"]["text"])
                if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                    return received

        run("big = 'y' * 2**20")
        before = status_kib(gw.proc.pid, "VmRSS")
        assert run("import sys, time\n"
                   "for _ in range(32): sys.stdout.write(big); sys.stdout.flush(); time.sleep(0.05)") == 32 * 2**20
        grown_mib = (status_kib(gw.proc.pid, "VmRSS") - before) / 1024
        driver.close()
        assert grown_mib < 12, grown_mib
    finally:
        client.delete_kernel(kernel_id)


def test_replay_buffers_capped_per_kernel(make_gateway: Any) -> None:
    """With replay_buffer_sessions 2, the third absent session makes the longest-absent one lose its buffer."""
    gw = make_gateway({"server": {"replay_buffer_sessions": 2}})
    client: GatewayClient = gw.client
    kernel_id = client.start_kernel("python3")
    try:
        driver = client.connect(kernel_id)
        for name in ("first", "second", "third"):
            client.connect(kernel_id, session_id=name).close()
            wait_until(lambda: client.kernel(kernel_id).json["connections"] == 1, 10, what="the close")
        driver.execute("print('while away')")
        driver.close()
        first = client.connect(kernel_id, session_id="first", timeout=2)
        with pytest.raises(websocket.WebSocketTimeoutException):
            first.ws.recv()
        third = client.connect(kernel_id, session_id="third")
        texts = []
        while "while away\n" not in texts:
            msg = third.recv(10)
            if msg["msg_type"] == "stream":
                texts.append(msg["content"]["text"])
        first.close()
        third.close()
        assert "dropped the replay buffer of session first (more than 2 absent sessions)" in gw.log()
    finally:
        client.delete_kernel(kernel_id)
