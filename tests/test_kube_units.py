"""The kubernetes driver's parts that need no cluster: reading kubeconfigs (every credential form kubectl writes,
and the ones egd refuses with a reason), label values, and the checks of a launch's ``KERNEL_*`` requests."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from egd.driverapi import LaunchRequest
from egd.drivers.containers import ContainerSettings, kernel_container, parse_cpus, parse_memory
from egd.drivers.kube_api import find_credentials, in_cluster_credentials, load_kubeconfig
from egd.drivers.kubernetes import KubernetesDriver, label_value
from egd.errors import BadRequest, Forbidden


def kubeconfig(tmp_path: Path, user: dict[str, Any], cluster: dict[str, Any] | None = None) -> Path:
    """A kubeconfig with one context."""
    path = tmp_path / "config"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": cluster or {"server": "https://10.0.0.1:6443/",
                                                          "certificate-authority-data":
                                                              base64.b64encode(b"CA PEM").decode()}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u", "namespace": "team"}}]}))
    return path


def test_kubeconfig_forms(tmp_path: Path) -> None:
    """Token, token file, client certificate as data or as files relative to the kubeconfig; the context's
    namespace; a server without its trailing slash."""
    creds = load_kubeconfig(str(kubeconfig(tmp_path, {"token": "t0k"})))
    assert (creds.server, creds.token, creds.ca_pem, creds.namespace) == ("https://10.0.0.1:6443", "t0k", b"CA PEM",
                                                                          "team")
    (tmp_path / "cert.pem").write_bytes(b"CERT")
    (tmp_path / "key.pem").write_bytes(b"KEY")
    creds = load_kubeconfig(str(kubeconfig(tmp_path, {"client-certificate": "cert.pem", "client-key": "key.pem",
                                                      "tokenFile": "tok"})))
    assert (creds.client_cert_pem, creds.client_key_pem) == (b"CERT", b"KEY")
    assert creds.token_file == str(tmp_path / "tok")
    creds = load_kubeconfig(str(kubeconfig(tmp_path, {"client-certificate-data": base64.b64encode(b"C").decode(),
                                                      "client-key-data": base64.b64encode(b"K").decode()})))
    assert (creds.client_cert_pem, creds.client_key_pem) == (b"C", b"K")


def test_kubeconfig_refusals_name_what(tmp_path: Path) -> None:
    """Exec plugins are refused naming the user entry; a missing context or server is named."""
    with pytest.raises(ValueError, match="user 'u' authenticates with exec"):
        load_kubeconfig(str(kubeconfig(tmp_path, {"exec": {"command": "aws"}})))
    with pytest.raises(ValueError, match="no context named 'other'"):
        load_kubeconfig(str(kubeconfig(tmp_path, {"token": "t"})), "other")
    with pytest.raises(ValueError, match="has no server"):
        load_kubeconfig(str(kubeconfig(tmp_path, {"token": "t"}, {"insecure-skip-tls-verify": True})))


def test_in_cluster_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside a pod: the service account's token file (re-read, not copied), CA and namespace; outside, a clear
    error, and find_credentials falls back to $KUBECONFIG."""
    (tmp_path / "token").write_text("sa-token")
    (tmp_path / "ca.crt").write_bytes(b"CA")
    (tmp_path / "namespace").write_text("egd\n")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    creds = in_cluster_credentials(str(tmp_path))
    assert (creds.server, creds.token_file, creds.ca_pem, creds.namespace) == (
        "https://[fd00::1]:443", str(tmp_path / "token"), b"CA", "egd")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    with pytest.raises(ValueError, match="not running in a Kubernetes pod"):
        in_cluster_credentials(str(tmp_path))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path, {"token": "from-env"})))
    assert find_credentials(None, None).token == "from-env"
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="no Kubernetes credentials"):
        find_credentials(None, None)


def test_label_values() -> None:
    """User names become valid label values; one that had to change carries a hash, so two never collide."""
    assert label_value("alice") == "alice"
    assert label_value("alice@example.org") != label_value("alice_example.org")
    for name in ("alice@example.org", "-x-", "é" * 80):
        value = label_value(name)
        assert len(value) <= 63 and value[:1].isalnum() and value[-1:].isalnum(), value


@dataclass
class Spec:
    """A kernelspec as a driver sees it."""

    name: str = "s"
    argv: tuple[str, ...] = ("python3", "-m", "ipykernel_launcher", "-f", "{connection_file}")
    resource_dir: str = "/tmp"
    env: dict[str, str] = field(default_factory=dict)
    driver_config: dict[str, Any] = field(default_factory=lambda: {"image": "img:1", "max_memory": "2Gi"})


def request(**env: str) -> LaunchRequest:
    """A launch with ``env``."""
    return LaunchRequest("k1", Spec(), env, "alice", None, 60)


def test_resource_requests_are_checked() -> None:
    """Quantities are parsed as Kubernetes writes them; what exceeds the maxima or is not a quantity is a 400 that
    names the variable."""
    assert parse_cpus("500m", "x") == 0.5 and parse_memory("2Gi", "x") == 2 * 1024**3
    settings = ContainerSettings(images=("img:2",), volumes={"data": {}})
    got = kernel_container(request(KERNEL_CPUS="1.5", KERNEL_MEMORY="1Gi", KERNEL_IMAGE="img:2",
                                   KERNEL_VOLUMES="data"), settings)
    assert (got.image, got.cpus, got.memory, got.volumes, got.uid) == ("img:2", 1.5, 1024**3, ("data",), 1000)
    for env, named in (({"KERNEL_MEMORY": "3Gi"}, "KERNEL_MEMORY"), ({"KERNEL_CPUS": "9"}, "KERNEL_CPUS"),
                       ({"KERNEL_CPUS": "1e3"}, "KERNEL_CPUS"), ({"KERNEL_GPUS": "1"}, "KERNEL_GPUS")):
        with pytest.raises(BadRequest, match=named):
            kernel_container(request(**env), settings)
    for env, named in (({"KERNEL_IMAGE": "evil:latest"}, "KERNEL_IMAGE"), ({"KERNEL_VOLUMES": "etc"}, "KERNEL_VOLUMES"),
                       ({"KERNEL_UID": "1234"}, "KERNEL_UID")):
        with pytest.raises(Forbidden, match=named):
            kernel_container(request(**env), settings)
    allowed = ContainerSettings(allow_uid=True)
    assert kernel_container(request(KERNEL_UID="1234", KERNEL_GID="99"), allowed).uid == 1234
    with pytest.raises(Forbidden, match="root"):
        kernel_container(request(KERNEL_UID="0"), allowed)


def test_pod_is_built_as_data_from_the_template() -> None:
    """The template's own parts stay; egd's override (name, labels, restartPolicy, image, command, user); no
    client value is placed as text that is parsed again."""
    driver = KubernetesDriver(reactor=None, settings={"namespace": "ns"}, runtime_dir="/tmp",  # type: ignore[arg-type]
                              port_range=None)
    template = {"metadata": {"labels": {"team": "a"}}, "spec": {
        "restartPolicy": "Always", "nodeSelector": {"gpu": "yes"},
        "containers": [{"name": "sidecar", "image": "s"}, {"name": "kernel", "args": ["x"]}]}}
    req = request(KERNEL_USERNAME="alice")
    pod = driver.build_pod(template, req, "ns", "alice{{evil}}", kernel_container(req, driver.settings),
                           ["python3", "launcher"], None)
    spec = pod["spec"]
    assert pod["metadata"]["labels"]["team"] == "a" and spec["nodeSelector"] == {"gpu": "yes"}
    assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
    kernel = spec["containers"][1]
    assert kernel["command"] == ["python3", "launcher"] and "args" not in kernel
    assert kernel["securityContext"]["runAsNonRoot"] is True and spec["containers"][0] == {"name": "sidecar",
                                                                                          "image": "s"}
    assert pod["metadata"]["labels"]["egd.jupyter.org/user"] != "alice{{evil}}"


def test_token_file_is_read_again_every_minute(tmp_path: Path) -> None:
    """The in-cluster token (rotated in place by the kubelet) is read again after a minute, not per request."""
    from twisted.internet.task import Clock

    from egd.drivers.kube_api import KubeAPI, KubeCredentials

    token = tmp_path / "token"
    token.write_text("first\n")
    clock = Clock()
    api = KubeAPI(clock, KubeCredentials(server="https://k:443", token_file=str(token)))  # type: ignore[arg-type]
    assert api.headers()["Authorization"] == "Bearer first"
    token.write_text("second\n")
    clock.advance(30)
    assert api.headers()["Authorization"] == "Bearer first"
    clock.advance(31)
    assert api.headers()["Authorization"] == "Bearer second"
