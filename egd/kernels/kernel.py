"""One kernel's life: launch, readiness, routing of its messages, interrupt, restart, shutdown, death.

The states and the transitions between them are written down in ``TRANSITIONS``; a lock serializes start,
restart and shutdown, so a DELETE that arrives during a restart waits for it and then stops the kernel.
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredLock, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from egd.driverapi import ExitStatus, KernelDriver, LaunchedKernel, LaunchRequest
from egd.errors import Conflict, KernelGone, LaunchFailed, LaunchTimeout
from egd.kernels import wire
from egd.kernels.channels import Heartbeat, KernelChannels
from egd.kernels.env import KernelEnv
from egd.kernels.hub import ClientHub, KernelClient, Preview, ReplayLimits
from egd.kernels.specs import KernelSpecInfo
from egd.kernels.zmqio import QueueFull, ReactorZmqFactory
from egd.util import Background, describe, wait_for

log = Logger()
audit = Logger(namespace="egd.audit")

_MAX_PENDING = 100_000
_MAX_HELD = 1000
_SLOW_PROBE = 1.0
_FAST_PROBE = 0.02


class KernelState(enum.Enum):
    """Where a kernel is in its life."""

    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    TERMINATING = "terminating"
    TERMINATED = "terminated"
    DEAD = "dead"


TRANSITIONS: dict[KernelState, frozenset[KernelState]] = {
    KernelState.STARTING: frozenset({KernelState.RUNNING, KernelState.TERMINATING, KernelState.DEAD}),
    KernelState.RUNNING: frozenset({KernelState.RESTARTING, KernelState.TERMINATING, KernelState.DEAD}),
    KernelState.RESTARTING: frozenset({KernelState.RUNNING, KernelState.TERMINATING, KernelState.DEAD}),
    KernelState.TERMINATING: frozenset({KernelState.TERMINATED}),
    KernelState.TERMINATED: frozenset(),
    KernelState.DEAD: frozenset(),
}


@dataclass(frozen=True)
class KernelPolicy:
    """Timing and limits that apply to a kernel."""

    shutdown_wait: float = 5.0
    restart_limit: int = 5
    stable_start_seconds: float = 10.0
    heartbeat_interval: float = 3.0
    heartbeat_misses: int = 3
    replay: ReplayLimits = field(default_factory=ReplayLimits)


class KernelMetrics(Protocol):
    """The events a kernel counts (:class:`egd.metrics.GatewayMetrics` is one; declared here so that the kernel does
    not import the metrics, which read the kernel table)."""

    def launch_succeeded(self, driver: str, seconds: float) -> None:
        """A launch with ``driver`` was ready after ``seconds``."""

    def launch_failed(self, driver: str, exc: BaseException) -> None:
        """A launch with ``driver`` failed with ``exc``."""

    def kernel_restarted(self, spec: str, kind: str) -> None:
        """A restart (``user`` or ``automatic``) of a kernel of ``spec`` began."""

    def kernel_culled(self, spec: str, reason: str) -> None:
        """The culler shut down a kernel of ``spec`` for ``reason``."""


@dataclass(frozen=True)
class KernelHooks:
    """What a kernel tells, or asks, whoever manages it; given at construction (a pooled kernel gets its owner's
    hooks when it is handed out, see :meth:`Kernel.assign`)."""

    #: The kernel is gone for good (shut down or dead): drop it.
    on_gone: Callable[[Kernel], None]
    #: Each incarnation of the kernel is ready (the manager records it in the state store).
    on_ready: Callable[[Kernel], None] | None = None
    #: With several gateways: whether this gateway still runs the kernel (asked before acting on its own) ...
    ownership_check: Callable[[Kernel], Awaitable[bool]] | None = None
    #: ... and what to do when it does not.
    on_taken_over: Callable[[Kernel], None] | None = None
    #: The gateway's metrics (None: not counted, as in unit tests).
    metrics: KernelMetrics | None = None


async def _kill(handle: LaunchedKernel) -> None:
    """The driver's forceful kill; a failure is logged (the caller goes on cleaning up)."""
    try:
        await handle.kill()
    except Exception as exc:
        log.warn("kill of {where} failed: {why}", where=handle.describe(), why=describe(exc))


class Kernel:
    """A kernel egd manages, whichever driver runs it."""

    def __init__(self, spec: KernelSpecInfo, env: KernelEnv, driver: KernelDriver, *, zmq: ReactorZmqFactory,
                 clock: IReactorTime, policy: KernelPolicy, launch_timeout: float, working_dir: str | None,
                 hooks: KernelHooks) -> None:
        """A kernel of ``spec`` with ``env`` (its id is ``env.kernel_id``), not started yet. Built by
        :class:`egd.kernels.manager.KernelManager` only (one place), or by tests."""
        kernel_id = env.kernel_id
        self.id = kernel_id
        self.spec = spec
        self.env = env
        self._driver = driver
        self._zmq = zmq
        self._clock = clock
        self._policy = policy
        self._launch_timeout = launch_timeout
        self._working_dir = working_dir
        self._hooks = hooks
        self._lock = DeferredLock()
        self._background = Background()
        self.state = KernelState.STARTING
        self.execution_state = "starting"
        self.last_activity = clock.seconds()
        #: When the kernel last reported ``busy`` after another state (the culler's busy timeout).
        self.busy_since = clock.seconds()
        self.reason = ""
        self._restart_streak = 0
        self._started_at = clock.seconds()
        self._handle: LaunchedKernel | None = None
        self._channels: KernelChannels | None = None
        self._heartbeat: Heartbeat | None = None
        #: Whether this incarnation's silence while alive was logged (once: a busy kernel is silent often).
        self._silent_reported = False
        self._pending: dict[str, str | Callable[[str, wire.RawMessage], None]] = {}
        self._held: list[tuple[str, str, wire.RawMessage]] = []
        self._iopub_seen = False
        self._on_iopub_seen: Callable[[], None] | None = None
        self._internal_session = f"egd-{kernel_id}"
        self._internal_marker = f'"{self._internal_session}"'.encode()
        self.hub = ClientHub(kernel_id, clock, policy.replay)

    @property
    def hooks(self) -> KernelHooks:
        """How the kernel tells its manager what happens to it."""
        return self._hooks

    @property
    def metrics(self) -> KernelMetrics | None:
        """The gateway's metrics (None: not counted)."""
        return self._hooks.metrics

    # -- model ------------------------------------------------------------------------------------------

    def model(self) -> dict[str, Any]:
        """The REST model: Jupyter Server's shape, with ``reason`` while starting or after a failure."""
        model: dict[str, Any] = {
            "id": self.id,
            "name": self.spec.name,
            "last_activity": wire.utc_timestamp(datetime.fromtimestamp(self.last_activity, timezone.utc)),
            "execution_state": self.execution_state,
            "connections": len(self.hub),
        }
        if self.reason:
            model["reason"] = self.reason
        if self._handle is not None and self.state is KernelState.RUNNING:
            # Where the driver runs it (host, pid, YARN application): what an operator looks for first.
            model["location"] = self._handle.describe()
        return model

    def _set_state(self, new: KernelState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"kernel {self.id}: {self.state.value} -> {new.value} is not allowed")
        log.debug("kernel {kernel_id} {old} -> {new}", kernel_id=self.id, old=self.state.value, new=new.value)
        self.state = new

    def _touch(self) -> None:
        self.last_activity = self._clock.seconds()

    # -- launching --------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Launch the kernel and wait until it answers; on failure nothing of it is left running."""
        async with self._lock:
            began = self._clock.seconds()
            try:
                await self._launch()
            except BaseException as exc:
                if self.metrics is not None:
                    self.metrics.launch_failed(self.spec.driver, exc)
                self._die(f"launch failed: {exc}", announce=False)
                raise
            if self.metrics is not None:
                self.metrics.launch_succeeded(self.spec.driver, self._clock.seconds() - began)
            self._set_state(KernelState.RUNNING)
            self._flush_held()

    async def adopt(self, handle: LaunchedKernel, timeout: float) -> None:
        """Take over a kernel that is already running (a previous gateway started it): connect and check that
        it answers within ``timeout``, as after a launch; on failure the caller cleans up."""
        async with self._lock:
            try:
                await self._connect(handle, timeout)
            except BaseException as exc:
                self._die(f"re-attaching failed: {exc}", announce=False)
                raise
            self._set_state(KernelState.RUNNING)

    def let_go(self) -> None:
        """Let go of the kernel without stopping it (the gateway stops; the next one re-attaches)."""
        self._disconnect()
        self.hub.close_all(1001, "the gateway is restarting")

    def _disconnect(self) -> None:
        """Stop the heartbeat and close the ZeroMQ sockets (the kernel itself is not touched)."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        if self._channels is not None:
            self._channels.close()
            self._channels = None

    def assign(self, env: KernelEnv, working_dir: str | None, hooks: KernelHooks) -> None:
        """Hand a pooled kernel to its user: from now on it is theirs (ownership, limits, restarts), and managed
        with ``hooks`` (recorded, shared with other gateways)."""
        self.env = env
        self._working_dir = working_dir
        self._hooks = hooks
        self._touch()

    async def let_go_if_taken_over(self) -> bool:
        """Before acting on the kernel on its own (automatic restart, cull): True, and the kernel let go of
        without being stopped, when another gateway runs it now (it restarted or deleted it there)."""
        check = self._hooks.ownership_check
        if check is None or await check(self):
            return False
        self.let_go()
        if self._hooks.on_taken_over is not None:
            self._hooks.on_taken_over(self)
        return True

    async def execute_quietly(self, code: str, timeout: float = 5.0) -> None:
        """Run ``code`` in the kernel as egd (no history, no output to clients); fails if it raises."""
        replied: Deferred[wire.RawMessage] = Deferred()
        content = {"code": code, "silent": True, "store_history": False, "user_expressions": {},
                   "allow_stdin": False, "stop_on_error": True}
        self._request("shell", "execute_request", content,
                      lambda channel, message: None if replied.called else replied.callback(message))
        replied.addTimeout(timeout, self._clock)
        reply = await replied
        status = reply.json_content().get("status")
        if status != "ok":
            raise RuntimeError(f"the kernel answered {status}")

    @property
    def handle(self) -> LaunchedKernel | None:
        """The driver's handle of the running kernel."""
        return self._handle

    @property
    def working_dir(self) -> str | None:
        """The working directory asked for at start."""
        return self._working_dir

    @property
    def launch_timeout(self) -> float:
        """Seconds a launch of this kernel may take."""
        return self._launch_timeout

    async def _launch(self) -> None:
        request = LaunchRequest(self.id, self.spec, self.env.for_spec(self.spec.env), self.env.username,
                                self._working_dir, self._launch_timeout, self._launch_progress)
        self.reason = f"launching with driver {self.spec.driver}"
        self._started_at = self._clock.seconds()
        await self._connect(await self._driver.launch(request))

    async def _connect(self, handle: LaunchedKernel, timeout: float | None = None) -> None:
        """Connect to a started kernel and wait until it is ready (released again if it is not)."""
        self._handle = handle
        self._iopub_seen = False
        try:
            # Inside the try: when even the sockets cannot be opened (no file descriptors left), the kernel that
            # was just started must not be left running.
            self._channels = KernelChannels(self._zmq, handle.connection_info, self.id, self._on_message,
                                            _OutputPreviewer(self))
            await self._wait_ready(handle, self._launch_timeout if timeout is None else timeout)
            # A kernel whose process egd watches itself (a child, or a pidfd) is known dead the moment it ends, and
            # a silent one is only ever found alive: pinging it would cost the gateway CPU for nothing (0.4 ms a
            # ping, 7 % of a core for 500 kernels every 3 s).
            if not getattr(handle, "observes_exit", False):
                self._heartbeat = Heartbeat(self._zmq, handle.connection_info, self._clock,
                                            self._policy.heartbeat_interval, self._policy.heartbeat_misses,
                                            lambda silence: self._heartbeat_lost(handle, silence))
        except BaseException:
            await self._release(handle, graceful=False)
            raise
        self.reason = ""
        self.execution_state = "idle"  # it has just answered; later status messages keep this current
        self._silent_reported = False
        if self._heartbeat is not None:
            self._heartbeat.start()
        handle.exited.addCallback(self._exited, handle)
        log.info("kernel {kernel_id} ({spec}) is ready: {where}", kernel_id=self.id, spec=self.spec.name,
                 where=handle.describe())
        if self._hooks.on_ready is not None:
            self._hooks.on_ready(self)

    def _launch_progress(self, text: str) -> None:
        if self.state in (KernelState.STARTING, KernelState.RESTARTING):
            self.reason = text

    async def _wait_ready(self, handle: LaunchedKernel, timeout: float) -> None:
        """Until the kernel answers kernel_info *and* its iopub reaches us (so no client output is lost)."""
        ready: Deferred[None] = Deferred()
        replied = False
        probe = LoopingCall(lambda: self._request("shell", "kernel_info_request", {}, on_reply))
        probe.clock = self._clock

        def check() -> None:
            if replied and self._iopub_seen and not ready.called:
                ready.callback(None)

        def on_reply(channel: str, message: wire.RawMessage) -> None:
            nonlocal replied
            if message.msg_type == "kernel_info_reply" and not replied:
                replied = True
                if probe.running:
                    probe.stop()
                if not self._iopub_seen:
                    # iopub subscriptions take a moment to propagate: nudge until one status arrives.
                    probe.start(_FAST_PROBE, now=True).addErrback(lambda f: log.failure("kernel_info probe failed", f))
                check()

        self._on_iopub_seen = check
        outcome: Deferred[tuple[int, ExitStatus | None]] = Deferred()

        def decide(result: tuple[int, ExitStatus | None]) -> None:
            if not outcome.called:
                outcome.callback(result)

        def exited(status: ExitStatus) -> ExitStatus:
            decide((1, status))
            return status

        ready.addCallback(lambda _: decide((0, None)))
        handle.exited.addCallback(exited)
        deadline = self._clock.callLater(timeout, decide, (2, None))
        probe.start(_SLOW_PROBE, now=True).addErrback(lambda f: log.failure("kernel_info probe failed", f))
        try:
            winner, status = await outcome
        finally:
            self._on_iopub_seen = None
            if probe.running:
                probe.stop()
            if deadline.active():
                deadline.cancel()
        if winner == 1:
            assert status is not None
            raise LaunchFailed(f"Kernel {self.spec.name} {status.describe()} before it was ready"
                               f"{self._detail(handle)}")
        if winner == 2:
            raise LaunchTimeout(
                f"Kernel {self.id} ({self.spec.name}) did not become ready within {timeout:g} "
                f"seconds{self._detail(handle)}")

    @staticmethod
    def _detail(handle: LaunchedKernel) -> str:
        detail = handle.failure_detail()
        return f": {detail}" if detail else ""

    # -- messages ---------------------------------------------------------------------------------------

    def _request(self, channel: str, msg_type: str, content: dict[str, Any],
                 on_reply: Callable[[str, wire.RawMessage], None] | None = None) -> None:
        """Send a message egd itself originates."""
        message = wire.new_message(msg_type, content, self._internal_session)
        if on_reply is not None:
            self._remember(message.msg_id, on_reply)
        if self._channels is not None:
            try:
                self._channels.send(channel, message)
            except QueueFull:
                log.warn("kernel {kernel_id}: {channel} queue full, {msg_type} not sent", kernel_id=self.id,
                         channel=channel, msg_type=msg_type)

    def _remember(self, msg_id: str, target: str | Callable[[str, wire.RawMessage], None]) -> None:
        if len(self._pending) >= _MAX_PENDING:
            self._pending.pop(next(iter(self._pending)))
        self._pending[msg_id] = target

    def send_from_client(self, client: KernelClient, channel: str, message: wire.RawMessage) -> None:
        """Forward a client's message to the kernel and remember where its replies go."""
        self._touch()
        if self.state is not KernelState.RUNNING or self._channels is None:
            if self.state in (KernelState.STARTING, KernelState.RESTARTING) and len(self._held) < _MAX_HELD:
                self._held.append((client.session_key, channel, message))
            return
        if message.msg_id and channel != "stdin":
            self._remember(message.msg_id, client.session_key)
        try:
            self._channels.send(channel, message)
        except QueueFull:
            client.deliver("iopub", wire.new_message("stream", {
                "name": "stderr", "text": f"[egd] the kernel is not reading its {channel} channel; message dropped\n"},
                self._internal_session))

    def _flush_held(self) -> None:
        held, self._held = self._held, []
        for key, channel, message in held:
            client = self.hub.client(key)
            if client is not None:
                self.send_from_client(client, channel, message)

    def _on_message(self, channel: str, message: wire.RawMessage, preview: Preview | None = None) -> None:
        # Anything the kernel sends is activity (output, replies, input_request), as in Jupyter Server: a
        # kernel printing progress is not idle, whoever listens.
        self.last_activity = self._clock.seconds()
        if channel == "iopub":
            self._on_iopub(message, preview)
        else:
            self._route_reply(channel, message)

    def _is_internal(self, message: wire.RawMessage) -> bool:
        """Whether ``message`` answers one of egd's own requests (readiness probes, quiet executes)."""
        return self._internal_marker in message.parent_header

    def _on_iopub(self, message: wire.RawMessage, preview: Preview | None = None) -> None:
        internal = self._is_internal(message)
        # egd's own requests (readiness probes, quiet executes) change no state a client sees: a late
        # "busy" of a probe must not show a kernel that was just reported ready as busy.
        if message.msg_type == "status" and not internal:
            self._track_status(message)
        if not self._iopub_seen:
            self._iopub_seen = True
            if self._on_iopub_seen is not None:
                self._on_iopub_seen()
        if not internal:
            # Clients see only traffic of their own requests, not egd's readiness probes.
            self.hub.broadcast("iopub", message, preview)

    def _track_status(self, message: wire.RawMessage) -> None:
        """Follow the kernel's own ``status`` messages in :attr:`execution_state`."""
        try:
            state = message.json_content().get("execution_state")
        except (ValueError, AttributeError):
            state = None
        # The kernel's own "starting" is of its boot: stale by the time it arrives (ipykernel publishes from
        # more than one thread, so it can even come after the replies that made egd report the kernel ready,
        # and then a ready kernel would look "starting" for good, and never be culled). egd sets "starting"
        # and "restarting" itself; while (re)starting only busy/idle replace them.
        if state == "starting":
            return
        if isinstance(state, str) and (self.state is KernelState.RUNNING or state in ("busy", "idle")):
            if state == "busy" and self.execution_state != "busy":
                self.busy_since = self.last_activity
            self.execution_state = state

    def _route_reply(self, channel: str, message: wire.RawMessage) -> None:
        """Deliver a shell, control or stdin message to whoever sent its parent request."""
        parent = message.parent_msg_id()
        if parent is None:
            return
        if channel != "stdin" and message.msg_type.endswith("_reply"):
            target = self._pending.pop(parent, None)
        else:
            target = self._pending.get(parent)
        if target is None:
            log.debug("kernel {kernel_id}: no one waits for {msg_type} on {channel}", kernel_id=self.id,
                      msg_type=message.msg_type, channel=channel)
        elif isinstance(target, str):
            self.hub.deliver_to(target, channel, message)
        else:
            target(channel, message)

    def _announce(self, execution_state: str) -> None:
        """Tell clients about a state the kernel cannot report itself (restarting, dead)."""
        self.execution_state = execution_state
        self.hub.broadcast("iopub", wire.new_message("status", {"execution_state": execution_state},
                                                      self._internal_session))

    # -- clients ----------------------------------------------------------------------------------------

    def attach(self, client: KernelClient) -> None:
        """A WebSocket client connected."""
        self._touch()
        self.hub.attach(client)

    def detach(self, client: KernelClient) -> None:
        """A WebSocket client went away; its session's messages are buffered for a while."""
        self.hub.detach(client, keep_buffer=self.state not in (KernelState.TERMINATED, KernelState.DEAD))

    # -- control ----------------------------------------------------------------------------------------

    def _require_running(self) -> LaunchedKernel:
        if self.state in (KernelState.TERMINATING, KernelState.TERMINATED, KernelState.DEAD):
            raise KernelGone(f"Kernel {self.id} is {self.state.value}")
        if self._handle is None:
            raise Conflict(f"Kernel {self.id} is still {self.state.value}; try again when it is ready")
        return self._handle

    async def interrupt(self) -> None:
        """Interrupt the running cell: by signal, or by ``interrupt_request`` when the spec says ``message``."""
        handle = self._require_running()
        self._touch()
        log.info("kernel {kernel_id}: interrupt ({mode})", kernel_id=self.id, mode=self.spec.interrupt_mode)
        audit.info("kernel interrupt {kernel_id} user={user} spec={spec}", kernel_id=self.id,
                   user=self.env.username, spec=self.spec.name)
        await self._send_interrupt(handle, strict=True)

    async def _send_interrupt(self, handle: LaunchedKernel, strict: bool = False) -> None:
        """By message or SIGINT; ``strict`` (a client's interrupt): a signal the driver could not deliver is the
        client's error (the driver's, for example 503), never a silent 204."""
        if self.spec.interrupt_mode == "message":
            self._request("control", "interrupt_request", {})
        else:
            await self._signal(handle, signal.SIGINT, strict)

    async def _signal(self, handle: LaunchedKernel, signum: int, strict: bool = False) -> None:
        """Deliver ``signum``; unless ``strict`` a failure is only logged (a shutdown goes on to stronger means)."""
        try:
            await handle.signal(signum)
        except Exception as exc:
            if strict:
                raise
            log.warn("kernel {kernel_id}: signal {signum} not delivered: {why}", kernel_id=self.id, signum=signum,
                     why=describe(exc))

    async def restart(self) -> None:
        """Stop the kernel and start it again under the same id (same spec and environment)."""
        async with self._lock:
            handle = self._require_running()
            log.info("kernel {kernel_id}: restart requested", kernel_id=self.id)
            audit.info("kernel restart {kernel_id} user={user} spec={spec}", kernel_id=self.id,
                       user=self.env.username, spec=self.spec.name)
            if self.metrics is not None:
                self.metrics.kernel_restarted(self.spec.name, "user")
            self._set_state(KernelState.RESTARTING)
            # No iopub "restarting" here: Jupyter clients read it as "the server restarts a dead kernel"
            # (JupyterLab then reports the kernel died); a restart the client asked for it tracks itself, as
            # with Jupyter Server, which also announces only automatic restarts.
            await self._release(handle, graceful=True, restart=True)
            await self._relaunch()

    async def _relaunch(self) -> None:
        try:
            await self._launch()
        except Exception as exc:
            self._die(f"restart failed: {exc}")
            raise
        self._set_state(KernelState.RUNNING)
        self._flush_held()

    async def shutdown(self) -> None:
        """Stop the kernel: ``shutdown_request`` first, then signals; its clients are disconnected."""
        async with self._lock:
            if self.state in (KernelState.TERMINATED, KernelState.DEAD):
                return
            self._set_state(KernelState.TERMINATING)
            audit.info("kernel stop {kernel_id} user={user} spec={spec}", kernel_id=self.id,
                       user=self.env.username, spec=self.spec.name)
            if self._handle is not None:
                await self._release(self._handle, graceful=True)
            self._set_state(KernelState.TERMINATED)
            self.execution_state = "dead"
            self.hub.close_all(1000, "kernel shut down")
            log.info("kernel {kernel_id} shut down", kernel_id=self.id)
            self._hooks.on_gone(self)

    async def _release(self, handle: LaunchedKernel, graceful: bool, restart: bool = False) -> None:
        """End one incarnation of the kernel and free everything it held."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        ended = handle.exited
        if graceful and not ended.called and self._channels is not None:
            # As jupyter_client does: interrupt first, so a kernel busy in a cell acts on the shutdown_request
            # at once instead of after shutdown_wait (an idle kernel ignores the interrupt).
            await self._send_interrupt(handle)
            self._request("control", "shutdown_request", {"restart": restart})
            told = getattr(handle, "shutdown_requested", None)  # optional (egd.driverapi.LaunchedKernel)
            if told is not None:
                told()
            if not await wait_for(ended, self._policy.shutdown_wait, self._clock):
                await self._signal(handle, signal.SIGTERM)
                await wait_for(ended, 1.0, self._clock)
        if not ended.called:
            # Bounded: a driver's kill that never fires must not hang a DELETE or the gateway's stop.
            await wait_for(ensureDeferred(_kill(handle)), 30.0, self._clock)
            if not await wait_for(ended, 5.0, self._clock):
                log.error("kernel {kernel_id}: {where} did not end after SIGKILL", kernel_id=self.id,
                          where=handle.describe())
        if self._channels is not None:
            self._channels.close()
            self._channels = None
        self._pending.clear()
        handle.cleanup()

    # -- death and automatic restart --------------------------------------------------------------------

    def _heartbeat_lost(self, handle: LaunchedKernel, silence: float) -> None:
        if handle is self._handle and self.state is KernelState.RUNNING:
            self._background.run(self._check_silent(handle, silence), f"checking silent kernel {self.id}")

    async def _check_silent(self, handle: LaunchedKernel, silence: float) -> None:
        """No heartbeat for a while: a kernel busy in a cell (IRkernel answers heartbeats only between cells) is
        not a dead one, so ask the driver (signal 0: the process, or the launcher on its host) before acting. Only
        a kernel whose process or host is gone is killed (and so restarted or declared lost)."""
        try:
            await handle.signal(0)
        except Exception as exc:
            if handle is self._handle and self.state is KernelState.RUNNING and not handle.exited.called:
                log.warn("kernel {kernel_id}: no heartbeat for {silence:.1f}s and {where} does not answer ({why}); "
                         "killing it", kernel_id=self.id, silence=silence, where=handle.describe(), why=describe(exc))
                await handle.kill()
            return
        if handle is not self._handle or self._heartbeat is None:
            return
        if not self._silent_reported:
            self._silent_reported = True
            log.info("kernel {kernel_id}: no heartbeat for {silence:.1f}s, but its process is alive ({where}): "
                     "busy, not dead; it is left running", kernel_id=self.id, silence=silence,
                     where=handle.describe())
        self._heartbeat.rearm()

    def _exited(self, status: ExitStatus, handle: LaunchedKernel) -> ExitStatus:
        if handle is self._handle and self.state is KernelState.RUNNING:
            log.warn("kernel {kernel_id} {how} unexpectedly", kernel_id=self.id, how=status.describe())
            if status.lost or status.final:
                # Its host is unreachable, or its resource manager ended it for good: the kernel's state is gone
                # with it; say so rather than hang or queue a new one.
                self._background.run(self._lose(handle, status), f"declaring kernel {self.id} dead")
            else:
                self._background.run(self._auto_restart(handle, status), f"automatic restart of kernel {self.id}")
        return status

    async def _lose(self, handle: LaunchedKernel, status: ExitStatus) -> None:
        async with self._lock:
            if handle is self._handle and self.state is KernelState.RUNNING:
                await self._release(handle, graceful=False)
                self._die(f"its host is unreachable ({handle.describe()})" if status.lost
                          else status.detail or status.describe())

    async def _auto_restart(self, handle: LaunchedKernel, status: ExitStatus) -> None:
        async with self._lock:
            if handle is not self._handle or self.state is not KernelState.RUNNING:
                return
            if await self.let_go_if_taken_over():
                return  # another gateway took the kernel over (and restarted or deleted it): not ours to restart
            now = self._clock.seconds()
            stable = now - self._started_at >= self._policy.stable_start_seconds
            self._restart_streak = 1 if stable else self._restart_streak + 1
            if self._restart_streak > self._policy.restart_limit:
                await self._release(handle, graceful=False)
                self._die(f"kernel {status.describe()}; restarted {self._policy.restart_limit} times in a row")
                return
            log.info("kernel {kernel_id}: automatic restart {n} of {limit}", kernel_id=self.id,
                     n=self._restart_streak, limit=self._policy.restart_limit)
            if self.metrics is not None:
                self.metrics.kernel_restarted(self.spec.name, "automatic")
            self._set_state(KernelState.RESTARTING)
            self._announce("restarting")
            await self._release(handle, graceful=False)
            try:
                await self._relaunch()
            except Exception:
                return  # _relaunch declared the kernel dead and logged why

    def _die(self, reason: str, announce: bool = True) -> None:
        """The kernel is gone for good: tell clients, drop it from the manager."""
        if self.state in (KernelState.DEAD, KernelState.TERMINATED):
            return
        log.error("kernel {kernel_id} is dead: {reason}", kernel_id=self.id, reason=reason)
        if self.state is KernelState.TERMINATING:
            self._set_state(KernelState.TERMINATED)
        else:
            self._set_state(KernelState.DEAD)
        self.reason = reason
        if announce:
            self._announce("dead")
        self.execution_state = "dead"
        self._disconnect()
        self.hub.close_all(1000, "kernel died")
        self._hooks.on_gone(self)

    def wait_background(self) -> Deferred[Any]:
        """Fires when automatic restarts and kills in flight have finished."""
        return self._background.wait()


class _OutputPreviewer:
    """Sends a kernel's large output to its clients while egd checks the output's signature (the
    :class:`egd.kernels.channels.Previewer` of a kernel; see :meth:`ClientHub.preview`)."""

    def __init__(self, kernel: Kernel) -> None:
        self._kernel = kernel

    def preview(self, message: wire.RawMessage) -> Preview | None:
        """Clients' output only: egd's own requests and status messages wait for the check."""
        kernel = self._kernel
        if message.msg_type == "status" or kernel._is_internal(message):
            return None
        return kernel.hub.preview("iopub", message)

    def confirm(self, message: wire.RawMessage, preview: Preview | None) -> None:
        """Handle the checked iopub message as any other; the preview's clients get its last bytes."""
        self._kernel._on_message("iopub", message, preview)

    def reject(self, preview: Preview | None) -> None:
        """Drop the connections that got part of a forged message."""
        if preview is not None:
            self._kernel.hub.reject(preview)
