"""Background work too costly for the scrape path (table dumps), run off the scrape path.

One thread runs every job at its own interval, one job at a time, so no two scans ever
overlap. A scan that outlives its interval makes the next one start late, never twice.
Scrapes only read the last result a job published. stop() returns once the thread has ended:
a job's scan sees the stop event between datagrams and gives up its dump, so that takes at
most the netlink timeout, not the rest of a dump of millions of entries.
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

    @property
    def name(self) -> str: ...

    @property
    def interval(self) -> float: ...

    def scan(self, stop: threading.Event | None = None) -> None:
        """Do the work and publish the result; failures are the job's to count and log.
        Return early, publishing nothing, once `stop` is set."""


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
        # A daemon thread all the same: should a job ever hang, the process can still exit.
        self._thread = threading.Thread(target=self._loop, name="scanner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop, and wait for the thread: no scan of this scanner runs after this returns."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

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
            job.scan(self._stop)
        except Exception:  # a job must count its own failures; this is the last resort
            log.exception("background scan raised", extra={"job": job.name})
