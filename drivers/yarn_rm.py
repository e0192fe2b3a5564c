"""A client of the YARN ResourceManager's REST API (``/ws/v1/cluster``), on treq, never blocking the reactor.

High availability: the RM endpoints are tried in order, starting with the one that answered last; an endpoint
that does not answer, or that answers as the standby (a redirect), makes the client try the next. Every call
names the user it acts as (``user.name``, the RM's simple authentication in a non-secure cluster).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import treq
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from egd.driverapi import IDriverReactor

log = Logger()

#: Application states after which nothing of the application runs any more.
FINAL_STATES = frozenset({"FINISHED", "FAILED", "KILLED"})
_STANDBY = (301, 302, 303, 307, 308)
_JSON_HEADERS = Headers({"Accept": ["application/json"], "Content-Type": ["application/json"]})


class RMUnavailable(ConnectionError):
    """No ResourceManager endpoint answered (the text names each one tried and why)."""


class RMError(Exception):
    """A ResourceManager answered with an error (the text is the RM's own message)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"ResourceManager answered {code}: {message}")
        self.code = code


def _rm_message(code: int, body: bytes) -> str:
    """The RM's own words from an error body (``RemoteException.message``), else the start of the body."""
    try:
        data = json.loads(body)
        remote = data.get("RemoteException") if isinstance(data, dict) else None
        if isinstance(remote, dict) and remote.get("message"):
            return str(remote["message"])
    except ValueError:
        pass
    return body[:300].decode("utf-8", "replace").strip() or f"HTTP {code}"


class ResourceManager:
    """The RM REST calls the yarn driver makes; counts its requests (``requests``) for the benchmark."""

    def __init__(self, reactor: IDriverReactor, urls: Sequence[str], timeout: float = 10.0) -> None:
        if not urls:
            raise ValueError("at least one ResourceManager URL is needed")
        self._reactor = reactor
        self._urls = [u.rstrip("/") for u in urls]
        self._active = 0
        self._timeout = timeout
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 4
        agent: Any = Agent(reactor, pool=self._pool, connectTimeout=timeout)
        self._http = HTTPClient(agent)
        self.requests = 0

    @property
    def url(self) -> str:
        """The endpoint that answered last (or the first configured)."""
        return self._urls[self._active]

    async def close(self) -> None:
        """Close the kept-alive connections."""
        await self._pool.closeCachedConnections()

    async def call(self, method: str, path: str, params: Mapping[str, str] | None = None,
                   body: Any = None) -> tuple[int, Any]:
        """``(status, decoded JSON or None)`` from the first RM that answers as the active one."""
        tried: list[str] = []
        count = len(self._urls)
        for step in range(count):
            index = (self._active + step) % count
            url = self._urls[index] + path
            self.requests += 1
            try:
                response = await self._http.request(
                    method, url, params=dict(params or {}), allow_redirects=False,
                    data=json.dumps(body).encode() if body is not None else None,
                    headers=_JSON_HEADERS,
                    timeout=self._timeout)
                content = await treq.content(response)
            except CancelledError:
                tried.append(f"{self._urls[index]}: no answer within {self._timeout:g}s")
                continue
            except Exception as exc:
                tried.append(f"{self._urls[index]}: {str(exc) or type(exc).__name__}")
                continue
            if response.code in _STANDBY:
                tried.append(f"{self._urls[index]}: standby")
                continue
            if index != self._active:
                log.info("YARN ResourceManager {url} answers now (failed over from {old})", url=self._urls[index],
                         old=self._urls[self._active])
                self._active = index
            if response.code >= 400:
                raise RMError(response.code, _rm_message(response.code, content))
            try:
                return response.code, json.loads(content) if content.strip() else None
            except ValueError:
                raise RMError(response.code, "the answer is not JSON") from None
        raise RMUnavailable("no YARN ResourceManager answered: " + "; ".join(tried))

    async def apps(self, user: str, tags: Sequence[str] = (),
                   started_since_ms: int | None = None) -> list[dict[str, Any]]:
        """Applications carrying any of ``tags``, started at or after ``started_since_ms`` (one request)."""
        params = {"user.name": user}
        if tags:
            params["applicationTags"] = ",".join(t.lower() for t in tags)
        if started_since_ms is not None:
            params["startedTimeBegin"] = str(max(0, started_since_ms))
        _, data = await self.call("GET", "/ws/v1/cluster/apps", params)
        # ``{"apps": null}`` when nothing matches.
        apps = ((data or {}).get("apps") or {}).get("app") or []
        return [app for app in apps if isinstance(app, dict)]

    async def app(self, app_id: str, user: str) -> dict[str, Any] | None:
        """One application's report, or None if the RM does not know it."""
        try:
            _, data = await self.call("GET", f"/ws/v1/cluster/apps/{app_id}", {"user.name": user})
        except RMError as exc:
            if exc.code == 404:
                return None
            raise
        app = (data or {}).get("app")
        return app if isinstance(app, dict) else None

    async def new_application(self, user: str) -> dict[str, Any]:
        """A fresh application id (and the cluster's maximum resource capability)."""
        _, data = await self.call("POST", "/ws/v1/cluster/apps/new-application", {"user.name": user})
        if not isinstance(data, dict) or not data.get("application-id"):
            raise RMError(200, "new-application gave no application id")
        return data

    async def submit(self, submission: Mapping[str, Any], user: str) -> None:
        """Submit an application (the body of ``POST /ws/v1/cluster/apps``)."""
        await self.call("POST", "/ws/v1/cluster/apps", {"user.name": user}, dict(submission))

    async def kill(self, app_id: str, user: str) -> str | None:
        """Ask the RM to kill an application; its state as the RM reports it (final once the kill is done)."""
        _, data = await self.call("PUT", f"/ws/v1/cluster/apps/{app_id}/state", {"user.name": user},
                                  {"state": "KILLED"})
        state = (data or {}).get("state")
        return str(state) if state else None
