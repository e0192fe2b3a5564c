"""The service tree: an async-aware MultiService, and the function that builds egd from its config.

Order (started in this order, stopped in reverse): drivers -> kernel manager -> HTTP listener, so nothing is
served before the rest is up, and the listener stops first.
"""

from __future__ import annotations

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.logger import Logger

log = Logger()


class AsyncMultiService(MultiService):
    """A MultiService that waits for its children's start Deferreds and reports a child's stop failure.

    Twisted's MultiService discards what a child's ``startService`` returns; this one starts children in
    order, one after the other, and returns a Deferred that fires when all are up (Buildbot's pattern).
    """

    def startService(self) -> Deferred[None]:  # noqa: N802 - Twisted hook
        """Start children in order; fires when all have started."""
        self.running = 1
        async def start() -> None:
            for child in list(self):
                await maybeDeferred(child.startService)

        return ensureDeferred(start())

    def stopService(self) -> Deferred[None]:  # noqa: N802 - Twisted hook
        """Stop children in reverse order; every child is stopped even if another fails."""
        self.running = 0
        async def stop() -> None:
            for child in reversed(list(self)):
                try:
                    await maybeDeferred(child.stopService)
                except Exception:
                    log.failure("stopping {name} failed", name=child.name)

        return ensureDeferred(stop())

