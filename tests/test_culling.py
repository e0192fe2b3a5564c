"""Culling of idle and busy kernels: the rules under a clock the tests control, then one real cull end to end.

The unit tests drive real ``Kernel`` objects and the real ``KernelCuller`` with ``task.Clock``. What is not
real is the kernel process: none can run under a controlled clock, so each kernel is put into the RUNNING
state directly (the state its launch ends in) and its messages are real jupyter_client frames handed to the
handler the kernel's ZeroMQ sockets call. Clients are stand-ins for WebSockets (there is no network here);
they record the close they get. ``test_real_idle_kernel_is_culled`` does the same with a real gateway, real
kernels and a real WebSocket.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
from jupyter_client.session import Session
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher

from egd.config import Config, KernelsConfig, parse_config
from egd.kernels import wire
from egd.kernels.culler import CullPolicy, KernelCuller
from egd.kernels.env import KernelEnv
from egd.kernels.kernel import Kernel, KernelHooks, KernelPolicy, KernelState
from egd.kernels.manager import KernelManager
from egd.kernels.specs import KernelSpecInfo
from egd.metrics import GatewayMetrics
from tests.conftest import GatewayProcess, wait_until
from tests.procs import is_zombie_or_gone

KEY = b"0123456789abcdef"
SESSION = Session(key=KEY)


class Client:
    """Stands in for a kernel's WebSocket client (no network under a controlled clock): records its close."""

    def __init__(self, key: str = "client") -> None:
        self.session_key = key
        self.replayable = True
        self.closed: tuple[int, str] | None = None

    def deliver(self, channel: str, message: wire.RawMessage) -> None:
        """Kernel output reaches the client; these tests look only at culling."""

    def disconnect(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


def running_kernel(clock: Clock, gone: list[Kernel], metadata: dict[str, Any] | None = None,
                   on_gone: Callable[[Kernel], None] | None = None, metrics: GatewayMetrics | None = None) -> Kernel:
    """A real Kernel in the RUNNING state with nothing behind it (see the module docstring): shutting it down
    takes the normal path, which has no process to stop. It lands in ``gone`` when it is gone."""

    def forget(kernel: Kernel) -> None:
        gone.append(kernel)
        if on_gone is not None:
            on_gone(kernel)

    spec = KernelSpecInfo("python3", ("python",), "Python 3", "python", "signal", {}, metadata or {}, "/nonexistent")
    env = KernelEnv(str(uuid.uuid4()), "alice", 60, {}, {})
    kernel = Kernel(spec, env, cast(Any, None), zmq=cast(Any, None), clock=clock, policy=KernelPolicy(),
                    launch_timeout=60, working_dir=None, hooks=KernelHooks(on_gone=forget, metrics=metrics))
    kernel.state = KernelState.RUNNING
    kernel.execution_state = "idle"  # what a launch sets once the kernel has answered
    return kernel


def kernel_says(kernel: Kernel, msg_type: str, content: dict[str, Any]) -> None:
    """The kernel publishes a message on iopub (signed frames, as ipykernel sends them)."""
    frames = SESSION.serialize(SESSION.msg(msg_type, content, parent={"msg_id": "cell", "msg_type": "execute_request"}))
    kernel._on_message("iopub", wire.from_zmq([b"kernel.status", *frames], wire.Signer(KEY)))


def status(kernel: Kernel, state: str) -> None:
    """The kernel reports its execution state."""
    kernel_says(kernel, "status", {"execution_state": state})


def client_sends(kernel: Kernel, client: Client) -> None:
    """A client sends an execute_request (the kernel has no sockets here, so it goes no further)."""
    frames = SESSION.serialize(SESSION.msg("execute_request", {"code": "1"}))
    kernel.send_from_client(client, "shell", wire.from_zmq(frames, wire.Signer(KEY)))


def culler(clock: Clock, kernels: list[Kernel], **settings: Any) -> KernelCuller:
    """A started culler over ``kernels`` with these ``kernels.cull_*`` settings (interval 1 s by default)."""
    config = KernelsConfig(**{"cull_interval": 1.0, **{f"cull_{k}": v for k, v in settings.items()}})
    service = KernelCuller(config, lambda: kernels, clock)
    service.startService()
    return service


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """Every log line egd emits during the test, as ``namespace: text``."""
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(f"{event.get('log_namespace')}: {formatEvent(event)}")

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def test_idle_kernel_culled_after_timeout_and_not_before(logged: list[str]) -> None:
    """Idle for cull_idle_timeout seconds: culled through the normal shutdown, with a log and an audit line.
    Kernel output and client messages are activity and restart the count."""
    clock, gone = Clock(), []  # type: ignore[var-annotated]
    kernel = running_kernel(clock, gone)
    culler(clock, [kernel], idle_timeout=10)
    clock.pump([1.0] * 5)
    kernel_says(kernel, "stream", {"name": "stdout", "text": "still working\n"})  # t=5
    clock.pump([1.0] * 5)
    client = Client()
    kernel.attach(client)
    client_sends(kernel, client)  # t=10
    kernel.detach(client)
    clock.pump([1.0] * 9)
    assert kernel.state is KernelState.RUNNING and gone == []  # t=19: idle for 9 s
    clock.advance(1.0)  # t=20: idle for 10 s
    assert kernel.state is KernelState.TERMINATED and gone == [kernel]
    assert f"egd.kernels.culler: kernel {kernel.id} culled: idle for 10.0s (timeout 10s)" in logged
    audit = [line for line in logged if line.startswith("egd.audit: ")]
    assert audit == [f"egd.audit: kernel cull {kernel.id} user=alice spec=python3 reason=idle",
                     f"egd.audit: kernel stop {kernel.id} user=alice spec=python3"]


def test_busy_kernel_not_culled_when_busy_timeout_is_0() -> None:
    """cull_busy_timeout 0: a kernel busy for ever stays, and the idle timeout does not apply to it."""
    clock, gone = Clock(), []  # type: ignore[var-annotated]
    kernel = running_kernel(clock, gone)
    culler(clock, [kernel], idle_timeout=10, busy_timeout=0)
    status(kernel, "busy")
    clock.pump([1.0] * 1000)
    assert kernel.state is KernelState.RUNNING and kernel.execution_state == "busy"
    status(kernel, "idle")  # the cell ends: from now on it is idle
    clock.pump([1.0] * 10)
    assert gone == [kernel]


def test_busy_kernel_culled_after_busy_timeout(logged: list[str]) -> None:
    """Busy for cull_busy_timeout seconds in a row: culled, however much output it prints; a cell that ends
    restarts the count."""
    clock, gone = Clock(), []  # type: ignore[var-annotated]
    kernel = running_kernel(clock, gone)
    culler(clock, [kernel], busy_timeout=30)
    status(kernel, "busy")
    clock.pump([1.0] * 20)
    status(kernel, "idle")
    status(kernel, "busy")  # t=20: a new cell
    for _ in range(29):
        clock.advance(1.0)
        kernel_says(kernel, "stream", {"name": "stdout", "text": "."})
    assert kernel.state is KernelState.RUNNING  # t=49: busy for 29 s
    clock.advance(1.0)
    assert kernel.state is KernelState.TERMINATED and gone == [kernel]
    assert f"egd.kernels.culler: kernel {kernel.id} culled: busy for 30.0s (timeout 30s)" in logged
    assert f"egd.audit: kernel cull {kernel.id} user=alice spec=python3 reason=busy" in logged


def test_connected_kernel_culled_only_with_cull_connected() -> None:
    """A kernel with a WebSocket client stays unless cull_connected; then it goes and its client is closed
    as on any shutdown. Once the client leaves, the kernel is culled like any other."""
    clock, gone = Clock(), []  # type: ignore[var-annotated]
    kept, culled = running_kernel(clock, gone), running_kernel(clock, gone)
    kept_client, culled_client = Client(), Client()
    kept.attach(kept_client)
    culled.attach(culled_client)
    culler(clock, [kept], idle_timeout=10)
    culler(clock, [culled], idle_timeout=10, connected=True)
    clock.pump([1.0] * 100)
    assert gone == [culled] and culled_client.closed == (1000, "kernel shut down")
    assert kept.state is KernelState.RUNNING and kept_client.closed is None
    kept.detach(kept_client)  # idle for 100 s already: the next check culls it
    clock.advance(1.0)
    assert gone == [culled, kept]


def test_spec_overrides_beat_the_gateway_defaults() -> None:
    """metadata.egd.cull: a spec turns culling on or off for its kernels and allows culling connected ones;
    values it does not set, or sets wrong, are the gateway's."""
    config = KernelsConfig(cull_idle_timeout=100, cull_busy_timeout=50, cull_connected=False)

    def policy(cull: Any) -> CullPolicy:
        spec = KernelSpecInfo("s", (), "S", "python", "signal", {}, {"egd": {"cull": cull}}, "/nonexistent")
        return CullPolicy.for_spec(config, spec)

    assert policy({"idle_timeout": 5}) == CullPolicy(5, 50, False)
    assert policy({"idle_timeout": 0, "busy_timeout": 0, "connected": True}) == CullPolicy(0, 0, True)
    assert policy({"idle_timeout": "soon", "busy_timeout": -1, "connected": "yes"}) == CullPolicy(100, 50, False)
    assert policy(None) == CullPolicy(100, 50, False)

    clock, gone = Clock(), []  # type: ignore[var-annotated]
    eager = running_kernel(clock, gone, {"egd": {"cull": {"idle_timeout": 5, "connected": True}}})
    eager.attach(Client())
    never = running_kernel(clock, gone, {"egd": {"cull": {"idle_timeout": 0}}})
    default = running_kernel(clock, gone)
    culler(clock, [eager, never, default], idle_timeout=20)
    clock.pump([1.0] * 5)
    assert gone == [eager]
    clock.pump([1.0] * 15)
    assert gone == [eager, default]
    clock.pump([1.0] * 1000)
    assert never.state is KernelState.RUNNING


def test_interval_respected_and_culler_lives_with_the_manager() -> None:
    """Checks happen every cull_interval seconds, not in between; the kernel manager starts the culler and
    stops it when it stops (a kernel due afterwards is left to the manager's own shutdown)."""
    reactor = MemoryReactorClock()
    config = Config(kernels=KernelsConfig(cull_idle_timeout=10, cull_interval=60))
    manager = KernelManager(config, reactor, cast(Any, None), cast(Any, None), environ={})
    gone: list[Kernel] = []
    kernel = running_kernel(reactor, gone, on_gone=manager._forget, metrics=manager.metrics)  # as the manager does
    manager.kernels[kernel.id] = kernel
    manager.startService()
    reactor.advance(59.9)
    assert manager.kernels == {kernel.id: kernel}  # idle for 59.9 s, but no check yet
    reactor.advance(0.1)
    assert manager.kernels == {} and gone == [kernel]
    assert 'egd_kernel_culls_total{reason="idle",spec="python3"} 1.0' in manager.metrics.render().decode()

    late = running_kernel(reactor, gone, on_gone=manager._forget)
    manager.kernels[late.id] = late
    reactor.advance(59.9)
    assert late.state is KernelState.RUNNING
    manager.culler.stopService()  # as manager.stopService does first; the rest needs a real reactor
    reactor.advance(1000)
    assert late.state is KernelState.RUNNING
    ensureDeferred(late.shutdown())


def test_culling_config_is_checked() -> None:
    """The cull_* keys are validated like every other key (intervals down to 0.1 s for tests)."""
    config = parse_config("kernels: {cull_idle_timeout: 2, cull_interval: 0.5, cull_connected: true}", environ={})
    kc = config.kernels
    assert (kc.cull_idle_timeout, kc.cull_busy_timeout, kc.cull_connected, kc.cull_interval) == (2, 0, True, 0.5)
    assert KernelsConfig().cull_interval == 60 and KernelsConfig().cull_idle_timeout == 0
    with pytest.raises(Exception) as caught:
        parse_config("kernels: {cull_idle_timeout: -1, cull_interval: 0, cull_connected: 1}", environ={})
    problems = "\n".join(caught.value.problems)  # type: ignore[attr-defined]
    for key in ("cull_idle_timeout", "cull_interval", "cull_connected"):
        assert f"kernels.{key}" in problems, problems


@pytest.mark.ops
def test_real_idle_kernel_is_culled(make_gateway: Any) -> None:
    """A real gateway culls a real kernel left idle with no client: it leaves /api/kernels, its process ends,
    the log and audit say why. A kernel with a connected client survives (cull_connected false)."""
    gateway: GatewayProcess = make_gateway({"kernels": {"cull_idle_timeout": 2, "cull_interval": 0.5}})
    client = gateway.client
    # Each kernel is connected to as soon as it is ready: a kernel left alone for 2 s is fair game.
    watched = client.start_kernel("python3")
    keeper = client.connect(watched)
    keeper.execute("x = 1")
    abandoned = client.start_kernel("python3")
    sock = client.connect(abandoned)
    pid = int(sock.execute("import os; print(os.getpid())").stdout)
    sock.close()
    left_at = time.monotonic()

    def listed() -> set[str]:
        return {k["id"] for k in client.request("GET", "/api/kernels").json}

    wait_until(lambda: abandoned not in listed(), 15, what="the idle kernel to be culled")
    # Its last activity was the cell's output, just before the client left: never culled within 2 s of it.
    assert time.monotonic() - left_at > 1.5
    wait_until(lambda: is_zombie_or_gone(pid), 10, what="the culled kernel's process to end")
    log = gateway.log()
    assert re.search(rf"kernel {abandoned} culled: idle for [0-9.]+s \(timeout 2s\)", log), log
    assert re.search(rf"\[egd.audit\] kernel cull {abandoned} user=\S+ spec=python3 reason=idle", log), log
    time.sleep(2.5)  # the connected kernel has been idle for longer than the timeout by now
    assert watched in listed()
    assert keeper.execute("x").result == "1"
    keeper.close()
    assert client.delete_kernel(watched) == 204
