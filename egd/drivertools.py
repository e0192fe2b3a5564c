"""The driver toolkit: what drivers share besides the contract (``docs/writing-a-driver.rst``).

- :func:`impersonated_user`: the check every impersonating driver applies to a kernel's user.
- :class:`LauncherSettings`: the settings of a driver whose kernels run beside egd's launcher and call back
  (ssh, yarn): the callback listener, impersonation, the launcher and its Python, the kernels' ports.

Also part of the toolkit: :mod:`egd.checks` (settings checkers), :mod:`egd.kernels.ports` (ports on this
host), :mod:`egd.remote` (the launcher client) and ``egd.drivers.process`` (a short-lived helper process).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from egd import checks
from egd.checks import Checker, Settings, boolean, listen_port, optional, strings, text
from egd.errors import BadRequest, Forbidden
from egd.launchers import launcher_protocol

#: A user name a driver may log in or submit as when impersonating (POSIX portable, no leading dash or digit).
_LOGIN_NAME = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\Z")
_SIZE = re.compile(r"^(\d{1,7})([mMgG]?)\Z")
_PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_]+)\}")
#: The launcher of this egd installation: remote hosts need the same file at ``launcher_path``, with the
#: protocol module beside it (:data:`LAUNCHER_FILES`). egd never imports the launcher script itself.
DEFAULT_LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(launcher_protocol.__file__)), "kernel_launcher.py")
#: The files a copy of the launcher consists of (in one directory).
LAUNCHER_FILES = ("kernel_launcher.py", "launcher_protocol.py")


def fill_placeholders(argv: tuple[str, ...] | list[str], values: Mapping[str, str]) -> list[str]:
    """A kernelspec's ``argv`` with ``{connection_file}``-style placeholders replaced from ``values``; unknown ones
    are kept, as jupyter_client and Enterprise Gateway do."""
    return [_PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), arg) for arg in argv]


def parse_memory_mb(text: str, what: str) -> int:
    """``"512m"``, ``"2g"`` or ``"1024"`` (MB) as megabytes; :class:`BadRequest` naming ``what`` otherwise."""
    match = _SIZE.match(text.strip())
    if not match:
        raise BadRequest(f"{what} must be a size such as 512m or 2g")
    number, unit = int(match.group(1)), match.group(2).lower()
    return number * 1024 if unit == "g" else number


def positive_int(text: str, what: str) -> int:
    """A whole number from 1 to 999999; :class:`BadRequest` naming ``what`` otherwise."""
    if not text.strip().isdigit() or int(text) < 1 or len(text.strip()) > 6:
        raise BadRequest(f"{what} must be a positive whole number")
    return int(text)


def protocol_module_beside(launcher_path: str) -> str:
    """The protocol module a launcher at ``launcher_path`` imports (for Spark's ``--py-files``)."""
    return os.path.join(os.path.dirname(launcher_path), "launcher_protocol.py")


def impersonated_user(username: str, prohibited: frozenset[str] | set[str] = frozenset({"root"})) -> str:
    """``username`` if a kernel may run as that user; :class:`Forbidden` (403) otherwise."""
    if not _LOGIN_NAME.match(username) or username in prohibited or username == "root":
        raise Forbidden(f"kernels cannot run as user {username[:40]!r} here")
    return username


@dataclass(frozen=True, kw_only=True)
class LauncherSettings(Settings):
    """Settings shared by drivers whose kernels start through egd's launcher and report back to egd."""

    #: The account kernels run as when not impersonating (None: the driver's default).
    user: str | None = None
    #: Run each kernel as its user (``KERNEL_USERNAME``), checked with :func:`impersonated_user`.
    impersonation: bool = False
    prohibited_users: tuple[str, ...] = ("root",)
    #: The address launchers call back to (egd listens there) and its port (0: any free one).
    callback_host: str = "127.0.0.1"
    callback_port: int = 0
    #: The Python that runs the launcher where the kernel runs (None: the driver's default).
    python: str | None = None
    launcher_path: str = DEFAULT_LAUNCHER
    #: The kernels' ports (None: the gateway's ``kernels.port_range``, else any free ones).
    port_range: tuple[int, int] | None = None

    schema: ClassVar[Mapping[str, Checker]] = {
        "user": optional(text),
        "impersonation": boolean,
        "prohibited_users": strings,
        "callback_host": text,
        "callback_port": listen_port,
        "python": optional(text),
        "launcher_path": text,
        "port_range": optional(checks.port_range),  # the module's: the field shadows the name here
    }
