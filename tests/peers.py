"""Hostile peers the tests point at egd's listeners and launchers' control ports."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def dripping_peer(address: tuple[str, int], interval: float = 1.0) -> Iterator[socket.socket]:
    """A connection to ``address`` that sends one byte every ``interval`` seconds (a request that never ends)
    until the block is left; yields its socket."""
    conn = socket.create_connection(address, timeout=5)
    stop = threading.Event()

    def drip() -> None:
        while not stop.wait(interval):
            try:
                conn.send(b" ")
            except OSError:
                return

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        yield conn
    finally:
        stop.set()
        dripper.join(5)
        conn.close()
