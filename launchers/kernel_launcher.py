"""egd's kernel launcher: runs beside a remote kernel, reports where it listens, relays control requests.

Standard library only; it never imports egd, because it runs on hosts where only a Python exists. It starts
any kernel that reads a Jupyter connection file (ipykernel, IRkernel, Deno, ...): nothing in it is specific to
one kernel.
The protocol is documented in ``docs/launcher-protocol.rst``. In short:

1. The gateway starts ``python kernel_launcher.py --kernel-id ID --callback HOST:PORT [...] -- KERNEL ARGV``
   and writes one JSON line on its stdin: ``{"secret": ..., "key": ...}`` (never on a command line, so ``ps``
   on the host does not show them). ``secret`` authenticates this launch; ``key`` is the kernel's message
   signing key, which the gateway created.
2. The launcher detaches (its own session, output to a log file on this host), binds its control port,
   chooses the kernel's five ports (free ones, inside ``--port-range`` when given), writes the connection file,
   starts the kernel and waits until it listens on all five. A port another program took in between (the
   pick-then-release race) starts the kernel again with fresh ports, a bounded number of times.
3. It connects to the gateway's callback address and sends a ``ready`` message signed with the secret: the
   address the gateway can reach it at (the local address of that very connection, never 0.0.0.0), the five
   ports, its control port, pids. A kernel that fails to start is reported as ``failed`` with the tail of its
   output; a kernel that ends later as ``exited``.
4. It serves signed control requests (``ping``, ``signal``, ``shutdown``) on its control port until the kernel
   ends, then exits. Every message carries a nonce and a timestamp; replays and stale messages are refused.
   The control port is served by one non-blocking select loop: every connection has a total deadline and a
   size limit, so no peer (silent, slow, oversized, hostile) holds it, and nothing a peer sends can end it.
   The kernel dies with its launcher (``PR_SET_PDEATHSIG``): a killed launcher never leaves a kernel running
   that no one can control; the gateway's heartbeat notices the end.

With ``--exec`` it reads the same secrets, detaches the same way, then replaces itself with the command (for
kernel launchers of their own, such as Enterprise Gateway's): no connection file, callback or control port.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

if __package__:  # imported: egd.launchers, installed with egd
    from . import launcher_protocol as _protocol
    from .launcher_protocol import MAX_LINE, NonceCache, parse_message, sign, verify
else:  # run as a script on a host: the protocol module lies beside this file
    import launcher_protocol as _protocol  # type: ignore[no-redef]
    from launcher_protocol import MAX_LINE, NonceCache, parse_message, sign, verify  # type: ignore[no-redef]
#: Where the protocol module was found: the SparkSession module travels with it (Spark's ``--py-files``).
_protocol_file: str | None = getattr(_protocol, "__file__", None)

#: A control connection must deliver its whole request within this many seconds (a total, not per recv).
CONTROL_DEADLINE = 2.0
#: Control connections served at once, in all and per peer address; beyond that the oldest is dropped.
MAX_CONTROL_CONNECTIONS = 64
MAX_CONTROL_PER_PEER = 16
LOG_NAME = "egd-kernel-{kernel_id}.log"
#: The kernel's five ports, as its connection file names them.
PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
#: Starts of a kernel with fresh ports when a port chosen for it was taken by another program before it bound it.
PORT_ATTEMPTS = 4
#: How often a starting kernel's ports are checked (seconds).
PORT_POLL = 0.02
#: Every how many checks the socket tables are read while the kernel is still binding (each read costs
#: milliseconds of CPU, which the starting kernel needs); once all its ports accept, at every check.
TABLE_EVERY = 5
#: ``--spark-session`` modes (``lazy_spark.MODES``; this file must not import it: it runs in the kernel).
SPARK_MODES = ("lazy", "eager", "none")
#: The module that builds the SparkSession in the kernel, beside this file.
SPARK_MODULE = "lazy_spark.py"
#: The kernel's startup file: loads that module under a name of its own (the user's ``import`` of a module called
#: ``lazy_spark`` must not find it), and leaves only ``spark`` and ``sc`` in the user's namespace.
SPARK_STARTUP = """def _egd_spark_session():
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("egd_lazy_spark", {module!r})
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["egd_lazy_spark"] = module
    module.install({mode!r}, get_ipython().user_ns, get_ipython())
try:
    _egd_spark_session()
finally:
    del _egd_spark_session
"""
#: strerror(EADDRINUSE), as a kernel that could not bind writes it (ZeroMQ, Python, R, Go and most runtimes).
ADDRESS_IN_USE = b"Address already in use"


# -- the launcher ---------------------------------------------------------------------------------------

def _log(text: str) -> None:
    sys.stderr.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} egd-launcher[{os.getpid()}]: {text}\n")
    sys.stderr.flush()


class _Throttled:
    """Log lines about peers, at most ``limit`` per ``window`` seconds: a flood of hostile connections must not
    fill the host's disk with the launcher's log. What was left out is counted in the next line written."""

    def __init__(self, limit: int = 20, window: float = 60.0) -> None:
        self._limit, self._window = limit, window
        self._start, self._written, self._skipped = 0.0, 0, 0

    def __call__(self, text: str) -> None:
        now = time.monotonic()
        if now - self._start >= self._window:
            self._start, self._written = now, 0
        if self._written >= self._limit:
            self._skipped += 1
            return
        self._written += 1
        if self._skipped:
            text += f" ({self._skipped} similar lines left out)"
            self._skipped = 0
        _log(text)


#: The log of refused and dropped control connections.
_peer_log = _Throttled()


def _parse_range(text: str | None) -> tuple[int, int] | None:
    if not text or text == "0..0":
        return None
    low, _, high = text.partition("..")
    lo, hi = int(low), int(high)
    if not 1024 <= lo < hi <= 65535:
        raise ValueError(f"bad port range {text}")
    return lo, hi


def _bind_control(ip: str, port_range: tuple[int, int] | None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if port_range is None:
        sock.bind((ip, 0))
    else:
        ports = list(range(port_range[0], port_range[1] + 1))
        for port in secrets.SystemRandom().sample(ports, min(len(ports), 200)):
            try:
                sock.bind((ip, port))
                break
            except OSError:
                continue
        else:
            raise OSError(f"no free control port in {port_range[0]}..{port_range[1]}")
    sock.listen(16)
    return sock


def _read_secrets(timeout: float, path: str | None) -> dict[str, Any]:
    """The launch secrets: one JSON line on stdin, or in ``path`` (a file YARN localized for this container)."""
    if path:
        with open(path, "rb") as handle:
            line = handle.read(MAX_LINE)
    else:
        ready, _, _ = select.select([sys.stdin.buffer], [], [], timeout)
        if not ready:
            raise TimeoutError("no launch secrets on stdin")
        line = sys.stdin.buffer.readline(MAX_LINE)
    data = json.loads(line)
    if not isinstance(data, dict) or not isinstance(data.get("secret"), str) or not isinstance(data.get("key"), str):
        raise ValueError("stdin must carry {\"secret\": ..., \"key\": ...}")
    env = data.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ValueError("env must map names to strings")
    return data


def _kernel_command(argv: list[str], connection_file: str) -> list[str]:
    return [a.replace("{connection_file}", connection_file) for a in argv]


def _pick_ports(ip: str, port_range: tuple[int, int] | None, exclude: set[int]) -> list[int]:
    """Five distinct ports that ``ip`` can bind right now (inside ``port_range`` when given), none in ``exclude``.

    The probes are closed before the kernel starts, so another program may take a port in between (the
    pick-then-release race every kernel that reads its ports from its connection file is exposed to): the
    caller checks who listens on them, and starts the kernel again with fresh ports if someone else does.
    """
    probes: list[socket.socket] = []
    try:
        if port_range is None:
            candidates: list[int] = [0] * (len(PORT_NAMES) * 4)
        else:
            everything = range(port_range[0], port_range[1] + 1)
            candidates = secrets.SystemRandom().sample(everything, min(len(everything), 1000))
        for candidate in candidates:
            if len(probes) == len(PORT_NAMES):
                break
            if candidate in exclude:
                continue
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                probe.bind((ip, candidate))
            except OSError:
                probe.close()
                continue
            probes.append(probe)  # held until all five are chosen: port 0 never hands out one port twice
            if probe.getsockname()[1] in exclude:
                probes.pop().close()
        if len(probes) < len(PORT_NAMES):
            where = f"in {port_range[0]}..{port_range[1]}" if port_range else "on this host"
            raise OSError(f"no {len(PORT_NAMES)} free ports for the kernel {where}")
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


_TCP_LISTEN = "0A"  # the state column of /proc/net/tcp


def _listeners(ports: set[int]) -> dict[int, set[int]] | None:
    """The inodes of the sockets listening on each of ``ports`` (any address), None where ``/proc/net/tcp`` is
    not readable (not Linux)."""
    found: dict[int, set[int]] = {}
    readable = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as handle:
                rows = handle.read().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for row in rows:
            fields = row.split()
            if len(fields) >= 10 and fields[3] == _TCP_LISTEN:
                port = int(fields[1].rsplit(":", 1)[1], 16)
                if port in ports:
                    found.setdefault(port, set()).add(int(fields[9]))
    return found if readable else None


def _kernel_sockets(root: int, session: bool) -> set[int] | None:
    """The inodes of the sockets held by process ``root``, its descendants (a kernel may bind in a child, as a
    wrapper script's interpreter does) and, with ``session``, every process of the session it leads (a child
    that detached from its parent stays there); None where ``/proc`` cannot tell."""
    children: dict[int, list[int]] = {}
    members: list[int] = []
    try:
        entries = [int(e) for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return None
    for pid in entries:
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            parent, sid = int(fields[1]), int(fields[3])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(pid)
        if session and sid == root:
            members.append(pid)
    inodes: set[int] = set()
    todo, seen = [root, *members], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo.extend(children.get(pid, ()))
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            if pid == root:
                return None
            continue
        for name in names:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(int(link[8:-1]))
    return inodes


def _accepts(ip: str, port: int) -> bool:
    """Whether ``ip:port`` accepts a TCP connection (closed at once: ZeroMQ drops a peer that never greets)."""
    try:
        with socket.create_connection((ip, port), timeout=1.0):
            return True
    except OSError:
        return False


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _output_since(path: str, offset: int) -> bytes:
    """What was written to ``path`` after ``offset`` (at most its last 64 KiB)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(offset, _size(path) - 65536))
            return handle.read()
    except OSError:
        return b""


def _die_with_parent(parent: int) -> Any:
    """A ``preexec_fn`` that makes the child get SIGKILL when this launcher dies (Linux ``PR_SET_PDEATHSIG``),
    with SIGINT (the interrupt) at its default.

    A launcher killed with SIGKILL cannot take its kernel along, and a kernel without its launcher cannot be
    interrupted or stopped by the gateway: it must not run on as an orphan that still answers heartbeats.
    SIGINT ignored is inherited across exec: a launcher started from a shell's background job (a NodeManager or
    sshd started with ``&``) would start kernels that cannot be interrupted, unless they set a handler themselves
    as ipykernel does (a JVM such as Toree's does not). The launcher is single-threaded, so a ``preexec_fn`` is
    safe here.
    """
    try:
        import ctypes

        prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
    except (ImportError, OSError, AttributeError):
        prctl = None

    def arm() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if prctl is not None:
            prctl(1, signal.SIGKILL, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the launcher died before the request took effect
                os._exit(1)

    return arm


def _send_quietly(conn: socket.socket, data: bytes) -> None:
    """Send a short answer on a fresh non-blocking connection (it fits the empty send buffer) and close it."""
    try:
        conn.send(data)
    except OSError:
        pass
    finally:
        conn.close()


class _ControlConnections:
    """The control connections being read: each with its total deadline, its buffer and its peer address."""

    def __init__(self) -> None:
        self._open: dict[socket.socket, tuple[float, bytearray, str]] = {}

    def sockets(self) -> list[socket.socket]:
        """The connections to watch."""
        return list(self._open)

    def timeout(self, now: float, idle: float) -> float:
        """How long select may wait: until the nearest deadline, at most ``idle``."""
        nearest = min((deadline for deadline, _, _ in self._open.values()), default=now + idle)
        return max(0.0, min(idle, nearest - now))

    def _drop(self, conn: socket.socket, why: str) -> None:
        _, _, peer = self._open.pop(conn)
        _peer_log(f"dropped a control connection from {peer}: {why}")
        conn.close()

    def expire(self, now: float) -> None:
        """Drop the connections past their deadline."""
        for conn, (deadline, _, _) in list(self._open.items()):
            if now >= deadline:
                self._drop(conn, f"no complete request within {CONTROL_DEADLINE:g}s")

    def accept(self, control: socket.socket, now: float) -> None:
        """Accept every pending connection; beyond the limits the oldest (of that peer, else of all) goes."""
        while True:
            try:
                conn, address = control.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # for example out of file descriptors: the others are still served
                _peer_log(f"cannot accept a control connection: {exc}")
                return
            conn.setblocking(False)
            peer = str(address[0])
            mine = [c for c, (_, _, p) in self._open.items() if p == peer]
            if len(mine) >= MAX_CONTROL_PER_PEER:
                self._drop(mine[0], "too many connections from this address")
            elif len(self._open) >= MAX_CONTROL_CONNECTIONS:
                self._drop(next(iter(self._open)), "too many connections")
            self._open[conn] = (now + CONTROL_DEADLINE, bytearray(), peer)

    def read(self, ready: list[socket.socket]) -> list[tuple[socket.socket, bytes, str]]:
        """Read what the ready connections sent; ``(connection, line, peer)`` of each complete request (no
        longer tracked: the caller answers and closes it)."""
        complete = []
        for conn in ready:
            if conn not in self._open:
                continue
            try:
                data = conn.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                self._drop(conn, str(exc))
                continue
            _, buffer, peer = self._open[conn]
            buffer += data
            end = buffer.find(b"\n")
            if end >= 0 and end <= MAX_LINE:
                del self._open[conn]
                complete.append((conn, bytes(buffer[:end]), peer))
            elif len(buffer) > MAX_LINE:
                self._drop(conn, f"request longer than {MAX_LINE} bytes")
            elif not data:
                self._drop(conn, "closed before a complete request")
        return complete

    def close_all(self) -> None:
        """Close every connection (the launcher ends)."""
        for conn in self._open:
            conn.close()
        self._open.clear()


def _pidfd(pid: int) -> int | None:
    """A descriptor readable when ``pid`` exits (its end is seen at once rather than at the next poll), or None
    where the platform has none."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 8192))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Launcher:
    """One kernel's launcher process (after it has detached)."""

    def __init__(self, args: argparse.Namespace, secret: bytes, key: str, log_path: str,
                 env: dict[str, str] | None = None) -> None:
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.kernel_id: str = args.kernel_id
        self.secret = secret
        self.key = key
        self.log_path = log_path
        host, _, port = args.callback.rpartition(":")
        self.callback = (host.strip("[]"), int(port))
        self.port_range = _parse_range(args.port_range)
        self.nonces = NonceCache()
        self.kernel: subprocess.Popen[bytes] | None = None
        #: Where the current kernel's output starts in ``kernel_log`` (what an attempt wrote is read from there).
        self.output_offset = 0
        self.workdir = tempfile.mkdtemp(prefix=f"egd-kernel-{self.kernel_id[:8]}-")
        # Detached, the kernel shares the launcher's log file; in the foreground (YARN) it gets its own, whose
        # tail goes into failure reports and, at the end, into the container's log.
        self.kernel_log = os.path.join(self.workdir, "kernel.log") if args.foreground else log_path

    def report(self, message: dict[str, Any], attempts: int = 3) -> dict[str, Any] | None:
        """Send a signed message to the gateway's callback address; its JSON answer, or None."""
        payload = json.dumps(sign(dict(message, kernel_id=self.kernel_id), self.secret)).encode() + b"\n"
        for attempt in range(attempts):
            try:
                with socket.create_connection(self.callback, timeout=10) as conn:
                    conn.sendall(payload)
                    answer = conn.makefile("rb").readline(MAX_LINE)
                    parsed = parse_message(answer)
                    return parsed if isinstance(parsed, dict) else None
            except (OSError, ValueError) as exc:
                _log(f"callback to {self.callback[0]}:{self.callback[1]} failed ({exc}); attempt {attempt + 1}")
                time.sleep(0.5 * (attempt + 1))
        return None

    def reachable_ip(self) -> str:
        """The address of this host on the route to the gateway: where the gateway can reach the kernel."""
        return route_ip(self.args.callback)

    def start_kernel(self, control_port: int) -> dict[str, Any]:
        """Choose the kernel's ports, write its connection file, start it and wait until it listens on all five;
        the connection info. Works for any kernel that reads its connection file (ipykernel, IRkernel, ...).

        A port chosen here may be taken by another program before the kernel binds it: then (another process
        listens on it, or the kernel says ``Address already in use``) the kernel is killed and started again
        with fresh ports, up to ``PORT_ATTEMPTS`` times in all, each logged. Any other failure (the kernel
        exits, or does not listen within the startup timeout) raises at once, for a ``failed`` report."""
        deadline = time.monotonic() + self.args.startup_timeout
        why = ""
        for attempt in range(1, PORT_ATTEMPTS + 1):
            ports = _pick_ports(self.args.bind_ip, self.port_range, {control_port})
            info = {"transport": "tcp", "ip": self.args.bind_ip, "key": self.key, "signature_scheme": "hmac-sha256",
                    **dict(zip(PORT_NAMES, ports, strict=True)), "kernel_name": self.args.kernel_name}
            self._spawn(self._write_connection_file(info))
            why = self._await_ports(ports, deadline)
            if not why:
                return info
            again = "; starting the kernel again with fresh ports" if attempt < PORT_ATTEMPTS else ""
            _log(f"attempt {attempt} of {PORT_ATTEMPTS}: {why} (ports {ports}){again}")
            self._kill_kernel()
        raise RuntimeError(f"the kernel could not bind its ports in {PORT_ATTEMPTS} attempts: {why}")

    def _write_connection_file(self, info: dict[str, Any]) -> str:
        """Write the connection file (0600, in the private directory; a fresh one each attempt), its path."""
        path = os.path.join(self.workdir, f"kernel-{self.kernel_id}.json")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(info, handle)
        return path

    def _spawn(self, connection_file: str) -> None:
        """Start the kernel with ``connection_file``; its output goes to ``kernel_log``."""
        argv = list(self.args.kernel_argv)
        if self.args.foreground and argv and argv[0] in ("python", "python3"):
            argv[0] = sys.executable  # the Python the resource manager started this launcher with
        command = _kernel_command(argv, connection_file)
        if self.args.spark_session != "none":
            command += [f"--IPKernelApp.exec_files={self._spark_startup()}"]
        _log(f"starting kernel: {command[0]} ... ({len(command)} arguments)")
        cwd = self.args.working_dir if self.args.working_dir and os.path.isdir(self.args.working_dir) else None
        output: Any = sys.stderr
        if self.args.foreground:
            output = open(self.kernel_log, "ab")
        self.output_offset = _size(self.kernel_log)
        try:
            # Detached, the kernel gets its own session so the launcher can signal all of it; in the foreground
            # it stays in the container's process group, which the resource manager kills as a whole.
            self.kernel = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output, stderr=output,
                                           start_new_session=not self.args.foreground, cwd=cwd, env=self.env,
                                           preexec_fn=_die_with_parent(os.getpid()))
        finally:
            if output is not sys.stderr:
                output.close()

    def _await_ports(self, ports: list[int], deadline: float) -> str:
        """Wait until the kernel listens on all of ``ports`` (they accept TCP connections, and where ``/proc``
        tells, the listening sockets are the kernel's): "" then. Why the ports must be chosen again when one
        was taken by another program. Raises when the kernel exits or the deadline passes."""
        assert self.kernel is not None
        probe_ip = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.args.bind_ip, self.args.bind_ip)
        wanted = set(ports)
        checks = 0
        while True:
            checks += 1
            code = self.kernel.poll()
            if ADDRESS_IN_USE in _output_since(self.kernel_log, self.output_offset):
                return "a port was taken before the kernel bound it (Address already in use)"
            accepting = code is None and all(_accepts(probe_ip, port) for port in ports)
            if code is None and not accepting and checks % TABLE_EVERY != 1:
                self._check_deadline(deadline)
                time.sleep(PORT_POLL)
                continue
            listening = _listeners(wanted)
            if code is not None:
                if listening:  # someone else listens on a port of a kernel that is gone: it could not bind
                    return f"the kernel exited with code {code}; another program listens on port {min(listening)}"
                raise RuntimeError(f"kernel exited with code {code} before it listened on its ports")
            owned = (_kernel_sockets(self.kernel.pid, session=not self.args.foreground)
                     if listening is not None else None)
            if listening is not None and owned is not None:
                # The table is read before the kernel's descriptors: a listener of the kernel is already among
                # them, so a listener that is not belongs to another program.
                foreign = sorted(p for p, inodes in listening.items() if not inodes & owned)
                if foreign:
                    return f"another program listens on port {foreign[0]}"
                bound = set(listening) == wanted
            else:
                bound = True  # this host cannot tell whose sockets they are: the connections alone decide
            if bound and accepting:
                return ""
            self._check_deadline(deadline)
            time.sleep(PORT_POLL)

    def _check_deadline(self, deadline: float) -> None:
        """Raise once the kernel's startup timeout has passed."""
        if time.monotonic() >= deadline:
            raise TimeoutError(f"kernel did not listen on its ports within {self.args.startup_timeout:g}s")

    def _kill_kernel(self) -> None:
        """Kill a kernel that will not be handed out, and reap it."""
        if self.kernel is not None and self.kernel.poll() is None:
            self.signal_kernel(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.kernel.wait(10)

    def _spark_startup(self) -> str:
        """A startup file that gives the kernel ``spark``/``sc`` (a SparkSession in the JVM that runs this
        launcher) as ``--spark-session`` says: built in the background (``lazy``) or before the kernel answers
        (``eager``), by ``lazy_spark.py``, which lies beside this file or beside the protocol module (YARN puts
        what Spark ships with ``--py-files`` into ``__pyfiles__``)."""
        folders = [os.path.dirname(os.path.abspath(path)) for path in (__file__, _protocol_file) if path]
        module = next((p for p in (os.path.join(f, SPARK_MODULE) for f in folders) if os.path.isfile(p)),
                      os.path.join(folders[0], SPARK_MODULE))
        path = os.path.join(self.workdir, "spark_session.py")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(SPARK_STARTUP.format(module=module, mode=self.args.spark_session))
        return path

    def signal_kernel(self, signum: int) -> bool:
        """Signal the kernel's process group; False if it is gone."""
        if self.kernel is None or self.kernel.poll() is not None:
            return False
        try:
            if self.args.foreground:
                os.kill(self.kernel.pid, signum)
            else:
                os.killpg(self.kernel.pid, signum)
        except ProcessLookupError:
            return False
        return True

    def answer(self, line: bytes, peer: str) -> tuple[bytes, bool]:
        """The answer line to one control request, and whether the launcher should stop. Never raises: whatever
        a peer sends is refused with a reason in the log."""
        try:
            request = parse_message(line)
            why = verify(request, self.secret, self.nonces)
            if why is None and request.get("kernel_id") != self.kernel_id:
                why = "wrong kernel id"
            if why is not None:
                _peer_log(f"refused a control request from {peer}: {why}")
                return json.dumps({"ok": False, "error": why}).encode() + b"\n", False
            answer, stop = self._carry_out(request)
            return json.dumps(sign(answer, self.secret)).encode() + b"\n", stop
        except Exception as exc:  # a hostile request must never end the launcher
            _peer_log(f"refused a control request from {peer}: {type(exc).__name__}")
            return json.dumps({"ok": False, "error": "malformed request"}).encode() + b"\n", False

    def _carry_out(self, request: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Carry out an authentic request (``ping``, ``signal``, ``shutdown``): the answer, and whether the
        launcher should stop."""
        op, signum = request.get("op"), request.get("signum", 0)
        alive = self.kernel is not None and self.kernel.poll() is None
        answer: dict[str, Any] = {"ok": True, "op": op, "reply_to": request["nonce"], "alive": alive}
        if op == "shutdown":
            self.signal_kernel(signal.SIGKILL)
            return answer, True
        if op == "signal":
            if isinstance(signum, bool) or not isinstance(signum, int) or (
                    signum and signum not in signal.valid_signals()):
                return {"ok": False, "error": "signum: a signal number", "reply_to": request["nonce"]}, False
            answer["delivered"] = self.signal_kernel(signum) if signum else alive
        elif op != "ping":
            answer = {"ok": False, "error": f"unknown op {str(op)[:20]!r}", "reply_to": request["nonce"]}
        return answer, False

    def _stopped(self) -> int:
        """The kernel's exit code after a ``shutdown`` (it was sent SIGKILL; -9 if it does not end in time)."""
        assert self.kernel is not None
        try:
            self.kernel.wait(10)
        except subprocess.TimeoutExpired:
            pass
        return self.kernel.returncode if self.kernel.returncode is not None else -9

    def serve(self, control: socket.socket) -> int:
        """Serve control requests until the kernel ends; its exit code.

        One select loop over the listening socket and every open connection, all non-blocking: a connection
        must deliver its request line (at most ``MAX_LINE`` bytes) within ``CONTROL_DEADLINE`` seconds in all,
        or it is dropped; so a silent, slow or oversized peer delays no other request.
        """
        assert self.kernel is not None
        control.setblocking(False)
        pidfd = _pidfd(self.kernel.pid)
        conns = _ControlConnections()
        try:
            while True:
                code = self.kernel.poll()
                if code is not None:
                    return code
                now = time.monotonic()
                conns.expire(now)
                watched: list[Any] = [control, *conns.sockets()]
                if pidfd is not None:
                    watched.append(pidfd)
                ready, _, _ = select.select(watched, [], [], conns.timeout(now, 0.5))
                if control in ready:
                    conns.accept(control, time.monotonic())
                for conn, line, peer in conns.read([r for r in ready if isinstance(r, socket.socket)]):
                    reply, stop = self.answer(line, peer)
                    _send_quietly(conn, reply)
                    if stop:
                        return self._stopped()
        finally:
            conns.close_all()
            if pidfd is not None:
                os.close(pidfd)

    def run(self) -> int:
        """Start, report, serve, report the end."""
        # Told to stop (by the gateway over ssh, or by the host): take the kernel along, never orphan it, and
        # leave no connection file (it holds the kernel's key) behind.
        signal.signal(signal.SIGTERM, lambda *_: self._terminate())
        try:
            control = _bind_control(self.args.bind_ip, self.port_range)
            ports = self.start_kernel(control.getsockname()[1])
        except Exception as exc:  # every failure is reported to the gateway
            _log(f"launch failed: {exc}")
            self._kill_kernel()
            self.report({"type": "failed", "reason": f"{exc}\n{_tail(self.kernel_log)}"})
            return 1
        assert self.kernel is not None
        info = {name: ports[name] for name in PORT_NAMES}
        info.update(ip=self.reachable_ip(), transport="tcp", signature_scheme="hmac-sha256",
                    launcher_port=control.getsockname()[1], pid=self.kernel.pid, launcher_pid=os.getpid(),
                    hostname=socket.gethostname(), log=self.log_path)
        answer = self.report({"type": "ready", "info": info})
        if not answer or not answer.get("ok"):
            _log(f"the gateway did not accept this kernel ({answer}); stopping it")
            self.signal_kernel(signal.SIGKILL)
            return 1
        _log(f"kernel pid {self.kernel.pid} ready on {info['ip']}; launcher port {info['launcher_port']}")
        code = self.serve(control)
        _log(f"kernel ended with code {code}")
        self.report({"type": "exited", "code": code}, attempts=2)
        return 0

    def _terminate(self) -> None:
        """SIGTERM: kill the kernel, remove the private directory, end now."""
        self.signal_kernel(signal.SIGKILL)
        try:
            self.cleanup()
        finally:
            os._exit(1)

    def cleanup(self) -> None:
        """Remove the private directory with the connection file (the kernel's own log goes to stderr first)."""
        if self.kernel_log != self.log_path:
            _log(f"the kernel's output ended with:\n{_tail(self.kernel_log, 40)}")
        shutil.rmtree(self.workdir, ignore_errors=True)


def route_ip(callback: str) -> str:
    """The address of this host on the route to ``HOST:PORT`` (where a peer there sees this host's connections
    come from), found without sending anything."""
    host, _, port = callback.rpartition(":")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host.strip("[]"), int(port)))
        return str(probe.getsockname()[0])


def _detach(log_path: str, also: dict[str, Any] | None = None) -> int:
    """Continue in a child of a new session, with output to the log; the parent reports and exits.

    The parent prints ``{"launcher_pid", "log", "started"}`` (and ``also``) once the child closes the pipe returned here
    (close-on-exec): ``started`` is true when the child wrote exactly ``ok`` on it before it closed, so a
    child that goes on to ``exec`` a command confirms the exec itself (a failed exec appends to ``ok``).
    """
    read_end, write_end = os.pipe()  # both ends close-on-exec (PEP 446)
    pid = os.fork()
    if pid > 0:
        os.close(write_end)
        said = b""
        while True:
            chunk = os.read(read_end, 64)
            if not chunk:
                break
            said += chunk
        started = said == b"ok"
        print(json.dumps({"launcher_pid": pid, "log": log_path, "started": started, **(also or {})}), flush=True)
        os._exit(0 if started else 1)
    os.close(read_end)
    os.setsid()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.close(null)
    os.write(write_end, b"ok")
    return write_end


def exec_kernel(args: argparse.Namespace, env: dict[str, str], confirm: int | None) -> int:
    """``--exec``: become the kernel's command (``os.execvpe`` with the merged environment, in ``--working-dir``
    when it exists). Returns only when the exec failed (127, and the pipe to the parent says so)."""
    if args.working_dir and os.path.isdir(args.working_dir):
        os.chdir(args.working_dir)
    _log(f"exec of the kernel: {args.kernel_argv[0]} ... ({len(args.kernel_argv)} arguments)")
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # an inherited "ignore" must not make the kernel deaf to interrupts
    try:
        os.execvpe(args.kernel_argv[0], args.kernel_argv, {**os.environ, **env})
    except OSError as exc:
        _log(f"cannot exec {args.kernel_argv[0]}: {exc}")
        if confirm is not None:
            os.write(confirm, b" failed")
        return 127


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description="egd's kernel launcher (see docs/launcher-protocol.rst)")
    parser.add_argument("--kernel-id", required=True)
    parser.add_argument("--callback", default=None, help="HOST:PORT of the gateway's callback listener")
    parser.add_argument("--port-range", default=None, help="LOW..HIGH for the kernel's and the control port")
    parser.add_argument("--bind-ip", default="0.0.0.0", help="interface the kernel and control port bind")
    parser.add_argument("--kernel-name", default="", help="the kernelspec's name, for the connection file")
    parser.add_argument("--log-dir", default=tempfile.gettempdir())
    parser.add_argument("--working-dir", default=None)
    parser.add_argument("--startup-timeout", type=float, default=60.0)
    parser.add_argument("--stdin-timeout", type=float, default=10.0)
    parser.add_argument("--secrets-file", default=None,
                        help="read the launch secrets from this file instead of stdin (YARN containers)")
    parser.add_argument("--foreground", action="store_true",
                        help="do not detach; the kernel stays in this process group (YARN: the container "
                             "lives as long as this process, and YARN's kill reaches the kernel)")
    parser.add_argument("--spark-session", nargs="?", const="eager", default="none", choices=SPARK_MODES,
                        help="the kernel's SparkSession as `spark` and `sc`: lazy (built in the background, the "
                             "first use waits), eager (built before the kernel is ready; also the flag alone) or "
                             "none")
    parser.add_argument("--exec", action="store_true",
                        help="detach, then become the kernel's command (no connection file, callback or control "
                             "port: the command is a kernel launcher of its own, such as Enterprise Gateway's)")
    parser.add_argument("kernel_argv", nargs=argparse.REMAINDER)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.kernel_argv[:1] == ["--"]:
        args.kernel_argv = args.kernel_argv[1:]
    if not args.kernel_argv:
        parser.error("the kernel's argv must follow --")
    if not args.exec and not args.callback:
        parser.error("--callback is required (unless --exec)")
    try:
        given = _read_secrets(args.stdin_timeout, args.secrets_file)
        _parse_range(args.port_range)
    except (ValueError, TimeoutError, OSError, RecursionError) as exc:
        _log(f"cannot start: {type(exc).__name__}: {exc}")
        return 2
    confirm: int | None = None
    if args.foreground:
        log_path = ""  # stderr is the container's log
    else:
        os.makedirs(args.log_dir, mode=0o700, exist_ok=True)
        log_path = os.path.join(args.log_dir, LOG_NAME.format(kernel_id=args.kernel_id))
        # --exec: the gateway takes the command's own report only from this host's address on the route to it
        confirm = _detach(log_path, {"ip": route_ip(args.callback)} if args.exec and args.callback else None)
    if args.exec:
        return exec_kernel(args, given.get("env") or {}, confirm)
    if confirm is not None:
        os.close(confirm)
    launcher = Launcher(args, given["secret"].encode(), given["key"], log_path, given.get("env"))
    try:
        return launcher.run()
    finally:
        launcher.cleanup()


if __name__ == "__main__":
    sys.exit(main())
