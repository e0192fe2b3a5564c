"""Kernels as pods on a real Kubernetes (tests/kubecluster.py: etcd, kube-apiserver, controller-manager,
scheduler, a kubelet with containerd running real pods, and kwok's simulated nodes).

Pods, Secrets and namespaces are read back from the API server itself; the kernel image is Debian with
python3-ipykernel only: egd's launcher reaches each pod in its Secret.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.client import BackgroundStart, GatewayClient
from tests.conftest import KERNELSPECS, GatewayProcess, wait_until
from tests.kubecluster import KERNEL_IMAGE, KubeCluster
from tests.test_lifecycle import interrupt_sleep, statuses_until

pytestmark = pytest.mark.kubernetes

NAMESPACE = "egd-kernels"
SELECTOR = "egd.jupyter.org/driver=egdtest"
POD = re.compile(r"pod ([a-z0-9-]+)/(kernel-[a-z0-9-]+)")


def write_spec(root: Path, name: str, timeout: int, **config: Any) -> None:
    """A kernelspec for the kubernetes driver: plain ipykernel in the test image, on the real node."""
    (root / name).mkdir(parents=True, exist_ok=True)
    config.setdefault("image", KERNEL_IMAGE)
    config.setdefault("pod_template", {"spec": {"nodeSelector": {"type": "real"},
                                                "containers": [{"name": "kernel", "imagePullPolicy": "Never"}]}})
    spec = {"argv": ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"], "display_name": name,
            "language": "python", "env": {"HOME": "/tmp"},
            "metadata": {"egd": {"driver": "kubernetes", "launch_timeout": timeout, "config": config}}}
    (root / name / "kernel.json").write_text(json.dumps(spec))


def kube_settings(cluster: KubeCluster, **extra: Any) -> dict[str, Any]:
    """The driver's settings for the test cluster: pods call back to the node's address."""
    return {"kubeconfig": str(cluster.kubeconfig), "namespace": NAMESPACE, "label": "egdtest",
            "callback_host": cluster.node_ip, "termination_grace_seconds": 2, **extra}


def kube_gateway(cluster: KubeCluster, tmp: Path, state: dict[str, Any] | None = None,
                 **extra: Any) -> GatewayProcess:
    """egd with the kubernetes driver and this module's kernelspecs."""
    specs = tmp / "specs"
    write_spec(specs, "kube_python", 90)
    write_spec(specs, "kube_huge", 8, max_cpus=1000)
    write_spec(specs, "kube_missing_image", 8, image="localhost/egd-missing:none")
    write_spec(specs, "kube_crasher", 60)
    crasher = json.loads((specs / "kube_crasher" / "kernel.json").read_text())
    crasher["argv"] = ["python3", "-c", "import sys; print('kernel-says-goodbye', file=sys.stderr); sys.exit(3)"]
    (specs / "kube_crasher" / "kernel.json").write_text(json.dumps(crasher))
    return GatewayProcess({
        "kernels": {"kernelspec_dirs": [str(KERNELSPECS), str(specs)], "launch_timeout": 90,
                    "heartbeat_interval": 1, "max_launch_timeout": 300},
        "drivers": {"local": {}, "kubernetes": kube_settings(cluster, **extra)},
        **({"state": state} if state else {}),
    })


def kernel_pods(cluster: KubeCluster, namespace: str | None = NAMESPACE) -> list[dict[str, Any]]:
    """The kernel pods of the test gateways (in ``namespace``, or everywhere)."""
    path = f"/api/v1/namespaces/{namespace}/pods" if namespace else "/api/v1/pods"
    _, data = cluster.request("GET", f"{path}?labelSelector={SELECTOR}")
    return list(data["items"])


def kernel_secrets(cluster: KubeCluster, namespace: str = NAMESPACE) -> list[str]:
    """The launch Secrets of the test gateways."""
    _, data = cluster.request("GET", f"/api/v1/namespaces/{namespace}/secrets?labelSelector={SELECTOR}")
    return [s["metadata"]["name"] for s in data["items"]]


def pod_of(client: GatewayClient, kernel_id: str) -> tuple[str, str]:
    """The namespace and name of a kernel's pod, from its model's ``location``."""
    model = client.kernel(kernel_id).json
    match = POD.search(model.get("location", ""))
    assert match, model
    return match.group(1), match.group(2)


@pytest.fixture(scope="module")
def kube(kube_cluster: KubeCluster) -> KubeCluster:
    """The cluster, with the shared kernel namespace."""
    kube_cluster.create_namespace(NAMESPACE)
    return kube_cluster


@pytest.fixture(scope="module")
def kube_gw(kube: KubeCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """egd with the kubernetes driver, shared by this module; at the end no kernel pod or Secret is left."""
    gw = kube_gateway(kube, tmp_path_factory.mktemp("kubegw"))
    yield gw
    gw.stop()
    wait_until(lambda: not kernel_pods(kube, None), 60, 0.5, what="kernel pods to be gone")
    assert not kernel_secrets(kube), "launch Secrets left behind"


@pytest.fixture
def client(kube_gw: GatewayProcess) -> GatewayClient:
    """A client of the kubernetes gateway."""
    return kube_gw.client


def test_kernel_pod_runs_code_and_is_deleted_with_its_secret(client: GatewayClient, kube: KubeCluster) -> None:
    """A kernel is a pod labelled with the driver, kernel id and user, running as uid 1000 from the plain image
    (the launcher came in its Secret); DELETE leaves no pod and no Secret."""
    kernel_id = client.start_kernel("kube_python", env={"KERNEL_USERNAME": "alice"})
    namespace, name = pod_of(client, kernel_id)
    # The kubelet's status update may come after the launcher's report: the phase is awaited, not assumed.
    pod = kube.wait_pod_phase(namespace, name, {"Running"}, 30)
    labels = pod["metadata"]["labels"]
    assert labels["egd.jupyter.org/kernel-id"] == kernel_id and labels["egd.jupyter.org/user"] == "alice"
    assert pod["spec"]["nodeName"] == "egd-node-0"
    container = pod["spec"]["containers"][0]
    assert not container.get("env"), "the kernel's environment (and secrets) must not be in the pod's spec"
    assert pod["spec"]["volumes"][-1]["secret"]["secretName"] == name and "--secrets-file" in container["command"]
    _, secret = kube.request("GET", f"/api/v1/namespaces/{namespace}/secrets/{name}")
    assert secret["metadata"]["ownerReferences"][0]["uid"] == pod["metadata"]["uid"]
    sock = client.connect(kernel_id)
    out = sock.execute("import os, socket; print(socket.gethostname(), os.getuid(), os.environ['KERNEL_USERNAME'])")
    sock.close()
    assert out.stdout.split() == [name, "1000", "alice"]
    assert kernel_secrets(kube) == [name]
    assert client.delete_kernel(kernel_id) == 204
    assert not [p for p in kernel_pods(kube) if p["metadata"]["name"] == name], "the pod outlived DELETE"
    wait_until(lambda: name not in kernel_secrets(kube), 10, what="the launch Secret to be gone")


def test_interrupt_and_restart(client: GatewayClient, kube: KubeCluster) -> None:
    """Interrupt reaches the kernel in its pod; restart gives a new pod with the same kernel id."""
    kernel_id = client.start_kernel("kube_python")
    try:
        first = pod_of(client, kernel_id)
        interrupt_sleep(client, kernel_id)
        assert client.request("POST", f"/api/kernels/{kernel_id}/restart", {}).status == 200
        sock = client.connect(kernel_id)
        assert sock.execute("survivor").reply["content"]["ename"] == "NameError"
        sock.close()
        second = pod_of(client, kernel_id)
        assert second != first, "restart kept the old pod"
        assert kube.request("GET", f"/api/v1/namespaces/{first[0]}/pods/{first[1]}")[0] == 404, "old pod left"
        assert [p["metadata"]["name"] for p in kernel_pods(kube)] == [second[1]]
    finally:
        client.delete_kernel(kernel_id)


def test_pod_deleted_from_outside_is_noticed(client: GatewayClient, kube: KubeCluster) -> None:
    """An operator deletes the kernel's pod: the watch tells egd at once, clients hear ``restarting``, and the
    kernel comes back in a new pod."""
    kernel_id = client.start_kernel("kube_python")
    try:
        namespace, name = pod_of(client, kernel_id)
        sock = client.connect(kernel_id)
        deleted_at = time.monotonic()
        kube.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}")
        assert "restarting" in statuses_until(sock, "restarting", 30)
        noticed = time.monotonic() - deleted_at
        assert noticed < 5, f"noticed after {noticed:.1f}s"
        sock.close()

        def new_pod() -> bool:
            return any(p["metadata"]["name"] != name and p["status"].get("phase") == "Running"
                       for p in kernel_pods(kube))

        wait_until(new_pod, 90, 0.5, what="the kernel's new pod")
        wait_until(lambda: client.kernel(kernel_id).json.get("execution_state") in ("idle", "busy"), 90, 0.5,
                   what="the restarted kernel")
        sock = client.connect(kernel_id)
        assert sock.execute("print(6 * 7)").stdout.strip() == "42"
        sock.close()
    finally:
        client.delete_kernel(kernel_id)


def test_unschedulable_pod_shows_its_reason_then_times_out(client: GatewayClient, kube: KubeCluster) -> None:
    """A pod asking more CPUs than any node has stays Pending: the kernel's model shows the scheduler's reason
    while the client waits; at the launch timeout the start fails with 503 naming it, and the pod is gone."""
    start = BackgroundStart(client, {"name": "kube_huge", "env": {"KERNEL_CPUS": "500"}})

    def waiting() -> str | None:
        for model in client.request("GET", "/api/kernels").json:
            if "Unschedulable" in (model.get("reason") or ""):
                return str(model["reason"])
        return None

    reason = wait_until(waiting, 30, 0.25, what="the Pending reason in the kernel model")
    assert "Insufficient cpu" in reason, reason
    resp = start.response(60)
    assert resp.status == 503, resp.json
    assert "Unschedulable" in resp.json["message"] and "Insufficient cpu" in resp.json["message"]
    wait_until(lambda: not kernel_pods(kube), 30, 0.5, what="the Pending pod to be deleted")
    assert not kernel_secrets(kube)


def test_image_the_node_lacks_is_named_in_the_503(client: GatewayClient, kube: KubeCluster) -> None:
    """An image the node does not have (and may not pull) keeps the pod Pending with the kubelet's reason, which
    the 503 at the launch timeout carries; the pod and its Secret are deleted."""
    resp = client.request("POST", "/api/kernels", {"name": "kube_missing_image"})
    assert resp.status == 503, resp.json
    assert "ErrImageNeverPull" in resp.json["message"] and "egd-missing" in resp.json["message"], resp.json
    wait_until(lambda: not kernel_pods(kube), 30, 0.5, what="the Pending pod to be deleted")
    assert not kernel_secrets(kube)


def test_kernel_that_exits_fails_the_start_with_its_words(client: GatewayClient, kube: KubeCluster) -> None:
    """A kernel that exits at once fails the start quickly (not at the launch timeout) with what it wrote; its
    pod and Secret are deleted."""
    began = time.monotonic()
    resp = client.request("POST", "/api/kernels", {"name": "kube_crasher"})
    assert resp.status == 500, resp.json
    assert "kernel-says-goodbye" in resp.json["message"], resp.json
    assert time.monotonic() - began < 45
    wait_until(lambda: not kernel_pods(kube), 30, 0.5, what="the failed kernel's pod to be deleted")
    assert not kernel_secrets(kube)


def test_allowed_namespace_is_honoured(kube: KubeCluster, tmp_path: Path) -> None:
    """KERNEL_NAMESPACE naming a namespace of allowed_namespaces puts the pod there (followed by the cluster-wide
    watch); egd does not delete that namespace."""
    kube.create_namespace("egd-team-a")
    gw = kube_gateway(kube, tmp_path, allowed_namespaces=["egd-team-a"])
    try:
        kernel_id = gw.client.start_kernel("kube_python", env={"KERNEL_NAMESPACE": "egd-team-a"})
        assert pod_of(gw.client, kernel_id)[0] == "egd-team-a"
        sock = gw.client.connect(kernel_id)
        assert sock.execute("print(6 * 7)").stdout.strip() == "42"
        sock.close()
        assert gw.client.delete_kernel(kernel_id) == 204
        assert not kernel_pods(kube, "egd-team-a")
        assert kube.request("GET", "/api/v1/namespaces/egd-team-a")[1]["status"]["phase"] == "Active"
    finally:
        gw.stop()


@pytest.mark.parametrize(("env", "status", "named"), [
    ({"KERNEL_IMAGE": "docker.io/library/python:3"}, 403, "KERNEL_IMAGE"),
    ({"KERNEL_VOLUMES": "etc-host"}, 403, "KERNEL_VOLUMES"),
    ({"KERNEL_NAMESPACE": "kube-system"}, 403, "KERNEL_NAMESPACE"),
    ({"KERNEL_UID": "0"}, 403, "KERNEL_UID"),
    ({"KERNEL_MEMORY": "1Ei"}, 400, "KERNEL_MEMORY"),
    ({"KERNEL_CPUS": "lots"}, 400, "KERNEL_CPUS"),
    ({"KERNEL_SERVICE_ACCOUNT_NAME": "admin"}, 403, "KERNEL_SERVICE_ACCOUNT_NAME"),
])
def test_refused_requests_create_nothing(client: GatewayClient, kube: KubeCluster, env: dict[str, str],
                                         status: int, named: str) -> None:
    """What the operator does not allow is refused with 400/403 naming the variable; no pod, no Secret."""
    resp = client.request("POST", "/api/kernels", {"name": "kube_python", "env": env})
    assert resp.status == status, resp.json
    assert named in resp.json["message"]
    assert not kernel_pods(kube, None) and not kernel_secrets(kube)


def test_kill_9_then_restart_reattaches_a_pod(kube: KubeCluster, tmp_path: Path) -> None:
    """egd is SIGKILLed while a kernel pod runs; the next egd with the same state finds the pod by its label
    and its launcher answering, and serves the kernel with its variables; DELETE then removes the pod."""
    state = {"path": str(tmp_path / "state.sqlite"), "on_stop": "keep"}
    first = kube_gateway(kube, tmp_path, state)
    kernel_id = first.client.start_kernel("kube_python")
    where = pod_of(first.client, kernel_id)
    sock = first.client.connect(kernel_id)
    sock.execute("w = 'kept in the pod'")
    sock.close()
    first.proc.kill()
    first.proc.wait(10)
    first.stop()
    second = kube_gateway(kube, tmp_path, {**state, "on_stop": "shutdown"})
    try:
        assert [k["id"] for k in second.client.request("GET", "/api/kernels").json] == [kernel_id]
        assert pod_of(second.client, kernel_id) == where
        sock = second.client.connect(kernel_id)
        assert sock.execute("print(w)").stdout.strip() == "kept in the pod"
        sock.close()
        assert second.client.delete_kernel(kernel_id) == 204
        assert not kernel_pods(kube)
    finally:
        second.stop()


def test_per_kernel_namespace_and_kernel_uid(kube: KubeCluster, tmp_path: Path) -> None:
    """Per-kernel namespaces: egd creates the kernel's namespace, runs the pod there as the KERNEL_UID/GID the
    user asked for (allowed here, root still refused), and deletes the namespace with the kernel."""
    gw = kube_gateway(kube, tmp_path, namespace_mode="per-kernel", namespace_prefix="egdk-", allow_uid=True)
    try:
        resp = gw.client.request("POST", "/api/kernels", {"name": "kube_python",
                                                          "env": {"KERNEL_USERNAME": "bob", "KERNEL_UID": "0"}})
        assert resp.status == 403 and "root" in resp.json["message"]
        kernel_id = gw.client.start_kernel("kube_python", env={"KERNEL_USERNAME": "bob", "KERNEL_UID": "1234",
                                                                "KERNEL_GID": "1235"})
        namespace, _ = pod_of(gw.client, kernel_id)
        assert namespace == f"egdk-{kernel_id}"
        sock = gw.client.connect(kernel_id)
        assert sock.execute("import os; print(os.getuid(), os.getgid())").stdout.split() == ["1234", "1235"]
        sock.close()
        assert gw.client.delete_kernel(kernel_id) == 204

        def namespace_gone() -> bool:
            status, data = kube.request("GET", f"/api/v1/namespaces/{namespace}")
            return status == 404 or data.get("status", {}).get("phase") == "Terminating"

        wait_until(namespace_gone, 30, 0.5, what="the kernel's namespace to be deleted")
    finally:
        gw.stop()


def test_jupyter_server_drives_a_kubernetes_kernel(kube_gw: GatewayProcess, kube: KubeCluster,
                                                   tmp_path: Path) -> None:
    """An unchanged Jupyter Server with --gateway-url runs a cell in a kernel that is a pod."""
    from tests.test_jupyter_server import JupyterServer

    server = JupyterServer(kube_gw.url, tmp_path)
    try:
        kernel_id = server.start_kernel("kube_python")
        sock = server.connect(kernel_id)
        assert sock.execute("import socket; print(socket.gethostname()[:7])").stdout.strip() == "kernel-"
        sock.close()
        assert server.client.request("DELETE", f"/api/kernels/{kernel_id}").status == 204
        assert kube_gw.client.kernel(kernel_id).status == 404
        assert not kernel_pods(kube)
    finally:
        server.stop()


def test_pod_of_a_launch_cut_short_is_deleted_at_the_next_start(kube: KubeCluster, tmp_path: Path) -> None:
    """A kernel pod of this driver that no recorded kernel owns and that is older than any launch (what a crash
    of egd mid-launch leaves) is deleted when the next egd with the state store starts; a younger one is not."""
    def stray(name: str) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "labels": {"egd.jupyter.org/driver": "egdtest",
                                                      "egd.jupyter.org/kernel-id": name}},
                "spec": {"nodeSelector": {"type": "real"}, "terminationGracePeriodSeconds": 1,
                         "securityContext": {"runAsUser": 1000},
                         "containers": [{"name": "kernel", "image": KERNEL_IMAGE, "imagePullPolicy": "Never",
                                         "command": ["python3", "-c", "import time; time.sleep(600)"]}]}}

    assert kube.request("POST", f"/api/v1/namespaces/{NAMESPACE}/pods", stray("stray-old"))[0] == 201
    time.sleep(12)
    assert kube.request("POST", f"/api/v1/namespaces/{NAMESPACE}/pods", stray("stray-new"))[0] == 201
    state = {"path": str(tmp_path / "state.sqlite"), "on_stop": "shutdown"}
    gw = GatewayProcess({
        "kernels": {"kernelspec_dirs": [str(KERNELSPECS)], "launch_timeout": 10, "max_launch_timeout": 10},
        "drivers": {"local": {}, "kubernetes": kube_settings(kube)}, "state": state})
    try:
        wait_until(lambda: kube.request("GET", f"/api/v1/namespaces/{NAMESPACE}/pods/stray-old")[0] == 404, 30,
                   0.5, what="the stray pod to be deleted")
        assert "belongs to no kernel egd knows" in gw.log()
        assert kube.request("GET", f"/api/v1/namespaces/{NAMESPACE}/pods/stray-new")[0] == 200
    finally:
        gw.stop()
        kube.request("DELETE", f"/api/v1/namespaces/{NAMESPACE}/pods/stray-new", {"gracePeriodSeconds": 0})



def test_quota_refusal_is_a_503_at_once(kube: KubeCluster, tmp_path: Path) -> None:
    """A ResourceQuota that allows no more pods: the API server refuses the kernel's pod, and the start fails at
    once (not at the launch timeout) with 503 carrying its words; the launch Secret does not stay."""
    kube.create_namespace("egd-quota")
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-pods"},
             "spec": {"hard": {"pods": "0"}}}
    assert kube.request("POST", "/api/v1/namespaces/egd-quota/resourcequotas", quota)[0] == 201
    gw = kube_gateway(kube, tmp_path, namespace="egd-quota")
    try:
        wait_until(lambda: kube.request("GET", "/api/v1/namespaces/egd-quota/resourcequotas/no-pods")[1]
                   .get("status", {}).get("hard"), 30, 0.2, what="the quota to be in force")
        began = time.monotonic()
        resp = gw.client.request("POST", "/api/kernels", {"name": "kube_python"})
        assert resp.status == 503, resp.json
        assert "exceeded quota" in resp.json["message"], resp.json
        assert time.monotonic() - began < 30
        assert not kernel_secrets(kube, "egd-quota") and not kernel_pods(kube, "egd-quota")
    finally:
        gw.stop()


def test_per_user_namespaces(kube: KubeCluster, tmp_path: Path) -> None:
    """namespace_mode per-user: each user's kernels go to a namespace of their own (a user name that is not a DNS
    label gets a hashed one), created at the first kernel and kept after the last."""
    gw = kube_gateway(kube, tmp_path, namespace_mode="per-user", namespace_prefix="egdu-")
    other = ""
    try:
        carol = gw.client.start_kernel("kube_python", env={"KERNEL_USERNAME": "carol"})
        dave = gw.client.start_kernel("kube_python", env={"KERNEL_USERNAME": "dave.smith"})
        assert pod_of(gw.client, carol)[0] == "egdu-carol"
        other = pod_of(gw.client, dave)[0]
        assert other.startswith("egdu-dave-smith-") and other != "egdu-carol"
        for kernel_id in (carol, dave):
            assert gw.client.delete_kernel(kernel_id) == 204
        assert kube.request("GET", "/api/v1/namespaces/egdu-carol")[1]["status"]["phase"] == "Active"
    finally:
        gw.stop()
        for namespace in ("egdu-carol", other):
            if namespace:
                kube.request("DELETE", f"/api/v1/namespaces/{namespace}")
