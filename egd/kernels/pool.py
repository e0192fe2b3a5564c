"""Kernel pools: pre-started kernels per kernelspec, handed out on POST, replenished in the background.

A pooled kernel is started with no request at all, so it carries no user-specific launch state; it is handed
to a user only when the request would not have launched it differently (see
:meth:`egd.kernels.manager.KernelManager` ``_poolable``): no client variables beyond the user name, the launch
timeout and the working directory (which the kernel then changes to), no chosen kernel id, a kernelspec whose
environment does not depend on the request, a driver that does not run kernels as their users. A pooled kernel
belongs to nobody until it is handed out, and never to two users: it leaves the pool when it is taken.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from egd.kernels.kernel import Kernel, KernelState
from egd.util import describe

log = Logger()

#: Seconds before a spec whose pooled kernel failed to start is tried again.
_RETRY_AFTER = 30.0


class KernelPool:
    """Keeps ``sizes[spec]`` ready kernels of each pooled kernelspec, starting at most ``at_once`` of a spec at a
    time.

    A burst of users empties a pool at once. Starting every replacement at once then made a boot storm (50
    ipykernels importing on 2 cores) that kept the kernels just handed out from answering for 10 s; one at a
    time (the default), the burst's kernels answer as fast as a single start. Remote drivers, whose starts
    wait on a cluster rather than on this host's CPU, may take more at once (``kernels.pool_fill_at_once``).
    """

    def __init__(self, sizes: Mapping[str, int], start: Callable[[str], Awaitable[Kernel]],
                 clock: IReactorTime, at_once: int = 1) -> None:
        self._sizes = dict(sizes)
        self._at_once = at_once
        self._start = start
        self._clock = clock
        self._ready: dict[str, list[Kernel]] = {name: [] for name in sizes}
        self._starting: dict[str, int] = dict.fromkeys(sizes, 0)
        self._retry: dict[str, IDelayedCall] = {}
        self._running = False
        self._background: set[Deferred[Any]] = set()

    def sizes(self) -> dict[str, int]:
        """How many ready kernels each pooled spec has now."""
        return {name: len(kernels) for name, kernels in self._ready.items()}

    def start(self) -> None:
        """Fill every pool (in the background)."""
        self._running = True
        for name in self._sizes:
            self.fill(name)

    def fill(self, name: str) -> None:
        """Start kernels of ``name`` while the pool lacks some, at most ``at_once`` at a time (each one that is
        ready calls this again)."""
        if not self._running or name in self._retry:
            return
        missing = self._sizes.get(name, 0) - len(self._ready[name]) - self._starting[name]
        for _ in range(max(0, min(missing, self._at_once - self._starting[name]))):
            self._starting[name] += 1
            work = ensureDeferred(self._add(name))
            self._background.add(work)
            work.addBoth(self._done, work)
            work.addErrback(self._failed, name)

    @staticmethod
    def _failed(failure: Any, name: str) -> None:
        log.failure("pool {spec}: filling failed", failure, spec=name)

    def _done(self, result: Any, work: Deferred[Any]) -> Any:
        self._background.discard(work)
        return result

    async def _add(self, name: str) -> None:
        try:
            kernel = await self._start(name)
        except Exception as exc:
            log.warn("pool {spec}: a kernel could not be started ({why}); trying again in {delay:g}s", spec=name,
                     why=describe(exc), delay=_RETRY_AFTER)
            if self._running and name not in self._retry:
                self._retry[name] = self._clock.callLater(_RETRY_AFTER, self._retry_now, name)
            return
        finally:
            self._starting[name] -= 1
        if not self._running:
            await kernel.shutdown()
            return
        self._ready[name].append(kernel)
        log.info("pool {spec}: kernel {kernel_id} ready ({count} of {size})", spec=name, kernel_id=kernel.id,
                 count=len(self._ready[name]), size=self._sizes[name])
        self.fill(name)

    def _retry_now(self, name: str) -> None:
        self._retry.pop(name, None)
        self.fill(name)

    def take(self, name: str) -> Kernel | None:
        """A ready kernel of ``name`` (it leaves the pool, which starts a replacement), or None."""
        kernels = self._ready.get(name)
        taken = None
        while kernels and taken is None:
            kernel = kernels.pop(0)
            if kernel.state is KernelState.RUNNING:
                taken = kernel
        if kernels is not None:
            # Replace what left the pool, handed out or found dead: a pool whose kernels died must refill too.
            self.fill(name)
        return taken

    async def drain(self) -> None:
        """Stop filling and shut every pooled kernel down (those still starting included)."""
        self._running = False
        for call in self._retry.values():
            if call.active():
                call.cancel()
        self._retry.clear()
        if self._background:
            await DeferredList(list(self._background), consumeErrors=True)
        kernels = [k for pool in self._ready.values() for k in pool]
        for pool in self._ready.values():
            pool.clear()
        await DeferredList([ensureDeferred(k.shutdown()) for k in kernels], consumeErrors=True)
