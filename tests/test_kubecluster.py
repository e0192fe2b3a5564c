"""The Kubernetes test cluster itself (tests/kubecluster.py): a real kernel pod reached from the host, a kwok pod,
RBAC of a ServiceAccount token, and a host left as it was found."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from typing import Any

import pytest
import yaml
from jupyter_client import BlockingKernelClient

from tests import kubecluster
from tests.hoststate import HostState
from tests.kubecluster import KubeCluster
from tests.procs import cmdline

pytestmark = pytest.mark.kubernetes


def _pod(name: str, node_type: str, image: str, command: list[str] | None = None,
         env: dict[str, str] | None = None) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "main", "image": image, "imagePullPolicy": "Never"}
    if command:
        container["command"] = command
    if env:
        container["env"] = [{"name": k, "value": v} for k, v in env.items()]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"test": "kubecluster"}},
            "spec": {"nodeSelector": {"type": node_type}, "restartPolicy": "Never",
                     "terminationGracePeriodSeconds": 1, "automountServiceAccountToken": False,
                     "containers": [container]}}


def test_host_restored_after_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cluster with a pod on its real node, stopped: sysctls, firewall, links, netns, mounts, cgroups and paths
    are as before it started (runs only while no session cluster is up: both would own the same bridges)."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if kubecluster._shared is not None:
        pytest.skip("the session's cluster is running; its own teardown compares the host with its record")
    work = kubecluster._session_root()
    before = HostState.record(work, kubecluster.EXTRA_HOST_PATHS)
    monkeypatch.setenv("EGD_K8S_NO_KERNEL_IMAGE", "1")  # the pause image is enough here; saves the 300 MB import
    cluster = kubecluster.start_cluster(kwok=False)
    try:
        name = "restore-probe"
        status, body = cluster.request("POST", "/api/v1/namespaces/default/pods",
                                       _pod(name, "real", kubecluster.PAUSE_IMAGE, ["/pause"]))
        assert status == 201, body
        pod = cluster.wait_pod_phase("default", name, {"Running"}, 90)
        assert pod["status"]["podIP"].startswith("10.245.0.")
    finally:
        cluster.stop()  # raises when its own record and the host differ
    assert kubecluster.cluster_leftovers(before, cluster.work) == []
    # A docker or podman fixture running meanwhile (not in CI, where the areas run one after another) changes the
    # host too: then only what concerns the cluster is compared (above).
    others = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
              if cmdline(pid).split(" ")[0].rsplit("/", 1)[-1] in ("dockerd", "podman", "conmon", "netavark")]
    if not others:
        assert before.differences() == []
    assert not os.path.exists(cluster.work)


def test_real_kernel_pod_reached_from_host(kube_cluster: KubeCluster) -> None:
    """An ipykernel in a pod on the real node: Running, a cell executes over ZMQ from the host to the pod IP, and
    the pod reaches a host service on the node IP (where a gateway listens for kernels calling back)."""
    if "kernel" not in kube_cluster.images:
        pytest.skip("no kernel image: tests/services/build-images.sh is missing")
    conn = {"shell_port": 52001, "iopub_port": 52002, "stdin_port": 52003, "hb_port": 52004,
            "control_port": 52005, "ip": "0.0.0.0", "key": uuid.uuid4().hex, "transport": "tcp",
            "signature_scheme": "hmac-sha256", "kernel_name": ""}
    launch = ("import os; open('/tmp/k.json','w').write(os.environ['CONN']); "
              "os.execvp('python3', ['python3', '-m', 'ipykernel_launcher', '-f', '/tmp/k.json'])")
    name = "real-kernel"
    t0 = time.monotonic()
    status, body = kube_cluster.request(
        "POST", "/api/v1/namespaces/default/pods",
        _pod(name, "real", kube_cluster.kernel_image, ["tini", "--", "python3", "-c", launch],
             {"CONN": json.dumps(conn)}))
    assert status == 201, body
    host_service = socket.socket()
    try:
        host_service.bind((kube_cluster.node_ip, 0))
        host_service.listen()
        host_service.settimeout(30)
        port = host_service.getsockname()[1]
        pod = kube_cluster.wait_pod_phase("default", name, {"Running"}, 90)
        assert pod["spec"]["nodeName"] == kube_cluster.node_name
        kc = BlockingKernelClient()
        kc.load_connection_info(dict(conn, ip=pod["status"]["podIP"]))  # type: ignore[arg-type]
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=60)
            msg_id = kc.execute(f"import socket; c = socket.create_connection(({kube_cluster.node_ip!r}, {port}), 10); "
                                "c.sendall(b'from-pod'); c.close(); print(socket.gethostname(), 6*7)")
            out = ""
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                msg = kc.get_iopub_msg(timeout=30)
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                if msg["msg_type"] == "stream":
                    out += msg["content"]["text"]
                if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                    break
            assert out.strip() == f"{name} 42"
            peer, _ = host_service.accept()
            with peer:
                assert peer.recv(100) == b"from-pod"
        finally:
            kc.stop_channels()
        print(f"real kernel pod: cell executed {time.monotonic() - t0:.2f} s after create")
    finally:
        host_service.close()
        t0 = time.monotonic()
        kube_cluster.request("DELETE", f"/api/v1/namespaces/default/pods/{name}")
        while kube_cluster.request("GET", f"/api/v1/namespaces/default/pods/{name}")[0] != 404:
            assert time.monotonic() - t0 < 30, "pod not gone 30 s after DELETE"
            time.sleep(0.1)
        print(f"real kernel pod: gone {time.monotonic() - t0:.2f} s after DELETE")


def test_kwok_pod_runs(kube_cluster: KubeCluster) -> None:
    """A pod for a kwok node is Running at once, with a simulated IP; nothing runs on the host."""
    nodes = kube_cluster.add_kwok_nodes(1)
    try:
        status, body = kube_cluster.request("POST", "/api/v1/namespaces/default/pods",
                                            _pod("kwok-kernel", "kwok", kubecluster.KERNEL_IMAGE))
        assert status == 201, body
        pod = kube_cluster.wait_pod_phase("default", "kwok-kernel", {"Running"}, 30)
        assert pod["spec"]["nodeName"] == nodes[0]
        assert pod["status"]["podIP"]
        assert [p["metadata"]["name"] for p in kube_cluster.pods("default", "test=kubecluster")] == ["kwok-kernel"]
        status, _ = kube_cluster.request("DELETE", "/api/v1/namespaces/default/pods/kwok-kernel")
        assert status == 200
    finally:
        kube_cluster.delete_kwok_nodes(nodes)


def test_service_account_kubeconfig_is_limited_by_rbac(kube_cluster: KubeCluster) -> None:
    """A ServiceAccount token may do only what a RoleBinding grants it, in that namespace only."""
    ns = "egd-rbac-test"
    kube_cluster.create_namespace(ns)
    path = kube_cluster.service_account_kubeconfig(ns, "probe")
    config = yaml.safe_load(open(path))
    token = config["users"][0]["user"]["token"]
    assert config["clusters"][0]["cluster"]["server"] == kube_cluster.api_url
    assert config["clusters"][0]["cluster"]["certificate-authority"] == kube_cluster.ca_file

    status, _ = kube_cluster.request("GET", f"/api/v1/namespaces/{ns}/pods", token=token)
    assert status == 403
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "pod-reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "probe-reads-pods"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
               "subjects": [{"kind": "ServiceAccount", "name": "probe", "namespace": ns}]}
    for kind, body in (("roles", role), ("rolebindings", binding)):
        status, answer = kube_cluster.request("POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/{kind}",
                                              body)
        assert status == 201, answer
    deadline = time.monotonic() + 10  # the authorizer's cache follows the binding within moments
    while (status := kube_cluster.request("GET", f"/api/v1/namespaces/{ns}/pods", token=token)[0]) != 200:
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    assert kube_cluster.request("GET", "/api/v1/namespaces/default/pods", token=token)[0] == 403
    assert kube_cluster.request("GET", f"/api/v1/namespaces/{ns}/secrets", token=token)[0] == 403
    status, _ = kube_cluster.request("POST", f"/api/v1/namespaces/{ns}/pods",
                                     _pod("not-allowed", "kwok", kubecluster.KERNEL_IMAGE), token=token)
    assert status == 403
    assert kube_cluster.request("DELETE", f"/api/v1/namespaces/{ns}")[0] == 200


def test_startup_times(kube_cluster: KubeCluster) -> None:
    """Every part that started says how long it took (shown with -s; the lead's report uses them)."""
    print("startup times (s):", kube_cluster.timings)
    assert {"certs", "etcd", "apiserver", "controllers"} <= set(kube_cluster.timings)
