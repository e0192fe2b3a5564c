"""A lean blocking WebSocket client for the benchmarks: the WebSocket counterpart of egdbench's lean ZeroMQ client.

websocket-client reads a frame's payload 16 KiB per ``recv`` and joins the pieces: a 10 MiB frame costs its
reader 12-20 ms on the 2-core machine even when every byte is already in the socket buffer, while a ZeroMQ
client gets the same 10 MiB from C in one piece. Measured with websocket-client, the stream section compares
two client libraries more than a gateway with a direct connection. This client reads a payload straight into
one buffer of the frame's size with ``recv_into``, so what is left is the gateway's cost and the kernel's.

It speaks RFC 6455 as a client must (masked frames out, continuation frames, ping answered with pong, close
answered and reported), with no extensions; it is a measuring tool, not a general client.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
import time

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_READ_SIZE = 1 << 16


def _masked(payload: bytes | bytearray, mask: bytes) -> bytes:
    """``payload`` XORed with the repeated 4-byte ``mask`` (masking and unmasking are the same), as one
    big-integer operation: C speed, no per-byte Python loop."""
    n = len(payload)
    repeated = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")).to_bytes(n, "little")


class HandshakeError(ConnectionError):
    """The server did not switch to the WebSocket protocol."""


class LeanWebSocket:
    """One client WebSocket over a blocking TCP socket (``ws://`` only)."""

    def __init__(self, host: str, port: int, path: str, timeout: float, subprotocols: list[str] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()  # bytes received beyond the frame being read
        self.subprotocol = self._handshake(host, port, path, subprotocols or [], headers or {})

    def _handshake(self, host: str, port: int, path: str, subprotocols: list[str],
                   headers: dict[str, str]) -> str | None:
        key = base64.b64encode(os.urandom(16))
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {key.decode()}", "Sec-WebSocket-Version: 13"]
        if subprotocols:
            lines.append("Sec-WebSocket-Protocol: " + ", ".join(subprotocols))
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        while b"\r\n\r\n" not in self._buf:
            self._fill()
        head, _, rest = bytes(self._buf).partition(b"\r\n\r\n")
        self._buf = bytearray(rest)
        status, *fields = head.decode("latin-1").split("\r\n")
        if status.split(" ", 2)[1:2] != ["101"]:
            raise HandshakeError(f"WebSocket handshake refused: {status}")
        answer = {name.strip().lower(): value.strip() for name, _, value in (f.partition(":") for f in fields)}
        expected = base64.b64encode(hashlib.sha1(key + _GUID).digest()).decode()
        if answer.get("sec-websocket-accept") != expected:
            raise HandshakeError("WebSocket handshake: wrong Sec-WebSocket-Accept")
        return answer.get("sec-websocket-protocol") or None

    def _fill(self) -> None:
        data = self.sock.recv(_READ_SIZE)
        if not data:
            raise ConnectionError("the server closed the connection")
        self._buf += data

    def _take(self, n: int) -> bytes | bytearray:
        """Exactly ``n`` bytes: from the buffer, and a large remainder read straight into place."""
        if len(self._buf) >= n:
            head = bytes(self._buf[:n])
            del self._buf[:n]
            return head
        out = bytearray(n)
        have = len(self._buf)
        out[:have] = self._buf
        self._buf = bytearray()
        view = memoryview(out)
        while have < n:
            got = self.sock.recv_into(view[have:])
            if not got:
                raise ConnectionError("the server closed the connection")
            have += got
        return out

    def settimeout(self, timeout: float | None) -> None:
        """Timeout of each blocking read and write."""
        self.sock.settimeout(timeout)

    def send(self, opcode: int, payload: bytes) -> None:
        """One masked, final frame."""
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        mask = os.urandom(4)
        self.sock.sendall(head + mask + _masked(payload, mask))

    def recv(self, deadline: float) -> tuple[int, bytes | bytearray]:
        """The next data message (opcode TEXT or BINARY, fragments joined) or a CLOSE; pings are answered.
        TimeoutError once ``time.monotonic()`` passes ``deadline`` (a ping does not extend it)."""
        opcode: int | None = None
        parts: list[bytes | bytearray] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no WebSocket message before the deadline")
            self.sock.settimeout(left)
            first, second = self._take(2)
            op, n = first & 0x0F, second & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._take(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._take(8))[0]
            mask = self._take(4) if second & 0x80 else None
            payload = self._take(n) if n else b""
            if mask is not None:  # a server must not mask, but a tolerant reader unmasks
                payload = _masked(payload, mask)
            if op == OP_PING:
                self.send(OP_PONG, bytes(payload))
                continue
            if op == OP_PONG:
                continue
            if op == OP_CLOSE:
                return OP_CLOSE, payload
            if op != OP_CONTINUATION:
                opcode, parts = op, []
            parts.append(payload)
            if first & 0x80 and opcode is not None:
                return opcode, parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        """Send a close frame (normal closure) and close the socket."""
        try:
            self.send(OP_CLOSE, struct.pack("!H", 1000))
        except OSError:
            pass
        finally:
            self.sock.close()
