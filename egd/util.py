"""Small Twisted helpers shared across egd."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

log = Logger()
T = TypeVar("T")


def shield(d: Deferred[T]) -> Deferred[T]:
    """A Deferred that fires with ``d``'s result; cancelling it leaves ``d`` untouched and unconsumed."""
    child: Deferred[T] = Deferred()

    def relay(result: Any) -> Any:
        if not child.called:
            if isinstance(result, BaseException) or hasattr(result, "raiseException"):
                child.errback(result)
            else:
                child.callback(result)
        return result

    d.addBoth(relay)
    return child


async def wait_for(d: Deferred[Any], timeout: float, clock: Any) -> bool:
    """Wait up to ``timeout`` seconds for ``d`` without consuming or cancelling it; True if it fired."""
    if d.called:
        return True
    watcher = shield(d)
    watcher.addTimeout(timeout, clock)
    try:
        await watcher
    except Exception:  # the timeout (or d's own failure): report whether d fired
        return d.called
    return True


def sleep(clock: Any, seconds: float) -> Deferred[None]:
    """A Deferred that fires after ``seconds`` on ``clock``."""
    return deferLater(clock, seconds, lambda: None)


class Background:
    """Runs fire-and-forget work, logs its failures, and lets a service wait for all of it to finish."""

    def __init__(self) -> None:
        self._running: set[Deferred[Any]] = set()

    def run(self, work: Coroutine[Any, Any, Any] | Deferred[Any], why: str) -> Deferred[Any]:
        """Start ``work``; a failure is logged with ``why``."""
        d = ensureDeferred(work) if not isinstance(work, Deferred) else work
        self._running.add(d)

        def done(result: Any) -> None:
            self._running.discard(d)
            if hasattr(result, "check") and not result.check(CancelledError):
                log.failure("{why} failed", result, why=why)

        d.addBoth(done)
        return d

    def wait(self) -> Deferred[Any]:
        """Fires when everything started so far has finished."""
        return DeferredList(list(self._running), consumeErrors=True)
