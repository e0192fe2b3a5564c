"""Enterprise Gateway's own Python client (``enterprise_gateway.client.gateway_client``) driving egd.

EG's PyPI package pins ``jupyter_server<2``, ``jupyter_client<7`` and ``pyzmq<25``, so it cannot live in the test
environment. :func:`ensure_client_venv` installs it once into its own virtualenv (``<egdist.cache_dir()>/client-venv``,
by default ``~/.cache/egd-eg/3.3.0/client-venv``) and :func:`run_driver` runs ``tests/egclient_driver.py`` with that
venv's python, as a subprocess: the driver uses EG's ``GatewayClient``/``KernelClient`` exactly as EG's integration
tests do and prints what it saw as JSON, and the test decides what is right.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests import egdist

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "egclient_driver.py"
#: EG's client imports websocket-client, which EG itself only lists among its test extras.
CLIENT_PACKAGES = [f"jupyter_enterprise_gateway=={egdist.EG_VERSION}", "websocket-client>=1.6"]
_IMPORT_CHECK = "import enterprise_gateway.client.gateway_client, websocket; print(enterprise_gateway.__version__)"


def client_venv() -> Path:
    """The virtualenv EG's client is installed in."""
    return egdist.cache_dir() / "client-venv"


def _skip_or_fail(message: str) -> None:
    # As in egdist: without PyPI a developer's run skips, CI (CI=1, or YARN_IT=1 which tox sets) fails.
    if os.environ.get("CI", "").lower() in ("1", "true") or os.environ.get("YARN_IT") == "1":
        pytest.fail(message)
    pytest.skip(message)


def _installed(python: Path) -> bool:
    if not python.exists():
        return False
    done = subprocess.run([str(python), "-c", _IMPORT_CHECK], capture_output=True, text=True, timeout=120)
    return done.returncode == 0 and done.stdout.strip() == egdist.EG_VERSION


def ensure_client_venv() -> Path:
    """The python of a venv holding EG's client; created and installed with pip the first time (about a minute).

    Idempotent, and safe when two test runs get here at once (a lock file beside the venv)."""
    venv = client_venv()
    python = venv / "bin" / "python"
    if _installed(python):
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / "client-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _installed(python):  # another run installed it while this one waited
            return python
        # The base interpreter of this one (a venv made from a venv's python is based on the same base).
        made = subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], capture_output=True,
                              text=True, timeout=300)
        if made.returncode != 0:
            pytest.fail(f"cannot create {venv}: {made.stderr.strip()[-1000:]}")
        done = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "--quiet",
                               *CLIENT_PACKAGES], capture_output=True, text=True, timeout=1200)
        if done.returncode != 0 or not _installed(python):
            _skip_or_fail(f"cannot pip install {' '.join(CLIENT_PACKAGES)} into {venv}: "
                          f"{(done.stderr or done.stdout).strip()[-1500:]}")
    return python


def run_driver(python: Path, gateway_url: str, kernelspec: str, timeout: float = 240,
               username: str | None = None) -> dict[str, Any]:
    """Run the driver against ``gateway_url`` (``http://host:port``, no base path) with ``kernelspec``.

    Returns the driver's report: one entry per step (``start``, ``execute``, ``interrupt``, ``after_interrupt``,
    ``restart``, ``after_restart``, ``state``, ``shutdown``) and ``error`` if a step raised, plus its stderr
    (EG's client logs there) under ``stderr``."""
    host = gateway_url.split("://", 1)[1].rstrip("/")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("VIRTUAL_ENV", "PYTHON"))}
    # EG's client reads these at import: the gateway, and how long one request or message may take.
    env.update(GATEWAY_HOST=host, REQUEST_TIMEOUT="60", KERNEL_LAUNCH_TIMEOUT="40", LOG_LEVEL="DEBUG")
    if username:
        env["KERNEL_USERNAME"] = username
    # EG's client sends no token: the gateway under test must not require one.
    done = subprocess.run([str(python), str(DRIVER), "--kernelspec", kernelspec], capture_output=True, text=True,
                          timeout=timeout, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise AssertionError(f"the EG client driver printed no report (exit {done.returncode}):\n"
                             f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    report: dict[str, Any] = json.loads(lines[-1])
    report["exit"] = done.returncode
    report["stderr"] = done.stderr[-6000:]
    return report
