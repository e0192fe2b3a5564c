"""Ports for kernels egd starts on this host.

EG lost a kernel in concurrent starts because two launches picked the same free port before either kernel
bound it. Here every port handed out stays reserved until its kernel is gone, so egd never hands the same port
to two kernels; a port another program takes in the meantime makes that kernel fail to bind, which the
kernel's early exit reports and the launch retries with fresh ports.
"""

from __future__ import annotations

import random
import socket


class PortAllocator:
    """Hands out TCP ports that no other kernel of this gateway holds."""

    def __init__(self, host: str = "127.0.0.1", port_range: tuple[int, int] | None = None) -> None:
        self._host = host
        self._range = port_range
        self._reserved: set[int] = set()

    @property
    def reserved(self) -> frozenset[int]:
        """Ports currently held by kernels."""
        return frozenset(self._reserved)

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
