"""Background work too costly for the scrape path (table dumps), run off the scrape path.

One thread runs every job at its own interval, one job at a time, so no two scans ever
overlap. A scan that outlives its interval makes the next one start late, never twice.
Scrapes only read the last result a job published.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

log = logging.getLogger(__name__)


@runtime_checkable
class BackgroundJob(Protocol):
    """A collector whose data comes from a periodic scan (see ConntrackTableCollector)."""

    name: str

    @property
    def interval(self) -> float: ...

    def scan(self) -> None:
        """Do the work and publish the result; failures are the job's to count and log."""


class Scanner:
    def __init__(self, jobs: Sequence[BackgroundJob]) -> None:
        self.jobs = list(jobs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> None:
        """Every job once, in the calling thread (for --once)."""
        for job in self.jobs:
            self._run(job)

    def start(self) -> None:
        if not self.jobs:
            return
        # A daemon thread: a stop request must not wait for a dump of millions of entries.
        self._thread = threading.Thread(target=self._loop, name="scanner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        due = {job.name: time.monotonic() for job in self.jobs}
        while not self._stop.is_set():
            job = min(self.jobs, key=lambda j: due[j.name])
            if self._stop.wait(max(0.0, due[job.name] - time.monotonic())):
                return
            self._run(job)
            # The next run is an interval after this one was due, or now if the scan took
            # longer than that: late, never bunched up.
            due[job.name] = max(due[job.name] + job.interval, time.monotonic())

    def _run(self, job: BackgroundJob) -> None:
        try:
            job.scan()
        except Exception:  # a job must count its own failures; this is the last resort
            log.exception("background scan raised", extra={"job": job.name})
