"""A real Kubernetes cluster for the kubernetes-driver tests: control plane, one real node and kwok nodes.

What runs (all as root, every daemon a child of this process with its log under ``<work>/logs``; recipe
/work/shared/k8s-container-recipe.md §3)::

    etcd                       127.0.0.1:<free>                      data in <work>/etcd
    kube-apiserver             https://127.0.0.1:<free>  (api_url)   token auth (tokens.csv) + RBAC, certs by openssl
    kube-controller-manager    --secure-port <free>                  creates the ``default`` ServiceAccounts
    kube-scheduler             --secure-port <free>
    containerd                 <work>/containerd/containerd.sock     CRI, runc, ``restrict_oom_score_adj``
    kubelet                    node ``egd-node-0``, labels type=real, IP 10.250.0.1 on the bridge ``egd-node0``;
                               pods on the CNI bridge ``egd-cni0``, 10.245.0.0/24, reachable from the host
    kwok                       simulates the nodes labelled type=kwok (``add_kwok_nodes``): their pods turn
                               Running at once with an IP from 10.0.0.0/24 and run nothing

* The binaries come from ``tests/services/install-kubernetes.sh`` (Debian packages, then ``build-kubernetes.sh``:
  ~7 min once, cached in ``$EGD_K8S_CACHE``, default ``~/.cache/egd-k8s``). ``start()`` runs it when incomplete.
* Images (no registry): ``localhost/egd-kernel:test`` (Debian minbase + python3-ipykernel + tini) and the sandbox
  image ``localhost/pause:egd``, imported with ``ctr -n k8s.io images import`` from the tars that
  ``tests/services/build-images.sh`` prints; without that script only the pause image is built here (gcc).
  Pods must say ``imagePullPolicy: Never`` (or IfNotPresent).
* Every port is chosen free at start, so a second run or another daemon does not collide on ports; the node IP
  and the two bridge names are fixed, so two clusters cannot run on one host at the same time.
* Host state (sysctls, firewall tables, links, netns, mounts, cgroups, paths) is recorded with tests/hoststate.py
  before anything starts; ``stop()`` deletes the pods, SIGKILLs the container tasks, stops the daemons in reverse
  order, removes the cluster's own footprint (``restore_own_footprint``: not HostState.restore(), which would also
  remove what a docker/podman fixture running meanwhile made) and raises when what concerns the cluster still
  differs from the record (recipe §5). The kernel image import (~10-15 s, the slowest part) overlaps the control
  plane's start. ``EGD_K8S_NO_KERNEL_IMAGE=1``: pause image only (no build-images.sh, no kernel pods).
* Pods reach the host on the node IP (a gateway listening there, or on 0.0.0.0, is reachable from kernels); not
  on 127.0.0.1 (the kubelet's KUBE-FIREWALL drops non-local traffic to 127.0.0.0/8).

Usage::

    def test_something(kube_cluster):
        kube_cluster.create_namespace("kernels")
        status, pod = kube_cluster.request("POST", "/api/v1/namespaces/kernels/pods", {...})
        kube_cluster.wait_pod_phase("kernels", "kernel-1", {"Running"}, 60)
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import hoststate
from tests.hoststate import HostState
from tests.procs import cmdline, is_zombie_or_gone
from tests.yarncluster import _free_ports, _session_root  # shared by the clusters of the tests

HERE = Path(__file__).resolve().parent
INSTALLER = HERE / "services" / "install-kubernetes.sh"
BUILD_IMAGES = HERE / "services" / "build-images.sh"

K8S_VERSION = "v1.30.14"
ETCD_VERSION = "v3.5.36"
KWOK_VERSION = "v0.8.0"
BIN_PARTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kwok",
             "kwok-stages.yaml")

NODE_NAME = "egd-node-0"
NODE_BRIDGE = "egd-node0"
NODE_IP = "10.250.0.1"
CNI_BRIDGE = "egd-cni0"
POD_CIDR = "10.245.0.0/24"
SERVICE_CIDR = "10.96.0.0/16"
KERNEL_IMAGE = "localhost/egd-kernel:test"
PAUSE_IMAGE = "localhost/pause:egd"
CNI_BIN_DIR = "/usr/lib/cni"

#: Host paths the daemons may create outside the work directory, besides hoststate.HOST_PATHS.
EXTRA_HOST_PATHS = ("/etc/cni", "/opt/cni", "/opt/containerd", "/var/lib/containerd", "/etc/kubernetes")
#: The host paths of those this cluster may create (the others belong to podman and dockerd).
OUR_HOST_PATHS = ("/run/containerd", "/var/lib/cni", "/var/lib/kubelet", "/var/log/containers", "/var/log/pods",
                  "/usr/libexec/kubernetes", *EXTRA_HOST_PATHS)
#: Firewall chains the kubelet and the CNI plugins add.
OUR_CHAIN = re.compile(r"^(KUBE-|CNI-)")
#: Cgroups the kubelet (cgroupfs driver) and containerd make.
OUR_CGROUP = re.compile(r"/(kubepods|k8s\.io)(/|$)")


class KubeClusterError(RuntimeError):
    """A part of the cluster could not be installed, started or stopped."""

    def __init__(self, part: str, step: str, detail: str = "", log: str = "") -> None:
        message = f"{part}: {step}"
        if detail:
            message += f": {detail}"
        if log:
            message += f"\n--- last lines of the {part} log ---\n{log}"
        super().__init__(message)
        self.part = part
        self.step = step


# ---------------------------------------------------------------------- install
def cache_root() -> Path:
    """Where build-kubernetes.sh keeps its builds (``$EGD_K8S_CACHE``, default ``~/.cache/egd-k8s``)."""
    return Path(os.environ.get("EGD_K8S_CACHE") or Path.home() / ".cache" / "egd-k8s")


def default_bin_dir() -> Path:
    """The bin directory of the pinned versions (what install-kubernetes.sh prints)."""
    return cache_root() / f"k8s-{K8S_VERSION}-etcd-{ETCD_VERSION}-kwok-{KWOK_VERSION}" / "bin"


def tools_missing(bin_dir: Path | None = None) -> list[str]:
    """What install-kubernetes.sh would still have to install or build ([] when nothing)."""
    bin_dir = bin_dir or default_bin_dir()
    missing = [p for p in BIN_PARTS if not (bin_dir / p).is_file() or (bin_dir / p).stat().st_size == 0]
    missing += [t for t in ("containerd", "ctr", "runc", "iptables", "nft", "openssl", "gcc", "ip")
                if shutil.which(t) is None]
    missing += [p for p in ("bridge", "host-local", "portmap") if not os.access(f"{CNI_BIN_DIR}/{p}", os.X_OK)]
    return missing


#: Why the install before the tests failed (see :func:`install_before_tests`): the cluster's tests report it
#: instead of trying again, each within its own timeout.
_install_failure: KubeClusterError | None = None


def install_before_tests(say: Callable[[str], None]) -> None:
    """Install or build what the cluster needs before any test runs, when something is missing (as root on
    Linux): on a fresh machine Kubernetes is built from source, about 10 minutes on 2 cores, longer than one
    test's timeout. A failure is kept for :meth:`KubeCluster.start` to report."""
    global _install_failure
    if sys.platform != "linux" or os.geteuid() != 0 or not tools_missing():
        return
    say(f"installing the Kubernetes test cluster's tools ({INSTALLER.name}; a first build takes about 10 minutes)")
    started = time.monotonic()
    try:
        install()
    except KubeClusterError as e:
        _install_failure = e
        say(f"the install failed; the Kubernetes tests will report it: {e.step}")
        return
    say(f"installed in {time.monotonic() - started:.0f} s")


def install(timeout: float = 1800) -> Path:
    """Run ``tests/services/install-kubernetes.sh``; the bin directory it prints."""
    try:
        proc = subprocess.run(["sh", str(INSTALLER)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise KubeClusterError("install", f"{INSTALLER} did not finish within {timeout:.0f} s") from e
    if proc.returncode != 0:
        raise KubeClusterError("install", f"{INSTALLER} failed ({proc.returncode})",
                               log=_tail(proc.stdout + proc.stderr, 40))
    return Path(proc.stdout.strip().splitlines()[-1])


def _tail(text: str, n: int) -> str:
    return "\n".join(text.splitlines()[-n:])




def _run(argv: list[str], part: str, step: str, timeout: float = 120, **kw: Any) -> str:
    """Run a command; its stdout, or KubeClusterError naming the part and step with the command's output."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        raise KubeClusterError(part, step, f"{argv[0]} did not finish within {timeout:.0f} s") from e
    if proc.returncode != 0:
        raise KubeClusterError(part, step, f"{' '.join(argv)} exited with {proc.returncode}",
                               _tail(proc.stdout + proc.stderr, 40))
    return proc.stdout


def _quiet(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a command whose failure is fine (cleanup); never raises."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return subprocess.CompletedProcess(argv, 1, "", str(e))


# ---------------------------------------------------------------------- restore (recipe §5.2 steps 3-8)
# hoststate.HostState.restore() removes *everything* new on the host, which would also take the links, mounts and
# cgroups of a docker/podman fixture running at the same time; the cluster removes only its own footprint and then
# compares the whole host with the record.
def _remove_our_firewall(tables_before: list[str] | None) -> None:
    """Drop the KUBE-/CNI- chains and the rules jumping to them from every nft table, then the ip/ip6 filter, nat
    and mangle tables that were not there before and hold no rule any more. Other chains stay as they are."""
    def ruleset() -> list[dict[str, Any]]:
        out = _quiet(["nft", "-j", "list", "ruleset"])
        try:
            return list(json.loads(out.stdout).get("nftables", [])) if out.returncode == 0 else []
        except ValueError:
            return []
    items = ruleset()
    for item in items:
        rule = item.get("rule")
        if rule is None or OUR_CHAIN.match(rule["chain"]):
            continue  # goes with its chain
        if re.search(r'"(jump|goto)": \{"target": "(KUBE-|CNI-)', json.dumps(rule.get("expr", []))):
            _quiet(["nft", "delete", "rule", rule["family"], rule["table"], rule["chain"], "handle",
                    str(rule["handle"])])
    ours = [(c["family"], c["table"], c["name"]) for c in (i.get("chain") for i in items)
            if c is not None and OUR_CHAIN.match(c["name"])]
    for fam, table, name in ours:
        _quiet(["nft", "flush", "chain", fam, table, name])
    for fam, table, name in ours:  # after all flushes: chains jump to each other
        _quiet(["nft", "delete", "chain", fam, table, name])
    items = ruleset()
    with_rules = {(i["rule"]["family"], i["rule"]["table"]) for i in items if "rule" in i}
    for fam, table in {(i["table"]["family"], i["table"]["name"]) for i in items if "table" in i} - with_rules:
        if (fam in ("ip", "ip6") and table in ("filter", "nat", "mangle")
                and f"table {fam} {table}" not in (tables_before or [])):
            _quiet(["nft", "delete", "table", fam, table])


def restore_own_footprint(state: HostState) -> None:
    """Undo what the cluster's parts changed on the host and is not in ``state`` (the record taken before)."""
    # links: the pods' host-side veths (their netns may still be there), then the two bridges
    for bridge in (CNI_BRIDGE, NODE_BRIDGE):
        if bridge in state.links:
            continue
        for line in _quiet(["ip", "-o", "link", "show", "master", bridge]).stdout.splitlines():
            veth = line.split(": ")[1].split("@")[0]
            if veth not in state.links:
                _quiet(["ip", "link", "del", veth])
        _quiet(["ip", "link", "del", bridge])
    if shutil.which("nft"):
        _remove_our_firewall(state.nft_tables)
    for key, value in state.sysctls.items():
        if value is not None and hoststate._sysctl(key) != value:
            with contextlib.suppress(OSError):
                Path("/proc/sys", key.replace(".", "/")).write_text(value + "\n")
    # mounts under the work directory (pod volumes, rootfs overlays, sandbox shm), deepest first; pod netns
    prefix = state.work_dir.rstrip("/") + "/"
    for target in sorted((m for m in hoststate._mounts() if m.startswith(prefix)), key=lambda m: (m.count("/"), m),
                         reverse=True):
        if _quiet(["umount", target]).returncode != 0:
            _quiet(["umount", "-l", target])
    for name in hoststate._netns():
        if name not in state.netns and name.startswith("cni-"):
            _quiet(["umount", f"{hoststate.NETNS_DIR}/{name}"])
            with contextlib.suppress(OSError):
                os.unlink(f"{hoststate.NETNS_DIR}/{name}")
    netns_dir = hoststate.NETNS_DIR
    if os.path.isdir(netns_dir) and not os.listdir(netns_dir):
        if hoststate._mounts().count(netns_dir) > state.mounts.count(netns_dir):
            _quiet(["umount", netns_dir])
        if netns_dir not in state.paths:
            with contextlib.suppress(OSError):
                os.rmdir(netns_dir)
    before = set(state.cgroups)
    for c in sorted((c for c in hoststate._cgroups() if c not in before and OUR_CGROUP.search(c)),
                    key=lambda c: c.count("/"), reverse=True):
        with contextlib.suppress(OSError):
            os.rmdir(c)
    # dockerd's own containerd keeps its shim sockets in /run/containerd/s too: leave that to whoever runs it
    shared = {"/run/containerd"} if _other_containerd_running() else set()
    for p in OUR_HOST_PATHS:
        if os.path.lexists(p) and p not in state.paths and p not in shared:
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(p)


def _other_containerd_running() -> bool:
    """Whether a containerd, containerd shim or dockerd runs (the cluster's own are stopped when this is asked)."""
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
        except OSError:
            continue
        if (comm in ("containerd", "dockerd") or comm.startswith("containerd-shim")) and not is_zombie_or_gone(
                int(entry)):
            return True
    return False


def cluster_leftovers(state: HostState, work: Path) -> list[str]:
    """The lines of ``state.differences()`` about something this cluster makes, not another fixture's (a docker or
    podman fixture running meanwhile changes links, mounts, cgroups and rules of its own); for the firewall: the
    KUBE-/CNI- rules and chains that were not there before."""
    marks = (f"link {CNI_BRIDGE}", f"link {NODE_BRIDGE}", "kubepods", "k8s.io", "netns cni-", str(work),
             *(p for p in OUR_HOST_PATHS if p != "/run/containerd" or not _other_containerd_running()),
             "sysctl vm.", "sysctl kernel.")
    found = [d for d in state.differences()
             if not d.startswith(("iptables", "ip6tables")) and any(m in d for m in marks)]
    for program, saved in (("iptables", state.iptables), ("ip6tables", state.ip6tables)):
        before = set(hoststate._normalise_rules(saved))
        added = [r for r in hoststate._normalise_rules(hoststate._save(f"{program}-save"))
                 if r not in before and re.search(r"KUBE-|CNI-", r)]
        if added:
            found.append(f"{program}: added {added[:10]}")
    return found


# ---------------------------------------------------------------------- images
def _docker_archive(rootfs_tar: bytes, tag: str, config: dict[str, Any], out: Path) -> None:
    """A docker-archive image (what ``docker save`` writes, and ``ctr images import`` reads) of one layer."""
    layer_id = hashlib.sha256(rootfs_tar).hexdigest()
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    cfg = json.dumps({"architecture": arch, "os": "linux", "config": config,
                      "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_id}"]},
                      "history": [{"created_by": "egd tests/kubecluster.py"}]}).encode()
    cfg_id = hashlib.sha256(cfg).hexdigest()
    manifest = json.dumps([{"Config": f"{cfg_id}.json", "RepoTags": [tag],
                            "Layers": [f"{layer_id}/layer.tar"]}]).encode()
    with tarfile.open(out, "w") as tar:
        for name, data in ((f"{layer_id}/layer.tar", rootfs_tar), (f"{cfg_id}.json", cfg),
                           ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))


PAUSE_C = r"""
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
static void sigdown(int s){ (void)s; exit(0); }
static void sigreap(int s){ (void)s; while (waitpid(-1, NULL, WNOHANG) > 0); }
int main(void){
  struct sigaction a = {0}; a.sa_handler = sigdown; sigaction(SIGINT,&a,NULL); sigaction(SIGTERM,&a,NULL);
  struct sigaction r = {0}; r.sa_handler = sigreap; r.sa_flags = SA_NOCLDSTOP; sigaction(SIGCHLD,&r,NULL);
  for(;;) pause();
}
"""


def build_pause_image(directory: Path) -> Path:
    """``localhost/pause:egd`` as a docker-archive under ``directory`` (a static pause binary; recipe §3.6)."""
    directory.mkdir(parents=True, exist_ok=True)
    src, binary = directory / "pause.c", directory / "pause"
    src.write_text(PAUSE_C)
    _run(["gcc", "-O2", "-static", "-s", "-o", str(binary), str(src)], "images", "compile the pause binary")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(binary, arcname="pause")
    out = directory / "pause-img.tar"
    _docker_archive(buf.getvalue(), PAUSE_IMAGE, {"Entrypoint": ["/pause"]}, out)
    return out


def image_tars(scratch: Path) -> dict[str, Path]:
    """``{"kernel": tar, "pause": tar}`` from tests/services/build-images.sh; only ``pause`` (built here) when
    that script does not exist, or with ``EGD_K8S_NO_KERNEL_IMAGE=1`` (faster; no real kernel pods then)."""
    if BUILD_IMAGES.exists() and os.environ.get("EGD_K8S_NO_KERNEL_IMAGE") != "1":
        out = _run(["bash", str(BUILD_IMAGES)], "images", f"{BUILD_IMAGES.name}", timeout=1800)
        tars = {}
        for line in out.split():
            if line.endswith("kernel-img.tar"):
                tars["kernel"] = Path(line)
            elif line.endswith("pause-img.tar"):
                tars["pause"] = Path(line)
        if "pause" in tars:
            return tars
    return {"pause": build_pause_image(scratch / "pause")}


# ---------------------------------------------------------------------- the cluster
@dataclass
class Daemon:
    """One background process of the cluster."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path


class KubeCluster:
    """etcd + kube-apiserver + controller-manager + scheduler, and optionally the real node (containerd +
    kubelet) and kwok; see the module docstring. ``start()`` then ``stop()``; as root only."""

    def __init__(self, root: Path | str, bin_dir: Path | None = None, node: bool = True, kwok: bool = True) -> None:
        self.bin_dir = Path(bin_dir) if bin_dir else default_bin_dir()
        self.with_node = node
        self.with_kwok = kwok
        self.work = Path(tempfile.mkdtemp(prefix="k8s-", dir=str(root)))
        self.pki = self.work / "pki"
        self.logs = self.work / "logs"
        self.containerd_dir = self.work / "containerd"
        self.containerd_sock = self.containerd_dir / "containerd.sock"
        self.kubelet_dir = self.work / "kubelet"
        self.ca_file = str(self.pki / "ca.crt")
        self.kubeconfig = str(self.work / "kubeconfig")
        self.token = ""
        self.api_url = ""
        self.node_ip = NODE_IP
        self.node_name = NODE_NAME
        self.kernel_image = KERNEL_IMAGE
        self.pause_image = PAUSE_IMAGE
        #: Images present in the node's containerd (``kernel`` only with tests/services/build-images.sh).
        self.images: dict[str, str] = {}
        self.ports: dict[str, int] = {}
        #: Seconds each part took to start (install, certs, etcd, apiserver, controllers, images, containerd,
        #: kubelet, kwok).
        self.timings: dict[str, float] = {}
        self.daemons: dict[str, Daemon] = {}
        self.kwok_nodes: list[str] = []
        #: The host as it was before the cluster started (tests/hoststate.py); ``stop()`` restores it.
        self.host_state: HostState | None = None
        #: HostState.differences() after stop() (also what other fixtures running meanwhile changed).
        self.host_differences: list[str] = []
        #: Seconds each step of ``stop()`` took.
        self.stop_timings: dict[str, float] = {}
        self._ssl = ssl.create_default_context()
        self._kwok_count = 0
        self._image_tars: dict[str, Path] = {}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Install what is missing, record the host, then start every part; KubeClusterError on a failure."""
        t = time.monotonic()
        if tools_missing(self.bin_dir):
            if _install_failure is not None and self.bin_dir == default_bin_dir():
                raise _install_failure
            self.bin_dir = install()
            self.timings["install"] = round(time.monotonic() - t, 2)
        missing = tools_missing(self.bin_dir)
        if missing:
            raise KubeClusterError("install", "still missing after install-kubernetes.sh", ", ".join(missing))
        if self.with_node:
            taken = [b for b in (NODE_BRIDGE, CNI_BRIDGE) if _quiet(["ip", "link", "show", "dev", b]).returncode == 0]
            if taken:
                # the node IP and bridge names are fixed: another cluster runs, or a killed run left them behind
                raise KubeClusterError("kubelet", "node network", f"the links {taken} exist already (another test "
                                       f"cluster running, or left over: `ip link del` them)")
        self.host_state = HostState.record(self.work, EXTRA_HOST_PATHS)
        self.logs.mkdir(parents=True, exist_ok=True)
        names = ("etcd", "etcd-peer", "apiserver", "kcm", "scheduler", "kubelet", "kubelet-healthz", "kwok")
        self.ports = dict(zip(names, _free_ports(len(names)), strict=True))
        self.api_url = f"https://127.0.0.1:{self.ports['apiserver']}"
        self._timed("certs", self._certs)
        images: threading.Thread | None = None
        failure: list[BaseException] = []
        if self.with_node:
            self._timed("containerd", self._start_containerd)

            def load_images() -> None:
                try:
                    self._timed("images (build-images.sh)", self._build_images)
                    self._timed("images (ctr import)", self._import_images)
                except BaseException as e:  # re-raised in start()
                    failure.append(e)
            # the import (~15 s for the 300 MB kernel image) runs while the control plane starts
            images = threading.Thread(target=load_images, name="kube-images", daemon=True)
            images.start()
        try:
            self._timed("etcd", self._start_etcd)
            self._timed("apiserver", self._start_apiserver)
            self._timed("controllers", self._start_controllers)
            if self.with_kwok:
                self._timed("kwok", self._start_kwok)
        finally:
            if images is not None:
                t = time.monotonic()
                images.join()
                self.timings["images (waited for)"] = round(time.monotonic() - t, 2)
        if failure:
            raise failure[0]
        if self.with_node:
            self._timed("kubelet", self._start_kubelet)

    def _timed(self, name: str, step: Callable[[], None]) -> None:
        t = time.monotonic()
        step()
        self.timings[name] = round(time.monotonic() - t, 2)

    def _certs(self) -> None:
        self.pki.mkdir(parents=True)
        p = str(self.pki)

        def ssl_(*args: str) -> None:
            _run(["openssl", *args], "certs", f"openssl {args[0]}", cwd=p)

        ssl_("genrsa", "-out", "sa.key", "2048")
        ssl_("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")
        ssl_("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "7",
             "-subj", "/CN=egd-test-ca")
        ssl_("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "apiserver.key", "-out", "apiserver.csr",
             "-subj", "/CN=kube-apiserver")
        (self.pki / "apiserver.ext").write_text(
            "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
            "DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n")
        ssl_("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "7", "-extfile", "apiserver.ext", "-out", "apiserver.crt")
        self.token = os.urandom(16).hex()
        tokens = self.pki / "tokens.csv"
        tokens.write_text(f'{self.token},egd-admin,1,"system:masters"\n')
        tokens.chmod(0o600)
        self._ssl = ssl.create_default_context(cafile=self.ca_file)
        self._write_kubeconfig(Path(self.kubeconfig), "egd-admin", self.token, "default")

    def _write_kubeconfig(self, path: Path, user: str, token: str, namespace: str) -> None:
        q = json.dumps  # a JSON string is a YAML scalar: safe for "system:serviceaccount:ns:name"
        path.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: egd-test\n  cluster:\n    server: {q(self.api_url)}\n"
            f"    certificate-authority: {q(self.ca_file)}\n"
            f"users:\n- name: {q(user)}\n  user:\n    token: {q(token)}\n"
            "contexts:\n- name: egd-test\n"
            f"  context: {{cluster: egd-test, user: {q(user)}, namespace: {q(namespace)}}}\n"
            "current-context: egd-test\n")
        path.chmod(0o600)

    def _spawn(self, name: str, argv: list[str]) -> Daemon:
        log = self.logs / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=self.work, start_new_session=True)
        daemon = Daemon(name, proc, log)
        self.daemons[name] = daemon
        return daemon

    def _wait(self, part: str, step: str, check: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
        """Poll ``check`` until true; KubeClusterError with the part's log when it times out or the part died."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, ValueError, KeyError, ssl.SSLError, subprocess.SubprocessError):
                value = check()
                if value:
                    return value
            daemon = self.daemons.get(part)
            if daemon is not None and daemon.proc.poll() is not None:
                raise KubeClusterError(part, step, f"exited with {daemon.proc.returncode}", self.log_tail(part))
            if time.monotonic() > deadline:
                raise KubeClusterError(part, step, f"not done after {timeout:.0f} s", self.log_tail(part))
            time.sleep(interval)

    def _start_etcd(self) -> None:
        client = f"http://127.0.0.1:{self.ports['etcd']}"
        peer = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        self._spawn("etcd", [
            str(self.bin_dir / "etcd"), "--name", "egd", "--data-dir", str(self.work / "etcd"),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", f"egd={peer}",
            "--unsafe-no-fsync", "--quota-backend-bytes=1073741824", "--log-level=warn",
        ])

        def healthy() -> bool:
            with urllib.request.urlopen(f"{client}/health", timeout=2) as r:
                return bool(json.load(r).get("health") == "true")
        self._wait("etcd", "/health", healthy, 30)

    def _start_apiserver(self) -> None:
        self._spawn("apiserver", [
            str(self.bin_dir / "kube-apiserver"), f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={self.ports['apiserver']}",
            f"--tls-cert-file={self.pki}/apiserver.crt", f"--tls-private-key-file={self.pki}/apiserver.key",
            f"--client-ca-file={self.ca_file}",
            f"--token-auth-file={self.pki}/tokens.csv", "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={self.pki}/sa.pub",
            f"--service-account-signing-key-file={self.pki}/sa.key",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--allow-privileged=true",
            # logs and exec go to the kubelet's --node-ip, the only address it listens on
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            f"--cert-dir={self.pki}/apiserver-generated",
        ])
        self._wait("apiserver", "/readyz", lambda: self.request("GET", "/readyz", timeout=3)[0] == 200, 60)

    def _start_controllers(self) -> None:
        self._spawn("kcm", [
            str(self.bin_dir / "kube-controller-manager"), f"--kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={self.ports['kcm']}", "--leader-elect=false",
            f"--service-account-private-key-file={self.pki}/sa.key", f"--root-ca-file={self.ca_file}",
            f"--cert-dir={self.pki}/kcm", f"--flex-volume-plugin-dir={self.kubelet_dir}/volume-plugins",
        ])
        self._spawn("scheduler", [
            str(self.bin_dir / "kube-scheduler"), f"--kubeconfig={self.kubeconfig}", "--bind-address=127.0.0.1",
            f"--secure-port={self.ports['scheduler']}", "--leader-elect=false", f"--cert-dir={self.pki}/scheduler",
        ])
        # the controller-manager is working once it made the default ServiceAccount (pitfall 5)
        self._wait("kcm", "ServiceAccount default/default",
                   lambda: self.request("GET", "/api/v1/namespaces/default/serviceaccounts/default",
                                        timeout=3)[0] == 200, 60)
        insecure = ssl._create_unverified_context()  # the scheduler serves a self-signed certificate

        def scheduler_healthy() -> bool:
            url = f"https://127.0.0.1:{self.ports['scheduler']}/healthz"
            with urllib.request.urlopen(url, timeout=2, context=insecure) as r:
                return bool(r.status == 200)
        self._wait("scheduler", "/healthz", scheduler_healthy, 30)

    def _build_images(self) -> None:
        self._image_tars = image_tars(self.work / "images")

    def ctr(self, *args: str, timeout: float = 120) -> str:
        """``ctr --address <sock> -n k8s.io ARGS``: its stdout (KubeClusterError when it fails)."""
        return _run(["ctr", "--address", str(self.containerd_sock), "-n", "k8s.io", *args], "containerd",
                    f"ctr {args[0]} {args[1] if len(args) > 1 else ''}".strip(), timeout=timeout)

    def _start_containerd(self) -> None:
        c = self.containerd_dir
        cni = self.work / "cni"
        for d in (c / "root", c / "state", cni / "net.d", cni / "ipam"):
            d.mkdir(parents=True, exist_ok=True)
        (cni / "net.d" / "10-egd.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": "egd-pods", "plugins": [
                {"type": "bridge", "bridge": CNI_BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]],
                          "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(cni / "ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}}]}))
        (c / "config.toml").write_text(f"""version = 2
root = "{c}/root"
state = "{c}/state"
[grpc]
  address = "{self.containerd_sock}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{c}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # without CAP_SYS_RESOURCE runc cannot lower oom_score_adj (recipe pitfall 2)
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{c}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{cni}/net.d"
""")
        self._spawn("containerd", ["containerd", "--config", str(c / "config.toml")])
        self._wait("containerd", "ctr version", lambda: _quiet(
            ["ctr", "--address", str(self.containerd_sock), "version"], timeout=5).returncode == 0, 30)

    def _import_images(self) -> None:
        for kind, tar in self._image_tars.items():
            self.ctr("images", "import", str(tar), timeout=300)
            self.images[kind] = KERNEL_IMAGE if kind == "kernel" else PAUSE_IMAGE

    def _start_kubelet(self) -> None:
        if _quiet(["ip", "link", "show", "dev", NODE_BRIDGE]).returncode != 0:
            _run(["ip", "link", "add", NODE_BRIDGE, "type", "bridge"], "kubelet", "node bridge")
        _run(["ip", "addr", "replace", f"{NODE_IP}/32", "dev", NODE_BRIDGE], "kubelet", "node IP")
        _run(["ip", "link", "set", NODE_BRIDGE, "up"], "kubelet", "node bridge up")
        k = self.kubelet_dir
        k.mkdir(parents=True, exist_ok=True)
        config = self.work / "kubelet-config.yaml"
        config.write_text(f"""apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {NODE_IP}
port: {self.ports['kubelet']}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {self.ports['kubelet-healthz']}
authentication:
  anonymous: {{enabled: true}}
  webhook: {{enabled: false}}
authorization: {{mode: AlwaysAllow}}
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://{self.containerd_sock}
failSwapOn: false
podLogsDir: {k}/pod-logs
volumePluginDir: {k}/volume-plugins
resolvConf: /etc/resolv.conf
clusterDomain: cluster.local
evictionHard: {{memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
""")
        self._spawn("kubelet", [
            str(self.bin_dir / "kubelet"), f"--config={config}", f"--kubeconfig={self.kubeconfig}",
            f"--root-dir={k}", f"--cert-dir={k}/pki", f"--hostname-override={NODE_NAME}", f"--node-ip={NODE_IP}",
            "--node-labels=type=real",
        ])
        self._wait("kubelet", f"node {NODE_NAME} Ready", lambda: self._node_ready(NODE_NAME), 90)

    def _node_ready(self, name: str) -> bool:
        status, node = self.request("GET", f"/api/v1/nodes/{name}", timeout=3)
        if status != 200:
            return False
        return any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", []))

    def _start_kwok(self) -> None:
        self._spawn("kwok", [
            str(self.bin_dir / "kwok"), f"--kubeconfig={self.kubeconfig}",
            f"--config={self.bin_dir / 'kwok-stages.yaml'}", "--manage-all-nodes=false",
            "--manage-nodes-with-label-selector=type=kwok", f"--server-address=127.0.0.1:{self.ports['kwok']}",
        ])

        def healthy() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['kwok']}/healthz", timeout=2) as r:
                return bool(r.status == 200)
        self._wait("kwok", "/healthz", healthy, 30)

    def stop(self) -> None:
        """Delete the pods, kill the containers, stop the daemons (reverse order), restore the host; then
        KubeClusterError when the host still differs from the record."""
        problems: list[str] = []
        t = time.monotonic()

        def lap(name: str) -> None:
            nonlocal t
            self.stop_timings[name] = round(time.monotonic() - t, 2)
            t = time.monotonic()
        if "apiserver" in self.daemons and self.daemons["apiserver"].proc.poll() is None:
            with contextlib.suppress(OSError, ValueError, KeyError):
                self.delete_all_pods()
        lap("delete pods")
        if "containerd" in self.daemons and self.daemons["containerd"].proc.poll() is None:
            try:
                self.kill_pod_processes()
            except KubeClusterError as e:
                problems.append(str(e))
        lap("kill tasks")
        # the node agents and controllers first, together (nothing of theirs depends on the others any more)
        self._stop_daemons(("kwok", "kubelet", "scheduler", "kcm"), problems)
        lap("agents")
        self._stop_daemons(("apiserver",), problems)
        self._stop_daemons(("etcd",), problems)
        lap("apiserver, etcd")
        self._stop_shims()
        self._stop_daemons(("containerd",), problems)
        for pid in self._processes_in_work():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        lap("containerd")
        if self.host_state is not None:
            restore_own_footprint(self.host_state)
            self.host_differences = self.host_state.differences()
            ours = cluster_leftovers(self.host_state, self.work)
            if ours:
                problems.append("host state differs after restore: " + "; ".join(ours[:30]))
        lap("restore")
        shutil.rmtree(self.work, ignore_errors=True)
        lap("remove work dir")
        if problems:
            raise KubeClusterError("teardown", "stop", "\n".join(problems))

    def _stop_daemons(self, names: Iterable[str], problems: list[str], timeout: float = 20) -> None:
        """SIGTERM the daemons, wait for all of them, SIGKILL those still running after ``timeout``."""
        running = [d for d in (self.daemons.get(n) for n in names) if d is not None and d.proc.poll() is None]
        for daemon in running:
            with contextlib.suppress(ProcessLookupError):
                daemon.proc.terminate()
        deadline = time.monotonic() + timeout
        for daemon in running:
            try:
                daemon.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                problems.append(f"{daemon.name} did not stop within {timeout:.0f} s of SIGTERM")
                daemon.proc.kill()
                daemon.proc.wait(10)

    def _processes_in_work(self) -> list[int]:
        """Processes whose command line names the work directory (containerd shims, leftovers)."""
        me = os.getpid()
        return [int(e) for e in os.listdir("/proc")
                if e.isdigit() and int(e) != me and str(self.work) in cmdline(int(e))
                and not is_zombie_or_gone(int(e))]

    def _stop_shims(self) -> None:
        # shims outlive containerd (recipe pitfall 10); their tasks are dead by now
        for pid in self._processes_in_work():
            if "containerd-shim" in cmdline(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any("containerd-shim" in cmdline(p) for p in self._processes_in_work()):
            time.sleep(0.1)

    def delete_all_pods(self) -> None:
        """DELETE every pod in every namespace with grace period 0 (the kubelet still kills with the pod's own)."""
        status, body = self.request("GET", "/api/v1/namespaces", timeout=5)
        if status != 200:
            return
        for ns in body["items"]:
            self.request("DELETE", f"/api/v1/namespaces/{ns['metadata']['name']}/pods?gracePeriodSeconds=0",
                         timeout=10)

    def kill_pod_processes(self, timeout: float = 30) -> None:
        """SIGKILL every container task on the real node (kernels as PID 1 ignore SIGTERM: pitfall 6)."""
        def running() -> list[str]:
            out = _quiet(["ctr", "--address", str(self.containerd_sock), "-n", "k8s.io", "tasks", "ls"]).stdout
            return [line.split()[0] for line in out.splitlines()[1:] if line.split()[-1:] == ["RUNNING"]]
        deadline = time.monotonic() + timeout
        while ids := running():
            for task in ids:
                _quiet(["ctr", "--address", str(self.containerd_sock), "-n", "k8s.io", "tasks", "kill", "-s",
                        "SIGKILL", task])
            if time.monotonic() > deadline:
                raise KubeClusterError("containerd", "kill container tasks", f"still running: {ids}",
                                       self.log_tail("containerd"))
            time.sleep(0.3)

    def log_tail(self, daemon: str, n: int = 40) -> str:
        """The last ``n`` lines of a daemon's log (etcd, apiserver, kcm, scheduler, containerd, kubelet, kwok)."""
        try:
            return _tail((self.logs / f"{daemon}.log").read_text(errors="replace"), n)
        except OSError:
            return f"(no {daemon} log)"

    # ------------------------------------------------------------------ API (blocking; tests only)
    def request(self, method: str, path: str, body: Any = None, token: str | None = None,
                timeout: float = 15, content_type: str = "application/json") -> tuple[int, Any]:
        """``(status, parsed JSON body, or text when not JSON)`` of an API call as admin (or ``token``); HTTP
        errors are returned, not raised."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.api_url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {token or self.token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self._ssl) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode("utf-8", "replace")

    def pods(self, namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
        """The pods of a namespace (``selector``: a label selector such as ``app=x``)."""
        path = f"/api/v1/namespaces/{namespace}/pods"
        if selector:
            path += "?" + urllib.parse.urlencode({"labelSelector": selector})
        status, body = self.request("GET", path)
        if status != 200:
            raise KubeClusterError("apiserver", f"GET {path}", f"{status} {body}")
        return list(body["items"])

    def wait_pod_phase(self, namespace: str, name: str, phases: Iterable[str], timeout: float = 90) -> dict[str, Any]:
        """Poll the pod until its phase is one of ``phases``; the pod. AssertionError after ``timeout``."""
        wanted = set(phases)
        deadline = time.monotonic() + timeout
        pod: Any = None
        while True:
            status, pod = self.request("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")
            if status == 200 and pod.get("status", {}).get("phase") in wanted:
                return dict(pod)
            if time.monotonic() > deadline:
                raise AssertionError(f"pod {namespace}/{name} not in {sorted(wanted)} after {timeout} s: "
                                     f"{json.dumps(pod)[-1500:]}\n--- kubelet ---\n{self.log_tail('kubelet', 20)}")
            time.sleep(0.1)

    def create_namespace(self, name: str, timeout: float = 30) -> None:
        """Create a namespace (fine when it exists) and wait for its ``default`` ServiceAccount."""
        status, body = self.request("POST", "/api/v1/namespaces",
                                    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        if status not in (201, 409):
            raise KubeClusterError("apiserver", f"create namespace {name}", f"{status} {body}")
        self._wait("kcm", f"ServiceAccount {name}/default", lambda: self.request(
            "GET", f"/api/v1/namespaces/{name}/serviceaccounts/default", timeout=3)[0] == 200, timeout, 0.1)

    def service_account_token(self, namespace: str, name: str, seconds: int = 3600) -> str:
        """A token of the ServiceAccount (created when missing) from the TokenRequest API."""
        status, body = self.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts",
                                    {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}})
        if status not in (201, 409):
            raise KubeClusterError("apiserver", f"create ServiceAccount {namespace}/{name}", f"{status} {body}")
        status, body = self.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
                                    {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                     "spec": {"expirationSeconds": seconds}})
        if status != 201:
            raise KubeClusterError("apiserver", f"TokenRequest for {namespace}/{name}", f"{status} {body}")
        return str(body["status"]["token"])

    def service_account_kubeconfig(self, namespace: str, name: str) -> str:
        """Path of a kubeconfig that authenticates as the ServiceAccount (its namespace as the default one)."""
        token = self.service_account_token(namespace, name)
        path = self.work / f"kubeconfig-sa-{namespace}-{name}"
        self._write_kubeconfig(path, f"system:serviceaccount:{namespace}:{name}", token, namespace)
        return str(path)

    def add_kwok_nodes(self, n: int = 1, labels: dict[str, str] | None = None,
                       taints: list[dict[str, str]] | None = None, timeout: float = 30) -> list[str]:
        """Create ``n`` simulated nodes (``egd-kwok-<i>``, label type=kwok plus ``labels``); wait until kwok made
        them Ready; their names."""
        if "kwok" not in self.daemons:
            raise KubeClusterError("kwok", "add nodes", "the cluster was started without kwok")
        names = []
        for _ in range(n):
            name = f"egd-kwok-{self._kwok_count}"
            self._kwok_count += 1
            node = {"apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": name, "annotations": {"kwok.x-k8s.io/node": "fake"},
                                 "labels": {"type": "kwok", "kubernetes.io/hostname": name, **(labels or {})}},
                    "spec": {"taints": taints or []},
                    "status": {"allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110"},
                               "capacity": {"cpu": "32", "memory": "256Gi", "pods": "110"}}}
            status, body = self.request("POST", "/api/v1/nodes", node)
            if status != 201:
                raise KubeClusterError("kwok", f"create node {name}", f"{status} {body}")
            names.append(name)
        self._wait("kwok", f"nodes {names} Ready", lambda: all(self._node_ready(n) for n in names), timeout, 0.1)
        self.kwok_nodes += names
        return names

    def delete_kwok_nodes(self, names: Iterable[str] | None = None) -> None:
        """Delete simulated nodes (all of them by default)."""
        for name in list(names if names is not None else self.kwok_nodes):
            self.request("DELETE", f"/api/v1/nodes/{name}")
            with contextlib.suppress(ValueError):
                self.kwok_nodes.remove(name)


# ---------------------------------------------------------------------- fixture
# Registered both here and (re-exported) in conftest: share one cluster through a reference count.
_shared: KubeCluster | None = None
_users = 0


def start_cluster(node: bool = True, kwok: bool = True) -> KubeCluster:
    """A started KubeCluster; pytest.fail (naming part, step and log) when a part cannot start."""
    cluster = KubeCluster(_session_root(), node=node, kwok=kwok)
    try:
        cluster.start()
    except BaseException as e:
        with contextlib.suppress(KubeClusterError):
            cluster.stop()
        if isinstance(e, KubeClusterError):
            pytest.fail(f"Kubernetes test cluster: {e}", pytrace=False)
        raise
    return cluster


@pytest.fixture(scope="session")
def kube_cluster() -> Iterator[KubeCluster]:
    """One Kubernetes cluster (control plane, real node, kwok) for the whole session; skips when not root."""
    global _shared, _users
    if _shared is None:
        if sys.platform != "linux" or os.geteuid() != 0:
            pytest.skip("the Kubernetes test cluster needs root on Linux (containerd, kubelet, links, firewall)")
        _shared = start_cluster()
    _users += 1
    try:
        yield _shared
    finally:
        _users -= 1
        if _users == 0:
            cluster, _shared = _shared, None
            cluster.stop()
