"""What environment reaches a kernel: EG's rules with Kernel Gateway's safer default."""

from __future__ import annotations

import json
import os
from typing import Any

from tests.client import GatewayClient
from tests.conftest import GATEWAY_SECRET


def kernel_environ(client: GatewayClient, name: str, env: dict[str, str] | None) -> dict[str, str]:
    """Start a kernel with ``env`` and return its os.environ."""
    kernel_id = client.start_kernel(name, env)
    try:
        sock = client.connect(kernel_id)
        run = sock.execute("import os, json; print(json.dumps(dict(os.environ)))")
        sock.close()
        return dict(json.loads(run.stdout))
    finally:
        client.delete_kernel(kernel_id)


def test_only_kernel_variables_pass(client: GatewayClient) -> None:
    """KERNEL_* pass from the request; other names are dropped; the gateway's secrets never reach the kernel."""
    environ = kernel_environ(client, "python3", {"KERNEL_FOO": "bar baz & (ok)", "NOT_ALLOWED": "x",
                                                 "KERNEL_VOLUME_MOUNTS": '[{"name": "a"}]'})
    assert environ["KERNEL_FOO"] == "bar baz & (ok)"
    assert environ["KERNEL_VOLUME_MOUNTS"] == '[{"name": "a"}]'
    assert "NOT_ALLOWED" not in environ
    assert GATEWAY_SECRET[0] not in environ
    assert GATEWAY_SECRET[1] not in json.dumps(environ)
    assert environ["KERNEL_GATEWAY"] == "1"
    assert environ["KERNEL_USERNAME"]


def test_no_env_in_request_still_hides_gateway_env(client: GatewayClient) -> None:
    """Without an env in the request the kernel still gets only the inherited allow-list (EG leaked all)."""
    environ = kernel_environ(client, "python3", None)
    assert GATEWAY_SECRET[0] not in environ
    assert "PATH" in environ
    inherited = {"PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR"}
    from_gateway = {name for name, value in os.environ.items() if environ.get(name) == value}
    assert from_gateway <= inherited, sorted(from_gateway - inherited)


def test_kernel_gateway_not_overridable(client: GatewayClient) -> None:
    """KERNEL_GATEWAY and KERNEL_ID are the gateway's, whatever the request says."""
    environ = kernel_environ(client, "python3", {"KERNEL_GATEWAY": "0"})
    assert environ["KERNEL_GATEWAY"] == "1"


def test_request_beats_kernelspec_env(client: GatewayClient) -> None:
    """The kernelspec's env applies with ${VAR} substitution, and a request's KERNEL_* value beats it."""
    environ = kernel_environ(client, "with_env", {"KERNEL_OVERRIDE_ME": "from-request", "KERNEL_USERNAME": "alice"})
    assert environ["SPEC_VAR"] == "from-spec"
    assert environ["KERNEL_OVERRIDE_ME"] == "from-request"
    assert environ["SPEC_SUBST"] == "user=alice"
    assert environ["KERNEL_USERNAME"] == "alice"


def test_client_and_inherited_envs(make_gateway: Any) -> None:
    """Configured client_envs pass from the request; configured inherited_envs pass from the gateway."""
    gw = make_gateway({"kernels": {"client_envs": ["SPARK_OPTS"], "inherited_envs": ["PATH", "EGD_TEST_SHARED"]}},
                      env={"EGD_TEST_SHARED": "shared-value"})
    environ = kernel_environ(gw.client, "python3", {"SPARK_OPTS": "--conf a=b", "OTHER": "no"})
    assert environ["SPARK_OPTS"] == "--conf a=b"
    assert environ["EGD_TEST_SHARED"] == "shared-value"
    assert "OTHER" not in environ and GATEWAY_SECRET[0] not in environ
    assert "HOME" not in environ


def test_working_dir(client: GatewayClient, tmp_path: Any) -> None:
    """KERNEL_WORKING_DIR, when it exists on the gateway host, is the kernel's working directory."""
    kernel_id = client.start_kernel("python3", {"KERNEL_WORKING_DIR": str(tmp_path)})
    try:
        sock = client.connect(kernel_id)
        assert sock.execute("import os; print(os.getcwd())").stdout.strip() == str(tmp_path)
        sock.close()
    finally:
        client.delete_kernel(kernel_id)
