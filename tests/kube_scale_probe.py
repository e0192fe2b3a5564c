"""The kubernetes driver's pod watch under load, in a process of its own (run by tests/test_kube_scale.py and
bench/kubebench.py): ``python -m tests.kube_scale_probe --kubeconfig K --namespace N --pods 200``.

It runs the driver's own :class:`egd.drivers.kube_watch.PodWatcher` and :class:`egd.drivers.kube_api.KubeAPI` on a
real reactor, creates ``--pods`` kernel-labelled pods on kwok's simulated nodes (a separate API client, so that
the watch's requests are counted alone), waits until the watch has reported every one Running, deletes them and
waits until the watch has reported every deletion. Prints one JSON object: the watch's requests (lists, watch
requests), the events it delivered, and the seconds each phase took.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from twisted.internet import defer, task
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.logger import globalLogBeginner, textFileLogObserver

from egd.drivers.kube_api import KubeAPI, load_kubeconfig
from egd.drivers.kube_watch import PodWatcher

LABEL = "egd.jupyter.org/driver"


def pod(name: str, label: str) -> dict[str, Any]:
    """A kernel-labelled pod for kwok's nodes (nothing runs: kwok only sets its status)."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {LABEL: label, "egd.jupyter.org/kernel-id": name}},
            "spec": {"nodeSelector": {"type": "kwok"}, "terminationGracePeriodSeconds": 0,
                     "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}],
                     "containers": [{"name": "kernel", "image": "localhost/egd-kernel:test"}]}}


async def run(reactor: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Create, follow and delete the pods; the figures."""
    credentials = load_kubeconfig(args.kubeconfig)
    watch_api = KubeAPI(reactor, credentials)
    client = KubeAPI(reactor, credentials)
    events: dict[str, int] = {"ADDED": 0, "MODIFIED": 0, "DELETED": 0}
    running: set[str] = set()
    deleted: set[str] = set()

    def on_pod(kind: str, obj: dict[str, Any]) -> None:
        events[kind] = events.get(kind, 0) + 1
        name = obj["metadata"]["name"]
        if kind == "DELETED":
            deleted.add(name)
        elif (obj.get("status") or {}).get("phase") == "Running":
            running.add(name)

    watcher = PodWatcher(reactor, watch_api, f"{LABEL}={args.label}", args.namespace, on_pod)
    watcher.start()
    await watcher.synced
    names = [f"scale-{i:04d}" for i in range(args.pods)]
    limit = DeferredSemaphore(20)
    path = f"/api/v1/namespaces/{args.namespace}/pods"

    async def until(done: Any, timeout: float, what: str) -> float:
        began = time.monotonic()
        while not done():
            if time.monotonic() - began > timeout:
                raise TimeoutError(f"{what} after {timeout:g}s")
            await task.deferLater(reactor, 0.1, lambda: None)
        return time.monotonic() - began

    began = time.monotonic()
    await defer.gatherResults([limit.run(lambda n=n: Deferred.fromCoroutine(client.call("POST", path,
                                                                                        body=pod(n, args.label))))
                               for n in names], consumeErrors=True)
    created = time.monotonic() - began
    all_running = await until(lambda: running >= set(names), args.timeout, "not every pod was reported Running")
    requests_while_running = watch_api.requests
    await task.deferLater(reactor, args.hold, lambda: None)
    idle_requests = watch_api.requests - requests_while_running
    await defer.gatherResults([limit.run(lambda n=n: Deferred.fromCoroutine(client.call(
        "DELETE", f"{path}/{n}", body={"gracePeriodSeconds": 0}))) for n in names], consumeErrors=True)
    all_deleted = await until(lambda: deleted >= set(names), args.timeout, "not every deletion was reported")
    stopping = watcher.stop()
    if stopping is not None:
        await stopping
    await watch_api.close()
    await client.close()
    return {"pods": args.pods, "watch_api_requests": watch_api.requests, "lists": watcher.lists,
            "watch_requests": watcher.watches, "requests_while_held": idle_requests, "held_seconds": args.hold,
            "events": events, "create_seconds": round(created, 2), "all_running_seconds": round(all_running, 2),
            "all_deleted_seconds": round(all_deleted, 2), "client_requests": client.requests}


def main() -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--pods", type=int, default=200)
    parser.add_argument("--label", default="egdscale")
    parser.add_argument("--hold", type=float, default=5.0, help="seconds the pods stay while requests are counted")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)

    async def body(reactor: Any) -> None:
        print(json.dumps(await run(reactor, args)), flush=True)

    task.react(lambda reactor: Deferred.fromCoroutine(body(reactor)))  # exits: 0, or 1 with the traceback
    return 1


if __name__ == "__main__":
    sys.exit(main())
