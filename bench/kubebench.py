#!/usr/bin/env python3
"""kubebench -- egd's kubernetes driver on a real cluster (the one tests/kubecluster.py starts: etcd,
kube-apiserver, controller-manager, scheduler, a kubelet with containerd, kwok).

One command, from the repository root, as root (builds the Kubernetes binaries and images on first use, like the
tests)::

    python bench/kubebench.py --json out.json

Sections
    start   start -> kernel_info through egd (POST /api/kernels, then WebSocket kernel_info_reply) of a kernel pod,
            against the bare pod measured in the same run: the same image running the same kernel command
            (ipykernel with a connection file), created through the API by this script, until (a) its container
            runs and (b) the kernel answers kernel_info to a direct ZeroMQ client (jupyter_client). Ratio =
            egd / bare (b); target <= 1.2. (a) is printed too: the pod's own floor.
    api     requests egd makes to the API server (its ``egd_driver_api_requests_total``) in a window with 1 kernel
            alive, then with ``--kernels`` alive. Target: ratio <= 1.2 (no request per kernel while they run).
    watch   the driver's watch alone with 200 pods on kwok's simulated nodes (tests/kube_scale_probe.py): its
            API requests and how long until every pod was reported Running and then deleted.

Exit status: 0 when the targets pass, 1 when one fails, 2 when the benchmark failed.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jupyter_client import BlockingKernelClient  # noqa: E402
from yarnbench import timed_start  # noqa: E402  # (this directory is on sys.path: the script's own)

from tests.conftest import GatewayProcess  # noqa: E402
from tests.kubecluster import KERNEL_IMAGE, KubeCluster  # noqa: E402
from tests.test_kubernetes import NAMESPACE, kube_settings, write_spec  # noqa: E402

_API_REQUESTS = re.compile(r'^egd_driver_api_requests_total\{driver="kubernetes"\} ([0-9.e+]+)$', re.M)


def bare_pod(cluster: KubeCluster, n: int) -> tuple[float, float]:
    """A pod of the same image running ipykernel directly (its connection file from the environment, recipe
    §3.10): seconds from create until its container runs, and until the kernel answers kernel_info."""
    conn = {"shell_port": 52001, "iopub_port": 52002, "stdin_port": 52003, "hb_port": 52004, "control_port": 52005,
            "ip": "0.0.0.0", "key": f"bench-{n}", "transport": "tcp", "signature_scheme": "hmac-sha256",
            "kernel_name": ""}
    launch = ("import os; open('/tmp/k.json','w').write(os.environ['CONN']); "
              "os.execvp('python3', ['python3', '-m', 'ipykernel_launcher', '-f', '/tmp/k.json'])")
    name = f"bare-{n}"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": "kubebench"}},
           "spec": {"nodeSelector": {"type": "real"}, "restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                    "automountServiceAccountToken": False, "enableServiceLinks": False,
                    "securityContext": {"runAsUser": 1000, "runAsGroup": 100},
                    "containers": [{"name": "kernel", "image": KERNEL_IMAGE, "imagePullPolicy": "Never",
                                    "command": ["python3", "-c", launch],
                                    "env": [{"name": "CONN", "value": json.dumps(conn)},
                                            {"name": "HOME", "value": "/tmp"}]}]}}
    started = time.monotonic()
    status, body = cluster.request("POST", f"/api/v1/namespaces/{NAMESPACE}/pods", pod)
    assert status == 201, body
    while True:
        _, got = cluster.request("GET", f"/api/v1/namespaces/{NAMESPACE}/pods/{name}")
        statuses = got.get("status", {}).get("containerStatuses") or []
        if statuses and "running" in (statuses[0].get("state") or {}):
            break
        time.sleep(0.02)
    running = time.monotonic() - started
    client = BlockingKernelClient()
    client.load_connection_info(dict(conn, ip=got["status"]["podIP"]))
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
    finally:
        client.stop_channels()
    answered = time.monotonic() - started
    cluster.request("DELETE", f"/api/v1/namespaces/{NAMESPACE}/pods/{name}", {"gracePeriodSeconds": 0})
    return running, answered


def api_requests(gw: GatewayProcess) -> float:
    """egd's count of its requests to the API server so far (from /metrics)."""
    text = gw.client.request("GET", "/metrics").body.decode()
    match = _API_REQUESTS.search(text)
    assert match, "egd_driver_api_requests_total{driver=kubernetes} is not in /metrics"
    return float(match.group(1))


def main() -> int:
    """Run the sections asked for and print each figure."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="starts of each kind (default 5)")
    parser.add_argument("--kernels", type=int, default=50, help="kernels alive for the api section (default 50)")
    parser.add_argument("--window", type=float, default=60.0, help="seconds requests are counted (default 60)")
    parser.add_argument("--only", default="start,api,watch")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sections = set(args.only.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="kubebench-"))
    results: dict[str, Any] = {"reps": args.reps}
    cluster = KubeCluster(tmp)
    gw = None
    passed = True
    try:
        cluster.start()
        cluster.create_namespace(NAMESPACE)
        specs = tmp / "specs"
        write_spec(specs, "kube_python", 120)
        gw = GatewayProcess({"kernels": {"kernelspec_dirs": [str(specs)], "launch_timeout": 120},
                             "server": {"metrics_public": True},
                             "drivers": {"local": {}, "kubernetes": kube_settings(cluster)}})
        client = gw.client
        if "start" in sections:
            timed_start(client, "kube_python", 120)  # warm-up: first pod on the node, image layers cached
            bare_pod(cluster, 99)
            egd_times, running_times, answered_times = [], [], []
            for n in range(args.reps):
                running, answered = bare_pod(cluster, n)
                running_times.append(running)
                answered_times.append(answered)
                kernel_id, seconds = timed_start(client, "kube_python", 120)
                egd_times.append(seconds)
                client.delete_kernel(kernel_id)
            egd_median = statistics.median(egd_times)
            bare_median = statistics.median(answered_times)
            ratio = egd_median / bare_median
            results["start"] = {"egd_s": egd_times, "bare_running_s": running_times,
                                "bare_kernel_info_s": answered_times, "egd_median_s": egd_median,
                                "bare_kernel_info_median_s": bare_median,
                                "bare_running_median_s": statistics.median(running_times), "ratio": ratio,
                                "pass": ratio <= 1.2}
            passed &= ratio <= 1.2
            print(f"start: egd {egd_median:.2f}s, bare pod {bare_median:.2f}s to kernel_info "
                  f"({statistics.median(running_times):.2f}s to a running container), ratio {ratio:.2f}",
                  flush=True)
        if "api" in sections:
            ids = [client.start_kernel("kube_python")]
            time.sleep(2)
            before = api_requests(gw)
            time.sleep(args.window)
            one = api_requests(gw) - before
            for _ in range(args.kernels - 1):
                ids.append(client.start_kernel("kube_python"))
            time.sleep(2)
            before = api_requests(gw)
            time.sleep(args.window)
            many = api_requests(gw) - before
            for kernel_id in ids:
                client.delete_kernel(kernel_id)
            # No request at all in either window is the aim (the watch is one long request): 0 against 0 is 1.0.
            ratio = many / one if one else (1.0 if not many else float("inf"))
            results["api"] = {"window_s": args.window, "requests_1": one, f"requests_{args.kernels}": many,
                              "ratio": ratio, "pass": ratio <= 1.2}
            passed &= ratio <= 1.2
            print(f"api: {one:.0f} API requests in {args.window:g}s with 1 kernel, {many:.0f} with {args.kernels} "
                  f"(ratio {ratio:.2f})", flush=True)
        if "watch" in sections:
            cluster.add_kwok_nodes(2)
            cluster.create_namespace("egd-scale")
            out = subprocess.run([sys.executable, "-m", "tests.kube_scale_probe", "--kubeconfig",
                                  str(cluster.kubeconfig), "--namespace", "egd-scale", "--pods", "200"],
                                 cwd=REPO, capture_output=True, text=True, timeout=600, check=True)
            results["watch"] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"watch: {results['watch']}", flush=True)
    except Exception as exc:
        print(f"kubebench failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        if gw is not None:
            gw.stop()
        cluster.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
