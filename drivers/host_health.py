"""Which hosts of a pool are out, and when to look at them again: placement skips a host that could not be reached
until a background probe (or a launch) reaches it again.

A host goes out on a connection failure (refused, timed out, unreachable), never on a kernel's own failure: the
driver tells :class:`HostHealth` which is which. While it is out, a probe runs on an exponential backoff
(:data:`FIRST_RETRY` seconds, doubling up to :data:`MAX_RETRY`), on the reactor's clock, so that a host that is
down costs one probe every half minute instead of a connect timeout on every start whose turn lands on it. The
log says once that a host went out (with why) and once that it came back, each in one line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from egd.util import describe

log = Logger()

#: Seconds from a host's failure to its first probe; each failed probe doubles the wait, up to :data:`MAX_RETRY`.
FIRST_RETRY = 1.0
#: The longest wait between two probes of a host that stays out: how late, at worst, a host that is back is used.
MAX_RETRY = 30.0
#: How many hosts :meth:`HostHealth.check` probes at a time: a pool of hundreds does not start hundreds of ssh
#: processes together as the gateway starts.
CHECK_AT_ONCE = 16
#: How many characters of a failure's text the log, ``/readyz`` and error messages get.
_REASON_LIMIT = 300


def one_line(text: str, limit: int = _REASON_LIMIT) -> str:
    """``text`` (say, a process's stderr) as one line for a log entry: its non-blank lines joined with ``" | "``,
    cut to ``limit`` characters keeping the end, where the error usually is."""
    joined = " | ".join(line.strip() for line in text.splitlines() if line.strip())
    return joined if len(joined) <= limit else "..." + joined[-(limit - 3):]


@dataclass
class HostState:
    """What is known of one host."""

    #: False while the host is out (skipped by placement).
    up: bool = True
    #: Why it went out (one line), while it is out.
    reason: str = ""
    #: When it went out (reactor time).
    out_since: float = 0.0
    #: Connection failures to the host so far, of launches and probes alike (``egd_driver_host_failures_total``).
    failures: int = 0
    #: The wait before the next probe, while out.
    retry: float = FIRST_RETRY
    #: When the next probe runs (reactor time), None while one runs or the host is up.
    next_probe: float | None = None


class HostHealth:
    """The up/out state of a pool's hosts, with a background probe of each host that is out.

    ``probe(host)`` reaches the host once and fires with None when it could, else with why not (one line). The
    driver reports what its own connections found with :meth:`failed` and :meth:`succeeded`.
    """

    def __init__(self, clock: IReactorTime, probe: Callable[[str], Deferred[str | None]], what: str = "host",
                 first_retry: float = FIRST_RETRY, max_retry: float = MAX_RETRY) -> None:
        self._clock = clock
        self._probe = probe
        self._what = what
        self._first_retry = first_retry
        self._max_retry = max_retry
        self._hosts: dict[str, HostState] = {}
        self._calls: dict[str, IDelayedCall] = {}
        self._probes: dict[str, Deferred[str | None]] = {}
        self._stopped = False

    def state(self, host: str) -> HostState:
        """What is known of ``host`` (a host never seen is up)."""
        return self._hosts.setdefault(host, HostState())

    def is_up(self, host: str) -> bool:
        """Whether placement may use ``host`` now."""
        state = self._hosts.get(host)  # not recorded before it fails: a kernelspec may name any host
        return state is None or state.up

    def usable(self, hosts: Iterable[str]) -> list[str]:
        """The hosts of ``hosts`` that are up, in their order."""
        return [host for host in hosts if self.is_up(host)]

    def failed(self, host: str, why: str) -> None:
        """A connection to ``host`` failed (``why``): it goes out (logged once) and is probed on the backoff."""
        state = self.state(host)
        state.failures += 1
        why = one_line(why) or "unreachable"
        if not state.up:
            state.reason = why
            return
        state.up, state.reason, state.out_since, state.retry = False, why, self._clock.seconds(), self._first_retry
        log.warn("{what} {host} is out: {why}; skipped until a probe reaches it (first in {retry:g}s, then "
                 "backing off to every {most:g}s)", what=self._what, host=host, why=why, retry=state.retry,
                 most=self._max_retry)
        self._schedule(host, state)

    def succeeded(self, host: str) -> None:
        """A connection to ``host`` worked: it is up again (logged once), and its probe stops."""
        state = self.state(host)
        if state.up:
            return
        call = self._calls.pop(host, None)
        if call is not None and call.active():
            call.cancel()
        log.info("{what} {host} is back after {seconds:.0f}s out ({why})", what=self._what, host=host,
                 seconds=self._clock.seconds() - state.out_since, why=state.reason)
        state.up, state.reason, state.next_probe, state.retry = True, "", None, self._first_retry

    def _schedule(self, host: str, state: HostState) -> None:
        if self._stopped or host in self._calls or host in self._probes:
            return
        state.next_probe = self._clock.seconds() + state.retry
        self._calls[host] = self._clock.callLater(state.retry, self._run_probe, host)

    def check(self, hosts: Iterable[str]) -> None:
        """Probe each of ``hosts`` once now, in the background (the driver starts), :data:`CHECK_AT_ONCE` at a
        time: one that cannot be reached goes out (logged, then on the backoff) before a start lands on it and
        waits for its connect timeout."""
        limit = DeferredSemaphore(CHECK_AT_ONCE)

        def probe(host: str) -> Deferred[str | None]:
            # A probe let through once the pool stopped (as stop() cancels the running ones) does not run.
            return fail(CancelledError()) if self._stopped else self._probe(host)

        for host in hosts:
            self._start_probe(host, self._checked, lambda host: limit.run(probe, host))

    def _checked(self, host: str, why: str | None) -> None:
        if why is None:
            log.debug("{what} {host} reached", what=self._what, host=host)
            self.succeeded(host)
        else:
            self.failed(host, why)

    def _run_probe(self, host: str) -> None:
        self._calls.pop(host, None)
        state = self.state(host)
        state.next_probe = None
        if state.up:
            return
        self._start_probe(host, self._probed)

    def _start_probe(self, host: str, done: Callable[[str, str | None], None],
                     probe: Callable[[str], Deferred[str | None]] | None = None) -> None:
        """Run ``probe(host)`` (the pool's probe by default) unless one runs or probing stopped; ``done(host, why)``
        with its outcome (None: the host was reached) unless probing stops meanwhile."""
        if self._stopped or host in self._probes:
            return
        try:
            probing = (probe or self._probe)(host)
        except Exception as exc:  # a probe that cannot even start is a failed probe, not the end of probing
            probing = Deferred()
            probing.callback(f"the probe could not run: {describe(exc)}")
        self._probes[host] = probing

        def finished(why: str | None) -> None:
            self._probes.pop(host, None)
            if not self._stopped:
                done(host, why)

        def probe_failed(failure: Any) -> None:
            if failure.check(CancelledError):  # stopped
                self._probes.pop(host, None)
            else:
                finished(f"the probe failed: {describe(failure.value)}")

        probing.addCallbacks(finished, probe_failed)

    def _probed(self, host: str, why: str | None) -> None:
        state = self.state(host)
        if why is None:
            self.succeeded(host)
            return
        if state.up:  # a launch reached the host while the probe ran
            return
        state.failures += 1
        state.reason = one_line(why)
        state.retry = min(state.retry * 2, self._max_retry)
        self._schedule(host, state)

    def stop(self) -> None:
        """Stop probing (the driver stops): pending probes are cancelled, running ones too."""
        self._stopped = True
        for call in self._calls.values():
            if call.active():
                call.cancel()
        self._calls.clear()
        for probing in list(self._probes.values()):
            probing.cancel()
        self._probes.clear()

    def start(self) -> None:
        """(Re)start probing the hosts that are out (after :meth:`stop`)."""
        self._stopped = False
        for host, state in self._hosts.items():
            if not state.up:
                self._schedule(host, state)

    def describe_out(self, hosts: Iterable[str] | None = None) -> str:
        """The hosts (of ``hosts``, else all) that are out, why, for how long and when the next probe runs: one
        line, empty when none is out."""
        now = self._clock.seconds()
        parts = []
        for host in (self._hosts if hosts is None else hosts):
            state = self.state(host)
            if state.up:
                continue
            probe = ("probing now" if state.next_probe is None
                     else f"next probe in {max(state.next_probe - now, 0):.0f}s")
            parts.append(f"{host} out for {now - state.out_since:.0f}s: {state.reason} ({probe})")
        return "; ".join(parts)

    def report(self, hosts: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Each host of ``hosts`` and each other host seen: up, why not, failures so far (JSON)."""
        now = self._clock.seconds()
        for host in hosts:
            self.state(host)
        report: dict[str, dict[str, Any]] = {}
        for host, state in self._hosts.items():
            entry: dict[str, Any] = {"up": state.up, "failures": state.failures}
            if not state.up:
                entry.update(reason=state.reason, out_for=round(now - state.out_since, 1),
                             next_probe_in=None if state.next_probe is None else round(state.next_probe - now, 1))
            report[host] = entry
        return report
