"""Several users on one gateway: per-user tokens and JWTs say who is asking; each user sees and touches only
their own kernels and sessions (someone else's is 404, over REST and WebSocket), cannot start a kernel as
another user, and gets kernelspecs without their command lines; an admin sees everything."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import websocket
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from egd.auth import token_digest
from tests.client import GatewayClient
from tests.conftest import GatewayProcess, wait_until

pytestmark = pytest.mark.security

TOKENS = {"alice": "alice-token-0123456789abcdef", "bob": "bob-token-0123456789abcdef",
          "carol": "carol-token-0123456789abcdef"}
SHARED = "shared-token-0123456789abcdef"
HS_SECRET = "an-hs256-secret-of-at-least-32-characters!"
#: These gateways run local kernels as egd's own OS user: separation here is the API's, which these tests check
#: (kernels as their users: tests/test_impersonation.py). Without this switch egd refuses to start.
TRUSTING = {"users_trust_each_other": True}


def _users() -> dict[str, Any]:
    return {"alice": {"token_sha256": token_digest(TOKENS["alice"]), "groups": ["data"]},
            "bob": {"token_sha256": token_digest(TOKENS["bob"])},
            "carol": {"token_sha256": token_digest(TOKENS["carol"]), "admin": True}}


@pytest.fixture(scope="module")
def multi() -> Iterator[GatewayProcess]:
    """A gateway with a shared token, three per-user tokens (carol is an admin) and HS256 JWTs."""
    gw = GatewayProcess({"auth": {"token": SHARED, "users": _users(), "admin_groups": ["ops"], **TRUSTING,
                                  "jwt": {"algorithm": "HS256", "secret": HS_SECRET, "audience": "egd",
                                          "user_claim": "preferred_username"}}})
    yield gw
    gw.stop()


def as_user(gw: GatewayProcess, name: str) -> GatewayClient:
    """A client of ``gw`` with ``name``'s own token."""
    return GatewayClient(gw.url, TOKENS[name])


def hs256(claims: dict[str, Any], secret: str = HS_SECRET) -> str:
    """A signed HS256 JWT."""
    return jwt.encode(claims, secret, algorithm="HS256")


def ws_status(client: GatewayClient, kernel_id: str) -> int:
    """The HTTP status of a WebSocket handshake to the kernel's channels (101 when it is accepted)."""
    url = client.url.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels"
    try:
        sock = websocket.create_connection(url, timeout=10, header=[f"Authorization: token {client.token}"])
    except websocket.WebSocketBadStatusException as exc:
        return int(exc.status_code)
    sock.close()
    return 101


def test_users_see_and_touch_only_their_own_kernels(multi: GatewayProcess) -> None:
    """Bob cannot list, read, interrupt, restart, connect to or delete Alice's kernel: each is a 404, as if it
    did not exist, and each refusal is an audit line. Carol (admin) and the shared token see it."""
    alice, bob, carol = as_user(multi, "alice"), as_user(multi, "bob"), as_user(multi, "carol")
    kernel_id = alice.start_kernel()
    try:
        assert [k["id"] for k in alice.request("GET", "/api/kernels").json] == [kernel_id]
        assert bob.request("GET", "/api/kernels").json == []
        for method, path in (("GET", ""), ("POST", "/interrupt"), ("POST", "/restart"), ("DELETE", "")):
            resp = bob.request(method, f"/api/kernels/{kernel_id}{path}", {} if method == "POST" else None)
            assert resp.status == 404, (method, path, resp.json)
            assert resp.json["message"] == f"Kernel does not exist: {kernel_id}"
        assert ws_status(bob, kernel_id) == 404
        assert ws_status(alice, kernel_id) == 101
        assert kernel_id in [k["id"] for k in carol.request("GET", "/api/kernels").json]
        assert carol.kernel(kernel_id).status == 200
        assert GatewayClient(multi.url, SHARED).kernel(kernel_id).status == 200
        sock = alice.connect(kernel_id)
        assert sock.execute("import os; print(os.environ['KERNEL_USERNAME'])").stdout.strip() == "alice"
        sock.close()
        assert f"refused read of kernel {kernel_id} (user=alice) to bob (user-token)" in multi.log()
    finally:
        assert alice.delete_kernel(kernel_id) == 204


def test_sessions_are_private_too(multi: GatewayProcess) -> None:
    """A session is its kernel's owner's: Bob neither lists nor reads nor deletes Alice's, nor attaches a
    session of his own to her kernel."""
    alice, bob = as_user(multi, "alice"), as_user(multi, "bob")
    session = alice.request("POST", "/api/sessions", {"path": "a.ipynb", "type": "notebook",
                                                      "kernel": {"name": "python3"}}).json
    try:
        assert bob.request("GET", "/api/sessions").json == []
        assert bob.request("GET", f"/api/sessions/{session['id']}").status == 404
        assert bob.request("DELETE", f"/api/sessions/{session['id']}").status == 404
        hijack = bob.request("POST", "/api/sessions", {"path": "a.ipynb", "type": "notebook",
                                                       "kernel": {"id": session["kernel"]["id"]}})
        assert hijack.status == 404
    finally:
        assert alice.request("DELETE", f"/api/sessions/{session['id']}").status == 204


def test_user_token_cannot_claim_another_user(multi: GatewayProcess) -> None:
    """KERNEL_USERNAME naming someone else is refused with a user's own token (and audited); naming oneself
    is fine; the shared token (a trusted client) may name any user."""
    alice = as_user(multi, "alice")
    resp = alice.request("POST", "/api/kernels", {"name": "python3", "env": {"KERNEL_USERNAME": "bob"}})
    assert resp.status == 403 and "KERNEL_USERNAME" in resp.json["message"]
    assert "kernel start refused: alice (user-token) claimed KERNEL_USERNAME='bob'" in multi.log()
    kernel_id = alice.start_kernel(env={"KERNEL_USERNAME": "alice"})
    assert alice.delete_kernel(kernel_id) == 204
    shared = GatewayClient(multi.url, SHARED)
    kernel_id = shared.start_kernel(env={"KERNEL_USERNAME": "bob"})
    try:
        assert as_user(multi, "bob").kernel(kernel_id).status == 200
        assert alice.kernel(kernel_id).status == 404
    finally:
        shared.delete_kernel(kernel_id)


def test_kernelspecs_hide_command_lines_from_non_admins(multi: GatewayProcess) -> None:
    """A user gets a spec's name, display name, language and resources; argv, env and the driver config only
    an admin gets."""
    mine = as_user(multi, "alice").request("GET", "/api/kernelspecs").json["kernelspecs"]["with_env"]["spec"]
    assert mine["argv"] == [] and mine["env"] == {} and "egd" not in mine["metadata"]
    full = as_user(multi, "carol").request("GET", "/api/kernelspecs/with_env").json["spec"]
    assert full["argv"] and full["env"]


def test_jwt_identity_and_refusals(multi: GatewayProcess) -> None:
    """A valid JWT is its user (from the configured claim; an admin through a group); an expired one, a wrong
    signature, a wrong audience, a missing user claim, ``alg: none`` and garbage are 401."""
    now = int(time.time())
    good = {"preferred_username": "dave", "aud": "egd", "exp": now + 300, "groups": ["data"]}
    dave = GatewayClient(multi.url, hs256(good))
    kernel_id = dave.start_kernel()
    try:
        sock = dave.connect(kernel_id)
        assert sock.execute("import os; print(os.environ['KERNEL_USERNAME'])").stdout.strip() == "dave"
        sock.close()
        assert as_user(multi, "alice").kernel(kernel_id).status == 404
        ops = GatewayClient(multi.url, hs256({**good, "preferred_username": "erin", "groups": ["ops"]}))
        assert ops.kernel(kernel_id).status == 200  # erin is an admin through the ops group
    finally:
        dave.delete_kernel(kernel_id)
    bad = {
        "expired": hs256({**good, "exp": now - 120}),
        "wrong signature": hs256(good, "another-secret-of-at-least-32-characters"),
        "wrong audience": hs256({**good, "aud": "someone-else"}),
        "no user claim": hs256({"aud": "egd", "exp": now + 300}),
        "no expiry": hs256({"preferred_username": "dave", "aud": "egd"}),
        "alg none": jwt.encode(good, None, algorithm="none"),
        "garbage": "a.b.c",
    }
    for why, token in bad.items():
        assert GatewayClient(multi.url, token).request("GET", "/api/kernels").status == 401, why
    assert "refused authentication from 127.0.0.1 for GET /api/kernels (expired JWT)" in multi.log()


def test_rs256_jwt(tmp_path: Path) -> None:
    """RS256: a token signed with the private key is accepted; one signed with another key, or an HS256 token
    signed with the public key as its secret (algorithm confusion), is not."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "jwt.pub").write_bytes(public)
    gw = GatewayProcess({"auth": {**TRUSTING,
                                  "jwt": {"algorithm": "RS256", "public_key_file": str(tmp_path / "jwt.pub"),
                                          "audience": "egd", "issuer": "https://idp.example"}}})
    try:
        claims = {"sub": "frank", "aud": "egd", "iss": "https://idp.example", "exp": int(time.time()) + 300}
        ok = GatewayClient(gw.url, jwt.encode(claims, key, algorithm="RS256"))
        assert ok.request("GET", "/api/kernels").status == 200
        for token in (jwt.encode(claims, other, algorithm="RS256"),
                      jwt.encode({**claims, "iss": "https://evil.example"}, key, algorithm="RS256")):
            assert GatewayClient(gw.url, token).request("GET", "/api/kernels").status == 401
        head = base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()).rstrip(b"=")
        body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")
        mac = hmac.new(public, head + b"." + body, hashlib.sha256).digest()
        confused = b".".join([head, body, base64.urlsafe_b64encode(mac).rstrip(b"=")]).decode()
        assert GatewayClient(gw.url, confused).request("GET", "/api/kernels").status == 401
    finally:
        gw.stop()


def test_config_refuses_bad_credentials_config(tmp_path: Path) -> None:
    """Plain-text tokens in auth.users, short HS256 secrets and unknown algorithms are config errors."""
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("auth:\n  users: {alice: {token_sha256: plaintext-token}}\n"
                   "  jwt: {algorithm: HS512, secret: short, audience: egd}\n")
    result = subprocess.run([sys.executable, "-m", "egd", "check-config", str(bad)], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 1
    assert "auth.users.alice.token_sha256: must be the 64 hex digits" in result.stderr
    assert "auth.jwt.algorithm: must be HS256 or RS256" in result.stderr


def test_kernelspec_groups(tmp_path: Path) -> None:
    """``@group`` in a spec's authorized_users admits the group's members: from the JWT's groups claim or from
    auth.groups for per-user tokens; others are refused and do not see the spec."""
    spec_dir = tmp_path / "specs" / "data_only"
    spec_dir.mkdir(parents=True)
    spec_dir.joinpath("kernel.json").write_text(json.dumps({
        "argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"], "display_name": "Data team",
        "language": "python", "metadata": {"egd": {"config": {"authorized_users": ["@data"]}}}}))
    gw = GatewayProcess({"auth": {"users": _users(), "groups": {"data": ["bob"]}, **TRUSTING,
                                  "jwt": {"algorithm": "HS256", "secret": HS_SECRET, "audience": "egd"}},
                         "kernels": {"kernelspec_dirs": [str(tmp_path / "specs")]}})
    try:
        def names(client: GatewayClient) -> set[str]:
            return set(client.request("GET", "/api/kernelspecs").json["kernelspecs"])

        member = GatewayClient(gw.url, hs256({"sub": "gina", "aud": "egd", "exp": int(time.time()) + 60,
                                              "groups": ["data"]}))
        outsider = GatewayClient(gw.url, hs256({"sub": "hank", "aud": "egd", "exp": int(time.time()) + 60}))
        assert "data_only" in names(member) and "data_only" in names(as_user(gw, "bob"))
        assert "data_only" not in names(outsider) and "data_only" not in names(as_user(gw, "carol"))
        resp = outsider.request("POST", "/api/kernels", {"name": "data_only"})
        assert resp.status == 403
        kernel_id = as_user(gw, "bob").start_kernel("data_only")
        assert as_user(gw, "bob").delete_kernel(kernel_id) == 204
    finally:
        gw.stop()


def _history_has(client: GatewayClient, kernel_id: str, text: str) -> bool:
    """Whether the kernel's IPython history (what JupyterLab's console recalls with the up arrow) holds ``text``."""
    sock = client.connect(kernel_id)
    try:
        reply = sock.wait_for(sock.request("history_request", {"hist_access_type": "tail", "n": 1000, "raw": True,
                                                               "output": False})).reply
    finally:
        sock.close()
    return any(text in entry[2] for entry in reply["content"]["history"])


def _cell_reaches_the_other_kernel(kernels: dict[str, Any] | None) -> tuple[bool, bool]:
    """Alice runs a cell in her kernel on a gateway with ``kernels``; returns (whether Alice's kernel has it in
    its history, whether Bob's kernel, of the same OS account, has it in his)."""
    gw = GatewayProcess({"auth": {"users": _users(), **TRUSTING}, **({"kernels": kernels} if kernels else {})})
    alice, bob = as_user(gw, "alice"), as_user(gw, "bob")
    mark = f"cell_{uuid.uuid4().hex}"
    started: list[tuple[GatewayClient, str]] = []
    try:
        for owner in (alice, bob):
            started.append((owner, owner.start_kernel("python3")))
        (_, alice_kernel), (_, bob_kernel) = started
        sock = alice.connect(alice_kernel)
        assert sock.execute(f"{mark} = 1").reply["content"]["status"] == "ok"
        sock.close()
        # A shared file is written by a thread of Alice's kernel just after her cell: give it time to show.
        try:
            seen = wait_until(lambda: _history_has(bob, bob_kernel, mark), 5, 0.5, "Alice's cell in Bob's history")
        except AssertionError:
            seen = False
        return _history_has(alice, alice_kernel, mark), bool(seen)
    finally:
        for owner, kernel_id in started:
            owner.delete_kernel(kernel_id)
        gw.stop()


def test_each_ipython_kernel_keeps_its_history_to_itself_unless_the_account_is_chosen() -> None:
    """By default (``kernels.ipython_history: kernel``) an ipykernel egd starts keeps its history in memory: a cell
    Alice runs is in her kernel's history and not in Bob's, though both kernels run as egd's account. With
    ``ipython_history: account`` they share IPython's history file, as plain ipykernel does: Alice's cell shows in
    Bob's history (what docs/security.rst and docs/operations.rst say)."""
    assert _cell_reaches_the_other_kernel(None) == (True, False)
    assert _cell_reaches_the_other_kernel({"ipython_history": "account"}) == (True, True)
