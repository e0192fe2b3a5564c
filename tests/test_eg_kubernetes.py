"""Enterprise Gateway's ``python_kubernetes`` kernelspec (EG 3.3's sdist, tests/egdist.py) on the kubernetes
driver: its kernel.json is EG's own, with only ``image_name`` set to the operator's image, as EG's docs ask.

EG's kernel images (elyra/kernel-py) carry EG's launchers in /usr/local/bin; the test image is Debian with
ipykernel, so the operator's pod template (the driver's ``pod_template``, not the kernelspec) mounts EG's
``kernel-launchers`` directory from the node and runs EG's ``bootstrap-kernel.sh``, as EG's image does. EG's
launcher in the pod reports its connection info encrypted to egd's listener (EG's protocol), which takes it only
from the pod's address.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import egdist
from tests.conftest import KERNELSPECS, GatewayProcess, wait_until
from tests.kubecluster import KERNEL_IMAGE, KubeCluster
from tests.test_kubernetes import NAMESPACE, kernel_pods, kube_settings, pod_of
from tests.test_lifecycle import interrupt_sleep

pytestmark = [pytest.mark.kubernetes, pytest.mark.eg]


def eg_pod_template() -> dict[str, object]:
    """The operator's pod for EG's kernel image: EG's launchers and bootstrap script from the node."""
    launchers = egdist.eg_source() / "etc" / "kernel-launchers"
    return {"spec": {
        "nodeSelector": {"type": "real"},
        "containers": [{"name": "kernel", "imagePullPolicy": "Never",
                        "command": ["/bin/bash", "/opt/eg/bootstrap/bootstrap-kernel.sh"],
                        "env": [{"name": "KERNEL_LAUNCHERS_DIR", "value": "/opt/eg"},
                                {"name": "KERNEL_LANGUAGE", "value": "python"}, {"name": "HOME", "value": "/tmp"}],
                        "volumeMounts": [{"name": "eg-launchers", "mountPath": "/opt/eg", "readOnly": True}]}],
        "volumes": [{"name": "eg-launchers", "hostPath": {"path": str(launchers), "type": "Directory"}}]}}


def test_eg_python_kubernetes_spec_runs_unchanged(kube_cluster: KubeCluster, tmp_path: Path) -> None:
    """EG's python_kubernetes: a pod from egd, EG's launcher in it; execute, interrupt, restart and delete, and
    nothing is left (no pod)."""
    kube_cluster.create_namespace(NAMESPACE)
    specs = egdist.assemble(tmp_path / "specs", ["python_kubernetes"])
    spec = egdist.spec_json(specs, "python_kubernetes")
    spec["metadata"]["process_proxy"]["config"]["image_name"] = KERNEL_IMAGE  # type: ignore[index]
    (specs / "python_kubernetes" / "kernel.json").write_text(json.dumps(spec))
    gw = GatewayProcess({
        "kernels": {"kernelspec_dirs": [str(KERNELSPECS), str(specs)], "launch_timeout": 90,
                    "heartbeat_interval": 1},
        "drivers": {"local": {}, "kubernetes": kube_settings(kube_cluster, pod_template=eg_pod_template())},
    })
    try:
        kernel_id = gw.client.start_kernel("python_kubernetes")
        namespace, name = pod_of(gw.client, kernel_id)
        assert "EG launcher" in gw.client.kernel(kernel_id).json["location"]
        sock = gw.client.connect(kernel_id)
        out = sock.execute("import os, socket; print(socket.gethostname(), os.environ['KERNEL_ID'])").stdout
        sock.close()
        assert out.split() == [name, kernel_id]
        interrupt_sleep(gw.client, kernel_id)
        assert gw.client.request("POST", f"/api/kernels/{kernel_id}/restart", {}).status == 200
        assert pod_of(gw.client, kernel_id)[1] != name
        sock = gw.client.connect(kernel_id)
        assert sock.execute("print(6 * 7)").stdout.strip() == "42"
        sock.close()
        assert gw.client.delete_kernel(kernel_id) == 204
        wait_until(lambda: not kernel_pods(kube_cluster, namespace), 10, what="the EG kernel's pods to be gone")
    finally:
        gw.stop()
