#!/usr/bin/env python3
"""egcompatbench -- Enterprise Gateway's own kernelspecs started by egd and by EG 3.3, in one run.

One command, run as root from the repository root::

    python bench/egcompatbench.py --json out.json

measures the time from ``POST /api/kernels`` to the first ``kernel_info_reply`` on the kernel's WebSocket (then
``DELETE``, timed too) for two kernelspecs, each started by both gateways in the same run:

``python_distributed``
    EG's own kernelspec (from EG's PyPI sdist, assembled as EG's Makefile does: ``tests/egdist.py``), whose argv is
    EG's ``launch_ipykernel.py`` speaking EG's launcher protocol. On egd: the ``ssh`` driver (DistributedProcessProxy
    maps to it). On EG: ``DistributedProcessProxy`` over paramiko. Both on the same ssh hosts: the lab of
    ``tests/sshhosts.py`` (network namespaces egdh1/egdh2, each with its own sshd; the gateways on 10.200.0.1).
``ir``
    IRkernel's kernelspec (Debian's r-cran-irkernel, ``R ... IRkernel::main()``), a local kernel on both gateways
    (egd's ``local`` driver, EG's ``LocalProcessProxy``): EG has no R kernelspec for plain ssh hosts.

The two gateways read the same kernelspec files. The one edit: ``python_distributed``'s argv starts with ``python``,
which the lab's hosts do not have on sshd's PATH; argv[0] names the kernel interpreter instead (``--kernel-python``,
default the EG venv's python: ipykernel 6 and pycryptodomex, so both gateways start the same kernel).

EG is the venv ``egdbench.py`` installs (``~/.cache/egd-bench/eg-venv``); it gets its own HOME whose ``~/.ssh``
holds the lab key and ``known_hosts`` (paramiko, ``RejectPolicy``), ``EG_REMOTE_HOSTS`` = the host IPs,
``EG_REMOTE_USER=root``, ``EG_RESPONSE_IP`` = the bridge address. If EG (or one of its kernelspecs) cannot run here,
the report says why and still gives egd's figures.

Hosts of your own instead of the lab: ``--hosts h1,h2 --gateway-ip IP --shared-dir DIR`` (``--ssh-user``,
``--ssh-config``): DIR must be the same path on this machine and on every host (the kernelspecs, egd's launcher and
the logs go there), the kernel interpreter must exist at the same path on the hosts, and EG's paramiko uses your
``~/.ssh`` (key, ``known_hosts``).

Repetitions (``--reps``, default 3) interleave the gateways in a rotating order and alternate the kernelspecs'
order; the table shows medians over repetitions and the egd/EG ratio of each. Everything started is stopped at
the end (gateways, kernels, the lab), also on error or Ctrl-C.

Exit status: 0 every figure measured, 1 some could not be (the report says why), 2 the benchmark failed,
130 interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
for _p in (str(BENCH_DIR), str(REPO_DIR)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import egdbench as eb  # noqa: E402  (bench/ is not a package)
import remotebench as rb  # noqa: E402

from tests import egdist  # noqa: E402
from tests.sshhosts import SSHD, LabError, SshLab, install, unavailable_reason  # noqa: E402

SPECS = ("python_distributed", "ir")
GATEWAYS = ("egd", "eg")
ERRORS = rb.ERRORS
#: What the kernel interpreter of python_distributed needs: EG's launcher imports these.
KERNEL_IMPORTS = "import ipykernel, jupyter_client, Cryptodome; print(ipykernel.__version__)"


def log(text: str) -> None:
    """Progress line on stderr."""
    print(f"[egcompatbench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class CompatGateway(eb.GatewayTarget):
    """A gateway offering both kernelspecs; remembers every kernel id it started (for the file check)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started_ids: list[str] = []
        self.offered: list[str] = []

    def _delete(self, kid: str, conn: eb.WSConn | None) -> None:
        # Every kernel started is deleted once (after its start, after a failed start, or at stop).
        self.started_ids.append(kid)
        super()._delete(kid, conn)

    def launch(self, timeout: float) -> None:
        """Start the gateway, then note which of SPECS it offers."""
        super().launch(timeout)
        specs = eb.http_request(self.port, "GET", "/api/kernelspecs")[1] or {}
        self.offered = sorted(specs.get("kernelspecs") or {})
        self.info["argv"] = {n: specs["kernelspecs"][n].get("spec", {}).get("argv")
                             for n in SPECS if n in self.offered}


# ---------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------

@dataclass
class Hosts:
    """The ssh hosts both gateways start python_distributed on: the lab's, or ``--hosts``."""

    egd_names: list[str]  # what egd's ssh connects to (the lab: Host aliases of its ssh_config)
    eg_names: list[str]  # EG_REMOTE_HOSTS (EG resolves them with gethostbyname; the root netns has no egdhN)
    gateway_ip: str  # where the hosts reach both gateways: egd's callback_host, EG's EG_RESPONSE_IP
    user: str
    ssh_config: str | None
    lab: SshLab | None = None

    @classmethod
    def of_lab(cls, lab: SshLab) -> Hosts:
        """The hosts of a started lab."""
        return cls([h.name for h in lab.hosts], [h.ip for h in lab.hosts], lab.gateway_ip, lab.user,
                   str(lab.ssh_config_path), lab)

    @classmethod
    def of_args(cls, args: argparse.Namespace) -> Hosts:
        """``--hosts``: the same names for both gateways."""
        names = [h.strip() for h in args.hosts.split(",") if h.strip()]
        return cls(names, names, args.gateway_ip, args.ssh_user, args.ssh_config)


def kernel_python_versions(python: str) -> str:
    """ipykernel's version in `python`'s environment; BenchError if EG's launcher could not run there."""
    done = subprocess.run([python, "-c", KERNEL_IMPORTS], capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise eb.BenchError(f"{python} cannot run EG's launch_ipykernel.py (needs ipykernel, jupyter_client, "
                            f"pycryptodomex): {done.stderr.strip()[-300:]}")
    return done.stdout.strip()


def find_ir_spec(override: Path | None) -> Path:
    """The IRkernel kernelspec directory (``--ir-spec``, else the one jupyter finds as ``ir``)."""
    if override is not None:
        if not (override / "kernel.json").is_file():
            raise eb.BenchError(f"--ir-spec {override}: no kernel.json there")
        return override
    from jupyter_client.kernelspec import KernelSpecManager

    found = KernelSpecManager().find_kernel_specs().get("ir")
    if not found:
        raise eb.BenchError("no `ir` kernelspec (IRkernel: apt-get install r-cran-irkernel, or "
                            "tests/services/install-kernels.sh)")
    argv0 = json.loads((Path(found) / "kernel.json").read_text())["argv"][0]
    if shutil.which(argv0) is None:
        raise eb.BenchError(f"the `ir` kernelspec in {found} runs {argv0!r}, which is not on the PATH")
    return Path(found)


def build_kernelspecs(dest: Path, kernel_python: str | None, ir_spec: Path | None) -> dict[str, str]:
    """The kernelspecs both gateways read, in ``dest`` (a JUPYTER_PATH entry's ``kernels``); {spec: why not}."""
    problems: dict[str, str] = {}
    try:
        if kernel_python is None:
            raise eb.BenchError("no kernel interpreter for python_distributed (the EG venv is missing; "
                                "--kernel-python)")
        kernel_python_versions(kernel_python)
        egdist.assemble(dest, ["python_distributed"])
        path = dest / "python_distributed" / "kernel.json"
        spec = json.loads(path.read_text())
        if spec["argv"][0] == "python":  # the hosts have no `python` on sshd's PATH
            spec["argv"][0] = kernel_python
        path.write_text(json.dumps(spec, indent=1))
    except (eb.BenchError, OSError, subprocess.SubprocessError, KeyError, ValueError) as e:
        problems["python_distributed"] = str(e)
    except BaseException as e:  # egdist skips the way pytest does when PyPI cannot be reached
        if type(e).__name__ != "Skipped":
            raise
        problems["python_distributed"] = f"EG's sdist: {e}"
    try:
        shutil.copytree(find_ir_spec(ir_spec), dest / "ir", dirs_exist_ok=True)
    except (eb.BenchError, OSError, ValueError, KeyError) as e:
        problems["ir"] = str(e)
    return problems


def launch_timeout(args: argparse.Namespace) -> int:
    """The gateways' launch timeout: shorter than the client's wait for the POST."""
    return max(5, int(args.timeout) - 10)


def egd_target(args: argparse.Namespace, hosts: Hosts, workdir: Path, specs: Path, env: dict) -> CompatGateway:
    """egd: ssh driver over the hosts for EG's Distributed spec, local driver for ir."""
    (workdir / "egd-host-logs").mkdir()
    ssh: dict[str, Any] = {"hosts": hosts.egd_names, "callback_host": hosts.gateway_ip,
                           "log_dir": str(workdir / "egd-host-logs")}
    if hosts.ssh_config:
        ssh["ssh_config"] = hosts.ssh_config
    if hosts.lab is None:  # hosts of their own: egd's launcher from the shared directory, the login asked for
        shutil.copytree(REPO_DIR / "launchers", workdir / "launchers",
                        ignore=shutil.ignore_patterns("__pycache__"))
        ssh.update(user=hosts.user, launcher_path=str(workdir / "launchers" / "kernel_launcher.py"))
    config = {  # JSON is YAML
        # A launch that fails fails inside the client's wait, with the gateway's reason, not as a client timeout.
        "kernels": {"kernelspec_dirs": [str(specs)], "launch_timeout": launch_timeout(args)},
        "drivers": {"local": {}, "ssh": ssh},
    }
    cfg = workdir / "egd.yaml"
    cfg.write_text(json.dumps(config, indent=1))
    port = eb.free_port()
    cmd = [*eb.egd_command(args.egd_cmd, port), "--config", str(cfg)]
    t = CompatGateway("egd", f"egd: ssh driver ({', '.join(hosts.egd_names)}, callback {hosts.gateway_ip}) for "
                      "python_distributed, local driver for ir", cmd, port, env, workdir / "egd.log", SPECS[0])
    t.info["config"] = config
    return t


def eg_target(args: argparse.Namespace, hosts: Hosts, workdir: Path, env: dict, eg_versions: dict) -> CompatGateway:
    """EG 3.x: DistributedProcessProxy over paramiko for python_distributed, LocalProcessProxy for ir."""
    env = dict(env)
    if hosts.lab is not None:  # paramiko reads ~/.ssh: a HOME of EG's own with the lab's key and host keys
        ssh_dir = workdir / "eg-home" / ".ssh"
        ssh_dir.mkdir(parents=True, mode=0o700)
        shutil.copyfile(hosts.lab.key_path, ssh_dir / "id_ed25519")
        (ssh_dir / "id_ed25519").chmod(0o600)
        shutil.copyfile(hosts.lab.known_hosts_path, ssh_dir / "known_hosts")  # "egdh1,10.200.0.11 ssh-ed25519"
        env["HOME"] = str(ssh_dir.parent)
        for k in ("SSH_AUTH_SOCK", "SSH_AGENT_PID"):  # only the key in HOME
            env.pop(k, None)
    (workdir / "eg-kernel-logs").mkdir()
    env.update(JUPYTER_PATH=str(workdir / "jupyter"), EG_REMOTE_HOSTS=",".join(hosts.eg_names),
               EG_REMOTE_USER=hosts.user, EG_RESPONSE_IP=hosts.gateway_ip,
               EG_RESPONSE_PORT=str(rb.free_port(hosts.gateway_ip)),
               EG_KERNEL_LOG_DIR=str(workdir / "eg-kernel-logs"),
               EG_KERNEL_LAUNCH_TIMEOUT=str(launch_timeout(args)))
    env.pop("VIRTUAL_ENV", None)
    port = eb.free_port()
    cmd = [str(args.eg_venv / "bin" / "jupyter"), "enterprisegateway", f"--ip={eb.LOCALHOST}", f"--port={port}",
           "--port_retries=0", "--EnterpriseGatewayApp.list_kernels=True"]
    desc = (f"EG {eg_versions.get('jupyter_enterprise_gateway')}: DistributedProcessProxy (paramiko, "
            f"EG_REMOTE_HOSTS={env['EG_REMOTE_HOSTS']}, EG_RESPONSE_IP={hosts.gateway_ip}) for python_distributed, "
            "LocalProcessProxy for ir")
    return CompatGateway("eg", desc, cmd, port, env, workdir / "eg.log", SPECS[0])


# ---------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------

def start_section(t: CompatGateway, spec: str, args: argparse.Namespace) -> dict:
    """`--n-start` sequential starts of `spec` on `t` (POST -> WS -> kernel_info_reply), each deleted."""
    default, t.kernel_name = t.kernel_name, spec
    try:
        return rb.measured(t, functools.partial(eb.sec_start, t, args))
    finally:
        t.kernel_name = default


def run_benchmark(args: argparse.Namespace, workdir: Path, lab: SshLab, doc: dict) -> None:
    """Set up, then every repetition; fills doc as it goes."""
    eg_versions: dict | None = None
    if not args.skip_eg:
        try:
            eg_versions = eb.ensure_eg_venv(args.eg_venv)
            if eg_versions.get("jupyter_enterprise_gateway") != egdist.EG_VERSION:
                log(f"note: the EG venv has EG {eg_versions.get('jupyter_enterprise_gateway')}, "
                    f"not {egdist.EG_VERSION}")
        except (eb.BenchError, OSError, subprocess.SubprocessError) as e:
            log(f"EG: NOT AVAILABLE: {e}")
            doc["targets"]["eg"] = {"description": "EG", "error": f"EG venv: {e}"}
    doc["env"] = eb.environment(eg_versions)
    eg_python = args.eg_venv / "bin" / "python"
    kernel_python = args.kernel_python or (str(eg_python) if eg_python.exists() else None)
    specs = workdir / "jupyter" / "kernels"
    doc["spec_problems"] = build_kernelspecs(specs, kernel_python, args.ir_spec)
    doc["kernels"] = {"python_distributed": {"python": kernel_python},
                      "ir": {"argv": json.loads((specs / "ir" / "kernel.json").read_text())["argv"]
                             if (specs / "ir" / "kernel.json").is_file() else None}}
    if kernel_python and "python_distributed" not in doc["spec_problems"]:
        doc["kernels"]["python_distributed"]["ipykernel"] = kernel_python_versions(kernel_python)
    for spec, why in doc["spec_problems"].items():
        log(f"{spec}: NOT AVAILABLE on either gateway: {why}")
    if args.hosts:
        hosts = Hosts.of_args(args)
    else:
        if unavailable_reason():
            raise eb.BenchError(f"no ssh lab here: {unavailable_reason()} (or give --hosts)")
        if not os.access(SSHD, os.X_OK) or shutil.which("ssh-keygen") is None:
            log("installing sshd (tests/services/install-ssh.sh)")
            install()
        log("building the ssh lab (2 hosts)")
        lab.start()
        hosts = Hosts.of_lab(lab)
        doc["lab"] = {"hosts": {h.name: h.ip for h in lab.hosts}, "gateway_ip": lab.gateway_ip}
    doc["hosts"] = {"egd": hosts.egd_names, "eg": hosts.eg_names, "gateway_ip": hosts.gateway_ip,
                    "user": hosts.user}
    runtime = workdir / "runtime"
    runtime.mkdir()
    base_env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(runtime), PYTHONUNBUFFERED="1")
    targets: list[CompatGateway] = doc["_targets"]
    builders: list[tuple[str, Callable[[], CompatGateway]]] = [
        ("egd", lambda: egd_target(args, hosts, workdir, specs, base_env))]
    if eg_versions is not None:
        builders.append(("eg", lambda: eg_target(args, hosts, workdir, base_env, eg_versions or {})))
    available = [s for s in SPECS if s not in doc["spec_problems"]]
    if not available:
        raise eb.BenchError(f"no kernelspec to measure: {doc['spec_problems']}")
    for name, build in builders:
        try:
            t = build()
            t.kernel_name = available[0]  # launch() checks that the gateway offers it
        except (eb.BenchError, OSError) as e:
            doc["targets"][name] = {"description": name, "error": str(e)}
            log(f"{name}: NOT AVAILABLE: {e}")
            continue
        targets.append(t)  # registered for cleanup before it runs
        doc["targets"][name] = {"description": t.description, "error": None}
        try:
            t.launch(args.timeout)
            log(f"{name}: up on port {t.port}, pid {t.pid}; argv {json.dumps(t.info.get('argv'))}")
        except (eb.BenchError, OSError) as e:
            t.error = str(e)
            doc["targets"][name]["error"] = t.error
            log(f"{name}: NOT AVAILABLE: {e}")
    # A (gateway, spec) that failed is not tried again in later repetitions: its error is the finding.
    broken: dict[tuple[str, str], str] = {}
    for rep in range(1, args.reps + 1):
        shift = (rep - 1) % max(1, len(targets))
        order = targets[shift:] + targets[:shift]
        spec_order = [s for s in (SPECS if rep % 2 else SPECS[::-1]) if s not in doc["spec_problems"]]
        res: dict[str, Any] = {g: {} for g in GATEWAYS}
        res.update(rep=rep, order=[t.name for t in order], spec_order=spec_order, loadavg_before=os.getloadavg())
        doc["runs"].append(res)
        for spec in spec_order:
            for t in order:
                if t.error or (t.name, spec) in broken:
                    continue
                if spec not in t.offered:
                    broken[(t.name, spec)] = f"{t.name} does not offer {spec} (it offers {t.offered})"
                    res[t.name][spec] = {"error": broken[(t.name, spec)]}
                    continue
                log(f"rep {rep}: {spec:<18} {t.name}")
                try:
                    res[t.name][spec] = start_section(t, spec, args)
                except ERRORS as e:
                    broken[(t.name, spec)] = f"rep {rep}: {type(e).__name__}: {e}"
                    res[t.name][spec] = {"error": broken[(t.name, spec)]}
                    log(f"rep {rep}: {spec} {t.name} FAILED: {type(e).__name__}: {e}")
                    if not t.alive():
                        t.error = f"gateway died (exit {t.proc.returncode if t.proc else '?'}); log tail:\n" \
                                  f"{t.log_tail()}"
                        doc["targets"][t.name]["error"] = t.error
                    else:
                        log(f"{t.name} log tail:\n{t.log_tail(25)}")
                finally:
                    t.track()
        res["loadavg_after"] = os.getloadavg()
    doc["broken"] = {f"{g}/{s}": why for (g, s), why in broken.items()}


# ---------------------------------------------------------------------------
# cleanup, summary, report
# ---------------------------------------------------------------------------

def connection_files(ids: list[str]) -> list[Path]:
    """The connection files EG's launcher wrote for these kernels (``/tmp/kernel-<id>_*.json``; the lab's hosts
    share this machine's /tmp). It removes one only after ipykernel's start() returns, which a shutdown_request does
    not bring about (the file was still there 20 s after the shutdown_reply): both gateways leave them."""
    tmp = Path(tempfile.gettempdir())
    return sorted(f for kid in set(ids) for f in tmp.glob(f"kernel-{kid}_*.json"))


def cleanup(doc: dict, lab: SshLab) -> dict:
    """Stop the gateways, check hosts and local processes, remove EG's connection files, tear the lab down."""
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a 2nd Ctrl-C must not stop this
    report: dict[str, Any] = {}
    try:
        for t in doc.get("_targets", []):
            try:
                t.stop()
            except ERRORS as e:
                log(f"{t.name}: stop failed: {e}")
        if doc.get("lab"):
            try:
                report["left_on_hosts_after_gateways_stopped"] = rb.host_leftovers(lab)
            except (OSError, subprocess.SubprocessError, LabError) as e:
                report["left_on_hosts_error"] = str(e)
        for pid in rb.pids_mentioning(doc["workdir"]):  # e.g. a ControlPersist ssh master egd left
            eb.TRACKER.add(pid, f"mentions the work dir: {eb.proc_cmdline(pid)[:100]}")
            eb.kill_group_or_pid(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        left = eb.TRACKER.alive()
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = eb.TRACKER.alive()
        report.update(tracked=len(eb.TRACKER.procs), left_after_stop=[f"{pid} {label}" for pid, label in left])
        for pid, _ in left:
            eb.kill_group_or_pid(pid, signal.SIGKILL)
        time.sleep(0.5 if left else 0)
        report["left_after_kill"] = [f"{pid} {label}" for pid, label in eb.TRACKER.alive()]
        # Count the connection files EG's launchers left per gateway, then remove them. Only the lab's hosts share
        # this machine's /tmp.
        files = {}
        for t in doc.get("_targets", []) if doc.get("lab") else []:
            found = connection_files(t.started_ids)
            files[t.name] = {"kernels": len(set(t.started_ids)), "connection_files_left": len(found)}
            for f in found:
                f.unlink(missing_ok=True)
        report["eg_launcher_files"] = files
        try:
            lab.close()  # a no-op when it was not started (--hosts)
            report["lab_closed"] = True
        except LabError as e:
            report["lab_closed"] = False
            report["lab_close_error"] = str(e)
            log(f"lab teardown: {e}")
        log(f"cleanup: {report['tracked']} local processes tracked, {len(left)} needed SIGKILL; "
            f"left on hosts: {report.get('left_on_hosts_after_gateways_stopped')}; lab closed: "
            f"{report['lab_closed']}")
        return report
    finally:
        signal.signal(signal.SIGINT, old)


# (label, key path in one start result, unit)
METRICS = [
    ("POST -> kernel_info_reply (median)", "total.median_ms", "ms"),
    ("POST -> kernel_info_reply (p95)", "total.p95_ms", "ms"),
    ("  POST /api/kernels", "post.median_ms", "ms"),
    ("  WS connect", "ws_connect.median_ms", "ms"),
    ("  kernel_info", "kernel_info.median_ms", "ms"),
    ("DELETE (median)", "delete.median_ms", "ms"),
    ("gateway CPU per start", "cpu.gateway_cpu_s", "s"),
]


def summarize_runs(runs: list[dict], n_start: int) -> dict[str, dict[str, dict[str, float]]]:
    """{spec: {gateway: {metric path: median over repetitions}}}; CPU per start."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for spec in SPECS:
        for g in GATEWAYS:
            cell: dict[str, float] = {}
            for _, path, _ in METRICS:
                vals = [eb.dig(r.get(g, {}).get(spec), path) for r in runs]
                vals = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
                if vals:
                    cell[path] = statistics.median(vals) / (n_start if path.startswith("cpu.") else 1)
            out.setdefault(spec, {})[g] = cell
    return out


def print_report(doc: dict, summary: dict, out: Any = sys.stdout) -> None:
    """Environment, one table per kernelspec with egd, EG and egd/EG."""
    env, p = doc.get("env", {}), doc["params"]
    load = (env.get("loadavg_start") or (0, 0, 0))[0]
    if load > 0.5 * (env.get("cpus") or 1):
        print(f"\nWARNING load average {load:.2f} at start on {env.get('cpus')} CPUs: the figures are noisy", file=out)
    print(f"\negcompatbench  reps={p['reps']}  n_start={p['n_start']}  cpus={env.get('cpus')}  "
          f"python={env.get('python')}  {env.get('platform')}", file=out)
    print(f"main env : {json.dumps(env.get('main_versions', {}))}", file=out)
    if env.get("eg_versions"):
        print(f"EG venv  : {json.dumps(env['eg_versions'])}", file=out)
    if doc.get("hosts"):
        print(f"hosts    : {json.dumps(doc['hosts'])}" + (" (the ssh lab)" if doc.get("lab") else ""), file=out)
    print(f"kernels  : {json.dumps(doc.get('kernels', {}))}", file=out)
    for name, t in doc.get("targets", {}).items():
        print(f"  {name:<4} {t.get('description', '')}" + (f"  [ERROR: {t['error']}]" if t.get("error") else ""),
              file=out)
    w = max(len(m[0]) for m in METRICS) + 2
    for spec in SPECS:
        print(f"\n{spec}" + (f"  [NOT RUN: {doc['spec_problems'][spec]}]" if spec in doc.get("spec_problems", {})
                             else ""), file=out)
        hdr = f"  {'metric (median of reps)':<{w}}{'unit':<6}{'egd':>10}{'EG':>10}{'egd/EG':>10}"
        print(hdr + "\n  " + "-" * (len(hdr) - 2), file=out)
        for label, path, unit in METRICS:
            a, b = summary[spec]["egd"].get(path), summary[spec]["eg"].get(path)
            if a is None and b is None:
                continue
            ratio = f"{a / b:.2f}" if a is not None and b else "-"
            print(f"  {label:<{w}}{unit:<6}{eb.fmt(a):>10}{eb.fmt(b):>10}{ratio:>10}", file=out)
        for g in GATEWAYS:
            why = doc.get("broken", {}).get(f"{g}/{spec}")
            if why:
                print(f"  {g} could not start {spec}: {why}", file=out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="See the module docstring / bench/README.rst.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", dest="json_out", metavar="PATH", help="write every raw number here")
    p.add_argument("--reps", type=int, default=3, help="repetitions (medians are reported)")
    p.add_argument("--n-start", type=int, default=5, help="sequential starts per gateway, kernelspec and repetition")
    p.add_argument("--skip-eg", action="store_true", help="leave Enterprise Gateway out")
    p.add_argument("--egd-cmd", help="egd command ('{port}' substituted, else '--ip 127.0.0.1 --port N' "
                   "appended; '--config FILE' is always appended)")
    p.add_argument("--eg-venv", type=Path, default=eb.CACHE_DIR / "eg-venv",
                   help="venv with EG 3.x + ipykernel<7 (created on first use, shared with egdbench.py)")
    p.add_argument("--kernel-python", help="interpreter of python_distributed's kernels on both gateways "
                   "(default: the EG venv's python; needs ipykernel, jupyter_client and pycryptodomex)")
    p.add_argument("--ir-spec", type=Path, help="IRkernel's kernelspec directory (default: jupyter's `ir`)")
    p.add_argument("--timeout", type=float, default=60.0, help="base timeout in s of one wait")
    p.add_argument("--lab-lock-timeout", type=float, default=600.0,
                   help="wait this long for another ssh lab (the test suite) to release its lock")
    hosts = p.add_argument_group("hosts of your own instead of the ssh lab")
    hosts.add_argument("--hosts", help="comma-separated ssh hosts (both gateways use these names)")
    hosts.add_argument("--gateway-ip", help="the address of this machine the hosts reach (required with --hosts)")
    hosts.add_argument("--ssh-user", default=os.environ.get("USER", "root"), help="the login on the hosts")
    hosts.add_argument("--ssh-config", help="an ssh_config for egd (EG's paramiko reads ~/.ssh)")
    hosts.add_argument("--shared-dir", type=Path, help="a directory at the same path here and on every host "
                       "(kernelspecs, egd's launcher and the logs go there; required with --hosts)")
    p.add_argument("--keep-logs", action="store_true", help="keep the work dir (gateway and kernel logs)")
    args = p.parse_args(argv)
    if args.hosts and not (args.gateway_ip and args.shared_dir):
        p.error("--hosts needs --gateway-ip and --shared-dir")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run everything; return the exit status."""
    args = parse_args(argv)
    eb.install_stop_signals()
    eb.CACHE_DIR.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="egcompatbench-", dir=args.shared_dir))
    workdir.chmod(0o755)  # the hosts read the kernelspecs and write logs here
    lab = SshLab(n_hosts=2, lock_timeout=args.lab_lock_timeout)
    doc: dict[str, Any] = {
        "tool": "egcompatbench", "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "workdir": str(workdir), "runs": [], "targets": {}, "_targets": [], "spec_problems": {}}
    status = 2
    try:
        run_benchmark(args, workdir, lab, doc)
        status = 0
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        status = 130
    except Exception as e:  # reported, then cleanup and the table
        log(f"benchmark failed: {type(e).__name__}: {e}")
        doc["error"] = f"{type(e).__name__}: {e}"
    finally:
        doc["cleanup"] = cleanup(doc, lab)
    for t in doc.pop("_targets", []):
        entry = doc["targets"].setdefault(t.name, {"description": t.description})
        entry.update(error=t.error, pid=t.pid, cmd=shlex.join(t.cmd), **t.info)
    summary = summarize_runs(doc["runs"], args.n_start)
    doc["summary_median_of_reps"] = summary
    doc.setdefault("env", eb.environment(None))
    print_report(doc, summary)
    missing = [f"{g}/{s}" for s in SPECS for g in GATEWAYS if "total.median_ms" not in summary[s][g]]
    c = doc["cleanup"]
    for g, files in c.get("eg_launcher_files", {}).items():
        if files["connection_files_left"]:
            print(f"note: {g}: EG's launcher left {files['connection_files_left']} connection files in "
                  f"{tempfile.gettempdir()} for {files['kernels']} kernels (removed now)")
    if c.get("left_after_stop") or c.get("left_on_hosts_after_gateways_stopped") or not c.get("lab_closed", True):
        print(f"WARNING cleanup: local processes killed {c.get('left_after_stop')}, left on hosts "
              f"{c.get('left_on_hosts_after_gateways_stopped')}, lab closed {c.get('lab_closed')} "
              f"{c.get('lab_close_error', '')}")
    if doc.get("error"):
        print(f"ERROR benchmark: {doc['error']}")
    if missing:
        print(f"not measured: {', '.join(missing)}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        log(f"wrote {args.json_out}")
    if args.keep_logs or missing or status != 0:
        print(f"logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    if status == 0 and missing:
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
