"""The background scanner: jobs run at their interval, one at a time, late rather than twice.

The jobs here are stand-ins that record when they ran: the behaviour under test is the
scanner's scheduling, not any scan. No assertion is on how long anything took.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time

from conntrack_exporter.scanner import BackgroundJob, Scanner


class RecordingJob:
    def __init__(
        self,
        name: str,
        interval: float,
        work: float = 0.0,
        fail: bool = False,
        cancellable: bool = False,
    ):
        self.name = name
        self.cancellable = cancellable
        self.cancelled = 0
        self._interval = interval
        self.work = work
        self.fail = fail
        self.runs: list[tuple[float, float]] = []
        self.running = 0
        self.overlaps = 0
        self.lock = threading.Lock()

    @property
    def interval(self) -> float:
        return self._interval

    def scan(self, stop: threading.Event | None = None) -> None:
        with self.lock:
            self.running += 1
            self.overlaps += self.running > 1
        started = time.monotonic()
        if self.cancellable and stop is not None:
            self.cancelled += stop.wait(self.work)
        else:
            time.sleep(self.work)
        self.runs.append((started, time.monotonic()))
        with self.lock:
            self.running -= 1
        if self.fail:
            raise RuntimeError("scan exploded")


def run_for(scanner: Scanner, seconds: float) -> float:
    """Run the scanner for about `seconds`; returns when it was started."""
    started = time.monotonic()
    scanner.start()
    time.sleep(seconds)
    scanner.stop()  # returns once the thread has ended
    assert not [t for t in threading.enumerate() if t.name == "scanner"]
    return started


def test_jobs_are_background_jobs():
    assert isinstance(RecordingJob("a", 1), BackgroundJob)


def test_run_once_runs_every_job_once_in_order():
    jobs = [RecordingJob("a", 100), RecordingJob("b", 100)]
    Scanner(jobs).run_once()
    assert [len(job.runs) for job in jobs] == [1, 1]
    assert jobs[0].runs[0][1] <= jobs[1].runs[0][0]


def test_first_scan_is_immediate_and_then_every_interval():
    job = RecordingJob("a", interval=0.2)
    started = run_for(Scanner([job]), 1.0)
    # Never early: the i-th run starts no sooner than i intervals after the start. (A busy
    # machine may make runs late, so the count has a generous lower bound only.)
    starts = [start for start, _ in job.runs]
    assert all(start >= started + i * 0.2 for i, start in enumerate(starts))
    assert 2 <= len(starts) <= 1.0 / 0.2 + 1


def test_a_scan_longer_than_its_interval_never_overlaps_or_bunches_up():
    slow = RecordingJob("slow", interval=0.05, work=0.2)
    other = RecordingJob("other", interval=0.05)
    run_for(Scanner([slow, other]), 1.0)
    assert slow.overlaps == 0
    everything = sorted(slow.runs + other.runs)
    # One at a time: each run ends before the next one starts.
    assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(everything))
    # Late, not bunched: a slow scan's next run starts right after it, not several at once.
    assert len(slow.runs) <= 1.0 / 0.2 + 1


def test_a_failing_job_is_logged_and_runs_again(caplog):
    job = RecordingJob("broken", interval=0.1, fail=True)
    with caplog.at_level(logging.ERROR, logger="conntrack_exporter.scanner"):
        run_for(Scanner([job]), 0.5)
    assert len(job.runs) >= 2
    assert caplog.records[0].getMessage() == "background scan raised"
    assert caplog.records[0].job == "broken"


def test_stop_waits_for_the_running_scan_which_sees_the_stop_event():
    """stop() returns only once the thread has ended, so that the caller may close what the
    scans use; a scan sees the stop event and gives up (a dump checks it between datagrams)."""
    job = RecordingJob("endless", interval=10, work=30, cancellable=True)
    scanner = Scanner([job])
    scanner.start()
    while not job.running:
        time.sleep(0.01)
    scanner.stop()
    assert job.running == 0
    assert job.cancelled == 1
    assert not [t for t in threading.enumerate() if t.name == "scanner"]
    scanner.stop()  # a second stop is harmless
