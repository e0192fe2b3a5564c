#!/usr/bin/env python3
"""egdbench -- egd vs. a direct ZeroMQ client vs. Jupyter Enterprise Gateway 3.x.

One command measures three targets side by side and prints a table of
figures, ratios and PASS/FAIL per performance target::

    python bench/egdbench.py --json out.json

Targets
    direct  the physical limit: a lean pyzmq client written here (HMAC-SHA256
            signing, no jupyter_client on the message path) talking to an
            ipykernel that this script launches itself.  The reference for the
            egd/direct ratios.
    egd     the gateway under test, started as ``egd run --ip 127.0.0.1
            --port <free port>`` (``--egd-cmd`` overrides the command).
    eg      Jupyter Enterprise Gateway 3.x, installed on first use into its own
            venv (``--eg-venv``, default ``~/.cache/egd-bench/eg-venv``) together
            with ``ipykernel<7`` (ipykernel 7 drops messages signed by
            jupyter_client 6); EG launches that venv's python3 kernel.
    direct-eg  (optional, ``--targets``) the direct client against the EG
            venv's ipykernel 6: separates kernel effects from gateway effects.

Both gateways are driven by the same WebSocket client, so the client-side cost
is identical for egd and EG: by default (``--ws-client lean``) the lean client of
bench/leanws.py, which reads a frame's payload in one piece as the lean ZeroMQ
client does; ``--ws-client websocket-client`` uses websocket-client
(``enable_multithread=False``, ``skip_utf8_validation=True``), whose 16 KiB reads
cost 12-20 ms per 10 MiB frame (bench/README.rst).  Legacy JSON text protocol,
no subprotocol, except in ``buffers``.

Sections (``--only``, comma separated)
    start   N sequential kernel starts: POST /api/kernels -> WS connect ->
            kernel_info_reply (direct: launch -> kernel_info_reply); each kernel
            is deleted right after (DELETE time reported too).
    rtt     execute_request "1" sent 200 times one after another on one kernel
            (after warm-up): send -> execute_reply and send -> status idle.
    iopub   one execute of ``for i in range(20000): print(i, flush=True)``:
            iopub msgs/s, time to idle and how many of the lines were lost.
    stream  an execute writing a single 10 MiB string to stdout: time until
            all bytes and idle arrived, MiB/s (median of 3 per repetition).
    buffers an execute opening a comm whose message carries one 10 MiB binary
            buffer (what widgets and images in comm messages send), on a kernel
            of its own whose WebSocket speaks the v1 protocol
            (``v1.kernel.websocket.jupyter.org``, JupyterLab's; a gateway that
            does not offer it is read in the legacy binary form, and the result
            says which): time until the buffer and idle arrived, MiB/s.
    conc    8 kernels, 8 client threads each doing 100 execute round trips at
            the same time: aggregate executes/s and p99 latency, split into the
            time inside the kernel's execute handler (its reply's
            ``metadata.started`` to the reply's date) and the rest (client,
            gateway, transport, and the wait before the kernel took it up).
    rss     VmRSS of the gateway process itself (not its kernels): before,
            peak (sampled every 0.1 s; VmHWM as well) and after.

Repetitions (``--reps``, default 3) run the targets interleaved section by
section, in a rotating order, and the table shows medians over repetitions
(a 2-core machine is noisy).  Every process started here (gateways, their
kernels, direct kernels) is stopped at the end, also on error or Ctrl-C, and a
final check reports anything left behind.

Exit status: 0 all performance targets PASS, 1 some FAIL or could not be
measured, 2 the benchmark itself failed.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import functools
import hashlib
import hmac
import http.client
import importlib.util
import itertools
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import websocket  # websocket-client
import zmq
from leanws import OP_BINARY, OP_CLOSE, OP_TEXT, LeanWebSocket

PROTOCOL_VERSION = "5.3"
DELIM = b"<IDS|MSG>"
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)  # plain ints: no enum cost
LOCALHOST = "127.0.0.1"
ALL_SECTIONS = ("start", "rtt", "iopub", "stream", "buffers", "conc", "paced", "rss")
V1_PROTOCOL = "v1.kernel.websocket.jupyter.org"
ALL_TARGETS = ("direct", "egd", "eg", "direct-eg")
DEFAULT_TARGETS = "direct,egd,eg"
KERNEL_USERNAME = "egdbench"  # EG refuses kernels for "root" (unauthorized_users)
CACHE_DIR = Path.home() / ".cache" / "egd-bench"
EG_PIP_SPEC = ["jupyter_enterprise_gateway>=3,<4", "ipykernel<7"]

# Msg = (channel, msg_type, parent msg_id, content): all the measurements need.
Msg = tuple[str, str, "str | None", dict]


class BenchError(RuntimeError):
    """A target failed in a way that makes its remaining sections meaningless."""


# What a failing gateway, kernel or connection can raise; recorded per section.
ERRORS: tuple[type[BaseException], ...] = (
    BenchError, OSError, TimeoutError, ConnectionError, ValueError, KeyError, TypeError,
    IndexError, zmq.ZMQError, websocket.WebSocketException, http.client.HTTPException,
    subprocess.SubprocessError, threading.BrokenBarrierError)


def log(text: str) -> None:
    """Progress line on stderr."""
    print(f"[egdbench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------

def percentile(values: list[float], p: float) -> float | None:
    """Linearly interpolated percentile (p in 0..100)."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(seconds: list[float]) -> dict[str, Any]:
    """Summary of durations given in seconds, reported in milliseconds
    (with the raw samples, in order, for the JSON)."""
    ms = [s * 1000.0 for s in seconds]
    return {"n": len(ms), "median_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95),
            "p99_ms": percentile(ms, 99), "min_ms": min(ms) if ms else None,
            "max_ms": max(ms) if ms else None, "samples_ms": [round(x, 3) for x in ms]}


# ---------------------------------------------------------------------------
# Linux /proc helpers
# ---------------------------------------------------------------------------

def proc_status_kib(pid: int, key: str = "VmRSS") -> int | None:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM), or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def proc_stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 = state)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds used by a process so far."""
    f = proc_stat_fields(pid)
    if not f:
        return None
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def proc_start_time(pid: int) -> int | None:
    """Start time of a process in clock ticks (identifies it across pid reuse)."""
    f = proc_stat_fields(pid)
    return int(f[19]) if f else None


def proc_children(pid: int) -> list[int]:
    """Direct children of a process (from /proc/<pid>/task/*/children)."""
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    kids.extend(int(x) for x in f.read().split())
            except OSError:
                pass
    except OSError:
        pass
    return kids


def proc_descendants(pid: int) -> list[int]:
    """All descendants of a process, depth first."""
    out: list[int] = []
    stack = proc_children(pid)
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(proc_children(p))
    return out


def proc_cmdline(pid: int) -> str:
    """Command line of a process, for messages."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def listener_pid(port: int, candidates: Iterable[int]) -> int | None:
    """The pid among `candidates` owning the TCP socket listening on `port`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{parts[9]}]")
        except (OSError, StopIteration, IndexError, ValueError):
            pass
    for pid in candidates:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                        return pid
                except OSError:
                    pass
        except OSError:
            pass
    return None


class ProcTracker:
    """Every process the benchmark started or saw a gateway start.

    Keyed by pid together with its start time, so a reused pid is never
    mistaken for one of ours."""

    def __init__(self) -> None:
        self.procs: dict[int, tuple[int | None, str]] = {}
        self.lock = threading.Lock()

    def add(self, pid: int, label: str) -> None:
        """Track one process."""
        with self.lock:
            if pid not in self.procs:
                self.procs[pid] = (proc_start_time(pid), label)

    def add_descendants(self, root: int, label: str) -> None:
        """Track every current descendant of `root` (a gateway's kernels)."""
        for pid in proc_descendants(root):
            self.add(pid, f"{label} child: {proc_cmdline(pid)[:100]}")

    def alive(self) -> list[tuple[int, str]]:
        """Tracked processes that still run (zombies count as gone)."""
        out = []
        with self.lock:
            items = list(self.procs.items())
        for pid, (start, label) in items:
            f = proc_stat_fields(pid)
            if f and f[0] != "Z" and int(f[19]) == start:
                out.append((pid, label))
        return out


TRACKER = ProcTracker()


def kill_group_or_pid(pid: int, sig: int) -> None:
    """Signal a process group led by `pid`, else the single process."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
            return
    except OSError:
        pass
    try:
        os.kill(pid, sig)
    except OSError:
        pass


# ---------------------------------------------------------------------------
# Jupyter messages
# ---------------------------------------------------------------------------

def execute_content(code: str) -> dict:
    """Content of an execute_request."""
    return {"code": code, "silent": False, "store_history": True,
            "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}


class Conn(Protocol):
    """A client connection to one kernel: send on a channel, receive anything."""

    #: Bytes of binary buffers received so far (the buffers section reads it).
    buffer_bytes: int

    def send(self, channel: str, msg_type: str, content: dict) -> str:
        """Send a request; return its msg_id."""
        ...

    def recv(self, timeout: float) -> Msg:
        """Next message from any channel; TimeoutError after `timeout` s."""
        ...

    def close(self) -> None:
        """Release the connection."""
        ...


class HeaderFactory:
    """Builds message headers cheaply (counter-based msg_ids); counts received buffer bytes."""

    def __init__(self) -> None:
        self.session = uuid.uuid4().hex
        self.n = 0
        self.buffer_bytes = 0

    def header(self, msg_type: str) -> dict:
        """A fresh header for `msg_type`."""
        self.n += 1
        return {"msg_id": f"{self.session}_{self.n}", "msg_type": msg_type,
                "username": KERNEL_USERNAME, "session": self.session,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "version": PROTOCOL_VERSION}


# ---------------------------------------------------------------------------
# transport 1: direct ZeroMQ (the physical limit)
# ---------------------------------------------------------------------------

class DirectConn(HeaderFactory):
    """Lean ZMQ client: signs with HMAC-SHA256, parses only what is needed.

    Incoming signatures are not verified and metadata is not parsed: the
    WebSocket client does not verify anything either, and this is meant to be
    the lower bound."""

    def __init__(self, ctx: zmq.Context, info: dict) -> None:
        super().__init__()
        self.auth = hmac.new(info["key"].encode(), digestmod=hashlib.sha256)
        base = f"tcp://{info['ip']}:"
        self.socks: dict[str, zmq.Socket] = {}
        for ch, kind in (("shell", zmq.DEALER), ("control", zmq.DEALER), ("iopub", zmq.SUB)):
            s = ctx.socket(kind)
            s.linger = 0
            # Retry a refused connect (kernel not bound yet) every 10 ms, not
            # the default 100 ms: otherwise the start time is quantized.
            s.setsockopt(zmq.RECONNECT_IVL, 10)
            if kind == zmq.SUB:
                s.setsockopt(zmq.RCVHWM, 0)
                s.setsockopt(zmq.SUBSCRIBE, b"")
            else:
                s.setsockopt(zmq.IDENTITY, self.session.encode())
            s.connect(base + str(info[f"{ch}_port"]))
            self.socks[ch] = s
        self.names = {s: ch for ch, s in self.socks.items()}
        self.poller = zmq.Poller()
        for s in self.socks.values():
            self.poller.register(s, zmq.POLLIN)
        self.pending: collections.deque[Msg] = collections.deque()

    def send(self, channel: str, msg_type: str, content: dict) -> str:
        """Sign and send one message."""
        hdr = self.header(msg_type)
        parts = [json.dumps(hdr).encode(), b"{}", b"{}", json.dumps(content).encode()]
        h = self.auth.copy()
        for p in parts:
            h.update(p)
        self.socks[channel].send_multipart([DELIM, h.hexdigest().encode(), *parts])
        return hdr["msg_id"]

    def recv(self, timeout: float) -> Msg:
        """Next message from shell, control or iopub."""
        if self.pending:
            return self.pending.popleft()
        deadline = time.monotonic() + timeout
        loads, append = json.loads, self.pending.append
        while not self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no message from the kernel before the deadline")
            for sock, _ in self.poller.poll(int(left * 1000) + 1):
                channel = self.names[sock]
                # Drain what is queued: one poll per batch, not per message.
                for _ in range(256):
                    frames = sock.recv_multipart()
                    i = frames.index(DELIM)
                    header, content = loads(frames[i + 2]), loads(frames[i + 5])
                    for buffer in frames[i + 6:]:
                        self.buffer_bytes += len(buffer)
                    if header["msg_type"] == "execute_reply":
                        note_kernel_time(content, header, loads(frames[i + 4]))
                    append((channel, header["msg_type"], loads(frames[i + 3]).get("msg_id"), content))
                    if not sock.get(_EVENTS) & _POLLIN:
                        break
        return self.pending.popleft()

    def close(self) -> None:
        """Close the sockets (linger 0)."""
        for s in self.socks.values():
            s.close(linger=0)


class DirectKernel:
    """An ipykernel launched by this script, in its own process group."""

    def __init__(self, ctx: zmq.Context, python: str, runtime_dir: str, label: str,
                 kernel_args: Sequence[str] = ()) -> None:
        from jupyter_client.connect import write_connection_file

        self.label = label
        self.conn_file = os.path.join(runtime_dir, f"kernel-direct-{uuid.uuid4()}.json")
        _, info = write_connection_file(self.conn_file, ip=LOCALHOST,
                                        key=uuid.uuid4().hex.encode())
        env = dict(os.environ, JPY_PARENT_PID=str(os.getpid()))  # dies with us
        self.proc = subprocess.Popen(
            [python, "-m", "ipykernel_launcher", "-f", self.conn_file, *kernel_args],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        TRACKER.add(self.proc.pid, f"{label} kernel")
        self.conn = DirectConn(ctx, dict(info))

    def shutdown(self, timeout: float = 10.0) -> None:
        """shutdown_request on control, wait for exit, SIGKILL the group if needed."""
        try:
            self.conn.send("control", "shutdown_request", {"restart": False})
            self.proc.wait(timeout=timeout)
        except (subprocess.TimeoutExpired, zmq.ZMQError):
            pass
        finally:
            if self.proc.poll() is None:
                kill_group_or_pid(self.proc.pid, signal.SIGKILL)
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            self.conn.close()
            try:
                os.unlink(self.conn_file)
            except OSError:
                pass


# ---------------------------------------------------------------------------
# transport 2: gateway REST + WebSocket
# ---------------------------------------------------------------------------

def http_request(port: int, method: str, path: str, body: Any = None,
                 timeout: float = 60.0) -> tuple[int, Any]:
    """One HTTP request to 127.0.0.1:port; returns (status, parsed JSON or None)."""
    conn = http.client.HTTPConnection(LOCALHOST, port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else (b"{}" if method == "POST" else None)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        if resp.status >= 400:
            raise BenchError(f"{method} {path} -> HTTP {resp.status}: {raw[:300]!r}")
        try:
            return resp.status, json.loads(raw) if raw else None
        except ValueError:
            return resp.status, None
    finally:
        conn.close()


def decode_binary_frame(data: bytes | bytearray) -> tuple[dict, int]:
    """Legacy binary frame: u32 nbufs, u32 offsets (big-endian), JSON, buffers -> (message, buffer bytes)."""
    nbufs = struct.unpack_from("!I", data)[0]
    offsets = struct.unpack_from(f"!{nbufs}I", data, 4)
    end = offsets[1] if nbufs > 1 else len(data)
    return json.loads(data[offsets[0]:end]), len(data) - end


def decode_v1_frame(data: bytes | bytearray) -> tuple[dict, int]:
    """v1 frame: u64le n, u64le offsets[n], channel, header, parent, metadata, content, buffers ->
    (message, buffer bytes)."""
    n = struct.unpack_from("<Q", data)[0]
    offsets = struct.unpack_from(f"<{n}Q", data, 8)
    parts = [data[a:b] for a, b in itertools.pairwise(offsets)]
    message = {"channel": parts[0].decode("ascii"), "header": json.loads(parts[1]),
               "parent_header": json.loads(parts[2]), "metadata": json.loads(parts[3]),
               "content": json.loads(parts[4])}
    return message, len(data) - offsets[5]


def encode_v1_frame(channel: str, header: dict, content: dict) -> bytes:
    """A client message as a v1 frame (no buffers)."""
    parts = [channel.encode("ascii"), json.dumps(header).encode(), b"{}", b"{}", json.dumps(content).encode()]
    offsets = [8 * (len(parts) + 2)]
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    return struct.pack(f"<{len(offsets) + 1}Q", len(offsets), *offsets) + b"".join(parts)


class WSConn(HeaderFactory):
    """One /api/kernels/{id}/channels WebSocket: the legacy JSON text protocol, or with ``v1`` the
    ``v1.kernel.websocket.jupyter.org`` binary protocol when the gateway accepts it (``self.v1`` says).

    ``client`` is ``lean`` (bench/leanws.py: a frame's payload read in one piece, the WebSocket counterpart of
    the lean ZeroMQ client) or ``websocket-client`` (the library most Python clients use)."""

    def __init__(self, port: int, kernel_id: str, timeout: float, v1: bool = False,
                 client: str = "lean") -> None:
        super().__init__()
        path = f"/api/kernels/{kernel_id}/channels?session_id={self.session}"
        subprotocols = [V1_PROTOCOL] if v1 else None
        self.ws: LeanWebSocket | WebSocketClient
        if client == "lean":
            self.ws = LeanWebSocket(LOCALHOST, port, path, timeout, subprotocols)
        else:
            self.ws = WebSocketClient(f"ws://{LOCALHOST}:{port}{path}", timeout, subprotocols)
        self.v1 = self.ws.subprotocol == V1_PROTOCOL

    def send(self, channel: str, msg_type: str, content: dict) -> str:
        """Send one message as a JSON text frame (v1: a binary frame)."""
        hdr = self.header(msg_type)
        if self.v1:
            self.ws.send(OP_BINARY, encode_v1_frame(channel, hdr, content))
        else:
            self.ws.send(OP_TEXT, json.dumps({"header": hdr, "parent_header": {}, "metadata": {},
                                              "content": content, "buffers": [], "channel": channel}).encode())
        return hdr["msg_id"]

    def recv(self, timeout: float) -> Msg:
        """Next message; ping/pong frames do not extend the deadline."""
        try:
            opcode, data = self.ws.recv(time.monotonic() + timeout)
        except (TimeoutError, websocket.WebSocketTimeoutException):
            raise TimeoutError("no WebSocket message before the deadline") from None
        if opcode == OP_TEXT:
            m = json.loads(data)
        elif opcode == OP_BINARY:
            m, buffer_bytes = (decode_v1_frame if self.v1 else decode_binary_frame)(data)
            self.buffer_bytes += buffer_bytes
        else:
            raise ConnectionError("the gateway closed the WebSocket")
        if m["header"]["msg_type"] == "execute_reply":
            note_kernel_time(m["content"], m["header"], m.get("metadata") or {})
        return (m.get("channel", "?"), m["header"]["msg_type"],
                (m.get("parent_header") or {}).get("msg_id"), m["content"])

    def close(self) -> None:
        """Close the WebSocket (bounded)."""
        self.ws.settimeout(2)
        self.ws.close()


class WebSocketClient:
    """websocket-client behind LeanWebSocket's interface (``send``, ``recv``, ``settimeout``, ``close``)."""

    def __init__(self, url: str, timeout: float, subprotocols: list[str] | None) -> None:
        # websocket-client sets TCP_NODELAY by default; the UTF-8 check and the
        # per-call locks would only make the client slower.
        self.ws = websocket.create_connection(url, timeout=timeout, skip_utf8_validation=True,
                                              enable_multithread=False, subprotocols=subprotocols)
        self.subprotocol = self.ws.getsubprotocol()

    def settimeout(self, timeout: float) -> None:
        """Timeout of each blocking read and write."""
        self.ws.settimeout(timeout)

    def send(self, opcode: int, payload: bytes) -> None:
        """One frame."""
        self.ws.send(payload, opcode=opcode)

    def recv(self, deadline: float) -> tuple[int, bytes]:
        """The next data message or a CLOSE before ``deadline`` (``time.monotonic()``); control_frame=True hands
        pings back here, so that they do not restart websocket-client's timeout."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no WebSocket message before the deadline")
            self.ws.settimeout(left)
            opcode, data = self.ws.recv_data(control_frame=True)
            if opcode in (OP_TEXT, OP_BINARY, OP_CLOSE):
                return opcode, data

    def close(self) -> None:
        """Close (bounded by the timeout); on error just shut the socket."""
        try:
            self.ws.close(timeout=2)
        except ERRORS:
            self.ws.shutdown()


# ---------------------------------------------------------------------------
# measurement building blocks
# ---------------------------------------------------------------------------

def note_kernel_time(content: dict, header: dict, metadata: dict) -> None:
    """Put into an execute_reply's content (as ``_kernel_s``) how long the kernel itself took: from ipykernel's
    ``metadata.started`` (it began the request) to the reply's ``header.date``. What a latency has beyond it was
    spent outside the kernel (client, gateway, transport, and the wait before the kernel picked the request up)."""
    try:
        started = datetime.datetime.fromisoformat(str(metadata["started"]).replace("Z", "+00:00"))
        replied = datetime.datetime.fromisoformat(str(header["date"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return
    content["_kernel_s"] = (replied - started).total_seconds()
    # Wall-clock ends of the handler: the client (same host, same clock) tells from them how long its request took
    # to be picked up and the reply to reach it.
    content["_started_at"], content["_replied_at"] = started.timestamp(), replied.timestamp()


def await_done(conn: Conn, mid: str, t0: float, timeout: float,
               on_msg: Callable[[Msg, float], None] | None = None,
               quiet: float | None = None) -> tuple[float | None, float | None, dict | None]:
    """Receive until request `mid` has its shell reply and its iopub idle.

    Returns (t_reply, t_idle, reply content) in seconds after t0.  With
    `quiet`, once the reply is in, stop waiting for idle after `quiet` s of
    silence and return t_idle=None (a lossy gateway may drop the idle)."""
    t_reply = t_idle = None
    reply = None
    deadline = time.monotonic() + timeout
    while t_reply is None or t_idle is None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no reply+idle within {timeout:.0f} s")
        if quiet is not None and t_reply is not None:
            left = min(left, quiet)
        try:
            m = conn.recv(left)
        except TimeoutError:
            if quiet is not None and t_reply is not None:
                return t_reply, None, reply
            raise
        if m[2] != mid:
            continue
        t = time.perf_counter() - t0
        if on_msg is not None:
            on_msg(m, t)
        if m[1].endswith("_reply"):
            t_reply, reply = t, m[3]
        elif m[1] == "status" and m[3].get("execution_state") == "idle":
            t_idle = t
    return t_reply, t_idle, reply


def execute(conn: Conn, code: str, timeout: float,
            on_msg: Callable[[Msg, float], None] | None = None,
            quiet: float | None = None) -> tuple[float | None, float | None, dict | None]:
    """One execute_request; see await_done for the result."""
    t0 = time.perf_counter()
    mid = conn.send("shell", "execute_request", execute_content(code))
    return await_done(conn, mid, t0, timeout, on_msg, quiet)


def wait_kernel_info(conn: Conn, timeout: float, resend: float = 1.0) -> None:
    """kernel_info_request (re-sent every `resend` s) until a reply arrives."""
    deadline = time.monotonic() + timeout
    sent: set[str] = set()
    while time.monotonic() < deadline:
        sent.add(conn.send("shell", "kernel_info_request", {}))
        end = min(deadline, time.monotonic() + resend)
        while (left := end - time.monotonic()) > 0:
            try:
                m = conn.recv(left)
            except TimeoutError:
                break
            if m[1] == "kernel_info_reply" and m[2] in sent:
                return
    raise TimeoutError(f"no kernel_info_reply within {timeout:.0f} s")


def wait_iopub(conn: Conn, timeout: float) -> None:
    """kernel_info_request until its iopub status arrives (iopub subscribed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        mid = conn.send("shell", "kernel_info_request", {})
        end = min(deadline, time.monotonic() + 0.5)
        while (left := end - time.monotonic()) > 0:
            try:
                m = conn.recv(left)
            except TimeoutError:
                break
            if m[0] == "iopub" and m[2] == mid:
                # drain this request's remaining messages
                try:
                    await_done(conn, mid, time.perf_counter(), 5.0)
                except TimeoutError:
                    pass
                return
    raise TimeoutError(f"iopub silent for {timeout:.0f} s")


def run_parallel(n: int, fn: Callable[[int], Any], timeout: float) -> tuple[list[Any], list[str], float]:
    """fn(0..n-1) in n threads released together; (results, errors, wall s)."""
    results: list[Any] = [None] * n
    errors: list[str] = []
    barrier = threading.Barrier(n + 1, timeout=timeout)

    def worker(i: int) -> None:
        try:
            barrier.wait()
            results[i] = fn(i)
        except Exception as e:  # recorded; the other threads go on
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    deadline = time.monotonic() + timeout
    for t in threads:
        while t.is_alive() and time.monotonic() < deadline:
            t.join(0.2)  # short joins keep Ctrl-C responsive
    wall = time.perf_counter() - t0
    if any(t.is_alive() for t in threads):
        errors.append(f"threads still running after {timeout:.0f} s")
    return results, errors, wall


# ---------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------

@dataclass
class Kernel:
    """A started, ready kernel of some target."""

    conn: Conn
    timings: dict[str, float]
    delete: Callable[[], None]


@dataclass
class Target:
    """Something that starts kernels: a direct launcher or a gateway."""

    name: str
    description: str
    error: str | None = None
    pid: int | None = None          # gateway process (RSS, CPU); None = direct
    info: dict = field(default_factory=dict)

    def start_kernel(self, ready_iopub: bool, timeout: float, v1: bool = False) -> Kernel:
        """Start a kernel and wait for kernel_info_reply (and iopub if asked); ``v1``: a gateway's WebSocket
        asks for the v1 protocol."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the target's own processes."""

    def track(self) -> None:
        """Record the gateway's current child processes."""


class DirectTarget(Target):
    """Kernels launched here and driven by DirectConn."""

    def __init__(self, name: str, description: str, ctx: zmq.Context, python: str,
                 runtime_dir: str, kernel_args: Sequence[str] = ()) -> None:
        super().__init__(name, description)
        self.ctx, self.python, self.runtime_dir = ctx, python, runtime_dir
        self.kernel_args = tuple(kernel_args)
        self.live: list[DirectKernel] = []
        self.lock = threading.Lock()

    def start_kernel(self, ready_iopub: bool, timeout: float, v1: bool = False) -> Kernel:
        """Launch -> kernel_info_reply; 'delete' = shutdown_request + wait for exit (``v1``: no meaning)."""
        t0 = time.perf_counter()
        k = DirectKernel(self.ctx, self.python, self.runtime_dir, self.name, self.kernel_args)
        with self.lock:
            self.live.append(k)
        t1 = time.perf_counter()
        try:
            wait_kernel_info(k.conn, timeout)
            t2 = time.perf_counter()
            if ready_iopub:
                wait_iopub(k.conn, timeout)
        except BaseException:
            self._delete(k)
            raise
        return Kernel(k.conn, {"launch": t1 - t0, "kernel_info": t2 - t1, "total": t2 - t0},
                      lambda: self._delete(k))

    def _delete(self, k: DirectKernel) -> None:
        k.shutdown()
        with self.lock:
            if k in self.live:
                self.live.remove(k)

    def stop(self) -> None:
        """Shut down every kernel still alive."""
        for k in list(self.live):
            self._delete(k)


class GatewayTarget(Target):
    """A gateway subprocess speaking the kernel gateway REST + WS API."""

    def __init__(self, name: str, description: str, cmd: list[str], port: int,
                 env: dict[str, str], log_path: Path, kernel_name: str, ws_client: str = "lean") -> None:
        super().__init__(name, description)
        self.cmd, self.port, self.env, self.ws_client = cmd, port, env, ws_client
        self.log_path, self.kernel_name = log_path, kernel_name
        self.proc: subprocess.Popen | None = None
        self.kernels: set[str] = set()
        self.lock = threading.Lock()

    def launch(self, timeout: float) -> None:
        """Start the gateway and wait until GET /api answers."""
        log(f"{self.name}: starting {shlex.join(self.cmd)}")
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=logf, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        TRACKER.add(self.proc.pid, f"{self.name} gateway")
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.proc.returncode} at "
                                 f"startup; log {self.log_path}:\n{self.log_tail()}")
            try:
                self.info["api"] = http_request(self.port, "GET", "/api", timeout=2)[1]
                break
            except (OSError, BenchError):
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.name} did not answer GET /api within "
                                     f"{timeout:.0f} s; log {self.log_path}:\n"
                                     f"{self.log_tail()}") from None
                time.sleep(0.1)
        self.info["startup_s"] = round(timeout - (deadline - time.monotonic()), 3)
        pid = listener_pid(self.port, [self.proc.pid, *proc_descendants(self.proc.pid)])
        self.pid = pid or self.proc.pid
        if self.pid != self.proc.pid:
            TRACKER.add(self.pid, f"{self.name} gateway")
        specs = http_request(self.port, "GET", "/api/kernelspecs")[1] or {}
        names = sorted(specs.get("kernelspecs") or {})
        if self.kernel_name not in names:
            raise BenchError(f"{self.name} does not offer kernel {self.kernel_name!r} "
                             f"(has {names})")
        self.info["kernelspec_argv"] = specs["kernelspecs"][self.kernel_name].get(
            "spec", {}).get("argv")

    def log_tail(self, n: int = 15) -> str:
        """Last lines of the gateway log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def alive(self) -> bool:
        """Whether the gateway process still runs."""
        return self.proc is not None and self.proc.poll() is None

    def track(self) -> None:
        """Record the gateway's descendants (its kernels) for the final check."""
        if self.proc is not None:
            TRACKER.add_descendants(self.proc.pid, self.name)

    def start_kernel(self, ready_iopub: bool, timeout: float, v1: bool = False) -> Kernel:
        """POST /api/kernels -> WS connect (``v1``: asking for the v1 protocol) -> kernel_info_reply;
        delete = DELETE."""
        if not self.alive():
            raise BenchError(f"{self.name} gateway is not running; log tail:\n{self.log_tail()}")
        body = {"name": self.kernel_name, "env": {"KERNEL_USERNAME": KERNEL_USERNAME}}
        t0 = time.perf_counter()
        kid = http_request(self.port, "POST", "/api/kernels", body, timeout=timeout)[1]["id"]
        t1 = time.perf_counter()
        with self.lock:
            self.kernels.add(kid)
        try:
            conn = WSConn(self.port, kid, timeout, v1=v1, client=self.ws_client)
            t2 = time.perf_counter()
            try:
                wait_kernel_info(conn, timeout)
                t3 = time.perf_counter()
                if ready_iopub:
                    wait_iopub(conn, timeout)
            except BaseException:
                conn.close()
                raise
        except BaseException:
            try:
                self._delete(kid, None)
            except ERRORS as e:  # keep the original error; the DELETE is secondary
                log(f"{self.name}: DELETE {kid} after a failed start: {e}")
            raise
        self.track()
        return Kernel(conn, {"post": t1 - t0, "ws_connect": t2 - t1,
                             "kernel_info": t3 - t2, "total": t3 - t0},
                      lambda: self._delete(kid, conn))

    def _delete(self, kid: str, conn: WSConn | None) -> None:
        if conn is not None:
            conn.close()
        try:
            http_request(self.port, "DELETE", f"/api/kernels/{kid}", timeout=30)
        finally:
            with self.lock:
                self.kernels.discard(kid)

    def stop(self) -> None:
        """DELETE leftover kernels, SIGTERM the gateway, SIGKILL after 15 s."""
        if self.proc is None:
            return
        self.track()
        if self.alive():
            for kid in list(self.kernels):
                try:
                    self._delete(kid, None)
                except ERRORS as e:
                    log(f"{self.name}: DELETE {kid} at cleanup failed: {e}")
        kill_group_or_pid(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            log(f"{self.name}: no exit 15 s after SIGTERM; SIGKILL")
            kill_group_or_pid(self.proc.pid, signal.SIGKILL)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.info["exit_code"] = self.proc.returncode


# ---------------------------------------------------------------------------
# EG venv and gateway commands
# ---------------------------------------------------------------------------

def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


VERSIONS_SNIPPET = r"""
import json, importlib.metadata as md
out = {}
for d in ("jupyter_enterprise_gateway", "jupyter_server", "jupyter_client", "ipykernel",
          "pyzmq", "tornado", "websocket-client", "twisted", "egd"):
    try:
        out[d] = md.version(d)
    except Exception:
        pass
print(json.dumps(out))
"""


def package_versions(python: str) -> dict[str, str]:
    """Versions of the relevant distributions in the environment of `python`."""
    try:
        r = subprocess.run([python, "-c", VERSIONS_SNIPPET], capture_output=True,
                           text=True, timeout=60, check=False)
        return json.loads(r.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return {}


def ensure_eg_venv(venv: Path) -> dict[str, str]:
    """Create the EG venv and pip-install EG 3.x + ipykernel<7 into it if needed."""
    py = venv / "bin" / "python"
    versions = package_versions(str(py)) if py.exists() else {}
    ok = ("jupyter_enterprise_gateway" in versions and
          int(versions.get("ipykernel", "7").split(".")[0]) < 7 and
          (venv / "bin" / "jupyter-enterprisegateway").exists())
    if ok:
        return versions
    log(f"installing {' '.join(EG_PIP_SPEC)} into {venv} (one-time, ~1 min)")
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    r = subprocess.run([str(py), "-m", "pip", "install", "--disable-pip-version-check",
                        "-q", *EG_PIP_SPEC], timeout=1200, capture_output=True, text=True,
                       check=False)
    if r.returncode != 0:
        raise BenchError(f"pip install of EG failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return package_versions(str(py))


def kernelspec_dir(root: Path, python: str, kernel_name: str, display_name: str,
                   kernel_args: Sequence[str]) -> Path:
    """A JUPYTER_PATH dir (`root`) whose kernelspec `kernel_name` runs `python`'s ipykernel with `kernel_args`."""
    spec_dir = root / "kernels" / kernel_name
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {"argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}", *kernel_args],
            "display_name": display_name, "language": "python",
            "interrupt_mode": "signal", "metadata": {}}
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
    return root


def history_args(args: argparse.Namespace) -> list[str]:
    """What every target's ipykernel gets on its command line: with ``--ipython-history memory`` (the default)
    each kernel keeps its IPython history in memory instead of the account's one SQLite file, which kernels of one
    account otherwise all write every cell to (the tail of ``conc``; bench/README.rst)."""
    # For ``shared``, an explicit IPython default: egd leaves a kernelspec that sets a HistoryManager option alone,
    # where it would otherwise keep each kernel's history in memory (kernels.ipython_history: kernel).
    option = "hist_file=:memory:" if args.ipython_history == "memory" else "enabled=True"
    return [f"--HistoryManager.{option}"]


def egd_command(arg: str | None, port: int) -> list[str]:
    """The egd command line; '{port}' in --egd-cmd is substituted, else
    '--ip 127.0.0.1 --port N' is appended."""
    if arg:
        parts = shlex.split(arg)
    elif shutil.which("egd"):
        parts = ["egd", "run"]
    elif importlib.util.find_spec("egd") is not None:
        parts = [sys.executable, "-m", "egd", "run"]
    else:
        raise BenchError("egd is not installed: no `egd` on PATH and `import egd` fails "
                         "(pip install -e . in the repo, or pass --egd-cmd)")
    if any("{port}" in p for p in parts):
        return [p.replace("{port}", str(port)) for p in parts]
    return [*parts, "--ip", LOCALHOST, "--port", str(port)]


# ---------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------

def cpu_snapshot(target: Target) -> tuple[float, float, float | None]:
    """(wall, client CPU, gateway CPU) now."""
    g = proc_cpu_s(target.pid) if target.pid else None
    return time.perf_counter(), time.process_time(), g


def cpu_delta(target: Target, s0: tuple[float, float, float | None]) -> dict[str, Any]:
    """Wall and CPU seconds since snapshot s0 (which side was busy)."""
    s1 = cpu_snapshot(target)
    return {"wall_s": s1[0] - s0[0], "client_cpu_s": s1[1] - s0[1],
            "gateway_cpu_s": (s1[2] - s0[2]) if s0[2] is not None and s1[2] is not None else None}


def sec_start(target: Target, args: argparse.Namespace) -> dict:
    """N sequential kernel starts, each deleted right after (delete timed)."""
    parts: dict[str, list[float]] = collections.defaultdict(list)
    deletes = []
    for _ in range(args.n_start):
        k = target.start_kernel(ready_iopub=False, timeout=args.timeout)
        for key, v in k.timings.items():
            parts[key].append(v)
        t0 = time.perf_counter()
        k.delete()
        deletes.append(time.perf_counter() - t0)
    out = {key: summarize(v) for key, v in parts.items()}
    out["delete"] = summarize(deletes)
    return out


def sec_rtt(k: Kernel, args: argparse.Namespace) -> dict:
    """Sequential execute round trips of the code "1" after a warm-up."""
    for _ in range(args.warmup):
        execute(k.conn, "1", 30)
    to_reply, to_idle = [], []
    for _ in range(args.n_rtt):
        r, i, reply = execute(k.conn, "1", 30)
        if r is None or i is None or not reply or reply.get("status") != "ok":
            raise BenchError(f"execute failed: {reply}")
        to_reply.append(r)
        to_idle.append(i)
    return {"to_reply": summarize(to_reply), "to_idle": summarize(to_idle),
            "execs_per_s": len(to_idle) / sum(to_idle)}


def sec_iopub(k: Kernel, args: argparse.Namespace) -> dict:
    """One execute printing `lines` flushed lines; rate and lost lines."""
    n = args.lines
    texts: list[str] = []
    other: list[str] = []  # e.g. stderr "IOPub message rate exceeded" notices
    count = [0, 0]  # iopub messages, stream messages
    last = [0.0]

    def on_msg(m: Msg, t: float) -> None:
        last[0] = t
        if m[0] == "iopub":
            count[0] += 1
            if m[1] == "stream":
                count[1] += 1
                if m[3].get("name") == "stdout":
                    texts.append(m[3]["text"])
                elif len(other) < 5:
                    other.append(m[3].get("text", "")[:300])

    error = None
    t_reply = t_idle = None
    try:
        t_reply, t_idle, _ = execute(k.conn, f"for i in range({n}): print(i, flush=True)",
                                     args.timeout * 3, on_msg, quiet=15.0)
    except (TimeoutError, ConnectionError) as e:
        error = f"{type(e).__name__}: {e}"
    got = "".join(texts).split()
    distinct = {int(x) for x in got if x.isdigit() and int(x) < n}
    t_end = t_idle if t_idle is not None else (last[0] or None)
    return {"lines": n, "error": error, "lines_lost": n - len(distinct),
            "in_order": got == [str(i) for i in range(n)], "idle_received": t_idle is not None,
            "iopub_msgs": count[0], "stream_msgs": count[1], "other_streams": other,
            "time_to_reply_s": t_reply, "time_to_idle_s": t_idle,
            "msgs_per_s": count[0] / t_end if t_end else None,
            "lines_per_s": len(distinct) / t_end if t_end else None}


def stream_once(k: Kernel, mib: int, timeout: float) -> dict:
    """One execute writing a single `mib` MiB string to stdout."""
    total = mib * 1024 * 1024
    state: dict[str, Any] = {"bytes": 0, "msgs": 0, "t_all": None}

    def on_msg(m: Msg, t: float) -> None:
        if m[0] == "iopub" and m[1] == "stream":
            state["msgs"] += 1
            state["bytes"] += len(m[3]["text"])
            if state["t_all"] is None and state["bytes"] >= total:
                state["t_all"] = t

    code = f"import sys; sys.stdout.write('x' * {total}); sys.stdout.flush()"
    error = None
    t_idle = None
    try:
        _, t_idle, _ = execute(k.conn, code, timeout, on_msg, quiet=15.0)
    except (TimeoutError, ConnectionError) as e:
        error = f"{type(e).__name__}: {e}"
    done = (max(t_idle, state["t_all"]) if t_idle is not None and state["t_all"] is not None
            else None)
    return {"error": error, "bytes_received": state["bytes"], "bytes_ok": state["bytes"] == total,
            "stream_msgs": state["msgs"], "time_to_all_bytes_s": state["t_all"],
            "time_to_idle_s": t_idle, "time_to_done_s": done,
            "mib_per_s": mib / done if done else None}


def sec_stream(k: Kernel, args: argparse.Namespace) -> dict:
    """`stream_runs` executes of one `stream_mib` MiB write each; medians of them
    (one run takes ~0.1 s, too short to trust a single sample)."""
    runs = [stream_once(k, args.stream_mib, args.timeout) for _ in range(args.stream_runs)]
    out: dict[str, Any] = {"mib": args.stream_mib, "runs": runs,
                           "bytes_ok": all(r["bytes_ok"] for r in runs),
                           "error": next((r["error"] for r in runs if r["error"]), None)}
    for key in ("time_to_all_bytes_s", "time_to_idle_s", "time_to_done_s", "mib_per_s"):
        vals = [r[key] for r in runs if r[key] is not None]
        out[key] = statistics.median(vals) if len(vals) == len(runs) else None
    return out


#: What the buffers section runs once per kernel: the buffer is made outside the timed executes.
_BUFFER_SETUP = "_egdbench_buffer = b'\\x01' * {size}\nfrom comm import create_comm as _egdbench_comm"
#: One timed execute: a comm whose comm_open message carries the buffer (a widget's or an image's bytes).
_BUFFER_SEND = "_egdbench_comm(target_name='egdbench', data={}, buffers=[_egdbench_buffer]).close()"


def buffer_once(k: Kernel, size: int, timeout: float) -> dict:
    """One execute whose iopub carries a `size`-byte binary buffer: time until it and idle arrived."""
    before = k.conn.buffer_bytes
    state: dict[str, Any] = {"t_all": None}

    def on_msg(m: Msg, t: float) -> None:
        if state["t_all"] is None and k.conn.buffer_bytes - before >= size:
            state["t_all"] = t

    error = t_idle = None
    try:
        _, t_idle, _ = execute(k.conn, _BUFFER_SEND, timeout, on_msg, quiet=15.0)
    except (TimeoutError, ConnectionError) as e:
        error = f"{type(e).__name__}: {e}"
    received = k.conn.buffer_bytes - before
    done = max(t_idle, state["t_all"]) if t_idle is not None and state["t_all"] is not None else None
    return {"error": error, "bytes_ok": received == size, "buffer_bytes_received": received,
            "time_to_done_s": done, "mib_per_s": size / 2**20 / done if done else None}


def sec_buffers(target: Target, args: argparse.Namespace) -> dict:
    """`stream_runs` executes each sending one `buffer_mib` MiB binary buffer, on a kernel of their own whose
    WebSocket asks for the v1 protocol; medians of them."""
    size = args.buffer_mib * 2**20
    k = target.start_kernel(ready_iopub=True, timeout=args.timeout, v1=True)
    try:
        execute(k.conn, _BUFFER_SETUP.format(size=size), args.timeout)
        runs = [buffer_once(k, size, args.timeout) for _ in range(args.stream_runs)]
    finally:
        k.delete()
    protocol = "zmq" if not isinstance(k.conn, WSConn) else ("v1" if k.conn.v1 else "legacy")
    out: dict[str, Any] = {"mib": args.buffer_mib, "protocol": protocol, "runs": runs,
                           "bytes_ok": all(r["bytes_ok"] for r in runs),
                           "error": next((r["error"] for r in runs if r["error"]), None)}
    for key in ("time_to_done_s", "mib_per_s"):
        vals = [r[key] for r in runs if r[key] is not None]
        out[key] = statistics.median(vals) if len(vals) == len(runs) else None
    return out


def sec_conc(target: Target, args: argparse.Namespace, rate: float | None = None) -> dict:
    """K kernels started together, then K clients doing R round trips at once: each as fast as it can, or with
    `rate`, together at most `rate` executes per second (each client sends its i-th request no earlier than
    i * K / rate s after the start), so that every target is measured under the same load."""
    nk, per = args.conc_kernels, args.conc_execs
    started, errors, ready_wall = run_parallel(
        nk, lambda i: target.start_kernel(ready_iopub=True, timeout=args.timeout),
        args.timeout * 2)
    live: list[Kernel] = [k for k in started if k is not None]
    out: dict[str, Any] = {"kernels": nk, "start_errors": errors, "all_ready_s": ready_wall}
    try:
        if len(live) != nk:
            raise BenchError(f"only {len(live)}/{nk} kernels started: {errors[:3]}")
        for k in live:
            for _ in range(3):
                execute(k.conn, "1", 30)  # warm-up

        inside: list[float] = []  # the kernel's own time of each execute (list.append is atomic)
        outside: list[float] = []  # the rest: what the client, the gateway and the transport took
        to_kernel: list[float] = []  # of which: from the client's send until the kernel began the request
        to_client: list[float] = []  # and from the kernel's reply until the client had it

        begin = time.monotonic()

        def client(i: int) -> list[float]:
            conn = live[i].conn
            lat = []
            for n in range(per):
                if rate:
                    time.sleep(max(0.0, begin + (n + i / nk) * nk / rate - time.monotonic()))
                sent_at = time.time()
                t_reply, t_idle, reply = execute(conn, "1", 60)
                if t_idle is None or t_reply is None:
                    raise BenchError("execute without reply or idle")
                lat.append(t_idle)
                if reply is not None and "_kernel_s" in reply:
                    inside.append(reply["_kernel_s"])
                    outside.append(max(0.0, t_idle - reply["_kernel_s"]))
                    to_kernel.append(max(0.0, reply["_started_at"] - sent_at))
                    to_client.append(max(0.0, sent_at + t_reply - reply["_replied_at"]))
            return lat

        s0 = cpu_snapshot(target)
        lats, errors, wall = run_parallel(nk, client, args.timeout * 5)
        out["cpu"] = cpu_delta(target, s0)
        flat = [x for lat in lats if lat for x in lat]
        out.update({"exec_errors": errors, "execs": len(flat), "wall_s": wall, "rate_limit": rate,
                    "execs_per_s": len(flat) / wall if wall else None,
                    "latency": summarize(flat)})
        if inside:
            out.update({"latency_in_kernel": summarize(inside), "latency_outside_kernel": summarize(outside),
                        "latency_to_kernel": summarize(to_kernel), "latency_reply_to_client": summarize(to_client)})
        if errors:
            raise BenchError(f"{len(errors)} clients failed: {errors[:3]}")
    finally:
        t0 = time.perf_counter()
        for k in live:
            try:
                k.delete()
            except ERRORS as e:
                out.setdefault("delete_errors", []).append(str(e))
        out["delete_all_s"] = time.perf_counter() - t0
    return out


class RSSSampler(threading.Thread):
    """Samples VmRSS of the gateway processes every `interval` s (peak)."""

    def __init__(self, pids: dict[str, int], interval: float = 0.1) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.pids, self.interval = pids, interval
        self.peak: dict[str, int] = {n: proc_status_kib(p) or 0 for n, p in pids.items()}
        self.stopped = threading.Event()

    def run(self) -> None:
        """Sample until stop()."""
        while not self.stopped.wait(self.interval):
            for name, pid in self.pids.items():
                r = proc_status_kib(pid)
                if r and r > self.peak[name]:
                    self.peak[name] = r

    def stop(self) -> dict[str, int]:
        """Stop sampling; return the peaks in KiB."""
        self.stopped.set()
        self.join(timeout=5)
        return self.peak


# ---------------------------------------------------------------------------
# summary, ratios, table
# ---------------------------------------------------------------------------

# (label, key path inside one target's per-rep result, unit, better)
METRICS = [
    ("start: total (median)", "start.total.median_ms", "ms", "low"),
    ("start: total (p95)", "start.total.p95_ms", "ms", "low"),
    ("start:   POST /api/kernels", "start.post.median_ms", "ms", "low"),
    ("start:   WS connect", "start.ws_connect.median_ms", "ms", "low"),
    ("start:   launch (direct)", "start.launch.median_ms", "ms", "low"),
    ("start:   kernel_info", "start.kernel_info.median_ms", "ms", "low"),
    ("start: DELETE (median)", "start.delete.median_ms", "ms", "low"),
    ("rtt: send->reply median", "rtt.to_reply.median_ms", "ms", "low"),
    ("rtt: send->reply p95", "rtt.to_reply.p95_ms", "ms", "low"),
    ("rtt: send->idle median", "rtt.to_idle.median_ms", "ms", "low"),
    ("rtt: send->idle p95", "rtt.to_idle.p95_ms", "ms", "low"),
    ("iopub: msgs/s", "iopub.msgs_per_s", "msg/s", "high"),
    ("iopub: lines/s", "iopub.lines_per_s", "line/s", "high"),
    ("iopub: time to idle", "iopub.time_to_idle_s", "s", "low"),
    ("iopub: lines lost (max)", "iopub.lines_lost", "lines", "low"),
    ("iopub: client CPU", "iopub.cpu.client_cpu_s", "s", "low"),
    ("iopub: gateway CPU", "iopub.cpu.gateway_cpu_s", "s", "low"),
    ("stream: time to all bytes", "stream.time_to_all_bytes_s", "s", "low"),
    ("stream: time to done", "stream.time_to_done_s", "s", "low"),
    ("stream: MiB/s", "stream.mib_per_s", "MiB/s", "high"),
    ("buffers: time to done", "buffers.time_to_done_s", "s", "low"),
    ("buffers: MiB/s", "buffers.mib_per_s", "MiB/s", "high"),
    ("conc: all kernels ready", "conc.all_ready_s", "s", "low"),
    ("conc: aggregate execs/s", "conc.execs_per_s", "exec/s", "high"),
    ("conc: latency median", "conc.latency.median_ms", "ms", "low"),
    ("conc: latency p99", "conc.latency.p99_ms", "ms", "low"),
    ("conc: p99 in kernel handler", "conc.latency_in_kernel.p99_ms", "ms", "low"),
    ("conc: p99 outside handler", "conc.latency_outside_kernel.p99_ms", "ms", "low"),
    ("conc: median outside handler", "conc.latency_outside_kernel.median_ms", "ms", "low"),
    ("conc: send to handler p99", "conc.latency_to_kernel.p99_ms", "ms", "low"),
    ("conc: send to handler median", "conc.latency_to_kernel.median_ms", "ms", "low"),
    ("conc: reply to client p99", "conc.latency_reply_to_client.p99_ms", "ms", "low"),
    ("conc: reply to client median", "conc.latency_reply_to_client.median_ms", "ms", "low"),
    ("conc: client CPU", "conc.cpu.client_cpu_s", "s", "low"),
    ("conc: gateway CPU", "conc.cpu.gateway_cpu_s", "s", "low"),
    ("paced: execs/s", "paced.execs_per_s", "exec/s", "high"),
    ("paced: latency median", "paced.latency.median_ms", "ms", "low"),
    ("paced: latency p99", "paced.latency.p99_ms", "ms", "low"),
    ("paced: p99 in kernel handler", "paced.latency_in_kernel.p99_ms", "ms", "low"),
    ("paced: p99 outside handler", "paced.latency_outside_kernel.p99_ms", "ms", "low"),
    ("rss: before (idle, fresh)", "rss.before_kib", "KiB", "low"),
    ("rss: peak (sampled)", "rss.peak_kib", "KiB", "low"),
    ("rss: VmHWM", "rss.hwm_kib", "KiB", "low"),
    ("rss: after", "rss.after_kib", "KiB", "low"),
]

# (label, numerator target, denominator target, metric key, op, threshold)
CHECKS = [
    ("round trip send->reply, egd/direct", "egd", "direct", "rtt.to_reply.median_ms", "<=", 1.25),
    ("round trip send->idle, egd/direct", "egd", "direct", "rtt.to_idle.median_ms", "<=", 1.25),
    ("iopub msgs/s, egd/direct (+0 lost)", "egd", "direct", "iopub.msgs_per_s", ">=", 0.9),
    ("10 MiB stream MiB/s, egd/direct", "egd", "direct", "stream.mib_per_s", ">=", 0.9),
    # Against EG, not the direct client: the direct client is handed ZeroMQ's frame with no parsing at all, where any
    # gateway adds a TCP hop and a WebSocket read of the frame (bench/README.rst, "Large outputs").
    ("10 MiB v1 buffer MiB/s, egd/EG", "egd", "eg", "buffers.mib_per_s", ">=", 1.0),
    ("kernel start, egd/direct", "egd", "direct", "start.total.median_ms", "<=", 1.1),
    ("8x100 aggregate execs/s, egd/EG", "egd", "eg", "conc.execs_per_s", ">=", 4.0),
    ("8x100 latency p99, egd/EG (issue 15)", "egd", "eg", "conc.latency.p99_ms", "<=", 1.0),
    ("8x100 paced, latency p99, egd/EG", "egd", "eg", "paced.latency.p99_ms", "<=", 1.0),
    ("gateway RSS peak, egd/EG", "egd", "eg", "rss.peak_kib", "<=", 0.5),
]


def dig(d: Any, path: str) -> Any:
    """d['a']['b'] for path 'a.b', or None."""
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def summarize_runs(runs: list[dict], names: list[str], rss: dict) -> dict[str, dict]:
    """Median over repetitions per target and metric (lost lines: max)."""
    out: dict[str, dict] = {}
    for name in names:
        res: dict[str, Any] = {}
        for _, path, _, _ in METRICS:
            if path.startswith("rss."):
                v = dig(rss.get(name), path[4:])
                if v is not None:
                    res[path] = v
                continue
            vals = [dig(r.get(name), path) for r in runs]
            vals = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if vals:
                res[path] = max(vals) if path == "iopub.lines_lost" else statistics.median(vals)
        out[name] = res
    return out


def fmt(v: Any) -> str:
    """Compact number formatting."""
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def evaluate_checks(summary: dict, runs: list[dict], sections: list[str]) -> list[dict]:
    """Ratios against the performance targets, PASS/FAIL/n/a each."""
    out = []
    for label, num, den, path, op, thr in CHECKS:
        a = summary.get(num, {}).get(path)
        b = summary.get(den, {}).get(path)
        ratio = a / b if a is not None and b else None
        note = ""
        if ratio is None:
            verdict = "n/a"
            section = path.split(".")[0]
            note = (f"section {section} not run" if section not in sections
                    else f"missing {num if a is None else den} figure")
        else:
            ok = ratio <= thr if op == "<=" else ratio >= thr
            if path == "iopub.msgs_per_s":
                lost = [dig(r.get(num), "iopub.lines_lost") for r in runs]
                if any(x is None or x > 0 for x in lost):
                    ok = False
                    note = f"lines lost per rep: {lost}"
            verdict = "PASS" if ok else "FAIL"
        out.append({"check": label, "num": num, "den": den, "metric": path,
                    "numerator": a, "denominator": b, "ratio": ratio,
                    "target": f"{op} {thr}", "verdict": verdict, "note": note})
    return out


def print_report(meta: dict, summary: dict, checks: list[dict], names: list[str],
                 out: Any = sys.stdout) -> None:
    """The readable table, ratios and PASS/FAIL lines."""
    env = meta["env"]
    load = env.get("loadavg_start", (0, 0, 0))[0]
    if load > 0.5 * (env.get("cpus") or 1):
        print(f"\nWARNING load average {load:.2f} at start on {env.get('cpus')} CPUs: other "
              "processes compete with the benchmark; the figures are noisy", file=out)
    print(f"\negdbench  reps={meta['params']['reps']}  sections={','.join(meta['params']['only'])}"
          f"  cpus={env['cpus']}  python={env['python']}  {env['platform']}", file=out)
    print(f"main env: {json.dumps(env['main_versions'])}", file=out)
    print(f"IPython history of every target's kernels: {meta['params'].get('ipython_history', 'shared')}", file=out)
    if env.get("eg_versions"):
        print(f"EG venv : {json.dumps(env['eg_versions'])}", file=out)
    for name in names:
        t = meta["targets"].get(name, {})
        print(f"  {name:<9} {t.get('description', '')}" +
              (f"  [ERROR: {t['error']}]" if t.get("error") else ""), file=out)
    ws_client = meta["params"].get("ws_client", "websocket-client")
    print("  client: direct = lean pyzmq client; egd and EG = the SAME WebSocket client "
          + ("(bench/leanws.py, a payload read in one piece)" if ws_client == "lean" else
             "(websocket-client, enable_multithread=False, skip_utf8_validation=True)"), file=out)
    ratio_cols = []
    if "egd" in names and "direct" in names:
        ratio_cols.append(("egd/direct", "egd", "direct"))
    if "egd" in names and "eg" in names:
        ratio_cols.append(("egd/EG", "egd", "eg"))
    w = max(len(m[0]) for m in METRICS) + 2
    hdr = f"{'metric (median of reps)':<{w}}{'unit':<8}" + "".join(f"{n:>11}" for n in names) \
        + "".join(f"{c[0]:>12}" for c in ratio_cols)
    print("\n" + hdr + "\n" + "-" * len(hdr), file=out)
    for label, path, unit, _ in METRICS:
        vals = [summary.get(n, {}).get(path) for n in names]
        if all(v is None for v in vals):
            continue
        row = f"{label:<{w}}{unit:<8}" + "".join(f"{fmt(v):>11}" for v in vals)
        for _, a, b in ratio_cols:
            va, vb = summary.get(a, {}).get(path), summary.get(b, {}).get(path)
            row += f"{(f'{va / vb:.2f}' if va is not None and vb else '-'):>12}"
        print(row, file=out)
    notes = []
    direct_rtt = summary.get("direct", {}).get("rtt.to_idle.median_ms")
    for n in names:
        rtt = summary.get(n, {}).get("rtt.to_idle.median_ms")
        if n != "direct" and rtt is not None and direct_rtt is not None and rtt - direct_rtt > 30:
            notes.append(f"{n}: round trip {rtt - direct_rtt:.0f} ms over direct: typical of "
                         "Nagle + delayed ACK (no TCP_NODELAY on the gateway's WebSocket)")
        lost = summary.get(n, {}).get("iopub.lines_lost")
        if lost:
            notes.append(f"{n}: lost up to {lost} of {meta['params']['lines']} iopub lines in a "
                         "repetition (read iopub slower than the kernel wrote; ZeroMQ drops "
                         "at the high-water mark)")
    for note in notes:
        print(f"note: {note}", file=out)
    print("\nperformance targets", file=out)
    for c in checks:
        r = f"{c['ratio']:.2f}" if c["ratio"] is not None else "-"
        print(f"  {c['verdict']:<5} {c['check']:<40} ratio {r:>6}  target {c['target']:<7}"
              + (f"  ({c['note']})" if c["note"] else ""), file=out)


def environment(eg_versions: dict | None) -> dict:
    """Machine and version facts for the report."""
    env: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                           "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(),
                           "main_versions": package_versions(sys.executable)}
    try:
        with open("/proc/meminfo") as f:
            env["mem_total_kib"] = int(f.readline().split()[1])
    except (OSError, ValueError):
        pass
    if eg_versions:
        env["eg_versions"] = eg_versions
    return env


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="See the module docstring / bench/README.rst.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", dest="json_out", metavar="PATH", help="write every raw number here")
    p.add_argument("--reps", type=int, default=3, help="repetitions (medians are reported)")
    p.add_argument("--only", default=",".join(ALL_SECTIONS),
                   help=f"comma-separated sections out of {','.join(ALL_SECTIONS)}")
    p.add_argument("--targets", default=DEFAULT_TARGETS,
                   help=f"comma-separated targets out of {','.join(ALL_TARGETS)}")
    p.add_argument("--skip-eg", action="store_true", help="leave Enterprise Gateway out")
    p.add_argument("--skip-egd", action="store_true", help="leave egd out")
    p.add_argument("--egd-cmd", help="egd command; '{port}' is substituted, else "
                   "'--ip 127.0.0.1 --port N' is appended (default: egd run)")
    p.add_argument("--eg-venv", type=Path, default=CACHE_DIR / "eg-venv",
                   help="venv for EG 3.x + ipykernel<7 (created on first use)")
    p.add_argument("--kernel-name", default="python3", help="kernelspec to start on gateways")
    p.add_argument("--ws-client", choices=("lean", "websocket-client"), default="lean",
                   help="WebSocket client for both gateways: lean (bench/leanws.py, a payload read in one piece) "
                        "or websocket-client (16 KiB reads)")
    p.add_argument("--n-start", type=int, default=5, help="start: sequential starts")
    p.add_argument("--n-rtt", type=int, default=200, help="rtt: round trips")
    p.add_argument("--warmup", type=int, default=10, help="rtt: warm-up executes")
    p.add_argument("--lines", type=int, default=20000, help="iopub: flushed lines")
    p.add_argument("--stream-mib", type=int, default=10, help="stream: MiB in one write")
    p.add_argument("--buffer-mib", type=int, default=10, help="buffers: MiB in the one binary buffer")
    p.add_argument("--stream-runs", type=int, default=3,
                   help="stream and buffers: executes per repetition (their median counts)")
    p.add_argument("--conc-kernels", type=int, default=8, help="conc: kernels = clients")
    p.add_argument("--conc-execs", type=int, default=100, help="conc: executes per client")
    p.add_argument("--paced-rate", type=float, default=120.0,
                   help="paced: conc with the clients together sending at most this many executes per second "
                        "(below what every target reaches here), so that latencies compare under the same load")
    p.add_argument("--ipython-history", choices=("memory", "shared"), default="memory",
                   help="every target's kernels keep their IPython history in memory (default), or all write it "
                        "to the account's one history.sqlite (shared: what kernels do unless told; the conc "
                        "section's tail is then that file's lock, for every target alike)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="base timeout in s for one wait (kernel start, one execute)")
    p.add_argument("--keep-logs", action="store_true", help="keep the gateway logs dir")
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = set(args.only) - set(ALL_SECTIONS)
    if bad:
        p.error(f"unknown sections {sorted(bad)}")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if set(targets) - set(ALL_TARGETS):
        p.error(f"unknown targets {sorted(set(targets) - set(ALL_TARGETS))}")
    if args.skip_eg:
        targets = [t for t in targets if t != "eg"]
    if args.skip_egd:
        targets = [t for t in targets if t != "egd"]
    args.targets = targets
    return args


def build_targets(args: argparse.Namespace, ctx: zmq.Context, workdir: Path,
                  eg_versions: dict | None, targets: list[Target]) -> None:
    """Create (and for gateways: launch) every requested target, appending each
    to `targets` before it is launched so that cleanup always sees it."""
    runtime = workdir / "runtime"
    runtime.mkdir(exist_ok=True)
    base_env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(runtime), PYTHONUNBUFFERED="1")
    extra = history_args(args)
    for name in args.targets:
        if name == "direct":
            t: Target = DirectTarget(name, f"lean pyzmq client -> ipykernel ({sys.executable})",
                                     ctx, sys.executable, str(runtime), extra)
        elif name == "direct-eg":
            t = DirectTarget(name, "lean pyzmq client -> EG venv's ipykernel<7",
                             ctx, str(args.eg_venv / "bin" / "python"), str(runtime), extra)
            if eg_versions is None:
                t.error = "EG venv not available"
        else:
            port = free_port()
            logp = workdir / f"{name}.log"
            try:
                if name == "egd":
                    # The kernel the direct target runs, so that egd/direct compares like with like.
                    cmd = egd_command(args.egd_cmd, port)
                    jpath = kernelspec_dir(workdir / "egd-jupyter", sys.executable, args.kernel_name,
                                           "Python 3 (egdbench)", extra)
                    t = GatewayTarget(name, shlex.join(cmd), cmd, port, dict(base_env, JUPYTER_PATH=str(jpath)),
                                      logp, args.kernel_name, args.ws_client)
                elif eg_versions is None:
                    raise BenchError("EG venv not available")
                else:
                    jpath = kernelspec_dir(CACHE_DIR / "eg-jupyter", str(args.eg_venv / "bin" / "python"),
                                           args.kernel_name, "Python 3 (EG venv, egdbench)", extra)
                    cmd = [str(args.eg_venv / "bin" / "jupyter"), "enterprisegateway",
                           f"--ip={LOCALHOST}", f"--port={port}", "--port_retries=0",
                           "--EnterpriseGatewayApp.list_kernels=True"]
                    env = dict(base_env, JUPYTER_PATH=str(jpath))
                    env.pop("VIRTUAL_ENV", None)
                    t = GatewayTarget(name, f"EG {eg_versions.get('jupyter_enterprise_gateway')}"
                                      f" ({shlex.join(cmd[1:])})", cmd, port, env, logp,
                                      args.kernel_name, args.ws_client)
            except BenchError as e:
                t = Target(name, name, error=str(e))
                log(f"{name}: NOT AVAILABLE: {e}")
            else:
                targets.append(t)  # registered for cleanup before it runs
                try:
                    t.launch(args.timeout)
                    log(f"{name}: up on port {port}, pid {t.pid}, RSS "
                        f"{proc_status_kib(t.pid or 0)} KiB, kernel argv "
                        f"{t.info.get('kernelspec_argv')}")
                except (BenchError, OSError) as e:
                    t.error = str(e)
                    log(f"{name}: NOT AVAILABLE: {e}")
                continue
        targets.append(t)


def run_benchmark(args: argparse.Namespace, ctx: zmq.Context, workdir: Path,
                  doc: dict) -> None:
    """All repetitions; fills doc['runs'] and doc['rss'] as it goes."""
    eg_versions = None
    if "eg" in args.targets or "direct-eg" in args.targets:
        try:
            eg_versions = ensure_eg_venv(args.eg_venv)
        except (BenchError, OSError, subprocess.SubprocessError) as e:
            log(f"EG venv: {e}")
            doc["eg_venv_error"] = str(e)
    doc["env"] = environment(eg_versions)
    targets: list[Target] = []
    doc["_targets"] = targets
    build_targets(args, ctx, workdir, eg_versions, targets)
    doc["targets"] = {t.name: {"description": t.description, "error": t.error} for t in targets}
    gws = {t.name: t.pid for t in targets if isinstance(t, GatewayTarget) and t.pid and not t.error}
    rss: dict[str, dict] = {n: {} for n in gws}
    doc["rss"] = rss
    time.sleep(1.0 if gws else 0)
    for n, pid in gws.items():
        rss[n]["before_kib"] = proc_status_kib(pid)
    sampler = RSSSampler(gws) if "rss" in args.only and gws else None
    if sampler:
        sampler.start()

    def run(t: Target, section: str, fn: Callable[[], dict], res: dict) -> None:
        if t.error:
            return
        log(f"rep {rep}: {section:<6} {t.name}")
        s0 = cpu_snapshot(t)
        try:
            res[t.name][section] = r = fn()
            r.setdefault("cpu", cpu_delta(t, s0))
        except ERRORS as e:
            res[t.name][section] = {"error": f"{type(e).__name__}: {e}"}
            log(f"rep {rep}: {section} {t.name} FAILED: {type(e).__name__}: {e}")
            if isinstance(t, GatewayTarget) and not t.alive():
                t.error = f"gateway died (exit {t.proc.returncode if t.proc else '?'}); " \
                          f"log tail:\n{t.log_tail()}"
                doc["targets"][t.name]["error"] = t.error
        t.track()

    for rep in range(1, args.reps + 1):
        shift = (rep - 1) % max(1, len(targets))
        order = targets[shift:] + targets[:shift]
        res: dict[str, Any] = {t.name: {} for t in targets}
        res["rep"], res["order"], res["loadavg_before"] = rep, [t.name for t in order], os.getloadavg()
        doc["runs"].append(res)
        if "start" in args.only:
            for t in order:
                run(t, "start", functools.partial(sec_start, t, args), res)
        main_k: dict[str, Kernel] = {}
        if {"rtt", "iopub", "stream"} & set(args.only):
            for t in order:
                if t.error:
                    continue
                try:
                    main_k[t.name] = t.start_kernel(ready_iopub=True, timeout=args.timeout)
                except ERRORS as e:
                    res[t.name]["main_kernel_error"] = f"{type(e).__name__}: {e}"
                    log(f"rep {rep}: {t.name}: main kernel failed: {e}")
            try:
                for section, fn in (("rtt", sec_rtt), ("iopub", sec_iopub), ("stream", sec_stream)):
                    if section not in args.only:
                        continue
                    for t in order:
                        if t.name in main_k:
                            run(t, section, functools.partial(fn, main_k[t.name], args), res)
            finally:
                for name, k in main_k.items():
                    try:
                        k.delete()
                    except ERRORS as e:
                        log(f"{name}: delete of main kernel failed: {e}")
        paced = functools.partial(sec_conc, rate=args.paced_rate)
        target_sections: tuple[tuple[str, Callable[[Target, argparse.Namespace], dict]], ...] = (
            ("buffers", sec_buffers), ("conc", sec_conc), ("paced", paced))
        for section, target_fn in target_sections:
            if section in args.only:
                for t in order:
                    run(t, section, functools.partial(target_fn, t, args), res)
        res["loadavg_after"] = os.getloadavg()
        for n, pid in gws.items():
            res[n]["rss_after_rep_kib"] = proc_status_kib(pid)
    if sampler:
        peaks = sampler.stop()
        time.sleep(1.0)  # let the gateways settle after the last DELETE
        for n, pid in gws.items():
            rss[n].update({"peak_kib": peaks[n], "hwm_kib": proc_status_kib(pid, "VmHWM"),
                           "after_kib": proc_status_kib(pid)})


def cleanup(doc: dict, ctx: zmq.Context) -> dict:
    """Stop every target, then check that no process we saw is left running."""
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a 2nd Ctrl-C must not stop this
    try:
        for t in doc.get("_targets", []):
            try:
                t.stop()
            except ERRORS as e:
                log(f"{t.name}: stop failed: {e}")
        deadline = time.monotonic() + 10
        left = TRACKER.alive()
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = TRACKER.alive()
        report: dict[str, Any] = {"tracked": len(TRACKER.procs),
                  "left_after_stop": [f"{pid} {label}" for pid, label in left]}
        for pid, label in left:
            log(f"cleanup: still running after stop, SIGKILL: {pid} {label}")
            kill_group_or_pid(pid, signal.SIGKILL)
        time.sleep(0.5 if left else 0)
        report["left_after_kill"] = [f"{pid} {label}" for pid, label in TRACKER.alive()]
        runtime = Path(doc["workdir"]) / "runtime"
        report["connection_files_left"] = sorted(
            str(p.relative_to(runtime)) for p in runtime.rglob("*") if p.is_file())
        ctx.destroy(linger=0)
        log(f"cleanup: {report['tracked']} processes tracked, "
            f"{len(report['left_after_stop'])} needed SIGKILL, "
            f"{len(report['left_after_kill'])} still alive")
        return report
    finally:
        signal.signal(signal.SIGINT, old)


def install_stop_signals() -> None:
    """Ctrl-C, SIGTERM and SIGHUP all raise KeyboardInterrupt, so every cleanup path runs."""
    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if inherited as ignored
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)


def main(argv: list[str] | None = None) -> int:
    """Run everything; return the exit status."""
    args = parse_args(argv)
    install_stop_signals()
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="egdbench-"))
    ctx = zmq.Context()
    doc: dict[str, Any] = {"tool": "egdbench", "started": datetime.datetime.now().isoformat(
        timespec="seconds"), "params": {k: (str(v) if isinstance(v, Path) else v)
                                        for k, v in vars(args).items()},
        "workdir": str(workdir), "runs": []}
    status = 2
    try:
        run_benchmark(args, ctx, workdir, doc)
        status = 0
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        status = 130
    except Exception as e:  # reported, then cleanup and the table
        log(f"benchmark failed: {type(e).__name__}: {e}")
        doc["error"] = f"{type(e).__name__}: {e}"
    finally:
        doc["cleanup"] = cleanup(doc, ctx)
    targets: list[Target] = doc.pop("_targets", [])
    names = [t.name for t in targets]
    for t in targets:
        entry = doc.setdefault("targets", {}).setdefault(t.name, {"description": t.description})
        entry.update(error=t.error, pid=t.pid, **t.info)
        if isinstance(t, GatewayTarget):
            entry["cmd"] = t.cmd
    summary = summarize_runs(doc["runs"], names, doc.get("rss", {}))
    checks = evaluate_checks(summary, doc["runs"], args.only)
    doc.update(summary_median_of_reps=summary, checks=checks)
    doc.setdefault("env", environment(None))
    if names:
        print_report({"env": doc["env"], "params": doc["params"], "targets": doc["targets"]},
                     summary, checks, names)
    errors = [f"rep {r['rep']} {n} {s}: {v['error'] if isinstance(v, dict) else v}"
              for r in doc["runs"] for n in names for s, v in r.get(n, {}).items()
              if (isinstance(v, dict) and v.get("error")) or s == "main_kernel_error"]
    for err in errors:
        print(f"ERROR {err}")
    if doc["cleanup"].get("left_after_stop"):
        print(f"WARNING processes left after stopping the targets (killed): "
              f"{doc['cleanup']['left_after_stop']}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        log(f"wrote {args.json_out}")
    failed_gw = any(t.error for t in targets) or bool(errors)
    if args.keep_logs or failed_gw or status != 0:
        print(f"gateway logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    if status == 0:
        status = 0 if checks and all(c["verdict"] == "PASS" for c in checks) else 1
    return status


if __name__ == "__main__":
    sys.exit(main())
