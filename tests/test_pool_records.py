"""Pooled kernels and the state store: a pooled kernel is nobody's, so it is not recorded while it waits in the
pool; once handed out it is its user's kernel like any other (recorded, re-attached by the next gateway).

This is the path where a kernel changes hooks after construction (``Kernel.assign``): built for the pool with
hooks that record nothing, handed out with the manager's."""

from __future__ import annotations

import pytest

from tests.conftest import GatewayProcess, wait_until
from tests.procs import alive
from tests.test_persistence import pid_of

pytestmark = pytest.mark.ops


def test_a_pooled_kernel_is_recorded_once_handed_out_and_never_before() -> None:
    """With a pool of 2 and ``state.on_stop: keep``: the kernel handed to alice keeps running through a restart
    of egd and is re-attached with its variable; the spare never handed out is stopped with its pool and was never
    in the store (the next gateway finds no record of it to forget)."""
    # The gateways' own runtime directory (under the session's root, which the leftover check watches).
    first = GatewayProcess({"kernels": {"pools": {"python3": 2}}, "state": {"on_stop": "keep"}})
    try:
        wait_until(lambda: first.log().count("pool python3: kernel") >= 2, 60, 0.2, what="the pool to fill")
        kernel_id = first.client.start_kernel(env={"KERNEL_USERNAME": "alice"})
        assert "from the pool for alice" in first.log()
        pid = pid_of(first.client, kernel_id, "z = 'from the pool'")
    finally:
        assert first.stop() == 0
    assert alive(pid)
    assert "1 kernel(s) keep running" in first.log()

    second = GatewayProcess({"kernels": {"runtime_dir": str(first.dir / "runtime")}, "state": {"on_stop": "keep"}})
    try:
        assert [k["id"] for k in second.client.request("GET", "/api/kernels").json] == [kernel_id]
        sock = second.client.connect(kernel_id)
        assert sock.execute("print(z)").stdout.strip() == "from the pool"
        sock.close()
        assert "forgotten" not in second.log(), "a pooled kernel nobody was given must not have been recorded"
        assert second.client.delete_kernel(kernel_id) == 204
        wait_until(lambda: not alive(pid), 10, what="the kernel to be stopped")
    finally:
        second.stop()
