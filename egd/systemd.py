"""Running under systemd, without libsystemd: readiness and the watchdog, socket activation, reload on SIGHUP.

- :class:`Notifier` speaks the ``sd_notify`` protocol: one datagram of ``KEY=VALUE`` lines to the AF_UNIX socket
  named by ``$NOTIFY_SOCKET`` (``@`` = abstract namespace). Without that variable every call is a no-op, so
  egd behaves the same outside systemd.
- :class:`Supervisor` tells systemd what egd is doing: ``READY=1`` once every listener listens,
  ``RELOADING=1`` / ``READY=1`` around a reload, ``STOPPING=1`` when shutdown begins, and ``WATCHDOG=1`` every
  half ``$WATCHDOG_USEC`` from the reactor (so a blocked reactor misses its pings and systemd restarts egd).
  On SIGHUP it re-reads the config file egd started with and applies what the running objects read at use
  time (:data:`LIVE_KEYS`); any other change is logged as needing a restart and not applied. A file that
  does not parse or validate is refused with one log line, and the running configuration stays.
- :func:`listen_fds` takes the sockets systemd passes (``$LISTEN_PID``, ``$LISTEN_FDS``, ``$LISTEN_FDNAMES``);
  egd then serves HTTP on the passed socket instead of binding ``server.ip``/``server.port``.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import fields, is_dataclass, replace
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from egd.config import Config, ConfigError

log = Logger(namespace="egd.systemd")

#: Config keys a reload applies to the running gateway: each is read from the config at the moment it is used
#: (a kernel start, a request, a log event), so swapping the config changes behaviour at once. Everything else
#: is held by objects built at start (listeners, TLS, authenticator, drivers, kernelspec store, culler, kernel
#: policy) and needs a restart.
LIVE_KEYS: frozenset[str] = frozenset({
    "logging.level",
    "server.list_kernels",
    "kernels.default_kernel_name",
    "kernels.launch_timeout",
    "kernels.max_launch_timeout",
    "kernels.client_envs",
    "kernels.inherited_envs",
    "kernels.working_dir",
    "kernels.max_kernels",
    "kernels.max_kernels_per_user",
    "kernels.authorized_users",
    "kernels.unauthorized_users",
})

#: Sections whose values may be secrets (tokens, keys, driver passwords): their changed keys are named, never
#: their values. Only LIVE_KEYS are ever shown with values, and none of them is in these sections.
_SECRET_SECTIONS = ("auth", "drivers", "state")
_SD_LISTEN_FDS_START = 3


def _monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, what systemd 253+ wants beside RELOADING=1 (MONOTONIC_USEC)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends ``sd_notify`` messages to ``address`` (a path, or ``@name`` for the abstract namespace); without
    an address, sends nothing."""

    def __init__(self, address: str | None, monotonic_usec: Callable[[], int] = _monotonic_usec) -> None:
        self.address = address or None
        self._monotonic_usec = monotonic_usec
        self._socket: socket.socket | None = None
        self._warned = False
        if self.address is not None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # A full receive queue (systemd busy) must never stall the reactor: drop the message instead.
            self._socket.setblocking(False)

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """The notifier named by ``$NOTIFY_SOCKET`` (a no-op notifier without it)."""
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens."""
        return self._socket is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments as one datagram; False if nobody listens or it could not be sent."""
        if self._socket is None or self.address is None:
            return False
        # Linux abstract socket names start with NUL; systemd writes them with a leading "@".
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            self._socket.sendto("\n".join(assignments).encode("utf-8", "replace"), target)
        except OSError as exc:
            # Never fatal: systemd gone or busy must not take the gateway down; the watchdog will say if it matters.
            # Warned once: a ping every few seconds must not fill the log with the same line.
            quiet = self._warned or exc.errno in (errno.EAGAIN, errno.ENOBUFS)
            self._warned = self._warned or not quiet
            (log.debug if quiet else log.warn)("sd_notify to {address} failed: {why}", address=self.address,
                                               why=exc.strerror or str(exc))
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: the service is up (after start, and after a reload)."""
        return self.notify("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC`` (systemd 253+ matches it with the reload it started)."""
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={self._monotonic_usec()}",
                           *([f"STATUS={_one_line(status)}"] if status else []))

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutdown has begun."""
        return self.notify("STOPPING=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: still alive."""
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        """Close the socket; later calls are no-ops."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def watchdog_interval(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled advises), or None
    when there is no watchdog or it watches another process (``$WATCHDOG_PID``)."""
    env = os.environ if environ is None else environ
    watched = env.get("WATCHDOG_PID")
    if watched and watched != str(os.getpid() if pid is None else pid):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2 / 1_000_000 if usec > 0 else None


def listen_fds(environ: MutableMapping[str, str] | None = None, pid: int | None = None) -> list[tuple[int, str]]:
    """The sockets systemd passed to this process, as ``(fd, name)`` (``sd_listen_fds``); empty without socket
    activation. The ``LISTEN_*`` variables are removed so that no child process takes them for its own, and the
    descriptors are made close-on-exec so that no kernel inherits a listening socket. Call it before anything
    imports ``twisted.internet.endpoints``, which takes ``LISTEN_PID``/``LISTEN_FDS`` for itself at import."""
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid() if pid is None else pid):
        return []  # meant for another process (or absent)
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        count = 0
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    for variable in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(variable, None)
    passed = []
    for index in range(max(count, 0)):
        fd = _SD_LISTEN_FDS_START + index
        os.set_inheritable(fd, False)
        passed.append((fd, names[index] if index < len(names) else "unknown"))
    return passed


def passed_socket(fd: int) -> tuple[socket.AddressFamily, str, int]:
    """Family, host and port of a passed listening TCP socket; ValueError when it is not one egd can serve on."""
    with socket.socket(fileno=os.dup(fd)) as sock:
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
            raise ValueError(f"the socket passed by systemd (fd {fd}) is not a TCP socket (family {sock.family!r}, "
                             f"type {sock.type!r}): use ListenStream=<[address:]port>")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ValueError(f"the socket passed by systemd (fd {fd}) is not listening")
        host, port = sock.getsockname()[:2]
        return sock.family, host, port


def config_changes(old: Config, new: Config) -> list[str]:
    """The dotted keys whose values differ between two configs (``drivers.<name>`` per driver)."""
    changed = []
    for section in fields(Config):
        if section.name == "source":
            continue
        before, after = getattr(old, section.name), getattr(new, section.name)
        if is_dataclass(before) and is_dataclass(after):
            changed += [f"{section.name}.{f.name}" for f in fields(before)
                        if getattr(before, f.name) != getattr(after, f.name)]
        elif isinstance(before, Mapping) and isinstance(after, Mapping):
            changed += [f"{section.name}.{name}" for name in sorted(set(before) | set(after), key=str)
                        if before.get(name) != after.get(name)]
        elif before != after:
            changed.append(section.name)
    return changed


def with_live_keys(running: Config, new: Config, keys: list[str]) -> Config:
    """``running`` with the given :data:`LIVE_KEYS` taken from ``new`` (everything else stays as it runs)."""
    sections: dict[str, dict[str, Any]] = {}
    for key in keys:
        section, name = key.split(".", 1)
        sections.setdefault(section, {})[name] = getattr(getattr(new, section), name)
    return replace(running, **{s: replace(getattr(running, s), **values) for s, values in sections.items()})


def _show(key: str, old: Config, new: Config) -> str:
    section, name = key.split(".", 1)
    if section in _SECRET_SECTIONS:
        return key
    return f"{key} ({getattr(getattr(old, section), name)!r} -> {getattr(getattr(new, section), name)!r})"


class ISupervisorReactor(IReactorThreads, IReactorTime):
    """The reactor the supervisor works with: threads (the SIGHUP handler, reading the config) and time (the
    watchdog)."""


class Supervisor:
    """egd's side of systemd: notifications, the watchdog, and reloading the config on SIGHUP.

    ``gateway`` must offer ``config`` (the running :class:`Config`) and ``reconfigure(config)``; ``load`` reads
    the config as at start (file, environment, command-line flags) and runs in a thread, since it reads files;
    ``set_level`` changes the log level. Everything else runs on the reactor.
    """

    def __init__(self, gateway: Any, reactor: ISupervisorReactor, load: Callable[[], Config],
                 set_level: Callable[[str], None], notifier: Notifier | None = None,
                 environ: Mapping[str, str] | None = None,
                 clock: IReactorTime | None = None, check: Callable[[Config], list[str]] | None = None) -> None:
        self._gateway = gateway
        self._reactor = reactor
        self._load = load
        self._check = check
        self._set_level = set_level
        self.notifier = notifier or Notifier.from_environ()
        interval = watchdog_interval(environ)
        self._watchdog: LoopingCall | None = None
        if interval is not None and self.notifier.enabled:
            self._watchdog = LoopingCall(self.notifier.watchdog)
            self._watchdog.clock = clock or reactor
        self.watchdog_interval = interval
        self._ready = False
        self._stopping = False
        self._status: str | None = None
        self._reloading: Deferred[None] | None = None
        self._reload_again = False

    def install_sighup(self) -> None:
        """Reload on SIGHUP. The handler only schedules the reload on the reactor (signal handlers must not do
        the work), so a SIGHUP at any moment is safe; one that arrives during a reload queues one more."""
        def handler(signum: int, frame: Any) -> None:
            self._reactor.callFromThread(self.request_reload)

        signal.signal(signal.SIGHUP, handler)

    def start_watchdog(self) -> None:
        """Ping from now on (as soon as the reactor runs, not only after READY: systemd may arm the watchdog at
        exec, and a start that re-attaches kernels can take a while). Without WATCHDOG_USEC, nothing."""
        if self._watchdog is not None and self.watchdog_interval is not None and not self._watchdog.running:
            log.info("systemd watchdog: a ping every {interval:.3g}s", interval=self.watchdog_interval)
            self._watchdog.start(self.watchdog_interval, now=True)

    def started(self, status: str) -> None:
        """The gateway listens: ``READY=1``, then a reload asked for during the start, if any."""
        self._ready = True
        self._status = status
        self.notifier.ready(status)
        if self._reload_again:
            self._reload_again = False
            self.request_reload()

    def stopping(self) -> None:
        """Shutdown begins: ``STOPPING=1``. The watchdog keeps pinging while kernels are stopped: the reactor is
        still alive, and systemd bounds the stop with TimeoutStopSec anyway."""
        self._stopping = True
        self.notifier.stopping("stopping: refusing new kernels")

    def stop(self) -> None:
        """The reactor is going away: stop pinging, close the socket."""
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self.notifier.close()

    def request_reload(self) -> Deferred[None] | None:
        """Reload now, or after the start or the reload in progress (several requests make one more reload)."""
        if self._stopping:
            log.info("config reload requested while egd stops: ignored")
            return None
        if not self._ready or self._reloading is not None:
            if not self._reload_again:
                log.info("config reload requested: it will run once the {what} in progress is done",
                         what="reload" if self._ready else "start")
            self._reload_again = True
            return None
        self._reloading = ensureDeferred(self._reload())

        def done(_: Any) -> None:
            self._reloading = None
            if self._reload_again:
                self._reload_again = False
                self.request_reload()

        self._reloading.addBoth(done)
        return self._reloading

    def _read(self) -> Config:
        """Runs in a thread: read and validate the file; every problem raised at once."""
        config = self._load()
        problems = self._check(config) if self._check is not None else []
        if problems:
            raise ConfigError(problems, config.source)
        return config

    async def _reload(self) -> None:
        self.notifier.reloading("reloading the configuration")
        running: Config = self._gateway.config
        try:
            try:
                new = await deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._read)
            except ConfigError as exc:
                log.error("config reload refused, the running configuration stays: {source} has {count} "
                          "problem(s): {problems}", source=exc.source, count=len(exc.problems),
                          problems="; ".join(_one_line(p) for p in exc.problems))
                return
            self._apply(running, new)
        except Exception:
            log.failure("config reload failed, the running configuration stays")
        finally:
            if not self._stopping:  # a stop that began meanwhile has said STOPPING=1: READY would contradict it
                self.notifier.ready(self._status)

    def _apply(self, running: Config, new: Config) -> None:
        changed = config_changes(running, new)
        live = [k for k in changed if k in LIVE_KEYS]
        later = [k for k in changed if k not in LIVE_KEYS]
        if live:
            self._gateway.reconfigure(with_live_keys(running, new, live))
        old_level, new_level = running.logging.level, new.logging.level
        if "logging.level" in live:
            # Log the summary under the more verbose of the two levels, so it shows whichever way the level went.
            order = ["debug", "info", "warn", "error", "critical"]
            self._set_level(min(old_level, new_level, key=order.index))
        if not changed:
            log.info("config reloaded from {source}: nothing changed", source=new.source)
        else:
            log.info("config reloaded from {source}: applied: {applied}; changed but needs a restart (not "
                     "applied): {later}", source=new.source,
                     applied=", ".join(_show(k, running, new) for k in live) or "nothing",
                     later=", ".join(later) or "nothing")
        if "logging.level" in live:
            self._set_level(new_level)


def describe_listener(scheme: str, host: str, port: int, base_url: str) -> str:
    """``scheme://host:port/base`` with IPv6 hosts in brackets (the STATUS text and log lines)."""
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}{base_url}"

