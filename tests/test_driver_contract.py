"""The driver contract (issue 11): third-party drivers loaded through the ``egd.drivers`` entry point and
verified when loaded; the example driver of ``docs/writing-a-driver.rst`` runs a real kernel.

Drivers are installed the way pip would leave them, without pip: a directory on ``PYTHONPATH`` of the egd
subprocess holding the module and a ``*.dist-info`` with its ``entry_points.txt``, which importlib.metadata
reads like any installed distribution.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from egd.driverapi import contract_problems
from tests.conftest import KERNELSPECS, GatewayProcess, wait_until

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "docs" / "egd_example_driver.py"

#: Third-party drivers that do not fit the contract, each in its own way.
BROKEN_MODULE = '''
from dataclasses import dataclass
from egd.checks import Settings


@dataclass(frozen=True)
class NoSettings(Settings):
    schema = {}


class NoLaunch:
    settings_type = NoSettings
    impersonates = False
    def __init__(self, reactor, settings, runtime_dir, port_range): pass
    def reattach(self, kernel_id, state, connection_info): pass
    def startService(self): pass
    def stopService(self): pass


class WrongSignatures(NoLaunch):
    def __init__(self, reactor): pass
    def launch(self): pass


class NoSettingsType(NoLaunch):
    settings_type = dict
    def launch(self, request): pass


def not_a_class(**kwargs):
    return None
'''


def install(root: Path, name: str, module: str, source: str, entries: dict[str, str]) -> Path:
    """Install ``module`` (its ``source``) with ``entries`` (driver name -> ``module:attribute``) under ``root``;
    the directory to put on ``PYTHONPATH``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(source)
    info = root / f"{name.replace('-', '_')}-1.0.dist-info"  # a dash would end the name: "egd", taken
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[egd.drivers]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()))
    return root


def env_with(path: Path) -> dict[str, str]:
    """The environment of an egd subprocess that finds the distribution installed at ``path``."""
    existing = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{path}{os.pathsep}{existing}" if existing else str(path)}


def check_config(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``egd check-config`` in a subprocess with ``env``."""
    return subprocess.run([sys.executable, "-m", "egd", "check-config", str(config)], capture_output=True,
                          text=True, timeout=60, env=env)


def test_a_broken_third_party_driver_fails_check_config_with_its_name(tmp_path: Path) -> None:
    """Each broken driver is named with what it lacks (no traceback), and hides no other driver's problem."""
    site = install(tmp_path / "site", "egd-broken", "egd_broken_driver", BROKEN_MODULE, {
        "nolaunch": "egd_broken_driver:NoLaunch", "wrongsig": "egd_broken_driver:WrongSignatures",
        "nosettings": "egd_broken_driver:NoSettingsType", "function": "egd_broken_driver:not_a_class",
        "missing": "egd_no_such_module:Driver"})
    config = tmp_path / "egd.yaml"
    config.write_text("drivers:\n  local: {}\n  nolaunch: {}\n  wrongsig: {}\n  nosettings: {}\n  function: {}\n"
                      "  missing: {}\n  ssh: {hosts: goodhost}\n")
    result = check_config(config, env_with(site))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    for expected in (
        "drivers.nolaunch: egd_broken_driver:NoLaunch is not an egd driver (egd.driverapi.KernelDriver): it has "
        "no method launch",
        "drivers.wrongsig: egd_broken_driver:WrongSignatures is not an egd driver (egd.driverapi.KernelDriver): "
        "its constructor does not take the keywords reactor, settings, runtime_dir, port_range; its launch does "
        "not take 1 argument(s)",
        "drivers.nosettings: egd_broken_driver:NoSettingsType is not an egd driver (egd.driverapi.KernelDriver): "
        "its settings_type is not a dataclass with a schema",
        "drivers.function: egd_broken_driver:not_a_class is not an egd driver",
        "drivers.missing: cannot load egd_no_such_module:Driver: ModuleNotFoundError",
        "drivers.ssh.hosts: expected a list of host names, got a string",
    ):
        assert expected in result.stderr, result.stderr
    assert "has 6 problem(s)" in result.stderr


def test_the_example_driver_fits_the_contract() -> None:
    """The documented example passes the same verification egd applies to every driver it loads."""
    spec = importlib.util.spec_from_file_location("egd_example_driver", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        assert contract_problems(module.ExampleDriver) == []
    finally:
        del sys.modules[spec.name]
    for builtin in ("local", "ssh", "yarn"):
        module = __import__(f"egd.drivers.{builtin}", fromlist=["x"])
        driver = next(v for k, v in vars(module).items() if k.endswith("Driver") and k != "KernelDriver"
                      and getattr(v, "__module__", "") == module.__name__)
        assert contract_problems(driver) == [], builtin


def test_example_driver_runs_a_kernel_through_its_entry_point(
        tmp_path: Path, make_gateway: Callable[..., GatewayProcess]) -> None:
    """docs/egd_example_driver.py, installed through an entry point: check-config checks its settings, and egd
    runs a real kernel with it (code runs, interrupts and shutdown work, nothing is left behind)."""
    site = install(tmp_path / "site", "egd-example-driver", "egd_example_driver", EXAMPLE.read_text(),
                   {"example": "egd_example_driver:ExampleDriver"})
    specs = tmp_path / "specs" / "example"
    specs.mkdir(parents=True)
    (specs / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Through the example driver", "language": "python",
        "metadata": {"egd": {"driver": "example"}}}))
    env = env_with(site)
    bad = tmp_path / "bad.yaml"
    bad.write_text("drivers:\n  local: {}\n  example: {ip: 999.1.1.1, colour: blue}\n")
    result = check_config(bad, env)
    assert result.returncode == 1
    assert "drivers.example.ip: not an IP address: '999.1.1.1'" in result.stderr
    assert "drivers.example.colour: unknown setting (known: ip)" in result.stderr

    gateway = make_gateway({"drivers": {"local": {}, "example": {"ip": "127.0.0.1"}},
                            "kernels": {"kernelspec_dirs": [str(tmp_path / "specs"), str(KERNELSPECS)]}},
                           env={"PYTHONPATH": env["PYTHONPATH"]})
    client = gateway.client
    try:
        kernel_id = client.start_kernel("example")
    except AssertionError:  # the gateway's log says why
        raise AssertionError(gateway.log()[-5000:]) from None
    connection_file = Path(gateway.runtime_dir) / f"example-{kernel_id}.json"
    assert connection_file.exists()
    sock = client.connect(kernel_id)
    try:
        run = sock.execute("import os; os.getppid()")
    finally:
        sock.close()
    assert run.reply["content"]["status"] == "ok" and run.result == str(gateway.proc.pid), run.reply
    assert client.request("POST", f"/api/kernels/{kernel_id}/interrupt").status == 204
    assert client.delete_kernel(kernel_id) == 204
    wait_until(lambda: not connection_file.exists(), 10, what="the example kernel's connection file to go")
    assert client.request("GET", "/api/kernels").json == []
    shutil.rmtree(site)
