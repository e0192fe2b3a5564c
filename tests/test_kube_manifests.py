"""egd's own manifests (conf/kubernetes/) against the real API server: every object passes a server-side dry
run, and the RBAC they grant is enough for the driver and no more (a kernel runs with a token of egd's service
account; what the Role leaves out is refused)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kubecluster import KubeCluster
from tests.test_kubernetes import kernel_pods, kube_gateway

pytestmark = pytest.mark.kubernetes

MANIFESTS = Path(__file__).resolve().parent.parent / "conf" / "kubernetes"
_CORE = {"Namespace", "ServiceAccount", "ConfigMap", "Service", "Secret"}
_PLURAL = {"Namespace": "namespaces", "ServiceAccount": "serviceaccounts", "ConfigMap": "configmaps",
           "Service": "services", "Secret": "secrets", "Role": "roles", "RoleBinding": "rolebindings",
           "ClusterRole": "clusterroles", "ClusterRoleBinding": "clusterrolebindings", "Deployment": "deployments"}


def documents(name: str) -> list[dict[str, Any]]:
    """The objects of one manifest file."""
    with open(MANIFESTS / name, encoding="utf-8") as handle:
        return [d for d in yaml.safe_load_all(handle) if d]


def collection(obj: dict[str, Any]) -> str:
    """The API path objects of ``obj``'s kind are created at."""
    kind, namespace = obj["kind"], obj["metadata"].get("namespace")
    group = "/api/v1" if kind in _CORE else f"/apis/{obj['apiVersion']}"
    scope = f"/namespaces/{namespace}" if namespace and kind != "Namespace" else ""
    return f"{group}{scope}/{_PLURAL[kind]}"


def create(cluster: KubeCluster, obj: dict[str, Any], dry_run: bool) -> tuple[int, Any]:
    """POST ``obj`` (with ``dryRun=All``: validated and admitted by the server, not stored)."""
    return cluster.request("POST", collection(obj) + ("?dryRun=All" if dry_run else ""), obj)


@pytest.fixture(scope="module")
def egd_namespaces(kube_cluster: KubeCluster) -> Iterator[KubeCluster]:
    """The namespaces of the manifests, created for real (namespaced objects need them), deleted at the end."""
    for obj in documents("namespaces.yaml"):
        status, answer = create(kube_cluster, obj, dry_run=False)
        assert status in (201, 409), answer
    yield kube_cluster
    for obj in documents("namespaces.yaml"):
        kube_cluster.request("DELETE", f"/api/v1/namespaces/{obj['metadata']['name']}")


@pytest.mark.parametrize("name", sorted(p.name for p in MANIFESTS.glob("*.yaml")))
def test_manifest_passes_a_server_side_dry_run(egd_namespaces: KubeCluster, name: str) -> None:
    """Each object of each manifest is valid for the API server (schema, admission), as kubectl apply would
    send it."""
    objects = documents(name)
    assert objects
    for obj in objects:
        status, answer = create(egd_namespaces, obj, dry_run=True)
        assert status in (200, 201) or (status == 409 and name == "namespaces.yaml"), (name, obj["kind"], answer)


def test_embedded_config_and_kernelspec_are_egds() -> None:
    """The ConfigMaps hold an egd.yaml that egd's own parser accepts with the Deployment's environment (the DSN
    and token from their Secrets), and a kernelspec that parses."""
    from egd.config import parse_config

    config = next(d for d in documents("config.yaml") if d["kind"] == "ConfigMap")
    parsed = parse_config(config["data"]["egd.yaml"], "conf/kubernetes/config.yaml",
                          environ={"EGD_STATE_DSN": "host=db dbname=egd", "EGD_AUTH_TOKEN": "t" * 32})
    assert parsed.state.store == "postgresql" and parsed.state.dsn == "host=db dbname=egd"
    assert parsed.drivers["kubernetes"].callback_host == "${POD_IP}"
    specs = next(d for d in documents("kernelspecs.yaml") if d["kind"] == "ConfigMap")
    for text in specs["data"].values():
        assert json.loads(text)["metadata"]["egd"]["driver"] == "kubernetes"


def test_rbac_is_enough_for_the_driver_and_no_more(egd_namespaces: KubeCluster, tmp_path: Path) -> None:
    """With rbac.yaml applied and a token of egd's service account, egd runs a kernel in egd-kernels from start
    to DELETE; the same token may not read Secrets, touch other namespaces or create namespaces."""
    cluster = egd_namespaces
    for obj in documents("rbac.yaml"):
        status, answer = create(cluster, obj, dry_run=False)
        assert status in (201, 409), answer
    token = cluster.service_account_token("egd", "egd")
    kubeconfig = cluster.service_account_kubeconfig("egd", "egd")
    gw = kube_gateway(cluster, tmp_path, kubeconfig=str(kubeconfig), namespace="egd-kernels")
    try:
        kernel_id = gw.client.start_kernel("kube_python")
        sock = gw.client.connect(kernel_id)
        assert sock.execute("print(6 * 7)").stdout.strip() == "42"
        sock.close()
        assert gw.client.delete_kernel(kernel_id) == 204
        assert not kernel_pods(cluster, "egd-kernels")
    finally:
        gw.stop()
    assert cluster.request("GET", "/api/v1/namespaces/egd-kernels/pods", token=token)[0] == 200
    assert cluster.request("GET", "/api/v1/namespaces/egd-kernels/secrets", token=token)[0] == 403
    assert cluster.request("GET", "/api/v1/namespaces/default/pods", token=token)[0] == 403
    assert cluster.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                          "metadata": {"name": "egd-sneaky"}}, token=token)[0] == 403
