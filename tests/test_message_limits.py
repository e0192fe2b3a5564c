"""Size limits on what clients send: WebSocket messages (``server.ws_max_message_size``) and request bodies."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import websocket

from tests.client import new_message
from tests.conftest import GatewayProcess

pytestmark = pytest.mark.security

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def gw() -> Iterator[GatewayProcess]:
    """A gateway with a small WebSocket message limit."""
    gateway = GatewayProcess({"server": {"ws_max_message_size": LIMIT}})
    yield gateway
    gateway.stop()


def test_oversized_websocket_message_closes_that_connection_only(gw: GatewayProcess) -> None:
    """A message over the limit closes its WebSocket (Autobahn fails it with 1009, message too big); the kernel
    and other connections carry on, and the message never reaches the kernel."""
    kernel_id = gw.client.start_kernel()
    try:
        other = gw.client.connect(kernel_id)
        url = gw.url.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels"
        sock = websocket.create_connection(url, timeout=10)
        big = new_message("execute_request", {"code": "x = '" + "a" * (2 * LIMIT) + "'", "silent": False},
                          "s")
        sock.send(json.dumps(big))
        with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionResetError)):
            while True:
                sock.recv()
        assert other.execute("print('still here')").stdout.strip() == "still here"
        assert "NameError" in str(other.execute("x").reply["content"].get("ename"))
        other.close()
    finally:
        gw.client.delete_kernel(kernel_id)


def test_oversized_request_body_is_413(gw: GatewayProcess) -> None:
    """A request body over 1 MiB is refused with a JSON 413 and starts nothing."""
    resp = gw.client.request("POST", "/api/kernels", raw=b'{"name": "python3", "env": {"KERNEL_X": "'
                             + b"a" * (2 * 1024 * 1024) + b'"}}', headers={"Content-Type": "application/json"})
    assert resp.status == 413 and resp.json["reason"] == "Payload Too Large"
    assert gw.client.request("GET", "/api/kernels").json == []
