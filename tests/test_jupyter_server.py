"""egd behind a real Jupyter Server (``jupyter server --gateway-url=<egd>``), driven as JupyterLab drives it.

Every request goes to Jupyter Server's own REST and WebSocket API; egd is only asked directly to check where
a kernel really lives (its ``/api/kernels``) and which kernel processes exist. One Jupyter Server is shared by
the module and stopped at its end; nothing of it may be left running.

What Jupyter Server 2.x does in front of a gateway (read from ``jupyter_server/gateway`` and observed here):

- it proxies ``/api/kernelspecs`` and the ``/kernelspecs/<name>/<file>`` resources, and adopts the gateway's
  default kernel name, but only from the fetch *after* the one that first tells it (it answers with its own
  default while it fetches);
- ``POST /api/kernels`` and ``POST /api/sessions`` become ``POST /api/kernels`` on egd with ``{"name", "env"}``
  (``KERNEL_*`` variables, ``KERNEL_WORKING_DIR`` for a session's notebook directory); sessions themselves stay
  in the server;
- the kernel WebSocket is relayed to egd's ``/channels`` with the legacy JSON protocol, whatever the browser
  offers: ``GatewayWebSocketConnection.kernel_ws_protocol`` is ``""``, so the server never selects
  ``v1.kernel.websocket.jupyter.org``;
- interrupt, restart and delete become the same REST calls on egd.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websocket

from tests.client import V1, GatewayClient, KernelSocket, decode_legacy_binary, decode_v1
from tests.conftest import (
    KERNELSPECS,
    GatewayProcess,
    free_port,
    wait_until,
    wait_until_gone,
)

#: The Jupyter Server's own idea of the default kernel, until egd's answer replaces it.
SERVER_OWN_DEFAULT = "the-servers-own-default"
#: Bounded waits (seconds).
SERVER_START_TIMEOUT = 60
SERVER_STOP_TIMEOUT = 20
REPLY_TIMEOUT = 30


class JupyterServer:
    """A ``jupyter server`` subprocess that manages its kernels through an egd gateway."""

    def __init__(self, gateway_url: str, root: Path, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.root = root
        self.notebooks = root / "notebooks"
        (self.notebooks / "work").mkdir(parents=True)
        self.port = free_port()
        self.token = uuid.uuid4().hex
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = GatewayClient(self.url, self.token)
        #: Every kernel id this server reported creating (checked on egd when the server has stopped).
        self.kernel_ids: set[str] = set()
        #: Whether :meth:`stop` had to SIGKILL the server.
        self.killed = False
        # A clean environment: no KERNEL_* of ours is forwarded to egd, no user or gateway config applies.
        # ``env``: the test's own additions (a KERNEL_USERNAME that Jupyter Server forwards, for example).
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("KERNEL_", "JUPYTER_", "JPY_"))}
        env = {**clean, **(env or {})}
        env.update(JUPYTER_CONFIG_DIR=str(root / "config"), JUPYTER_DATA_DIR=str(root / "data"),
                   JUPYTER_RUNTIME_DIR=str(root / "runtime"))
        argv = [
            sys.executable, "-m", "jupyter_server", "--no-browser",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.notebooks}",
            f"--gateway-url={gateway_url}",
            f"--GatewayMappingKernelManager.default_kernel_name={SERVER_OWN_DEFAULT}",
            "--ServerApp.log_level=DEBUG", *(extra_args or []),
        ]
        if os.geteuid() == 0:
            argv.append("--allow-root")
        self.log_path = root / "jupyter-server.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=str(root),
                                     start_new_session=True)
        try:
            wait_until(self._answers, SERVER_START_TIMEOUT, 0.1, f"Jupyter Server on port {self.port} to answer")
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"jupyter server exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return self.client.request("GET", "/api", timeout=2).status == 200
        except OSError:
            return False

    def log(self) -> str:
        """What the server logged so far (its last 8000 characters)."""
        return self.log_path.read_text(errors="replace")[-8000:]

    def stop(self) -> None:
        """SIGTERM (the server then deletes the kernels it still has), bounded wait, SIGKILL if need be."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(SERVER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.killed = True
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()

    # -- REST through the server, as JupyterLab calls it ----------------------------------------------------

    def start_kernel(self, name: str = "python3") -> str:
        """``POST /api/kernels`` on the server; the new kernel's id."""
        resp = self.client.request("POST", "/api/kernels", {"name": name})
        assert resp.status == 201, (resp.status, resp.body, self.log())
        kernel_id = str(resp.json["id"])
        self.kernel_ids.add(kernel_id)
        return kernel_id

    def connect(self, kernel_id: str, session_id: str | None = None, offer_v1: bool = False) -> BrowserSocket:
        """The browser's WebSocket to ``/api/kernels/{id}/channels`` on the server."""
        return BrowserSocket(self, kernel_id, session_id, offer_v1)


class BrowserSocket(KernelSocket):
    """The kernel WebSocket a browser opens to Jupyter Server, in whichever protocol the server chose.

    ``KernelSocket`` is reused for ``execute``/``wait_for``; only the connection differs: the v1 subprotocol
    is offered as a plain header, because websocket-client's ``subprotocols=`` refuses a handshake whose
    answer selects none of the offered ones, and the server may well select none.
    """

    def __init__(self, server: JupyterServer, kernel_id: str, session_id: str | None, offer_v1: bool,
                 timeout: float = 30) -> None:
        self.session_id = session_id or uuid.uuid4().hex
        url = server.url.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels?session_id={self.session_id}"
        headers = [f"Authorization: token {server.token}"]
        if offer_v1:
            headers.append(f"Sec-WebSocket-Protocol: {V1}")
        self.ws = websocket.create_connection(url, timeout=timeout, header=headers, enable_multithread=False)
        self.subprotocol = (self.ws.getheaders() or {}).get("sec-websocket-protocol")
        self.v1 = self.subprotocol == V1
        self.session = self.session_id  # JupyterLab's messages carry its client id as header.session
        self.text_frames = 0
        self.binary_frames = 0

    def recv(self, timeout: float = 60) -> dict[str, Any]:
        """The next message; :class:`websocket.WebSocketConnectionClosedException` when the server closes."""
        self.ws.settimeout(timeout)
        opcode, data = self.ws.recv_data()
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            raise websocket.WebSocketConnectionClosedException("the server closed the kernel WebSocket")
        if opcode == websocket.ABNF.OPCODE_BINARY:
            self.binary_frames += 1
            msg = decode_v1(data) if self.v1 else decode_legacy_binary(data)
        else:
            self.text_frames += 1
            msg = dict(json.loads(data))
        msg.setdefault("msg_type", msg["header"]["msg_type"])
        return msg

    def wait_until_running(self, msg: dict[str, Any], timeout: float) -> None:
        """Until the kernel broadcasts ``execute_input`` for ``msg`` (its cell is running)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the cell did not start within {timeout}s")
            m = self.recv(left)
            if m["msg_type"] == "execute_input" and m["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                return

    def status_until(self, state: str, timeout: float) -> list[str]:
        """The iopub execution states received until ``state`` (which is included); bounded by ``timeout``."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while not seen or seen[-1] != state:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no status {state!r} within {timeout}s (saw {seen})")
            msg = self.recv(left)
            if msg["channel"] == "iopub" and msg["msg_type"] == "status":
                seen.append(msg["content"]["execution_state"])
        return seen


# ---------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jupyter_server(gateway: GatewayProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyterServer]:
    """One Jupyter Server in front of the shared egd for the whole module; stopped and checked at the end."""
    server = JupyterServer(gateway.url, tmp_path_factory.mktemp("jupyter-server"))
    try:
        yield server
    finally:
        server.stop()
    check_stopped_cleanly(server, gateway)


def check_stopped_cleanly(server: JupyterServer, gateway: GatewayProcess) -> None:
    """A stopped Jupyter Server left no process, and none of the kernels it started on egd (a stopping server
    deletes the kernels it still has)."""
    assert not server.killed, f"Jupyter Server did not stop within {SERVER_STOP_TIMEOUT}s of SIGTERM"
    assert not wait_until_gone(str(server.notebooks), 10), "Jupyter Server processes left behind"
    left = [kid for kid in server.kernel_ids if gateway.client.kernel(kid).status != 404]
    assert not left, f"kernels the Jupyter Server started are still on egd: {left}"


@pytest.fixture
def server_kernel(jupyter_server: JupyterServer) -> Iterator[str]:
    """A python3 kernel started through the Jupyter Server; deleted through it afterwards (404 is fine)."""
    kernel_id = jupyter_server.start_kernel("python3")
    yield kernel_id
    status = jupyter_server.client.request("DELETE", f"/api/kernels/{kernel_id}").status
    assert status in (204, 404), status


def egd_kernel_ids(gateway: GatewayProcess) -> set[str]:
    """The ids egd itself lists."""
    resp = gateway.client.request("GET", "/api/kernels")
    assert resp.status == 200, resp.body
    return {k["id"] for k in resp.json}


def processes_of(gateway: GatewayProcess, kernel_id: str) -> list[tuple[int, str]]:
    """Processes of one kernel of the gateway (their command line names its connection file)."""
    return [(pid, cmd) for pid, cmd in gateway.kernel_processes() if kernel_id in cmd]


# ---------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------


def test_kernelspecs_come_from_egd(jupyter_server: JupyterServer, gateway: GatewayProcess) -> None:
    """The server's ``/api/kernelspecs`` is egd's list (test-only specs included), the server adopts egd's
    default kernel name, a single spec is served, and a kernelspec logo is fetched from egd through the
    server's ``/kernelspecs/<name>/<file>`` (the launcher icons of JupyterLab)."""
    egd = gateway.client.request("GET", "/api/kernelspecs").json
    server = jupyter_server.client

    def adopted() -> dict[str, Any] | None:
        resp = server.request("GET", "/api/kernelspecs")
        assert resp.status == 200, (resp.status, resp.body)
        return dict(resp.json) if resp.json["default"] == egd["default"] else None

    # The first answer may still carry the server's own default (it updates it while fetching egd's).
    specs = wait_until(adopted, 10, 0.2, f"the server to adopt egd's default kernel {egd['default']!r}")
    assert "python3" in specs["kernelspecs"]
    assert set(specs["kernelspecs"]) == set(egd["kernelspecs"])
    assert "with_env" in specs["kernelspecs"]  # egd's test spec: the list is egd's, not the server's own
    assert specs["kernelspecs"]["with_env"]["spec"] == egd["kernelspecs"]["with_env"]["spec"]

    one = server.request("GET", "/api/kernelspecs/python3")
    assert one.status == 200, one.body
    assert one.json["spec"]["display_name"] == egd["kernelspecs"]["python3"]["spec"]["display_name"]

    logo_url = specs["kernelspecs"]["with_env"]["resources"]["logo-64x64"]
    assert logo_url.startswith("/kernelspecs/with_env/"), logo_url  # rewritten to the server's own URL
    logo = server.request("GET", logo_url)
    assert logo.status == 200, (logo.status, logo.body[:200])
    assert logo.body == (KERNELSPECS / "with_env" / "logo-64x64.png").read_bytes()


def test_kernel_created_through_server_lives_on_egd(jupyter_server: JupyterServer, gateway: GatewayProcess,
                                                   server_kernel: str) -> None:
    """``POST /api/kernels`` on the server starts the kernel on egd under the same id, and the server's
    ``GET /api/kernels`` (JupyterLab polls it) lists it with the model egd reports."""
    assert server_kernel in egd_kernel_ids(gateway)
    on_egd = gateway.client.kernel(server_kernel)
    assert on_egd.status == 200 and on_egd.json["name"] == "python3"
    assert processes_of(gateway, server_kernel), "no kernel process on the gateway"

    listed = jupyter_server.client.request("GET", "/api/kernels")
    assert listed.status == 200, listed.body
    models = {k["id"]: k for k in listed.json}
    assert server_kernel in models
    assert models[server_kernel]["name"] == "python3"
    assert models[server_kernel]["execution_state"] in ("idle", "busy")
    one = jupyter_server.client.request("GET", f"/api/kernels/{server_kernel}")
    assert one.status == 200 and one.json["id"] == server_kernel


def test_execute_through_server_websocket(jupyter_server: JupyterServer, server_kernel: str) -> None:
    """Over the server's kernel WebSocket (legacy protocol, no subprotocol offered) a cell's stdout and
    result come back, and the kernel sees its own id in ``KERNEL_ID`` (set by egd)."""
    sock = jupyter_server.connect(server_kernel)
    try:
        assert sock.subprotocol is None
        run = sock.execute("print('hi'); 6*7", REPLY_TIMEOUT)
        assert run.reply["content"]["status"] == "ok", run.reply["content"]
        assert run.stdout == "hi\n"
        assert run.result == "42"
        run = sock.execute("import os; os.environ['KERNEL_ID']", REPLY_TIMEOUT)
        assert run.result == repr(server_kernel)
    finally:
        sock.close()


def test_interrupt_through_server(jupyter_server: JupyterServer, server_kernel: str) -> None:
    """``POST /api/kernels/{id}/interrupt`` on the server stops a running cell within seconds (its reply is
    an error ``KeyboardInterrupt``) and keeps the kernel's state."""
    sock = jupyter_server.connect(server_kernel)
    try:
        assert sock.execute("x = 'kept'", REPLY_TIMEOUT).reply["content"]["status"] == "ok"
        msg = sock.request("execute_request", {"code": "import time; time.sleep(60)", "silent": False,
                                               "store_history": True, "user_expressions": {}, "allow_stdin": False})
        # Interrupt only once the cell runs: a SIGINT before that would not interrupt the sleep.
        sock.wait_until_running(msg, REPLY_TIMEOUT)
        started = time.monotonic()
        resp = jupyter_server.client.request("POST", f"/api/kernels/{server_kernel}/interrupt", {})
        assert resp.status == 204, (resp.status, resp.body)
        run = sock.wait_for(msg, timeout=10)
        elapsed = time.monotonic() - started
        assert run.reply["content"]["status"] == "error", run.reply["content"]
        assert run.reply["content"]["ename"] == "KeyboardInterrupt"
        assert elapsed < 10, elapsed
        assert sock.execute("x", REPLY_TIMEOUT).result == "'kept'"
    finally:
        sock.close()


def test_restart_through_server(jupyter_server: JupyterServer, gateway: GatewayProcess, server_kernel: str) -> None:
    """``POST /api/kernels/{id}/restart`` on the server restarts the kernel on egd under the same id: the
    browser is not told ``restarting`` (that would read as a dead kernel), state from before is gone (NameError),
    and the kernel runs code
    both on the socket that was open and on a new one (JupyterLab 4 reconnects after a restart)."""
    sock = jupyter_server.connect(server_kernel)
    try:
        assert sock.execute("x = 'before restart'", REPLY_TIMEOUT).reply["content"]["status"] == "ok"
        resp = jupyter_server.client.request("POST", f"/api/kernels/{server_kernel}/restart", {})
        assert resp.status == 200, (resp.status, resp.body)
        assert resp.json["id"] == server_kernel
        # Observed with Jupyter Server 2.21: the server neither closes the browser's socket nor its own socket
        # to egd on a restart, and egd keeps its WebSocket clients across a restart. egd sends no iopub
        # "restarting" for a restart the client asked for (JupyterLab would report the kernel as dead), so the
        # socket that was open simply runs code in the new kernel.
        try:
            run = sock.execute("x", REPLY_TIMEOUT)
            assert run.reply["content"].get("ename") == "NameError", run.reply["content"]
        except websocket.WebSocketConnectionClosedException:
            pass  # should the server close the socket, the reconnect below is what Lab does anyway
    finally:
        sock.close()

    again = jupyter_server.connect(server_kernel, session_id=sock.session_id)
    try:
        run = again.execute("x", REPLY_TIMEOUT)
        assert run.reply["content"]["status"] == "error"
        assert run.reply["content"]["ename"] == "NameError"
        run = again.execute("6*7", REPLY_TIMEOUT)
        assert run.result == "42"
    finally:
        again.close()
    on_egd = gateway.client.kernel(server_kernel)
    assert on_egd.status == 200 and on_egd.json["id"] == server_kernel


def test_delete_through_server_stops_kernel_on_egd(jupyter_server: JupyterServer, gateway: GatewayProcess) -> None:
    """``DELETE /api/kernels/{id}`` on the server removes the kernel from egd (404 there) and no kernel
    process of the gateway is left."""
    kernel_id = jupyter_server.start_kernel("python3")
    sock = jupyter_server.connect(kernel_id)
    try:
        assert sock.execute("6*7", REPLY_TIMEOUT).result == "42"
    finally:
        sock.close()
    assert processes_of(gateway, kernel_id), "the kernel's process was not found before the delete"
    resp = jupyter_server.client.request("DELETE", f"/api/kernels/{kernel_id}")
    assert resp.status == 204, (resp.status, resp.body)
    assert gateway.client.kernel(kernel_id).status == 404
    assert kernel_id not in egd_kernel_ids(gateway)
    wait_until(lambda: not gateway.kernel_processes(), 15, 0.1, "the gateway's kernel processes to end")
    assert jupyter_server.client.request("GET", f"/api/kernels/{kernel_id}").status == 404


def test_delete_busy_kernel_through_server_is_prompt(jupyter_server: JupyterServer, gateway: GatewayProcess) -> None:
    """Deleting a kernel that is busy in a cell (closing a notebook that still runs) takes about a second, as
    with Jupyter Server's own kernels: like jupyter_client, the gateway interrupts the kernel before its
    ``shutdown_request``, instead of waiting ``shutdown_wait`` (5 s) for a kernel that cannot act on it."""
    kernel_id = jupyter_server.start_kernel("python3")
    sock = jupyter_server.connect(kernel_id)
    try:
        msg = sock.request("execute_request", {"code": "import time; time.sleep(60)", "silent": False,
                                               "store_history": True, "user_expressions": {}, "allow_stdin": False})
        sock.wait_until_running(msg, REPLY_TIMEOUT)
        started = time.monotonic()
        resp = jupyter_server.client.request("DELETE", f"/api/kernels/{kernel_id}")
        elapsed = time.monotonic() - started
    finally:
        sock.close()
    assert resp.status == 204, (resp.status, resp.body)
    assert gateway.client.kernel(kernel_id).status == 404
    wait_until(lambda: not processes_of(gateway, kernel_id), 15, 0.1, "the kernel's process to end")
    # A stock Jupyter Server (jupyter_client) needs ~0.7 s here; egd without the interrupt needs 5 s.
    assert elapsed < 3, f"deleting a busy kernel took {elapsed:.1f}s"


def test_session_through_server(jupyter_server: JupyterServer, gateway: GatewayProcess) -> None:
    """``POST /api/sessions`` on the server (what Lab does on opening a notebook) starts a kernel on egd that
    runs in the notebook's directory (``KERNEL_WORKING_DIR``); ``DELETE /api/sessions/{id}`` stops it on egd."""
    server = jupyter_server.client
    resp = server.request("POST", "/api/sessions", {
        "path": "work/analysis.ipynb", "type": "notebook", "name": "analysis.ipynb", "kernel": {"name": "python3"}})
    assert resp.status == 201, (resp.status, resp.body)
    session_id, kernel_id = resp.json["id"], resp.json["kernel"]["id"]
    jupyter_server.kernel_ids.add(kernel_id)
    try:
        assert gateway.client.kernel(kernel_id).status == 200
        sessions = server.request("GET", "/api/sessions").json
        assert [s["kernel"]["id"] for s in sessions if s["id"] == session_id] == [kernel_id]
        sock = jupyter_server.connect(kernel_id)
        try:
            run = sock.execute("import os; os.getcwd()", REPLY_TIMEOUT)
        finally:
            sock.close()
        assert run.result == repr(os.path.realpath(jupyter_server.notebooks / "work"))
    finally:
        deleted = server.request("DELETE", f"/api/sessions/{session_id}")
    assert deleted.status == 204, (deleted.status, deleted.body)
    assert gateway.client.kernel(kernel_id).status == 404
    assert all(s["id"] != session_id for s in server.request("GET", "/api/sessions").json)
    wait_until(lambda: not processes_of(gateway, kernel_id), 15, 0.1, "the session's kernel process to end")


def test_v1_subprotocol_offer_through_server(jupyter_server: JupyterServer, server_kernel: str) -> None:
    """A browser offering ``v1.kernel.websocket.jupyter.org`` (JupyterLab 4) still runs code end to end: the
    server answers either with v1 (binary frames) or with no subprotocol (legacy JSON text frames), and an
    execute_result comes back in that format."""
    sock = jupyter_server.connect(server_kernel, offer_v1=True)
    try:
        assert sock.subprotocol in (None, V1), sock.subprotocol
        run = sock.execute("6*7", REPLY_TIMEOUT)
        assert run.reply["content"]["status"] == "ok", run.reply["content"]
        assert run.result == "42"
        if sock.v1:
            assert sock.binary_frames and not sock.text_frames
        else:
            assert sock.text_frames
    finally:
        sock.close()
