#!/usr/bin/env python3
"""scalebench -- hundreds of kernels on one egd: what each costs the gateway, and whether it stays quick.

One command, from the repository root::

    python bench/scalebench.py --json out.json          # N = 100, 250, 500
    python bench/scalebench.py --steps 100 --ipykernel  # real ipykernels, as many as fit

egd runs with its ``local`` driver and a kernelspec of ``bench/minikernel.py`` (pyzmq only, ~15 MiB per
process, so 500 fit on 24 GiB; ``--ipykernel`` uses ipykernel instead). The kernels are started 10 at a time
until N are alive; then, at each N:

    rss         the gateway's RSS (VmRSS), and per kernel: (RSS at N - RSS with none) / N
    idle CPU    the gateway's CPU (utime + stime from /proc) over ``--idle`` seconds with N idle kernels, as % of
                one core (heartbeats included: ``kernels.heartbeat_interval`` as configured, default 3 s)
    list        GET /api/kernels with N kernels: median of 20
    start       POST -> kernel_info over the WebSocket of one more kernel (then deleted): median of 5; N=1 is the
                reference
    busy few    4 clients each doing 50 execute round trips on its own kernel while the N others sit idle:
                median and p99 latency

Targets (issue 15): idle CPU < 2 % of a core at 500, <= 0.5 MiB of gateway memory per kernel, listing < 50 ms,
start latency at 500 within 1.5 times N=1. Exit status 0 when they pass, 1 when one misses, 2 on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.client import GatewayClient  # noqa: E402
from tests.conftest import GatewayProcess  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (seconds)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def timed_start(client: GatewayClient, spec: str) -> tuple[str, float]:
    """(kernel id, seconds from POST to kernel_info_reply over the WebSocket)."""
    began = time.perf_counter()
    kernel_id = client.start_kernel(spec)
    sock = client.connect(kernel_id)
    try:
        sock.wait_for(sock.request("kernel_info_request", {}), 60)
    finally:
        sock.close()
    return kernel_id, time.perf_counter() - began


def in_threads(target: Callable[..., None], arguments: list[tuple[Any, ...]], timeout: float | None = None) -> None:
    """Run ``target(*args)`` for each of ``arguments`` in a thread of its own, all at once; wait for them."""
    threads = [threading.Thread(target=target, args=args) for args in arguments]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)


def start_many(client: GatewayClient, spec: str, count: int, parallel: int = 10) -> list[str]:
    """Start ``count`` kernels, ``parallel`` at a time; their ids."""
    ids: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()
    left = [count]

    def worker() -> None:
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            try:
                kernel_id = client.start_kernel(spec)
            except Exception as exc:  # recorded; the others go on
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                ids.append(kernel_id)

    in_threads(worker, [()] * parallel)
    if errors:
        raise RuntimeError(f"{len(errors)} of {count} starts failed: {errors[:3]}")
    return ids


def busy_few(client: GatewayClient, ids: list[str], clients: int = 4, executes: int = 50) -> list[float]:
    """``clients`` clients, each executing ``executes`` times on its own kernel at once: every latency (s)."""
    latencies: list[float] = []
    errors: list[str] = []

    def run(kernel_id: str) -> None:
        sock = client.connect(kernel_id)
        try:
            for _ in range(executes):
                began = time.perf_counter()
                sock.execute("1")
                latencies.append(time.perf_counter() - began)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            sock.close()

    in_threads(run, [(k,) for k in ids[:clients]])
    if errors:
        raise RuntimeError(f"busy clients failed: {errors[:3]}")
    return latencies


def measure(gw: GatewayProcess, client: GatewayClient, spec: str, n: int, base_rss: int, idle: float,
            ids: list[str]) -> dict[str, Any]:
    """The figures with ``n`` kernels alive (``ids``)."""
    time.sleep(2)  # the starts' own work has settled
    rss = rss_kib(gw.proc.pid)
    cpu0, t0 = cpu_seconds(gw.proc.pid), time.monotonic()
    time.sleep(idle)
    idle_cpu = 100 * (cpu_seconds(gw.proc.pid) - cpu0) / (time.monotonic() - t0)
    listings = []
    for _ in range(20):
        began = time.perf_counter()
        resp = client.request("GET", "/api/kernels")
        listings.append(time.perf_counter() - began)
        assert resp.status == 200 and len(resp.json) >= n, (resp.status, len(resp.json))
    starts = []
    for _ in range(5):
        kernel_id, seconds = timed_start(client, spec)
        starts.append(seconds)
        client.delete_kernel(kernel_id)
    latencies = busy_few(client, ids) if ids else []
    result = {
        "kernels": n, "rss_kib": rss, "rss_per_kernel_mib": (rss - base_rss) / 1024 / n if n else None,
        "idle_cpu_percent": idle_cpu, "list_median_ms": 1000 * statistics.median(listings),
        "list_max_ms": 1000 * max(listings), "start_median_s": statistics.median(starts), "start_s": starts,
        "busy_median_ms": 1000 * statistics.median(latencies) if latencies else None,
        "busy_p99_ms": 1000 * percentile(latencies, 0.99) if latencies else None,
    }
    print(f"N={n}: RSS {rss / 1024:.0f} MiB ({result['rss_per_kernel_mib'] or 0:.3f} MiB/kernel), idle CPU "
          f"{idle_cpu:.2f}% of a core, list {result['list_median_ms']:.1f} ms (max {result['list_max_ms']:.1f}), "
          f"start {result['start_median_s']:.3f} s, 4 busy clients {result['busy_median_ms'] or 0:.1f} / "
          f"p99 {result['busy_p99_ms'] or 0:.1f} ms", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default="100,250,500", help="kernel counts (default 100,250,500)")
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of idle CPU measurement (default 20)")
    parser.add_argument("--ipykernel", action="store_true", help="real ipykernels instead of minikernel")
    parser.add_argument("--heartbeat", type=float, default=3.0, help="kernels.heartbeat_interval (default 3)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="scalebench-"))
    spec_dir = tmp / "specs" / "mini"
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"] if args.ipykernel else \
        [sys.executable, str(REPO / "bench" / "minikernel.py"), "-f", "{connection_file}"]
    (spec_dir / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "mini", "language": "text"}))
    gw = GatewayProcess({"kernels": {"kernelspec_dirs": [str(tmp / "specs")], "default_kernel_name": "mini",
                                     "heartbeat_interval": args.heartbeat, "launch_timeout": 120},
                         "logging": {"level": "info"}, "server": {"max_connections": 4000}})
    client = gw.client
    results: dict[str, Any] = {"kernel": "ipykernel" if args.ipykernel else "minikernel", "steps": []}
    ids: list[str] = []
    try:
        time.sleep(1)
        base_rss = rss_kib(gw.proc.pid)
        results["base_rss_kib"] = base_rss
        ids = start_many(client, "mini", 1)
        results["one"] = measure(gw, client, "mini", 1, base_rss, args.idle, ids)
        for n in steps:
            ids += start_many(client, "mini", n - len(ids))
            results["steps"].append(measure(gw, client, "mini", n, base_rss, args.idle, ids))
    except Exception as exc:
        print(f"scalebench failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        began = time.monotonic()
        for kernel_id in ids:
            client.delete_kernel(kernel_id)
        results["delete_all_s"] = time.monotonic() - began
        gw.stop(timeout=120)
    last = results["steps"][-1]
    one = results["one"]
    checks = {
        "idle_cpu_percent < 2": last["idle_cpu_percent"] < 2,
        "rss_per_kernel_mib <= 0.5": last["rss_per_kernel_mib"] <= 0.5,
        "list_median_ms < 50": last["list_median_ms"] < 50,
        "start at N <= 1.5 x start at 1": last["start_median_s"] <= 1.5 * one["start_median_s"],
    }
    results["checks"] = checks
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name} (N={last['kernels']})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
