"""Watching many kernels' jobs with one request to the resource manager per interval.

:class:`BatchPoller` is the schedule the ``yarn`` and ``slurm`` watchers share: a round every ``interval`` seconds
while something is watched, every ``fast_interval`` while someone waits on a watch (a launch or a kill marks its
watch ``urgent``), never two rounds at once. A subclass's :meth:`BatchPoller.poll` asks the resource manager once
for every watch and hands each its answer; how many requests a round makes does not grow with the kernels.
"""

from __future__ import annotations

from typing import Any, Generic, Protocol, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from egd.service import AsyncMultiService

log = Logger()


class Watched(Protocol):
    """What a poller needs of a watch: whose it is and whether someone waits on it."""

    kernel_id: str
    urgent: bool


W = TypeVar("W", bound=Watched)


class BatchPoller(Generic[W]):
    """Polls for every watch at once (subclasses implement :meth:`poll`)."""

    #: Named in the log when a round fails.
    what = "watcher"

    def __init__(self, reactor: IReactorTime, interval: float, fast_interval: float) -> None:
        self._reactor = reactor
        self._interval = interval
        self._fast = fast_interval
        self._watches: dict[str, W] = {}
        self._pending: Any = None
        self._running = False
        self._polling: Deferred[None] | None = None
        self.rounds = 0

    @property
    def watches(self) -> list[W]:
        """What is watched now."""
        return list(self._watches.values())

    def watching(self, watch: W) -> bool:
        """Whether ``watch`` is (still) the one followed for its kernel."""
        return self._watches.get(watch.kernel_id) is watch

    def start(self) -> None:
        """Begin polling (rounds happen only while something is watched)."""
        self._running = True
        self._schedule()

    def stop(self) -> Deferred[None] | None:
        """Stop polling; fires when a round in flight has finished."""
        self._running = False
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        return self._polling

    def watch(self, watch: W) -> W:
        """Follow ``watch`` (replacing an earlier one of the same kernel) and poll soon."""
        self._watches[watch.kernel_id] = watch
        self.hurry()
        return watch

    def forget(self, watch: W) -> None:
        """Stop following it."""
        if self.watching(watch):
            del self._watches[watch.kernel_id]

    def hurry(self) -> None:
        """Poll soon (someone is waiting for a state change)."""
        if not self._running:
            return
        delay = self._fast
        if self._pending is not None and self._pending.active():
            remaining = self._pending.getTime() - self._reactor.seconds()
            if remaining <= delay:
                return
            self._pending.cancel()
        if self._polling is None:
            self._pending = self._reactor.callLater(delay, self._round)

    def _schedule(self) -> None:
        if not self._running or (self._pending is not None and self._pending.active()):
            return
        urgent = any(w.urgent for w in self._watches.values())
        self._pending = self._reactor.callLater(self._fast if urgent else self._interval, self._round)

    def _round(self) -> None:
        self._pending = None
        if not self._watches:
            self._schedule()
            return
        self.rounds += 1
        self._polling = Deferred.fromCoroutine(self.poll(self.watches))
        self._polling.addErrback(lambda f: log.failure("{what} round failed", f, what=self.what))

        def done(_: Any) -> None:
            self._polling = None
            self._schedule()

        self._polling.addBoth(done)

    async def poll(self, watches: list[W]) -> None:
        """One round: ask once for all ``watches`` and deliver each its answer."""
        raise NotImplementedError


class PollingDriver(AsyncMultiService):
    """A driver whose kernels' jobs one :class:`BatchPoller` (``watcher``) follows: watching starts once its
    children (the launch listener) have started; on stop, watching ends and the API client closes
    (:meth:`close_api`) before the children stop. The jobs themselves keep running."""

    watcher: BatchPoller[Any]

    async def close_api(self) -> None:
        """Release the resource manager's connections."""

    def startService(self) -> Deferred[None]:  # noqa: N802 - Twisted hook
        """Start the children (egd does not start when its listener cannot listen), then watching."""
        return super().startService().addCallback(lambda _: self.watcher.start())

    def stopService(self) -> Deferred[None]:  # noqa: N802 - Twisted hook
        """Stop watching (a round in flight finishes), close the API client, stop the children."""
        async def stop() -> None:
            polling = self.watcher.stop()
            if polling is not None:
                await polling
            await self.close_api()
            await maybeDeferred(super(PollingDriver, self).stopService)

        return Deferred.fromCoroutine(stop())
