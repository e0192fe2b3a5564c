"""Kernel pools: pre-started kernels handed out on POST (never to two users), replenished in the background,
and not used when the request would have launched a kernel differently."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.client import GatewayClient
from tests.conftest import GatewayProcess, wait_until

pytestmark = pytest.mark.ops


def pooled_count(gw: GatewayProcess) -> int:
    """How many kernels the gateway's pool holds, from its log (they are not listed: nobody owns them)."""
    return gw.log().count("from the pool for")


def kernel_pids(gw: GatewayProcess) -> set[int]:
    """Pids of the gateway's kernel processes."""
    return {pid for pid, _ in gw.kernel_processes()}


def test_pool_hands_out_ready_kernels_and_refills(tmp_path: Path) -> None:
    """With a pool of 2, two users get pre-started kernels (different ones, each only theirs) in well under the
    time a cold start takes, each in its requested working directory; the pool refills; a request that asks
    for something a pooled kernel was not launched with gets a fresh kernel."""
    gw = GatewayProcess({"kernels": {"pools": {"python3": 2}}})
    try:
        wait_until(lambda: gw.log().count("pool python3: kernel") >= 2, 60, 0.2, what="the pool to fill")
        assert gw.client.request("GET", "/api/kernels").json == []  # pooled kernels belong to nobody yet
        before = kernel_pids(gw)
        workdir = tmp_path / "alice"
        workdir.mkdir()
        started = time.monotonic()
        alice = gw.client.start_kernel(env={"KERNEL_USERNAME": "alice", "KERNEL_WORKING_DIR": str(workdir)})
        took = time.monotonic() - started
        bob = gw.client.start_kernel(env={"KERNEL_USERNAME": "bob"})
        assert alice != bob and pooled_count(gw) == 2
        assert took < 0.5, f"a pooled start took {took:.2f}s"
        sock = gw.client.connect(alice)
        run = sock.execute("import os; print(os.getcwd(), os.getpid())")
        sock.close()
        cwd, pid = run.stdout.split()
        assert cwd == str(workdir) and int(pid) in before
        models = {k["id"]: k for k in gw.client.request("GET", "/api/kernels").json}
        assert set(models) == {alice, bob}
        wait_until(lambda: gw.log().count("pool python3: kernel") >= 4, 60, 0.2, what="the pool to refill")
        fresh = gw.client.start_kernel(env={"KERNEL_USERNAME": "carol", "KERNEL_SPECIAL": "x"})
        assert pooled_count(gw) == 2, "a request with other variables must not get a pooled kernel"
        for kernel_id in (alice, bob, fresh):
            assert gw.client.delete_kernel(kernel_id) == 204
    finally:
        gw.stop()


def test_pooled_kernels_are_per_user_private(tmp_path: Path) -> None:
    """A pooled kernel handed to a user-bound caller is that user's: another user gets 404 for it."""
    from egd.auth import token_digest

    tokens = {"alice": "alice-token-0123456789abcdef", "bob": "bob-token-0123456789abcdef"}
    users: dict[str, Any] = {name: {"token_sha256": token_digest(t)} for name, t in tokens.items()}
    gw = GatewayProcess({"kernels": {"pools": {"python3": 1}},
                         "auth": {"users": users, "users_trust_each_other": True}})
    try:
        wait_until(lambda: "pool python3: kernel" in gw.log(), 60, 0.2, what="the pool to fill")
        alice = GatewayClient(gw.url, tokens["alice"])
        kernel_id = alice.start_kernel()
        assert pooled_count(gw) == 1
        assert GatewayClient(gw.url, tokens["bob"]).kernel(kernel_id).status == 404
        sock = alice.connect(kernel_id)
        assert sock.execute("1 + 1").result == "2"
        sock.close()
        assert alice.delete_kernel(kernel_id) == 204
    finally:
        gw.stop()


def most_starting_at_once(log: str) -> int:
    """The most pooled kernels that were starting at the same moment, from the log's order of each kernel's
    "started as pid" and its "ready (n of size)" line."""
    starting = most = 0
    for line in log.splitlines():
        if "started as pid" in line:
            starting += 1
            most = max(most, starting)
        elif "pool python3: kernel" in line and " ready (" in line:
            starting -= 1
    return most


@pytest.mark.parametrize("at_once", [None, 3])
def test_a_pool_fills_one_kernel_at_a_time_unless_told_otherwise(at_once: int | None) -> None:
    """By default a pool starts one kernel at a time (a burst that empties it must not become a storm of kernel
    boots that slows the kernels just handed out); ``kernels.pool_fill_at_once`` allows more. Replacements for
    kernels handed out follow the same bound."""
    kernels: dict[str, Any] = {"pools": {"python3": 3}}
    if at_once:
        kernels["pool_fill_at_once"] = at_once
    gw = GatewayProcess({"kernels": kernels})
    try:
        wait_until(lambda: gw.log().count("pool python3: kernel") >= 3, 90, 0.2, what="the pool to fill")
        taken = [gw.client.start_kernel() for _ in range(3)]
        assert pooled_count(gw) == 3
        wait_until(lambda: gw.log().count("pool python3: kernel") >= 6, 90, 0.2, what="the pool to refill")
        assert most_starting_at_once(gw.log()) == (at_once or 1)
        for kernel_id in taken:
            gw.client.delete_kernel(kernel_id)
    finally:
        gw.stop()
