"""Enterprise Gateway's own kernelspecs and kernel launchers, taken verbatim from EG's PyPI sdist.

The ``eg`` tests and ``egd migrate-eg``'s tests run EG's files, never copies of them in this repository: the sdist
(``jupyter_enterprise_gateway-<EG_VERSION>.tar.gz``) is downloaded from PyPI once with pip into
``$EGD_EG_CACHE`` (default ``~/.cache/egd-eg/<EG_VERSION>``) and unpacked there.

:func:`assemble` builds a kernelspec directory as EG's ``etc/Makefile`` does (``make kernelspecs``): each spec of
``etc/kernelspecs`` with the launcher scripts of its language copied in (``scripts/`` for Python and R, ``lib/`` for
Scala) and the logos of ``etc/kernel-resources``. EG documents installing the result into
``/usr/local/share/jupyter/kernels``, which its ``kernel.json`` and ``run.sh`` files name by absolute path; an
operator who installs elsewhere replaces that prefix, and so does :func:`assemble` (``prefix``): it is the only
change made to EG's files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

EG_VERSION = "3.3.0"
#: Where EG's ``kernel.json`` files and ``run.sh`` scripts expect the kernelspecs to be installed.
EG_INSTALL_PREFIX = "/usr/local/share/jupyter/kernels"
#: Kernelspec name patterns and the launcher directory EG's Makefile copies into them.
_LAUNCHERS = (
    (("python_distributed", "dask_python_", "spark_python_conductor", "spark_python_yarn"), "python/scripts",
     "scripts"),
    (("spark_R_conductor", "spark_R_yarn"), "R/scripts", "scripts"),
    (("spark_scala_conductor", "spark_scala_yarn"), "scala/lib", "lib"),
)
#: Logos, by a word of the spec's name (EG's Makefile: R, scala, then python, then tf last).
_RESOURCES = (("R", "ir"), ("scala", "apache_toree"), ("python", "python"), ("tf", "tensorflow"))


def cache_dir() -> Path:
    """Where the sdist is kept and unpacked."""
    return Path(os.environ.get("EGD_EG_CACHE") or Path.home() / ".cache" / "egd-eg" / EG_VERSION)


def eg_source() -> Path:
    """The unpacked sdist (downloaded from PyPI the first time); skips when PyPI cannot be reached, unless CI
    is set, where that is an error."""
    cache = cache_dir()
    root = cache / f"jupyter_enterprise_gateway-{EG_VERSION}"
    if (root / "etc" / "kernelspecs").is_dir():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as download:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
                               ":all:", "--dest", download, f"jupyter_enterprise_gateway=={EG_VERSION}"],
                              capture_output=True, text=True, timeout=600)
        archives = list(Path(download).glob("*.tar.gz"))
        if done.returncode != 0 or not archives:
            message = f"cannot download EG {EG_VERSION}'s sdist from PyPI: {done.stderr.strip()[-500:]}"
            if os.environ.get("CI"):
                raise RuntimeError(message)
            pytest.skip(message)
        with tarfile.open(archives[0]) as archive:
            archive.extractall(cache, filter="data")
    return root


def _launcher_for(name: str) -> tuple[str, str] | None:
    for prefixes, source, target in _LAUNCHERS:
        if name.startswith(prefixes):
            return source, target
    return None


def assemble(dest: Path, names: list[str] | None = None, prefix: str | None = None) -> Path:
    """EG's kernelspecs (all, or ``names``) in ``dest`` as EG's ``make kernelspecs`` builds them, with
    :data:`EG_INSTALL_PREFIX` replaced by ``prefix`` (default: ``dest``) in ``kernel.json`` and ``bin/run.sh``."""
    etc = eg_source() / "etc"
    prefix = prefix or str(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for spec in sorted((etc / "kernelspecs").iterdir()):
        if names is not None and spec.name not in names:
            continue
        target = dest / spec.name
        shutil.copytree(spec, target, dirs_exist_ok=True)
        launcher = _launcher_for(spec.name)
        if launcher is not None and (etc / "kernel-launchers" / launcher[0]).is_dir():
            shutil.copytree(etc / "kernel-launchers" / launcher[0], target / launcher[1], dirs_exist_ok=True)
        for word, resources in _RESOURCES:
            if word in spec.name and (etc / "kernel-resources" / resources).is_dir():
                shutil.copytree(etc / "kernel-resources" / resources, target, dirs_exist_ok=True)
        shutil.copytree(spec, target, dirs_exist_ok=True)  # EG's Makefile copies again: per-spec overrides win
        for path in (target / "kernel.json", target / "bin" / "run.sh"):
            if path.is_file():
                path.write_text(path.read_text().replace(EG_INSTALL_PREFIX, prefix))
    return dest


def spec_json(dest: Path, name: str) -> dict[str, object]:
    """A kernelspec's ``kernel.json`` from an assembled directory."""
    return dict(json.loads((dest / name / "kernel.json").read_text()))
