#!/usr/bin/env python3
"""poolbench -- start -> kernel_info from a warm kernel pool against a cold start, in the same run.

    python bench/poolbench.py [--reps 10] [--json out.json]

One egd with ``kernels.pools: {python3: 2}``; each repetition times, through the same WebSocket client, a start
that the pool serves (POST /api/kernels with KERNEL_USERNAME only, then kernel_info_reply on the kernel's
WebSocket) and a cold start of the same kernelspec (a request variable the pool cannot serve forces a fresh
launch), then deletes both and waits for the pool to refill. Target: pooled start <= 50 ms (median).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.client import GatewayClient  # noqa: E402
from tests.conftest import GatewayProcess, wait_until  # noqa: E402


def timed_start(client: GatewayClient, env: dict[str, str]) -> tuple[str, float]:
    """(kernel id, seconds from POST to kernel_info_reply on its WebSocket)."""
    started = time.monotonic()
    kernel_id = client.start_kernel(env=env)
    sock = client.connect(kernel_id)
    sock.wait_for(sock.request("kernel_info_request", {}), 30)
    elapsed = time.monotonic() - started
    sock.close()
    return kernel_id, elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    gw = GatewayProcess({"kernels": {"pools": {"python3": 2}}, "logging": {"level": "info"}})
    pooled: list[float] = []
    cold: list[float] = []
    try:
        for rep in range(args.reps):
            wait_until(lambda n=2 + rep: gw.log().count("pool python3: kernel") >= n, 60, 0.05,
                       what="the pool to be full")
            time.sleep(0.5)  # let the refill's kernels settle: the pooled start should not compete with them
            warm_id, seconds = timed_start(gw.client, {"KERNEL_USERNAME": "bench"})
            pooled.append(seconds)
            cold_id, seconds = timed_start(gw.client, {"KERNEL_USERNAME": "bench", "KERNEL_BENCH": "cold"})
            cold.append(seconds)
            for kernel_id in (warm_id, cold_id):
                gw.client.delete_kernel(kernel_id)
        assert gw.log().count("from the pool for") == args.reps, "every warm start must come from the pool"
    finally:
        gw.stop()
    result = {"pooled_s": pooled, "cold_s": cold, "pooled_median_ms": 1000 * statistics.median(pooled),
              "cold_median_ms": 1000 * statistics.median(cold)}
    result["ratio"] = result["pooled_median_ms"] / result["cold_median_ms"]
    result["pass"] = result["pooled_median_ms"] <= 50
    print(f"start -> kernel_info: pooled {result['pooled_median_ms']:.1f} ms, cold {result['cold_median_ms']:.0f} ms "
          f"(ratio {result['ratio']:.3f}; target pooled <= 50 ms: {'PASS' if result['pass'] else 'FAIL'})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
