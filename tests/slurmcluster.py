"""A real Slurm 22.05 cluster for the tests (Debian's packages): a controller and three compute nodes, each a
network namespace on one bridge, with munge, JWT and slurmrestd.

Layout (everything local to this machine; needs root, ``ip netns``, ``nsenter`` and ``unshare``)::

    root netns (the gateway, the clients, slurmrestd)       network namespaces ("hosts")
    egd-slurm0 = 10.202.0.1/24 --- veth egd-sv0 --- egd-sctl 10.202.0.2   slurmctld :6817  (hostname egd-sctl)
                               --- veth egd-svN --- egd-snN  10.202.0.1N  slurmd    :6818  (hostname egd-snN)
    munged (as munge): socket <root>/munge/munge.socket (a filesystem socket: reachable from every namespace)
    slurmrestd (as nobody, rest_auth/jwt, openapi/v0.0.38): 127.0.0.1:<free port> = ``rest_url``

* Partitions: ``debug`` (default; egd-sn1, egd-sn2; 2 CPUs each, ``OverSubscribe=FORCE:8``: 16 single-CPU jobs
  fit), ``tiny`` (egd-sn3 only, 1 CPU, no oversubscription: one single-CPU job fills it, a second one waits
  PENDING with reason ``Resources``), ``short`` (egd-sn1, egd-sn2, ``MaxTime=1`` minute). Memory is not a
  consumable (``CR_Core``); each node has ``RealMemory=4000``, so ``--mem=512M`` fits. egd-sn1 and egd-sn2 have
  one fake GPU each (``gres/gpu``, ``File=/dev/null``): ``--gres=gpu:1`` works, a third such job waits.
* ``SlurmdTimeout=10``: a node whose slurmd dies (``kill_node``) is DOWN and its jobs end ``NODE_FAIL`` within
  about 10-20 s; ``ReturnToService=2`` brings it back as soon as its slurmd registers again (``start_node``).
  ``JobRequeue=0``: a failed job is not requeued. ``MinJobAge=300``: finished jobs stay visible for 5 minutes.
* Jobs run on the node they were scheduled to, inside its namespace, as the job's user: ``gateway_ip``
  (10.202.0.1) is the only address of the test process they can reach (127.0.0.1 is the node's own loopback).
  There is no default route in the namespaces and ``ip_forward`` is not touched.
* The nodes share this machine's filesystem, users and Python. Test users (``ensure_user``) cannot read /root or
  a virtualenv under it: jobs use ``/usr/bin/python3`` (``python``, with Debian's python3-ipykernel), files they
  must read go to ``shared_dir`` (world-readable), and their output to ``job_dir`` (world-writable, sticky).
* ``srun``/``salloc`` from the root namespace do not work (srun's callback address is the machine's hostname);
  ``sbatch``, ``squeue``, ``scancel``, ``scontrol`` and ``sinfo`` do: ``cluster.run([...])`` sets ``SLURM_CONF``.

Usage::

    def test_something(slurm_cluster):
        user = slurm_cluster.ensure_user("egdslurm1")
        job = slurm_cluster.run(["sbatch", "--parsable", f"--uid={user.pw_uid}", f"--gid={user.pw_gid}",
                                 "-o", f"{slurm_cluster.job_dir}/%j.out", "--wrap", "exec sleep 60"]).stdout
        slurm_cluster.wait_job_state(int(job), {"RUNNING"}, 20)
        status, body = slurm_cluster.rest("GET", "/slurm/v0.0.38/jobs", user="egdslurm1")
        slurm_cluster.cancel_all()

``SlurmCluster`` cleans up what a crashed earlier run left (namespaces, the bridge, its veths, munged and
slurmrestd, ``/etc/netns`` entries, its temporary directories, test users) before it builds anything; a lock file
(``/run/egd-slurmlab.lock``) keeps two clusters on one machine from tearing each other down. The network, the
lock, the test users and that cleanup are shared with the ssh lab: tests/netlab.py.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import hmac
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests import netlab
from tests.procs import cmdline, is_zombie_or_gone

HERE = Path(__file__).resolve().parent
INSTALLER = HERE / "services" / "install-slurm.sh"
SLURMCTLD = "/usr/sbin/slurmctld"
SLURMD = "/usr/sbin/slurmd"
SLURMRESTD = "/usr/sbin/slurmrestd"
MUNGED = "/usr/sbin/munged"
BRIDGE = "egd-slurm0"
CTL_NETNS = "egd-sctl"
NODE_PREFIX = "egd-sn"  # compute nodes and their network namespaces: egd-sn1, egd-sn2, egd-sn3
VETH_PREFIX = "egd-sv"  # root-namespace ends of the veth pairs: egd-sv0 (controller), egd-sv1...
SUBNET = "10.202.0"
GATEWAY_IP = f"{SUBNET}.1"
CTL_IP = f"{SUBNET}.2"
CTLD_PORT = 6817
SLURMD_PORT = 6818
LOCK_PATH = "/run/egd-slurmlab.lock"
TMP_PREFIX = "egd-slurmlab-"
#: The GECOS field of users ``ensure_user`` creates; a later cluster deletes such users left by a crashed run.
USER_MARKER = "egd slurm lab test user"
API = "/slurm/v0.0.38"
#: Job states after which a job does not change any more.
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                          "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"})
ACTIVE_STATES = frozenset({"PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "REQUEUED",
                           "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"})
#: squeue columns (``-o``), separated by ASCII unit separators so that no value (a comment) can break a row.
_SQUEUE_FIELDS = {"id": "%i", "name": "%j", "user": "%u", "state": "%T", "reason": "%r", "node": "%B",
                  "nodes": "%N", "comment": "%k", "partition": "%P", "time_limit": "%l", "time_used": "%M"}
_SEP = "\x1f"


class SlurmClusterError(RuntimeError):
    """The cluster could not be installed, built, or torn down completely."""


def _environ(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            return handle.read().replace(b"\0", b"\n").decode("utf-8", "replace")
    except OSError:
        return ""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_token(key: bytes, user: str, lifespan: int = 600) -> str:
    """A JWT as Slurm's auth/jwt accepts it: HS256 over ``key``, claims ``exp``, ``iat`` and ``sun`` (the user)."""
    now = int(time.time())
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    claims = _b64(json.dumps({"exp": now + lifespan, "iat": now, "sun": user}, separators=(",", ":")).encode())
    signature = hmac.new(key, f"{header}.{claims}".encode(), hashlib.sha256).digest()
    return f"{header}.{claims}.{_b64(signature)}"


def unavailable_reason() -> str | None:
    """Why this machine cannot run the cluster (before installing anything), or None if it can."""
    reason = netlab.unavailable_reason("the Slurm test cluster needs",
                                       "network namespaces, a bridge, munged, slurmd, users",
                                       ("ip", "nsenter", "unshare", "setpriv"))
    if reason is None and not os.path.ismount("/sys/fs/cgroup"):
        # slurmd 22.05 always loads a cgroup plugin and is fatal without a cgroup filesystem there
        return "slurmd needs a cgroup filesystem mounted on /sys/fs/cgroup"
    return reason


def installed() -> bool:
    """Whether the daemons the cluster runs are installed (the installer checks the rest)."""
    return all(os.access(p, os.X_OK) for p in (SLURMCTLD, SLURMD, SLURMRESTD, MUNGED))


def install() -> None:
    """Run tests/services/install-slurm.sh (a no-op when everything is installed)."""
    netlab.run_installer(INSTALLER, 900, installed, SlurmClusterError)


def lock_busy() -> bool:
    """Whether another process holds the cluster lock right now (a cluster runs, or is being built)."""
    return netlab.lock_busy(LOCK_PATH)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SlurmCluster:
    """slurmctld in ``egd-sctl``, slurmd in ``egd-sn1..3``, munged and slurmrestd; see the module docstring.

    ``SlurmCluster().start()`` ... ``close()``, or ``with SlurmCluster() as cluster:``. ``close()`` is safe to call
    after a failed ``start()`` and more than once.
    """

    gateway_ip = GATEWAY_IP
    ctl_ip = CTL_IP
    bridge = BRIDGE
    #: The interpreter for jobs: Debian's, readable by every user, with python3-ipykernel.
    python = "/usr/bin/python3"
    cluster_name = "egdlab"
    scheduler_type = "sched/backfill"
    #: batch_sched_delay=0: a submitted job starts in < 1 s instead of ~2.7 s
    scheduler_parameters = "batch_sched_delay=0,sched_interval=2,bf_interval=2"

    def __init__(self, lock_timeout: float = 60) -> None:
        self.lock_timeout = lock_timeout
        self.nodes: list[str] = [f"{NODE_PREFIX}{i}" for i in (1, 2, 3)]
        self.node_ips: dict[str, str] = {n: f"{SUBNET}.{10 + i}" for i, n in enumerate(self.nodes, start=1)}
        #: Nodes with one (fake) GPU gres each: ``--gres=gpu:1`` runs there.
        self.gpu_nodes: list[str] = self.nodes[:2]
        self.root = Path(tempfile.gettempdir()) / f"{TMP_PREFIX}unstarted"
        self.rest_port = 0
        self.rest_url = ""
        self.created_users: list[str] = []
        self.timings: dict[str, float] = {}
        self._procs: dict[str, subprocess.Popen] = {}  # "munged", "slurmctld", "slurmrestd", node names
        # SIGKILL at once in the namespaces: the cluster's state is thrown away, and slurmstepd would sit out a
        # SIGTERM
        self._net = netlab.NetLab(what="Slurm test cluster", error=SlurmClusterError, bridge=BRIDGE, subnet=SUBNET,
                                  netns_pattern=rf"{CTL_NETNS}|{NODE_PREFIX}\d+", veth_prefix=VETH_PREFIX,
                                  lock_path=LOCK_PATH, tmp_prefix=TMP_PREFIX, user_marker=USER_MARKER,
                                  kill_signals=(signal.SIGKILL,))

    # ------------------------------------------------------------------ paths
    @property
    def conf_path(self) -> Path:
        """slurm.conf: every client and daemon reads it through ``SLURM_CONF``."""
        return self.root / "etc" / "slurm.conf"

    @property
    def jwt_key_path(self) -> Path:
        """The HS256 key of auth/jwt (root only, 0600); ``token()`` signs with it."""
        return self.root / "etc" / "jwt_hs256.key"

    @property
    def munge_socket(self) -> Path:
        """munged's socket (in a 0755 directory: clients of every uid use it, from every namespace)."""
        return self.root / "munge" / "munge.socket"

    @property
    def shared_dir(self) -> Path:
        """A directory every user can read and traverse (0755, root's): put files jobs must read here."""
        return self.root / "shared"

    @property
    def job_dir(self) -> Path:
        """A directory every user can write (1777, like /tmp): jobs' working directory and output files."""
        return self.root / "jobs"

    @property
    def log_dir(self) -> Path:
        """The daemons' logs (``slurmctld.log``, ``slurmd-<node>.log``, ``slurmrestd.log``...)."""
        return self.root / "log"

    @property
    def env(self) -> dict[str, str]:
        """The environment for Slurm clients in the root namespace: ours, without ``SLURM_*``, plus SLURM_CONF."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf_path)
        return env

    def netns_of(self, name: str) -> str:
        """The network namespace of a node (or of the controller, ``egd-sctl``)."""
        if name != CTL_NETNS and name not in self.nodes:
            raise KeyError(name)
        return name

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ bring-up
    def start(self, ready_timeout: float = 30) -> SlurmCluster:
        """Clean up leftovers of a crashed run, build the network, write keys and slurm.conf, start munged,
        slurmctld, the slurmds and slurmrestd, and wait until every node is idle and the REST API answers."""
        if self._net.held:
            return self
        t0 = time.monotonic()
        self._net.lock(self.lock_timeout)  # from here on close() may tear down: this cluster holds the lock
        self.cleanup_leftovers()
        t1 = time.monotonic()
        self.root = self._net.make_dir()  # 0755: munge socket, slurm.conf and shared_dir are for test users too
        self._net.check_subnet_free()
        self._write_files()
        # the names each namespace sees as /etc/hosts (bind mount, see _in_netns)
        self._net.write_names(self._net_hosts())
        self._net.build(self._net_hosts())
        t2 = time.monotonic()
        self._start_munged()
        t3 = time.monotonic()
        self._spawn("slurmctld", CTL_NETNS, [SLURMCTLD, "-D", "-i"])
        for node in self.nodes:
            self._spawn_slurmd(node)
        self._start_slurmrestd()
        self._wait_nodes_usable(self.nodes, ready_timeout)
        self._wait_rest(ready_timeout)
        t4 = time.monotonic()
        self.timings.update(cleanup=t1 - t0, files_and_network=t2 - t1, munged=t3 - t2, slurm_ready=t4 - t3,
                            start=t4 - t0)
        return self

    def _write_files(self) -> None:
        for sub, mode in (("etc", 0o755), ("state", 0o700), ("spool", 0o755), ("log", 0o755), ("run", 0o755),
                          ("shared", 0o755), ("jobs", 0o1777)):
            (self.root / sub).mkdir()
            (self.root / sub).chmod(mode)  # mkdir's mode is masked by the umask
        for node in self.nodes:
            (self.root / "spool" / node).mkdir()
        self.jwt_key_path.write_bytes(os.urandom(32))
        self.jwt_key_path.chmod(0o600)
        self.rest_port = _free_port()
        self.rest_url = f"http://127.0.0.1:{self.rest_port}"
        netlab.write_file(self.conf_path, self._slurm_conf())
        # without File= the gpu plugin reports 0 GPUs and slurmctld drains the node (INVALID_REG)
        netlab.write_file(self.root / "etc" / "gres.conf",
                          "AutoDetect=off\n" + "".join(f"NodeName={node} Name=gpu File=/dev/null Count=1\n"
                                                       for node in self.gpu_nodes))

    def _slurm_conf(self) -> str:
        r = self.root
        return "\n".join([
            f"ClusterName={self.cluster_name}",
            f"SlurmctldHost={CTL_NETNS}({CTL_IP})",
            f"SlurmctldPort={CTLD_PORT}",
            f"SlurmdPort={SLURMD_PORT}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "AuthAltTypes=auth/jwt",
            f"AuthAltParameters=jwt_key={self.jwt_key_path}",
            # daemons bind their own address only: no 0.0.0.0 listener in any namespace
            "CommunicationParameters=NoInAddrAny,NoCtldInAddrAny",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            # no cgroup configuration: track job processes through /proc (they share the machine anyway)
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "PropagateResourceLimits=NONE",
            # the nodes' CPUs and memory are what this file says, whatever the machine has
            "SlurmdParameters=config_overrides",
            # one fake GPU (gres.conf: File=/dev/null) on egd-sn1 and egd-sn2: --gres=gpu:1 schedules, sets
            # CUDA_VISIBLE_DEVICES=0, and a third GPU job waits PENDING (Resources)
            "GresTypes=gpu",
            "ReturnToService=2",
            "JobRequeue=0",
            f"SchedulerType={self.scheduler_type}",
            f"SchedulerParameters={self.scheduler_parameters}",
            "KillWait=2",
            "MinJobAge=300",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=10",
            "MessageTimeout=5",
            "TCPTimeout=2",
            f"NodeName={self.nodes[0]},{self.nodes[1]} NodeAddr={self.node_ips[self.nodes[0]]},"
            f"{self.node_ips[self.nodes[1]]} CPUs=2 RealMemory=4000 Gres=gpu:1 State=UNKNOWN",
            f"NodeName={self.nodes[2]} NodeAddr={self.node_ips[self.nodes[2]]} CPUs=1 RealMemory=4000 State=UNKNOWN",
            f"PartitionName=debug Nodes={self.nodes[0]},{self.nodes[1]} Default=YES MaxTime=INFINITE State=UP "
            "OverSubscribe=FORCE:8",
            f"PartitionName=tiny Nodes={self.nodes[2]} MaxTime=INFINITE State=UP OverSubscribe=NO",
            f"PartitionName=short Nodes={self.nodes[0]},{self.nodes[1]} MaxTime=1 State=UP OverSubscribe=FORCE:8",
            "",
        ])

    def _net_hosts(self) -> list[netlab.NetHost]:
        # veth egd-sv0 for the controller, egd-svN for node egd-snN
        return [netlab.NetHost(CTL_NETNS, f"{VETH_PREFIX}0", CTL_IP),
                *(netlab.NetHost(node, f"{VETH_PREFIX}{i}", self.node_ips[node])
                  for i, node in enumerate(self.nodes, start=1))]

    @staticmethod
    def _in_netns(ns: str, argv: Sequence[str]) -> list[str]:
        # Not `ip netns exec`: it remounts /sys, which hides /sys/fs/cgroup, and slurmd 22.05 is fatal without it.
        # nsenter --net, then private UTS and mount namespaces for the host's name and its /etc/hosts (the mount
        # stays inside). nsenter, unshare and sh all exec: the pid is the command's.
        script = ('mount --bind "/etc/netns/$1/hosts" /etc/hosts && '
                  '{ [ ! -f /etc/resolv.conf ] || mount --bind "/etc/netns/$1/resolv.conf" /etc/resolv.conf; } && '
                  'hostname "$1" && shift && exec "$@"')
        return ["nsenter", f"--net=/run/netns/{ns}", "--", "unshare", "--uts", "--mount", "--propagation",
                "private", "--", "sh", "-c", script, "sh", ns, *argv]

    def _spawn(self, name: str, ns: str | None, argv: Sequence[str], env: dict[str, str] | None = None,
               log: Path | None = None) -> subprocess.Popen:
        full = self._in_netns(ns, argv) if ns else list(argv)
        proc = netlab.spawn_logged(name, full, log or self.log_dir / f"{name}.out", env or self.env)
        self._procs[name] = proc
        return proc

    def _spawn_slurmd(self, node: str) -> None:
        # a SIGKILLed slurmd leaves its pid file, and a new slurmd kills the pid it names: never a reused pid
        with contextlib.suppress(FileNotFoundError):
            (self.root / "run" / f"slurmd-{node}.pid").unlink()
        self._spawn(node, node, [SLURMD, "-D", "-N", node], log=self.log_dir / f"slurmd-{node}.out")

    def _start_munged(self, timeout: float = 10) -> None:
        munge = self.root / "munge"
        munge.mkdir()
        shutil.chown(munge, "munge", "munge")
        munge.chmod(0o755)  # clients of any uid need x on the socket's directory
        key = munge / "munge.key"
        self._net.cmd(["mungekey", "--create", f"--keyfile={key}"])
        shutil.chown(key, "munge", "munge")
        key.chmod(0o600)
        self._spawn("munged", None, ["setpriv", "--reuid=munge", "--regid=munge", "--clear-groups", MUNGED, "-F",
                                     f"--socket={self.munge_socket}", f"--key-file={key}",
                                     f"--pid-file={munge}/munged.pid", f"--seed-file={munge}/munged.seed",
                                     f"--log-file={munge}/munged.log"], log=self.log_dir / "munged.out")
        deadline = time.monotonic() + timeout
        while True:
            if self._procs["munged"].poll() is not None:
                raise SlurmClusterError(f"munged exited with {self._procs['munged'].returncode}:\n"
                                        f"{self.log_tail(40, 'munged')}")
            if self.munge_socket.exists():
                probe = subprocess.run(f"munge -S {self.munge_socket} -n | unmunge -S {self.munge_socket}",
                                       shell=True, capture_output=True, text=True)
                if probe.returncode == 0:
                    return
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"munged not ready after {timeout}s:\n{self.log_tail(40, 'munged')}")
            time.sleep(0.02)

    def _start_slurmrestd(self) -> None:
        # slurmrestd refuses root. SLURM_JWT=daemon: it passes each request's token on (without it every request
        # is a 401). Only openapi/v0.0.38: the default set includes openapi/dbv0.0.38, fatal without slurmdbd.
        env = dict(self.env, SLURM_JWT="daemon")
        self._spawn("slurmrestd", None, ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                                         SLURMRESTD, "-a", "rest_auth/jwt", "-s", "openapi/v0.0.38",
                                         f"127.0.0.1:{self.rest_port}"], env=env,
                    log=self.log_dir / "slurmrestd.log")
        # for cleanup_leftovers: slurmrestd writes no pid file of its own
        netlab.write_file(self.root / "run" / "slurmrestd.pid", f"{self._procs['slurmrestd'].pid}\n")

    def _check_daemons(self, names: Iterable[str]) -> None:
        for name in names:
            proc = self._procs.get(name)
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise SlurmClusterError(f"{name} exited ({code}):\n{self.log_tail(40, name)}")

    def _wait_nodes_usable(self, nodes: Sequence[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_daemons(["slurmctld", *nodes])
            states = self._node_states()
            if all(_usable(states.get(node, "")) for node in nodes):
                return
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"nodes not usable after {timeout}s: {states}\n"
                                        f"{self.log_tail(40, 'slurmctld')}\n"
                                        + "\n".join(self.log_tail(10, n) for n in nodes))
            time.sleep(0.05)

    def _wait_rest(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_daemons(["slurmrestd"])
            try:
                status, body = self.rest("GET", f"{API}/ping")
                if status == 200:
                    return
                last = f"{status} {body}"
            except OSError as exc:
                last = repr(exc)
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"slurmrestd not ready after {timeout}s ({last}):\n"
                                        f"{self.log_tail(40, 'slurmrestd')}")
            time.sleep(0.05)

    # ------------------------------------------------------------------ clients
    def run(self, argv: Sequence[str], user: str | None = None, timeout: float = 30,
            **kwargs: Any) -> subprocess.CompletedProcess:
        """Run a command (``sbatch``, ``squeue``...) in the root namespace with ``env``, as root or as ``user``
        (through setpriv, with that user's groups and HOME); cwd ``job_dir``, text output captured unless
        overridden."""
        kwargs.setdefault("capture_output", "stdout" not in kwargs and "stderr" not in kwargs)
        kwargs.setdefault("text", True)
        kwargs.setdefault("cwd", str(self.job_dir))
        env = dict(self.env, **kwargs.pop("env", {}))
        argv = list(argv)
        if user is not None:
            entry = pwd.getpwnam(user)
            env.update(HOME=entry.pw_dir, USER=user, LOGNAME=user)
            argv = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups", "--", *argv]
        return subprocess.run(argv, env=env, timeout=timeout, **kwargs)

    def run_on(self, node: str, argv: Sequence[str], timeout: float = 30,
               **kwargs: Any) -> subprocess.CompletedProcess:
        """Run a command inside a node's (or the controller's) namespace, as root, output captured as text."""
        kwargs.setdefault("capture_output", "stdout" not in kwargs and "stderr" not in kwargs)
        kwargs.setdefault("text", True)
        return subprocess.run(self._in_netns(self.netns_of(node), argv), env=self.env, timeout=timeout, **kwargs)

    def token(self, user: str, lifespan: int = 600) -> str:
        """A JWT for ``user`` (HS256 with the cluster's key), as ``scontrol token`` would mint it."""
        return hs256_token(self.jwt_key_path.read_bytes(), user, lifespan)

    def rest(self, method: str, path: str, user: str = "root", body: Any = None,
             timeout: float = 15) -> tuple[int, Any]:
        """One slurmrestd request with ``user``'s token: ``(status, parsed JSON or text)``; HTTP errors returned."""
        headers = {"X-SLURM-USER-NAME": user, "X-SLURM-USER-TOKEN": self.token(user), "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.rest_url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, (json.loads(raw) if raw else None)
        except ValueError:
            return status, raw.decode(errors="replace")

    def squeue(self, job_ids: Iterable[int] = ()) -> list[dict[str, Any]]:
        """Every job slurmctld still knows (finished ones for ``MinJobAge``), or those in ``job_ids``.

        Keys: id (int), name, user, state (``RUNNING``, ``PENDING``, ``NODE_FAIL``...), reason (``None`` while
        running, ``Resources``, ``Priority``...), node (batch host, "" while pending), nodes, comment, partition,
        time_limit, time_used.
        """
        argv = ["squeue", "--states=all", "-h", "-o", _SEP.join(_SQUEUE_FIELDS.values())]
        ids = [str(int(j)) for j in job_ids]
        if ids:
            argv.append("--jobs=" + ",".join(ids))
        proc = self.run(argv)
        if proc.returncode != 0:
            if ids and "Invalid job id" in proc.stderr:
                return []
            raise SlurmClusterError(f"squeue failed ({proc.returncode}): {proc.stderr.strip()}")
        jobs = []
        for line in proc.stdout.splitlines():
            values = line.split(_SEP)
            if len(values) != len(_SQUEUE_FIELDS):
                continue
            job: dict[str, Any] = dict(zip(_SQUEUE_FIELDS, values, strict=True))
            job["id"] = int(job["id"])
            if job["comment"] == "(null)":
                job["comment"] = ""
            if job["node"] in ("(null)", "n/a"):
                job["node"] = ""
            jobs.append(job)
        return jobs

    def job(self, job_id: int) -> dict[str, Any] | None:
        """``squeue()``'s entry for one job, None when slurmctld does not know it (any more)."""
        found = self.squeue([job_id])
        return found[0] if found else None

    def scontrol_job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job -o``'s fields (``ExitCode``, ``BatchHost``, ``StdOut``...); values without spaces."""
        proc = self.run(["scontrol", "show", "job", "-o", str(int(job_id))])
        if proc.returncode != 0:
            raise SlurmClusterError(f"scontrol show job {job_id}: {proc.stderr.strip()}")
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))

    def wait_job_state(self, job_id: int, states: Iterable[str], timeout: float = 30,
                       interval: float = 0.05) -> dict[str, Any]:
        """Poll until the job's state is one of ``states``; SlurmClusterError if it ends in another final state
        or after ``timeout`` s (with the job and the controller's log)."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job is not None and job["state"] in wanted:
                return job
            if job is not None and job["state"] in FINAL_STATES:
                raise SlurmClusterError(f"job {job_id} ended {job['state']} (waiting for {sorted(wanted)}): {job}\n"
                                        f"{self.log_tail(20, 'slurmctld')}")
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"job {job_id} not {sorted(wanted)} after {timeout}s: {job}\n"
                                        f"{self.log_tail(20, 'slurmctld')}")
            time.sleep(interval)

    def cancel_all(self, timeout: float = 30) -> None:
        """Cancel every job and wait until none is PENDING, RUNNING or COMPLETING (between tests)."""
        deadline = time.monotonic() + timeout
        while True:
            active = [j for j in self.squeue() if j["state"] in ACTIVE_STATES]
            if not active:
                return
            to_cancel = [str(j["id"]) for j in active if j["state"] != "COMPLETING"]
            if to_cancel:
                self.run(["scancel", *to_cancel])
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"jobs still active after {timeout}s: {active}\n"
                                        f"{self.log_tail(20, 'slurmctld')}")
            time.sleep(0.1)

    # ------------------------------------------------------------------ nodes
    def _node_states(self) -> dict[str, str]:
        proc = self.run(["scontrol", "show", "node", "-o"])
        states = {}
        for line in proc.stdout.splitlines():
            name = re.search(r"NodeName=(\S+)", line)
            state = re.search(r" State=(\S+)", line)
            if name and state:
                states[name.group(1)] = state.group(1)
        return states

    def node_state(self, name: str) -> str:
        """scontrol's ``State=`` of a node: ``IDLE``, ``MIXED``, ``ALLOCATED``, ``DOWN+NOT_RESPONDING``..."""
        return self._node_states().get(name, "")

    def node_info(self, name: str) -> dict[str, str]:
        """``scontrol show node -o NAME``'s fields (``NodeAddr``, ``State``, ``Reason``...), values without
        spaces."""
        proc = self.run(["scontrol", "show", "node", "-o", name])
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))

    def processes_on(self, node: str) -> list[tuple[int, str]]:
        """``(pid, cmdline)`` of the live processes in a node's namespace other than its slurmd: slurmstepd and
        the jobs' processes."""
        daemon = self._procs.get(node)
        slurmd = daemon.pid if daemon is not None else None
        return [(pid, cmdline(pid)) for pid in netlab.netns_pids(self.netns_of(node))
                if pid != slurmd and not is_zombie_or_gone(pid)]

    def slurmd_pid(self, node: str) -> int | None:
        """The pid of the node's slurmd, None while it is down."""
        proc = self._procs.get(node)
        return proc.pid if proc is not None and proc.poll() is None else None

    def kill_node(self, name: str, timeout: float = 5) -> None:
        """The node dies: SIGKILL every process in its namespace (slurmd, slurmstepd, the jobs' processes)."""
        ns = self.netns_of(name)
        left = netlab.kill_all(lambda: netlab.netns_pids(ns), timeout, (signal.SIGKILL,))
        proc = self._procs.get(name)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        if left:
            raise SlurmClusterError(f"processes left on {name} after SIGKILL: {left}")

    def start_node(self, name: str, timeout: float = 30) -> None:
        """Start the node's slurmd again (no-op while it runs) and wait until slurmctld has it usable again."""
        if self.slurmd_pid(name) is None:
            self._spawn_slurmd(self.netns_of(name))
        self._wait_nodes_usable([name], timeout)

    def heal(self, timeout: float = 30) -> None:
        """Start the slurmd of every node that was killed (``kill_node``) and wait until all nodes are usable:
        for fixtures, so that a test that failed between ``kill_node`` and ``start_node`` does not leave a node
        down for the next ones."""
        for node in self.nodes:
            if self.slurmd_pid(node) is None:
                self._spawn_slurmd(node)
        self._wait_nodes_usable(self.nodes, timeout)

    # ------------------------------------------------------------------ logs
    def log_tail(self, lines: int = 40, daemon: str = "slurmctld") -> str:
        """The last ``lines`` lines of a daemon's log: ``slurmctld``, a node name (its slurmd), ``slurmrestd``,
        ``munged``; with the daemon's stdout/stderr."""
        if daemon == "slurmctld":
            files = [self.log_dir / "slurmctld.out", self.log_dir / "slurmctld.log"]
        elif daemon in self.nodes:
            files = [self.log_dir / f"slurmd-{daemon}.out", self.log_dir / f"slurmd-{daemon}.log"]
        elif daemon == "munged":
            files = [self.log_dir / "munged.out", self.root / "munge" / "munged.log"]
        else:
            files = [self.log_dir / f"{daemon}.log"]
        parts = []
        for path in files:
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            parts.append(f"==> {path.name} <==\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts) or f"(no log for {daemon})"

    # ------------------------------------------------------------------ users
    def ensure_user(self, name: str) -> pwd.struct_passwd:
        """A non-root system user with a home, for jobs (``sbatch --uid``, a REST token). Idempotent.

        Created (``useradd -r -m``, bash, marked in GECOS) if missing and deleted again by ``close()``; an existing
        account is kept as it is.
        """
        if self._net.add_user(name, "-r"):
            self.created_users.append(name)
        return pwd.getpwnam(name)

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Kill every daemon and every process in the namespaces, delete namespaces, /etc/netns entries, links,
        created users and the root directory. Collects errors and raises SlurmClusterError if anything is left."""
        if not self._net.held:
            return
        errors: list[str] = []
        try:
            for name in ("slurmrestd", "munged"):  # the daemons in the root namespace
                proc = self._procs.pop(name, None)
                if proc is not None:
                    errors += [f"{name} {pid} left" for pid in netlab.kill_all(functools.partial(_running, proc))]
            errors += self._net.tear_down(self.created_users, self.root)
            for proc in self._procs.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(1)  # reap: their namespaces' processes are gone
            self._procs.clear()
            # while the lock is held, anything of any cluster on this machine is this one's
            errors += [f"left after teardown: {item}" for item in self.leftovers()]
        finally:
            self._net.unlock()
        if errors:
            raise SlurmClusterError("Slurm test cluster teardown incomplete: " + "; ".join(errors))

    def cleanup_leftovers(self) -> None:
        """Remove what an earlier cluster that crashed (or was killed) left. Call only while holding the lock."""
        self._net.cleanup(_kill_stray_daemons)

    def leftovers(self) -> list[str]:
        """What of any cluster is still on this machine (namespaces, links, /etc/netns, daemons, users, dirs)."""
        prefix = os.path.join(tempfile.gettempdir(), TMP_PREFIX)
        found = self._net.leftovers()
        for pid in netlab.all_pids():
            exe = netlab.exe(pid)
            if exe in (MUNGED, SLURMRESTD, SLURMCTLD, SLURMD) or exe.endswith("/slurmstepd"):
                if prefix in cmdline(pid) or prefix in _environ(pid):
                    found.append(f"process {pid} {cmdline(pid)}")
        return found


def _running(proc: subprocess.Popen) -> list[int]:
    """``[proc.pid]`` while the process runs, ``[]`` once it has exited (and is reaped: polling reaps it)."""
    return [] if proc.poll() is not None else [proc.pid]


def _kill_stray_daemons() -> list[str]:
    # The daemons of a crashed cluster outside its namespaces (munged, slurmrestd; those inside die with the
    # namespaces): by their pid files, then any such daemon of ours (found by its socket path or SLURM_CONF under
    # our temporary prefix) whose pid file is gone.
    prefix = os.path.join(tempfile.gettempdir(), TMP_PREFIX)

    def strays() -> list[int]:
        found = []
        for pid in netlab.all_pids():
            exe = netlab.exe(pid)
            if exe == MUNGED and prefix in cmdline(pid):
                found.append(pid)
            elif exe in (SLURMRESTD, SLURMCTLD, SLURMD) and f"SLURM_CONF={prefix}" in _environ(pid):
                found.append(pid)
        return found

    for pidfile in [*Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*/munge/munged.pid"),
                    *Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*/run/slurmrestd.pid")]:
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().split()[0])
            if netlab.exe(pid) in (MUNGED, SLURMRESTD):
                netlab.kill_all(lambda pid=pid: [] if is_zombie_or_gone(pid) else [pid])  # type: ignore[misc]
    left = netlab.kill_all(strays)
    return [f"daemons of an earlier cluster left: {left}"] if left else []


def _usable(state: str) -> bool:
    """A node state in which slurmctld schedules jobs to the node (``IDLE``, ``MIXED``, ``ALLOCATED``...)."""
    base, *flags = state.split("+")
    return base in ("IDLE", "MIXED", "ALLOCATED") and not {"NOT_RESPONDING", "DRAIN", "POWERED_DOWN"} & set(flags)


# ---------------------------------------------------------------------- fixture
# Registered both here and (re-exported) in conftest: share one cluster through a reference count.
_shared: SlurmCluster | None = None
_users = 0


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """One Slurm cluster (controller + 3 nodes, munge, slurmrestd) for the whole session; installs Slurm first
    if it is missing. Fails (does not skip) when it cannot start, with the part, the step and its log."""
    global _shared, _users
    if _shared is None:
        reason = unavailable_reason()
        if reason:
            pytest.skip(reason)
        if not installed():
            try:
                install()
            except SlurmClusterError as exc:
                pytest.fail(f"installing Slurm: {exc}")
        # another test session on this machine may hold the cluster (the lock) for a while: wait for it
        cluster = SlurmCluster(lock_timeout=float(os.environ.get("EGD_SLURMLAB_LOCK_TIMEOUT", "240")))
        try:
            cluster.start()
        except SlurmClusterError as exc:
            with contextlib.suppress(SlurmClusterError):
                cluster.close()
            pytest.fail(f"starting the Slurm test cluster: {exc}")
        except BaseException:
            with contextlib.suppress(SlurmClusterError):  # the start error matters; the next run cleans up
                cluster.close()
            raise
        _shared = cluster
    _users += 1
    try:
        yield _shared
    finally:
        _users -= 1
        if _users == 0:
            cluster, _shared = _shared, None
            cluster.close()
