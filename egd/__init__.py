"""egd: a Twisted kernel gateway that runs Jupyter kernels on a cluster for unchanged Jupyter clients."""

import importlib.util as _util
import os as _os
import sys as _sys

__version__ = "0.1.0"

#: The Jupyter Server REST API version egd speaks (what ``GET /api`` reports as ``version``).
API_VERSION = "2.21.1"


def _map_source_tree() -> None:
    """In a source checkout, ``drivers/`` and ``launchers/`` sit beside ``egd/`` and install as
    ``egd.drivers`` and ``egd.launchers``. Map them the same way when egd is imported from the checkout
    itself (``python -m egd`` run in the repository), so the checkout and the installed package agree."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    for name in ("drivers", "launchers"):
        full = f"{__name__}.{name}"
        source = _os.path.join(_os.path.dirname(here), name)
        init = _os.path.join(source, "__init__.py")
        if full in _sys.modules or _os.path.isdir(_os.path.join(here, name)) or not _os.path.isfile(init):
            continue
        spec = _util.spec_from_file_location(full, init, submodule_search_locations=[source])
        if spec is None or spec.loader is None:
            continue
        module = _util.module_from_spec(spec)
        _sys.modules[full] = module
        globals()[name] = module
        spec.loader.exec_module(module)


_map_source_tree()
