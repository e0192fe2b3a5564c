"""Several gateways sharing one state store: taking a kernel over, letting go of the kernels others took over,
and listing the kernels others run.

A kernel is taken over when it is used (compare and set on its record: one taker wins); a sync every few
seconds notices the kernels other gateways took, and remembers theirs for listings.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from egd.auth import Identity
from egd.errors import KernelNotFound, ServiceUnavailable
from egd.kernels import wire
from egd.kernels.admission import Admission, refuse_foreign
from egd.kernels.kernel import Kernel
from egd.kernels.records import KernelRecords
from egd.state import StateStore, Summary
from egd.util import ResilientLoop, shield

log = Logger()
#: Seconds between looks at a shared store for kernels other gateways took over.
_SYNC_INTERVAL = 2.0


def _summary_model(summary: Summary) -> dict[str, Any]:
    """The REST model of a kernel another gateway runs (what this one knows of it)."""
    return {"id": summary.kernel_id, "name": summary.spec, "execution_state": "idle", "connections": 0,
            "last_activity": wire.utc_timestamp(datetime.fromtimestamp(summary.updated, timezone.utc))}


class GatewaySharing(Service):
    """This gateway among those sharing ``store``. A child service of the kernel manager: its sync runs while the
    store is open."""

    def __init__(self, store: StateStore, records: KernelRecords, kernels: dict[str, Kernel],
                 admission: Admission, clock: IReactorTime) -> None:
        """``kernels``: the manager's table (kernels taken over by others leave it)."""
        self.name = "sharing"
        self._store = store
        self._records = records
        self._kernels = kernels
        self._admission = admission
        self._clock = clock
        self._others: dict[str, Summary] = {}
        self._adopting: dict[str, Deferred[Exception | None]] = {}
        self._syncing: ResilientLoop | None = None

    async def still_mine(self, kernel: Kernel) -> bool:
        """Whether this gateway still runs ``kernel`` according to the shared store (asked before automatic
        restarts and culls, so that exactly one gateway acts on a kernel). The ``ownership_check`` hook."""
        summary = (await self._store.summaries()).get(kernel.id)
        return summary is not None and summary.gateway == self._records.gateway_id

    def taken_over(self, kernel: Kernel) -> None:
        """Another gateway runs the kernel now (or it was deleted there): let go of it, stop nothing. The
        ``on_taken_over`` hook."""
        if self._kernels.get(kernel.id) is kernel:
            log.info("kernel {kernel_id} is run by another gateway now; letting go", kernel_id=kernel.id)
            kernel.let_go()
            del self._kernels[kernel.id]
        self._records.let_go(kernel.id)

    def forget(self, kernel_id: str) -> None:
        """The kernel is gone: no longer list it as another gateway's."""
        self._others.pop(kernel_id, None)

    async def _sync(self) -> None:
        """Let go of the kernels other gateways took over; remember the others' kernels for listings."""
        summaries = await self._store.summaries()
        for kernel_id, kernel in list(self._kernels.items()):
            summary = summaries.get(kernel_id)
            if self._records.saved(kernel_id) and (summary is None or summary.gateway != self._records.gateway_id):
                self.taken_over(kernel)
        self._others = {k: v for k, v in summaries.items() if k not in self._kernels}

    def others(self, identity: Identity) -> Sequence[dict[str, Any]]:
        """Models of the kernels other gateways run (as of the last sync) that ``identity`` may see."""
        return [_summary_model(s) for k, s in self._others.items()
                if k not in self._kernels and identity.owns(s.username)]

    async def other(self, kernel_id: str, identity: Identity) -> dict[str, Any]:
        """The model of a kernel another gateway runs; 404 if there is none ``identity`` may see."""
        summary = (await self._store.summaries()).get(kernel_id)
        if summary is not None and identity.owns(summary.username):
            return _summary_model(summary)
        raise KernelNotFound(kernel_id)

    async def acquire(self, kernel_id: str, identity: Identity, action: str) -> Kernel:
        """The kernel to act on: one this gateway runs, or one another gateway runs, which this gateway then
        takes over and re-attaches. Concurrent requests for the same kernel share one take-over (and its
        failure)."""
        if kernel_id not in self._kernels:
            pending = self._adopting.get(kernel_id)
            if pending is None:
                pending = Deferred.fromCoroutine(self._try_take_over(kernel_id, identity, action))
                self._adopting[kernel_id] = pending
                pending.addBoth(lambda result: (self._adopting.pop(kernel_id, None), result)[1])
            failure = await shield(pending)
            if failure is not None:
                raise failure
        return self._admission.owned(kernel_id, identity, action)

    async def _try_take_over(self, kernel_id: str, identity: Identity, action: str) -> Exception | None:
        """:meth:`_take_over`, its failure returned rather than raised: it is shared by every request that
        waits for the same take-over, and each of them raises it."""
        try:
            await self._take_over(kernel_id, identity, action)
        except Exception as exc:
            return exc
        return None

    async def _take_over(self, kernel_id: str, identity: Identity, action: str) -> None:
        for _ in range(3):
            record = await self._store.get(kernel_id)
            if record is None:
                raise KernelNotFound(kernel_id)
            if not identity.owns(record.username):
                raise refuse_foreign(kernel_id, record.username, identity, action)
            if await self._store.claim(kernel_id, self._records.gateway_id, record.epoch):
                record.epoch += 1
                log.info("kernel {kernel_id}: taking over from gateway {gateway}", kernel_id=kernel_id,
                         gateway=record.gateway)
                if await self._records.reattach(record) is None:
                    raise KernelNotFound(kernel_id)
                return
        raise ServiceUnavailable(f"Kernel {kernel_id} is changing hands between gateways; try again")

    def startService(self) -> None:  # noqa: N802 - Twisted hook
        """Sync with the other gateways every few seconds. A failed sync (the database is away) is logged once and
        tried again: the loop must not end with it."""
        super().startService()
        self._syncing = ResilientLoop(lambda: ensureDeferred(self._sync()), _SYNC_INTERVAL, self._clock,
                                      "state store: sync with the other gateways")
        self._syncing.start()

    def stopService(self) -> None:  # noqa: N802 - Twisted hook
        """Stop syncing (a sync in flight finishes on its own)."""
        super().stopService()
        if self._syncing is not None:
            self._syncing.stop()
