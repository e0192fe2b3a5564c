"""The driver registry: loads the configured drivers from the ``egd.drivers`` entry points.

Each driver is a named child service. A driver that cannot be found, built or verified against
:class:`egd.driverapi.KernelDriver` (and Twisted's ``IService``) is a configuration error, reported by
``egd check-config`` and at start, never at a kernel's first launch.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from twisted.application.service import IService

from egd.config import Config
from egd.driverapi import KernelDriver
from egd.errors import ServiceUnavailable
from egd.service import AsyncMultiService

GROUP = "egd.drivers"


def available_drivers() -> dict[str, Any]:
    """Installed driver entry points by name."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def check_driver_names(config: Config) -> list[str]:
    """Problems with the configured driver names (without building anything)."""
    installed = available_drivers()
    return [f"drivers.{name}: no such driver installed (installed: {', '.join(sorted(installed)) or 'none'})"
            for name in config.drivers if name not in installed]


class DriverRegistry(AsyncMultiService):
    """The configured drivers, started before the kernel manager and stopped after it."""

    def __init__(self, config: Config, reactor: Any, runtime_dir: str) -> None:
        super().__init__()
        self.setName("drivers")
        self._drivers: dict[str, KernelDriver] = {}
        problems = check_driver_names(config)
        if problems:
            raise ValueError("; ".join(problems))
        installed = available_drivers()
        for name, settings in config.drivers.items():
            factory = installed[name].load()
            driver = factory(reactor=reactor, settings=settings, runtime_dir=runtime_dir,
                             port_range=config.kernels.port_range)
            if not isinstance(driver, KernelDriver) or not IService.providedBy(driver):
                raise ValueError(f"drivers.{name}: {factory!r} is not an egd driver (a Twisted service with the "
                                 "methods of egd.driverapi.KernelDriver)")
            service: Any = driver
            service.setName(name)
            service.setServiceParent(self)
            self._drivers[name] = driver

    @property
    def names(self) -> Mapping[str, KernelDriver]:
        """The drivers by name."""
        return dict(self._drivers)

    def get(self, name: str) -> KernelDriver:
        """The driver called ``name``; :class:`ServiceUnavailable` if this gateway does not run it."""
        try:
            return self._drivers[name]
        except KeyError:
            raise ServiceUnavailable(
                f"This gateway does not run the '{name}' driver that the kernelspec needs "
                f"(configured drivers: {', '.join(sorted(self._drivers))})") from None
