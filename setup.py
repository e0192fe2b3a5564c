"""Packaging shim: metadata lives in setup.cfg.

The folders ``drivers/`` and ``launchers/`` sit at the top of the repository (the design card's layout) but
install as ``egd.drivers`` and ``egd.launchers``, so the installed names never collide in site-packages.
"""

from setuptools import setup

setup(
    package_dir={
        "egd": "egd",
        "egd.api": "egd/api",
        "egd.kernels": "egd/kernels",
        "egd.drivers": "drivers",
        "egd.launchers": "launchers",
    },
    packages=["egd", "egd.api", "egd.kernels", "egd.drivers", "egd.launchers"],
)
