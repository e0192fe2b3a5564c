"""Browsers: CORS for the REST API and the origin check of kernel WebSockets (``server.allow_origin``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import websocket

from tests.conftest import GatewayProcess

pytestmark = pytest.mark.security

LAB = "https://lab.example.org"
EVIL = "https://evil.example.com"


@pytest.fixture(scope="module")
def gw() -> Iterator[GatewayProcess]:
    """A gateway that lets one browser origin in."""
    gateway = GatewayProcess({"server": {"allow_origin": [LAB], "allow_credentials": True}})
    yield gateway
    gateway.stop()


def test_preflight_and_cors_headers(gw: GatewayProcess) -> None:
    """The allowed origin gets its preflight answered and CORS headers; another origin gets 403."""
    ok = gw.client.request("OPTIONS", "/api/kernels", headers={
        "Origin": LAB, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
    assert ok.status == 204
    assert ok.headers["access-control-allow-origin"] == LAB
    assert "POST" in ok.headers["access-control-allow-methods"]
    assert "Authorization" in ok.headers["access-control-allow-headers"]
    assert ok.headers["access-control-allow-credentials"] == "true"
    assert gw.client.request("OPTIONS", "/api/kernels", headers={"Origin": EVIL}).status == 403
    got = gw.client.request("GET", "/api", headers={"Origin": LAB})
    assert got.status == 200 and got.headers["access-control-allow-origin"] == LAB
    refused = gw.client.request("GET", "/api/kernels", headers={"Origin": EVIL})
    assert refused.status == 403 and "access-control-allow-origin" not in refused.headers
    assert gw.client.request("GET", "/api").status == 200  # no Origin: not a browser


def ws_status(gw: GatewayProcess, kernel_id: str, origin: str | None) -> int:
    """The status of a WebSocket handshake sent with ``origin`` (101: accepted)."""
    url = gw.url.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels"
    try:
        sock = websocket.create_connection(url, timeout=10, origin=origin, suppress_origin=origin is None)
    except websocket.WebSocketBadStatusException as exc:
        return int(exc.status_code)
    sock.close()
    return 101


def test_websocket_origin_check(gw: GatewayProcess) -> None:
    """A kernel's WebSocket opens without Origin, from the allowed origin and from egd's own origin; a page
    elsewhere gets 403 (CORS does not protect WebSockets, so egd checks)."""
    kernel_id = gw.client.start_kernel()
    try:
        assert ws_status(gw, kernel_id, None) == 101
        assert ws_status(gw, kernel_id, LAB) == 101
        assert ws_status(gw, kernel_id, f"http://127.0.0.1:{gw.port}") == 101
        assert ws_status(gw, kernel_id, EVIL) == 403
        assert "refused a WebSocket to kernel" in gw.log() or "refused a request from origin" in gw.log()
    finally:
        gw.client.delete_kernel(kernel_id)
