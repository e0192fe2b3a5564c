"""Observability: the Prometheus metrics of one gateway, and the readiness checks behind ``/readyz``.

Each :class:`GatewayMetrics` owns its :class:`prometheus_client.CollectorRegistry` (never the process-wide
default one), so two gateways in one process, or the tests, never share a counter.

What is a gauge is computed at scrape time from the kernel table (``egd_kernels``), so it cannot drift from
what ``GET /api/kernels`` shows. Events are counted where they happen: launch durations, failures and
refusals in the kernel manager and the kernel's state machine; culls by the culler
(:meth:`GatewayMetrics.kernel_culled`). The relay path (every WebSocket message in both directions) only
increments plain integers of a :class:`RelayCounters`; the collector turns them into counters when scraped,
so the hot path does no label lookup, takes no lock and allocates nothing.

Metrics (every name starts with ``egd_``):

- ``egd_kernels{state,spec,driver,user}`` (gauge): kernels by state (starting, running, restarting,
  terminating). The ``user`` label has one value per user with a kernel; it is on this gauge only.
- ``egd_kernel_launch_duration_seconds{driver}`` (histogram): from the launch request to the driver until the
  kernel answered ``kernel_info`` and its iopub arrived, for kernels started successfully (restarts and failed
  launches are not observed: a timeout would only record the timeout setting).
- ``egd_kernel_launch_failures_total{driver,reason}`` (counter): launches the driver attempted that failed;
  ``reason``: ``timeout`` (:class:`egd.errors.LaunchTimeout`), ``failed`` (:class:`egd.errors.LaunchFailed`:
  the kernel exited or the driver could not start it), ``cancelled``, ``unavailable``
  (:class:`egd.errors.ServiceUnavailable`: the driver had nowhere to start it, say every ssh host out),
  ``error`` (anything else).
- ``egd_kernel_start_refusals_total{reason}`` (counter): start requests refused before any launch;
  ``reason``: ``limit`` (max_kernels, max_kernels_per_user), ``unauthorized`` (the user may not use the
  kernelspec, claimed another user's name, or the driver may not run kernels as that user), ``unavailable``
  (shutting down, or the kernelspec's driver is not configured). Invalid requests (400, 404, 409) are the
  client's errors and are counted nowhere.
- ``egd_kernel_restarts_total{spec,kind}`` (counter): restarts begun; ``kind``: ``user`` (POST .../restart) or
  ``automatic`` (the kernel died and egd restarted it).
- ``egd_kernel_culls_total{spec,reason}`` (counter): kernels the culler shut down (``reason``: idle, busy).
- ``egd_websocket_connections_open`` (gauge) and ``egd_websocket_connections_total`` (counter): kernel
  WebSocket connections open now, and ever opened.
- ``egd_driver_api_requests_total{driver}`` (counter): requests a driver made to its resource manager's API (the
  Kubernetes API server, the Docker Engine, the YARN ResourceManager), for drivers that count them (the
  attribute ``api_requests``).
- ``egd_driver_host_up{driver,host}`` (gauge) and ``egd_driver_host_failures_total{driver,host}`` (counter): for
  drivers with a pool of hosts (``ssh``, through the optional ``health()`` hook, :func:`driver_health`), 1 while a
  host is in placement and 0 while it is out, and the connection failures to it (launches' and probes').
- ``egd_relayed_messages_total{direction}`` and ``egd_relayed_bytes_total{direction}`` (counters): kernel
  messages relayed over WebSockets (``client_to_kernel``: received from clients; ``kernel_to_client``: sent to
  clients, once per client, replays included), and their WebSocket payload bytes.
"""

from __future__ import annotations

import asyncio
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.defer import CancelledError

from egd.errors import EgdError, Forbidden, LaunchFailed, LaunchTimeout, ServiceUnavailable

if TYPE_CHECKING:
    from egd.kernels.kernel import Kernel

#: Launch duration buckets, in seconds: a local kernel starts in about 1 s, an ssh one in 1-2 s, a plain
#: YARN one in about 6 s and a Spark one in about 25 s; the launch timeout can be up to 300 s.
_LAUNCH_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0,
                  300.0)

#: The Content-Type of :meth:`GatewayMetrics.render` (the Prometheus text format of this prometheus_client).
CONTENT_TYPE = CONTENT_TYPE_LATEST


class RelayCounters:
    """Plain integers the WebSocket relay increments; read only when metrics are scraped.

    Everything runs on the reactor thread, so ``+=`` on an attribute needs no lock.
    """

    __slots__ = ("bytes_from_clients", "bytes_to_clients", "closed", "messages_from_clients", "messages_to_clients",
                 "opened")

    def __init__(self) -> None:
        self.messages_from_clients = 0
        self.bytes_from_clients = 0
        self.messages_to_clients = 0
        self.bytes_to_clients = 0
        self.opened = 0
        self.closed = 0


def _failure_reason(exc: BaseException) -> str:
    """The ``reason`` label of a failed launch, from its exception."""
    if isinstance(exc, LaunchTimeout):
        return "timeout"
    if isinstance(exc, LaunchFailed):
        return "failed"
    if isinstance(exc, (CancelledError, asyncio.CancelledError)):
        return "cancelled"
    if isinstance(exc, ServiceUnavailable):
        return "unavailable"
    return "error"


class _ScrapeTimeCollector(Collector):
    """What is computed when scraped: the kernels gauge, the WebSocket and relay counters."""

    def __init__(self, kernels: Callable[[], Iterable[Kernel]], relay: RelayCounters,
                 drivers: Callable[[], Mapping[str, Any]]) -> None:
        self._kernels = kernels
        self._relay = relay
        self._drivers = drivers

    def collect(self) -> Iterator[Metric]:
        """One family per metric, from the kernel table and the relay's integers."""
        tally: Tally[tuple[str, str, str, str]] = Tally(
            (k.state.value, k.spec.name, k.spec.driver, k.env.username) for k in self._kernels())
        kernels = GaugeMetricFamily("egd_kernels", "Kernels by state, kernelspec, driver and user",
                                    labels=("state", "spec", "driver", "user"))
        for labels, count in sorted(tally.items()):
            kernels.add_metric(labels, count)
        yield kernels
        relay = self._relay
        yield GaugeMetricFamily("egd_websocket_connections_open", "Kernel WebSocket connections open now",
                                value=relay.opened - relay.closed)
        yield CounterMetricFamily("egd_websocket_connections", "Kernel WebSocket connections opened",
                                  value=relay.opened)
        messages = CounterMetricFamily("egd_relayed_messages", "Kernel messages relayed over WebSockets",
                                       labels=("direction",))
        messages.add_metric(("client_to_kernel",), relay.messages_from_clients)
        messages.add_metric(("kernel_to_client",), relay.messages_to_clients)
        yield messages
        sizes = CounterMetricFamily("egd_relayed_bytes", "WebSocket payload bytes of the kernel messages relayed",
                                    labels=("direction",))
        sizes.add_metric(("client_to_kernel",), relay.bytes_from_clients)
        sizes.add_metric(("kernel_to_client",), relay.bytes_to_clients)
        yield sizes
        api = CounterMetricFamily("egd_driver_api_requests", "Requests drivers made to their resource managers' APIs",
                                  labels=("driver",))
        for name, driver in sorted(self._drivers().items()):
            requests = getattr(driver, "api_requests", None)
            if isinstance(requests, int):
                api.add_metric((name,), requests)
        yield api
        up = GaugeMetricFamily("egd_driver_host_up", "1 while a driver's host is in placement, 0 while it is out",
                               labels=("driver", "host"))
        failures = CounterMetricFamily("egd_driver_host_failures", "Connection failures to a driver's hosts",
                                       labels=("driver", "host"))
        for name, driver in sorted(self._drivers().items()):
            hosts = (driver_health(driver) or {}).get("hosts") or {}
            for host, state in sorted(hosts.items()):
                up.add_metric((name, host), 1 if state.get("up") else 0)
                failures.add_metric((name, host), state.get("failures", 0))
        yield up
        yield failures


class GatewayMetrics:
    """The metrics of one gateway: event counters, and a registry that renders them with the scrape-time ones."""

    def __init__(self, kernels: Callable[[], Iterable[Kernel]],
                 drivers: Callable[[], Mapping[str, Any]] = dict) -> None:
        """``kernels``: every kernel of the gateway right now (the kernel manager's ``list``); ``drivers``: the
        drivers by name."""
        self.registry = CollectorRegistry(auto_describe=False)
        #: Incremented by the WebSocket relay (``egd.api.websocket``).
        self.relay = RelayCounters()
        self.registry.register(_ScrapeTimeCollector(kernels, self.relay, drivers))
        self._launch_seconds = Histogram(
            "egd_kernel_launch_duration_seconds", "Seconds from launch request until the kernel was ready, for "
            "successful starts", ("driver",), registry=self.registry, buckets=_LAUNCH_BUCKETS)
        self._launch_failures = Counter(
            "egd_kernel_launch_failures", "Kernel launches that failed, by driver and reason", ("driver", "reason"),
            registry=self.registry)
        self._refusals = Counter(
            "egd_kernel_start_refusals", "Kernel start requests refused before a launch, by reason", ("reason",),
            registry=self.registry)
        self._restarts = Counter(
            "egd_kernel_restarts", "Kernel restarts begun, by kernelspec and kind (user, automatic)",
            ("spec", "kind"), registry=self.registry)
        self._culls = Counter(
            "egd_kernel_culls", "Kernels shut down by the culler, by kernelspec and reason (idle, busy)",
            ("spec", "reason"), registry=self.registry)

    # -- events -----------------------------------------------------------------------------------------

    def launch_succeeded(self, driver: str, seconds: float) -> None:
        """A kernel started with ``driver`` was ready after ``seconds``."""
        self._launch_seconds.labels(driver).observe(max(seconds, 0.0))

    def launch_failed(self, driver: str, exc: BaseException) -> None:
        """A launch with ``driver`` failed with ``exc``. A driver that refuses the user (403) counts as a refusal;
        one that finds the request invalid (another 4xx) is the client's error and is not counted."""
        if isinstance(exc, Forbidden):
            self.start_refused("unauthorized")
        elif not (isinstance(exc, EgdError) and exc.status < 500):
            self._launch_failures.labels(driver, _failure_reason(exc)).inc()

    def start_refused(self, reason: str) -> None:
        """A start request was refused before any launch (``limit``, ``unauthorized``, ``unavailable``)."""
        self._refusals.labels(reason).inc()

    def kernel_restarted(self, spec: str, kind: str) -> None:
        """A restart of a kernel of ``spec`` began; ``kind`` is ``user`` or ``automatic``."""
        self._restarts.labels(spec, kind).inc()

    def kernel_culled(self, spec: str, reason: str) -> None:
        """The culler shut down a kernel of ``spec`` for ``reason`` (``idle`` or ``busy``)."""
        self._culls.labels(spec, reason).inc()

    # -- exposition -------------------------------------------------------------------------------------

    def render(self) -> bytes:
        """Every metric in the Prometheus text format (:data:`CONTENT_TYPE`). CPU only, proportional to the
        number of kernels: cheap enough for the reactor thread."""
        return bytes(generate_latest(self.registry))


class ReadyBut(str):
    """What a readiness check returns when the gateway can take work but an operator should know something (an
    ssh host out of its pool): shown as ``ok (...)`` in ``/readyz``, without making the gateway unready."""


#: A readiness check: None when ready, otherwise what is not ready (for the ``/readyz`` body; no secrets), or a
#: :class:`ReadyBut` note.
ReadinessCheck = Callable[[], str | None]


class Readiness:
    """Named checks that must all pass for the gateway to take work (``GET /readyz``).

    The kernel manager adds its own and the drivers'; a component added later (a state store) adds one with
    :meth:`add`.
    """

    def __init__(self) -> None:
        self._checks: dict[str, ReadinessCheck] = {}

    def add(self, name: str, check: ReadinessCheck) -> None:
        """Require ``check`` under ``name`` (a second check of the same name replaces the first)."""
        self._checks[name] = check

    def report(self) -> tuple[bool, dict[str, str]]:
        """Whether every check passes, and each check's ``ok`` or problem. A check that raises is not ready."""
        results: dict[str, str] = {}
        ready = True
        for name, check in self._checks.items():
            try:
                problem = check()
            except Exception as exc:  # a broken check must not break the probe; it reports not ready
                problem = f"check failed: {type(exc).__name__}"
            if isinstance(problem, ReadyBut):
                results[name] = f"ok ({problem})"
            else:
                results[name] = "ok" if problem is None else problem
                ready = ready and problem is None
        return ready, results


def driver_health(driver: Any) -> Mapping[str, Any] | None:
    """A driver's optional ``health()`` hook, None when it has none (or it failed): ``ready`` (False when the
    driver can take no work, say every host of its pool is out), ``detail`` (one line, empty when all is well) and
    optionally ``hosts`` (host: ``{"up": bool, "failures": int, ...}``, for ``egd_driver_host_up``)."""
    health = getattr(driver, "health", None)
    if not callable(health):
        return None
    try:
        report = health()
    except Exception:  # a broken hook must not break /readyz or /metrics
        return None
    return report if isinstance(report, Mapping) else None


def services_running(services: Callable[[], Mapping[str, Any]], what: str) -> ReadinessCheck:
    """A check that every Twisted service of ``services()`` (by name) is running, and that at least one can take
    work: one whose ``health()`` hook (:func:`driver_health`) says it cannot (every host of its pool out) is a note
    while another can, so that a load balancer does not take the gateway, and its users' running kernels, out of
    service for what every gateway sharing that pool suffers alike; what a ready one's health says is a note too."""
    def check() -> str | None:
        stopped = sorted(name for name, service in services().items() if not getattr(service, "running", False))
        if stopped:
            return f"{what} not running: {', '.join(stopped)}"
        problems, notes, able = [], [], 0
        for name, service in sorted(services().items()):
            health = driver_health(service) or {}
            detail = str(health.get("detail") or "")
            if not health.get("ready", True):
                problems.append(f"{name}: {detail or 'not ready'}")
                continue
            able += 1
            if detail:
                notes.append(f"{name}: {detail}")
        if problems and not able:
            return "; ".join(problems)
        return ReadyBut("; ".join(problems + notes)) if problems or notes else None

    return check
