"""What container engines and Kubernetes parts change on this machine, recorded before they start and restored after.

Container engines, netavark, CNI plugins and the kubelet change host settings outside their own directories
(recipe /work/shared/k8s-container-recipe.md, pitfall 9): sysctls (``net.ipv4.ip_forward``,
``vm.overcommit_memory``...), nftables/iptables tables and chains, network links (``docker0``, ``podman0``, bridges,
veths), network namespaces in ``/run/netns``, mounts, cgroup directories and paths such as ``/run/runc`` or
``/etc/docker/key.json``. A fixture records all of that with ``HostState.record(work_dir)`` *before* it starts any
daemon and calls ``state.restore()`` after it stopped them; ``state.differences()`` says what still differs (empty
when the machine is as it was)::

    state = HostState.record(work_dir)
    ...start daemons, run containers, stop daemons (workloads first)...
    state.restore()
    assert state.differences() == []

Restoring removes only what was *not* there at recording time (links, nft tables, netns files, mounts, cgroup
directories, listed paths) and writes back changed sysctls and the saved iptables/ip6tables rules. Session fixtures
finish in reverse order of their start, so a fixture that records later restores earlier and nested records do not
undo each other's parts. Only what the engines are known to create is removed (``OWNED_LINKS``, ``OWNED_CGROUPS``,
mounts below the work dir and in /run/netns), so a developer's engine running at the same time keeps its veths,
container mounts and cgroups; ``differences`` still reports them. Needs root. ``nft`` (package nftables) is
optional: without it nft tables are compared through iptables-save only, and a table created by iptables-nft stays
(empty) after restore.
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

#: Sysctls the kubelet, netavark, CNI plugins and dockerd change (recipe pitfall 9), plus related forwarding knobs.
SYSCTLS = (
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.forwarding",
    "net.ipv4.conf.default.forwarding",
    "net.ipv6.conf.all.forwarding",
    "net.ipv6.conf.default.forwarding",
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
)

#: Host paths the engines and Kubernetes parts write outside their work directories (recipe §5.1).
HOST_PATHS = (
    "/run/runc",
    "/run/crun",
    "/run/libpod",
    "/run/containers",
    "/run/containerd",
    "/run/netns",
    "/run/docker",
    "/run/docker.sock",
    "/etc/docker/key.json",
    "/etc/containers/networks",
    "/var/lib/containers",
    "/var/lib/docker",
    "/var/lib/cni",
    "/var/lib/kubelet",
    "/var/log/containers",
    "/var/log/pods",
    "/usr/libexec/kubernetes",
)

#: Links ``restore`` may delete when they are new (fnmatch patterns): the default bridges of the engines and the
#: recipe's Kubernetes parts; a fixture adds its own with ``record(owned_links=...)``. Other new links (a concurrent
#: fixture's or developer's engine's bridge and veths) are reported by ``differences`` only.
OWNED_LINKS = ("docker0", "podman0", "cni-podman0", "ci-node0", "cni-ci0")

#: Cgroup directory names ``restore`` removes (with everything below; rmdir, so empty ones only) when they are new:
#: the parents the kubelet (cgroupfs) and podman create (recipe §5.2 step 7); a fixture adds its own with
#: ``record(owned_cgroups=...)``. ``docker`` (dockerd's default parent) is not among them: the egd dockerd uses
#: ``--cgroup-parent /<its bridge>``, and a developer's dockerd keeps its containers there.
OWNED_CGROUPS = ("kubepods", "kubepods.slice", "libpod_parent", "machine.slice")

CGROUP_ROOT = "/sys/fs/cgroup"
NETNS_DIR = "/run/netns"


def _run(argv: list[str], check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output (never raising for a missing program unless ``check``)."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60)
    except FileNotFoundError:
        if check:
            raise
        return subprocess.CompletedProcess(argv, 127, "", f"{argv[0]}: not found")


def _sysctl(key: str) -> str | None:
    """The sysctl's value, or None when the key does not exist here (e.g. net.bridge.* before br_netfilter)."""
    path = Path("/proc/sys") / key.replace(".", "/")
    try:
        return " ".join(path.read_text().split())
    except OSError:
        return None


def _nft_tables() -> list[str] | None:
    """``nft list tables`` lines ("table ip filter"), or None when nft is not installed."""
    if shutil.which("nft") is None:
        return None
    out = _run(["nft", "list", "tables"])
    return sorted(line.strip() for line in out.stdout.splitlines() if line.strip())


def _save(program: str) -> str:
    """The output of iptables-save/ip6tables-save ("" when the program is missing)."""
    return _run([program]).stdout


def _normalise_rules(save: str) -> list[str]:
    """iptables-save output without its comment lines (dates) and packet counters, for comparisons."""
    lines = []
    for line in save.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        lines.append(re.sub(r"\s*\[\d+:\d+\]", "", line).rstrip())
    return lines


def _links() -> list[str]:
    """Names of the network links in this namespace."""
    out = _run(["ip", "-o", "link", "show"]).stdout
    names = []
    for line in out.splitlines():
        parts = line.split(": ", 2)
        if len(parts) >= 2:
            names.append(parts[1].split("@", 1)[0])
    return sorted(names)


def _netns() -> list[str]:
    """Files in /run/netns (named network namespaces)."""
    try:
        return sorted(os.listdir(NETNS_DIR))
    except OSError:
        return []


def _mounts() -> list[str]:
    """Mount targets, one entry per mount (a path mounted twice appears twice), in mount order."""
    try:
        with open("/proc/self/mountinfo") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    # field 5 is the mount point, with spaces and the like octal-escaped (\040)
    return [_unescape(line.split()[4]) for line in lines if len(line.split()) > 4]


def _unescape(path: str) -> str:
    """Undo /proc/self/mountinfo's octal escapes (``\\040`` is a space)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def _cgroups() -> list[str]:
    """Every directory under /sys/fs/cgroup (all hierarchies)."""
    found = []
    for root, dirs, _files in os.walk(CGROUP_ROOT):
        found.append(root)
        # do not descend through other mounts below a hierarchy (there are none in cgroupfs, but be cheap)
        dirs.sort()
    return sorted(found)


def _existing(paths: Iterable[str]) -> list[str]:
    """The paths among ``paths`` that exist now (dangling symlinks count)."""
    return sorted(p for p in paths if os.path.lexists(p))


@dataclasses.dataclass
class HostState:
    """A record of the host settings container engines and Kubernetes parts change (recipe §5.1).

    ``record`` takes it, ``restore`` puts the machine back (recipe §5.2 steps 3-8; stopping workloads and daemons,
    steps 1-2, is the caller's job and must come first), ``differences`` lists what differs from the record now.
    """

    work_dir: str
    sysctls: dict[str, str | None]
    nft_tables: list[str] | None
    iptables: str
    ip6tables: str
    links: list[str]
    netns: list[str]
    mounts: list[str]
    cgroups: list[str]
    paths: list[str]
    watched_paths: tuple[str, ...]
    owned_links: tuple[str, ...] = OWNED_LINKS
    owned_cgroups: tuple[str, ...] = OWNED_CGROUPS

    @classmethod
    def record(
        cls,
        work_dir: str | os.PathLike[str],
        extra_paths: Iterable[str] = (),
        extra_sysctls: Iterable[str] = (),
        *,
        owned_links: Iterable[str] = (),
        owned_cgroups: Iterable[str] = (),
        default_owned: bool = True,
    ) -> HostState:
        """Record the host's state now, before any daemon starts. ``work_dir`` is the fixture's scratch directory:
        ``restore`` unmounts everything below it. ``extra_paths``/``extra_sysctls``/``owned_links`` (fnmatch
        patterns of links to delete when new)/``owned_cgroups`` (cgroup directory names) add to OWNED_LINKS/
        OWNED_CGROUPS, or replace them with ``default_owned=False`` (a fixture that knows exactly what it creates,
        so that another fixture's kubelet or engine running meanwhile is neither touched nor reported by
        ``differences(owned_only=True)``)."""
        watched = tuple(dict.fromkeys([*HOST_PATHS, *extra_paths]))
        return cls(
            work_dir=os.path.abspath(os.fspath(work_dir)),
            sysctls={k: _sysctl(k) for k in dict.fromkeys([*SYSCTLS, *extra_sysctls])},
            nft_tables=_nft_tables(),
            iptables=_save("iptables-save"),
            ip6tables=_save("ip6tables-save"),
            links=_links(),
            netns=_netns(),
            mounts=_mounts(),
            cgroups=_cgroups(),
            paths=_existing(watched),
            watched_paths=watched,
            owned_links=tuple(dict.fromkeys([*(OWNED_LINKS if default_owned else ()), *owned_links])),
            owned_cgroups=tuple(dict.fromkeys([*(OWNED_CGROUPS if default_owned else ()), *owned_cgroups])),
        )

    def restore(self) -> list[str]:
        """Put back what differs from the record: delete new links, nft tables, netns files, mounts, cgroup
        directories and listed paths; write back sysctls and iptables/ip6tables rules. Best effort: every step
        runs even if an earlier one failed. Returns what it could not restore (empty when all went well)."""
        problems: list[str] = []
        self._restore_links(problems)
        self._restore_firewall(problems)
        self._restore_sysctls(problems)
        self._restore_mounts(problems)
        self._restore_cgroups(problems)
        self._restore_paths(problems)
        return problems

    def differences(self, owned_only: bool = False) -> list[str]:
        """What differs from the record now, one line per difference (empty when the host is as recorded).

        ``owned_only``: leave out links, mounts and cgroup directories ``restore`` would not touch (a developer's
        engine or another fixture running at the same time: their veths, container mounts, cgroups)."""
        now = HostState.record(self.work_dir, self.watched_paths, self.sysctls)
        if owned_only:
            now.links = [x for x in now.links if x in self.links or self._owned_link(x)]
            now.mounts = [x for x in now.mounts if x in self.mounts or self._owned_mount(x)]
            now.cgroups = [x for x in now.cgroups if x in self.cgroups or self._owned_cgroup(x)]
            before_links = [x for x in self.links if x in now.links or self._owned_link(x)]
            before_mounts = [x for x in self.mounts if x in now.mounts or self._owned_mount(x)]
            before_cgroups = [x for x in self.cgroups if x in now.cgroups or self._owned_cgroup(x)]
        else:
            before_links, before_mounts, before_cgroups = self.links, self.mounts, self.cgroups
        diffs: list[str] = []
        for key, before in self.sysctls.items():
            if now.sysctls.get(key) != before:
                diffs.append(f"sysctl {key}: {before} -> {now.sysctls.get(key)}")
        if self.nft_tables is not None and now.nft_tables is not None:
            diffs += _set_diff("nft table", self.nft_tables, now.nft_tables)
        for name, before_rules, now_rules in (
            ("iptables", self.iptables, now.iptables),
            ("ip6tables", self.ip6tables, now.ip6tables),
        ):
            a, b = _normalise_rules(before_rules), _normalise_rules(now_rules)
            if a != b:
                added = [line for line in b if line not in a]
                removed = [line for line in a if line not in b]
                diffs.append(f"{name}: added {added[:10]} removed {removed[:10]}")
        diffs += _set_diff("link", before_links, now.links)
        diffs += _set_diff("netns", self.netns, now.netns)
        diffs += _counter_diff("mount", before_mounts, now.mounts)
        diffs += _set_diff("cgroup", before_cgroups, now.cgroups)
        diffs += _set_diff("path", self.paths, now.paths)
        return diffs

    # --- restore steps (recipe §5.2 3-8) ------------------------------------------------------------------------

    def _restore_links(self, problems: list[str]) -> None:
        """Step 3: delete owned links that were not there (a veth's peer goes with it: a vanished name is fine)."""
        for link in _links():
            if link in self.links or not self._owned_link(link):
                continue
            result = _run(["ip", "link", "del", link])
            if result.returncode != 0 and link in _links():
                problems.append(f"link {link}: ip link del failed: {result.stderr.strip()}")

    def _restore_firewall(self, problems: list[str]) -> None:
        """Step 4: delete nft tables that did not exist, then restore the saved iptables/ip6tables rules."""
        if self.nft_tables is not None:
            for table in _nft_tables() or []:
                if table in self.nft_tables:
                    continue
                words = table.split()  # "table <family> <name>"
                result = _run(["nft", "delete", *words])
                if result.returncode != 0:
                    problems.append(f"nft {table}: delete failed: {result.stderr.strip()}")
        for program, save in (("iptables", self.iptables), ("ip6tables", self.ip6tables)):
            if _normalise_rules(_save(f"{program}-save")) == _normalise_rules(save):
                continue
            if save.strip():
                result = subprocess.run([f"{program}-restore"], input=save, capture_output=True, text=True, timeout=60)
                if result.returncode != 0:
                    problems.append(f"{program}-restore failed: {result.stderr.strip()}")
            elif self.nft_tables is None:
                # nothing was there and nft cannot drop tables: at least empty the ones that appeared
                for table in re.findall(r"^\*(\w+)", _save(f"{program}-save"), re.M):
                    _run([program, "-t", table, "-F"])
                    _run([program, "-t", table, "-X"])

    def _restore_sysctls(self, problems: list[str]) -> None:
        """Step 5: write back every recorded sysctl that changed."""
        for key, value in self.sysctls.items():
            if value is None or _sysctl(key) == value:
                continue
            path = Path("/proc/sys") / key.replace(".", "/")
            try:
                path.write_text(value + "\n")
            except OSError as exc:
                problems.append(f"sysctl {key}={value}: {exc}")

    def _restore_mounts(self, problems: list[str]) -> None:
        """Step 6: unmount mounts that were not there below the work dir and in /run/netns (and /run/netns itself),
        deepest first, then remove netns files that were not there."""
        for _attempt in range(3):
            extra = [m for m in _extra_mounts(self.mounts, _mounts()) if self._owned_mount(m)]
            if not extra:
                break
            for target in sorted(extra, key=lambda p: (p.count("/"), p), reverse=True):
                if _run(["umount", target]).returncode != 0:
                    _run(["umount", "-l", target])
        for target in [m for m in _extra_mounts(self.mounts, _mounts()) if self._owned_mount(m)]:
            problems.append(f"mount {target}: still mounted")
        for name in _netns():
            if name in self.netns:
                continue
            try:
                os.unlink(os.path.join(NETNS_DIR, name))
            except OSError as exc:
                problems.append(f"netns {name}: {exc}")

    def _owned_link(self, name: str) -> bool:
        """Whether the link's name matches an owned pattern (restore deletes it when new)."""
        return any(fnmatch.fnmatchcase(name, p) for p in self.owned_links)

    def _owned_cgroup(self, path: str) -> bool:
        """Whether the cgroup directory is at or below an owned name (restore removes it when new)."""
        parts = path[len(CGROUP_ROOT) :].split("/")
        # cgroup v1/hybrid: /sys/fs/cgroup/<hierarchy>/...; pure v2: the hierarchy is /sys/fs/cgroup itself
        first = 1 if os.path.exists(os.path.join(CGROUP_ROOT, "cgroup.controllers")) else 2
        return any(fnmatch.fnmatchcase(part, p) for part in parts[first:] for p in self.owned_cgroups)

    def _owned_mount(self, target: str) -> bool:
        """Whether ``restore`` may unmount this (new) mount: below the work dir, or /run/netns and its files."""
        return (
            target.startswith(self.work_dir.rstrip("/") + "/")
            or target == NETNS_DIR
            or target.startswith(NETNS_DIR + "/")
        )

    def _restore_cgroups(self, problems: list[str]) -> None:
        """Step 7: remove new cgroup directories at or below an owned name (rmdir, so only empty ones, deepest
        first)."""
        before = set(self.cgroups)
        new = [path for path in set(_cgroups()) - before if self._owned_cgroup(path)]
        for path in sorted(new, key=lambda p: p.count("/"), reverse=True):
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if not _cgroup_busy(path):  # a live cgroup is someone else's (differences() still lists it)
                    problems.append(f"cgroup {path}: {exc}")

    def _restore_paths(self, problems: list[str]) -> None:
        """Step 8: remove listed host paths that did not exist."""
        for path in _existing(self.watched_paths):
            if path in self.paths:
                continue
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            except OSError as exc:
                problems.append(f"path {path}: {exc}")


def _cgroup_busy(path: str) -> bool:
    """Whether processes are in the cgroup or a child of it."""
    for root, _dirs, files in os.walk(path):
        if "cgroup.procs" in files:
            try:
                if Path(root, "cgroup.procs").read_text().strip():
                    return True
            except OSError:
                return True
    return False


def _extra_mounts(before: list[str], now: list[str]) -> list[str]:
    """Mount targets mounted more often now than in the record (one entry per extra mount)."""
    extra = collections.Counter(now) - collections.Counter(before)
    return [target for target, count in extra.items() for _ in range(count)]


def _set_diff(kind: str, before: list[str], now: list[str]) -> list[str]:
    """Lines "new <kind> X" / "gone <kind> X" for two lists taken as sets."""
    a, b = set(before), set(now)
    return [f"new {kind} {x}" for x in sorted(b - a)] + [f"gone {kind} {x}" for x in sorted(a - b)]


def _counter_diff(kind: str, before: list[str], now: list[str]) -> list[str]:
    """Like _set_diff, but counting repeated entries (a path mounted twice)."""
    a, b = collections.Counter(before), collections.Counter(now)
    return [f"new {kind} {x}" for x in sorted((b - a).elements())] + [
        f"gone {kind} {x}" for x in sorted((a - b).elements())
    ]
