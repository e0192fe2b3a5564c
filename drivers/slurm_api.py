"""Talking to Slurm: submit a batch job, list jobs, cancel one. Two ways with one interface (:class:`SlurmClient`):

- :class:`RestSlurm`: slurmrestd's REST API with treq, authenticated by JSON Web Tokens. With the cluster's JWT
  key (``AuthAltParameters=jwt_key=...``) egd signs a short-lived token for each user it acts as, so a kernel's
  job is submitted, and cancelled, as that user; with a fixed token it acts as that token's user only.
- :class:`CliSlurm`: ``sbatch``, ``squeue`` and ``scancel`` run with ``spawnProcess`` (never a shell). As root,
  ``sbatch --uid`` submits as the kernel's user.

Every request is counted (``requests``): one listing per interval serves all kernels (``egd.drivers.slurm_watch``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import CancelledError
from twisted.web.client import Agent, HTTPConnectionPool

from egd.driverapi import IDriverReactor
from egd.drivers.http_api import ApiError, ApiUnavailable, JsonApi
from egd.drivers.process import CapturedProcess

#: Slurm job states after which nothing of the job runs any more.
FINAL_STATES = frozenset({
    "COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
    "OUT_OF_MEMORY", "REVOKED", "SPECIAL_EXIT",
})
#: What squeue prints per job (CliSlurm): fields apart by the ASCII unit separator, which no value contains.
_SEP = "\x1f"
_SQUEUE_FIELDS = ("%i", "%j", "%u", "%T", "%r", "%P", "%N", "%B", "%V", "%k")
#: A token lives this long; it is renewed when less than a third of it is left.
TOKEN_LIFESPAN = 1800


class SlurmUnavailable(ConnectionError):
    """Slurm (slurmrestd, or slurmctld behind the commands) did not answer; the text says where and why."""


class SlurmError(Exception):
    """Slurm answered, and refused (the text is Slurm's own words)."""


@dataclass(frozen=True)
class SlurmJob:
    """One job as Slurm reports it (the same from REST and from ``squeue``)."""

    job_id: str
    name: str
    user: str
    #: Slurm's base state: PENDING, RUNNING, COMPLETED, CANCELLED, TIMEOUT, NODE_FAIL...
    state: str
    #: Why it is pending or ended (Priority, Resources, QOSMaxJobsPerUserLimit, NonZeroExitCode...; None: "").
    reason: str = ""
    partition: str = ""
    nodes: str = ""
    batch_host: str = ""
    #: When it was submitted (seconds since the epoch; 0: unknown).
    submitted: float = 0.0
    exit_code: int | None = None

    @property
    def final(self) -> bool:
        """Whether nothing of the job runs any more."""
        return self.state in FINAL_STATES

    def describe(self) -> str:
        """``Slurm job 12 PENDING (Resources) in partition debug``, for the kernel model, logs and errors."""
        text = f"Slurm job {self.job_id} {self.state}"
        if self.reason and self.reason != "None":
            text += f" ({self.reason})"
        if self.state == "RUNNING" and self.nodes:
            text += f" on {self.nodes}"
        if self.partition:
            text += f" in partition {self.partition}"
        if self.exit_code and self.state in ("COMPLETED", "FAILED"):
            text += f", exit code {self.exit_code}"
        return text


@dataclass(frozen=True)
class JobRequest:
    """A batch job to submit: its script (``#!`` first), identity and resources."""

    name: str
    comment: str
    script: str
    user: str
    workdir: str
    output: str
    environment: Mapping[str, str]
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    #: Minutes.
    time_limit: int | None = None
    cpus: int = 1
    memory_mb: int | None = None
    #: ``gpu`` or ``gpu:a100`` with ``gpus`` of them (None: no GPUs).
    gres: str | None = None
    nodes: int = 1
    constraint: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


class SlurmClient(Protocol):
    """What the slurm driver needs of Slurm."""

    requests: int

    async def submit(self, job: JobRequest) -> str:
        """Submit ``job`` as ``job.user``; its job id. :class:`SlurmError` when Slurm refuses it."""

    async def jobs(self) -> list[SlurmJob]:
        """Every job Slurm still knows (finished ones too, until ``MinJobAge``), in one request."""

    async def job(self, job_id: str) -> SlurmJob | None:
        """One job; None when Slurm does not know it (any more)."""

    async def cancel(self, job_id: str, user: str) -> None:
        """Cancel a job as ``user`` (a job that has ended already is no error)."""

    async def close(self) -> None:
        """Release connections."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_token(key: bytes, user: str, now: float, lifespan: int = TOKEN_LIFESPAN) -> str:
    """A JSON Web Token Slurm's ``auth/jwt`` accepts for ``user``: HS256 over the cluster's key, with ``sun`` (the
    Slurm user name), ``iat`` and ``exp``."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    claims = _b64(json.dumps({"exp": int(now) + lifespan, "iat": int(now), "sun": user},
                             separators=(",", ":")).encode())
    signature = hmac.new(key, f"{header}.{claims}".encode(), hashlib.sha256).digest()
    return f"{header}.{claims}.{_b64(signature)}"


def _text(value: Any) -> str:
    """A REST field that may be a plain value or, in newer API versions, ``{"set": .., "number": ..}``."""
    if isinstance(value, dict):
        value = value.get("number") if value.get("set", True) else ""
    if isinstance(value, list):
        value = ",".join(str(v) for v in value)
    return "" if value is None else str(value)


def job_of_rest(item: Mapping[str, Any]) -> SlurmJob:
    """A job of slurmrestd's ``/jobs`` or ``/job/{id}`` answer."""
    state = _text(item.get("job_state")).split(",")[0].split()[0] if item.get("job_state") else "UNKNOWN"
    exit_code = item.get("exit_code")
    try:
        # v0.0.38 gives the wait status (exit code << 8 | signal), later versions {"return_code": ..}
        raw = int(_text(exit_code.get("return_code") if isinstance(exit_code, dict) else exit_code) or 0)
        code: int | None = raw >> 8 if raw > 255 else raw
    except ValueError:
        code = None
    return SlurmJob(
        job_id=_text(item.get("job_id")), name=_text(item.get("name")), user=_text(item.get("user_name")),
        state=state, reason=_text(item.get("state_reason")), partition=_text(item.get("partition")),
        nodes=_text(item.get("nodes")), batch_host=_text(item.get("batch_host")),
        submitted=float(_text(item.get("submit_time")) or 0), exit_code=code)


def rest_submission(job: JobRequest) -> dict[str, Any]:
    """The body of ``POST /job/submit`` (openapi v0.0.38)."""
    properties: dict[str, Any] = {
        "name": job.name, "comment": job.comment, "current_working_directory": job.workdir,
        "standard_output": job.output, "standard_error": job.output, "environment": dict(job.environment),
        "cpus_per_task": job.cpus, "tasks": 1, "nodes": [job.nodes, job.nodes], "requeue": False,
    }
    for key, value in (("partition", job.partition), ("account", job.account), ("qos", job.qos),
                       ("time_limit", job.time_limit), ("memory_per_node", job.memory_mb),
                       ("constraints", job.constraint), ("gres", job.gres)):
        if value is not None:
            properties[key] = value
    properties.update(job.extra)
    return {"script": job.script, "job": properties}


class RestSlurm(JsonApi):
    """slurmrestd at ``base_url`` (``http://host:port``, or ``unix:/path`` for a socket), API ``version``."""

    def __init__(self, reactor: IDriverReactor, base_url: str, version: str, user: str, timeout: float = 10.0) -> None:
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 4
        agent = Agent(reactor, pool=pool, connectTimeout=timeout)
        super().__init__(reactor, base_url, agent, pool, timeout, what="slurmrestd")
        self._version = version
        self._clock = reactor
        self.user = user
        self._key: bytes | None = None
        self._token = ""
        self._tokens: dict[str, tuple[str, float]] = {}

    def use(self, key: bytes | None = None, token: str = "") -> None:
        """Authenticate with the cluster's JWT ``key`` (tokens for any user) or one ``token`` (its user only)."""
        self._key, self._token = key, token
        self._tokens.clear()

    def auth(self, user: str) -> dict[str, str]:
        """The headers that make a request ``user``'s: a token signed here, or the fixed one (only its user)."""
        if self._key is None:
            if user != self.user:
                raise SlurmError(f"cannot act as {user}: egd has a token for {self.user} only (give it the "
                                 "cluster's JWT key to impersonate)")
            return {"X-SLURM-USER-NAME": user, "X-SLURM-USER-TOKEN": self._token}
        now = self._clock.seconds()
        token, expires = self._tokens.get(user, ("", 0.0))
        if expires - now < TOKEN_LIFESPAN / 3:
            token, expires = hs256_token(self._key, user, time.time()), now + TOKEN_LIFESPAN
            self._tokens[user] = (token, expires)
        return {"X-SLURM-USER-NAME": user, "X-SLURM-USER-TOKEN": token}

    async def _request(self, method: str, path: str, user: str, body: Any = None,
                       params: Mapping[str, str] | None = None, ok: tuple[int, ...] = ()) -> tuple[int, Any]:
        try:
            return await self.call(method, f"/slurm/{self._version}{path}", params, body, ok=ok,
                                   headers=self.auth(user))
        except ApiUnavailable as exc:
            raise SlurmUnavailable(str(exc)) from None
        except ApiError as exc:
            raise SlurmError(f"slurmrestd: {exc.message}") from None

    async def submit(self, job: JobRequest) -> str:
        """``POST /job/submit`` as the job's user."""
        _, data = await self._request("POST", "/job/submit", job.user, rest_submission(job))
        errors = [e for e in (data or {}).get("errors") or [] if isinstance(e, dict)]
        if errors or not (data or {}).get("job_id"):
            words = "; ".join(str(e.get("description") or e.get("error") or e) for e in errors)
            raise SlurmError(f"slurmrestd refused the job: {words or data}")
        return str(data["job_id"])

    async def jobs(self) -> list[SlurmJob]:
        """``GET /jobs`` as the driver's user."""
        _, data = await self._request("GET", "/jobs", self.user)
        return [job_of_rest(item) for item in (data or {}).get("jobs") or [] if isinstance(item, dict)]

    async def job(self, job_id: str) -> SlurmJob | None:
        """``GET /job/{id}``: None when Slurm answers that it does not know the id."""
        try:
            _, data = await self._request("GET", f"/job/{job_id}", self.user)
        except SlurmError as exc:
            if "Invalid job id" in str(exc) or "not found" in str(exc).lower():
                return None
            raise
        found = [job_of_rest(item) for item in (data or {}).get("jobs") or [] if isinstance(item, dict)]
        return found[0] if found else None

    async def cancel(self, job_id: str, user: str) -> None:
        """``DELETE /job/{id}`` as ``user``."""
        try:
            await self._request("DELETE", f"/job/{job_id}", user)
        except SlurmError as exc:
            if "already completed" in str(exc).lower() or "Invalid job id" in str(exc):
                return
            raise


class _Output(CapturedProcess):
    """A command's whole stdout (a listing of every job can be large)."""

    def __init__(self, stdin: bytes | None) -> None:
        super().__init__(stdin)
        self.chunks: list[bytes] = []

    def outReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted hook
        self.chunks.append(data)

    def stdout(self) -> str:
        """Everything the command printed."""
        return b"".join(self.chunks).decode("utf-8", "replace")


class CliSlurm:
    """Slurm's commands (``sbatch``, ``squeue``, ``scancel`` in ``bin_dir`` or on PATH), with ``env`` (for example
    ``SLURM_CONF``) over a minimal environment."""

    def __init__(self, reactor: IDriverReactor, bin_dir: str | None, env: Mapping[str, str], user: str,
                 timeout: float = 30.0) -> None:
        self._reactor = reactor
        self._bin = bin_dir
        self._env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", **env}
        self.user = user
        self._timeout = timeout
        self.requests = 0
        # Looked up once, here: not on the reactor for every request.
        self._commands = {name: os.path.join(bin_dir, name) if bin_dir else _which(name, self._env["PATH"])
                          for name in ("sbatch", "squeue", "scancel")}

    def command(self, name: str) -> str:
        """The path of a Slurm command."""
        return self._commands[name]

    async def run(self, argv: Sequence[str], stdin: bytes | None = None,
                  env: Mapping[str, str] | None = None) -> tuple[int, str, str]:
        """Run a Slurm command: ``(exit code, stdout, stderr)``; :class:`SlurmUnavailable` when it cannot run or
        does not return within the timeout."""
        self.requests += 1
        proto = _Output(stdin)
        try:
            process = self._reactor.spawnProcess(proto, argv[0], list(argv), env={**self._env, **(env or {})})
        except OSError as exc:
            raise SlurmUnavailable(f"cannot run {argv[0]}: {exc}") from None
        ended = proto.ended
        ended.addTimeout(self._timeout, self._reactor, onTimeoutCancel=lambda *_: None)
        try:
            code = await ended
        except CancelledError:
            _kill(process)
            raise
        if code is None:
            _kill(process)
            raise SlurmUnavailable(f"{os.path.basename(argv[0])} did not return within {self._timeout:g}s")
        return code, proto.stdout(), proto.stderr()

    async def submit(self, job: JobRequest) -> str:
        """``sbatch --parsable`` with the script on stdin; as root, ``--uid`` makes the job the user's."""
        argv = [self.command("sbatch"), "--parsable", f"--job-name={job.name}", f"--comment={job.comment}",
                f"--chdir={job.workdir}", f"--output={job.output}", f"--error={job.output}", "--export=ALL",
                "--no-requeue", "--ntasks=1", f"--cpus-per-task={job.cpus}", f"--nodes={job.nodes}"]
        for flag, value in (("partition", job.partition), ("account", job.account), ("qos", job.qos),
                            ("time", job.time_limit), ("mem", job.memory_mb), ("constraint", job.constraint),
                            ("gres", job.gres)):
            if value is not None:
                argv.append(f"--{flag}={value}")
        argv += [f"--{name.replace('_', '-')}={value}" for name, value in job.extra.items()]
        if os.geteuid() == 0:
            argv.append(f"--uid={job.user}")
        elif job.user != self.user:
            raise SlurmError(f"cannot submit as {job.user}: egd does not run as root")
        # --export=ALL passes exactly this environment: the job's own, nothing of egd's.
        env = {**self._env, **job.environment}
        code, out, err = await self.run(argv, job.script.encode(), env)
        job_id = out.strip().split(";")[0]
        if code != 0 or not job_id.isdigit():
            raise SlurmError(f"sbatch: {_last_lines(err) or out.strip() or f'exit code {code}'}")
        return job_id

    async def jobs(self) -> list[SlurmJob]:
        """``squeue --states=all`` of every user, in one run."""
        return await self._squeue([])

    async def job(self, job_id: str) -> SlurmJob | None:
        """``squeue --job``; None when Slurm does not know it."""
        found = [j for j in await self._squeue(["--job", job_id]) if j.job_id == job_id]
        return found[0] if found else None

    async def _squeue(self, extra: list[str]) -> list[SlurmJob]:
        argv = [self.command("squeue"), "--noheader", "--states=all", "--all",
                f"--format={_SEP.join(_SQUEUE_FIELDS)}", *extra]
        code, out, err = await self.run(argv)
        if code != 0:
            if "Invalid job id" in err:
                return []
            raise SlurmUnavailable(f"squeue: {_last_lines(err) or f'exit code {code}'}")
        return [job for line in out.splitlines() if (job := _job_of_squeue(line)) is not None]

    async def cancel(self, job_id: str, user: str) -> None:
        """``scancel`` (root may cancel anyone's job; a user only their own)."""
        code, _, err = await self.run([self.command("scancel"), job_id])
        if code != 0 and "already completed" not in err and "Invalid job id" not in err:
            raise SlurmError(f"scancel: {_last_lines(err) or f'exit code {code}'}")

    async def close(self) -> None:
        """Nothing is kept open."""


def _job_of_squeue(line: str) -> SlurmJob | None:
    parts = line.split(_SEP)
    if len(parts) != len(_SQUEUE_FIELDS) or not parts[0].strip():
        return None
    job_id, name, user, state, reason, partition, nodes, batch_host, submitted, _comment = parts
    return SlurmJob(job_id=job_id.strip(), name=name, user=user, state=state.strip() or "UNKNOWN",
                    reason=reason.strip(), partition=partition, nodes=nodes.strip(),
                    batch_host="" if batch_host in ("n/a", "(null)") else batch_host.strip(),
                    submitted=_epoch(submitted))


def _epoch(text: str) -> float:
    """squeue's ``%V`` (``2026-12-07T05:10:31``, local time) as seconds since the epoch; 0 when unknown."""
    try:
        return time.mktime(time.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return 0.0


def _last_lines(text: str, lines: int = 3) -> str:
    return " ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _which(name: str, path: str) -> str:
    for directory in path.split(os.pathsep):
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return name


def _kill(process: Any) -> None:
    try:
        process.signalProcess("KILL")
    except Exception:
        pass


__all__ = ["FINAL_STATES", "CliSlurm", "JobRequest", "RestSlurm", "SlurmClient", "SlurmError", "SlurmJob",
           "SlurmUnavailable", "hs256_token", "job_of_rest", "rest_submission"]
