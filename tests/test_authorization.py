"""Who may use which kernelspec: per-spec and gateway-wide user lists, matched exactly."""

from __future__ import annotations

from typing import Any

import pytest

from tests.client import GatewayClient

pytestmark = pytest.mark.security


def start(client: GatewayClient, spec: str, user: str) -> Any:
    """POST /api/kernels for ``user``."""
    return client.request("POST", "/api/kernels", {"name": spec, "env": {"KERNEL_USERNAME": user}})


def test_spec_authorized_users(client: GatewayClient) -> None:
    """A spec's authorized_users admits exactly those users (no substring matches)."""
    for user in ("bob", "alic", "alice2"):
        resp = start(client, "only_alice", user)
        assert resp.status == 403 and f"User '{user}' is not authorized" in resp.json["message"], user
    resp = start(client, "only_alice", "alice")
    assert resp.status == 201
    client.delete_kernel(resp.json["id"])


def test_spec_unauthorized_users_eg_style(client: GatewayClient) -> None:
    """EG's comma-separated unauthorized_users in process_proxy.config refuse exactly those users."""
    assert start(client, "not_bob", "bob").status == 403
    assert start(client, "not_bob", "mallory").status == 403
    allowed = start(client, "not_bob", "bo")  # EG's substring test would refuse "bo"
    assert allowed.status == 201
    client.delete_kernel(allowed.json["id"])


def test_listing_filtered_by_user(client: GatewayClient) -> None:
    """?user= lists only the specs that user may use; a refused spec by name is a 403."""
    bob = client.request("GET", "/api/kernelspecs?user=bob").json["kernelspecs"]
    alice = client.request("GET", "/api/kernelspecs?user=alice").json["kernelspecs"]
    assert "only_alice" not in bob and "not_bob" not in bob and "python3" in bob
    assert "only_alice" in alice and "not_bob" in alice
    assert client.request("GET", "/api/kernelspecs/only_alice?user=bob").status == 403
    assert client.request("GET", "/api/kernelspecs?user=bob/only_alice").status == 403
    assert client.request("GET", "/api/kernelspecs/only_alice?user=alice").status == 200


def test_gateway_wide_lists(make_gateway: Any) -> None:
    """Gateway-wide unauthorized_users refuse everywhere; authorized_users admit only those listed."""
    gw = make_gateway({"kernels": {"unauthorized_users": ["eve"], "authorized_users": ["alice", "carol"]}})
    assert start(gw.client, "python3", "eve").status == 403
    assert start(gw.client, "python3", "dave").status == 403
    resp = start(gw.client, "python3", "carol")
    assert resp.status == 201
    gw.client.delete_kernel(resp.json["id"])
    assert "kernel start refused user=dave: not authorized for python3" in gw.log()
