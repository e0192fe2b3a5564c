"""Recording kernels in the state store, and re-attaching to recorded kernels.

A ready kernel is recorded (again after each restart: its handle changed), so that a restarted gateway, or
another gateway sharing the store, can re-attach to it; a start answers once its kernel's record is written
(or after :data:`_RECORD_WAIT`). A store can fail at any time: the kernel is unaffected, the failure is logged
once per episode (and ``/readyz`` says so), and a write check every few seconds makes the missed writes when the
store works again.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import replace
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from egd.driverapi import KernelDriver
from egd.kernels.env import UNNAMED_OWNER, KernelEnv
from egd.kernels.kernel import Kernel
from egd.kernels.specs import KernelSpecInfo, KernelSpecStore
from egd.registry import DriverRegistry
from egd.state import KernelRecord, StateStore
from egd.util import ResilientLoop, describe, wait_for

log = Logger()
audit = Logger(namespace="egd.audit")
#: Seconds a re-attached kernel has to answer kernel_info before it counts as gone.
_ADOPT_TIMEOUT = 10.0
#: Seconds a start waits for its kernel's record to be written before answering anyway.
_RECORD_WAIT = 5.0
#: Seconds between write checks of the state store (a store can become read-only, full or refuse this gateway's
#: database user at any time; readiness must say so even when no kernel starts or stops meanwhile).
_STORE_CHECK_INTERVAL = 10.0

#: Builds a kernel not started yet: spec, environment, driver, launch timeout, working directory.
_KernelBuilder = Callable[[KernelSpecInfo, KernelEnv, KernelDriver, float, "str | None"], Kernel]


def _persistent_state(kernel: Kernel) -> Mapping[str, Any] | None:
    """What the driver of a running ``kernel`` persists, or None when it persists nothing (cannot re-attach)."""
    handle = kernel.handle
    return None if handle is None else handle.persistent_state()


def persistable(kernel: Kernel) -> bool:
    """Whether ``kernel`` runs with a handle that a later gateway can re-attach to."""
    return _persistent_state(kernel) is not None


class KernelRecords(Service):
    """The kernels of this gateway in the state store (without a store: does nothing). A child service of the
    kernel manager: its write check runs while the store is open."""

    def __init__(self, store: StateStore | None, kernels: dict[str, Kernel], clock: IReactorTime,
                 specs: KernelSpecStore, drivers: DriverRegistry, build: _KernelBuilder,
                 orphan_age: float = 300.0) -> None:
        """``kernels``: the manager's table (read, and written by :meth:`reattach`); ``build``: how the manager
        builds a kernel; ``orphan_age``: how old a driver's kernel must be (the longest a launch may take) before a
        kernel no record knows counts as left behind."""
        self.name = "records"
        self.store = store
        #: This process among the gateways sharing a store.
        self.gateway_id = uuid.uuid4().hex[:12]
        self._kernels = kernels
        self._clock = clock
        self._specs = specs
        self._drivers = drivers
        self._build = build
        self._epochs: dict[str, int] = {}
        self._saved: set[str] = set()
        #: Record writes in flight, by kernel id (a start answers once its kernel's is done).
        self._recording: dict[str, Deferred[Any]] = {}
        #: Kernels whose record could not be deleted (the store failed): deleted when it works again.
        self._undeleted: set[str] = set()
        self._store_check: ResilientLoop | None = None
        self._orphan_age = orphan_age

    def saved(self, kernel_id: str) -> bool:
        """Whether this gateway wrote the record of ``kernel_id`` (and has not let go of it since)."""
        return kernel_id in self._saved

    def record(self, kernel: Kernel) -> None:
        """Record a ready kernel (again after each restart: its handle changed). The ``on_ready`` hook."""
        state = _persistent_state(kernel)
        if self.store is None or state is None:
            return
        handle, env = kernel.handle, kernel.env
        assert handle is not None
        record = KernelRecord(kernel.id, env.username, kernel.spec.name, kernel.spec.driver,
                              dict(handle.connection_info), dict(state),
                              {"kernel_id": env.kernel_id, "username": env.username,
                               "launch_timeout": env.launch_timeout, "client": env.client,
                               "inherited": env.inherited},
                              kernel.working_dir, kernel.launch_timeout, self._clock.seconds())
        record.gateway = self.gateway_id
        record.epoch = self._epochs.setdefault(kernel.id, 1)
        write = self._background(self._save(record), f"recording kernel {kernel.id}")
        if not write.called:
            self._recording[kernel.id] = write
            write.addBoth(lambda result: (self._recording.pop(kernel.id, None), result)[1])

    async def recorded(self, kernel: Kernel) -> None:
        """Wait (a little) for the write of ``kernel``'s record: a client learns of a kernel once another gateway
        sharing the store, or this one after a restart, can find it. A write that fails or hangs is the store's
        problem (logged, /readyz): the kernel is handed out anyway, and recorded when the store works again."""
        write = self._recording.pop(kernel.id, None)
        if write is not None:
            await wait_for(write, _RECORD_WAIT, self._clock)

    def let_go(self, kernel_id: str) -> None:
        """This gateway no longer runs ``kernel_id`` (another one took it over): its record is not ours."""
        self._saved.discard(kernel_id)
        self._epochs.pop(kernel_id, None)

    def forget(self, kernel_id: str) -> None:
        """The kernel is gone: delete its record (in the background)."""
        self.let_go(kernel_id)
        if self.store is not None:
            self._background(self._delete(kernel_id), f"forgetting kernel {kernel_id}")

    async def _delete(self, kernel_id: str) -> None:
        assert self.store is not None
        try:
            await self.store.delete(kernel_id)
        except Exception:
            self._undeleted.add(kernel_id)
            raise
        self._undeleted.discard(kernel_id)

    def _background(self, work: Coroutine[Any, Any, Any], what: str) -> Deferred[Any]:
        """Run a store write in the background (the Deferred never fails); the kernel itself is unaffected by a
        failure, which the store logs once per episode (and readiness reports); each one is at debug level here.
        The write is made again when the store works again (see :meth:`_check_store`)."""
        return ensureDeferred(work).addErrback(
            lambda f: log.debug("state store: {what} failed: {why}", what=what, why=f.getErrorMessage()))

    async def _save(self, record: KernelRecord) -> None:
        assert self.store is not None
        await self.store.save(record)
        if record.kernel_id in self._kernels:
            self._saved.add(record.kernel_id)

    async def _check_store(self) -> None:
        """Every few seconds: is the store writable? When it is (again), write what failed meanwhile: the records
        of running kernels not recorded yet (or they would be lost to a restart) and the deletions."""
        assert self.store is not None
        if not await self.store.check_writable():
            return
        for kernel_id in list(self._undeleted):
            if kernel_id not in self._kernels:
                await self._delete(kernel_id)
        for kernel in list(self._kernels.values()):
            if kernel.id not in self._saved and kernel.state.value == "running":
                self.record(kernel)

    # -- re-attaching -----------------------------------------------------------------------------------

    async def restore(self) -> None:
        """Re-attach to every recorded kernel still alive; forget (and clean up after) the others."""
        assert self.store is not None
        records = await self.store.load()
        if records:
            log.info("state: {count} kernel(s) recorded by the previous gateway; re-attaching", count=len(records))
        await DeferredList([ensureDeferred(self.reattach(r)) for r in records], consumeErrors=True)
        await self._sweep(frozenset(r.kernel_id for r in records))

    async def _sweep(self, known: frozenset[str]) -> None:
        """Drivers that can list their kernels (``sweep_unknown``) remove those no record knows and that are older
        than any launch: a launch cut short by a crash of egd left them (its kernel was not recorded yet). Kernels
        of other gateways sharing the store are known to it; a launch in flight is younger."""
        for name, driver in self._drivers.names.items():
            sweep = getattr(driver, "sweep_unknown", None)
            if sweep is None:
                continue
            try:
                removed = await maybeDeferred(sweep, known, self._orphan_age)
            except Exception as exc:
                log.warn("driver {driver}: could not look for kernels left behind: {why}", driver=name,
                         why=describe(exc))
                continue
            if removed:
                log.warn("driver {driver}: removed {count} kernel(s) left behind by an earlier gateway's launches",
                         driver=name, count=removed)

    async def reattach(self, record: KernelRecord) -> Kernel | None:
        """Adopt the kernel of ``record`` into the table (None, and the record forgotten, when it is gone)."""
        kernel: Kernel | None = None
        try:
            # A running kernel is managed even if its spec is no longer offered (it can be shut down).
            spec = await self._specs.get(record.spec, offered_only=False)
            driver = self._drivers.get(record.driver)
            # The driver's reattach fails (LookupError) when it cannot re-attach to this kernel.
            handle = await maybeDeferred(driver.reattach, record.kernel_id, record.handle, record.connection)
            env = KernelEnv(**record.env)
            if "KERNEL_USERNAME" not in env.client:  # recorded by an older egd with its OS user as the owner
                env = replace(env, username=UNNAMED_OWNER)
            kernel = self._build(spec, replace(env, kernel_id=record.kernel_id), driver, record.launch_timeout,
                           record.working_dir)
            self._epochs[kernel.id] = record.epoch
            self._kernels[kernel.id] = kernel
            await kernel.adopt(handle, min(record.launch_timeout, _ADOPT_TIMEOUT))
        except Exception as exc:
            log.warn("kernel {kernel_id} ({spec}) recorded by gateway {gateway} is gone: {why}; forgotten",
                     kernel_id=record.kernel_id, spec=record.spec, gateway=record.gateway or "?",
                     why=describe(exc))
            if kernel is not None:
                kernel.hooks.on_gone(kernel)
            else:
                await self._delete(record.kernel_id)
            return None
        audit.info("kernel re-attached {kernel_id} user={user} spec={spec}", kernel_id=kernel.id,
                   user=record.username, spec=record.spec)
        return kernel

    # -- service ----------------------------------------------------------------------------------------

    def startService(self) -> None:  # noqa: N802 - Twisted hook
        """Check the store's writability every few seconds (the store is open by now)."""
        super().startService()
        if self.store is None:
            return
        self._store_check = ResilientLoop(lambda: ensureDeferred(self._check_store()), _STORE_CHECK_INTERVAL,
                                          self._clock, "state store: write check")
        self._store_check.start(now=False)

    def stopService(self) -> None:  # noqa: N802 - Twisted hook
        """Stop the write check (a check in flight finishes on its own)."""
        super().stopService()
        if self._store_check is not None:
            self._store_check.stop()
