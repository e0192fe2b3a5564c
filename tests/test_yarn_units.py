"""The yarn driver's pure parts: resource requests checked against the kernelspec, and the launch script
DistributedShell runs, executed for real by ``sh`` with hostile values (nothing may be expanded or run)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor

from egd.driverapi import LaunchRequest
from egd.drivers.yarn import Resources, YarnDriver, describe_app, kernel_resources
from egd.drivertools import parse_memory_mb
from egd.errors import BadRequest
from egd.kernels.specs import KernelSpecInfo

pytestmark = pytest.mark.yarn

SPEC_CONFIG = {"queues": ["interactive", "batch"], "max_memory": "2g", "max_cores": 2, "max_executors": 3}


def test_sizes() -> None:
    """Spark-style sizes in megabytes; anything else is refused."""
    assert parse_memory_mb("512m", "x") == 512
    assert parse_memory_mb("2g", "x") == 2048
    assert parse_memory_mb("300", "x") == 300
    for bad in ("", "1.5g", "-1g", "2t", "1g; rm -rf /", "99999999"):
        with pytest.raises(BadRequest):
            parse_memory_mb(bad, "x")


def test_resources_default_and_requested() -> None:
    """The spec's first queue and defaults apply; KERNEL_* requests within the limits are honoured."""
    assert kernel_resources({}, SPEC_CONFIG, "default", spark=False) == Resources("interactive", 512, 1)
    asked = {"KERNEL_QUEUE": "batch", "KERNEL_DRIVER_MEMORY": "1g", "KERNEL_DRIVER_CORES": "2",
             "KERNEL_NUM_EXECUTORS": "3", "KERNEL_EXECUTOR_MEMORY": "768m", "KERNEL_EXECUTOR_CORES": "1"}
    assert kernel_resources(asked, SPEC_CONFIG, "default", spark=True) == Resources("batch", 1024, 2, 3, 768, 1, 3)
    assert kernel_resources({}, {}, "default", spark=False).queue == "default"


@pytest.mark.parametrize(("env", "says"), [
    ({"KERNEL_QUEUE": "root.secret"}, "KERNEL_QUEUE must be one of"),
    ({"KERNEL_QUEUE": "batch,interactive"}, "KERNEL_QUEUE must be one of"),
    ({"KERNEL_DRIVER_MEMORY": "3g"}, "at most 2048m"),
    ({"KERNEL_DRIVER_CORES": "3"}, "at most 2"),
    ({"KERNEL_DRIVER_CORES": "0"}, "positive whole number"),
    ({"KERNEL_NUM_EXECUTORS": "4"}, "at most 3"),
    ({"KERNEL_NUM_EXECUTORS": "two"}, "positive whole number"),
    ({"KERNEL_EXECUTOR_MEMORY": "1g --conf x=y"}, "size such as"),
    ({"KERNEL_EXTRA_SPARK_OPTS": "--conf a=b & touch /tmp/pwned"}, "not supported"),
])
def test_resources_refused(env: dict[str, str], says: str) -> None:
    """Requests beyond what the kernelspec allows are a 400 saying what is allowed, never echoing the value."""
    with pytest.raises(BadRequest) as caught:
        kernel_resources(env, SPEC_CONFIG, "default", spark=True)
    assert says in caught.value.message
    for value in env.values():
        assert value not in caught.value.message or value.isdigit()


def test_describe_app() -> None:
    """YARN's own diagnostics, one line, bounded."""
    app = {"id": "application_1_0001", "state": "ACCEPTED", "finalStatus": "UNDEFINED", "queue": "small",
           "diagnostics": "[Wed] Application is added to the scheduler\n and is not yet activated."}
    assert describe_app(app) == ("YARN application application_1_0001 ACCEPTED in queue small: [Wed] Application "
                                 "is added to the scheduler and is not yet activated.")
    ended = {"id": "a", "state": "FINISHED", "finalStatus": "KILLED"}
    assert describe_app(ended) == "YARN application a FINISHED/KILLED"


def _driver(tmp_path: Path, python: str) -> YarnDriver:
    return YarnDriver(reactor, {"resource_managers": ["http://127.0.0.1:1"], "python": python,
                                "launcher_path": "/opt/egd/kernel launcher.py"}, str(tmp_path), None)


def _request(env: dict[str, str], argv: tuple[str, ...]) -> LaunchRequest:
    spec = KernelSpecInfo("py", argv, "Py", "python", "signal", {}, {}, "/nowhere")
    return LaunchRequest("0d7a3c8e-8f0e-4a39-9a55-0d0c6e2b6f11", spec, env, "alice", None, 60.0)


def test_launch_script_passes_hostile_values_verbatim(tmp_path: Path) -> None:
    """The script DistributedShell runs is executed here by ``sh`` with a stand-in ``python`` that records
    its argv and stdin: every argument and every env value arrives byte for byte, and nothing was executed."""
    recorder = tmp_path / "record.py"
    out = tmp_path / "seen.json"
    recorder.write_text(f"import json, sys\njson.dump({{'argv': sys.argv[1:], 'stdin': sys.stdin.read()}}, "
                        f"open({str(out)!r}, 'w'))\n")
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {recorder} \"$@\"\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    canary = tmp_path / "pwned"
    hostile = {
        "KERNEL_A": f"$(touch {canary})", "KERNEL_B": f"`touch {canary}`", "KERNEL_C": "'; touch x; '",
        "KERNEL_D": "line one\nEGD_LAUNCH_SECRETS\ntouch " + str(canary), "KERNEL_E": "${HOME} & | ; < >",
    }
    argv = ("python", "-m", "ipykernel_launcher", "-f", "{connection_file}", "--name=$(id)")
    secrets = json.dumps({"secret": "s", "key": "k", "env": hostile})
    script = tmp_path / "launch.sh"
    script.write_text(_driver(tmp_path, str(wrapper)).launch_script(_request(hostile, argv), ("127.0.0.1", 9),
                                                                         secrets))
    subprocess.run(["sh", str(script)], check=True, timeout=30, env={"PATH": os.environ["PATH"]})
    seen: dict[str, Any] = json.loads(out.read_text())
    assert not canary.exists()
    assert seen["argv"][0] == "/opt/egd/kernel launcher.py"
    assert seen["argv"][-len(argv):] == list(argv)
    assert "--foreground" in seen["argv"] and "--secrets-file" not in seen["argv"]
    assert json.loads(seen["stdin"])["env"] == hostile
