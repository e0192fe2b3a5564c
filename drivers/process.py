"""A short-lived helper process (``ssh``, ``spark-submit``) run with ``spawnProcess``: stdin fed, output kept."""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

_TAIL = 8192


class CapturedProcess(protocol.ProcessProtocol):
    """Feeds stdin, keeps the tail of stdout and stderr, fires ``ended`` with the exit code (-1 if killed)."""

    def __init__(self, stdin: bytes | None) -> None:
        self._stdin = stdin
        self.out: deque[bytes] = deque(maxlen=64)
        self.err: deque[bytes] = deque(maxlen=64)
        self.ended: Deferred[int] = Deferred()

    def connectionMade(self) -> None:  # noqa: N802 - Twisted hook
        transport: Any = self.transport
        if self._stdin is not None:
            transport.write(self._stdin)
        transport.closeStdin()

    def outReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted hook
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted hook
        self.err.append(data)

    def processEnded(self, reason: Failure) -> None:  # noqa: N802 - Twisted hook
        code = getattr(reason.value, "exitCode", None)
        self.ended.callback(code if isinstance(code, int) else -1)

    def stdout(self) -> str:
        """Everything kept of stdout."""
        return b"".join(self.out).decode("utf-8", "replace")

    def stderr(self, lines: int = 15) -> str:
        """The last non-blank lines of stderr."""
        text = b"".join(self.err)[-_TAIL:].decode("utf-8", "replace").strip()
        return "\n".join(line for line in text.splitlines()[-lines:] if line.strip())
