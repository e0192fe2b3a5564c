"""Authentication with the gateway's shared token (Enterprise Gateway compatible), and the loopback-only
default when no credential is configured."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import websocket

from tests.client import GatewayClient
from tests.conftest import GatewayProcess

pytestmark = pytest.mark.security

TOKEN = "egd-test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def guarded() -> Any:
    """An egd that requires TOKEN (given through EGD_AUTH_TOKEN, as in a systemd environment file)."""
    gw = GatewayProcess(env={"EGD_AUTH_TOKEN": TOKEN})
    yield gw
    gw.stop()


def test_requests_need_the_token(guarded: GatewayProcess) -> None:
    """Without the token or with a wrong one: 401 JSON; with it in the header or the query: served."""
    anonymous = GatewayClient(guarded.url)
    for path in ("/api", "/api/kernels", "/api/kernelspecs", "/kernelspecs/with_env/logo-64x64.png"):
        resp = anonymous.request("GET", path)
        assert resp.status == 401 and resp.json["reason"] == "Unauthorized", path
    assert anonymous.request("POST", "/api/kernels", {}).status == 401
    assert GatewayClient(guarded.url, "wrong-token-0123456789").request("GET", "/api").status == 401
    assert GatewayClient(guarded.url, TOKEN).request("GET", "/api").status == 200
    assert anonymous.request("GET", "/api", headers={"Authorization": f"Bearer {TOKEN}"}).status == 200
    assert anonymous.request("GET", f"/api?token={TOKEN}").status == 200
    assert anonymous.request("OPTIONS", "/api").status != 401


def test_websocket_needs_the_token(guarded: GatewayProcess) -> None:
    """The kernel WebSocket refuses a handshake without the token and works with it."""
    client = guarded.client
    kernel_id = client.start_kernel()
    try:
        url = guarded.url.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels"
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            websocket.create_connection(url, timeout=10)
        assert refused.value.status_code == 401
        sock = client.connect(kernel_id)
        assert sock.execute("1 + 1").result == "2"
        sock.close()
    finally:
        client.delete_kernel(kernel_id)


def test_refusals_are_logged_without_the_token(guarded: GatewayProcess) -> None:
    """A refused request leaves one log line with the client, never a token; query tokens are masked."""
    GatewayClient(guarded.url).request("GET", "/api?token=not-the-right-one-xyz")
    GatewayClient(guarded.url).request("GET", f"/api/kernels?token={TOKEN}")
    log = guarded.log()
    assert "refused authentication from 127.0.0.1 for GET /api?token=*** (unknown credentials)" in log
    assert TOKEN not in log and "not-the-right-one-xyz" not in log


def test_token_never_reaches_a_kernel(guarded: GatewayProcess) -> None:
    """The gateway's token, in its environment, is not in a kernel's environment."""
    client = GatewayClient(guarded.url, TOKEN)
    kernel_id = client.start_kernel()
    try:
        sock = client.connect(kernel_id)
        assert sock.execute(f"import os; {TOKEN!r} in repr(dict(os.environ))").result == "False"
        sock.close()
    finally:
        client.delete_kernel(kernel_id)


def test_without_credentials_only_loopback(make_gateway: Any) -> None:
    """With no credential configured, asking for 0.0.0.0 still binds loopback only, and the log says so."""
    gw = make_gateway({"server": {"ip": "0.0.0.0"}})
    assert "serving on 127.0.0.1 only, not on 0.0.0.0" in gw.log()
    assert "listening on http://127.0.0.1:" in gw.log()


def test_bad_token_config_is_refused(tmp_path: Path) -> None:
    """A token too short to be a secret is a config error."""
    from egd.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=r"auth\.token"):
        parse_config("auth: {token: short}", environ={})
    assert parse_config("", environ={"EGD_AUTH_TOKEN": "0123456789012345678"}).auth.token == "0123456789012345678"


def test_jupyter_server_with_a_token(guarded: GatewayProcess, tmp_path: Path) -> None:
    """An unchanged Jupyter Server given the gateway token runs a cell on egd."""
    from tests.test_jupyter_server import JupyterServer

    server = JupyterServer(guarded.url, tmp_path, [f"--GatewayClient.auth_token={TOKEN}"])
    try:
        kernel_id = server.start_kernel()
        sock = server.connect(kernel_id)
        assert sock.execute("6 * 7").result == "42"
        sock.close()
        assert server.client.request("DELETE", f"/api/kernels/{kernel_id}").status == 204
    finally:
        server.stop()
    assert os.environ.get("EGD_AUTH_TOKEN") is None
