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


def test_out_of_file_descriptors_is_a_clear_503_and_leaks_nothing(tmp_path: Any) -> None:
    """egd under a low open-file limit (a careless LimitNOFILE=): once no socket can be opened for another kernel,
    a start is a 503 that says so (not a 500 with a traceback in the log), the kernel process started for it is
    not left running, and the kernels already there still work. The limit is real (RLIMIT_NOFILE of the egd
    process); the kernels are bench/minikernel.py, small enough to reach it quickly."""
    import json
    import sys
    from pathlib import Path

    from tests.conftest import GatewayProcess

    spec = tmp_path / "specs" / "mini"
    spec.mkdir(parents=True)
    mini = Path(__file__).resolve().parent.parent / "bench" / "minikernel.py"
    spec.joinpath("kernel.json").write_text(json.dumps({
        "argv": [sys.executable, str(mini), "-f", "{connection_file}"], "display_name": "mini", "language": "text"}))
    # The limit of egd's process only (prlimit, from util-linux): egd cannot raise it above the hard limit.
    gw = GatewayProcess({"kernels": {"kernelspec_dirs": [str(tmp_path / "specs")], "default_kernel_name": "mini"},
                         "server": {"max_connections": 20}}, prefix=["prlimit", "--nofile=160:160", "--"])
    ids: list[str] = []
    try:
        for _ in range(40):
            resp = gw.client.request("POST", "/api/kernels", {"name": "mini"})
            if resp.status != 201:
                break
            ids.append(resp.json["id"])
        else:
            raise AssertionError("40 kernels started under a limit of 160 open files")
        assert resp.status == 503, (resp.status, resp.body)
        assert "open-file limit" in resp.json["message"], resp.json
        assert "Traceback" not in gw.log() and "unexpected error" not in gw.log()
        assert len(gw.kernel_processes()) == len(ids), (len(ids), gw.kernel_processes())
        sock = gw.client.connect(ids[0])
        assert sock.execute("still here").reply["content"]["status"] == "ok"
        sock.close()
    finally:
        for kernel_id in ids:
            gw.client.delete_kernel(kernel_id)
        gw.stop()
