"""Whether users are really apart: checked at start (``egd run``) and by ``egd check-config``.

With per-user tokens (``auth.users``) or JWTs (``auth.jwt``) egd tells users apart, and its API gives each of
them only their own kernels. That holds beneath the API only when the kernels run as their users
(impersonation): a kernel that runs as egd's OS user can read what egd's user can, which includes the
connection files (keys) of every other user's kernel on the same driver, and drive those kernels with
jupyter_client. So egd does not start with distinct users unless every configured driver impersonates, or the
operator says the users trust each other (``auth.users_trust_each_other: true``: one team sharing one account),
which is then logged as a warning at every start.

The shared token (``auth.token``) alone names no users: its clients are trusted to see everything anyway.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.logger import Logger

from egd.config import Config

log = Logger(namespace="egd")


def _distinct_users(config: Config) -> bool:
    return bool(config.auth.users or config.auth.jwt)


def _shared_account_drivers(drivers: Mapping[str, Any]) -> list[str]:
    """The drivers that run every kernel as one OS account where the kernels can reach each other's files (a
    driver whose kernels each have a container of their own says so with ``kernels_apart``)."""
    return sorted(name for name, driver in drivers.items()
                  if not driver.impersonates and not getattr(driver, "kernels_apart", False))


def tenancy_problems(config: Config, drivers: Mapping[str, Any]) -> list[str]:
    """Why egd must not start with ``config`` and the built ``drivers`` (by name): empty when users are apart,
    not told apart, or trust each other."""
    shared = _shared_account_drivers(drivers)
    if not _distinct_users(config) or config.auth.users_trust_each_other or not shared:
        return []
    return [f"auth: users are told apart (auth.users or auth.jwt), but the driver(s) {', '.join(shared)} run "
            "every kernel as one OS account, so one user's kernel could read the connection files of the others' "
            "kernels and drive them. Turn on impersonation for them (drivers.<name>.impersonation: true), or, if "
            "the users trust each other, say so with auth.users_trust_each_other: true (see docs/security.rst)"]


def check_tenancy(config: Config, drivers: Mapping[str, Any]) -> None:
    """At start: ``ValueError`` when users would not be apart (see :func:`tenancy_problems`); a warning when they
    are not apart because the operator said they trust each other."""
    problems = tenancy_problems(config, drivers)
    if problems:
        raise ValueError("; ".join(problems))
    shared = _shared_account_drivers(drivers)
    if _distinct_users(config) and shared:
        log.warn("auth.users_trust_each_other: users are told apart at the API only; the kernels of driver(s) "
                 "{drivers} all run as one OS account and can read and drive each other (see docs/security.rst)",
                 drivers=", ".join(shared))
