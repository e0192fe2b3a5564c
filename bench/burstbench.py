#!/usr/bin/env python3
"""burstbench -- many users at once on one egd: concurrent starts, and many clients executing at once.

    python bench/burstbench.py --json out.json            # ipykernel (the default kernelspec)
    python bench/burstbench.py --kernel mini              # bench/minikernel.py: the gateway, not kernel boots
    python bench/burstbench.py --pool 50 --only starts    # the burst served from a pool of 50 ready kernels

Sections
    starts   one start at a time (POST -> kernel_info over the WebSocket, median of 5), then ``--starts`` (50)
             starts at once from as many threads: how many succeed, their median and p90, and p90 / single. On a
             2-core machine 50 ipykernels booting at once share the CPU for most of that time; the minikernel
             shows what the gateway itself adds.
             With ``--pool N`` egd keeps N ready kernels (``kernels.pools``): the single start is timed first
             without the pool (a cold start, what a user waits otherwise), then the burst once the pool is full.
    ssh      ``--ssh-starts`` (30) starts at once on the ssh lab's two hosts (tests/sshhosts.py, as root), against
             one at a time.
    clients  ``--clients`` (50) WebSocket clients over ``--kernels`` (10) kernels, each doing ``--executes`` (100)
             execute round trips at once, each printing a token of its own: lost messages (a request without its
             reply, its idle or its output), misrouted ones (a shell reply to another client's request), the
             latency median and p99.

Exit status 0 when every start succeeded and no message was lost or misrouted, 1 otherwise, 2 on failure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.scalebench import in_threads, percentile, timed_start  # noqa: E402
from tests.client import GatewayClient  # noqa: E402
from tests.conftest import GatewayProcess  # noqa: E402


def burst(client: GatewayClient, spec: str, count: int) -> tuple[list[str], list[float], list[str]]:
    """``count`` starts released at once: (kernel ids, seconds each took, errors)."""
    ids: list[str] = []
    seconds: list[float] = []
    errors: list[str] = []
    barrier = threading.Barrier(count)

    def start() -> None:
        barrier.wait()
        try:
            kernel_id, took = timed_start(client, spec)
        except Exception as exc:  # recorded: the others go on
            errors.append(f"{type(exc).__name__}: {exc}")
            return
        ids.append(kernel_id)
        seconds.append(took)

    in_threads(start, [()] * count, 600)
    return ids, seconds, errors


def client_run(client: GatewayClient, kernel_id: str, number: int, executes: int, code: str) -> dict[str, Any]:
    """One client: ``executes`` round trips with its own token; what it lost, what reached it wrongly."""
    sock = client.connect(kernel_id)
    mine: set[str] = set()
    lost = misrouted = 0
    latencies: list[float] = []
    try:
        for i in range(executes):
            token = f"c{number}x{i}"
            began = time.perf_counter()
            msg = sock.request("execute_request", {"code": code.format(token=token), "silent": False,
                                                   "store_history": False, "user_expressions": {},
                                                   "allow_stdin": False})
            msg_id = msg["header"]["msg_id"]
            mine.add(msg_id)
            reply = idle = output = False
            deadline = time.monotonic() + 60
            while not (reply and idle and output) and time.monotonic() < deadline:
                m = sock.recv(max(0.1, deadline - time.monotonic()))
                parent = (m.get("parent_header") or {}).get("msg_id")
                if m.get("channel") == "shell" and parent not in mine:
                    misrouted += 1
                if parent != msg_id:
                    continue  # another client's iopub on the same kernel: iopub goes to every client
                kind = m["header"]["msg_type"]
                if kind == "execute_reply":
                    reply = True
                elif kind == "status" and m["content"].get("execution_state") == "idle":
                    idle = True
                elif token in json.dumps(m.get("content", {})):
                    output = True
            if not (reply and idle and output):
                lost += 1
            latencies.append(time.perf_counter() - began)
    finally:
        sock.close()
    return {"lost": lost, "misrouted": misrouted, "latencies": latencies}


def single_start(client: GatewayClient, spec: str) -> float:
    """The median of 5 starts one at a time, each kernel deleted again."""
    single = []
    for _ in range(5):
        kernel_id, took = timed_start(client, spec)
        single.append(took)
        client.delete_kernel(kernel_id)
    return statistics.median(single)


def starts_figures(client: GatewayClient, spec: str, count: int, one: float | None = None) -> dict[str, Any]:
    """A single start (median of 5; or ``one``, measured elsewhere), then ``count`` at once: the figures, every
    kernel deleted again."""
    if one is None:
        one = single_start(client, spec)
    ids, seconds, errors = burst(client, spec, count)
    for kernel_id in ids:
        client.delete_kernel(kernel_id)
    p90 = percentile(seconds, 0.9) if seconds else float("nan")
    return {"single_median_s": one, "burst": count, "succeeded": len(ids), "errors": errors[:5], "burst_p90_s": p90,
            "p90_over_single": p90 / one, "burst_median_s": statistics.median(seconds) if seconds else None}


def ssh_burst(count: int, tmp: Path, pool: int = 0) -> dict[str, Any]:
    """``count`` starts at once on the ssh lab's two hosts (tests/sshhosts.py; needs root); with ``pool``, the
    single start is timed without a pool and the burst is served from a pool of that many."""
    from tests.sshhosts import SshLab
    from tests.test_ssh import ssh_gateway

    with SshLab(n_hosts=2) as lab:
        lab.start()
        gw = ssh_gateway(lab, tmp / "ssh")
        try:
            cold = None
            if pool:
                cold = single_start(gw.client, "ssh_python")
                gw.stop(timeout=120)
                gw = ssh_gateway(lab, tmp / "ssh-pool", kernels={"pools": {"ssh_python": pool}})
                wait_for_pool(gw, "ssh_python", pool)
            figures = starts_figures(gw.client, "ssh_python", count, cold)
            figures["pool"] = pool
        finally:
            gw.stop(timeout=120)
    print(f"ssh starts: single {figures['single_median_s']:.2f}s; {figures['succeeded']}/{count} at once on 2 hosts, "
          f"median {figures['burst_median_s'] or 0:.2f}s, p90 {figures['burst_p90_s']:.2f}s "
          f"({figures['p90_over_single']:.1f} x single)", flush=True)
    return figures


def gateway_config(tmp: Path, pool: int = 0) -> dict[str, Any]:
    """egd's configuration: the benchmark's kernelspec ``k``, with a pool of ``pool`` ready kernels of it."""
    kernels: dict[str, Any] = {"kernelspec_dirs": [str(tmp / "specs")], "default_kernel_name": "k",
                               "launch_timeout": 300}
    if pool:
        kernels["pools"] = {"k": pool}
    return {"kernels": kernels, "logging": {"level": "info"}, "server": {"max_connections": 4000}}


def pooled_gateway(cold: GatewayProcess, tmp: Path, pool: int) -> GatewayProcess:
    """Stop ``cold`` and start an egd whose pool holds ``pool`` ready kernels; return once the pool is full."""
    cold.stop(timeout=120)
    gw = GatewayProcess(gateway_config(tmp, pool))
    wait_for_pool(gw, "k", pool)
    return gw


def wait_for_pool(gw: GatewayProcess, spec: str, size: int) -> None:
    """Return once ``gw``'s pool of ``spec`` holds ``size`` ready kernels (from its log)."""
    deadline = time.monotonic() + 600
    while f"pool {spec}: kernel" not in gw.log_path.read_text(errors="replace") or \
            f"({size} of {size})" not in gw.log_path.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the pool of {size} was not full within 600 s")
        time.sleep(0.5)
    time.sleep(2)  # let the last kernels' boots settle


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", choices=("ipykernel", "mini"), default="ipykernel")
    parser.add_argument("--starts", type=int, default=50)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--kernels", type=int, default=10)
    parser.add_argument("--executes", type=int, default=100)
    parser.add_argument("--ssh-starts", type=int, default=30)
    parser.add_argument("--pool", type=int, default=0,
                        help="serve the bursts from pools: of this many for starts, of --ssh-starts for ssh")
    parser.add_argument("--only", default="starts,clients,ssh")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sections = set(args.only.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="burstbench-"))
    spec = tmp / "specs" / "k"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"] if args.kernel == "ipykernel" \
        else [sys.executable, str(REPO / "bench" / "minikernel.py"), "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "k", "language": "python"}))
    # ipykernel prints the token; the minikernel echoes the code back as its execute_result.
    code = "print('{token}')" if args.kernel == "ipykernel" else "{token}"
    gw = GatewayProcess(gateway_config(tmp))
    client = gw.client
    results: dict[str, Any] = {"kernel": args.kernel}
    ok = True
    ids: list[str] = []
    try:
        if "starts" in sections:
            cold = None
            if args.pool:
                cold = single_start(client, "k")
                gw = pooled_gateway(gw, tmp, args.pool)
                client = gw.client
            results["starts"] = figures = starts_figures(client, "k", args.starts, cold)
            figures["pool"] = args.pool
            ok &= not figures["errors"]
            print(f"starts: single {figures['single_median_s']:.2f}s; {figures['succeeded']}/{args.starts} at once, "
                  f"median {figures['burst_median_s'] or 0:.2f}s, p90 {figures['burst_p90_s']:.2f}s "
                  f"({figures['p90_over_single']:.1f} x single)", flush=True)
        if "clients" in sections:
            ids = [timed_start(client, "k")[0] for _ in range(args.kernels)]
            outcomes: list[dict[str, Any]] = []
            errors = []
            barrier = threading.Barrier(args.clients)

            def run(number: int) -> None:
                barrier.wait()
                try:
                    outcomes.append(client_run(client, ids[number % len(ids)], number, args.executes, code))
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")

            began = time.monotonic()
            in_threads(run, [(n,) for n in range(args.clients)], 900)
            wall = time.monotonic() - began
            lost = sum(o["lost"] for o in outcomes) + args.executes * (args.clients - len(outcomes))
            misrouted = sum(o["misrouted"] for o in outcomes)
            latencies = [x for o in outcomes for x in o["latencies"]]
            ok &= not errors and lost == 0 and misrouted == 0
            results["clients"] = {"clients": args.clients, "kernels": args.kernels, "executes": args.executes,
                                  "errors": errors[:5], "lost": lost, "misrouted": misrouted, "wall_s": wall,
                                  "median_ms": 1000 * statistics.median(latencies),
                                  "p99_ms": 1000 * percentile(latencies, 0.99)}
            print(f"clients: {args.clients} x {args.executes} executes over {args.kernels} kernels in {wall:.1f}s: "
                  f"{lost} lost, {misrouted} misrouted, median {results['clients']['median_ms']:.1f} ms, p99 "
                  f"{results['clients']['p99_ms']:.1f} ms", flush=True)
    except Exception as exc:
        print(f"burstbench failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        for kernel_id in ids:
            client.delete_kernel(kernel_id)
        gw.stop(timeout=120)
    if "ssh" in sections:
        try:
            results["ssh"] = ssh_burst(args.ssh_starts, tmp, args.ssh_starts if args.pool else 0)
        except Exception as exc:
            print(f"burstbench failed (ssh): {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        ok &= not results["ssh"]["errors"]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
