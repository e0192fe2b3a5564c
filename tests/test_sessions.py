"""/api/sessions with Jupyter Server 2.x semantics."""

from __future__ import annotations

from tests.client import GatewayClient
from tests.test_api import assert_json_error


def test_session_crud(client: GatewayClient) -> None:
    """Create starts a kernel; get/list show it; the same path returns the same session; delete stops it."""
    resp = client.request("POST", "/api/sessions", {"path": "work/a.ipynb", "type": "notebook", "name": "a.ipynb",
                                                    "kernel": {"name": "python3"}})
    assert resp.status == 201, resp.body
    session = resp.json
    assert resp.headers["location"] == f"/api/sessions/{session['id']}"
    assert session["path"] == "work/a.ipynb" and session["type"] == "notebook" and session["name"] == "a.ipynb"
    assert session["notebook"] == {"path": "work/a.ipynb", "name": "a.ipynb"}
    kernel_id = session["kernel"]["id"]
    assert client.kernel(kernel_id).status == 200
    assert client.request("GET", f"/api/sessions/{session['id']}").json["kernel"]["id"] == kernel_id
    assert session["id"] in [s["id"] for s in client.request("GET", "/api/sessions").json]
    again = client.request("POST", "/api/sessions", {"path": "work/a.ipynb", "type": "notebook"})
    assert again.status == 201 and again.json["id"] == session["id"]
    assert client.request("DELETE", f"/api/sessions/{session['id']}").status == 204
    assert_json_error(client.request("GET", f"/api/sessions/{session['id']}"), 404)
    assert_json_error(client.kernel(kernel_id), 404)


def test_session_attaches_to_existing_kernel(client: GatewayClient, kernel: str) -> None:
    """A session naming an existing kernel id uses that kernel; an unknown id is a 404."""
    resp = client.request("POST", "/api/sessions", {"path": "b.py", "type": "file", "kernel": {"id": kernel}})
    assert resp.status == 201 and resp.json["kernel"]["id"] == kernel
    assert "notebook" not in resp.json
    missing = {"id": "00000000-0000-4000-8000-000000000000"}
    assert_json_error(client.request("POST", "/api/sessions", {"path": "c.py", "type": "file", "kernel": missing}), 404)


def test_session_patch(client: GatewayClient) -> None:
    """PATCH renames, and switching the kernel by name starts a new kernel and shuts the old one down."""
    session = client.request("POST", "/api/sessions", {"path": "old.ipynb", "type": "notebook"}).json
    old_kernel = session["kernel"]["id"]
    resp = client.request("PATCH", f"/api/sessions/{session['id']}", {"path": "new.ipynb", "name": "new"})
    assert resp.status == 200 and resp.json["path"] == "new.ipynb" and resp.json["name"] == "new"
    assert resp.json["kernel"]["id"] == old_kernel
    resp = client.request("PATCH", f"/api/sessions/{session['id']}", {"kernel": {"name": "python3"}})
    assert resp.status == 200
    new_kernel = resp.json["kernel"]["id"]
    assert new_kernel != old_kernel
    assert_json_error(client.kernel(old_kernel), 404)
    body = assert_json_error(client.request("PATCH", f"/api/sessions/{session['id']}",
                                            {"kernel": {"id": "00000000-0000-4000-8000-000000000000"}}), 400)
    assert "No such kernel" in body["message"]
    assert client.request("DELETE", f"/api/sessions/{session['id']}").status == 204
    assert_json_error(client.kernel(new_kernel), 404)


def test_session_bad_requests(client: GatewayClient) -> None:
    """Missing path or type, or a bad body, are 400s; unknown ids are 404s."""
    assert "path" in assert_json_error(client.request("POST", "/api/sessions", {"type": "notebook"}), 400)["message"]
    assert "type" in assert_json_error(client.request("POST", "/api/sessions", {"path": "x"}), 400)["message"]
    assert_json_error(client.request("POST", "/api/sessions", raw=b"[]"), 400)
    assert_json_error(client.request("POST", "/api/sessions", {"path": "x", "type": "t", "kernel": "python3"}), 400)
    assert_json_error(client.request("POST", "/api/sessions", {"path": "x", "type": "t",
                                                               "kernel": {"name": "no_such_spec"}}), 404)
    assert_json_error(client.request("PATCH", "/api/sessions/nope", {}), 404)
    assert_json_error(client.request("DELETE", "/api/sessions/nope"), 404)


def test_session_disappears_with_its_kernel(client: GatewayClient) -> None:
    """Deleting a session's kernel directly removes the session too."""
    session = client.request("POST", "/api/sessions", {"path": "gone.ipynb", "type": "notebook"}).json
    client.delete_kernel(session["kernel"]["id"])
    assert_json_error(client.request("GET", f"/api/sessions/{session['id']}"), 404)
    assert session["id"] not in [s["id"] for s in client.request("GET", "/api/sessions").json]
