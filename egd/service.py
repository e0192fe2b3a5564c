"""The service tree: an async-aware MultiService, and the function that builds egd from its config.

Order (started in this order, stopped in reverse): drivers -> kernel manager -> HTTP listener, so nothing is
served before the rest is up, and the listener stops first.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

log = Logger()


class AsyncMultiService(MultiService):
    """A MultiService that waits for its children's start Deferreds and reports a child's stop failure.

    Twisted's MultiService discards what a child's ``startService`` returns; this one starts children in
    order, one after the other, and returns a Deferred that fires when all are up (Buildbot's pattern).
    """

    def startService(self) -> Deferred[None]:  # type: ignore[override]  # noqa: N802 - Twisted hook
        """Start children in order; fires when all have started."""
        self.running = 1
        d: Deferred[Any] = Deferred()
        d.callback(None)
        for child in list(self):
            d.addCallback(lambda _, c=child: maybeDeferred(c.startService))
        return d.addCallback(lambda _: None)

    def stopService(self) -> Deferred[None]:  # type: ignore[override]  # noqa: N802 - Twisted hook
        """Stop children in reverse order; every child is stopped even if another fails."""
        self.running = 0
        d: Deferred[Any] = Deferred()
        d.callback(None)
        failures: list[Any] = []
        for child in reversed(list(self)):
            def stop(_: Any, c: Any = child) -> Deferred[Any]:
                return maybeDeferred(c.stopService).addErrback(lambda f, c=c: failures.append((c.name, f)))
            d.addCallback(stop)

        def report(_: Any) -> None:
            for name, failure in failures:
                log.failure("stopping {name} failed", failure, name=name)

        return d.addCallback(report)

