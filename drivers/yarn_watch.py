"""Watching the YARN applications of one driver with one ResourceManager request per interval.

Every application egd submits carries the driver's tag and the kernel id as tags. Each round asks the RM once
for the applications with the driver's tag started since the oldest one still watched, and hands each watch
its application's report: the ones found by tag (Spark submits them itself) and the ones whose id is known
(egd submitted them over REST) alike. Enterprise Gateway asks once per kernel every few seconds; here the
number of requests per interval does not grow with the number of kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from egd.drivers.polling import BatchPoller
from egd.drivers.yarn_rm import FINAL_STATES, ResourceManager, RMError, RMUnavailable

log = Logger()

#: Slack for clock differences between egd and the RM when bounding the query by start time (ms).
_CLOCK_SLACK_MS = 10 * 60 * 1000
#: Rounds an application may be missing from the answer before it is asked for by id.
_MISSING_ROUNDS = 3


@dataclass(eq=False)
class AppWatch:
    """One kernel's application as the watcher sees it."""

    kernel_id: str
    user: str
    since_ms: int
    on_report: Callable[[dict[str, Any]], None]
    app_id: str | None = None
    report: dict[str, Any] = field(default_factory=dict)
    ended: Deferred[dict[str, Any]] = field(default_factory=Deferred)
    #: True while something waits on this application (a launch or a kill): the watcher polls faster.
    urgent: bool = True
    missing: int = 0

    @property
    def state(self) -> str:
        """YARN's state of the application, or ``""`` before it is known."""
        return str(self.report.get("state", ""))


def _tags(app: dict[str, Any]) -> set[str]:
    raw = app.get("applicationTags") or ""
    return {t.strip() for t in str(raw).split(",") if t.strip()}


class AppWatcher(BatchPoller[AppWatch]):
    """Polls the RM for every watched application at once."""

    what = "YARN watcher"

    def __init__(self, reactor: IReactorTime, rm: ResourceManager, tag: str, user: str, interval: float,
                 fast_interval: float) -> None:
        super().__init__(reactor, interval, fast_interval)
        self._rm = rm
        self._tag = tag
        self._user = user
        self.last_error = ""

    async def poll(self, watches: list[AppWatch]) -> None:
        """Ask the RM once for the applications with the driver's tag; hand each watch its own."""
        since = min(w.since_ms for w in watches) - _CLOCK_SLACK_MS
        try:
            apps = await self._rm.apps(self._user, [self._tag], since)
        except (RMUnavailable, RMError) as exc:
            if str(exc) != self.last_error:
                log.warn("YARN: cannot watch applications: {why}", why=str(exc))
            self.last_error = str(exc)
            return
        self.last_error = ""
        by_id = {str(app.get("id")): app for app in apps}
        for watch in watches:
            app = by_id.get(watch.app_id) if watch.app_id else self._find(watch, apps)
            if app is None and watch.app_id:
                watch.missing += 1
                if watch.missing >= _MISSING_ROUNDS:
                    # Not in the tagged list (tags lost, or an RM that forgot it): ask for it by id, rarely.
                    watch.missing = 0
                    app = await self._ask(watch)
            if app is not None:
                self._deliver(watch, app)

    def _find(self, watch: AppWatch, apps: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The newest application tagged exactly with the kernel id that is not a former incarnation's (a
        restart reuses the kernel id: the former one ended before this launch began)."""
        mine = [a for a in apps if watch.kernel_id in _tags(a)
                and not (a.get("state") in FINAL_STATES and int(a.get("startedTime") or 0) < watch.since_ms)]
        if not mine:
            return None
        return max(mine, key=lambda a: (int(a.get("startedTime") or 0), str(a.get("id"))))

    async def _ask(self, watch: AppWatch) -> dict[str, Any] | None:
        assert watch.app_id is not None
        try:
            app = await self._rm.app(watch.app_id, self._user)
        except (RMUnavailable, RMError) as exc:
            log.warn("YARN: cannot ask for {app}: {why}", app=watch.app_id, why=str(exc))
            return None
        if app is None:
            return {"id": watch.app_id, "state": "KILLED", "finalStatus": "UNDEFINED",
                    "diagnostics": "the ResourceManager does not know this application any more"}
        return app

    def _deliver(self, watch: AppWatch, app: dict[str, Any]) -> None:
        if not self.watching(watch):
            return
        watch.missing = 0
        changed = (app.get("state"), app.get("diagnostics")) != (watch.report.get("state"),
                                                                 watch.report.get("diagnostics"))
        watch.report = app
        if watch.app_id is None:
            watch.app_id = str(app.get("id"))
        if changed:
            watch.on_report(app)
        if watch.state in FINAL_STATES and not watch.ended.called:
            self.forget(watch)
            watch.ended.callback(app)
