"""Small Twisted helpers shared across egd."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()
_T = TypeVar("_T")


def shield(d: Deferred[_T]) -> Deferred[_T]:
    """A Deferred that fires with ``d``'s result; cancelling it leaves ``d`` untouched and unconsumed."""
    child: Deferred[_T] = Deferred()

    def relay(result: Any) -> Any:
        if not child.called:
            if isinstance(result, BaseException) or hasattr(result, "raiseException"):
                child.errback(result)
            else:
                child.callback(result)
        return result

    d.addBoth(relay)
    return child


async def wait_for(d: Deferred[Any], timeout: float, clock: IReactorTime) -> bool:
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


class Episode:
    """A condition that comes and goes (a store that cannot be written, a peer that does not answer), logged
    once when it begins and once when it ends, never on every failure in between (a loop that retries every
    few seconds would otherwise fill the log)."""

    def __init__(self, what: str, logger: Logger | None = None) -> None:
        self.what = what
        self._log = logger or log
        #: Why the condition holds now (the first failure's text), None while all is well.
        self.problem: str | None = None

    def failed(self, why: str) -> bool:
        """Record a failure; True (and a log line) when this begins an episode."""
        if self.problem is not None:
            return False
        self.problem = why
        self._log.error("{what}: {why} (logged once until it works again)", what=self.what, why=why)
        return True

    def recovered(self) -> bool:
        """Record a success; True (and a log line) when this ends an episode."""
        if self.problem is None:
            return False
        self.problem = None
        self._log.info("{what}: works again", what=self.what)
        return True


def describe(exc: BaseException) -> str:
    """An exception as one short line for logs and messages: its text, or its type when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


class ResilientLoop:
    """Calls ``work`` every ``interval`` seconds on ``clock``, whatever it raises or its Deferred fails with: a
    plain :class:`LoopingCall` stops for good at the first error, which silently ends the background duty it
    performs. Failures are logged once per episode (see :class:`Episode`)."""

    def __init__(self, work: Callable[[], Any], interval: float, clock: IReactorTime, what: str) -> None:
        self._work = work
        self.episode = Episode(what)
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock
        self._interval = interval

    @property
    def running(self) -> bool:
        """Whether the loop is scheduled."""
        return bool(self._loop.running)

    def start(self, now: bool = True) -> None:
        """Begin calling (at once, unless ``now`` is False)."""
        if not self._loop.running:
            self._loop.start(self._interval, now=now).addErrback(
                lambda f: log.failure("{what}: the loop ended", f, what=self.episode.what))

    def stop(self) -> None:
        """Stop calling (a call in flight finishes on its own)."""
        if self._loop.running:
            self._loop.stop()

    def _tick(self) -> Deferred[None]:
        def failed(failure: Any) -> None:
            if self.episode.failed(describe(failure.value)):  # where it failed, once, for whoever debugs it
                log.debug("{what} failed: {failure}", what=self.episode.what, failure=failure.getTraceback())

        d: Deferred[None] = maybeDeferred(self._work)
        d.addCallbacks(lambda _: (self.episode.recovered(), None)[1], failed)
        return d
