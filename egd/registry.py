"""The driver registry: builds the configured drivers from the ``egd.drivers`` entry points.

Each driver is a named child service. A driver that cannot be found, loaded or verified against the contract
(:func:`egd.driverapi.contract_problems`, then Twisted's ``IService`` once built) is a configuration error,
reported by ``egd check-config`` and at start, never at a kernel's first launch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.application.service import IService

from egd.checks import settings_of
from egd.config import Config, missing_driver
from egd.driverapi import IDriverReactor, KernelDriver
from egd.errors import ServiceUnavailable
from egd.plugins import load_driver_class
from egd.service import AsyncMultiService


def check_driver_names(config: Config) -> list[str]:
    """Problems with the configured drivers' classes: not installed, not loadable, not fitting the contract
    (without building anything; reading the config reports them too)."""
    problems: list[str] = []
    for name in config.drivers:
        load_driver_class(name, problems)
    return problems


class DriverRegistry(AsyncMultiService):
    """The configured drivers, started before the kernel manager and stopped after it."""

    def __init__(self, config: Config, reactor: IDriverReactor, runtime_dir: str) -> None:
        super().__init__()
        self.setName("drivers")
        self._drivers: dict[str, KernelDriver] = {}
        problems: list[str] = []
        factories = {name: load_driver_class(name, problems) for name in config.drivers}
        if problems:
            raise ValueError("; ".join(problems))
        for name, settings in config.drivers.items():
            factory = factories[name]
            # A config built in code may hold a mapping: checked here as the config file's would have been.
            settings = settings_of(factory.settings_type, settings, f"drivers.{name}")
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
                f"This gateway cannot start the kernelspec: it needs {missing_driver(name, self._drivers)}") from None
