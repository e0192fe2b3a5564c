"""What egd reads of Enterprise Gateway's kernelspecs: whether a spec starts one of EG's launchers, EG's argv values,
and the checks of what EG's ``run.sh`` scripts pass to a shell.

No Twisted here: ``egd migrate-eg`` and the CLI import it before a socket passed by systemd is taken (Twisted's
endpoints module takes ``LISTEN_FDS`` for itself when imported). The protocol itself is :mod:`egd.egprotocol`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from egd.errors import BadRequest

#: The argv placeholders that mark a kernelspec as one of EG's remote kernelspecs (its launcher reports back).
EG_PLACEHOLDERS = ("{response_address}", "{public_key}")
def uses_eg_protocol(argv: tuple[str, ...] | list[str]) -> bool:
    """Whether a kernelspec's argv starts one of EG's launchers (which report to ``{response_address}``)."""
    return any(marker in arg for arg in argv for marker in EG_PLACEHOLDERS)


#: A client's value that a shell's word splitting and expansion leave as it is (EG's run.sh scripts use ``eval``).
_SHELL_SAFE = re.compile(r"^[A-Za-z0-9_.@:/=-]*\Z")
_KERNEL_VARIABLE = re.compile(r"\$\{?(KERNEL_[A-Za-z0-9_]+)")


def check_shell_values(spec_name: str, spec_env: Mapping[str, str], env: Mapping[str, str]) -> None:
    """Refuse (400) a client's ``KERNEL_*`` value that an EG kernelspec's ``env`` passes to a shell's ``eval``
    (``SPARK_OPTS`` in EG's ``run.sh``) unless it is one plain word; ``KERNEL_EXTRA_SPARK_OPTS`` (more
    ``spark-submit`` options, EG's way) is refused outright: Spark options come from the kernelspec."""
    for name, value in spec_env.items():
        for used in _KERNEL_VARIABLE.findall(str(value)):
            given = env.get(used, "")
            if used == "KERNEL_EXTRA_SPARK_OPTS" and given:
                raise BadRequest(f"KERNEL_EXTRA_SPARK_OPTS is not supported: Spark options come from kernelspec "
                                 f"{spec_name}")
            if not _SHELL_SAFE.match(given):
                raise BadRequest(f"{used} may hold only letters, digits and . _ - @ : / = for kernelspec "
                                 f"{spec_name} (its {name} goes through a shell)")


def eg_spark_opts_variable(env: Mapping[str, str]) -> str | None:
    """The variable of an EG kernelspec's ``env`` that its ``run.sh`` passes to ``spark-submit``: ``SPARK_OPTS``,
    or Toree's ``__TOREE_SPARK_OPTS__`` (used when ``SPARK_OPTS`` is empty); None when it has neither (Dask)."""
    return next((name for name in ("SPARK_OPTS", "__TOREE_SPARK_OPTS__") if name in env), None)


def eg_port_range(port_range: tuple[int, int] | None) -> str:
    """EG's ``{port_range}``: ``lo..hi``, or ``0..0`` for any port."""
    return f"{port_range[0]}..{port_range[1]}" if port_range else "0..0"
