"""Ports for kernels egd starts on this host (part of the driver toolkit, ``docs/writing-a-driver.rst``).

EG lost a kernel in concurrent starts because two launches picked the same free port before either kernel
bound it. Here every port handed out stays reserved until its kernel is gone, so egd never hands the same port
to two kernels. A port another program takes in the meantime makes that kernel fail to bind: the local driver
waits until the kernel's own processes listen on all its ports (:func:`bound_by`, from ``/proc``), and a
kernel that reports ``EADDRINUSE`` instead is stopped at once and started again with fresh ports (a bounded
number of times), instead of waiting out the launch timeout.
"""

from __future__ import annotations

import os
import random
import socket


class PortAllocator:
    """Hands out TCP ports that no other kernel of this gateway holds."""

    def __init__(self, host: str = "127.0.0.1", port_range: tuple[int, int] | None = None) -> None:
        self._host = host
        self._range = port_range
        self._reserved: set[int] = set()

    def _bindable(self, port: int) -> int | None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((self._host, port))
            except OSError:
                return None
            return int(probe.getsockname()[1])

    def allocate(self, count: int) -> list[int]:
        """``count`` distinct ports, reserved until :meth:`release`; ``OSError`` if none can be found."""
        chosen: list[int] = []
        for _ in range(count * 50):
            if len(chosen) == count:
                break
            candidate = random.randint(*self._range) if self._range else 0
            if candidate in self._reserved:
                continue
            port = self._bindable(candidate)
            if port is not None and port not in self._reserved:
                self._reserved.add(port)
                chosen.append(port)
        if len(chosen) < count:
            self.release(chosen)
            raise OSError(f"no free ports for a kernel (range {self._range or 'any'})")
        return chosen

    def hold(self, ports: list[int]) -> None:
        """Mark ports already in use by a kernel this gateway re-attached to as reserved."""
        self._reserved.update(ports)

    def release(self, ports: list[int]) -> None:
        """Give ports back."""
        self._reserved.difference_update(ports)


_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's "st" column


def _listening(ports: set[int]) -> dict[int, set[int]] | None:
    """The socket inodes listening on each of ``ports`` (any address), None without ``/proc/net/tcp``."""
    found: dict[int, set[int]] = {}
    readable = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                rows = handle.read().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for row in rows:
            fields = row.split()
            if len(fields) < 10 or fields[3] != _LISTEN:
                continue
            port = int(fields[1].rsplit(":", 1)[1], 16)
            if port in ports:
                found.setdefault(port, set()).add(int(fields[9]))
    return found if readable else None


def _socket_inodes(pid: int) -> set[int] | None:
    """The inodes of the sockets process ``pid`` holds, None if its descriptors cannot be read."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    inodes = set()
    for name in names:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[8:-1]))
    return inodes


def _session_members(session: int) -> list[int]:
    """The processes of session ``session`` (a kernel's helpers may hold its sockets)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 3 and fields[3] == str(session):
            members.append(int(entry))
    return members


def bound_by(pid: int, ports: list[int]) -> bool | None:
    """Whether process ``pid`` (or a process of the session it leads) listens on every one of ``ports``: True
    when it does, False while it does not (yet), None when this host cannot tell (no ``/proc``, or the process's
    descriptors are not readable). Blocking (``/proc`` reads): call it from a thread."""
    listening = _listening(set(ports))
    if listening is None:
        return None
    if set(listening) != set(ports):
        return False
    owned = _socket_inodes(pid)
    if owned is None:
        return None
    if all(listening[port] & owned for port in ports):
        return True
    for member in _session_members(pid):
        owned |= _socket_inodes(member) or set()
    return all(listening[port] & owned for port in ports)
