"""Watching the Slurm jobs of one driver with one request per interval.

Every job egd submits is named ``<tag>-<kernel id>``. Each round lists Slurm's jobs once (``GET /jobs`` or one
``squeue``) and hands each watch its job's state, so the requests per interval do not grow with the kernels.
A job missing from the listing for a few rounds is asked for by id; one Slurm no longer knows has ended.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from egd.drivers.polling import BatchPoller
from egd.drivers.slurm_api import SlurmClient, SlurmError, SlurmJob, SlurmUnavailable

log = Logger()

#: Rounds a job may be missing from the listing before it is asked for by id.
_MISSING_ROUNDS = 3


@dataclass(eq=False)
class JobWatch:
    """One kernel's job as the watcher sees it."""

    kernel_id: str
    job_id: str
    user: str
    on_report: Callable[[SlurmJob], None]
    report: SlurmJob | None = None
    #: Fires with the job's last report once it has ended.
    ended: Deferred[SlurmJob] = field(default_factory=Deferred)
    #: True while something waits on this job (a launch or a kill): the watcher polls faster.
    urgent: bool = True
    missing: int = 0

    @property
    def state(self) -> str:
        """Slurm's state of the job, or ``""`` before it is known."""
        return self.report.state if self.report else ""

    def describe(self) -> str:
        """Slurm's view of the job, or its id."""
        return self.report.describe() if self.report else f"Slurm job {self.job_id}"


class JobWatcher(BatchPoller[JobWatch]):
    """Polls Slurm for every watched job at once."""

    what = "Slurm watcher"

    def __init__(self, reactor: IReactorTime, slurm: SlurmClient, interval: float, fast_interval: float) -> None:
        super().__init__(reactor, interval, fast_interval)
        self._slurm = slurm
        self.last_error = ""

    async def poll(self, watches: list[JobWatch]) -> None:
        """List Slurm's jobs once; hand each watch its own."""
        try:
            jobs = await self._slurm.jobs()
        except (SlurmUnavailable, SlurmError) as exc:
            if str(exc) != self.last_error:
                log.warn("Slurm: cannot watch jobs: {why}", why=str(exc))
            self.last_error = str(exc)
            return
        self.last_error = ""
        by_id = {job.job_id: job for job in jobs}
        for watch in watches:
            job = by_id.get(watch.job_id)
            if job is None:
                watch.missing += 1
                if watch.missing < _MISSING_ROUNDS:
                    continue
                watch.missing = 0
                job = await self._ask(watch)
            if job is not None:
                self.deliver(watch, job)

    async def _ask(self, watch: JobWatch) -> SlurmJob | None:
        try:
            job = await self._slurm.job(watch.job_id)
        except (SlurmUnavailable, SlurmError) as exc:
            log.warn("Slurm: cannot ask for job {job}: {why}", job=watch.job_id, why=str(exc))
            return None
        if job is None:
            return SlurmJob(job_id=watch.job_id, name="", user=watch.user, state="CANCELLED",
                            reason="Slurm no longer knows this job")
        return job

    def deliver(self, watch: JobWatch, job: SlurmJob) -> None:
        """A new report of ``watch``'s job: tell its owner when it changed; end the watch when the job has."""
        if not self.watching(watch):
            return
        watch.missing = 0
        changed = watch.report is None or (job.state, job.reason) != (watch.report.state, watch.report.reason)
        watch.report = job
        if changed:
            watch.on_report(job)
        if job.final and not watch.ended.called:
            self.forget(watch)
            watch.ended.callback(job)
