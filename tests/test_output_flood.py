"""A kernel that floods egd with output: large outputs faster than egd checks them (what the kernel sends meanwhile
stays in ZeroMQ's bounded queues, not in egd's memory, and nothing overtakes the message being checked), and a
single output larger than ``kernels.max_message_size`` (never held by egd at all).

For the checks, real ZeroMQ sockets: the kernel's side is a PUB socket publishing messages signed by
jupyter_client's Session. The test holds egd's signature check back by giving it a pool of threads that is not
started yet: a check slower than the kernel's output is what a flooding kernel produces, and this machine cannot
make one on cue. The clock plays the reactor, so the test decides when egd reads. The limit is tested with a real
egd and a real ipykernel.
"""

from __future__ import annotations

import queue
import re
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest
import zmq
from jupyter_client.session import Session
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.testing import MemoryReactorClock
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from egd.kernels import wire
from egd.kernels.channels import CUT_THROUGH_FROM, KernelChannels
from egd.kernels.zmqio import ReactorZmqFactory, ZmqSocket, shutdown_factory
from tests.conftest import wait_until
from tests.procs import status_kib

pytestmark = pytest.mark.security

KEY = b"0123456789abcdef"
BIG = CUT_THROUGH_FROM + 1024


@implementer(IReactorThreads)
class ClockWithThreads(MemoryReactorClock):
    """A clock whose ``callFromThread`` queues the call for the test to run on its own thread."""

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]]] = queue.Queue()

    def callFromThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        """Queue ``callable`` (threads hand their results back this way)."""
        self.from_threads.put((lambda: callable(*args, **kwargs), ()))

    def run_from_threads(self, timeout: float = 10.0) -> None:
        """Run the next call a thread handed back."""
        call, _ = self.from_threads.get(timeout=timeout)
        call()

    def getThreadPool(self) -> ThreadPool:
        """Not used: egd's checks run in a pool of their own."""
        raise NotImplementedError

    def callInThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        """Not used."""
        raise NotImplementedError

    def suggestThreadPoolSize(self, size: int) -> None:
        """Not used."""


class Recorder:
    """What egd hands on, in order: small messages as they come, large ones once their check confirms them."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.previewed: list[str] = []

    def on_message(self, channel: str, message: wire.RawMessage) -> None:
        """A message checked on the reactor."""
        self.seen.append(message.json_content()["text"][:12].strip())

    def preview(self, message: wire.RawMessage) -> str:
        """A large message, not checked yet."""
        label = message.json_content()["text"][:12].strip()
        self.previewed.append(label)
        return label

    def confirm(self, message: wire.RawMessage, preview: Any) -> None:
        """The large message's signature is right."""
        self.seen.append(preview)

    def reject(self, preview: Any) -> None:
        """Not expected here."""
        raise AssertionError(f"{preview} was rejected")


@pytest.fixture()
def kernel_side() -> Iterator[tuple[zmq.Socket, int]]:
    """The kernel's iopub: a PUB socket on a free loopback port."""
    context = zmq.Context()
    pub = context.socket(zmq.PUB)
    pub.linger = 0
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    yield pub, port
    pub.close()
    context.term()


def text(label: str, size: int = 100) -> str:
    """A stream text of ``size`` characters that starts with ``label``."""
    return label.ljust(12) + "x" * (size - 12)


class Gated(NamedTuple):
    """egd's side of one kernel, as :func:`gated_channels` makes it."""

    reactor: ClockWithThreads
    factory: ReactorZmqFactory
    pool: ThreadPool
    recorder: Recorder
    channels: KernelChannels


def gated_channels(port: int) -> Gated:
    """egd's channels to a kernel whose iopub is on ``port``, read when the test says, with a signature check
    that waits until the test starts its pool."""
    reactor = ClockWithThreads()
    factory = ReactorZmqFactory(reactor)  # type: ignore[arg-type]  # a clock, with threads
    gated = ThreadPool(1, 1, name="test-gated-checker")  # not started: every check waits for gated.start()
    factory._checkers = gated  # the pool egd would start itself, here started when the test says
    recorder = Recorder()
    info = {"transport": "tcp", "ip": "127.0.0.1", "key": KEY.decode(), "signature_scheme": "hmac-sha256",
            "iopub_port": port, "shell_port": 1, "control_port": 2, "stdin_port": 3, "hb_port": 4}
    return Gated(reactor, factory, gated, recorder,
                 KernelChannels(factory, info, "flood", recorder.on_message, previewer=recorder))


def read_all(reactor: ClockWithThreads) -> None:
    """What the reactor does when the sockets are readable: each one reads what it can."""
    for reader in list(reactor.readers):
        reader.doRead()
    reactor.advance(0)  # reads scheduled by resume_reading


def unread(socket: ZmqSocket) -> bool:
    """Whether ZeroMQ still holds a message egd has not read from ``socket``."""
    return bool(socket.socket.get(zmq.EVENTS) & zmq.POLLIN)


def test_a_flooding_kernel_waits_in_zeromq_while_its_large_message_is_checked(
        kernel_side: tuple[zmq.Socket, int]) -> None:
    """While a large message is checked, egd reads nothing more from the kernel: the messages behind it stay in
    ZeroMQ (still unread there), then follow it in order once it is confirmed; the next large message stops the
    reading again."""
    pub, port = kernel_side
    session = Session(key=KEY)
    reactor, factory, gated, recorder, channels = gated_channels(port)
    iopub = next(r for r in reactor.readers if isinstance(r, ZmqSocket) and r.socketType == zmq.SUB)
    try:
        # ZeroMQ's slow joiner: publish until the subscription is in place.
        deadline = time.monotonic() + 10
        while not recorder.seen:
            assert time.monotonic() < deadline, "the subscription never arrived"
            session.send(pub, "stream", {"name": "stdout", "text": text("hello")})
            time.sleep(0.02)
            read_all(reactor)
        recorder.seen.clear()

        sent = ["big-1", *(f"small-{i}" for i in range(50)), "big-2", *(f"tail-{i}" for i in range(10))]
        for label in sent:
            size = BIG if label.startswith("big") else 100
            session.send(pub, "stream", {"name": "stdout", "text": text(label, size)})
        time.sleep(0.5)  # in the SUB socket's queue by now (loopback)

        read_all(reactor)
        assert recorder.previewed == ["big-1"] and recorder.seen == []
        assert unread(iopub), "egd read on behind a message being checked (into its own memory)"

        gated.start()
        reactor.run_from_threads()  # big-1 checked: confirmed, reading resumes
        reactor.advance(0)
        assert recorder.seen == sent[:51] and recorder.previewed == ["big-1", "big-2"]
        assert unread(iopub), "egd read on behind the second large message"

        reactor.run_from_threads()  # big-2
        reactor.advance(0)
        assert recorder.seen == sent
        assert not unread(iopub)
    finally:
        channels.close()
        shutdown_factory(factory)


def test_channels_closed_during_a_check_let_the_previewed_clients_go(kernel_side: tuple[zmq.Socket, int]) -> None:
    """The kernel restarts (its channels close) while a large message is checked: the check still settles, so
    the clients that got part of the message are not left holding it, and the closed sockets stay unread."""
    pub, port = kernel_side
    session = Session(key=KEY)
    reactor, factory, gated, recorder, channels = gated_channels(port)
    try:
        deadline = time.monotonic() + 10
        while not recorder.previewed:
            assert time.monotonic() < deadline, "the subscription never arrived"
            session.send(pub, "stream", {"name": "stdout", "text": text("big-1", BIG)})
            time.sleep(0.05)
            read_all(reactor)
        assert recorder.previewed == ["big-1"]
        channels.close()
        gated.start()
        reactor.run_from_threads()
        reactor.advance(0)
        assert recorder.seen == ["big-1"]  # confirmed: the held clients got the rest of it
        assert recorder.previewed == ["big-1"] and not reactor.readers
    finally:
        channels.close()
        shutdown_factory(factory)



def test_an_output_over_the_limit_never_enters_egds_memory(make_gateway: Any) -> None:
    """A real ipykernel writes 200 MB in one output with ``kernels.max_message_size`` at 1 MiB: egd's peak memory
    does not grow by it (with the default limit it would hold it twice: the frame and the WebSocket frame), egd
    logs the reset and reconnects (ZeroMQ does not, after a protocol error), so the kernel's next output reaches
    the client; a restart's loss of the connection is not logged as a reset."""
    gw = make_gateway({"kernels": {"max_message_size": 1024 * 1024}})
    kernel_id = gw.client.start_kernel()
    sock = gw.client.connect(kernel_id)
    try:
        assert sock.execute("print('before')").stdout == "before\n"
        peak_before = status_kib(gw.proc.pid, "VmHWM")
        request = sock.request("execute_request", {
            "code": "import sys; sys.stdout.write('x' * 200_000_000); sys.stdout.flush()", "silent": False,
            "store_history": False, "user_expressions": {}, "allow_stdin": False})
        deadline = time.monotonic() + 60
        while True:  # the execute's reply comes on shell; its iopub may lose the idle status with the reset
            m = sock.recv(max(0.1, deadline - time.monotonic()))
            if m.get("parent_header", {}).get("msg_id") == request["header"]["msg_id"]:
                assert not (m["msg_type"] == "stream" and len(m["content"]["text"]) > 1024 * 1024), "got through"
                if m["msg_type"] == "execute_reply":
                    assert m["content"]["status"] == "ok"
                    break
        wait_until(lambda: re.search(rf"kernel {kernel_id}: its iopub connection was reset and not restored "
                                     r"\(1 so far\).*kernels.max_message_size \(1048576 bytes\)", gw.log()), 15, 0.1,
                   "the log line of the reset")
        grown_mib = (status_kib(gw.proc.pid, "VmHWM") - peak_before) / 1024
        assert grown_mib < 50, f"egd's peak memory grew by {grown_mib:.0f} MiB"
        after = wait_until(lambda: sock.execute("print('after')").stdout, 15, 0.2, "output after the reset")
        assert after == "after\n"
        # A kernel that ends (here: restarted) loses its connection too; that is not told as a reset.
        assert gw.client.request("POST", f"/api/kernels/{kernel_id}/restart").status == 200
        time.sleep(2)
        log = gw.log()
        assert len(re.findall("its iopub connection was reset", log)) == 1, log[-3000:]
        assert "Traceback" not in log
    finally:
        sock.close()
