"""A small synchronous client of the kernel gateway API for tests: HTTP with urllib, WebSocket with
websocket-client (the same library Jupyter Server's lightweight gateway kernel client uses).

Every wait is bounded, so a broken gateway fails a test instead of hanging it.
"""

from __future__ import annotations

import itertools
import json
import struct
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any

import websocket

V1 = "v1.kernel.websocket.jupyter.org"


@dataclass
class Response:
    """An HTTP response: status, headers, raw body, and the body parsed as JSON when it is JSON."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)


class GatewayClient:
    """REST calls against one gateway."""

    def __init__(self, url: str, token: str | None = None, context: Any = None) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.context = context

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 90) -> Response:
        """Send a request; never raises for HTTP error statuses."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        if self.token:
            all_headers.setdefault("Authorization", f"token {self.token}")
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=all_headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.context) as resp:
                return Response(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
        except urllib.error.HTTPError as err:
            return Response(err.code, {k.lower(): v for k, v in err.headers.items()}, err.read())

    def start_kernel(self, name: str | None = None, env: dict[str, str] | None = None) -> str:
        """POST /api/kernels; the new kernel's id (asserts 201)."""
        body: dict[str, Any] = {}
        if name:
            body["name"] = name
        if env is not None:
            body["env"] = env
        resp = self.request("POST", "/api/kernels", body)
        assert resp.status == 201, (resp.status, resp.body)
        return str(resp.json["id"])

    def delete_kernel(self, kernel_id: str) -> int:
        """DELETE /api/kernels/{id}; the status."""
        return self.request("DELETE", f"/api/kernels/{kernel_id}").status

    def kernel(self, kernel_id: str) -> Response:
        """GET /api/kernels/{id}."""
        return self.request("GET", f"/api/kernels/{kernel_id}")

    def connect(self, kernel_id: str, session_id: str | None = None, v1: bool = False,
                timeout: float = 30) -> KernelSocket:
        """Open the kernel's WebSocket."""
        return KernelSocket(self, kernel_id, session_id or uuid.uuid4().hex, v1, timeout)


def new_message(msg_type: str, content: dict[str, Any], session: str, channel: str = "shell") -> dict[str, Any]:
    """A client message in the legacy JSON shape."""
    return {
        "header": {"msg_id": uuid.uuid4().hex, "msg_type": msg_type, "username": "test", "session": session,
                   "date": "2026-01-01T00:00:00.000000Z", "version": "5.3"},
        "parent_header": {}, "metadata": {}, "content": content, "buffers": [], "channel": channel,
    }


def decode_legacy_binary(data: bytes) -> dict[str, Any]:
    """Jupyter's legacy binary frame: u32 count, u32 offsets, JSON, buffers."""
    (count,) = struct.unpack_from("!I", data)
    offsets = [*list(struct.unpack_from(f"!{count}I", data, 4)), len(data)]
    parts = [data[a:b] for a, b in itertools.pairwise(offsets)]
    msg = json.loads(parts[0])
    msg["buffers"] = parts[1:]
    return msg


def encode_v1(msg: dict[str, Any], channel: str) -> bytes:
    """A client message in the v1 binary protocol."""
    parts = [channel.encode()] + [json.dumps(msg[k]).encode() for k in ("header", "parent_header", "metadata",
                                                                         "content")] + msg.get("buffers", [])
    offsets = [8 * (len(parts) + 2)]
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    return struct.pack(f"<{len(offsets) + 1}Q", len(offsets), *offsets) + b"".join(parts)


def decode_v1(data: bytes) -> dict[str, Any]:
    """A server message in the v1 binary protocol."""
    (count,) = struct.unpack_from("<Q", data)
    offsets = struct.unpack_from(f"<{count}Q", data, 8)
    parts = [data[a:b] for a, b in itertools.pairwise(offsets)]
    names = ("header", "parent_header", "metadata", "content")
    msg = {k: json.loads(p) for k, p in zip(names, parts[1:5], strict=True)}
    msg["channel"] = parts[0].decode()
    msg["buffers"] = parts[5:]
    msg["msg_type"] = msg["header"]["msg_type"]
    return msg


@dataclass
class Execution:
    """What one execute_request produced."""

    reply: dict[str, Any]
    messages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def stdout(self) -> str:
        """Concatenated stdout stream text."""
        return "".join(m["content"]["text"] for m in self.messages
                       if m["msg_type"] == "stream" and m["content"]["name"] == "stdout")

    @property
    def result(self) -> str | None:
        """The text/plain of the execute_result, if any."""
        for m in self.messages:
            if m["msg_type"] == "execute_result":
                return str(m["content"]["data"]["text/plain"])
        return None


class KernelSocket:
    """One WebSocket connection to a kernel."""

    def __init__(self, client: GatewayClient, kernel_id: str, session_id: str, v1: bool, timeout: float) -> None:
        ws_url = client.url.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels?session_id={session_id}"
        headers = [f"Authorization: token {client.token}"] if client.token else []
        self.session = uuid.uuid4().hex
        self.v1 = v1
        self.ws = websocket.create_connection(ws_url, timeout=timeout, header=headers,
                                              subprotocols=[V1] if v1 else None, enable_multithread=False)
        self.subprotocol = self.ws.getsubprotocol()

    def send(self, msg: dict[str, Any]) -> None:
        """Send a message (legacy JSON or v1 binary)."""
        channel = msg.get("channel", "shell")
        if self.v1:
            self.ws.send_binary(encode_v1(msg, channel))
        else:
            self.ws.send(json.dumps({k: v for k, v in msg.items() if k != "buffers" or not v}))

    def request(self, msg_type: str, content: dict[str, Any], channel: str = "shell") -> dict[str, Any]:
        """Send a new request; return it."""
        msg = new_message(msg_type, content, self.session, channel)
        self.send(msg)
        return msg

    def recv(self, timeout: float = 60) -> dict[str, Any]:
        """The next message (raises websocket.WebSocketTimeoutException after ``timeout``, pings or not)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise websocket.WebSocketTimeoutException(f"no message within {timeout}s")
            self.ws.settimeout(left)
            opcode, data = self.ws.recv_data(control_frame=True)
            if opcode in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
                break
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                raise websocket.WebSocketConnectionClosedException("the server closed the connection")
        if opcode == websocket.ABNF.OPCODE_BINARY:
            return decode_v1(data) if self.v1 else decode_legacy_binary(data)
        return dict(json.loads(data))

    def execute(self, code: str, timeout: float = 60, allow_stdin: bool = False) -> Execution:
        """Run code; collect iopub until idle and the execute_reply."""
        msg = self.request("execute_request", {"code": code, "silent": False, "store_history": True,
                                               "user_expressions": {}, "allow_stdin": allow_stdin})
        return self.wait_for(msg, timeout)

    def wait_for(self, msg: dict[str, Any], timeout: float = 60) -> Execution:
        """Collect the replies to ``msg`` until its reply and iopub idle have arrived."""
        msg_id = msg["header"]["msg_id"]
        deadline = time.monotonic() + timeout
        reply: dict[str, Any] | None = None
        idle = False
        out: list[dict[str, Any]] = []
        while not (reply and idle):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply to {msg['header']['msg_type']} within {timeout}s")
            m = self.recv(left)
            if m.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if m["channel"] == "iopub":
                if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                    idle = True
                else:
                    out.append(m)
            elif m["msg_type"].endswith("_reply"):
                reply = m
        assert reply is not None
        return Execution(reply, out)

    def close(self) -> None:
        """Close the connection."""
        try:
            self.ws.close()
        except Exception:
            pass


def start_concurrently(client: GatewayClient, name: str, count: int,
                       timeout: float = 120) -> tuple[list[str], list[BaseException]]:
    """Start ``count`` kernels of ``name`` at once from as many threads: (ids started, errors raised)."""
    ids: list[str] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            ids.append(client.start_kernel(name))
        except BaseException as exc:  # handed back to the caller
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return ids, errors


class BackgroundStart:
    """``POST /api/kernels`` in a thread, for tests that act while the launch is in flight."""

    def __init__(self, client: GatewayClient, body: dict[str, Any]) -> None:
        self._outcome: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, args=(client, body))
        self._thread.start()

    def _run(self, client: GatewayClient, body: dict[str, Any]) -> None:
        try:
            self._outcome["response"] = client.request("POST", "/api/kernels", body)
        except BaseException as exc:  # handed to the test by response()
            self._outcome["error"] = exc

    def response(self, timeout: float = 30) -> Any:
        """The answer to the start (an AssertionError naming what went wrong when there was none)."""
        self._thread.join(timeout)
        if "response" not in self._outcome:
            raise AssertionError(f"no answer to the start: {self._outcome.get('error', 'still waiting')}")
        return self._outcome["response"]
