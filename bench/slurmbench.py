#!/usr/bin/env python3
"""slurmbench -- egd's slurm driver on a real Slurm cluster (the one tests/slurmcluster.py starts: slurmctld and
three slurmd nodes in network namespaces, slurmrestd, munge).

One command, from the repository root, as root (installs Slurm on first use, like the tests)::

    python bench/slurmbench.py --json out.json

Sections
    start   start -> kernel_info through egd (POST /api/kernels, then WebSocket kernel_info_reply), through
            slurmrestd (mode rest) and through sbatch (mode cli), against the same kernel by hand in the same run:
            the bare ``sbatch`` of a job with the same user, partition and resources whose script runs ipykernel
            directly, until a direct ZeroMQ client gets its kernel_info_reply (when that script began to run is
            reported too). Each start follows a random pause: slurmctld starts a job at once right after another
            ended and otherwise at its next scheduling pass, so the phase must be the same for both. Medians;
            ratio = egd / bare (target <= 1.2).
    slurm   Slurm requests per poll interval made by egd with 1 and then 10 kernels alive: egd's own count
            (``egd_driver_api_requests_total``) and slurmctld's (``sdiag``: job-information RPCs). Target:
            independent of the number of kernels (ratio 10 kernels / 1 kernel <= 1.2). A per-kernel poller (what
            Enterprise Gateway does for YARN, every 3 s) would make 10 times as many.

Exit status: 0 when the targets pass, 1 when one fails, 2 when the benchmark failed.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import queue
import random
import re
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.client import GatewayClient  # noqa: E402
from tests.conftest import GatewayProcess, wait_until  # noqa: E402
from tests.slurmcluster import SlurmCluster  # noqa: E402
from tests.test_slurm import ALICE, BOB, slurm_gateway  # noqa: E402


def timed_start(client: GatewayClient, timeout: float = 60) -> tuple[str, float]:
    """(kernel id, seconds from POST to kernel_info_reply over the WebSocket)."""
    started = time.monotonic()
    kernel_id = client.start_kernel("slurm_python", env={"KERNEL_USERNAME": ALICE})
    sock = client.connect(kernel_id, timeout=timeout)
    sock.wait_for(sock.request("kernel_info_request", {}), timeout)
    sock.close()
    return kernel_id, time.monotonic() - started


def floor_kernel(cluster: SlurmCluster, n: int) -> tuple[float, float]:
    """The same kernel by hand: the bare sbatch, by the kernel's user, of a job like a kernel's (same partition,
    CPUs, memory, time limit) whose script runs ipykernel directly with a connection file written here, polled
    with kernel_info_request by a direct ZeroMQ client (jupyter_client) until it answers. (Seconds until the
    script ran, seconds until kernel_info.)"""
    from jupyter_client import BlockingKernelClient

    tag = f"slurmbench-{time.time_ns()}-{n}"
    marker = cluster.job_dir / f"{tag}.started"
    connection = cluster.job_dir / f"{tag}.json"
    ports = random.sample(range(42000, 48000), 5)
    info = {"transport": "tcp", "ip": "0.0.0.0", "key": uuid.uuid4().hex, "signature_scheme": "hmac-sha256",
            **dict(zip(("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port"), ports, strict=True))}
    connection.write_text(json.dumps(info))
    owner = pwd.getpwnam(ALICE)  # ipykernel writes the file again: it must be the job user's
    os.chown(connection, owner.pw_uid, owner.pw_gid)
    script = f"#!/bin/sh\ntouch {marker}\nexec {cluster.python} -m ipykernel_launcher -f {connection}\n"
    started = time.monotonic()
    proc = cluster.run(["sbatch", "--parsable", "--partition=debug", "--ntasks=1", "--cpus-per-task=1",
                        "--mem=256", "--time=30", f"--chdir={cluster.job_dir}", "--output=/dev/null",
                        "--job-name=slurmbench"], user=ALICE, input=script)
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch failed: {proc.stderr.strip()}")
    job_id = int(proc.stdout.strip().split(";")[0])
    wait_until(marker.exists, 60, 0.01, what="the bare job's script to run")
    script_ran = time.monotonic() - started
    node = cluster.job(job_id)["node"]  # type: ignore[index]
    client = BlockingKernelClient()
    client.load_connection_info({**info, "ip": cluster.node_ips[node]})
    client.start_channels()
    try:
        ready = kernel_info_after(client, started, 60)
    finally:
        client.stop_channels()
        cluster.run(["scancel", str(job_id)])
        marker.unlink(missing_ok=True)
        connection.unlink(missing_ok=True)
    return script_ran, ready


def kernel_info_after(client: Any, started: float, timeout: float) -> float:
    """Seconds from ``started`` until the kernel answers a kernel_info_request, asking every 50 ms (a reply to any
    of the requests counts; jupyter_client's own wait_for_ready waits a second between attempts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        client.kernel_info()
        try:
            while True:
                msg = client.get_shell_msg(timeout=0.05)
                if msg["msg_type"] == "kernel_info_reply":
                    return time.monotonic() - started
        except queue.Empty:
            continue
    raise TimeoutError(f"no kernel_info_reply within {timeout:g}s")


def api_requests(client: GatewayClient) -> float:
    """``egd_driver_api_requests_total{driver="slurm"}``."""
    text = client.request("GET", "/metrics").body.decode()
    match = re.search(r'^egd_driver_api_requests_total\{driver="slurm"\} ([0-9.e+]+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def job_info_rpcs(cluster: SlurmCluster) -> int:
    """slurmctld's count of job-information RPCs so far (``sdiag``: REQUEST_JOB_INFO and its variants)."""
    out = cluster.run(["sdiag"]).stdout
    return sum(int(m.group(1)) for m in re.finditer(r"^\s*REQUEST_JOB_INFO\S*\s*\(\s*\d+\)\s*count:(\d+)", out, re.M))


def requests_per_interval(cluster: SlurmCluster, client: GatewayClient, window: float, interval: float) -> tuple[
        float, float]:
    """(egd's Slurm requests, slurmctld's job-information RPCs) per poll interval over ``window`` seconds."""
    time.sleep(2 * interval)  # the launches' fast polling has settled
    egd_before, ctld_before = api_requests(client), job_info_rpcs(cluster)
    time.sleep(window)
    rounds = window / interval
    return (api_requests(client) - egd_before) / rounds, (job_info_rpcs(cluster) - ctld_before) / rounds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=9, help="starts per mode (default 9)")
    parser.add_argument("--kernels", type=int, default=10, help="kernels alive for the slurm section (default 10)")
    parser.add_argument("--window", type=float, default=20.0, help="seconds requests are counted (default 20)")
    parser.add_argument("--poll-interval", type=float, default=2.0)
    parser.add_argument("--pause", type=float, default=4.0,
                        help="each start follows a random pause of up to this many seconds (default 4)")
    parser.add_argument("--only", default="start,slurm")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sections = set(args.only.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="slurmbench-"))
    results: dict[str, Any] = {"reps": args.reps, "poll_interval": args.poll_interval}
    passed = True
    cluster = SlurmCluster()
    gateways: list[GatewayProcess] = []
    try:
        cluster.start()
        for user in (ALICE, BOB):
            cluster.ensure_user(user)
        if "start" in sections:
            floors = []
            for mode in ("rest", "cli"):
                gw = slurm_gateway(cluster, tmp / mode, mode, poll_interval=args.poll_interval,
                                   fast_poll_interval=0.1)
                gateways.append(gw)
                egd_times = []
                for n in range(args.reps):
                    # Interleaved, each after a random pause: slurmctld starts a job at once when a job ended just
                    # before, else at its next scheduling pass (every sched_interval); a random phase gives both the
                    # same odds.
                    time.sleep(random.uniform(0, args.pause))
                    floors.append(floor_kernel(cluster, n))
                    time.sleep(random.uniform(0, args.pause))
                    kernel_id, seconds = timed_start(gw.client)
                    egd_times.append(seconds)
                    gw.client.delete_kernel(kernel_id)
                gw.stop()
                egd_median = statistics.median(egd_times)
                floor_median = statistics.median(f[1] for f in floors)
                script_median = statistics.median(f[0] for f in floors)
                ratio = egd_median / floor_median
                passed &= ratio <= 1.2
                results[f"start_{mode}"] = {"egd_s": egd_times, "egd_median_s": egd_median,
                                            "bare_kernel_median_s": floor_median,
                                            "bare_script_ran_median_s": script_median, "ratio": ratio}
                print(f"start ({mode}): egd {egd_median:.2f}s, bare sbatch of the kernel {floor_median:.2f}s "
                      f"(its script ran after {script_median:.2f}s), ratio {ratio:.2f}", flush=True)
            results["bare_kernel_s"] = floors
        if "slurm" in sections:
            gw = slurm_gateway(cluster, tmp / "count", "rest", poll_interval=args.poll_interval)
            gateways.append(gw)
            client = gw.client
            ids = [client.start_kernel("slurm_python", env={"KERNEL_USERNAME": ALICE})]
            one = requests_per_interval(cluster, client, args.window, args.poll_interval)
            for _ in range(args.kernels - 1):
                ids.append(client.start_kernel("slurm_python", env={"KERNEL_USERNAME": ALICE}))
            many = requests_per_interval(cluster, client, args.window, args.poll_interval)
            for kernel_id in ids:
                client.delete_kernel(kernel_id)
            ratio = many[0] / one[0] if one[0] else float("inf")
            passed &= ratio <= 1.2
            results["slurm"] = {"egd_per_interval_1": one[0], f"egd_per_interval_{args.kernels}": many[0],
                                "ctld_rpcs_per_interval_1": one[1], f"ctld_rpcs_per_interval_{args.kernels}": many[1],
                                "ratio": ratio, "per_kernel_poller_per_interval": float(args.kernels)}
            print(f"slurm: {one[0]:.2f} requests per {args.poll_interval:g}s interval with 1 kernel, {many[0]:.2f} "
                  f"with {args.kernels} (ratio {ratio:.2f}); slurmctld job-info RPCs {one[1]:.2f} -> {many[1]:.2f}",
                  flush=True)
    except Exception as exc:
        print(f"slurmbench failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        for gw in gateways:
            gw.stop()
        cluster.close()
    results["pass"] = passed
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
