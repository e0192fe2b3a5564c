"""Culling: kernels idle or busy for too long are shut down, as Jupyter Server's MappingKernelManager does.

Every ``kernels.cull_interval`` seconds the culler looks at each running kernel:

- *idle*: ``execution_state`` is ``idle`` and nothing has happened for ``cull_idle_timeout`` seconds
  (``Kernel.last_activity``: a client's message or connection, or any message from the kernel, output
  included);
- *busy*: ``execution_state`` has been ``busy`` for ``cull_busy_timeout`` seconds in a row
  (``Kernel.busy_since``). Jupyter Server's ``cull_busy`` is a flag that applies the idle timeout to busy
  kernels; egd gives busy kernels a timeout of their own, so that a long computation is not mistaken for an
  abandoned one;
- kernels with a WebSocket client are left alone unless ``cull_connected``.

A timeout of 0 switches that kind of culling off. A kernelspec overrides the three in ``metadata.egd.cull``
(``idle_timeout``, ``busy_timeout``, ``connected``). A culled kernel is shut down through
``Kernel.shutdown``, as a DELETE would: graceful, with its audit line, its clients closed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from egd.config import KernelsConfig
from egd.kernels.kernel import Kernel, KernelState
from egd.kernels.specs import KernelSpecInfo
from egd.util import Background, ResilientLoop

log = Logger()
audit = Logger(namespace="egd.audit")


@dataclass(frozen=True)
class CullPolicy:
    """The culling settings that apply to one kernel: its spec's overrides over the gateway's defaults."""

    idle_timeout: float = 0.0
    busy_timeout: float = 0.0
    connected: bool = False

    @classmethod
    def for_spec(cls, config: KernelsConfig, spec: KernelSpecInfo) -> CullPolicy:
        """``spec``'s ``metadata.egd.cull`` where it sets a value, the gateway's ``kernels.cull_*`` otherwise."""
        own = spec.cull
        return cls(
            idle_timeout=config.cull_idle_timeout if own.idle_timeout is None else own.idle_timeout,
            busy_timeout=config.cull_busy_timeout if own.busy_timeout is None else own.busy_timeout,
            connected=config.cull_connected if own.connected is None else own.connected,
        )


@dataclass(frozen=True)
class _Verdict:
    """Why a kernel is due for culling: ``reason`` (idle or busy) for ``seconds``, over ``timeout``."""

    reason: str
    seconds: float
    timeout: float


def verdict(kernel: Kernel, policy: CullPolicy, now: float) -> _Verdict | None:
    """Whether ``kernel`` is due for culling at ``now`` under ``policy`` (None: leave it)."""
    # Starting, restarting or stopping kernels are someone else's business (their own deadlines apply).
    if kernel.state is not KernelState.RUNNING:
        return None
    if len(kernel.hub) and not policy.connected:
        return None
    if kernel.execution_state == "idle" and policy.idle_timeout > 0:
        idle = now - kernel.last_activity
        if idle >= policy.idle_timeout:
            return _Verdict("idle", idle, policy.idle_timeout)
    if kernel.execution_state == "busy" and policy.busy_timeout > 0:
        busy = now - kernel.busy_since
        if busy >= policy.busy_timeout:
            return _Verdict("busy", busy, policy.busy_timeout)
    return None


class KernelCuller(Service):
    """Checks every ``cull_interval`` seconds (on the injected clock) and culls the kernels that are due."""

    def __init__(self, config: KernelsConfig, kernels: Callable[[], Iterable[Kernel]], clock: IReactorTime) -> None:
        self.name = "culler"
        self._config = config
        self._kernels = kernels
        self._clock = clock
        # A pass that fails (a kernel table that cannot be read) is logged and the next one runs all the same.
        self._loop = ResilientLoop(self.check, config.cull_interval, clock, "kernel culler")
        self._culling: set[str] = set()
        self._background = Background()

    def startService(self) -> None:  # noqa: N802 - Twisted hook
        """Start checking. Always, even when the gateway's timeouts are 0: a kernelspec may turn culling on for
        its own kernels, and a pass over the kernel table costs next to nothing."""
        super().startService()
        # now=False: a gateway that has just started has no kernel that could be due.
        self._loop.start(now=False)

    def stopService(self) -> Deferred[Any]:  # noqa: N802 - Twisted hook
        """Stop checking; fires when culls in flight have finished."""
        super().stopService()
        self._loop.stop()
        return self._background.wait()

    def check(self) -> list[Deferred[None]]:
        """One pass: cull every kernel that is due now; the shutdowns started (tests wait for them)."""
        now = self._clock.seconds()
        started = []
        for kernel in list(self._kernels()):
            try:
                due = verdict(kernel, CullPolicy.for_spec(self._config, kernel.spec), now)
                if due is not None:
                    started.append(self.cull(kernel, due))
            except Exception:
                # One odd kernel must not stop the loop (LoopingCall ends on an exception) for all the others.
                log.failure("kernel {kernel_id}: culling check failed", kernel_id=kernel.id)
        return started

    def cull(self, kernel: Kernel, due: _Verdict) -> Deferred[None]:
        """Shut ``kernel`` down because of ``due``: the one place where the decision to cull is carried out.

        With several gateways sharing a store, only the gateway the store names as the kernel's is its culler:
        the shutdown first asks the store (``Kernel.let_go_if_taken_over``) and lets go instead when another gateway
        has taken the kernel over, so exactly one gateway culls a given kernel.
        """
        if kernel.id in self._culling:
            return succeed(None)
        self._culling.add(kernel.id)
        log.info("kernel {kernel_id} culled: {reason} for {seconds:.1f}s (timeout {timeout:g}s)",
                 kernel_id=kernel.id, reason=due.reason, seconds=due.seconds, timeout=due.timeout)
        audit.info("kernel cull {kernel_id} user={user} spec={spec} reason={reason}", kernel_id=kernel.id,
                   user=kernel.env.username, spec=kernel.spec.name, reason=due.reason)
        if kernel.metrics is not None:
            kernel.metrics.kernel_culled(kernel.spec.name, due.reason)
        done: Deferred[None] = self._background.run(_cull(kernel), f"culling kernel {kernel.id}")

        def finished(result: Any) -> Any:
            self._culling.discard(kernel.id)
            return result

        return done.addBoth(finished)


async def _cull(kernel: Kernel) -> None:
    """Shut the kernel down, unless another gateway runs it now (then only let go of it)."""
    if not await kernel.let_go_if_taken_over():
        await kernel.shutdown()
