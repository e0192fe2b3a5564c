"""One watch that follows every kernel pod of a driver (a label selector, in one namespace or cluster-wide),
instead of a request per kernel per interval.

The watcher lists once to learn the pods and a ``resourceVersion``, then watches from it; when the stream ends or
breaks it resumes from the last version it saw (bookmarks keep that fresh), and when the API server says that
version is too old (410 Gone) it lists again and reports the pods that vanished in between as deleted. Each pod
event goes to ``on_pod(kind, pod)`` with kind ``ADDED``, ``MODIFIED`` or ``DELETED`` (a list reports ``ADDED``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from egd.driverapi import IDriverReactor
from egd.drivers.http_api import ApiError, JsonApi, LineStream
from egd.util import describe

log = Logger()

#: How long the API server keeps one watch request open (it ends it then; the watcher resumes at once).
WATCH_SECONDS = 300
#: A stream silent for longer than this (no event, no bookmark) is taken as broken and resumed.
IDLE_LIMIT = WATCH_SECONDS + 30.0


def pod_key(pod: dict[str, Any]) -> str:
    """``namespace/name`` of a pod."""
    meta = pod.get("metadata") or {}
    return f"{meta.get('namespace')}/{meta.get('name')}"


class PodWatcher:
    """Follows the pods matching ``selector`` (in ``namespace``, or all namespaces when None)."""

    def __init__(self, reactor: IDriverReactor, api: JsonApi, selector: str, namespace: str | None,
                 on_pod: Callable[[str, dict[str, Any]], None]) -> None:
        self._reactor = reactor
        self._api = api
        self._selector = selector
        self._path = f"/api/v1/namespaces/{namespace}/pods" if namespace else "/api/v1/pods"
        self._on_pod = on_pod
        self.pods: dict[str, dict[str, Any]] = {}
        self._version: str | None = None
        self._running = False
        self._stream: LineStream | None = None
        self._loop: Deferred[None] | None = None
        self._last_item = 0.0
        self._idle_check: Any = None
        #: The stream said its resourceVersion is too old (410): the next round lists again.
        self._gone = False
        #: Fires once the first list is in (pods known, watch about to start).
        self.synced: Deferred[None] = Deferred()
        self.lists = 0
        self.watches = 0

    def start(self) -> None:
        """Begin: list, then watch, until :meth:`stop`."""
        self._running = True
        self._loop = Deferred.fromCoroutine(self._run())
        self._loop.addErrback(lambda f: log.failure("kubernetes: the pod watch stopped on an error", f))

    def stop(self) -> Deferred[None] | None:
        """Stop watching; fires when the loop has ended."""
        self._running = False
        if self._stream is not None:
            self._stream.stop()
        if self._idle_check is not None and self._idle_check.active():
            self._idle_check.cancel()
        return self._loop

    async def _run(self) -> None:
        failures = 0
        while self._running:
            try:
                if self._version is None:
                    await self._list()
                await self._watch()
                failures = 0
            except ApiError as exc:
                if exc.code == 410:
                    self._version = None
                    continue
                failures += 1
                log.warn("kubernetes: watching kernel pods failed ({why}); retrying", why=describe(exc))
            except Exception as exc:
                failures += 1
                if self._running:
                    log.warn("kubernetes: watching kernel pods failed ({why}); retrying", why=describe(exc))
            if self._running and failures:
                await deferLater(self._reactor, min(0.5 * 2 ** min(failures, 5), 10.0), lambda: None)

    async def _list(self) -> None:
        self.lists += 1
        _, data = await self._api.call("GET", self._path, {"labelSelector": self._selector})
        items = [p for p in (data or {}).get("items") or [] if isinstance(p, dict)]
        self._version = str(((data or {}).get("metadata") or {}).get("resourceVersion") or "") or None
        seen = {pod_key(p): p for p in items}
        for key, old in list(self.pods.items()):
            if key not in seen:
                # Gone while the watch was away: its DELETED event was missed.
                del self.pods[key]
                self._on_pod("DELETED", old)
        for key, pod in seen.items():
            kind = "MODIFIED" if key in self.pods else "ADDED"
            self.pods[key] = pod
            self._on_pod(kind, pod)
        if not self.synced.called:
            self.synced.callback(None)

    async def _watch(self) -> None:
        params = {"labelSelector": self._selector, "watch": "1", "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(WATCH_SECONDS)}
        if self._version:
            params["resourceVersion"] = self._version
        self.watches += 1
        stream = await self._api.stream(self._path, params, self._event)
        self._stream = stream
        self._last_item = self._reactor.seconds()
        self._schedule_idle_check()
        began = self._reactor.seconds()
        try:
            await stream.done
            log.debug("kubernetes: the pod watch ended after {seconds:.1f}s; resuming",
                      seconds=self._reactor.seconds() - began)
        finally:
            self._stream = None
            if self._idle_check is not None and self._idle_check.active():
                self._idle_check.cancel()
        if self._gone:
            self._gone = False
            raise ApiError(410, "the watch's resourceVersion is too old")

    def _schedule_idle_check(self) -> None:
        self._idle_check = self._reactor.callLater(IDLE_LIMIT, self._check_idle)

    def _check_idle(self) -> None:
        stream = self._stream
        if stream is None:
            return
        if self._reactor.seconds() - self._last_item >= IDLE_LIMIT:
            log.warn("kubernetes: the pod watch was silent for {limit:g}s; resuming it", limit=IDLE_LIMIT)
            stream.stop()
        else:
            self._schedule_idle_check()

    def _event(self, event: Any) -> None:
        self._last_item = self._reactor.seconds()
        if not isinstance(event, dict):
            return
        kind, obj = event.get("type"), event.get("object")
        if not isinstance(obj, dict):
            return
        if kind == "ERROR":
            if obj.get("code") == 410:
                self._gone = True
                self._version = None
            else:
                log.warn("kubernetes: the pod watch reported {message}", message=str(obj.get("message"))[:300])
            if self._stream is not None:
                self._stream.stop()
            return
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if version:
            self._version = str(version)
        if kind == "BOOKMARK" or kind not in ("ADDED", "MODIFIED", "DELETED"):
            return
        key = pod_key(obj)
        if kind == "DELETED":
            self.pods.pop(key, None)
        else:
            self.pods[key] = obj
        self._on_pod(str(kind), obj)
