"""What may be started: ``kernels.allowed_kernelspecs`` holds at every start (REST, sessions, the default
kernel, pools), with exact names, and answers exactly as for a spec that does not exist; request values that
cannot reach a process (a lone surrogate) or names with a hidden newline are a 400 naming the variable, never
a 500, and take nothing (no process, no connection file, no port)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import GatewayProcess, wait_until

pytestmark = pytest.mark.security


def _session(name: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"path": "work/a.ipynb", "type": "notebook", "name": "a.ipynb"}
    body["kernel"] = {"name": name} if name is not None else {}
    return body


def _not_found(gw: GatewayProcess, path: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = gw.client.request("POST", path, body)
    assert resp.status == 404, (path, body, resp.status, resp.body)
    return dict(resp.json)


def test_allowed_kernelspecs_hold_at_every_start(make_gateway: Any) -> None:
    """A spec outside the allowed list, or an allowed one in another case (PYTHON3), cannot be started through
    POST /api/kernels, POST /api/sessions or as the default kernel: 404, word for word the answer for a spec
    that does not exist. The allowed spec starts under its exact name."""
    gw = make_gateway({"kernels": {"allowed_kernelspecs": ["python3"], "default_kernel_name": "with_env"}})
    for path, body_of in (("/api/kernels", lambda name: {"name": name} if name is not None else {}),
                          ("/api/sessions", _session)):
        missing = _not_found(gw, path, body_of("no_such_spec"))
        assert missing["message"] == "Kernel spec no_such_spec not found; available: python3"
        for name in ("with_env", "PYTHON3", "Python3", None):  # None: the default kernel (with_env)
            shown = name or "with_env"
            answer = _not_found(gw, path, body_of(name))
            assert answer == {**missing, "message": missing["message"].replace("no_such_spec", shown)}
    assert gw.client.request("GET", "/api/kernels").json == []
    assert not gw.kernel_processes()
    assert list(gw.client.request("GET", "/api/kernelspecs").json["kernelspecs"]) == ["python3"]
    kernel_id = gw.client.start_kernel("python3")
    assert gw.client.delete_kernel(kernel_id) == 204


def test_a_pool_of_a_spec_not_allowed_starts_nothing(make_gateway: Any) -> None:
    """Pools start kernels through the same check: a pool of a spec outside the allowed list stays empty."""
    gw = make_gateway({"kernels": {"allowed_kernelspecs": ["python3"], "pools": {"with_env": 1}}})
    wait_until(lambda: "pool with_env: a kernel could not be started" in gw.log(), 30, 0.1,
               what="the pool's refusal")
    assert "Kernel spec with_env not found" in gw.log()
    assert not gw.kernel_processes()


def _left_behind(gw: GatewayProcess) -> list[str]:
    runtime = Path(gw.runtime_dir)
    return sorted(p.name for p in runtime.iterdir() if p.name.startswith("kernel-")) if runtime.exists() else []


def test_values_that_cannot_reach_a_process_are_refused(make_gateway: Any) -> None:
    """A lone surrogate (as JSON allows: "\\ud800", or "\\udc80" which Python's file system encoding would
    smuggle through as a raw byte) in any env value, and a name with a final newline, are a 400 that names the
    variable (never echoes the value); repeated, they take no port: with room for four kernels' ports, four
    kernels still start afterwards."""
    gw = make_gateway({"kernels": {"port_range": "47100..47120"}})
    bad_values = [{"KERNEL_X": "\ud800"}, {"KERNEL_X": "ok\udc80"}, {"KERNEL_USERNAME": "al\ud83dice"},
                  {"KERNEL_WORKING_DIR": "/tmp/\udfff"}]
    for _ in range(3):
        for env in bad_values:
            name = next(iter(env))
            raw = json.dumps({"env": env}).encode()  # \\uXXXX escapes: valid JSON, invalid Unicode
            resp = gw.client.request("POST", "/api/kernels", raw=raw)
            assert resp.status == 400, (env, resp.status, resp.body)
            assert name in resp.json["message"]
            assert "\\u" not in resp.body.decode() and "ud8" not in resp.body.decode().lower()
        for env in ({"KERNEL_X\n": "v"}, {"KERNEL_\ud800": "v"}):
            resp = gw.client.request("POST", "/api/kernels", raw=json.dumps({"env": env}).encode())
            assert resp.status == 400, (env, resp.status, resp.body)
            assert resp.json["message"] == "env has a name that is not a valid environment variable name"
        resp = gw.client.request("POST", "/api/sessions", raw=json.dumps(
            {**_session("python3"), "kernel": {"name": "python3", "env": {"KERNEL_X": "\ud800"}}}).encode())
        assert resp.status == 400 and "KERNEL_X" in resp.json["message"], (resp.status, resp.body)
    assert "Traceback" not in gw.log()
    assert gw.client.request("GET", "/api/kernels").json == []
    assert not gw.kernel_processes() and _left_behind(gw) == []
    kernels = [gw.client.start_kernel("python3") for _ in range(4)]
    for kernel_id in kernels:
        assert gw.client.delete_kernel(kernel_id) == 204
    wait_until(lambda: not _left_behind(gw), 10, what="connection files to go")
    assert os.path.isdir(gw.runtime_dir)


def test_authorized_users_name_the_owner_of_kernels_without_a_user(make_gateway: Any) -> None:
    """A kernel started without KERNEL_USERNAME belongs to ``(gateway)``: a gateway-wide authorized_users list
    lets such starts through only when it names ``(gateway)`` (docs/security.rst), and still refuses others."""
    gw = make_gateway({"kernels": {"authorized_users": ["(gateway)"]}})
    started = gw.client.request("POST", "/api/kernels", {"name": "python3"})
    assert started.status == 201, started.body
    refused = gw.client.request("POST", "/api/kernels", {"name": "python3", "env": {"KERNEL_USERNAME": "bob"}})
    assert refused.status == 403 and "bob" in refused.json["message"]
    assert gw.client.delete_kernel(started.json["id"]) == 204

    strict = make_gateway({"kernels": {"authorized_users": ["alice"]}})
    assert strict.client.request("POST", "/api/kernels", {"name": "python3"}).status == 403
