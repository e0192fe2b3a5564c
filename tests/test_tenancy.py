"""Users apart beneath the API, and user names that mean one user.

- With distinct users (per-user tokens, JWT) egd does not start while a configured driver runs every kernel as
  egd's OS user (``egd check-config`` says so too), unless ``auth.users_trust_each_other`` (then a warning);
- the state store, its key and lock are private to egd (0600 in a directory others cannot list), also when an
  older version or an operator left them open; an impersonated kernel can read none of them, nor egd's
  environment (``EGD_AUTH_TOKEN``); no kernel gets ``EGD_AUTH_TOKEN`` in its environment;
- a user name is matched whole (``"alice\\n"`` is no user); kernels started without ``KERNEL_USERNAME`` belong to
  no account, not even one named like egd's OS user.
"""

from __future__ import annotations

import getpass
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from cryptography.fernet import Fernet

from egd.auth import token_digest
from tests.client import GatewayClient
from tests.conftest import KERNELSPECS, GatewayProcess, free_port, wait_until
from tests.test_impersonation import users  # noqa: F401 - the fixture that makes egdalice, for the last test

pytestmark = pytest.mark.security

SHARED = "shared-token-0123456789abcdef"
ALICE = "alice-token-0123456789abcdef"
OS_USER_TOKEN = "osuser-token-0123456789abcdef"
HS_SECRET = "an-hs256-secret-of-at-least-32-characters!"
JWT = {"algorithm": "HS256", "secret": HS_SECRET, "audience": "egd"}


def egd_config(tmp_path: Path, **sections: Any) -> Path:
    """A config file for an egd run outside :class:`GatewayProcess` (one that is expected not to start)."""
    config: dict[str, Any] = {"server": {"ip": "127.0.0.1", "port": free_port()},
                              "kernels": {"kernelspec_dirs": [str(KERNELSPECS)],
                                          "runtime_dir": str(tmp_path / "runtime")}}
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    path = tmp_path / "egd.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_egd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m egd ARGS`` to its end."""
    return subprocess.run([sys.executable, "-m", "egd", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("auth", [{"users": {"alice": {"token_sha256": token_digest(ALICE)}}},
                                  {"token": SHARED, "jwt": JWT}], ids=["user-tokens", "jwt"])
def test_distinct_users_need_impersonation(tmp_path: Path, auth: dict[str, Any]) -> None:
    """Per-user tokens or JWT with the local driver, which runs every kernel as egd's user: egd run exits
    non-zero before listening, and egd check-config reports the same problem, naming the switch."""
    path = egd_config(tmp_path, auth=auth)
    started = time.monotonic()
    run = run_egd("run", "--config", str(path))
    assert run.returncode != 0
    output = run.stdout + run.stderr
    assert "users are told apart" in output and "local" in output
    assert "auth.users_trust_each_other: true" in output and "impersonation" in output
    assert time.monotonic() - started < 30
    assert not (tmp_path / "runtime" / "egd-state.sqlite").exists(), "nothing is made before the refusal"
    check = run_egd("check-config", str(path))
    assert check.returncode == 1
    assert "users are told apart" in check.stderr and "auth.users_trust_each_other" in check.stderr


def test_users_who_trust_each_other_are_warned_about_at_start(make_gateway: Any) -> None:
    """With auth.users_trust_each_other: true the same configuration starts, and says what it means."""
    # Only python3: the test kernelspecs include one of the ssh driver, which check-config would report.
    gw = make_gateway({"auth": {"users": {"alice": {"token_sha256": token_digest(ALICE)}},
                                "users_trust_each_other": True}, "kernels": {"allowed_kernelspecs": ["python3"]}})
    line = next(line for line in gw.log().splitlines() if "users_trust_each_other" in line)
    assert " warn  [egd] auth.users_trust_each_other: users are told apart at the API only" in line
    check = run_egd("check-config", str(gw.config_path))
    assert check.returncode == 0, check.stderr


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_store_is_private(make_gateway: Any) -> None:
    """A new store: its directory 0700, the store, its key and lock 0600."""
    gw = make_gateway()
    runtime = Path(gw.runtime_dir)
    wait_until(lambda: (runtime / "egd-state.sqlite.lock").exists(), 10, what="the lock file")
    assert _mode(runtime) == 0o700
    for name in ("egd-state.sqlite", "egd-state.sqlite.key", "egd-state.sqlite.lock"):
        assert _mode(runtime / name) == 0o600, name


def test_state_store_loose_modes_are_fixed(tmp_path: Path) -> None:
    """A store and key left open (0644: by hand, or by a copy) are made private at start, with a warning each;
    a directory open to others (0755) is warned about, not changed (it may hold other things)."""
    directory = tmp_path / "state"  # not the runtime directory, which the local driver makes private itself
    directory.mkdir()
    directory.chmod(0o755)
    store = directory / "egd.sqlite"
    key = directory / "egd.sqlite.key"
    key.write_bytes(Fernet.generate_key() + b"\n")
    key.chmod(0o644)
    store.touch()
    store.chmod(0o644)
    gw = GatewayProcess({"state": {"path": str(store), "on_stop": "shutdown"}})
    try:
        for path in (store, key, directory / "egd.sqlite.lock"):
            assert _mode(path) == 0o600, (path, oct(_mode(path)))
        assert _mode(directory) == 0o755
        log = gw.log()
        assert f"state: {directory} is open to other users (mode 755, owner uid {os.geteuid()}): they may read " \
               "or replace kernel keys (chmod 711 closes it)" in log
        assert f"state: {key} was open to other users (mode 644); it is 600 now" in log
        assert f"state: {store} was open to other users (mode 644); it is 600 now" in log
        assert gw.client.request("GET", "/readyz").json["checks"]["store"] == "ok"
    finally:
        assert gw.stop() == 0


def test_no_kernel_gets_the_gateway_token(make_gateway: Any) -> None:
    """EGD_AUTH_TOKEN is in egd's environment; a kernel's environment has neither the variable nor its value."""
    gw = make_gateway(env={"EGD_AUTH_TOKEN": SHARED})
    kernel_id = gw.client.start_kernel("python3")
    try:
        sock = gw.client.connect(kernel_id)
        out = sock.execute("import os, json; print(json.dumps(dict(os.environ)))").stdout
        sock.close()
        environ = json.loads(out)
        assert "EGD_AUTH_TOKEN" not in environ
        assert not [k for k, v in environ.items() if SHARED in v]
    finally:
        assert gw.client.delete_kernel(kernel_id) == 204


@pytest.fixture(scope="module")
def names_gw() -> Any:
    """A gateway with a shared token, a per-user token for a user named like egd's OS user, and JWTs (users
    trust each other here: these tests are about names, not OS accounts)."""
    gw = GatewayProcess({"auth": {"token": SHARED, "jwt": {**JWT, "user_claim": "preferred_username"},
                                  "users": {getpass.getuser(): {"token_sha256": token_digest(OS_USER_TOKEN)}},
                                  "users_trust_each_other": True}})
    yield gw
    gw.stop()


def _jwt(user: str) -> str:
    return jwt.encode({"preferred_username": user, "aud": "egd", "exp": int(time.time()) + 600}, HS_SECRET,
                      algorithm="HS256")


def test_a_user_name_with_a_final_newline_is_no_user(names_gw: GatewayProcess) -> None:
    """"alice\\n" in the JWT's user claim is refused (401), and no audit line carries it."""
    for claim in ("alice\n", "alice\r\n", "alice\nkernel start x user=bob"):
        resp = GatewayClient(names_gw.url, _jwt(claim)).request("GET", "/api/kernels")
        assert resp.status == 401, (claim, resp.status)
    assert GatewayClient(names_gw.url, _jwt("alice")).request("GET", "/api/kernels").status == 200
    assert "user=bob" not in names_gw.log()


def test_a_user_named_like_the_os_user_does_not_own_unnamed_kernels(names_gw: GatewayProcess) -> None:
    """The trusted client starts a kernel without KERNEL_USERNAME. A per-user token or a JWT of a user named
    like egd's OS user neither lists, reads, uses nor deletes it (404); inside the kernel KERNEL_USERNAME is
    still egd's OS user, as Jupyter's kernels expect."""
    trusted = names_gw.client
    kernel_id = trusted.start_kernel("python3")
    try:
        for client in (GatewayClient(names_gw.url, OS_USER_TOKEN), GatewayClient(names_gw.url,
                                                                                _jwt(getpass.getuser()))):
            assert kernel_id not in [k["id"] for k in client.request("GET", "/api/kernels").json]
            assert client.request("GET", f"/api/kernels/{kernel_id}").status == 404
            assert client.request("POST", f"/api/kernels/{kernel_id}/interrupt").status == 404
            assert client.request("DELETE", f"/api/kernels/{kernel_id}").status == 404
            own = client.start_kernel("python3")  # their own kernels are theirs
            assert client.request("GET", f"/api/kernels/{own}").status == 200
            assert client.delete_kernel(own) == 204
        sock = trusted.connect(kernel_id)
        seen = sock.execute("import os; print(os.environ['KERNEL_USERNAME'])").stdout.strip()
        sock.close()
        assert seen == getpass.getuser()
    finally:
        assert trusted.delete_kernel(kernel_id) == 204


def test_user_names_in_the_config_are_matched_whole(tmp_path: Path) -> None:
    """A per-user token for "alice\\n" is a configuration error."""
    path = tmp_path / "egd.yaml"
    path.write_text(yaml.safe_dump({"auth": {"users": {"alice\n": {"token_sha256": token_digest(ALICE)}},
                                             "users_trust_each_other": True}}))
    check = run_egd("check-config", str(path))
    assert check.returncode == 1 and "auth.users" in check.stderr, check.stderr


# -- impersonated kernels cannot reach the store, its key or egd's environment --------------------------------

def test_impersonated_kernels_cannot_read_the_store_or_egd_environment(tmp_path_factory: pytest.TempPathFactory,
                                                                       request: pytest.FixtureRequest) -> None:
    """Users apart with impersonation: egd starts (no switch needed); alice's kernel runs as egdalice and
    cannot read the state store, its key or lock, nor egd's /proc environ (EGD_AUTH_TOKEN). A kernel without
    KERNEL_USERNAME (the trusted client's) has no account to run as: 403, never egd's own account."""
    from tests.test_impersonation import ALICE as ALICE_USER
    from tests.test_impersonation import PYTHON, write_spec

    accounts = request.getfixturevalue("users")  # tests.test_impersonation's: creates egdalice (needs root)
    assert ALICE_USER in accounts
    specs = tmp_path_factory.mktemp("tenancyspecs")
    write_spec(specs, "user_python", [PYTHON, "-m", "ipykernel_launcher", "-f", "{connection_file}"])
    gw = GatewayProcess({
        "auth": {"token": SHARED, "users": {ALICE_USER: {"token_sha256": token_digest(ALICE)}}},
        "kernels": {"kernelspec_dirs": [str(specs)], "default_kernel_name": "user_python"},
        "drivers": {"local": {"impersonation": True}},
    }, env={"EGD_AUTH_TOKEN": SHARED})
    alice = GatewayClient(gw.url, ALICE)
    try:
        assert "users_trust_each_other" not in gw.log()
        unnamed = gw.client.request("POST", "/api/kernels", {})
        assert unnamed.status == 403 and "KERNEL_USERNAME is needed" in unnamed.json["message"], unnamed.body
        assert not gw.kernel_processes()
        kernel_id = alice.start_kernel()
        runtime = Path(gw.runtime_dir)
        targets = [str(runtime / name) for name in ("egd-state.sqlite", "egd-state.sqlite.key",
                                                    "egd-state.sqlite.lock")] + [f"/proc/{gw.proc.pid}/environ"]
        code = ("import getpass, json\nout = {'user': getpass.getuser()}\n"
                f"for path in {targets!r}:\n"
                "    try:\n        open(path, 'rb').read(); out[path] = 'read'\n"
                "    except OSError as exc:\n        out[path] = type(exc).__name__\n"
                "print(json.dumps(out))")
        sock = alice.connect(kernel_id)
        seen = json.loads(sock.execute(code).stdout)
        sock.close()
        assert seen.pop("user") == ALICE_USER
        assert seen == dict.fromkeys(targets, "PermissionError")
        assert alice.delete_kernel(kernel_id) == 204
    finally:
        gw.stop()
    assert os.path.exists(targets[0])
