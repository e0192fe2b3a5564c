"""What environment a kernel gets.

Enterprise Gateway's rules with Jupyter Kernel Gateway's safer default: from the request only ``KERNEL_*``
variables and the configured ``client_envs`` pass; from the gateway's own environment only the configured
``inherited_envs`` pass, whether or not the request has an ``env``. The kernelspec's ``env`` is applied with
``${VAR}`` substitution, and the request's values beat it. A rejected value is never echoed back; a value
that cannot be passed to a process (not encodable as UTF-8: a lone surrogate) is refused like any bad value.

A kernel belongs to the user named by ``KERNEL_USERNAME``. A kernel started without one (by a trusted client
with the shared token, or by the local operator) belongs to :data:`UNNAMED_OWNER`, a name no account can have
(it is not a user name), so that no per-user token or JWT user, whatever their name, owns it; inside the kernel
``KERNEL_USERNAME`` is then egd's OS user, as Jupyter's own kernels see it.
"""

from __future__ import annotations

import getpass
import re
import string
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from egd.errors import BadRequest

_MAX_VALUE_LENGTH = 4096
_MAX_VARIABLES = 256
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")  # used with fullmatch: "$" would allow a final newline
# Defence in depth: none of these has a use in a variable a client sends, all of them have uses in attacks.
_PROHIBITED = re.compile(r"[\x00\r\n$`]")
#: The owner of kernels started without ``KERNEL_USERNAME``: not a user name (egd's and the drivers' user name
#: checks refuse it), so no credential is ever this user, and a driver never runs a kernel as it.
UNNAMED_OWNER = "(gateway)"


@dataclass(frozen=True)
class KernelEnv:
    """The checked environment of one launch."""

    kernel_id: str
    username: str
    launch_timeout: float
    client: dict[str, str]
    inherited: dict[str, str]

    def for_spec(self, spec_env: Mapping[str, str]) -> dict[str, str]:
        """The full environment for a kernel of a spec with ``spec_env`` (substituted, request wins)."""
        base = {**self.inherited, **self.client}
        env = dict(self.inherited)
        for key, value in spec_env.items():
            env[key] = string.Template(str(value)).safe_substitute(base)
        env.update(self.client)
        env["KERNEL_ID"] = self.kernel_id
        env["KERNEL_USERNAME"] = getpass.getuser() if self.username == UNNAMED_OWNER else self.username
        env["KERNEL_GATEWAY"] = "1"
        return env


def _encodable(value: str) -> bool:
    """Whether ``value`` can reach a process's environment (and the connection file, logs and state store) as
    UTF-8: JSON lets a client send lone surrogates (``"\\ud800"``), which no encoder accepts."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_kernel_id(value: Any) -> str:
    """A client-chosen kernel id must be a canonical lower-case uuid4 string (Enterprise Gateway's rule)."""
    try:
        if isinstance(value, str) and str(uuid.UUID(value, version=4)) == value:
            return value
    except ValueError:
        pass
    raise BadRequest("KERNEL_ID must be a lower-case UUID version 4 such as 1b4e28ba-2fa1-4d2b-9c5e-3c1f0e8b2a7d")


def _checked_value(name: str, value: Any) -> str:
    """A request variable's value, if it may reach a kernel; :class:`BadRequest` (never echoing it) otherwise."""
    if not isinstance(value, str):
        raise BadRequest(f"Environment variable '{name}' must be a string")
    if len(value) > _MAX_VALUE_LENGTH:
        raise BadRequest(f"Environment variable '{name}' is longer than {_MAX_VALUE_LENGTH} characters")
    if _PROHIBITED.search(value) or not _encodable(value):
        raise BadRequest(f"Environment variable '{name}' contains prohibited characters")
    return value


def _client_variables(requested: Any, client_envs: tuple[str, ...]) -> dict[str, str]:
    """The variables of a request's ``env`` that pass: ``KERNEL_*`` and ``client_envs`` (all with ``*``), never
    ``KERNEL_GATEWAY``."""
    if requested is None:
        requested = {}
    if not isinstance(requested, dict):
        raise BadRequest("env must be a JSON object of string values")
    if len(requested) > _MAX_VARIABLES:
        raise BadRequest(f"env may hold at most {_MAX_VARIABLES} variables")
    allow_all = "*" in client_envs
    client: dict[str, str] = {}
    for name, value in requested.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise BadRequest("env has a name that is not a valid environment variable name")
        if (name.startswith("KERNEL_") or allow_all or name in client_envs) and name != "KERNEL_GATEWAY":
            client[name] = _checked_value(name, value)
    return client


def _launch_timeout(client: Mapping[str, str], default: float, maximum: float) -> float:
    """The launch timeout a request asks for (``KERNEL_LAUNCH_TIMEOUT``, at most ``maximum``), or ``default``."""
    if "KERNEL_LAUNCH_TIMEOUT" not in client:
        return default
    try:
        timeout = float(client["KERNEL_LAUNCH_TIMEOUT"])
    except ValueError:
        raise BadRequest("KERNEL_LAUNCH_TIMEOUT must be a number of seconds") from None
    if not timeout > 0:
        raise BadRequest("KERNEL_LAUNCH_TIMEOUT must be a positive number of seconds")
    return min(timeout, maximum)


def build_kernel_env(
    requested: Any,
    *,
    client_envs: tuple[str, ...],
    inherited_envs: tuple[str, ...],
    gateway_environ: Mapping[str, str],
    default_launch_timeout: float,
    max_launch_timeout: float,
) -> KernelEnv:
    """Check a request's ``env`` and combine it with what the gateway passes on. :class:`BadRequest` if bad."""
    client = _client_variables(requested, client_envs)
    kernel_id = _check_kernel_id(client.pop("KERNEL_ID")) if "KERNEL_ID" in client else str(uuid.uuid4())
    username = client.get("KERNEL_USERNAME") or UNNAMED_OWNER
    timeout = _launch_timeout(client, default_launch_timeout, max_launch_timeout)
    inherited = {name: gateway_environ[name] for name in inherited_envs if name in gateway_environ}
    return KernelEnv(kernel_id, username, timeout, client, inherited)
