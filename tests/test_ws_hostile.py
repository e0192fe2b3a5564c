"""Issue 10, item 11: malformed WebSocket frames, sent by a real client to a real gateway.

A message egd cannot parse (a ``channel`` that is a list or an object, JSON nested too deeply, bad binary
frames in either protocol) is ignored with one warning and the connection stays usable; a frame that breaks the
WebSocket protocol (invalid UTF-8 in a text frame, an unmasked or reserved-opcode frame) closes the connection
with the standard close code. Never a traceback, never 1006.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import websocket

from tests.client import GatewayClient, KernelSocket, new_message
from tests.conftest import GatewayProcess

pytestmark = pytest.mark.security

DEEP = 100_000


def legacy(message: dict[str, Any]) -> bytes:
    """A legacy text frame's payload."""
    return json.dumps(message).encode()


def legacy_binary(json_part: bytes, *buffers: bytes) -> bytes:
    """A legacy binary frame: u32be count, u32be offsets, JSON, buffers."""
    parts = [json_part, *buffers]
    offsets = [4 * (len(parts) + 1)]
    for part in parts[:-1]:
        offsets.append(offsets[-1] + len(part))
    return struct.pack(f"!{len(parts) + 1}I", len(parts), *offsets) + b"".join(parts)


def v1_raw(*parts: bytes) -> bytes:
    """A v1 frame from raw parts (channel, header, parent, metadata, content, buffers)."""
    offsets = [8 * (len(parts) + 2)]
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    return struct.pack(f"<{len(offsets) + 1}Q", len(offsets), *offsets) + b"".join(parts)


def execute(channel: Any) -> dict[str, Any]:
    """An execute_request (legacy shape) on ``channel`` (which may be anything)."""
    message = new_message("execute_request", {"code": "1", "silent": False, "store_history": False,
                                              "user_expressions": {}, "allow_stdin": False}, "hostile")
    message["channel"] = channel
    return message


HEADER = json.dumps(execute("shell")["header"]).encode()

#: Legacy-protocol frames egd must ignore with a warning: (name, payload, binary).
LEGACY_IGNORED = [
    ("channel is a list", legacy(execute(["shell"])), False),
    ("channel is an object", legacy(execute({"shell": 1})), False),
    ("channel is a number", legacy(execute(7)), False),
    ("deep array", b"[" * DEEP + b"]" * DEEP, False),
    ("deep object", b'{"a":' * DEEP + b"1" + b"}" * DEEP, False),
    ("deep content", legacy(execute("shell"))[:-1] + b',"x":' + b"[" * DEEP + b"]" * DEEP + b"}", False),
    ("header not an object", legacy({**execute("shell"), "header": [1]}), False),
    ("binary: garbage", b"\xff" * 16, True),
    ("binary: truncated", b"\x00\x00", True),
    ("binary: offsets past the end", struct.pack("!III", 2, 12, 10**6) + b"{}", True),
    ("binary: deep JSON", legacy_binary(b"[" * DEEP + b"]" * DEEP, b"buf"), True),
    ("binary: channel is a list", legacy_binary(legacy(execute(["shell"])), b"buf"), True),
    ("binary: not UTF-8", legacy_binary(b"\xff\xfe\x00{", b"buf"), True),
]

#: v1-protocol frames egd must ignore with a warning: (name, payload, binary).
V1_IGNORED = [
    ("v1: deep header", v1_raw(b"shell", b"[" * DEEP + b"]" * DEEP, b"{}", b"{}", b"{}"), True),
    ("v1: header is a list", v1_raw(b"shell", b"[1]", b"{}", b"{}", b"{}"), True),
    ("v1: channel not ASCII", v1_raw(b"\xff\xfe", HEADER, b"{}", b"{}", b"{}"), True),
    ("v1: unknown channel", v1_raw(b"iopub", HEADER, b"{}", b"{}", b"{}"), True),
    ("v1: header not UTF-8", v1_raw(b"shell", b"\xff\xfe", b"{}", b"{}", b"{}"), True),
    ("v1: content not an object", v1_raw(b"shell", HEADER, b"{}", b"{}", b"[]"), True),
    ("v1: truncated", b"\x06\x00\x00\x00", True),
    ("v1: absurd part count", struct.pack("<Q", 2**40) + b"\x00" * 64, True),
    ("v1: offsets backwards", struct.pack("<7Q", 6, 56, 50, 50, 50, 50, 50), True),
    ("v1: a text frame", b"hello", False),
]


@pytest.fixture(scope="module")
def hostile_gateway() -> Iterator[GatewayProcess]:
    """A gateway of its own, so that its log holds only what these tests caused."""
    gw = GatewayProcess()
    try:
        yield gw
    finally:
        assert gw.client.request("GET", "/api/kernels").json == []
        gw.stop()


@pytest.fixture(scope="module")
def hostile_kernel(hostile_gateway: GatewayProcess) -> Iterator[str]:
    """One kernel for every frame."""
    kernel_id = hostile_gateway.client.start_kernel("python3")
    yield kernel_id
    hostile_gateway.client.delete_kernel(kernel_id)


def send_raw(sock: KernelSocket, payload: bytes, binary: bool) -> None:
    """Send ``payload`` as one text or binary frame, unchecked."""
    sock.ws.send(payload, opcode=websocket.ABNF.OPCODE_BINARY if binary else websocket.ABNF.OPCODE_TEXT)


def warnings(log: str) -> int:
    """How many messages egd logged as ignored."""
    return log.count("ignored a message from session")


@pytest.mark.parametrize(("name", "payload", "binary"), LEGACY_IGNORED + V1_IGNORED,
                         ids=[case[0] for case in LEGACY_IGNORED + V1_IGNORED])
def test_unparsable_message_is_ignored_with_one_warning(hostile_gateway: GatewayProcess, hostile_kernel: str,
                                                        name: str, payload: bytes, binary: bool) -> None:
    """The connection stays open, one warning is logged, no traceback, and the next execute works on it."""
    client: GatewayClient = hostile_gateway.client
    sock = client.connect(hostile_kernel, v1=name.startswith("v1"))
    try:
        start = len(hostile_gateway.log())
        send_raw(sock, payload, binary)
        assert sock.execute("6 * 7", timeout=30).result == "42"
        caused = hostile_gateway.log()[start:]
        assert warnings(caused) == 1 and "Traceback" not in caused, caused
    finally:
        sock.close()


def close_code(sock: KernelSocket) -> int:
    """The code of the close frame the server sends next (skipping kernel messages)."""
    sock.ws.settimeout(15)
    while True:
        opcode, data = sock.ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return int(struct.unpack("!H", data[:2])[0])


def masked(first: int, payload: bytes) -> bytes:
    """A client frame (masked, as RFC 6455 requires) with the given first byte (FIN, RSV, opcode)."""
    assert len(payload) < 126
    key = os.urandom(4)
    return bytes((first, 0x80 | len(payload))) + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


#: Frames that break the WebSocket protocol: (name, raw bytes on the wire, expected close code).
BROKEN = [
    ("text not UTF-8", masked(0x81, b"\xff\xfe{}"), 1007),
    ("unmasked frame", bytes((0x81, 2)) + b"{}", 1002),
    ("reserved opcode", masked(0x83, b""), 1002),
    ("reserved bit", masked(0xC1, b"{}"), 1002),
    ("fragmented control frame", masked(0x09, b""), 1002),
]


@pytest.mark.parametrize(("name", "wire", "code"), BROKEN, ids=[case[0] for case in BROKEN])
@pytest.mark.parametrize("v1", [False, True], ids=["legacy", "v1"])
def test_protocol_violation_closes_with_a_clear_code(hostile_gateway: GatewayProcess, hostile_kernel: str,
                                                     name: str, wire: bytes, code: int, v1: bool) -> None:
    """The connection is closed with the RFC 6455 code (not 1006), no traceback; a new connection works."""
    client: GatewayClient = hostile_gateway.client
    sock = client.connect(hostile_kernel, v1=v1)
    start = len(hostile_gateway.log())
    try:
        sock.ws.sock.sendall(wire)
        assert close_code(sock) == code
    finally:
        sock.close()
    again = client.connect(hostile_kernel, v1=v1)
    try:
        assert again.execute("6 * 7", timeout=30).result == "42"
    finally:
        again.close()
    assert "Traceback" not in hostile_gateway.log()[start:]


def test_too_many_bad_messages_close_with_4400(hostile_gateway: GatewayProcess, hostile_kernel: str) -> None:
    """A flood of unparsable messages ends with close code 4400 (each logged once, without a traceback)."""
    sock = hostile_gateway.client.connect(hostile_kernel)
    start = len(hostile_gateway.log())
    try:
        for _ in range(100):
            send_raw(sock, legacy(execute(["shell"])), False)
        assert close_code(sock) == 4400
    finally:
        sock.close()
    assert "Traceback" not in hostile_gateway.log()[start:]


#: Code that makes the kernel itself publish a stream message signed with another key (what a compromised kernel
#: or a man in the middle would send); ``{size}`` characters of ``F``.
FORGE = (
    "from jupyter_client.session import Session\n"
    "k = get_ipython().kernel\n"
    "forger = Session(key=b'not-the-kernel-key', username=k.session.username, session=k.session.session)\n"
    "forger.send(k.iopub_socket, 'stream', {{'name': 'stdout', 'text': 'F' * {size}}},\n"
    "            parent=k.get_parent('shell'), ident=b'stream.stdout')\n"
    "print('after')\n"
)


def forged_outputs(sock: KernelSocket, msg: dict[str, Any], seen: list[str]) -> None:
    """Read until ``msg`` is done, recording every stdout text in ``seen``."""
    for output in sock.wait_for(msg, timeout=60).messages:
        if output["msg_type"] == "stream":
            seen.append(output["content"]["text"])


@pytest.mark.parametrize("v1", [False, True], ids=["legacy", "v1"])
def test_a_forged_output_never_reaches_a_client(hostile_gateway: GatewayProcess, hostile_kernel: str,
                                                v1: bool) -> None:
    """A message the kernel's key did not sign is dropped. A small one is simply not relayed. A large one, whose
    frame egd starts sending while it checks the signature, costs the clients that got part of it their
    connection (the frame is never completed); back with their session they get everything else, in order."""
    client = hostile_gateway.client
    session = uuid.uuid4().hex
    sock = client.connect(hostile_kernel, session_id=session, v1=v1)
    seen: list[str] = []
    forged_outputs(sock, sock.request("execute_request", execute(FORGE.format(size=1000))), seen)
    assert seen == ["after\n"]  # the small forgery was dropped, the connection stays

    start = len(hostile_gateway.log())
    msg = sock.request("execute_request", execute(FORGE.format(size=2 * 1024 * 1024)))
    with pytest.raises((websocket.WebSocketException, ConnectionError)):
        forged_outputs(sock, msg, seen)
    sock.close()
    back = client.connect(hostile_kernel, session_id=session, v1=v1)
    forged_outputs(back, msg, seen)
    assert seen == ["after\n", "after\n"]
    assert back.execute("print('still here')").stdout == "still here\n"
    back.close()
    caused = hostile_gateway.log()[start:]
    assert "dropped a iopub message: bad signature" in caused
    assert f"dropping the connection of session {session}" in caused
    assert "Traceback" not in caused


def execute(code: str) -> dict[str, Any]:
    """The content of an execute_request."""
    return {"code": code, "silent": False, "store_history": False, "user_expressions": {}, "allow_stdin": False}
