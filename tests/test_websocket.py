"""The kernel WebSocket: both protocols, several clients, reconnect with replay, stdin, pings, bad input."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import websocket

from tests.client import V1, GatewayClient, KernelSocket
from tests.conftest import wait_until

COMM_WITH_BUFFERS = (
    "from comm import create_comm\n"
    "c = create_comm(target_name='egd-test', data={'hello': 'world'}, buffers=[b'\\x00\\x01binary', b'second'])\n"
)


def next_matching(sock: KernelSocket, predicate: Any, timeout: float = 30) -> dict[str, Any]:
    """The next message for which ``predicate`` is true."""
    deadline = time.monotonic() + timeout
    while True:
        msg = sock.recv(max(0.1, deadline - time.monotonic()))
        if predicate(msg):
            return msg


def test_legacy_protocol_by_default(client: GatewayClient, kernel: str) -> None:
    """Without a subprotocol the server picks none and speaks JSON text with a channel on every message."""
    sock = client.connect(kernel)
    assert sock.subprotocol is None
    msg = sock.request("kernel_info_request", {})
    reply = next_matching(sock, lambda m: m["parent_header"].get("msg_id") == msg["header"]["msg_id"]
                          and m["channel"] == "shell")
    assert reply["msg_type"] == "kernel_info_reply" and reply["msg_id"] == reply["header"]["msg_id"]
    assert reply["content"]["language_info"]["name"] == "python"
    sock.close()


def test_v1_protocol_when_offered(client: GatewayClient, kernel: str) -> None:
    """A client offering v1.kernel.websocket.jupyter.org gets it, and binary frames both ways."""
    sock = client.connect(kernel, v1=True)
    assert sock.subprotocol == V1
    run = sock.execute("print('over v1'); 3*3")
    assert run.stdout == "over v1\n" and run.result == "9"
    sock.execute(COMM_WITH_BUFFERS)
    sock.close()


def test_legacy_binary_frames_for_buffers(client: GatewayClient, kernel: str) -> None:
    """A kernel message with buffers reaches a legacy client as a binary frame with the buffers intact."""
    sock = client.connect(kernel)
    msg = sock.request("execute_request", {"code": COMM_WITH_BUFFERS, "silent": False, "store_history": False,
                                           "user_expressions": {}, "allow_stdin": False})
    comm_open = next_matching(sock, lambda m: m["msg_type"] == "comm_open")
    assert comm_open["parent_header"]["msg_id"] == msg["header"]["msg_id"]
    assert comm_open["content"]["data"] == {"hello": "world"}
    assert comm_open["buffers"] == [b"\x00\x01binary", b"second"]
    assert comm_open["channel"] == "iopub"
    sock.close()


@pytest.mark.parametrize("v1", [True, False], ids=["v1", "legacy"])
def test_large_buffers_arrive_intact(client: GatewayClient, kernel: str, v1: bool) -> None:
    """Buffers and content large enough to be relayed from ZeroMQ's frames without a copy (an image, a widget's
    array) arrive byte for byte, in both protocols, next to a small buffer; the content is large enough (2 MiB) for
    the frame to be sent while its signature is checked."""
    sock = client.connect(kernel, v1=v1)
    code = ("from comm import create_comm\n"
            "big = bytes(range(256)) * 16384\n"
            "create_comm(target_name='egd-test', data={'text': 'y' * 2097152}, buffers=[big, b'small', big[::-1]])")
    msg = sock.request("execute_request", {"code": code, "silent": False, "store_history": False,
                                           "user_expressions": {}, "allow_stdin": False})
    comm_open = next_matching(sock, lambda m: m["msg_type"] == "comm_open")
    big = bytes(range(256)) * 16384
    assert comm_open["parent_header"]["msg_id"] == msg["header"]["msg_id"]
    assert comm_open["content"]["data"] == {"text": "y" * 2097152}
    assert [bytes(b) for b in comm_open["buffers"]] == [big, b"small", big[::-1]]
    sock.close()


def test_all_clients_get_iopub_and_replies_go_to_the_asker(client: GatewayClient, kernel: str) -> None:
    """Two clients: both see the output of one's cell; only the asker gets the execute_reply."""
    first, second = client.connect(kernel), client.connect(kernel)
    try:
        run = first.execute("print('shared output')")
        assert run.stdout == "shared output\n"
        parent = run.reply["parent_header"]["msg_id"]
        seen = next_matching(second, lambda m: m["msg_type"] == "stream")
        assert seen["parent_header"]["msg_id"] == parent and seen["content"]["text"] == "shared output\n"
        # The second client's next messages are the idle status, never the first client's reply.
        probe = second.execute("'second'")
        assert probe.result == "'second'"
        assert client.kernel(kernel).json["connections"] == 2
    finally:
        first.close()
        second.close()
    wait_until(lambda: client.kernel(kernel).json["connections"] == 0, 10, what="connections to drop to 0")


def test_reconnect_replays_missed_output(client: GatewayClient, kernel: str) -> None:
    """A client that drops mid-cell and reconnects with the same session_id receives what it missed."""
    sock = client.connect(kernel, session_id="replay-session")
    msg = sock.request("execute_request", {"code": "import time; time.sleep(1.5); print('while you were away')",
                                           "silent": False, "store_history": True, "user_expressions": {},
                                           "allow_stdin": False})
    next_matching(sock, lambda m: m["msg_type"] == "execute_input")
    sock.close()
    time.sleep(2.5)
    back = client.connect(kernel, session_id="replay-session")
    replayed = back.wait_for(msg, timeout=10)
    assert replayed.stdout == "while you were away\n"
    assert replayed.reply["content"]["status"] == "ok"
    back.close()


def test_same_session_replaces_stale_connection(client: GatewayClient, kernel: str) -> None:
    """A second connection with the same session_id closes the first; the new one works."""
    stale = client.connect(kernel, session_id="same")
    fresh = client.connect(kernel, session_id="same")
    stale.ws.settimeout(10)
    opcode, frame = 0, None
    while opcode != websocket.ABNF.OPCODE_CLOSE:
        opcode, frame = stale.ws.recv_data_frame(True)
    assert frame is not None and frame.data[:2] == (1000).to_bytes(2, "big")
    assert fresh.execute("40+2").result == "42"
    assert client.kernel(kernel).json["connections"] == 1
    fresh.close()


def test_stdin_round_trip(client: GatewayClient, kernel: str) -> None:
    """input() in a cell reaches the client on stdin and the client's answer reaches the kernel."""
    sock = client.connect(kernel)
    msg = sock.request("execute_request", {"code": "name = input('who? '); print('hello', name)", "silent": False,
                                           "store_history": True, "user_expressions": {}, "allow_stdin": True})
    prompt = next_matching(sock, lambda m: m["channel"] == "stdin")
    assert prompt["msg_type"] == "input_request" and prompt["content"]["prompt"] == "who? "
    answer = sock.request("input_reply", {"value": "egd"}, channel="stdin")
    answer["parent_header"] = prompt["header"]
    sock.send(answer)
    assert sock.wait_for(msg).stdout == "hello egd\n"
    sock.close()


def test_invalid_messages_are_ignored(client: GatewayClient, kernel: str) -> None:
    """Garbage, wrong shapes and iopub sends are dropped; the connection keeps working."""
    sock = client.connect(kernel)
    for junk in ("not json", "[]", json.dumps({"channel": "iopub", "header": {"msg_type": "x"}}),
                 json.dumps({"channel": "shell", "header": "nope"}), json.dumps({"channel": "nowhere"})):
        sock.ws.send(junk)
    sock.ws.send_binary(b"\x00\x00")
    assert sock.execute("'still fine'").result == "'still fine'"
    sock.close()


def test_keepalive_pings(make_gateway: Any) -> None:
    """The server pings idle WebSocket clients at the configured interval."""
    gw = make_gateway({"server": {"ws_ping_interval": 0.3}})
    kernel_id = gw.client.start_kernel()
    sock = gw.client.connect(kernel_id)
    sock.ws.settimeout(5)
    opcode = 0
    while opcode != websocket.ABNF.OPCODE_PING:  # status messages of the kernel may come first
        opcode, _ = sock.ws.recv_data(control_frame=True)
    sock.close()
    gw.client.delete_kernel(kernel_id)


def test_slow_client_loses_nothing(client: GatewayClient, kernel: str) -> None:
    """A client that stops reading while the kernel prints 20 000 lines still receives every one of them."""
    sock = client.connect(kernel)
    msg = sock.request("execute_request", {"code": "for i in range(20000): print(i, flush=True)", "silent": False,
                                           "store_history": False, "user_expressions": {}, "allow_stdin": False})
    time.sleep(3)  # do not read: the server's send buffer fills and it must pause, not drop
    run = sock.wait_for(msg, timeout=120)
    numbers = [int(x) for x in run.stdout.split()]
    assert sorted(set(numbers)) == list(range(20000))
    sock.close()


def test_large_outputs_keep_their_place_for_every_client(client: GatewayClient, kernel: str) -> None:
    """Large outputs (sent ahead of their signature check, see egd.kernels.hub) reach a legacy and a v1 client of
    one kernel whole and in order with the small ones around them, and the kernel's reply follows them."""
    legacy, v1 = client.connect(kernel), client.connect(kernel, v1=True)
    code = ("import sys\n"
            "for i in range(3):\n"
            "    print(f'small {i}', flush=True)\n"
            "    sys.stdout.write(str(i) * (2 * 1024 * 1024)); sys.stdout.flush()\n"
            "print('end')")
    msg = legacy.request("execute_request", {"code": code, "silent": False, "store_history": False,
                                             "user_expressions": {}, "allow_stdin": False})
    expected = [text for i in range(3) for text in (f"small {i}\n", str(i) * (2 * 1024 * 1024))] + ["end\n"]
    run = legacy.wait_for(msg, timeout=120)
    assert [m["content"]["text"] for m in run.messages if m["msg_type"] == "stream"] == expected
    assert run.reply["content"]["status"] == "ok"
    texts = []  # the other client gets the output, not the reply
    while True:
        m = next_matching(v1, lambda m: m["parent_header"].get("msg_id") == msg["header"]["msg_id"])
        if m["msg_type"] == "stream":
            texts.append(m["content"]["text"])
        elif m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
            break
    assert texts == expected
    legacy.close()
    v1.close()


def test_large_stream(client: GatewayClient, kernel: str) -> None:
    """A 10 MiB output arrives whole."""
    sock = client.connect(kernel)
    run = sock.execute("import sys; sys.stdout.write('x' * (10 * 1024 * 1024)); sys.stdout.flush()", timeout=120)
    assert len(run.stdout) == 10 * 1024 * 1024 and set(run.stdout) == {"x"}
    sock.close()
