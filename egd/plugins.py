"""Finding driver classes: the ``egd.drivers`` entry points, each verified against the contract when loaded.

Used when the config is read (to check each driver's settings with its own ``settings_type``) and by the
driver registry (to build the drivers). Loading imports the driver's module; it builds and starts nothing.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Any

from egd.driverapi import contract_problems

GROUP = "egd.drivers"


def available_drivers() -> dict[str, EntryPoint]:
    """Installed driver entry points by name."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def load_driver_class(name: str, problems: list[str]) -> Any:
    """The verified class of the driver called ``name``; None, with the reason appended to ``problems`` (under
    ``drivers.<name>``), when it is not installed, cannot be imported or does not fit the contract."""
    installed = available_drivers()
    entry = installed.get(name)
    if entry is None:
        names = ", ".join(sorted(installed)) or "none"
        problems.append(f"drivers.{name}: no such driver installed (installed: {names})")
        return None
    try:
        cls = entry.load()
    except Exception as exc:  # a third party's module: any error is a reason to name it, not a traceback
        problems.append(f"drivers.{name}: cannot load {entry.value}: {type(exc).__name__}: {exc}")
        return None
    broken = contract_problems(cls)
    if broken:
        problems.append(f"drivers.{name}: {entry.value} is not an egd driver (egd.driverapi.KernelDriver): "
                        + "; ".join(broken))
        return None
    return cls
