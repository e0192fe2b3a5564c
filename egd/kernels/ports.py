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
import struct


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


_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCP_LISTEN = 10
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
_REQUEST = struct.Struct("=BBBxI48x")  # inet_diag_req_v2: family, protocol, extensions, states, socket id (any)
_DIAG_MSG = struct.Struct("=BBBB2s46xIIIII")  # inet_diag_msg: family..retrans, sport, ..., uid, inode


def _listening_sockets(ports: set[int]) -> dict[int, set[int]] | None:
    """The socket inodes listening on each of ``ports``, asked of the kernel through NETLINK_SOCK_DIAG (only
    listening TCP sockets come back, in binary: with hundreds of kernels ``/proc/net/tcp`` is thousands of rows of
    text the kernel formats on every read); None when netlink cannot answer."""
    found: dict[int, set[int]] = {}
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as sock:
            for sequence, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
                body = _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 1 << _TCP_LISTEN)
                sock.sendto(_HEADER.pack(_HEADER.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST_DUMP,
                                         sequence, 0) + body, (0, 0))
                done = False
                while not done:
                    data = sock.recv(1 << 16)
                    offset = 0
                    while offset + _HEADER.size <= len(data):
                        length, kind, _, _, _ = _HEADER.unpack_from(data, offset)
                        if length < _HEADER.size:
                            return None
                        if kind == _NLMSG_DONE:
                            done = True
                            break
                        if kind == _NLMSG_ERROR:
                            return None
                        if kind == _SOCK_DIAG_BY_FAMILY and length >= _HEADER.size + _DIAG_MSG.size:
                            fields = _DIAG_MSG.unpack_from(data, offset + _HEADER.size)
                            port = int.from_bytes(fields[4], "big")
                            if port in ports:
                                found.setdefault(port, set()).add(fields[-1])
                        offset += (length + 3) & ~3
    except OSError:
        return None
    return found


def _listening(ports: set[int]) -> dict[int, set[int]] | None:
    """The socket inodes listening on each of ``ports`` (any address), None when this host cannot tell: from
    netlink when it answers, else from ``/proc/net/tcp``.

    With hundreds of kernels the tables hold thousands of rows (every kernel's listening ports and egd's
    connections to them), and this runs while every launch waits: each port's listening rows are found with
    ``str.find`` of their fixed text (local port, the all-zero remote address, state LISTEN), not by splitting
    every row in Python.
    """
    answer = _listening_sockets(ports)
    if answer is not None:
        return answer
    found: dict[int, set[int]] = {}
    readable = False
    for table, remote in (("/proc/net/tcp", "00000000:0000"), ("/proc/net/tcp6", "0" * 32 + ":0000")):
        try:
            with open(table) as handle:
                text = handle.read()
        except OSError:
            continue
        readable = True
        for port in ports:
            needle = f":{port:04X} {remote} {_LISTEN} "
            at = text.find(needle)
            while at != -1:
                start = text.rfind("\n", 0, at) + 1
                end = text.find("\n", at)
                fields = text[start:end if end != -1 else len(text)].split()
                if len(fields) >= 10:
                    found.setdefault(port, set()).add(int(fields[9]))
                at = text.find(needle, at + len(needle))
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
