"""The kernel manager: every kernel of this gateway, by id, over the driver registry.

It composes what a kernel's life involves around the table of kernels: admission of starts and access
(:mod:`egd.kernels.admission`), records in the state store and re-attaching (:mod:`egd.kernels.records`),
sharing kernels between gateways (:mod:`egd.kernels.sharing`), pools (:mod:`egd.kernels.pool`), culling
(:mod:`egd.kernels.culler`), metrics and readiness; it is the one place that builds a :class:`Kernel`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred
from twisted.logger import Logger

from egd.auth import LOCAL_OPERATOR, Identity
from egd.config import Config, KernelsConfig, ServerConfig, missing_driver
from egd.driverapi import KernelDriver
from egd.errors import KernelNotFound, ServiceUnavailable
from egd.kernels.admission import Admission
from egd.kernels.culler import KernelCuller
from egd.kernels.env import KernelEnv, build_kernel_env
from egd.kernels.hub import ReplayLimits
from egd.kernels.kernel import Kernel, KernelHooks, KernelPolicy
from egd.kernels.pool import KernelPool
from egd.kernels.records import KernelRecords, persistable
from egd.kernels.sharing import GatewaySharing
from egd.kernels.specs import KernelSpecInfo, KernelSpecStore
from egd.kernels.zmqio import IKernelReactor, ReactorZmqFactory, shutdown_factory
from egd.metrics import GatewayMetrics, Readiness, services_running
from egd.registry import DriverRegistry
from egd.state import StateStore
from egd.util import describe, shield

log = Logger()
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
            and not driver.impersonates)


def _launch_timeout(env: KernelEnv, spec: KernelSpecInfo, kc: KernelsConfig) -> float:
    """A client may ask for more or less time (KERNEL_LAUNCH_TIMEOUT); otherwise the spec's default, then the
    gateway's; never more than the gateway's maximum."""
    if "KERNEL_LAUNCH_TIMEOUT" not in env.client and spec.launch_timeout:
        return min(spec.launch_timeout, kc.max_launch_timeout)
    return env.launch_timeout


def _policy(kc: KernelsConfig, sc: ServerConfig) -> KernelPolicy:
    """The timing and limits of every kernel, from the configuration."""
    return KernelPolicy(
        shutdown_wait=kc.shutdown_wait, restart_limit=kc.restart_limit,
        stable_start_seconds=kc.stable_start_seconds, heartbeat_interval=kc.heartbeat_interval,
        heartbeat_misses=kc.heartbeat_misses,
        replay=ReplayLimits(sc.replay_buffer_messages, sc.replay_buffer_bytes, sc.replay_buffer_seconds,
                            sc.replay_buffer_sessions, sc.client_backlog_messages, sc.client_backlog_bytes))


class KernelManager(Service):
    """Starts, finds, lists and stops kernels; stops them all when the gateway stops."""

    def __init__(self, config: Config, reactor: IKernelReactor, specs: KernelSpecStore, drivers: DriverRegistry,
                 environ: Mapping[str, str] | None = None, store: StateStore | None = None) -> None:
        """``store``: where running kernels are recorded, so that a
        restarted gateway re-attaches to them (None: nowhere)."""
        self.name = "kernels"
        self.store = store
        self._config = config
        self._reactor = reactor
        self.specs = specs
        self._drivers = drivers
        self._environ = dict(os.environ if environ is None else environ)
        self._zmq = ReactorZmqFactory(reactor, max_message_size=config.kernels.max_message_size)
        self.kernels: dict[str, Kernel] = {}
        self._launches: dict[str, Deferred[Any]] = {}
        self._accepting = True
        self._policy = _policy(config.kernels, config.server)
        #: This gateway's metrics (in a registry of its own) and the checks behind GET /readyz.
        self.metrics = GatewayMetrics(self.list, lambda: self.drivers)
        self.readiness = Readiness()
        self.readiness.add("drivers", services_running(lambda: drivers.names, "drivers"))
        self.readiness.add("kernels", self._accepts_work)
        self._admission = Admission(lambda: self._config, self.kernels, specs, drivers, self.metrics)
        self._records = KernelRecords(store, self.kernels, reactor, specs, drivers, self._build,
                                      orphan_age=config.kernels.max_launch_timeout)
        self._sharing: GatewaySharing | None = None
        if store is not None:
            self.readiness.add("store", lambda: store.problem)
            if store.shared:
                self._sharing = GatewaySharing(store, self._records, self.kernels, self._admission, reactor)
        sharing = self._sharing
        #: The hooks of the kernels this gateway manages, and of pooled kernels (nobody's yet: not recorded).
        self._hooks = KernelHooks(
            on_gone=self._forget, on_ready=self._records.record, metrics=self.metrics,
            ownership_check=None if sharing is None else sharing.still_mine,
            on_taken_over=None if sharing is None else sharing.taken_over)
        self._pooled_hooks = KernelHooks(on_gone=self._forget, metrics=self.metrics)
        kc = config.kernels
        #: Ready kernels per kernelspec (kernels.pools), started when the manager starts.
        self.pool = KernelPool(kc.pools, self._start_pooled, reactor, kc.pool_fill_at_once)
        #: Idle and busy kernels are culled on the same clock as everything else (task.Clock in tests).
        self.culler = KernelCuller(kc, self.list, reactor)

    def reconfigure(self, config: Config) -> None:
        """Use ``config`` from now on for what is read at use time (limits, user lists, defaults, timeouts of
        launches to come); see ``egd.systemd.LIVE_KEYS``."""
        self._config = config

    @property
    def gateway_id(self) -> str:
        """This process among the gateways sharing a store."""
        return self._records.gateway_id

    @property
    def default_kernel_name(self) -> str:
        """The kernelspec used when a request names none."""
        return self._config.kernels.default_kernel_name

    def owned(self, kernel_id: str, identity: Identity, action: str) -> Kernel:
        """The kernel if ``identity`` may use it; otherwise 404, exactly as if it did not exist (a user must not
        learn the ids of other users' kernels), with an audit line."""
        return self._admission.owned(kernel_id, identity, action)

    def visible(self, identity: Identity) -> list[Kernel]:
        """The kernels ``identity`` may see (all of them for admins and trusted clients)."""
        return [k for k in self.kernels.values() if identity.owns(k.env.username)]

    def get(self, kernel_id: str) -> Kernel:
        """The kernel with this id; :class:`KernelNotFound` otherwise."""
        return self._admission.get(kernel_id)

    def list(self) -> list[Kernel]:
        """Every kernel, including those still starting."""
        return list(self.kernels.values())

    @property
    def drivers(self) -> Mapping[str, KernelDriver]:
        """The gateway's drivers, by name (for their health: ``/metrics``, the status page)."""
        return self._drivers.names if self._drivers is not None else {}

    def allows(self, spec: KernelSpecInfo, user: str, groups: frozenset[str] | None = None) -> bool:
        """Whether ``user`` may use ``spec`` (see :meth:`Admission.allows`)."""
        return self._admission.allows(spec, user, groups)

    def _build(self, spec: KernelSpecInfo, env: KernelEnv, driver: KernelDriver, launch_timeout: float,
               working_dir: str | None, hooks: KernelHooks | None = None) -> Kernel:
        """The one place that builds a kernel (not started yet); managed with this gateway's hooks unless
        ``hooks`` says otherwise."""
        return Kernel(spec, env, driver, zmq=self._zmq, clock=self._reactor, policy=self._policy,
                      launch_timeout=launch_timeout, working_dir=working_dir, hooks=hooks or self._hooks)

    def _kernel_env(self, requested: Any) -> KernelEnv:
        """The checked environment of a launch for the request's ``env`` (None: a pooled kernel's)."""
        kc = self._config.kernels
        return build_kernel_env(
            requested, client_envs=kc.client_envs, inherited_envs=kc.inherited_envs, gateway_environ=self._environ,
            default_launch_timeout=kc.launch_timeout, max_launch_timeout=kc.max_launch_timeout)

    async def start_kernel(self, name: str | None, env: Any, identity: Identity = LOCAL_OPERATOR) -> Kernel:
        """Start a kernel of kernelspec ``name`` (default if None) with the request's ``env``, for ``identity``
        (a user-bound identity starts kernels as itself only)."""
        if not self._accepting:
            raise self._admission.refuse("unavailable", ServiceUnavailable("The gateway is shutting down"))
        env = self._admission.claim_user(env, identity)
        kernel_env = self._kernel_env(env)
        self._admission.check_new_id(kernel_env.kernel_id)
        spec, driver = await self._admission.admit(name or self.default_kernel_name, kernel_env, identity)
        kc = self._config.kernels
        working_dir = kernel_env.client.get("KERNEL_WORKING_DIR") or kc.working_dir
        pooled = self.pool.take(spec.name) if _poolable(env, kernel_env, spec, driver) else None
        if pooled is not None:
            return await self._hand_out(pooled, kernel_env, working_dir)
        kernel = self._build(spec, kernel_env, driver, _launch_timeout(kernel_env, spec, kc), working_dir)
        self.kernels[kernel.id] = kernel
        log.info("kernel {kernel_id}: starting {spec} for {user} with driver {driver}", kernel_id=kernel.id,
                 spec=spec.name, user=kernel_env.username, driver=spec.driver)
        audit.info("kernel start {kernel_id} user={user} spec={spec}", kernel_id=kernel.id, user=kernel_env.username,
                   spec=spec.name)
        await self._launch(kernel)
        await self._records.recorded(kernel)
        return kernel

    async def _launch(self, kernel: Kernel) -> None:
        """Start ``kernel`` (its launch is waited for at gateway stop); a client that hangs up mid-launch
        cancels its request, not the launch."""
        launch = ensureDeferred(kernel.start())
        self._launches[kernel.id] = launch
        launch.addBoth(lambda result: (self._launches.pop(kernel.id, None), result)[1])
        waiter = shield(launch)
        launch.addErrback(lambda _: None)  # the failure reaches the client through ``waiter``
        try:
            await waiter
        except CancelledError:
            if self._accepting:
                raise  # the client went away
            raise ServiceUnavailable(f"The gateway is shutting down: the launch of kernel {kernel.id} was "
                                     "abandoned") from None

    async def _start_pooled(self, name: str) -> Kernel:
        """Start a kernel for the pool: no request, so no user-specific launch state."""
        kc = self._config.kernels
        env = self._kernel_env(None)
        spec = await self.specs.get(name)
        kernel = self._build(spec, env, self._drivers.get(spec.driver), _launch_timeout(env, spec, kc),
                             kc.working_dir, self._pooled_hooks)
        await kernel.start()
        return kernel

    async def _hand_out(self, kernel: Kernel, env: KernelEnv, working_dir: str | None) -> Kernel:
        """Give a pooled kernel to the request's user, in the working directory it asked for."""
        kernel.assign(replace(env, kernel_id=kernel.id), working_dir, self._hooks)
        self.kernels[kernel.id] = kernel
        asked = env.client.get("KERNEL_WORKING_DIR")
        if asked and os.path.isdir(asked):
            try:
                await kernel.execute_quietly(f"__import__('os').chdir({asked!r})")
            except Exception as exc:
                log.warn("kernel {kernel_id}: could not change to {path}: {why}", kernel_id=kernel.id, path=asked,
                         why=describe(exc))
        self._records.record(kernel)
        await self._records.recorded(kernel)
        log.info("kernel {kernel_id}: {spec} from the pool for {user}", kernel_id=kernel.id, spec=kernel.spec.name,
                 user=env.username)
        audit.info("kernel start {kernel_id} user={user} spec={spec} pooled=yes", kernel_id=kernel.id,
                   user=env.username, spec=kernel.spec.name)
        return kernel

    def _accepts_work(self) -> str | None:
        """Readiness: None while the manager runs and takes new kernels, otherwise why not."""
        if not self._accepting:  # first: stopping also clears ``running``, and this says more
            return "the gateway is shutting down"
        if not self.running:
            return "the kernel manager is not running"
        return None

    def _forget(self, kernel: Kernel) -> None:
        """The ``on_gone`` hook: a kernel shut down or died."""
        if self.kernels.get(kernel.id) is kernel:
            del self.kernels[kernel.id]
            if self._sharing is not None:
                self._sharing.forget(kernel.id)
            self._records.forget(kernel.id)

    # -- several gateways sharing a store -------------------------------------------------------------------

    def others(self, identity: Identity) -> Sequence[dict[str, Any]]:
        """Models of the kernels other gateways run (as of the last sync) that ``identity`` may see."""
        return [] if self._sharing is None else self._sharing.others(identity)

    async def other(self, kernel_id: str, identity: Identity) -> dict[str, Any]:
        """The model of a kernel another gateway runs; 404 if there is none ``identity`` may see."""
        if self._sharing is None:
            raise KernelNotFound(kernel_id)
        return await self._sharing.other(kernel_id, identity)

    async def acquire(self, kernel_id: str, identity: Identity, action: str) -> Kernel:
        """The kernel to act on: one this gateway runs, or, with a shared store, one another gateway runs,
        which this gateway then takes over (compare and set on the record: one taker wins) and re-attaches."""
        if self._sharing is None:
            return self.owned(kernel_id, identity, action)
        return await self._sharing.acquire(kernel_id, identity, action)

    # -- stopping ---------------------------------------------------------------------------------------

    def abandon_launches(self) -> None:
        """The gateway stops: refuse new kernels and abandon the launches in flight (each driver stops what it
        had started; their clients get a 503), so that a stop never waits for a launch timeout. Once: a second
        cancel would cut short a driver's cleanup."""
        if not self._accepting:
            return
        self._accepting = False
        launches = list(self._launches.values())
        if launches:
            log.info("abandoning {count} launch(es) in flight", count=len(launches))
        for launch in launches:
            launch.cancel()

    async def _wait_launches(self) -> None:
        if self._launches:
            await DeferredList([shield(d) for d in self._launches.values()], consumeErrors=True)

    async def _stop_kernels(self) -> None:
        """At gateway stop: with a state store and ``state.on_stop: keep``, let recorded kernels run on (the
        next start re-attaches them); shut down the others."""
        if self.store is not None and self._config.state.on_stop == "keep":
            await self._wait_launches()
            kept = [k for k in self.list() if persistable(k) and k.state.value == "running"]
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
        await self._wait_launches()
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
        Deferred.fromCoroutine(self._announce_specs()).addErrback(
            lambda f: log.failure("reading the kernelspecs at start failed", f))
        if self.store is None:
            self.pool.start()
            return None
        store = self.store

        async def restore() -> None:
            await store.open()  # an SQLite store is locked from here on: no other gateway re-attaches our kernels
            if self._sharing is not None:
                # Kernels are taken over when they are used; a sync notices the ones others took.
                self._sharing.startService()
            else:
                await self._records.restore()
            self._records.startService()
            self.pool.start()

        return ensureDeferred(restore())

    async def _announce_specs(self) -> None:
        """Say at start which kernelspecs use Enterprise Gateway's launcher protocol (unauthenticated payloads,
        see docs/security.rst) and which name a driver this gateway does not run."""
        specs = await self.specs.all()
        eg = sorted(name for name, spec in specs.items() if spec.uses_eg_protocol)
        if eg:
            log.info("kernelspecs using Enterprise Gateway's launcher protocol (payloads accepted only from the "
                     "launched host, inside the launch window): {names}", names=", ".join(eg))
        for name, spec in sorted(specs.items()):
            if spec.driver not in self._drivers.names:
                log.warn("kernelspec {name} cannot be started here: it needs {what}", name=name,
                         what=missing_driver(spec.driver, self._drivers.names))

    def stopService(self) -> Deferred[None]:  # noqa: N802 - Twisted hook
        """Refuse new kernels, abandon launches in flight, stop the existing kernels, close the ZeroMQ context."""
        self.abandon_launches()
        super().stopService()
        self.culler.stopService()  # a cull in flight holds its kernel's lock: stopping that kernel waits for it

        async def stop() -> None:
            for child in (self._sharing, self._records):
                if child is not None and child.running:
                    child.stopService()
            try:
                await self.pool.drain()
                await self._stop_kernels()
            finally:
                shutdown_factory(self._zmq)
                if self.store is not None:
                    self.store.close()

        return ensureDeferred(stop())
