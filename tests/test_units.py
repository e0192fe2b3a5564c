"""Unit tests for logic about formats, time and order: the wire formats against Jupyter's reference code,
replay buffers and backpressure with a controlled clock, the heartbeat and launch deadlines with task.Clock.

The kernels here are fakes on purpose: they inject what a real kernel cannot be made to do on cue under a
controlled clock (stay silent forever, die at a chosen moment). Everything they check also has an
end-to-end test with real kernels in test_lifecycle.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest
from jupyter_client.session import Session
from jupyter_server.services.kernels.connection import base as js
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.threadpool import ThreadPool

from egd.config import KernelsConfig
from egd.driverapi import ExitStatus
from egd.errors import LaunchFailed, LaunchTimeout
from egd.kernels import wire
from egd.kernels.channels import Heartbeat
from egd.kernels.env import KernelEnv
from egd.kernels.hub import ClientHub, ReplayLimits
from egd.kernels.kernel import TRANSITIONS, Kernel, KernelHooks, KernelPolicy, KernelState
from egd.kernels.specs import HISTORY_OF_ITS_OWN, KernelSpecInfo, KernelSpecStore, with_history_choice
from egd.kernels.zmqio import ReactorZmqFactory, shutdown_factory

KEY = b"0123456789abcdef"


def sample(buffers: list[bytes] | None = None) -> wire.RawMessage:
    """A kernel-side message as raw frames."""
    session = Session(key=KEY)
    msg = session.msg("stream", {"name": "stdout", "text": "héllo\n"}, parent={"msg_id": "p1", "msg_type": "x"})
    frames = session.serialize(msg)
    return wire.from_zmq([b"topic", *frames, *(buffers or [])], wire.Signer(KEY))


def test_from_zmq_verifies_signatures() -> None:
    """Messages signed by jupyter_client verify; a tampered frame is refused."""
    message = sample()
    assert message.msg_type == "stream" and message.parent_msg_id() == "p1"
    session = Session(key=KEY)
    frames = session.serialize(session.msg("status", {"execution_state": "idle"}))
    frames[-1] = b'{"execution_state":"busy"}'
    with pytest.raises(wire.WireError, match="bad signature"):
        wire.from_zmq(frames, wire.Signer(KEY))
    with pytest.raises(wire.WireError):
        wire.from_zmq([b"no delimiter"], wire.Signer(KEY))


def test_to_zmq_is_what_jupyter_client_accepts() -> None:
    """What egd sends to a kernel deserializes and verifies with jupyter_client's Session."""
    channel, message = wire.from_legacy_text(json.dumps({
        "header": {"msg_id": "m1", "msg_type": "execute_request", "session": "s", "username": "u",
                   "date": "2026-01-01T00:00:00.000000Z", "version": "5.3"},
        "parent_header": {}, "metadata": {}, "content": {"code": "1"}, "channel": "shell"}).encode())
    assert channel == "shell"
    frames = wire.to_zmq(message, wire.Signer(KEY))
    session = Session(key=KEY)
    _idents, rest = session.feed_identities(frames)
    parsed = session.deserialize(rest)
    assert parsed["header"]["msg_id"] == "m1" and parsed["content"] == {"code": "1"}


def test_legacy_text_matches_jupyter_shape() -> None:
    """The spliced JSON text is the message Jupyter Server would send, channel and top-level ids included."""
    payload, binary = wire.to_legacy(sample(), "iopub")
    assert not binary
    msg = json.loads(payload)
    assert msg["channel"] == "iopub" and msg["msg_type"] == "stream" and msg["buffers"] == []
    assert msg["msg_id"] == msg["header"]["msg_id"] and msg["content"]["text"] == "héllo\n"
    assert msg["parent_header"]["msg_id"] == "p1"


def test_legacy_binary_matches_jupyter_server() -> None:
    """Messages with buffers use Jupyter Server's binary layout, both directions."""
    payload, binary = wire.to_legacy(sample([b"\x00buf", b"two"]), "iopub")
    assert binary
    decoded = js.deserialize_binary_message(payload)
    assert decoded["buffers"] == [b"\x00buf", b"two"] and decoded["channel"] == "iopub"
    theirs = js.serialize_binary_message({"header": {"msg_id": "a", "msg_type": "comm_msg"}, "parent_header": {},
                                          "metadata": {}, "content": {"x": 1}, "channel": "shell",
                                          "buffers": [b"abc"]})
    channel, message = wire.from_legacy_binary(theirs)
    assert channel == "shell" and message.buffers == [b"abc"] and json.loads(message.content) == {"x": 1}


def test_large_frames_forwarded_as_memoryviews_give_the_same_frames() -> None:
    """Large kernel frames reach the wire functions as memoryviews of ZeroMQ's messages (no copy): every client
    format is byte for byte what bytes frames give, and the small frames egd parses are bytes."""
    session = Session(key=KEY)
    text = "x" * 300_000
    msg = session.msg("stream", {"name": "stdout", "text": text}, parent={"msg_id": "p1", "msg_type": "x"})
    frames = [b"topic", *session.serialize(msg), b"\x01" * 200_000]
    as_bytes = wire.from_zmq(list(frames), wire.Signer(KEY))
    as_views = wire.from_zmq([memoryview(f) if len(f) > 1000 else f for f in frames], wire.Signer(KEY))
    assert isinstance(as_views.content, memoryview) and isinstance(as_views.header, bytes)
    assert as_views.parent_msg_id() == "p1" and as_views.json_content()["text"] == text
    assert wire.to_legacy(as_views, "iopub") == wire.to_legacy(as_bytes, "iopub")
    assert wire.to_v1(as_views, "iopub") == wire.to_v1(as_bytes, "iopub")
    decoded = js.deserialize_binary_message(wire.to_legacy(as_views, "iopub")[0])
    assert decoded["content"]["text"] == text and decoded["buffers"] == [b"\x01" * 200_000]
    tampered = [memoryview(f) if len(f) > 1000 else f for f in frames[:-2]] + [memoryview(b"y" * 5000)]
    with pytest.raises(wire.WireError, match="bad signature"):
        wire.from_zmq(tampered, wire.Signer(KEY))


def test_v1_matches_jupyter_server() -> None:
    """The v1 protocol frames agree with Jupyter Server's own serializer and parser."""
    message = sample([b"buffer"])
    channel, parts = js.deserialize_msg_from_ws_v1(wire.to_v1(message, "iopub"))
    assert channel == "iopub"
    assert parts == [message.header, message.parent_header, message.metadata, message.content, b"buffer"]
    theirs = js.serialize_msg_to_ws_v1([message.header, b"{}", b"{}", b'{"code":"1"}', b"buf"], "control")
    channel, parsed = wire.from_v1(theirs)
    assert channel == "control" and parsed.buffers == [b"buf"] and parsed.msg_type == "stream"


@pytest.mark.parametrize("frame", [b"", b"\x01\x00\x00\x00", b"\x00" * 8, b"\xff" * 16])
def test_malformed_binary_frames_are_refused(frame: bytes) -> None:
    """Truncated or absurd binary frames raise WireError, never something worse."""
    with pytest.raises(wire.WireError):
        wire.from_legacy_binary(frame)
    with pytest.raises(wire.WireError):
        wire.from_v1(frame)


class FakeClient:
    """Records what a hub delivers."""

    def __init__(self, key: str) -> None:
        self.session_key = key
        self.replayable = True
        self.got: list[tuple[str, str]] = []
        self.closed: tuple[int, str] | None = None

    def deliver(self, channel: str, message: wire.RawMessage) -> None:
        self.got.append((channel, message.msg_type))

    def disconnect(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


def make_hub(clock: Clock, limits: ReplayLimits) -> tuple[ClientHub, list[str]]:
    """A hub (and an unused list, for the callers' unpacking)."""
    return ClientHub("k", clock, limits), []


def test_replay_buffer_limits_and_expiry() -> None:
    """An absent session keeps the newest messages within its limits, says how many it dropped, expires."""
    clock = Clock()
    hub, _ = make_hub(clock, ReplayLimits(messages=3, size=10**6, seconds=60))
    client = FakeClient("s")
    hub.attach(client)
    hub.detach(client)
    for _ in range(5):
        hub.broadcast("iopub", sample())
    back = FakeClient("s")
    hub.attach(back)
    assert back.got[0] == ("iopub", "stream") and len(back.got) == 4  # the drop notice + 3 newest
    hub.detach(back)
    clock.advance(61)
    again = FakeClient("s")
    hub.attach(again)
    assert again.got == []


def test_a_slow_client_does_not_hold_up_the_others() -> None:
    """A client whose send buffer is full gets its messages queued (delivered when it drains); the others get
    theirs at once (the bounds of the queue: tests/test_backlog.py)."""
    hub, _ = make_hub(Clock(), ReplayLimits())
    a, b = FakeClient("a"), FakeClient("b")
    hub.attach(a)
    hub.attach(b)
    hub.mark_slow(a)
    hub.broadcast("iopub", sample())
    assert a.got == [] and b.got == [("iopub", "stream")]
    hub.mark_fast(a)
    assert a.got == [("iopub", "stream")]


def test_stale_connection_replaced() -> None:
    """A second client with the same session key closes the first."""
    hub, _ = make_hub(Clock(), ReplayLimits())
    old, new = FakeClient("s"), FakeClient("s")
    hub.attach(old)
    hub.attach(new)
    assert old.closed is not None and hub.clients["s"] is new


def test_state_table() -> None:
    """Terminal states have no way out; every state is reachable from STARTING."""
    assert TRANSITIONS[KernelState.TERMINATED] == frozenset() and TRANSITIONS[KernelState.DEAD] == frozenset()
    reached, todo = {KernelState.STARTING}, [KernelState.STARTING]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in reached:
                reached.add(nxt)
                todo.append(nxt)
    assert reached == set(KernelState)


CONNECTION = {"transport": "tcp", "ip": "127.0.0.1", "key": KEY.decode(), "signature_scheme": "hmac-sha256",
              "shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4, "hb_port": 5}


def test_heartbeat_failure_after_allowed_silence() -> None:
    """With no echo, the heartbeat reports silence once, after interval x misses; again only after another full
    window once re-armed (the kernel was found alive); an echo ends the silence."""
    reactor = MemoryReactorClock()
    factory = ReactorZmqFactory(reactor)
    failures: list[float] = []
    heartbeat = Heartbeat(factory, CONNECTION, reactor, interval=1.0, misses=3, on_silence=failures.append)
    heartbeat.start()
    for _ in range(3):
        reactor.advance(1.0)
    assert failures == []
    reactor.advance(1.0)
    assert len(failures) == 1 and failures[0] == pytest.approx(4.0)
    reactor.advance(10)
    assert len(failures) == 1
    heartbeat.rearm()
    for _ in range(3):
        reactor.advance(1.0)
    assert len(failures) == 1
    reactor.advance(1.0)
    assert len(failures) == 2 and failures[1] == pytest.approx(18.0)  # the silence since the last echo
    heartbeat._echo([b"", b"ping"])
    reactor.advance(3.0)
    assert len(failures) == 2 and heartbeat.silence == pytest.approx(3.0)
    heartbeat.stop()
    shutdown_factory(factory)


class SilentKernel:
    """A launched kernel that never answers; it ends when told to, or when ``die`` is called."""

    def __init__(self) -> None:
        self.connection_info = dict(CONNECTION)
        self.exited: Deferred[ExitStatus] = Deferred()
        self.signals: list[int] = []
        self.cleaned = False

    def describe(self) -> str:
        return "silent"

    def failure_detail(self) -> str:
        return "last words"

    def signal(self, signum: int) -> Deferred[None]:
        self.signals.append(signum)
        return succeed(None)

    def die(self, code: int = 1) -> None:
        if not self.exited.called:
            self.exited.callback(ExitStatus(code))

    def kill(self) -> Deferred[None]:
        self.die(-9)
        return succeed(None)

    def cleanup(self) -> None:
        self.cleaned = True


class OneShotDriver:
    """Hands out one SilentKernel per launch."""

    def __init__(self) -> None:
        self.launched: list[SilentKernel] = []

    def launch(self, request: Any) -> Deferred[Any]:
        kernel = SilentKernel()
        self.launched.append(kernel)
        return succeed(kernel)


def make_kernel(reactor: MemoryReactorClock, driver: OneShotDriver, timeout: float) -> tuple[Kernel, list[Kernel]]:
    gone: list[Kernel] = []
    spec = KernelSpecInfo("fake", ("x",), "Fake", "python", "signal", {}, {}, "/nonexistent")
    env = KernelEnv("00000000-0000-4000-8000-000000000000", "tester", timeout, {}, {})
    kernel = Kernel(spec, env, driver, zmq=ReactorZmqFactory(reactor), clock=reactor,  # type: ignore[arg-type]
                    policy=KernelPolicy(), launch_timeout=timeout, working_dir=None,
                    hooks=KernelHooks(on_gone=gone.append))
    return kernel, gone


def test_launch_timeout_under_a_clock() -> None:
    """A kernel that never answers fails with LaunchTimeout exactly at its deadline and is killed."""
    reactor = MemoryReactorClock()
    driver = OneShotDriver()
    kernel, gone = make_kernel(reactor, driver, timeout=30)
    result = ensureDeferred(kernel.start())
    reactor.advance(29.9)
    assert not result.called and kernel.model()["execution_state"] == "starting"
    reactor.advance(0.2)
    reactor.advance(10)
    failure = result.result
    result.addErrback(lambda _: None)
    assert failure.check(LaunchTimeout) and "within 30 seconds: last words" in failure.getErrorMessage()
    assert driver.launched[0].exited.called and driver.launched[0].cleaned
    assert gone == [kernel] and kernel.state is KernelState.DEAD


def test_early_exit_fails_fast_under_a_clock() -> None:
    """A kernel that exits during launch fails the start at that moment, with its last words."""
    reactor = MemoryReactorClock()
    driver = OneShotDriver()
    kernel, gone = make_kernel(reactor, driver, timeout=60)
    result = ensureDeferred(kernel.start())
    reactor.advance(1)
    driver.launched[0].die(3)
    reactor.advance(0.1)
    failure = result.result
    result.addErrback(lambda _: None)
    assert failure.check(LaunchFailed)
    assert "exited with code 3 before it was ready: last words" in failure.getErrorMessage()
    assert gone == [kernel]


def test_execution_state_follows_client_requests_only() -> None:
    """A ready kernel's execution_state is moved by statuses of clients' requests only: not by the kernel's own
    boot "starting" (ipykernel may publish it after the replies that made the kernel ready: the kernel then
    looked "starting" for good and was never culled), nor by statuses of egd's own probes. The statuses are
    injected: a real kernel cannot be made to reorder its iopub on cue."""
    reactor = MemoryReactorClock()
    kernel, _ = make_kernel(reactor, OneShotDriver(), timeout=60)
    kernel.state, kernel.execution_state = KernelState.RUNNING, "idle"
    client_request = wire.new_message("execute_request", {}, "a-client")
    probe = wire.new_message("kernel_info_request", {}, f"egd-{kernel.id}")

    def status(state: str, parent: wire.RawMessage | None) -> wire.RawMessage:
        return wire.new_message("status", {"execution_state": state}, "kernel", parent)

    kernel._on_message("iopub", status("starting", None))
    assert kernel.execution_state == "idle"
    kernel._on_message("iopub", status("busy", probe))
    assert kernel.execution_state == "idle"
    kernel._on_message("iopub", status("busy", client_request))
    assert kernel.execution_state == "busy"
    kernel._on_message("iopub", status("idle", client_request))
    assert kernel.execution_state == "idle"


def test_listening_ports_from_netlink_and_from_proc_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """Which process listens on a kernel's ports: the netlink answer (NETLINK_SOCK_DIAG, listening sockets only)
    and the /proc/net/tcp fallback find the same sockets, IPv4 and IPv6, and neither counts a socket that is bound
    but not listening, or a connection."""
    import os
    import socket

    from egd.kernels import ports

    v4 = socket.socket()
    v4.bind(("127.0.0.1", 0))
    v4.listen()
    v6 = socket.socket(socket.AF_INET6)
    v6.bind(("::1", 0))
    v6.listen()
    bound = socket.socket()
    bound.bind(("127.0.0.1", 0))
    client = socket.create_connection(v4.getsockname()[:2])
    wanted = {v4.getsockname()[1], v6.getsockname()[1], bound.getsockname()[1]}
    try:
        from_netlink = ports._listening_sockets(wanted)
        assert from_netlink is not None and set(from_netlink) == wanted - {bound.getsockname()[1]}
        monkeypatch.setattr(ports, "_listening_sockets", lambda _: None)  # as on a host without sock_diag
        assert ports._listening(wanted) == from_netlink
        assert ports.bound_by(os.getpid(), [v4.getsockname()[1], v6.getsockname()[1]]) is True
        assert ports.bound_by(os.getpid(), [v4.getsockname()[1], bound.getsockname()[1]]) is False
    finally:
        for sock in (client, v4, v6, bound):
            sock.close()


def test_the_started_gateways_heap_is_left_out_of_later_collections() -> None:
    """What egd holds once it is up is frozen: a later full collection does not walk it (it took some 50 ms
    per collection, during which no kernel's messages were relayed)."""
    import gc

    from egd.cli import freeze_startup_heap

    assert gc.get_freeze_count() == 0
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > 10_000  # the modules egd and the test run import
        assert len(gc.get_objects()) < gc.get_freeze_count()
    finally:
        gc.unfreeze()


def test_ipykernel_kernelspecs_get_a_history_of_their_own_and_others_are_left_alone() -> None:
    """``kernels.ipython_history: kernel`` adds the in-memory history to ipykernel's command line only: not to
    another kernel, a script, a spec that chose a HistoryManager option itself, or with ``account``."""
    ipykernel = ("python", "-m", "ipykernel_launcher", "-f", "{connection_file}")
    assert with_history_choice(ipykernel, "kernel") == (*ipykernel, HISTORY_OF_ITS_OWN)
    assert with_history_choice(("python3", "-m", "ipykernel", "-f", "{connection_file}"), "kernel")[-1] \
        == HISTORY_OF_ITS_OWN
    assert with_history_choice(ipykernel, "account") == ipykernel
    chosen = (*ipykernel, "--HistoryManager.enabled=False")
    assert with_history_choice(chosen, "kernel") == chosen
    for other in (("R", "--slave", "-e", "IRkernel::main()", "--args", "{connection_file}"),
                  ("/opt/kernels/run.sh", "--RemoteProcessProxy.kernel-id", "{kernel_id}"),
                  ("python", "ipykernel_launcher.py", "-f", "{connection_file}"), ()):
        assert with_history_choice(other, "kernel") == other


def test_the_kernelspec_every_driver_launches_from_carries_the_history_choice(tmp_path: Path) -> None:
    """Drivers get a launch's kernelspec from egd's kernelspec store: its argv is what they run, so the history
    choice there reaches local and remote kernels alike."""
    spec_dir = tmp_path / "kernels" / "py"
    spec_dir.mkdir(parents=True)
    argv = ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec_dir.joinpath("kernel.json").write_text(json.dumps({"argv": argv, "display_name": "Py", "language": "python"}))
    no_reactor = cast(IReactorFromThreads, None)  # read_all_blocking does not go through the reactor

    def argv_with(choice: str) -> tuple[str, ...]:
        config = KernelsConfig(kernelspec_dirs=(str(tmp_path / "kernels"),), ipython_history=choice)
        return KernelSpecStore(config, no_reactor, ThreadPool()).read_all_blocking()["py"].argv

    assert argv_with("kernel") == (*argv, HISTORY_OF_ITS_OWN)
    assert argv_with("account") == tuple(argv)
