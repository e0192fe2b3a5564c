#!/usr/bin/env python3
"""yarnbench -- egd's yarn driver on a real MiniYARNCluster (the one tests/yarncluster.py starts).

One command, from the repository root (fetches the YARN jars on first use, like the tests)::

    python bench/yarnbench.py --json out.json

Sections
    start   start -> kernel_info through egd (POST /api/kernels, then WebSocket kernel_info_reply) for plain
            kernels (DistributedShell AM) and Spark kernels (cluster mode), against the floor YARN itself
            sets in the same run: a bare DistributedShell application running ``sleep`` submitted over REST
            until RUNNING, and ``spark-submit`` of a three-line PySpark program until its SparkSession
            exists (the application is RUNNING). Ratio = egd / floor.
    lazy    Spark kernels with one executor, ``spark_session: lazy`` and ``eager``, against a bare ``spark-submit``
            (cluster mode) of a program that marks when its driver runs, when its SparkSession exists and when
            its first job (the sum of ``range(1000)``) has a result, all in the same run. Measured: POST ->
            kernel_info (lazy, eager) and POST -> first Spark result (lazy: the same job as the first use).
            Targets (issue 17): lazy kernel_info <= 1.1 x the bare driver start; lazy first result <= 1.05 x
            the bare SparkSession (also shown against the bare first result, like for like).
    rm      ResourceManager requests per poll interval made by egd with 1 and then 10 plain kernels alive,
            counted by an HTTP proxy between egd and the RM. Target: independent of the number of kernels
            (ratio 10 kernels / 1 kernel <= 1.2). Enterprise Gateway polls once per kernel every 3 s, i.e.
            10 requests per 3 s with 10 kernels (from its code, not measured here).

Exit status: 0 when the target passes, 1 when it fails, 2 when the benchmark failed.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.client import GatewayClient  # noqa: E402
from tests.conftest import GatewayProcess, wait_until  # noqa: E402
from tests.test_spark import SUM  # noqa: E402
from tests.test_yarn import write_spec, yarn_settings  # noqa: E402
from tests.test_yarncluster import SPARK_PROGRAM  # noqa: E402
from tests.yarncluster import YarnCluster, ds_submission, spark_submit  # noqa: E402


class CountingProxy(http.server.ThreadingHTTPServer):
    """Forwards every request to the RM and counts them (by method and path)."""

    def __init__(self, target: str) -> None:
        self.target = urllib.parse.urlsplit(target)
        self.counts: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def count_since(self, since: float, path_prefix: str = "/ws/v1/cluster/apps") -> int:
        """Requests for ``path_prefix`` (GETs) since ``since`` (monotonic)."""
        with self.lock:
            return sum(1 for t, what in self.counts if t >= since and what.startswith(f"GET {path_prefix}"))


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: CountingProxy

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _forward(self) -> None:
        with self.server.lock:
            self.server.counts.append((time.monotonic(), f"{self.command} {self.path}"))
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        conn = http.client.HTTPConnection(self.server.target.hostname or "127.0.0.1", self.server.target.port,
                                          timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for key, value in resp.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        conn.close()

    do_GET = do_POST = do_PUT = do_DELETE = _forward


def timed_start(client: GatewayClient, spec: str, timeout: float) -> tuple[str, float]:
    """(kernel id, seconds from POST to kernel_info_reply over the WebSocket)."""
    started = time.monotonic()
    kernel_id = client.start_kernel(spec)
    sock = client.connect(kernel_id, timeout=timeout)
    sock.wait_for(sock.request("kernel_info_request", {}), timeout)
    sock.close()
    return kernel_id, time.monotonic() - started


def floor_plain(cluster: YarnCluster, tmp: Path, n: int) -> float:
    """A bare DistributedShell application over REST: from submission until its script runs."""
    work = tmp / f"floor-plain-{n}"
    work.mkdir(parents=True)
    marker = work / "started"
    script = work / "launch.sh"
    script.write_text(f"#!/bin/sh\ntouch {marker}\nexec sleep 600\n")
    started = time.monotonic()
    app_id = cluster.new_application()
    cluster.submit(ds_submission(cluster, app_id, f"floor-{n}", script, tags=["yarnbench"]))
    wait_until(marker.exists, 120, 0.02, what="the bare DS app's script to run")
    elapsed = time.monotonic() - started
    cluster.kill(app_id)
    return elapsed


def floor_spark(cluster: YarnCluster, tmp: Path, n: int) -> float:
    """``spark-submit`` (cluster mode) of a PySpark program: until its SparkSession exists."""
    work = tmp / f"floor-spark-{n}"
    work.mkdir(parents=True)
    program = work / "sleeper.py"
    program.write_text(SPARK_PROGRAM)
    marker = work / "app-id"
    argv, env = spark_submit(cluster, program, f"floor-spark-{n}", tags=[f"yarnbench-{n}"], args=[str(marker)])
    started = time.monotonic()
    subprocess.run(argv, env=env, cwd=work, capture_output=True, check=True, timeout=180)
    wait_until(lambda: marker.exists() and marker.read_text(), 240, 0.05, what="the bare Spark app's SparkSession")
    elapsed = time.monotonic() - started
    cluster.kill(marker.read_text().strip())
    return elapsed


#: The bare Spark driver of the lazy section: a marker file per stage (``<argv[1]>.driver``, ``.session``, ``.result``).
STAGED_PROGRAM = """\
import sys, time
open(sys.argv[1] + ".driver", "w").close()
from pyspark.sql import SparkSession
spark = SparkSession.builder.getOrCreate()
with open(sys.argv[1] + ".session", "w") as handle:
    handle.write(spark.sparkContext.applicationId)
spark.range(1000).groupBy().sum("id").first()
open(sys.argv[1] + ".result", "w").close()
time.sleep(600)
"""
STAGES = ("driver", "session", "result")


def bare_stages(cluster: YarnCluster, tmp: Path, n: int) -> dict[str, float]:
    """``spark-submit`` of :data:`STAGED_PROGRAM` with one executor: seconds until each stage's marker."""
    work = tmp / f"bare-stages-{n}"
    work.mkdir(parents=True)
    program = work / "staged.py"
    program.write_text(STAGED_PROGRAM)
    marker = work / "mark"
    argv, env = spark_submit(cluster, program, f"bare-stages-{n}", tags=[f"yarnbench-stages-{n}"],
                             args=[str(marker)], executors=1)
    started = time.monotonic()
    subprocess.run(argv, env=env, cwd=work, capture_output=True, check=True, timeout=180)
    seen: dict[str, float] = {}

    def all_seen() -> bool:
        for stage in STAGES:
            if stage not in seen and Path(f"{marker}.{stage}").exists():
                seen[stage] = time.monotonic() - started
        return len(seen) == len(STAGES)

    wait_until(all_seen, 240, 0.02, what="the bare Spark driver's stages")
    cluster.kill(Path(f"{marker}.session").read_text().strip())
    return seen


def egd_stages(client: GatewayClient, spec: str, first_use: bool) -> dict[str, float]:
    """POST -> kernel_info and, with ``first_use``, POST -> the result of the first Spark job (seconds)."""
    started = time.monotonic()
    kernel_id = client.start_kernel(spec)
    sock = client.connect(kernel_id, timeout=300)
    try:
        sock.wait_for(sock.request("kernel_info_request", {}), 300)
        times = {"kernel_info": time.monotonic() - started}
        if first_use:
            run = sock.execute(SUM, timeout=300)
            if not run.stdout.startswith("499500"):
                raise RuntimeError(f"the first Spark job did not answer 499500: {run.reply['content']}")
            times["first_result"] = time.monotonic() - started
    finally:
        sock.close()
        client.delete_kernel(kernel_id)
    return times


def lazy_section(client: GatewayClient, cluster: YarnCluster, tmp: Path, reps: int) -> dict[str, Any]:
    """The lazy section (see the module's docstring); reps interleaved bare, lazy, eager."""
    runs: dict[str, list[dict[str, float]]] = {"bare": [], "lazy": [], "eager": []}
    for n in range(reps):
        runs["bare"].append(bare_stages(cluster, tmp, n))
        runs["lazy"].append(egd_stages(client, "yarn_spark_lazy", True))
        runs["eager"].append(egd_stages(client, "yarn_spark_eager", False))

    def median(kind: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[kind])

    result: dict[str, Any] = {"runs": runs}
    result.update({f"bare_{stage}_median_s": median("bare", stage) for stage in STAGES})
    result.update(lazy_kernel_info_median_s=median("lazy", "kernel_info"),
                  lazy_first_result_median_s=median("lazy", "first_result"),
                  eager_kernel_info_median_s=median("eager", "kernel_info"))
    result["ratio_kernel_info_to_driver"] = result["lazy_kernel_info_median_s"] / result["bare_driver_median_s"]
    result["ratio_first_result_to_session"] = result["lazy_first_result_median_s"] / result["bare_session_median_s"]
    result["ratio_first_result_to_result"] = result["lazy_first_result_median_s"] / result["bare_result_median_s"]
    result["pass"] = result["ratio_kernel_info_to_driver"] <= 1.1 and result["ratio_first_result_to_session"] <= 1.05
    print(f"lazy: bare driver {result['bare_driver_median_s']:.2f}s, session {result['bare_session_median_s']:.2f}s, "
          f"first result {result['bare_result_median_s']:.2f}s; egd lazy kernel_info "
          f"{result['lazy_kernel_info_median_s']:.2f}s (x{result['ratio_kernel_info_to_driver']:.2f} the driver), "
          f"first result {result['lazy_first_result_median_s']:.2f}s (x{result['ratio_first_result_to_session']:.2f} "
          f"the bare session, x{result['ratio_first_result_to_result']:.2f} its first result); egd eager "
          f"kernel_info {result['eager_kernel_info_median_s']:.2f}s", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="starts per kind (default 3)")
    parser.add_argument("--kernels", type=int, default=10, help="kernels alive for the rm section (default 10)")
    parser.add_argument("--window", type=float, default=20.0, help="seconds requests are counted (default 20)")
    parser.add_argument("--poll-interval", type=float, default=2.0)
    parser.add_argument("--only", default="start,lazy,rm")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sections = set(args.only.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="yarnbench-"))
    results: dict[str, Any] = {"reps": args.reps, "poll_interval": args.poll_interval}
    (tmp / "yarn").mkdir()
    cluster = YarnCluster(tmp / "yarn")
    gw = None
    proxy = None
    try:
        cluster.start()
        proxy = CountingProxy(cluster.rm_url)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        specs = tmp / "specs"
        write_spec(specs, "yarn_python", 180, mode="python", memory="256m")
        write_spec(specs, "yarn_spark", 300, mode="spark")
        for mode in ("lazy", "eager"):
            write_spec(specs, f"yarn_spark_{mode}", 300, mode="spark", spark_session=mode, num_executors=1,
                       max_executors=1)
        settings = yarn_settings(cluster, tmp, poll_interval=args.poll_interval)
        settings["resource_managers"] = [proxy.url]
        gw = GatewayProcess({"kernels": {"kernelspec_dirs": [str(specs)], "max_launch_timeout": 300,
                                         "launch_timeout": 180},
                             "logging": {"level": "info"}, "drivers": {"local": {}, "yarn": settings}})
        client = gw.client
        if "start" in sections:
            for kind, floor in (("plain", floor_plain), ("spark", floor_spark)):
                spec = "yarn_python" if kind == "plain" else "yarn_spark"
                egd_times, floor_times = [], []
                for n in range(args.reps):
                    floor_times.append(floor(cluster, tmp, n))
                    kernel_id, seconds = timed_start(client, spec, 300)
                    egd_times.append(seconds)
                    client.delete_kernel(kernel_id)
                egd_median, floor_median = statistics.median(egd_times), statistics.median(floor_times)
                results[f"start_{kind}"] = {"egd_s": egd_times, "floor_s": floor_times, "egd_median_s": egd_median,
                                            "floor_median_s": floor_median, "ratio": egd_median / floor_median}
                print(f"start {kind}: egd {egd_median:.2f}s, YARN floor {floor_median:.2f}s, "
                      f"ratio {egd_median / floor_median:.2f}", flush=True)
        if "lazy" in sections:
            results["lazy"] = lazy_section(client, cluster, tmp, args.reps)
        if "rm" in sections:
            ids = [client.start_kernel("yarn_python")]
            time.sleep(2 * args.poll_interval)
            since = time.monotonic()
            time.sleep(args.window)
            one = proxy.count_since(since) / (args.window / args.poll_interval)
            for _ in range(args.kernels - 1):
                ids.append(client.start_kernel("yarn_python"))
            time.sleep(2 * args.poll_interval)
            since = time.monotonic()
            time.sleep(args.window)
            many = proxy.count_since(since) / (args.window / args.poll_interval)
            for kernel_id in ids:
                client.delete_kernel(kernel_id)
            ratio = many / one if one else float("inf")
            results["rm"] = {"per_interval_1": one, f"per_interval_{args.kernels}": many, "ratio": ratio,
                             "eg_model_per_interval": args.kernels * args.poll_interval / 3.0, "pass": ratio <= 1.2}
            print(f"rm: {one:.2f} requests per {args.poll_interval:g}s interval with 1 kernel, {many:.2f} with "
                  f"{args.kernels} (ratio {ratio:.2f}; EG would make {args.kernels * args.poll_interval / 3:.1f})",
                  flush=True)
    except Exception as exc:
        print(f"yarnbench failed: {exc}", file=sys.stderr)
        return 2
    finally:
        if gw is not None:
            gw.stop()
        if proxy is not None:
            proxy.shutdown()
        cluster.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    passed = all(results.get(section, {}).get("pass", True) for section in ("rm", "lazy"))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
