#!/usr/bin/env python3
"""remotebench -- remote kernels over ssh: egd's ssh driver vs. EG's DistributedProcessProxy.

One command, run as root from the repository root::

    python bench/remotebench.py --json out.json

builds the ssh lab of ``tests/sshhosts.py`` (network namespaces egdh1/egdh2 at
10.200.0.11/12, each with its own sshd, the gateway side at 10.200.0.1), starts
both gateways against the same two hosts and prints a table of figures, ratios
and PASS/FAIL per performance target.

Targets
    egd         ``egd run --config <generated> --ip 127.0.0.1 --port N``, ssh
                driver (round-robin over egdh1, egdh2, the lab's ssh_config,
                callback address 10.200.0.1); kernelspec ``ssh_python`` runs the
                lab's python (this interpreter, ``--egd-kernel-python``).
    eg          Jupyter Enterprise Gateway 3.x (the venv egdbench.py installs),
                kernelspec ``eg_distributed`` with DistributedProcessProxy and
                EG's own ``launch_ipykernel.py`` (taken from EG's PyPI sdist,
                cached), run by the EG venv's python (ipykernel 6).  EG gets its
                own HOME whose ~/.ssh holds the lab key and known_hosts;
                EG_REMOTE_HOSTS = the host IPs, EG_REMOTE_USER = root,
                EG_RESPONSE_IP = 10.200.0.1.
    egd-direct, eg-direct
                the lean pyzmq client of egdbench.py connected from the gateway
                side to the SAME remote kernel the gateway started (host IP, the
                five ports and the key the kernel reports about itself).

Sections (``--only``)
    start   N sequential remote starts per gateway: POST /api/kernels -> WS
            connect -> kernel_info_reply; DELETE right after (timed too).
    rtt     one remote kernel per gateway: execute "1" 200 times (after a
            warm-up), send -> execute_reply and send -> idle, through the
            gateway's WebSocket and, on the same kernel, through the direct
            client; in 4 blocks of 50 that alternate between the two sides
            (``--rtt-blocks``), the WebSocket closed while the direct client
            measures; which side goes first alternates between repetitions.

Repetitions (``--reps``, default 3) interleave the gateways in a rotating
order; the table shows medians over repetitions.  Traffic stays on 127.0.0.1
and 10.200.0.0/24.  Every wait is bounded; gateways, their kernels, the lab
(namespaces, sshds, everything running on the hosts) are torn down at the end,
also on error or Ctrl-C.

Exit status: 0 all targets PASS, 1 some FAIL or not measured, 2 the benchmark
failed, 130 interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
for _p in (str(BENCH_DIR), str(REPO_DIR)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import egdbench as eb  # noqa: E402  (bench/ is not a package)

from tests.sshhosts import SSHD, LabError, SshLab, install, unavailable_reason  # noqa: E402

ALL_SECTIONS = ("start", "rtt")
EGD_SPEC = "ssh_python"
EGD_SPEC_EGPY = "ssh_python_egpy"  # egd, kernel run by the EG venv's python: the same kernel as EG's
EG_SPEC = "eg_distributed"
EG_PROXY = "enterprise_gateway.services.processproxies.distributed.DistributedProcessProxy"
LAUNCHER_MEMBER = "etc/kernel-launchers/python/scripts/launch_ipykernel.py"
COLUMNS = ("egd", "egd-direct", "egd-egpy", "eg", "eg-direct")
ERRORS = (*eb.ERRORS, LabError)

# Executed in a kernel: what it bound and with which key, as the kernel itself knows it (the
# IPKernelApp singleton: egd's and EG's launchers both run ipykernel's IPKernelApp).
CONN_INFO_CODE = """\
import json as _j, socket as _s
from ipykernel.kernelapp import IPKernelApp as _A
_a = _A.instance()
_k = _a.session.key
print("REMOTEBENCH" + _j.dumps({"hostname": _s.gethostname(), "transport": _a.transport, "ip": _a.ip,
      "shell_port": _a.shell_port, "iopub_port": _a.iopub_port, "stdin_port": _a.stdin_port,
      "control_port": _a.control_port, "hb_port": _a.hb_port,
      "key": _k.decode() if isinstance(_k, bytes) else _k,
      "signature_scheme": _a.session.signature_scheme}))
del _j, _s, _A, _a, _k
"""


def log(text: str) -> None:
    """Progress line on stderr."""
    print(f"[remotebench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------

class RemoteGateway(eb.GatewayTarget):
    """A gateway whose kernels run on the lab's hosts."""

    def start_main(self, timeout: float) -> tuple[eb.Kernel, str]:
        """Start a kernel (iopub ready) and return it with its kernel id."""
        before = set(self.kernels)
        k = self.start_kernel(ready_iopub=True, timeout=timeout)
        with self.lock:
            new = sorted(self.kernels - before)
        if len(new) != 1:
            raise eb.BenchError(f"cannot tell the new kernel's id (new ids: {new})")
        return k, new[0]

    def delete(self, kid: str, conn: eb.WSConn | None) -> None:
        """Close `conn` (if any) and DELETE the kernel."""
        self._delete(kid, conn)


def kernel_connection_info(conn: eb.Conn, timeout: float, host_ips: dict[str, str]) -> dict:
    """Ask the kernel for its connection info; ip := the address of the host it runs on."""
    out: list[str] = []

    def on_msg(m: eb.Msg, _t: float) -> None:
        if m[0] == "iopub" and m[1] == "stream" and m[3].get("name") == "stdout":
            out.append(m[3].get("text", ""))

    _, _, reply = eb.execute(conn, CONN_INFO_CODE, timeout, on_msg)
    if not reply or reply.get("status") != "ok":
        raise eb.BenchError(f"connection info snippet failed in the kernel: {reply}")
    text = "".join(out)
    line = next((x for x in text.splitlines() if x.startswith("REMOTEBENCH")), None)
    if line is None:
        raise eb.BenchError(f"the kernel printed no connection info: {text[:300]!r}")
    info = json.loads(line[len("REMOTEBENCH"):])
    if info["transport"] != "tcp" or info["signature_scheme"] != "hmac-sha256":
        raise eb.BenchError(f"unsupported transport/signature scheme: {info}")
    if info["hostname"] not in host_ips:
        raise eb.BenchError(f"the kernel runs on {info['hostname']!r}, not on a lab host {sorted(host_ips)}")
    info["bound_ip"] = info["ip"]
    info["ip"] = host_ips[info["hostname"]]
    return info


# ---------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------

def _noop() -> None:
    """A Kernel.delete that does nothing (the caller deletes)."""


def measured(target: eb.Target, fn: Callable[[], dict]) -> dict:
    """fn() with the wall/CPU seconds of client and gateway added."""
    s0 = eb.cpu_snapshot(target)
    r = fn()
    r.setdefault("cpu", eb.cpu_delta(target, s0))
    return r


def merge_rtt(blocks: list[dict]) -> dict:
    """One rtt result out of the per-block results of eb.sec_rtt (samples pooled, CPU summed)."""
    out: dict[str, Any] = {"blocks": len(blocks)}
    for key in ("to_reply", "to_idle"):
        out[key] = eb.summarize([x / 1000.0 for b in blocks for x in b[key]["samples_ms"]])
    out["execs_per_s"] = out["to_idle"]["n"] / (sum(out["to_idle"]["samples_ms"]) / 1000.0)
    cpu: dict[str, Any] = {}
    for b in blocks:
        for k, v in b.get("cpu", {}).items():
            cpu[k] = None if v is None or cpu.get(k, 0) is None else cpu.get(k, 0) + v
    out["cpu"] = cpu
    return out


def sec_rtt_pair(target: RemoteGateway, args: argparse.Namespace, ctx: zmq.Context,
                 host_ips: dict[str, str], direct_first: bool) -> tuple[dict, dict, dict]:
    """Round trips on one remote kernel via the gateway's WebSocket and via the direct client.

    The `n_rtt` executes per side run in `rtt_blocks` blocks that alternate
    between the two sides (ws, direct, ws, direct, ... or the other way round),
    so that a slow drift of a noisy machine hits both alike; the WebSocket is
    closed while the direct client measures.  Every block starts with a
    warm-up (`warmup` executes the first time, 3 later).  Returns (gateway
    result, direct result, connection info); a failure of one side is
    recorded as {"error": ...} and does not hide the other."""
    k, kid = target.start_main(args.timeout)
    conn: eb.WSConn | None = k.conn  # type: ignore[assignment]
    blocks: dict[str, list[dict]] = {"ws": [], "direct": []}
    failed: dict[str, str] = {}
    info: dict = {}
    nblocks = max(1, min(args.rtt_blocks, args.n_rtt))
    sizes = [args.n_rtt // nblocks + (1 if i < args.n_rtt % nblocks else 0) for i in range(nblocks)]
    try:
        info = kernel_connection_info(k.conn, args.timeout, host_ips)
        log(f"  {target.name} kernel {kid} on {info['hostname']} ({info['ip']}), bound "
            f"{info['bound_ip']}, shell port {info['shell_port']}")
        sides = ("direct", "ws") if direct_first else ("ws", "direct")
        for i, size in enumerate(sizes):
            bargs = argparse.Namespace(**dict(vars(args), n_rtt=size, warmup=args.warmup if i == 0 else 3))
            for side in sides:
                if side in failed:
                    continue
                try:
                    if side == "ws":
                        if conn is None:
                            conn = eb.WSConn(target.port, kid, args.timeout)
                            eb.wait_iopub(conn, args.timeout)
                        blocks["ws"].append(measured(target, functools.partial(
                            eb.sec_rtt, eb.Kernel(conn, {}, _noop), bargs)))
                    else:
                        if conn is not None:
                            conn.close()
                            conn = None
                        d = eb.DirectConn(ctx, info)
                        try:
                            eb.wait_kernel_info(d, args.timeout)
                            eb.wait_iopub(d, args.timeout)
                            blocks["direct"].append(measured(target, functools.partial(
                                eb.sec_rtt, eb.Kernel(d, {}, _noop), bargs)))
                        finally:
                            d.close()
                except ERRORS as e:
                    failed[side] = f"{type(e).__name__}: {e}"
                    log(f"  {target.name} rtt via {side} FAILED: {failed[side]}")
    finally:
        try:
            target.delete(kid, conn)
        except ERRORS as e:
            log(f"{target.name}: DELETE of the rtt kernel failed: {e}")
    res = {side: ({"error": failed[side]} if side in failed else
                  merge_rtt(blocks[side]) if blocks[side] else {"error": "not run"}) for side in blocks}
    return res["ws"], res["direct"], info


# ---------------------------------------------------------------------------
# setup: egd and EG configs, EG's launcher
# ---------------------------------------------------------------------------

def free_port(ip: str) -> int:
    """A currently free TCP port on `ip`."""
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def ensure_eg_launcher(venv: Path, version: str, override: Path | None) -> Path:
    """EG's launch_ipykernel.py: not in EG's wheel, so taken from the sdist of the
    installed EG version (``pip download --no-binary :all: --no-deps``) and cached."""
    if override is not None:
        if not override.is_file():
            raise eb.BenchError(f"--eg-launcher {override}: no such file")
        return override
    dest = eb.CACHE_DIR / "eg-launchers" / version / "launch_ipykernel.py"
    if dest.is_file():
        return dest
    log(f"fetching launch_ipykernel.py from the jupyter_enterprise_gateway {version} sdist (one-time)")
    with tempfile.TemporaryDirectory(prefix="remotebench-sdist-") as tmp:
        r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "download",
                            "--disable-pip-version-check", "-q", "--no-binary", ":all:", "--no-deps",
                            "-d", tmp, f"jupyter_enterprise_gateway=={version}"],
                           capture_output=True, text=True, timeout=600, check=False)
        sdists = sorted(Path(tmp).glob("*.tar.gz"))
        if r.returncode != 0 or not sdists:
            raise eb.BenchError(f"pip download of the EG sdist failed:\n{r.stdout[-1500:]}\n{r.stderr[-1500:]}")
        with tarfile.open(sdists[0]) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith("/" + LAUNCHER_MEMBER)), None)
            if member is None:
                raise eb.BenchError(f"{sdists[0].name} has no {LAUNCHER_MEMBER}")
            src = tar.extractfile(member)
            if src is None:
                raise eb.BenchError(f"{member.name} in {sdists[0].name} is not a file")
            data = src.read()
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    return dest


def write_spec(root: Path, name: str, spec: dict) -> None:
    """root/kernels/<name>/kernel.json."""
    d = root / "kernels" / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "kernel.json").write_text(json.dumps(spec, indent=1))


def egd_target(args: argparse.Namespace, lab: SshLab, workdir: Path, base_env: dict) -> RemoteGateway:
    """egd with the ssh driver over the lab's hosts."""
    specs = workdir / "egd-specs"
    for name, python in ((EGD_SPEC, args.egd_kernel_python or lab.python),
                         (EGD_SPEC_EGPY, str(args.eg_venv / "bin" / "python"))):
        write_spec(specs, name, {
            "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"{name} (remotebench)", "language": "python",
            "metadata": {"egd": {"driver": "ssh"}}})
    config = {  # JSON is YAML
        "kernels": {"kernelspec_dirs": [str(specs / "kernels")]},
        "drivers": {"local": {}, "ssh": {"hosts": [h.name for h in lab.hosts],
                                         "ssh_config": str(lab.ssh_config_path),
                                         "callback_host": lab.gateway_ip,
                                         "log_dir": str(workdir / "egd-host-logs")}},
    }
    for item in args.egd_ssh or []:  # extra ssh driver settings, KEY=VALUE (VALUE: JSON, else a string)
        key, _, raw = item.partition("=")
        raw = raw.replace("{workdir}", str(workdir))
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        config["drivers"]["ssh"][key.strip()] = value
    (workdir / "egd-host-logs").mkdir()
    cfg = workdir / "egd.yaml"
    cfg.write_text(json.dumps(config, indent=1))
    port = eb.free_port()
    cmd = [*eb.egd_command(args.egd_cmd, port), "--config", str(cfg)]
    extra = {k: v for k, v in config["drivers"]["ssh"].items()
             if k not in ("hosts", "ssh_config", "callback_host", "log_dir")}
    t = RemoteGateway("egd", f"egd ssh driver ({shlex.join(cmd[-6:])})"
                      + (f", ssh settings {json.dumps(extra)}" if extra else ", ssh driver defaults"),
                      cmd, port, base_env, workdir / "egd.log", EGD_SPEC)
    t.info["config"] = config
    return t


def eg_target(args: argparse.Namespace, lab: SshLab, workdir: Path, base_env: dict,
              eg_versions: dict, launcher: Path) -> RemoteGateway:
    """EG 3.x with DistributedProcessProxy over the lab's hosts."""
    venv = args.eg_venv
    home = workdir / "eg-home"
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(parents=True, mode=0o700)
    shutil.copyfile(lab.key_path, ssh_dir / "id_ed25519")
    (ssh_dir / "id_ed25519").chmod(0o600)
    shutil.copyfile(lab.known_hosts_path, ssh_dir / "known_hosts")  # "egdh1,10.200.0.11 ssh-ed25519 ..."
    jpath = workdir / "eg-jupyter"
    write_spec(jpath, EG_SPEC, {
        "argv": [str(venv / "bin" / "python"), str(launcher),
                 "--RemoteProcessProxy.kernel-id", "{kernel_id}",
                 "--RemoteProcessProxy.response-address", "{response_address}",
                 "--RemoteProcessProxy.public-key", "{public_key}",
                 "--RemoteProcessProxy.port-range", "{port_range}",
                 "--RemoteProcessProxy.spark-context-initialization-mode", "none"],
        "display_name": "Python 3 (distributed, remotebench)", "language": "python",
        "metadata": {"process_proxy": {"class_name": EG_PROXY}}})
    (workdir / "eg-kernel-logs").mkdir()
    env = dict(base_env, HOME=str(home), JUPYTER_PATH=str(jpath),
               EG_REMOTE_HOSTS=",".join(h.ip for h in lab.hosts),  # root netns does not resolve egdhN
               EG_REMOTE_USER=lab.user, EG_RESPONSE_IP=lab.gateway_ip,
               EG_RESPONSE_PORT=str(free_port(lab.gateway_ip)),
               EG_KERNEL_LOG_DIR=str(workdir / "eg-kernel-logs"))
    for k in ("VIRTUAL_ENV", "SSH_AUTH_SOCK", "SSH_AGENT_PID"):  # paramiko: only the key in HOME
        env.pop(k, None)
    port = eb.free_port()
    cmd = [str(venv / "bin" / "jupyter"), "enterprisegateway", f"--ip={eb.LOCALHOST}", f"--port={port}",
           "--port_retries=0", "--EnterpriseGatewayApp.list_kernels=True"]
    desc = (f"EG {eg_versions.get('jupyter_enterprise_gateway')} DistributedProcessProxy "
            f"(EG_REMOTE_HOSTS={env['EG_REMOTE_HOSTS']}, EG_RESPONSE_IP={lab.gateway_ip}:"
            f"{env['EG_RESPONSE_PORT']})")
    return RemoteGateway("eg", desc, cmd, port, env, workdir / "eg.log", EG_SPEC)


def lab_environment(lab: SshLab, args: argparse.Namespace, launcher: Path | None) -> dict:
    """Facts about the lab and the kernels' interpreters."""
    ssh_v = subprocess.run(["ssh", "-V"], capture_output=True, text=True, timeout=10, check=False)
    sshd_v = subprocess.run([SSHD, "-V"], capture_output=True, text=True, timeout=10, check=False)
    egd_py = args.egd_kernel_python or lab.python
    out: dict[str, Any] = {
        "hosts": {h.name: h.ip for h in lab.hosts}, "gateway_ip": lab.gateway_ip,
        "lab_start_s": {k: round(v, 3) for k, v in lab.timings.items()},
        "ssh": (ssh_v.stderr or ssh_v.stdout).strip(), "sshd": (sshd_v.stderr or sshd_v.stdout).strip()[:200],
        "egd_kernel_python": egd_py, "egd_kernel_versions": eb.package_versions(egd_py),
        "eg_kernel_python": str(args.eg_venv / "bin" / "python"),
    }
    if launcher is not None:
        out["eg_launcher"] = str(launcher)
        out["eg_launcher_sha256"] = hashlib.sha256(launcher.read_bytes()).hexdigest()
    return out


# ---------------------------------------------------------------------------
# summary and report
# ---------------------------------------------------------------------------

# (label, key path, unit)
METRICS = [
    ("remote start: total (median)", "start.total.median_ms", "ms"),
    ("remote start: total (p95)", "start.total.p95_ms", "ms"),
    ("  POST /api/kernels", "start.post.median_ms", "ms"),
    ("  WS connect", "start.ws_connect.median_ms", "ms"),
    ("  kernel_info", "start.kernel_info.median_ms", "ms"),
    ("remote DELETE (median)", "start.delete.median_ms", "ms"),
    ("rtt: send->reply median", "rtt.to_reply.median_ms", "ms"),
    ("rtt: send->reply p95", "rtt.to_reply.p95_ms", "ms"),
    ("rtt: send->idle median", "rtt.to_idle.median_ms", "ms"),
    ("rtt: send->idle p95", "rtt.to_idle.p95_ms", "ms"),
    ("rtt: client CPU (all execs)", "rtt.cpu.client_cpu_s", "s"),
    ("rtt: gateway CPU (all execs)", "rtt.cpu.gateway_cpu_s", "s"),
]

# (label, numerator column, denominator column, metric, op, threshold)
CHECKS = [
    ("remote start, egd/EG", "egd", "eg", "start.total.median_ms", "<=", 0.8),
    ("remote start, same kernel: egd-egpy/EG", "egd-egpy", "eg", "start.total.median_ms", "<=", 0.8),
    ("remote round trip send->reply, egd/direct", "egd", "egd-direct", "rtt.to_reply.median_ms", "<=", 1.25),
    ("remote round trip send->idle, egd/direct", "egd", "egd-direct", "rtt.to_idle.median_ms", "<=", 1.25),
]

RATIOS = [("egd/direct", "egd", "egd-direct"), ("EG/direct", "eg", "eg-direct"), ("egd/EG", "egd", "eg"),
          ("egpy/EG", "egd-egpy", "eg")]


def summarize_runs(runs: list[dict]) -> dict[str, dict]:
    """Median over repetitions per column and metric."""
    out: dict[str, dict] = {}
    for col in COLUMNS:
        res = {}
        for _, path, _ in METRICS:
            vals = [eb.dig(r.get(col), path) for r in runs]
            vals = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if vals:
                res[path] = statistics.median(vals)
        out[col] = res
    return out


def evaluate_checks(summary: dict, sections: list[str]) -> list[dict]:
    """PASS/FAIL/n/a per performance target."""
    out = []
    for label, num, den, path, op, thr in CHECKS:
        a, b = summary.get(num, {}).get(path), summary.get(den, {}).get(path)
        ratio = a / b if a is not None and b else None
        if ratio is None:
            verdict = "n/a"
            sec = path.split(".")[0]
            note = f"section {sec} not run" if sec not in sections else f"missing {num if a is None else den} figure"
        else:
            verdict = "PASS" if (ratio <= thr if op == "<=" else ratio >= thr) else "FAIL"
            note = ""
        out.append({"check": label, "num": num, "den": den, "metric": path, "numerator": a,
                    "denominator": b, "ratio": ratio, "target": f"{op} {thr}", "verdict": verdict,
                    "note": note})
    return out


def print_report(doc: dict, summary: dict, checks: list[dict], out: Any = sys.stdout) -> None:
    """Environment, table, ratios, PASS/FAIL."""
    env, lab = doc.get("env", {}), doc.get("lab", {})
    load = (env.get("loadavg_start") or (0, 0, 0))[0]
    if load > 0.5 * (env.get("cpus") or 1):
        print(f"\nWARNING load average {load:.2f} at start on {env.get('cpus')} CPUs: other processes "
              "compete with the benchmark; the figures are noisy", file=out)
    p = doc["params"]
    print(f"\nremotebench  reps={p['reps']}  sections={','.join(p['only'])}  n_start={p['n_start']}  "
          f"n_rtt={p['n_rtt']}  cpus={env.get('cpus')}  python={env.get('python')}  {env.get('platform')}",
          file=out)
    print(f"main env   : {json.dumps(env.get('main_versions', {}))}", file=out)
    if env.get("eg_versions"):
        print(f"EG venv    : {json.dumps(env['eg_versions'])}", file=out)
    if lab:
        ls = lab.get("lab_start_s", {})
        print(f"lab        : hosts {lab.get('hosts')} gateway {lab.get('gateway_ip')}; {lab.get('ssh')}; "
              f"lab built in {ls.get('files_and_network', 0) + ls.get('sshd_ready', 0):.1f} s "
              f"(+{ls.get('cleanup', 0):.1f} s lock wait/cleanup)", file=out)
        print(f"kernels    : egd -> {lab.get('egd_kernel_python')} (ipykernel "
              f"{lab.get('egd_kernel_versions', {}).get('ipykernel')}); egd-egpy and EG -> "
              f"{lab.get('eg_kernel_python')} (ipykernel {env.get('eg_versions', {}).get('ipykernel')}); "
              f"EG's launcher {lab.get('eg_launcher')}", file=out)
    for name, t in doc.get("targets", {}).items():
        print(f"  {name:<4} {t.get('description', '')}" + (f"  [ERROR: {t['error']}]" if t.get("error") else ""),
              file=out)
    print("  egd-egpy: egd starting the EG venv's python as its kernel (start only: same kernel as EG)\n"
          "  egd, egd-egpy, eg: the same WebSocket client as egdbench.py; *-direct: egdbench's lean pyzmq "
          "client, from the gateway side, on the very remote kernel of the column before", file=out)
    w = max(len(m[0]) for m in METRICS) + 2
    hdr = f"{'metric (median of reps)':<{w}}{'unit':<6}" + "".join(f"{c:>12}" for c in COLUMNS) \
        + "".join(f"{r[0]:>12}" for r in RATIOS)
    print("\n" + hdr + "\n" + "-" * len(hdr), file=out)
    for label, path, unit in METRICS:
        vals = [summary.get(c, {}).get(path) for c in COLUMNS]
        if all(v is None for v in vals):
            continue
        row = f"{label:<{w}}{unit:<6}" + "".join(f"{eb.fmt(v):>12}" for v in vals)
        for _, a, b in RATIOS:
            va, vb = summary.get(a, {}).get(path), summary.get(b, {}).get(path)
            row += f"{(f'{va / vb:.2f}' if va is not None and vb else '-'):>12}"
        print(row, file=out)
    print("\nperformance targets", file=out)
    for c in checks:
        r = f"{c['ratio']:.2f}" if c["ratio"] is not None else "-"
        print(f"  {c['verdict']:<5} {c['check']:<44} ratio {r:>6}  target {c['target']:<7}"
              + (f"  ({c['note']})" if c["note"] else ""), file=out)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="See the module docstring / bench/README.rst.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", dest="json_out", metavar="PATH", help="write every raw number here")
    p.add_argument("--reps", type=int, default=3, help="repetitions (medians are reported)")
    p.add_argument("--only", default=",".join(ALL_SECTIONS),
                   help=f"comma-separated sections out of {','.join(ALL_SECTIONS)}")
    p.add_argument("--skip-eg", action="store_true", help="leave Enterprise Gateway out")
    p.add_argument("--egd-cmd", help="egd command ('{port}' substituted, else '--ip 127.0.0.1 --port N' "
                   "appended; '--config FILE' is always appended)")
    p.add_argument("--egd-ssh", action="append", metavar="KEY=VALUE",
                   help="a setting of egd's ssh driver (repeatable; VALUE is JSON if it parses, else a "
                   "string; '{workdir}' is substituted), e.g. multiplex=false or "
                   "'ssh_options=[\"Compression=no\"]'")
    p.add_argument("--egd-kernel-python", help="interpreter of egd's remote kernels (default: the lab's "
                   "python, i.e. this one); e.g. the EG venv's python to compare equal kernels")
    p.add_argument("--no-same-kernel", action="store_true",
                   help="skip the egd-egpy start column (egd starting the EG venv's python as its kernel)")
    p.add_argument("--eg-venv", type=Path, default=eb.CACHE_DIR / "eg-venv",
                   help="venv with EG 3.x + ipykernel<7 (created on first use, shared with egdbench.py)")
    p.add_argument("--eg-launcher", type=Path, help="EG's launch_ipykernel.py (default: from EG's sdist, cached)")
    p.add_argument("--n-start", type=int, default=5, help="start: sequential remote starts")
    p.add_argument("--n-rtt", type=int, default=200, help="rtt: round trips")
    p.add_argument("--warmup", type=int, default=10, help="rtt: warm-up executes")
    p.add_argument("--rtt-blocks", type=int, default=4,
                   help="rtt: blocks the round trips of each side are split into, alternating sides")
    p.add_argument("--timeout", type=float, default=60.0, help="base timeout in s of one wait")
    p.add_argument("--lab-lock-timeout", type=float, default=600.0,
                   help="wait this long for another ssh lab (the test suite) to release its lock")
    p.add_argument("--keep-logs", action="store_true", help="keep the work dir (gateway and kernel logs)")
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    if set(args.only) - set(ALL_SECTIONS):
        p.error(f"unknown sections {sorted(set(args.only) - set(ALL_SECTIONS))}")
    return args


def run_benchmark(args: argparse.Namespace, ctx: zmq.Context, workdir: Path, lab: SshLab, doc: dict) -> None:
    """Set up, then every repetition; fills doc as it goes."""
    eg_versions: dict | None = None
    launcher: Path | None = None
    if not args.skip_eg:
        try:
            eg_versions = eb.ensure_eg_venv(args.eg_venv)
            launcher = ensure_eg_launcher(args.eg_venv, eg_versions["jupyter_enterprise_gateway"],
                                          args.eg_launcher)
        except (eb.BenchError, OSError, KeyError, subprocess.SubprocessError) as e:
            log(f"EG: NOT AVAILABLE: {e}")
            doc["eg_setup_error"] = str(e)
            eg_versions = None
    doc["env"] = eb.environment(eg_versions)
    if unavailable_reason():
        raise eb.BenchError(f"no ssh lab here: {unavailable_reason()}")
    if not os.access(SSHD, os.X_OK) or shutil.which("ssh-keygen") is None:
        log("installing sshd (tests/services/install-ssh.sh)")
        install()
    log("building the ssh lab (2 hosts)")
    lab.start()
    log(f"lab up in {lab.timings.get('start', 0):.1f} s: "
        + ", ".join(f"{h.name}={h.ip}" for h in lab.hosts) + f", gateway {lab.gateway_ip}")
    doc["lab"] = lab_environment(lab, args, launcher)
    host_ips = {h.name: h.ip for h in lab.hosts}
    same_kernel = not args.no_same_kernel and (args.eg_venv / "bin" / "python").exists()

    runtime = workdir / "runtime"
    runtime.mkdir()
    base_env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(runtime), PYTHONUNBUFFERED="1")
    targets: list[RemoteGateway] = doc["_targets"]
    builders: list[tuple[str, Callable[[], RemoteGateway]]] = [
        ("egd", lambda: egd_target(args, lab, workdir, base_env))]
    if not args.skip_eg:
        builders.append(("eg", lambda: eg_target(args, lab, workdir, base_env, eg_versions or {},
                                                 launcher or Path("-"))))
    for name, build in builders:
        if name == "eg" and (eg_versions is None or launcher is None):
            doc["targets"][name] = {"description": "EG", "error": doc.get("eg_setup_error", "not available")}
            continue
        try:
            t = build()
        except (eb.BenchError, OSError) as e:
            doc["targets"][name] = {"description": name, "error": str(e)}
            log(f"{name}: NOT AVAILABLE: {e}")
            continue
        targets.append(t)  # registered for cleanup before it runs
        doc["targets"][name] = {"description": t.description, "error": None}
        try:
            t.launch(args.timeout)
            log(f"{name}: up on port {t.port}, pid {t.pid}, kernel argv {t.info.get('kernelspec_argv')}")
        except (eb.BenchError, OSError) as e:
            t.error = str(e)
            doc["targets"][name]["error"] = t.error
            log(f"{name}: NOT AVAILABLE: {e}")

    def run(t: RemoteGateway, section: str, fn: Callable[[], Any], res: dict, rep: int) -> Any:
        if t.error:
            return None
        log(f"rep {rep}: {section:<5} {t.name}")
        try:
            return fn()
        except ERRORS as e:
            res[t.name][section] = {"error": f"{type(e).__name__}: {e}"}
            log(f"rep {rep}: {section} {t.name} FAILED: {type(e).__name__}: {e}")
            if not t.alive():
                t.error = f"gateway died (exit {t.proc.returncode if t.proc else '?'}); log tail:\n{t.log_tail()}"
                doc["targets"][t.name]["error"] = t.error
            return None
        finally:
            t.track()

    for rep in range(1, args.reps + 1):
        shift = (rep - 1) % max(1, len(targets))
        order = targets[shift:] + targets[:shift]
        res: dict[str, Any] = {c: {} for c in COLUMNS}
        res.update(rep=rep, order=[t.name for t in order], loadavg_before=os.getloadavg(),
                   direct_first=rep % 2 == 0)
        doc["runs"].append(res)
        if "start" in args.only:
            for t in order:
                run(t, "start", functools.partial(do_start, t, args, res, same_kernel, rep), res, rep)
        if "rtt" in args.only:
            for t in order:
                run(t, "rtt", functools.partial(do_rtt, t, args, ctx, host_ips, rep % 2 == 0, res), res, rep)
        res["loadavg_after"] = os.getloadavg()


def do_start(t: RemoteGateway, args: argparse.Namespace, res: dict, same_kernel: bool, rep: int) -> None:
    """The start section of one gateway into res; for egd with `same_kernel`, also with the
    kernelspec whose kernel is the EG venv's python (column egd-egpy; which of the two egd
    kernelspecs goes first alternates between repetitions)."""
    specs = [(t.name, t.kernel_name)]
    if t.name == "egd" and same_kernel:
        specs.append(("egd-egpy", EGD_SPEC_EGPY))
        if rep % 2 == 0:
            specs.reverse()
    default = t.kernel_name
    for column, spec in specs:
        t.kernel_name = spec
        try:
            res[column]["start"] = measured(t, functools.partial(eb.sec_start, t, args))
        except ERRORS as e:
            if column == t.name:
                raise
            res[column]["start"] = {"error": f"{type(e).__name__}: {e}"}
            log(f"start {column} FAILED: {type(e).__name__}: {e}")
        finally:
            t.kernel_name = default


def do_rtt(t: RemoteGateway, args: argparse.Namespace, ctx: zmq.Context, host_ips: dict[str, str],
           direct_first: bool, res: dict) -> None:
    """The rtt section of one gateway (and of the direct client on its kernel) into res."""
    ws, direct, info = sec_rtt_pair(t, args, ctx, host_ips, direct_first)
    res[t.name]["rtt"], res[f"{t.name}-direct"]["rtt"] = ws, direct
    res[t.name]["rtt_kernel"] = {k: info.get(k) for k in (
        "hostname", "ip", "bound_ip", "shell_port", "iopub_port", "control_port")}


def host_leftovers(lab: SshLab, wait: float = 10.0) -> dict[str, list[str]]:
    """Processes still running on the hosts (sshd excluded), after up to `wait` s."""
    deadline = time.monotonic() + wait
    while True:
        left = {h.name: [f"{pid} {eb.proc_cmdline(pid)[:120]}" for pid in h.pids()] for h in lab.hosts}
        left = {k: v for k, v in left.items() if v}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def pids_mentioning(text: str) -> list[int]:
    """Processes in this machine's root network namespace whose command line contains `text`
    (the unique work dir: only processes started for this run)."""
    own_ns = os.readlink("/proc/self/ns/net")
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/net") != own_ns:
                continue  # on a lab host: the lab's teardown ends it
        except OSError:
            continue
        if text in eb.proc_cmdline(int(entry)):
            out.append(int(entry))
    return out


def remove_eg_connection_files(workdir: Path) -> list[str]:
    """EG's launch_ipykernel.py writes its connection file to the host's /tmp and removes it only
    when the kernel exits normally; EG's shutdown (SIGTERM by way of the listener) leaves it.  The hosts
    share this machine's /tmp: remove the files of the kernels EG started here (their ids are the
    names of the kernel logs in EG_KERNEL_LOG_DIR)."""
    removed = []
    for logf in (workdir / "eg-kernel-logs").glob("kernel-*.log"):
        kid = logf.stem[len("kernel-"):]
        for f in Path(tempfile.gettempdir()).glob(f"kernel-{kid}_*.json"):
            try:
                f.unlink()
                removed.append(f.name)
            except OSError:
                pass
    return removed


def cleanup(doc: dict, ctx: zmq.Context, lab: SshLab) -> dict:
    """Stop the gateways, check the hosts and local processes, tear the lab down."""
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a 2nd Ctrl-C must not stop this
    report: dict[str, Any] = {}
    try:
        for t in doc.get("_targets", []):
            try:
                t.stop()
            except ERRORS as e:
                log(f"{t.name}: stop failed: {e}")
        if lab.hosts and doc.get("lab"):
            try:
                report["left_on_hosts_after_gateways_stopped"] = host_leftovers(lab)
            except (OSError, subprocess.SubprocessError, LabError) as e:
                report["left_on_hosts_error"] = str(e)
        for pid in pids_mentioning(doc["workdir"]):  # e.g. a ControlPersist ssh master egd left
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
        report["eg_connection_files_removed"] = remove_eg_connection_files(Path(doc["workdir"]))
        try:
            lab.close()
            report["lab_closed"] = True
        except LabError as e:
            report["lab_closed"] = False
            report["lab_close_error"] = str(e)
            log(f"lab teardown: {e}")
        ctx.destroy(linger=0)
        hosts_left = report.get("left_on_hosts_after_gateways_stopped") or {}
        log(f"cleanup: {report['tracked']} local processes tracked, {len(left)} needed SIGKILL, "
            f"{len(report['left_after_kill'])} still alive; left on hosts after the gateways stopped: "
            f"{sum(len(v) for v in hosts_left.values())}; lab closed: {report['lab_closed']}")
        return report
    finally:
        signal.signal(signal.SIGINT, old)


def main(argv: list[str] | None = None) -> int:
    """Run everything; return the exit status."""
    args = parse_args(argv)
    eb.install_stop_signals()
    eb.CACHE_DIR.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="remotebench-"))
    workdir.chmod(0o755)
    ctx = zmq.Context()
    lab = SshLab(n_hosts=2, lock_timeout=args.lab_lock_timeout)
    doc: dict[str, Any] = {
        "tool": "remotebench", "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "workdir": str(workdir), "runs": [], "targets": {}, "_targets": []}
    status = 2
    try:
        run_benchmark(args, ctx, workdir, lab, doc)
        status = 0
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        status = 130
    except Exception as e:  # reported, then cleanup and the table
        log(f"benchmark failed: {type(e).__name__}: {e}")
        doc["error"] = f"{type(e).__name__}: {e}"
    finally:
        doc["cleanup"] = cleanup(doc, ctx, lab)
    targets: list[RemoteGateway] = doc.pop("_targets", [])
    for t in targets:
        entry = doc["targets"].setdefault(t.name, {"description": t.description})
        entry.update(error=t.error, pid=t.pid, cmd=t.cmd, **t.info)
    summary = summarize_runs(doc["runs"])
    checks = evaluate_checks(summary, args.only)
    doc.update(summary_median_of_reps=summary, checks=checks)
    doc.setdefault("env", eb.environment(None))
    print_report(doc, summary, checks)
    errors = [f"rep {r['rep']} {c} {s}: {v['error']}" for r in doc["runs"] for c in COLUMNS
              for s, v in r.get(c, {}).items() if isinstance(v, dict) and v.get("error")]
    if doc.get("error"):
        errors.insert(0, f"benchmark: {doc['error']}")
    errors += [f"{n}: {t['error']}" for n, t in doc["targets"].items() if t.get("error")]
    for err in errors:
        print(f"ERROR {err}")
    c = doc["cleanup"]
    if c.get("eg_connection_files_removed"):
        print(f"note: removed {len(c['eg_connection_files_removed'])} connection files EG's launcher left in "
              f"{tempfile.gettempdir()} (hosts share this filesystem)")
    if c.get("left_after_stop") or c.get("left_on_hosts_after_gateways_stopped") or not c.get("lab_closed", True):
        print(f"WARNING cleanup: local processes killed {c.get('left_after_stop')}, left on hosts "
              f"{c.get('left_on_hosts_after_gateways_stopped')}, lab closed {c.get('lab_closed')} "
              f"{c.get('lab_close_error', '')}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        log(f"wrote {args.json_out}")
    if args.keep_logs or errors or status != 0:
        print(f"logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    if status == 0:
        status = 0 if checks and all(x["verdict"] == "PASS" for x in checks) else 1
    return status


if __name__ == "__main__":
    sys.exit(main())
