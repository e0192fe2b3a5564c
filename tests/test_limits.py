"""Kernel limits, exact under concurrent requests, and the audit log."""

from __future__ import annotations

import threading
from typing import Any

import pytest

pytestmark = pytest.mark.security


def concurrent_posts(client: Any, count: int, env: dict[str, str]) -> list[Any]:
    """``count`` POST /api/kernels sent at once; their responses."""
    results: list[Any] = []
    barrier = threading.Barrier(count)

    def post() -> None:
        barrier.wait()
        results.append(client.request("POST", "/api/kernels", {"name": "python3", "env": env}))

    threads = [threading.Thread(target=post) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    return results


def test_per_user_limit_is_exact_under_concurrency(make_gateway: Any) -> None:
    """20 concurrent starts by one user against a per-user limit of 3 start exactly 3; another user still can."""
    gw = make_gateway({"kernels": {"max_kernels_per_user": 3}})
    results = concurrent_posts(gw.client, 20, {"KERNEL_USERNAME": "alice"})
    created = [r for r in results if r.status == 201]
    refused = [r for r in results if r.status == 403]
    assert len(created) == 3 and len(refused) == 17, [r.status for r in results]
    assert "per user limit has been set to 3" in refused[0].json["message"]
    bob = gw.client.request("POST", "/api/kernels", {"env": {"KERNEL_USERNAME": "bob"}})
    assert bob.status == 201
    gw.client.delete_kernel(created[0].json["id"])
    again = gw.client.request("POST", "/api/kernels", {"env": {"KERNEL_USERNAME": "alice"}})
    assert again.status == 201
    log = gw.log()
    assert "kernel start refused user=alice: per-user limit 3" in log
    assert f"kernel start {bob.json['id']} user=bob spec=python3" in log
    assert f"kernel stop {created[0].json['id']} user=alice spec=python3" in log
    for resp in [*created[1:], bob, again]:
        gw.client.delete_kernel(resp.json["id"])


def test_gateway_limit(make_gateway: Any) -> None:
    """The gateway-wide limit counts every user's kernels."""
    gw = make_gateway({"kernels": {"max_kernels": 2}})
    first = gw.client.start_kernel(env={"KERNEL_USERNAME": "a"})
    second = gw.client.start_kernel(env={"KERNEL_USERNAME": "b"})
    refused = gw.client.request("POST", "/api/kernels", {"env": {"KERNEL_USERNAME": "c"}})
    assert refused.status == 403 and "max kernels limit has been set to 2" in refused.json["message"]
    for kernel_id in (first, second):
        gw.client.delete_kernel(kernel_id)
