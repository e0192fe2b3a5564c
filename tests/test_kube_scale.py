"""Scale of the kubernetes driver's watch: 200 kernel-labelled pods on kwok's simulated nodes are followed by one
list and a few watch requests (tests/kube_scale_probe.py runs the driver's own watcher in a process of its own)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kubecluster import KubeCluster

pytestmark = pytest.mark.kubernetes

REPO = Path(__file__).resolve().parent.parent


def test_200_kernel_pods_through_one_watch(kube_cluster: KubeCluster) -> None:
    """Every one of 200 pods is reported Running and then deleted through the one watch: the watcher made one
    list for all of them, none while they ran, and a few watch requests at most (the API server drops a watcher
    that falls behind in a burst of 200 creations; it resumes from the last version seen, losing no event)."""
    kube_cluster.add_kwok_nodes(2)
    kube_cluster.create_namespace("egd-scale")
    try:
        out = subprocess.run([sys.executable, "-m", "tests.kube_scale_probe", "--kubeconfig",
                              str(kube_cluster.kubeconfig),
                              "--namespace", "egd-scale", "--pods", "200", "--hold", "5"],
                             cwd=REPO, capture_output=True, text=True, timeout=400)
    finally:
        kube_cluster.delete_kwok_nodes()
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["lists"] == 1 and figures["watch_requests"] <= 5, figures
    assert figures["requests_while_held"] == 0, figures
    assert figures["events"]["ADDED"] == 200 and figures["events"]["DELETED"] == 200, figures
