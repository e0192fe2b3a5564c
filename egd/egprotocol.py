"""The gateway's side of Enterprise Gateway's launcher protocol, for EG's kernelspecs run unchanged.

EG's launchers (``launch_ipykernel.py``, ``launch_IRkernel.R`` with ``server_listener.py``, Toree's launcher) are
started with ``--RemoteProcessProxy.response-address HOST:PORT --RemoteProcessProxy.public-key KEY``. Each picks
the kernel's ports, then connects to the response address and sends its connection info encrypted ("version 1":
a random AES-128 key wrapped with the gateway's RSA public key in PKCS#1 v1.5, the JSON in AES-ECB with PKCS#7
padding, all in base64-encoded JSON; the end of the connection ends the message). It listens on a "comm port" for
``{"signum": N}`` (signal the kernel; 0 asks whether it lives) and ``{"shutdown": 1}``.

None of that is authenticated: anyone can encrypt with a public key, and anyone who reaches a comm port can signal
the kernel. So egd takes an EG payload only for a kernel it is launching at that moment, once, and only from the
address of the host it launched on (see :class:`egd.remote.Registration`); egd's own launcher protocol
(``docs/launcher-protocol.rst``) is signed and is what egd's native kernelspecs use. ``docs/security.rst`` says
what the EG protocol costs.

- :class:`ResponseKey`: this gateway's RSA key pair (made once per process, in a thread) and :func:`decode_payload`.
- :func:`comm_request`: one request to a launcher's comm port, with a deadline.
- :class:`EgKernel`: the :class:`egd.driverapi.LaunchedKernel` of a kernel started by an EG launcher.

Which kernelspecs speak it, and EG's argv values: :mod:`egd.egspecs`.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from cryptography.hazmat.primitives import padding, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from egd.driverapi import ExitStatus, IDriverReactor
from egd.errors import ServiceUnavailable
from egd.util import describe

log = Logger()

#: The longest payload accepted (EG's is about 1 KiB).
MAX_PAYLOAD = 16 * 1024
#: Seconds a comm-port request may take (EG's launcher answers nothing; it only reads until the end).
COMM_DEADLINE = 5.0
#: How often a running EG kernel is asked whether it lives (EG polls every 3 s too).
POLL_INTERVAL = 3.0
#: How often once the kernel was asked to shut down (its end is what a DELETE waits for).
SHUTDOWN_POLL_INTERVAL = 0.2
#: Failed polls in a row (not refusals: timeouts, unreachable) after which the kernel counts as lost.
POLL_FAILURES = 3
_PORTS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


class PayloadRefused(ValueError):
    """A response-address payload that egd does not accept (the text says why; logged, never trusted)."""


class ResponseKey:
    """This gateway's RSA key pair for EG's launchers: the public half goes on their command line."""

    def __init__(self, private: rsa.RSAPrivateKey) -> None:
        self._private = private
        der = private.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
        #: What ``{public_key}`` becomes: base64 of the DER SubjectPublicKeyInfo (a PEM body without its lines).
        self.public_text = base64.b64encode(der).decode("ascii")

    @classmethod
    def generate(cls) -> Deferred[ResponseKey]:
        """A fresh 2048-bit key, made in a thread (it takes tens of milliseconds: not on the reactor)."""
        return deferToThread(lambda: cls(rsa.generate_private_key(public_exponent=65537, key_size=2048)))

    def decrypt_key(self, wrapped: bytes) -> bytes:
        """The AES key a launcher wrapped with the public key."""
        return self._private.decrypt(wrapped, PKCS1v15())


def _b64(text: Any, what: str) -> bytes:
    if not isinstance(text, (str, bytes)):
        raise PayloadRefused(f"{what} is not base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise PayloadRefused(f"{what} is not base64") from None


def decode_payload(data: bytes, key: ResponseKey) -> dict[str, Any]:
    """The connection info in an EG launcher's payload; :class:`PayloadRefused` saying why when it is not one."""
    if len(data) > MAX_PAYLOAD:
        raise PayloadRefused("payload too large")
    try:
        outer = json.loads(_b64(data.strip(), "the payload"))
    except (ValueError, RecursionError):
        raise PayloadRefused("the payload is not JSON") from None
    if not isinstance(outer, dict) or outer.get("version") != 1:
        raise PayloadRefused("not a version 1 payload (EG's launchers before 2.0 are not supported)")
    try:
        aes_key = key.decrypt_key(_b64(outer.get("key"), "key"))
    except ValueError:
        raise PayloadRefused("the key was not encrypted with this gateway's public key") from None
    if len(aes_key) not in (16, 24, 32):
        raise PayloadRefused("wrong key size")
    sealed = _b64(outer.get("conn_info"), "conn_info")
    if not sealed or len(sealed) % 16:
        raise PayloadRefused("conn_info is not whole AES blocks")
    # AES-ECB is what EG's launchers use; the payload's integrity rests on the checks of the caller (known launch,
    # known host, once), not on the cipher.
    decryptor = Cipher(algorithms.AES(aes_key), modes.ECB()).decryptor()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        plain = unpadder.update(decryptor.update(sealed) + decryptor.finalize()) + unpadder.finalize()
        info = json.loads(plain)
    except (ValueError, RecursionError):
        raise PayloadRefused("conn_info does not decrypt to JSON") from None
    if not isinstance(info, dict):
        raise PayloadRefused("conn_info is not a JSON object")
    problems = [name for name in (*_PORTS, "comm_port") if not _port(info.get(name))]
    if problems or not isinstance(info.get("kernel_id"), str) or not isinstance(info.get("key"), str):
        raise PayloadRefused("connection info without " + ", ".join(problems or ["kernel_id or key"]))
    return info


def _port(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536


class _CommClient(Protocol):
    """Sends one request and closes its half, as EG's gateway does; the launcher answers nothing."""

    def __init__(self, request: bytes) -> None:
        self._request = request
        self.done: Deferred[None] = Deferred()

    def connectionMade(self) -> None:  # noqa: N802 - Twisted hook
        transport: Any = self.transport
        transport.write(self._request)
        transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802 - Twisted hook
        if not self.done.called:
            self.done.callback(None)


async def comm_request(reactor: IDriverReactor, host: str, port: int, request: Mapping[str, Any]) -> None:
    """Send ``request`` to an EG launcher's comm port. ``ConnectionRefusedError`` means nothing listens there
    any more (the kernel has ended); other errors that it could not be reached in time."""
    client = _CommClient(json.dumps(dict(request)).encode())
    endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=COMM_DEADLINE)
    connecting = connectProtocol(endpoint, client)
    connecting.addTimeout(COMM_DEADLINE, reactor)
    await connecting
    client.done.addTimeout(COMM_DEADLINE, reactor)
    await client.done


class EgKernel:
    """A kernel started by one of EG's launchers: ports from its payload, signals through its comm port, its end
    seen by polling that port (EG's own way) or reported by the driver (:meth:`ended`)."""

    def __init__(self, reactor: IDriverReactor, kernel_id: str, info: Mapping[str, Any], where: str,
                 on_cleanup: Callable[[EgKernel], None], force_kill: Callable[[EgKernel], Awaitable[None]],
                 poll: bool = True) -> None:
        self._reactor = reactor
        self.kernel_id = kernel_id
        self.info = dict(info)
        self.where = where
        self.connection_info: dict[str, Any] = {
            "transport": "tcp", "ip": str(info["ip"]), "key": str(info["key"]),
            "signature_scheme": str(info.get("signature_scheme") or "hmac-sha256"),
            **{name: int(info[name]) for name in _PORTS},
        }
        self.exited: Deferred[ExitStatus] = Deferred()
        self.detail = ""
        self.login: str | None = None
        self._on_cleanup = on_cleanup
        self._force_kill = force_kill
        self._failures = 0
        self._poll = LoopingCall(lambda: Deferred.fromCoroutine(self._check()))
        self._poll.clock = reactor
        if poll:
            self.start_polling()

    def start_polling(self, interval: float = POLL_INTERVAL) -> None:
        """Ask the comm port every ``interval`` seconds whether the kernel lives (from now on, if it polled)."""
        if self._poll.running:
            self._poll.stop()
        if not self.exited.called:
            self._poll.start(interval, now=False).addErrback(
                lambda f: log.failure("kernel {kernel_id}: liveness poll failed", f, kernel_id=self.kernel_id))

    @classmethod
    async def reattached(cls, reactor: IDriverReactor, kernel_id: str, state: Mapping[str, Any], where: str,
                         on_cleanup: Callable[[EgKernel], None], force_kill: Callable[[EgKernel], Awaitable[None]],
                         poll: bool = True) -> EgKernel:
        """The kernel a previous gateway reached through an EG launcher (``state``: its :meth:`persistent_state`),
        if its comm port still takes requests; ``LookupError`` otherwise."""
        kernel = cls(reactor, kernel_id, dict(state["info"]), where, on_cleanup, force_kill, poll=False)
        kernel.login = state.get("login")
        if not await kernel.alive():
            raise LookupError(f"its EG launcher on {where} does not answer")
        if poll:
            kernel.start_polling()
        return kernel

    def ended(self, status: ExitStatus) -> None:
        """The kernel has ended (seen by the poll, or by the driver's resource manager)."""
        if self._poll.running:
            self._poll.stop()
        if not self.exited.called:
            self.exited.callback(status)

    async def _check(self) -> None:
        try:
            await self._comm({"signum": 0})
        except ConnectionRefusedError:
            # EG's listener ends with its kernel, or when it finds the kernel gone; what may be left of the kernel
            # (a process stuck at exit, waiting for the listener) is ended by the driver's means.
            if self._poll.running:
                self._poll.stop()
            await self._make_sure()
            self.ended(ExitStatus(None, detail="its EG launcher's comm port closed"))
            return
        except Exception as exc:
            self._failures += 1
            if self._failures >= POLL_FAILURES:
                log.warn("kernel {kernel_id}: its EG launcher on {where} has not answered {n} polls ({why})",
                         kernel_id=self.kernel_id, where=self.where, n=self._failures, why=describe(exc))
                self.ended(ExitStatus(None, lost=True))
            return
        self._failures = 0

    async def _make_sure(self) -> bool:
        """End whatever is left of the kernel by the driver's means; False when that failed (host unreachable)."""
        try:
            await self._force_kill(self)
        except Exception as exc:
            log.warn("kernel {kernel_id}: could not make sure it ended on {where}: {why}",
                     kernel_id=self.kernel_id, where=self.where, why=describe(exc))
            return False
        return True

    async def _comm(self, request: Mapping[str, Any]) -> None:
        await comm_request(self._reactor, self.connection_info["ip"], int(self.info["comm_port"]), request)

    def shutdown_requested(self) -> None:
        """The kernel was sent ``shutdown_request``: tell its launcher too, as EG does (EG's kernel process waits
        at exit for its listener, which ends only on ``{"shutdown": 1}``), and watch closely for the end."""
        Deferred.fromCoroutine(self._comm({"shutdown": 1})).addErrback(
            lambda f: log.debug("kernel {kernel_id}: shutdown to its EG launcher: {why}", kernel_id=self.kernel_id,
                                why=f.getErrorMessage()))
        if self._poll.running:
            self.start_polling(SHUTDOWN_POLL_INTERVAL)

    def describe(self) -> str:
        """Host, address and pid."""
        return f"{self.where} ({self.connection_info['ip']}) pid {self.info.get('pid')} (EG launcher)"

    def failure_detail(self) -> str:
        """What the launch's output said last."""
        return self.detail

    def signal(self, signum: int) -> Deferred[None]:
        """``{"signum": N}`` to the comm port (the launcher signals the kernel; for Spark kernels SIGINT also
        cancels the running Spark jobs); :class:`ServiceUnavailable` when it could not be delivered."""
        async def send() -> None:
            try:
                await self._comm({"signum": int(signum)})
            except ConnectionRefusedError:
                raise ServiceUnavailable(f"Signal {signum} was not delivered to kernel {self.kernel_id} on "
                                         f"{self.where}: its process is gone") from None
            except Exception as exc:
                raise ServiceUnavailable(f"Signal {signum} was not delivered to kernel {self.kernel_id}: its EG "
                                         f"launcher on {self.where} did not answer ({describe(exc)})") from None

        return Deferred.fromCoroutine(send())

    def kill(self) -> Deferred[None]:
        """Tell the launcher to stop, then end the kernel by the driver's means (its process group over ssh, its
        YARN application); the kernel counts as ended either way."""
        async def kill() -> None:
            try:
                await self._comm({"signum": 9, "shutdown": 1})
            except Exception:
                pass  # gone already, or unreachable: the driver's own means decide
            self.ended(ExitStatus(None, 9) if await self._make_sure() else ExitStatus(None, lost=True))

        if self.exited.called:
            return succeed(None)
        return Deferred.fromCoroutine(kill())

    def cleanup(self) -> None:
        """Stop polling; forget the launch."""
        if self._poll.running:
            self._poll.stop()
        self._on_cleanup(self)

    def persistent_state(self) -> dict[str, Any]:
        """What a restarted gateway needs to reach this kernel again (no secret: EG's protocol has none)."""
        return {"protocol": "eg", "where": self.where, "info": self.info, "login": self.login}

    async def alive(self) -> bool:
        """Whether the comm port still answers (for re-attaching)."""
        try:
            await self._comm({"signum": 0})
        except Exception:
            return False
        return True
