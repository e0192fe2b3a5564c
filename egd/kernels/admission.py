"""Admission of kernel starts and of access to kernels: who a request may claim to be, which kernelspecs a user
may start, the gateway's and each user's kernel limits, and which kernels an identity may use."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from twisted.logger import Logger

from egd.auth import Identity
from egd.config import Config
from egd.driverapi import KernelDriver
from egd.errors import Conflict, Forbidden, KernelNotFound, ServiceUnavailable
from egd.kernels.env import UNNAMED_OWNER, KernelEnv
from egd.kernels.kernel import Kernel
from egd.kernels.specs import KernelSpecInfo, KernelSpecStore, eg_spec_problems
from egd.metrics import GatewayMetrics
from egd.registry import DriverRegistry

#: One line per security-relevant event (who did what to which kernel); never a secret.
audit = Logger(namespace="egd.audit")


def refuse_foreign(kernel_id: str, owner: str, identity: Identity, action: str) -> KernelNotFound:
    """The 404 for a kernel ``identity`` may not use, exactly as if it did not exist (a user must not learn the
    ids of other users' kernels), with its audit line."""
    audit.warn("refused {action} of kernel {kernel_id} (user={owner}) to {who}", action=action,
               kernel_id=kernel_id, owner=owner, who=identity.describe())
    return KernelNotFound(kernel_id)


class Admission:
    """Decides whether a start may go ahead and whether an identity may use a kernel; refusals are audited and
    counted (``egd_kernel_start_refusals_total``)."""

    def __init__(self, config: Callable[[], Config], kernels: Mapping[str, Kernel], specs: KernelSpecStore,
                 drivers: DriverRegistry, metrics: GatewayMetrics) -> None:
        """``config``: the configuration in force now (it can be reloaded); ``kernels``: the manager's table."""
        self._config = config
        self._kernels = kernels
        self._specs = specs
        self._drivers = drivers
        self._metrics = metrics
        #: Starts admitted but whose kernel is not in the table yet, by user (counted against the limits).
        self._reserved: Counter[str] = Counter()

    # -- using kernels ----------------------------------------------------------------------------------

    def get(self, kernel_id: str) -> Kernel:
        """The kernel with this id; :class:`KernelNotFound` otherwise."""
        try:
            return self._kernels[kernel_id]
        except KeyError:
            raise KernelNotFound(kernel_id) from None

    def owned(self, kernel_id: str, identity: Identity, action: str) -> Kernel:
        """The kernel if ``identity`` may use it; otherwise 404 (see :func:`refuse_foreign`)."""
        kernel = self.get(kernel_id)
        if not identity.owns(kernel.env.username):
            raise refuse_foreign(kernel_id, kernel.env.username, identity, action)
        return kernel

    # -- starting kernels -------------------------------------------------------------------------------

    def refuse(self, reason: str, error: Exception) -> Exception:
        """Count a refused start (``reason``: limit, unauthorized, unavailable) and return ``error`` to raise."""
        self._metrics.start_refused(reason)
        return error

    def claim_user(self, env: Any, identity: Identity) -> Any:
        """The request's ``env`` with the user a user-bound identity is (it may not claim to be another)."""
        if identity.user is None or not (env is None or isinstance(env, dict)):
            return env
        claimed = (env or {}).get("KERNEL_USERNAME")
        if claimed is not None and claimed != identity.user:
            audit.warn("kernel start refused: {who} claimed KERNEL_USERNAME={claimed!r}",
                       who=identity.describe(), claimed=str(claimed)[:64])
            raise self.refuse("unauthorized",
                              Forbidden("KERNEL_USERNAME must be your own user name with these credentials"))
        return {**(env or {}), "KERNEL_USERNAME": identity.user}

    def check_new_id(self, kernel_id: str) -> None:
        """409 when a kernel with ``kernel_id`` exists already."""
        if kernel_id in self._kernels:
            raise Conflict(f"A kernel with id {kernel_id} already exists")

    async def admit(self, name: str, env: KernelEnv, identity: Identity) -> tuple[KernelSpecInfo, KernelDriver]:
        """The kernelspec ``name`` and its driver, when ``env``'s user may start it now (limits, user lists,
        a driver that is running and can run the kernel as that user); otherwise the 4xx/503 to answer."""
        user = env.username
        self._enforce_limits(user)
        # Counted from here on, so that concurrent requests see this one before its kernel exists.
        with self._reserving(user):
            spec = await self._specs.get(name)
            if not self.allows(spec, user, identity.groups if identity.user == user else None):
                audit.warn("kernel start refused user={user}: not authorized for {spec}", user=user, spec=spec.name)
                raise self.refuse("unauthorized",
                                  Forbidden(f"User '{user}' is not authorized to start kernel '{spec.display_name}'"))
            driver = self._driver(spec, user)
            self.check_new_id(env.kernel_id)  # claimed while the spec was being read
        return spec, driver

    def _driver(self, spec: KernelSpecInfo, user: str) -> KernelDriver:
        """The driver of ``spec``, if it may run a kernel for ``user``."""
        try:
            driver = self._drivers.get(spec.driver)
        except ServiceUnavailable as exc:
            raise self.refuse("unavailable", exc) from None
        problems = eg_spec_problems(spec, {n: getattr(d, "settings", None) for n, d in self._drivers.names.items()})
        if problems:
            raise self.refuse("unavailable", ServiceUnavailable("; ".join(problems)))
        if user == UNNAMED_OWNER and driver.impersonates:
            # Runs kernels as their users: one without a user has no account to run as (never egd's own).
            raise self.refuse("unauthorized", Forbidden(
                f"Kernels of '{spec.display_name}' run as their user: KERNEL_USERNAME is needed"))
        return driver

    @contextmanager
    def _reserving(self, user: str) -> Iterator[None]:
        self._reserved[user] += 1
        try:
            yield
        finally:
            self._reserved[user] -= 1

    def allows(self, spec: KernelSpecInfo, user: str, groups: frozenset[str] | None = None) -> bool:
        """Whether ``user`` may use ``spec`` (per-spec and gateway-wide user lists; ``@group`` entries match
        ``groups``, by default the user's groups in ``auth.groups``)."""
        config = self._config()
        if groups is None:
            groups = frozenset(g for g, members in config.auth.groups.items() if user in members)
        return spec.allows(user, config.kernels.authorized_users, config.kernels.unauthorized_users, groups)

    def _enforce_limits(self, user: str) -> None:
        """403 when the gateway's or the user's kernel limit is reached (kernels starting count too)."""
        kc = self._config().kernels
        total = len(self._kernels) + sum(self._reserved.values())
        if kc.max_kernels is not None and total >= kc.max_kernels:
            audit.warn("kernel start refused user={user}: gateway limit {limit}", user=user, limit=kc.max_kernels)
            raise self.refuse("limit", Forbidden(
                f"A max kernels limit has been set to {kc.max_kernels} and has been reached"))
        if kc.max_kernels_per_user is not None:
            mine = sum(1 for k in self._kernels.values() if k.env.username == user) + self._reserved[user]
            if mine >= kc.max_kernels_per_user:
                audit.warn("kernel start refused user={user}: per-user limit {limit}", user=user,
                           limit=kc.max_kernels_per_user)
                raise self.refuse("limit", Forbidden(
                    f"A max kernels per user limit has been set to {kc.max_kernels_per_user} "
                    f"and user '{user}' has reached it"))
