"""The REST API: shapes and status codes Jupyter Server's gateway client and EG's clients rely on."""

from __future__ import annotations

import re
import uuid

import pytest

from tests.client import GatewayClient
from tests.conftest import GatewayProcess

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def assert_json_error(resp: object, status: int) -> dict:
    """A JSON error body with reason and message, no traceback."""
    assert resp.status == status, (resp.status, resp.body)  # type: ignore[attr-defined]
    assert resp.headers["content-type"].startswith("application/json")  # type: ignore[attr-defined]
    body = resp.json  # type: ignore[attr-defined]
    assert set(body) == {"reason", "message"}, body
    assert "Traceback" not in resp.body.decode()  # type: ignore[attr-defined]
    return dict(body)


def test_api_version(client: GatewayClient) -> None:
    """GET /api reports the API version and the gateway's own version."""
    body = client.request("GET", "/api").json
    assert body["version"] and body["gateway_version"]


def test_kernelspecs_listing(client: GatewayClient) -> None:
    """The listing has the default name and every spec in Jupyter Server's model shape."""
    body = client.request("GET", "/api/kernelspecs").json
    assert body["default"] == "python3"
    specs = body["kernelspecs"]
    assert {"python3", "with_env", "fail_fast"} <= set(specs)
    model = specs["with_env"]
    assert model["name"] == "with_env"
    assert model["spec"]["display_name"] == "Python with kernelspec env (test)"
    assert model["spec"]["language"] == "python"
    assert model["resources"] == {"logo-64x64": "/kernelspecs/with_env/logo-64x64.png"}


def test_kernelspec_by_name_and_unknown(client: GatewayClient) -> None:
    """A named spec is returned alone; an unknown one is a JSON 404."""
    assert client.request("GET", "/api/kernelspecs/python3").json["name"] == "python3"
    assert_json_error(client.request("GET", "/api/kernelspecs/no_such_spec"), 404)


def test_kernelspec_user_query_quirk(client: GatewayClient) -> None:
    """Jupyter Server builds '/api/kernelspecs?user=bob/python3' for one spec: answer with that spec."""
    body = client.request("GET", "/api/kernelspecs?user=bob/python3").json
    assert body["name"] == "python3"


def test_kernelspec_resources(client: GatewayClient) -> None:
    """Resource files are served (GET and HEAD) and nothing outside the resource directory is."""
    resp = client.request("GET", "/kernelspecs/with_env/logo-64x64.png")
    assert resp.status == 200 and resp.body.startswith(b"\x89PNG")
    assert resp.headers["content-type"] == "image/png"
    head = client.request("HEAD", "/kernelspecs/with_env/logo-64x64.png")
    assert head.status == 200 and head.body == b""
    for path in ("/kernelspecs/with_env/../fail_fast/kernel.json", "/kernelspecs/with_env/%2e%2e/%2e%2e/conftest.py",
                 "/kernelspecs/with_env/..%2f..%2fconftest.py", "/kernelspecs/with_env/nothing.png",
                 "/kernelspecs/no_such_spec/logo-64x64.png"):
        resp = client.request("GET", path)
        assert resp.status == 404, path
        assert b"import" not in resp.body


def test_unknown_paths_and_methods(client: GatewayClient) -> None:
    """Unknown paths are JSON 404s; a wrong method is a JSON 405. (``/`` is the status page.)"""
    for path in ("/tree", "/api/contents", "/api/kernels/x/y/z", "/nope"):
        assert_json_error(client.request("GET", path), 404)
    assert_json_error(client.request("PUT", "/api/kernels"), 405)


def test_kernel_lifecycle_shapes(client: GatewayClient) -> None:
    """POST gives 201, Location and the model; GET and the list show it; DELETE gives 204, then 404."""
    resp = client.request("POST", "/api/kernels", {"name": "python3"})
    assert resp.status == 201, resp.body
    model = resp.json
    kernel_id = model["id"]
    try:
        assert resp.headers["location"] == f"/api/kernels/{kernel_id}"
        assert set(model) >= {"id", "name", "last_activity", "execution_state", "connections"}
        assert model["name"] == "python3" and model["connections"] == 0
        assert TIMESTAMP.match(model["last_activity"]), model["last_activity"]
        assert model["execution_state"] in ("idle", "busy")
        assert client.kernel(kernel_id).json["id"] == kernel_id
        assert kernel_id in [k["id"] for k in client.request("GET", "/api/kernels").json]
    finally:
        assert client.delete_kernel(kernel_id) == 204
    assert_json_error(client.kernel(kernel_id), 404)
    assert_json_error(client.request("DELETE", f"/api/kernels/{kernel_id}"), 404)
    assert kernel_id not in [k["id"] for k in client.request("GET", "/api/kernels").json]


def test_empty_body_starts_default_kernel(client: GatewayClient) -> None:
    """An empty POST body starts the default kernelspec."""
    resp = client.request("POST", "/api/kernels", raw=b"")
    assert resp.status == 201, resp.body
    assert resp.json["name"] == "python3"
    client.delete_kernel(resp.json["id"])


@pytest.mark.parametrize("raw,fragment", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"name": 7}', "name must be a string"),
    (b'{"env": "PATH=/tmp"}', "env must be a JSON object"),
    (b'{"env": {"KERNEL_X": 5}}', "must be a string"),
    (b'{"env": {"KERNEL_ID": "not-a-uuid"}}', "KERNEL_ID"),
    (b'{"env": {"KERNEL_ID": "1B4E28BA-2FA1-4D2B-9C5E-3C1F0E8B2A7D"}}', "KERNEL_ID"),
    (b'{"env": {"KERNEL_ID": "6fa459ea-ee8a-3ca4-894e-db77e160355e"}}', "KERNEL_ID"),
    (b'{"env": {"KERNEL_LAUNCH_TIMEOUT": "soon"}}', "KERNEL_LAUNCH_TIMEOUT"),
    (b'{"env": {"1BAD": "x"}}', "not a valid environment variable name"),
])
def test_bad_start_requests(gateway: GatewayProcess, raw: bytes, fragment: str) -> None:
    """Malformed bodies, env and KERNEL_ID are 400s that say what is wrong, and start nothing."""
    before = len(gateway.client.request("GET", "/api/kernels").json)
    body = assert_json_error(gateway.client.request("POST", "/api/kernels", raw=raw), 400)
    assert fragment in body["message"]
    assert len(gateway.client.request("GET", "/api/kernels").json) == before


def test_prohibited_value_is_not_echoed(client: GatewayClient) -> None:
    """A value with shell metacharacters is refused and never echoed back."""
    for value in ("$(touch /tmp/egd-pwned)", "`id`", "a\nb", "x\rb", "nul\x00"):
        resp = client.request("POST", "/api/kernels", {"env": {"KERNEL_EVIL": value}})
        body = assert_json_error(resp, 400)
        assert "KERNEL_EVIL" in body["message"] and value not in resp.body.decode()


def test_unknown_kernelspec_is_404(client: GatewayClient) -> None:
    """Starting an unknown kernelspec is a JSON 404, not a 500 with a traceback."""
    body = assert_json_error(client.request("POST", "/api/kernels", {"name": "no_such_spec"}), 404)
    assert "no_such_spec" in body["message"]


def test_unconfigured_driver_is_503(client: GatewayClient) -> None:
    """An EG kernelspec for a driver this gateway does not run says so."""
    body = assert_json_error(client.request("POST", "/api/kernels", {"name": "eg_distributed"}), 503)
    assert "ssh" in body["message"]


def test_client_chosen_kernel_id(client: GatewayClient) -> None:
    """env.KERNEL_ID (a uuid4) becomes the kernel's id; a second start with it is a 409."""
    kernel_id = str(uuid.uuid4())
    assert client.start_kernel("python3", {"KERNEL_ID": kernel_id}) == kernel_id
    try:
        assert_json_error(client.request("POST", "/api/kernels", {"env": {"KERNEL_ID": kernel_id}}), 409)
    finally:
        client.delete_kernel(kernel_id)


def test_unknown_kernel_actions_are_404(client: GatewayClient) -> None:
    """Interrupt, restart and the WebSocket of an unknown kernel are JSON 404s."""
    missing = str(uuid.uuid4())
    for path in (f"/api/kernels/{missing}/interrupt", f"/api/kernels/{missing}/restart"):
        assert_json_error(client.request("POST", path, {}), 404)
    assert_json_error(client.request("GET", f"/api/kernels/{missing}/channels"), 404)


def test_channels_without_upgrade_is_400(client: GatewayClient, kernel: str) -> None:
    """A plain GET of a kernel's channels URL explains it is a WebSocket endpoint."""
    body = assert_json_error(client.request("GET", f"/api/kernels/{kernel}/channels"), 400)
    assert "WebSocket" in body["message"]


def test_base_url(make_gateway) -> None:  # type: ignore[no-untyped-def]
    """With a base URL everything lives under it, Location included, and paths outside are JSON 404s."""
    gw = make_gateway({"server": {"base_url": "/gw/egd/"}})
    client = gw.client
    assert client.request("GET", "/api").status == 200
    outside = GatewayClient(f"http://127.0.0.1:{gw.port}")
    assert_json_error(outside.request("GET", "/api"), 404)
    assert_json_error(outside.request("GET", "/gw/api"), 404)
    resp = client.request("POST", "/api/kernels", {})
    assert resp.status == 201
    assert resp.headers["location"] == f"/gw/egd/api/kernels/{resp.json['id']}"
    specs = client.request("GET", "/api/kernelspecs").json["kernelspecs"]
    assert specs["with_env"]["resources"]["logo-64x64"] == "/gw/egd/kernelspecs/with_env/logo-64x64.png"
    assert client.request("GET", "/kernelspecs/with_env/logo-64x64.png").status == 200
    sock = client.connect(resp.json["id"])
    assert sock.execute("1+1").result == "2"
    sock.close()
    assert client.delete_kernel(resp.json["id"]) == 204
