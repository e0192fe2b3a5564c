"""The kernel manager: every kernel of this gateway, by id, over the driver registry."""

from __future__ import annotations

import os
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, maybeDeferred
from twisted.logger import Logger

from egd.auth import LOCAL_OPERATOR, Identity
from egd.config import Config
from egd.errors import Conflict, Forbidden, KernelNotFound, ServiceUnavailable
from egd.kernels import wire
from egd.kernels.culler import KernelCuller
from egd.kernels.env import UNNAMED_OWNER, KernelEnv, build_kernel_env
from egd.kernels.hub import ReplayLimits
from egd.kernels.kernel import Kernel, KernelPolicy
from egd.kernels.pool import KernelPool
from egd.kernels.specs import KernelSpecInfo, KernelSpecStore
from egd.kernels.zmqio import ReactorZmqFactory, shutdown_factory
from egd.metrics import GatewayMetrics, Readiness, services_running
from egd.registry import DriverRegistry
from egd.state import KernelRecord, StateStore, Summary
from egd.util import ResilientLoop, shield, wait_for

log = Logger()
#: Seconds a re-attached kernel has to answer kernel_info before it counts as gone.
_ADOPT_TIMEOUT = 10.0
#: Seconds between looks at a shared store for kernels other gateways took over.
_SYNC_INTERVAL = 2.0
#: Seconds a start waits for its kernel's record to be written before answering anyway.
_RECORD_WAIT = 5.0
#: Seconds between write checks of the state store (a store can become read-only, full or refuse this gateway's
#: database user at any time; readiness must say so even when no kernel starts or stops meanwhile).
_STORE_CHECK_INTERVAL = 10.0


def _summary_model(summary: Summary) -> dict[str, Any]:
    """The REST model of a kernel another gateway runs (what this one knows of it)."""
    return {"id": summary.kernel_id, "name": summary.spec, "execution_state": "idle", "connections": 0,
            "last_activity": wire.utc_timestamp(datetime.fromtimestamp(summary.updated, timezone.utc))}
#: One line per security-relevant event (who did what to which kernel); never a secret.
audit = Logger(namespace="egd.audit")


#: Request variables a pooled kernel can serve: they do not change how a kernel is launched.
_POOLABLE_VARIABLES = frozenset({"KERNEL_USERNAME", "KERNEL_LAUNCH_TIMEOUT", "KERNEL_WORKING_DIR"})


def _poolable(requested: Any, env: KernelEnv, spec: KernelSpecInfo, driver: Any) -> bool:
    """Whether a pooled kernel is what this request would have launched: no chosen id, no other request
    variables, a spec environment that does not substitute request values, a driver that does not run
    kernels as their users."""
    chose_id = isinstance(requested, dict) and "KERNEL_ID" in requested
    return (not chose_id and set(env.client) <= _POOLABLE_VARIABLES
            and not any("$" in value for value in spec.env.values())
            and not getattr(driver, "impersonates", False))


class KernelManager(Service):
    """Starts, finds, lists and stops kernels; stops them all when the gateway stops."""

    def __init__(self, config: Config, reactor: Any, specs: KernelSpecStore, drivers: DriverRegistry,
                 environ: Mapping[str, str] | None = None, store: StateStore | None = None) -> None:
        self.name = "kernels"
        #: Where running kernels are recorded, so that a restarted gateway re-attaches to them (None: nowhere).
        self.store = store
        #: This process among the gateways sharing a store.
        self.gateway_id = uuid.uuid4().hex[:12]
        self._epochs: dict[str, int] = {}
        self._saved: set[str] = set()
        #: Record writes in flight, by kernel id (a start answers once its kernel's is done).
        self._recording: dict[str, Deferred[Any]] = {}
        self._others: dict[str, Summary] = {}
        self._adopting: dict[str, Deferred[Exception | None]] = {}
        self._syncing: ResilientLoop | None = None
        self._store_check: ResilientLoop | None = None
        #: Kernels whose record could not be deleted (the store failed): deleted when it works again.
        self._undeleted: set[str] = set()
        self._config = config
        self._reactor = reactor
        self.specs = specs
        self._drivers = drivers
        self._environ = dict(os.environ if environ is None else environ)
        self._zmq = ReactorZmqFactory(reactor)
        self.kernels: dict[str, Kernel] = {}
        self._launches: dict[str, Deferred[Any]] = {}
        self._reserved: Counter[str] = Counter()
        self._accepting = True
        #: This gateway's metrics (in a registry of its own) and the checks behind GET /readyz.
        self.metrics = GatewayMetrics(self.list)
        self.readiness = Readiness()
        self.readiness.add("drivers", services_running(lambda: drivers.names, "drivers"))
        self.readiness.add("kernels", self._accepts_work)
        if store is not None:
            self.readiness.add("store", lambda: store.problem)
        kc, sc = config.kernels, config.server
        self._policy = KernelPolicy(
            shutdown_wait=kc.shutdown_wait, restart_limit=kc.restart_limit,
            stable_start_seconds=kc.stable_start_seconds, heartbeat_interval=kc.heartbeat_interval,
            heartbeat_misses=kc.heartbeat_misses,
            replay=ReplayLimits(sc.replay_buffer_messages, sc.replay_buffer_bytes, sc.replay_buffer_seconds,
                                sc.replay_buffer_sessions, sc.client_backlog_messages, sc.client_backlog_bytes))
        #: Ready kernels per kernelspec (kernels.pools), started when the manager starts.
        self.pool = KernelPool(kc.pools, self._start_pooled, reactor)
        #: Idle and busy kernels are culled on the same clock as everything else (task.Clock in tests).
        self.culler = KernelCuller(kc, self.list, reactor)

    def reconfigure(self, config: Config) -> None:
        """Use ``config`` from now on for what is read at use time (limits, user lists, defaults, timeouts of
        launches to come); see ``egd.systemd.LIVE_KEYS``."""
        self._config = config

    @property
    def default_kernel_name(self) -> str:
        """The kernelspec used when a request names none."""
        return self._config.kernels.default_kernel_name

    def owned(self, kernel_id: str, identity: Identity, action: str) -> Kernel:
        """The kernel if ``identity`` may use it; otherwise 404, exactly as if it did not exist (a user must not
        learn the ids of other users' kernels), with an audit line."""
        kernel = self.get(kernel_id)
        if not identity.owns(kernel.env.username):
            audit.warn("refused {action} of kernel {kernel_id} (user={owner}) to {who}", action=action,
                       kernel_id=kernel_id, owner=kernel.env.username, who=identity.describe())
            raise KernelNotFound(kernel_id)
        return kernel

    def visible(self, identity: Identity) -> list[Kernel]:
        """The kernels ``identity`` may see (all of them for admins and trusted clients)."""
        return [k for k in self.kernels.values() if identity.owns(k.env.username)]

    def get(self, kernel_id: str) -> Kernel:
        """The kernel with this id; :class:`KernelNotFound` otherwise."""
        try:
            return self.kernels[kernel_id]
        except KeyError:
            raise KernelNotFound(kernel_id) from None

    def list(self) -> list[Kernel]:
        """Every kernel, including those still starting."""
        return list(self.kernels.values())

    async def start_kernel(self, name: str | None, env: Any, identity: Identity = LOCAL_OPERATOR) -> Kernel:
        """Start a kernel of kernelspec ``name`` (default if None) with the request's ``env``, for ``identity``
        (a user-bound identity starts kernels as itself only)."""
        if not self._accepting:
            self.metrics.start_refused("unavailable")
            raise ServiceUnavailable("The gateway is shutting down")
        kc = self._config.kernels
        if identity.user is not None and (env is None or isinstance(env, dict)):
            claimed = (env or {}).get("KERNEL_USERNAME")
            if claimed is not None and claimed != identity.user:
                audit.warn("kernel start refused: {who} claimed KERNEL_USERNAME={claimed!r}",
                           who=identity.describe(), claimed=str(claimed)[:64])
                self.metrics.start_refused("unauthorized")
                raise Forbidden("KERNEL_USERNAME must be your own user name with these credentials")
            env = {**(env or {}), "KERNEL_USERNAME": identity.user}
        kernel_env = build_kernel_env(
            env, client_envs=kc.client_envs, inherited_envs=kc.inherited_envs, gateway_environ=self._environ,
            default_launch_timeout=kc.launch_timeout, max_launch_timeout=kc.max_launch_timeout)
        if kernel_env.kernel_id in self.kernels:
            raise Conflict(f"A kernel with id {kernel_env.kernel_id} already exists")
        user = kernel_env.username
        self._enforce_limits(user)
        # Counted from here on, so that concurrent requests see this one before its kernel exists.
        self._reserved[user] += 1
        try:
            spec = await self.specs.get(name or self.default_kernel_name)
            if not self.allows(spec, user, identity.groups if identity.user == user else None):
                audit.warn("kernel start refused user={user}: not authorized for {spec}", user=user, spec=spec.name)
                self.metrics.start_refused("unauthorized")
                raise Forbidden(f"User '{user}' is not authorized to start kernel '{spec.display_name}'")
            try:
                driver = self._drivers.get(spec.driver)
            except ServiceUnavailable:
                self.metrics.start_refused("unavailable")
                raise
            if user == UNNAMED_OWNER and getattr(driver, "impersonates", False):
                # Runs kernels as their users: one without a user has no account to run as (never egd's own).
                self.metrics.start_refused("unauthorized")
                raise Forbidden(f"Kernels of '{spec.display_name}' run as their user: KERNEL_USERNAME is needed")
            if kernel_env.kernel_id in self.kernels:  # claimed while the spec was being read
                raise Conflict(f"A kernel with id {kernel_env.kernel_id} already exists")
        finally:
            self._reserved[user] -= 1
        working_dir = kernel_env.client.get("KERNEL_WORKING_DIR") or kc.working_dir
        pooled = self.pool.take(spec.name) if _poolable(env, kernel_env, spec, driver) else None
        if pooled is not None:
            return await self._hand_out(pooled, kernel_env, working_dir)
        # A client may ask for more or less time (KERNEL_LAUNCH_TIMEOUT); otherwise the spec's default, then
        # the gateway's; never more than the gateway's maximum.
        timeout = kernel_env.launch_timeout
        if "KERNEL_LAUNCH_TIMEOUT" not in kernel_env.client and spec.launch_timeout:
            timeout = min(spec.launch_timeout, kc.max_launch_timeout)
        kernel = Kernel(kernel_env.kernel_id, spec, kernel_env, driver, self._zmq, self._reactor, self._policy,
                        timeout, working_dir, self._forget)
        self._watch_ownership(kernel)
        self.kernels[kernel.id] = kernel
        log.info("kernel {kernel_id}: starting {spec} for {user} with driver {driver}", kernel_id=kernel.id,
                 spec=spec.name, user=kernel_env.username, driver=spec.driver)
        audit.info("kernel start {kernel_id} user={user} spec={spec}", kernel_id=kernel.id, user=user,
                   spec=spec.name)
        launch = ensureDeferred(kernel.start())
        self._launches[kernel.id] = launch
        launch.addBoth(lambda result: (self._launches.pop(kernel.id, None), result)[1])
        # A client that hangs up mid-launch cancels its request, not the launch.
        waiter = shield(launch)
        launch.addErrback(lambda _: None)  # the failure reaches the client through ``waiter``
        await waiter
        await self._recorded(kernel)
        return kernel

    async def _start_pooled(self, name: str) -> Kernel:
        """Start a kernel for the pool: no request, so no user-specific launch state."""
        kc = self._config.kernels
        env = build_kernel_env(None, client_envs=kc.client_envs, inherited_envs=kc.inherited_envs,
                               gateway_environ=self._environ, default_launch_timeout=kc.launch_timeout,
                               max_launch_timeout=kc.max_launch_timeout)
        spec = await self.specs.get(name)
        driver = self._drivers.get(spec.driver)
        timeout = min(spec.launch_timeout, kc.max_launch_timeout) if spec.launch_timeout else env.launch_timeout
        kernel = Kernel(env.kernel_id, spec, env, driver, self._zmq, self._reactor, self._policy, timeout,
                        kc.working_dir, self._forget)
        kernel.metrics = self.metrics
        await kernel.start()
        return kernel

    async def _hand_out(self, kernel: Kernel, env: KernelEnv, working_dir: str | None) -> Kernel:
        """Give a pooled kernel to the request's user, in the working directory it asked for."""
        kernel.assign(replace(env, kernel_id=kernel.id), working_dir)
        self.kernels[kernel.id] = kernel
        self._watch_ownership(kernel)
        asked = env.client.get("KERNEL_WORKING_DIR")
        if asked and os.path.isdir(asked):
            try:
                await kernel.execute_quietly(f"__import__('os').chdir({asked!r})")
            except Exception as exc:
                log.warn("kernel {kernel_id}: could not change to {path}: {why}", kernel_id=kernel.id, path=asked,
                         why=str(exc) or type(exc).__name__)
        self._record(kernel)
        await self._recorded(kernel)
        log.info("kernel {kernel_id}: {spec} from the pool for {user}", kernel_id=kernel.id, spec=kernel.spec.name,
                 user=env.username)
        audit.info("kernel start {kernel_id} user={user} spec={spec} pooled=yes", kernel_id=kernel.id,
                   user=env.username, spec=kernel.spec.name)
        return kernel

    def allows(self, spec: KernelSpecInfo, user: str, groups: frozenset[str] | None = None) -> bool:
        """Whether ``user`` may use ``spec`` (per-spec and gateway-wide user lists; ``@group`` entries match
        ``groups``, by default the user's groups in ``auth.groups``)."""
        kc = self._config.kernels
        if groups is None:
            groups = frozenset(g for g, members in self._config.auth.groups.items() if user in members)
        return spec.allows(user, kc.authorized_users, kc.unauthorized_users, groups)

    def _enforce_limits(self, user: str) -> None:
        """403 when the gateway's or the user's kernel limit is reached (kernels starting count too)."""
        kc = self._config.kernels
        total = len(self.kernels) + sum(self._reserved.values())
        if kc.max_kernels is not None and total >= kc.max_kernels:
            audit.warn("kernel start refused user={user}: gateway limit {limit}", user=user, limit=kc.max_kernels)
            self.metrics.start_refused("limit")
            raise Forbidden(f"A max kernels limit has been set to {kc.max_kernels} and has been reached")
        if kc.max_kernels_per_user is not None:
            mine = sum(1 for k in self.kernels.values() if k.env.username == user) + self._reserved[user]
            if mine >= kc.max_kernels_per_user:
                audit.warn("kernel start refused user={user}: per-user limit {limit}", user=user,
                           limit=kc.max_kernels_per_user)
                self.metrics.start_refused("limit")
                raise Forbidden(f"A max kernels per user limit has been set to {kc.max_kernels_per_user} "
                                f"and user '{user}' has reached it")

    def _accepts_work(self) -> str | None:
        """Readiness: None while the manager runs and takes new kernels, otherwise why not."""
        if not self._accepting:  # first: stopping also clears ``running``, and this says more
            return "the gateway is shutting down"
        if not self.running:
            return "the kernel manager is not running"
        return None

    def _forget(self, kernel: Kernel) -> None:
        if self.kernels.get(kernel.id) is kernel:
            del self.kernels[kernel.id]
            self._others.pop(kernel.id, None)
            self._saved.discard(kernel.id)
            self._epochs.pop(kernel.id, None)
            if self.store is not None:
                self._store_call(self._delete_record(kernel.id), f"forgetting kernel {kernel.id}")

    async def _delete_record(self, kernel_id: str) -> None:
        assert self.store is not None
        try:
            await self.store.delete(kernel_id)
        except Exception:
            self._undeleted.add(kernel_id)
            raise
        self._undeleted.discard(kernel_id)

    def _store_call(self, work: Any, what: str) -> Deferred[Any]:
        """Run a store write in the background (the Deferred never fails); the kernel itself is unaffected by a
        failure, which the store logs once per episode (and readiness reports); each one is at debug level here.
        The write is made again when the store works again (see :meth:`_check_store`)."""
        return ensureDeferred(work).addErrback(
            lambda f: log.debug("state store: {what} failed: {why}", what=what, why=f.getErrorMessage()))

    async def _recorded(self, kernel: Kernel) -> None:
        """Wait (a little) for the write of ``kernel``'s record: a client learns of a kernel once another gateway
        sharing the store, or this one after a restart, can find it. A write that fails or hangs is the store's
        problem (logged, /readyz): the kernel is handed out anyway, and recorded when the store works again."""
        write = self._recording.pop(kernel.id, None)
        if write is not None:
            await wait_for(write, _RECORD_WAIT, self._reactor)

    async def _check_store(self) -> None:
        """Every few seconds: is the store writable? When it is (again), write what failed meanwhile: the records
        of running kernels not recorded yet (or they would be lost to a restart) and the deletions."""
        assert self.store is not None
        if not await self.store.check_writable():
            return
        for kernel_id in list(self._undeleted):
            if kernel_id not in self.kernels:
                await self._delete_record(kernel_id)
        for kernel in self.list():
            if kernel.id not in self._saved and kernel.state.value == "running":
                self._record(kernel)

    def _record(self, kernel: Kernel) -> None:
        """Record a ready kernel (again after each restart: its handle changed)."""
        handle = kernel.handle
        state = getattr(handle, "persistent_state", None)
        if self.store is None or handle is None or state is None:
            return
        env = kernel.env
        record = KernelRecord(kernel.id, env.username, kernel.spec.name, kernel.spec.driver,
                              dict(handle.connection_info), dict(state()),
                              {"kernel_id": env.kernel_id, "username": env.username,
                               "launch_timeout": env.launch_timeout, "client": env.client,
                               "inherited": env.inherited},
                              kernel.working_dir, kernel.launch_timeout, self._reactor.seconds())
        record.gateway = self.gateway_id
        record.epoch = self._epochs.setdefault(kernel.id, 1)
        write = self._store_call(self._save(record), f"recording kernel {kernel.id}")
        if not write.called:
            self._recording[kernel.id] = write
            write.addBoth(lambda result: (self._recording.pop(kernel.id, None), result)[1])

    async def _save(self, record: KernelRecord) -> None:
        assert self.store is not None
        await self.store.save(record)
        if record.kernel_id in self.kernels:
            self._saved.add(record.kernel_id)

    async def _restore(self) -> None:
        """Re-attach to every recorded kernel still alive; forget (and clean up after) the others."""
        assert self.store is not None
        records = await self.store.load()
        if records:
            log.info("state: {count} kernel(s) recorded by the previous gateway; re-attaching", count=len(records))
        await DeferredList([ensureDeferred(self._reattach(r)) for r in records], consumeErrors=True)

    async def _reattach(self, record: KernelRecord) -> Kernel | None:
        """Adopt the kernel of ``record`` (None, and the record forgotten, when it is gone)."""
        assert self.store is not None
        kernel: Kernel | None = None
        try:
            # A running kernel is managed even if its spec is no longer offered (it can be shut down).
            spec = await self.specs.get(record.spec, offered_only=False)
            driver = self._drivers.get(record.driver)
            reattach = getattr(driver, "reattach", None)
            if reattach is None:
                raise LookupError(f"driver {record.driver} cannot re-attach to kernels")
            handle = await maybeDeferred(reattach, record.kernel_id, record.handle, record.connection)
            env = KernelEnv(**record.env)
            if "KERNEL_USERNAME" not in env.client:  # recorded by an older egd with its OS user as the owner
                env = replace(env, username=UNNAMED_OWNER)
            kernel = Kernel(record.kernel_id, spec, env, driver, self._zmq, self._reactor,
                            self._policy, record.launch_timeout, record.working_dir, self._forget)
            self._watch_ownership(kernel)
            self._epochs[kernel.id] = record.epoch
            self.kernels[kernel.id] = kernel
            await kernel.adopt(handle, min(record.launch_timeout, _ADOPT_TIMEOUT))
        except Exception as exc:
            log.warn("kernel {kernel_id} ({spec}) recorded by gateway {gateway} is gone: {why}; forgotten",
                     kernel_id=record.kernel_id, spec=record.spec, gateway=record.gateway or "?",
                     why=str(exc) or type(exc).__name__)
            if kernel is not None:
                self._forget(kernel)
            else:
                await self._delete_record(record.kernel_id)
            return None
        audit.info("kernel re-attached {kernel_id} user={user} spec={spec}", kernel_id=kernel.id,
                   user=record.username, spec=record.spec)
        return kernel

    # -- several gateways sharing a store -------------------------------------------------------------------

    def _watch_ownership(self, kernel: Kernel) -> None:
        kernel.on_ready = self._record
        kernel.metrics = self.metrics
        if self.store is not None and self.store.shared:
            kernel.ownership_check = lambda: self._still_mine(kernel)
            kernel.on_taken_over = self._taken_over

    async def _still_mine(self, kernel: Kernel) -> bool:
        """Whether this gateway still runs ``kernel`` according to the shared store (asked before automatic
        restarts and culls, so that exactly one gateway acts on a kernel)."""
        assert self.store is not None
        summary = (await self.store.summaries()).get(kernel.id)
        return summary is not None and summary.gateway == self.gateway_id

    def _taken_over(self, kernel: Kernel) -> None:
        """Another gateway runs the kernel now (or it was deleted there): let go of it, stop nothing."""
        if self.kernels.get(kernel.id) is kernel:
            log.info("kernel {kernel_id} is run by another gateway now; letting go", kernel_id=kernel.id)
            kernel.let_go()
            del self.kernels[kernel.id]
        self._saved.discard(kernel.id)
        self._epochs.pop(kernel.id, None)

    async def _sync(self) -> None:
        """Let go of the kernels other gateways took over; remember the others' kernels for listings."""
        assert self.store is not None
        summaries = await self.store.summaries()
        for kernel_id, kernel in list(self.kernels.items()):
            summary = summaries.get(kernel_id)
            if kernel_id in self._saved and (summary is None or summary.gateway != self.gateway_id):
                self._taken_over(kernel)
        self._others = {k: v for k, v in summaries.items() if k not in self.kernels}

    def others(self, identity: Identity) -> Sequence[dict[str, Any]]:
        """Models of the kernels other gateways run (as of the last sync) that ``identity`` may see."""
        return [_summary_model(s) for k, s in self._others.items()
                if k not in self.kernels and identity.owns(s.username)]

    async def other(self, kernel_id: str, identity: Identity) -> dict[str, Any]:
        """The model of a kernel another gateway runs; 404 if there is none ``identity`` may see."""
        if self.store is not None and self.store.shared:
            summary = (await self.store.summaries()).get(kernel_id)
            if summary is not None and identity.owns(summary.username):
                return _summary_model(summary)
        raise KernelNotFound(kernel_id)

    async def acquire(self, kernel_id: str, identity: Identity, action: str) -> Kernel:
        """The kernel to act on: one this gateway runs, or, with a shared store, one another gateway runs,
        which this gateway then takes over (compare and set on the record: one taker wins) and re-attaches."""
        if kernel_id in self.kernels or self.store is None or not self.store.shared:
            return self.owned(kernel_id, identity, action)
        pending = self._adopting.get(kernel_id)
        if pending is None:
            pending = Deferred.fromCoroutine(self._try_take_over(kernel_id, identity, action))
            self._adopting[kernel_id] = pending
            pending.addBoth(lambda result: (self._adopting.pop(kernel_id, None), result)[1])
        failure = await shield(pending)
        if failure is not None:
            raise failure
        return self.owned(kernel_id, identity, action)

    async def _try_take_over(self, kernel_id: str, identity: Identity, action: str) -> Exception | None:
        """:meth:`_take_over`, its failure returned rather than raised: it is shared by every request that
        waits for the same take-over, and each of them raises it."""
        try:
            await self._take_over(kernel_id, identity, action)
        except Exception as exc:
            return exc
        return None

    async def _take_over(self, kernel_id: str, identity: Identity, action: str) -> None:
        assert self.store is not None
        for _ in range(3):
            record = await self.store.get(kernel_id)
            if record is None or not identity.owns(record.username):
                if record is not None:
                    audit.warn("refused {action} of kernel {kernel_id} (user={owner}) to {who}", action=action,
                               kernel_id=kernel_id, owner=record.username, who=identity.describe())
                raise KernelNotFound(kernel_id)
            if await self.store.claim(kernel_id, self.gateway_id, record.epoch):
                record.epoch += 1
                log.info("kernel {kernel_id}: taking over from gateway {gateway}", kernel_id=kernel_id,
                         gateway=record.gateway)
                if await self._reattach(record) is None:
                    raise KernelNotFound(kernel_id)
                return
        raise ServiceUnavailable(f"Kernel {kernel_id} is changing hands between gateways; try again")

    async def _stop_kernels(self) -> None:
        """At gateway stop: with a state store and ``state.on_stop: keep``, let recorded kernels run on (the
        next start re-attaches them); shut down the others."""
        if self.store is None or self._config.state.on_stop != "keep":
            await self.shutdown_all()
            return
        if self._launches:
            await DeferredList([shield(d) for d in self._launches.values()], consumeErrors=True)
        kept = [k for k in self.list()
                if k.handle is not None and getattr(k.handle, "persistent_state", None) is not None
                and k.state.value == "running"]
        for kernel in kept:
            kernel.let_go()
            del self.kernels[kernel.id]
        if kept:
            log.info("{count} kernel(s) keep running; the next start of egd re-attaches them "
                     "(state.on_stop: keep)", count=len(kept))
        await self.shutdown_all()

    async def shutdown_kernel(self, kernel_id: str, identity: Identity = LOCAL_OPERATOR) -> None:
        """Stop one of ``identity``'s kernels (graceful, then forceful)."""
        await (await self.acquire(kernel_id, identity, "shutdown")).shutdown()

    async def shutdown_all(self) -> None:
        """Stop every kernel, in parallel; wait for launches in flight first."""
        if self._launches:
            await DeferredList([shield(d) for d in self._launches.values()], consumeErrors=True)
        kernels = self.list()
        if kernels:
            log.info("stopping {count} kernel(s)", count=len(kernels))
        await DeferredList([ensureDeferred(k.shutdown()) for k in kernels], consumeErrors=True)
        await DeferredList([k.wait_background() for k in kernels], consumeErrors=True)

    def startService(self) -> Deferred[None] | None:  # noqa: N802 - Twisted hook
        """Start culling (the culler lives and dies with the manager); open the state store and re-attach to
        the kernels it records before the gateway starts serving."""
        super().startService()
        self.culler.startService()
        if self.store is None:
            self.pool.start()
            return None
        store = self.store

        async def restore() -> None:
            await store.open()  # an SQLite store is locked from here on: no other gateway re-attaches our kernels
            if store.shared:
                # Kernels are taken over when they are used; a sync notices the ones others took. A failed sync
                # (the database is away) is logged once and tried again: the loop must not end with it.
                self._syncing = ResilientLoop(lambda: ensureDeferred(self._sync()), _SYNC_INTERVAL, self._reactor,
                                              "state store: sync with the other gateways")
                self._syncing.start()
            else:
                await self._restore()
            self._store_check = ResilientLoop(lambda: ensureDeferred(self._check_store()), _STORE_CHECK_INTERVAL,
                                              self._reactor, "state store: write check")
            self._store_check.start(now=False)
            self.pool.start()

        return ensureDeferred(restore())

    def stopService(self) -> Deferred[None]:  # noqa: N802 - Twisted hook
        """Refuse new kernels, stop the existing ones, close the ZeroMQ context."""
        self._accepting = False
        super().stopService()
        self.culler.stopService()  # a cull in flight holds its kernel's lock: stopping that kernel waits for it
        async def stop() -> None:
            for loop in (self._syncing, self._store_check):
                if loop is not None:
                    loop.stop()
            try:
                await self.pool.drain()
                await self._stop_kernels()
            finally:
                shutdown_factory(self._zmq)
                if self.store is not None:
                    self.store.close()

        return ensureDeferred(stop())
