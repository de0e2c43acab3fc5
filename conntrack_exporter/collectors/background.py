"""The base of the collectors fed by a background scan: conntrack_table and socket_ports.

Each dumps a kernel table in the scanner's thread (see scanner.py) and serves the metric
families of its last good scan. A subclass says what a scan reads before its dump
(`_prepare`), how one dump runs (`_dump`), and what families a scan gives (`_families`,
`_scan_counts`); everything around the dump is here, once:

- the reader, opened on the first scan through the context's factory and closed in close();
- the scan's bounds: `scan_timeout_seconds` for the whole scan (the netlink timeout bounds
  only the kernel's silence), and the scanner's stop event, which cancels a dump at once;
- one retry of a dump the kernel flagged as interrupted (the table changed under it);
- failures counted by reason in `<prefix>_scan_errors_total{reason}`, served from the first
  scrape on, zeros included, whether or not a scan ever succeeded; each failure logged once,
  not every interval; a refusal (EPERM) stops scanning for good;
- the scan health families (`_scan_duration_seconds`, `_scan_timestamp_seconds`,
  `_scan_interval_seconds`), built once
  per scan in the scanner's thread, so that a scrape costs a list read.

Whatever a scan raises is counted here, procfs trouble and bugs included: nothing reaches the
scanner's last-resort handler uncounted.
"""

from __future__ import annotations

import enum
import errno
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Generic, NamedTuple, Protocol, TypeVar

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from conntrack_exporter.netlink import NetlinkParseError, NetlinkTimeout
from conntrack_exporter.netlink.socket import DumpBounds, DumpCancelled, DumpResult
from conntrack_exporter.registry import Collected, NoDataError

ERROR_REASONS = ("permission", "timeout", "no_buffer_space", "interrupted", "parse", "other")


class Closable(Protocol):
    def close(self) -> None: ...


class Finishable(Protocol):
    def finish(self) -> None: ...


R = TypeVar("R", bound=Closable)  # the netlink reader
P = TypeVar("P")  # what a scan reads before its dump (from procfs)
T = TypeVar("T", bound=Finishable)  # the tally a dump fills


class SourceAbsent(Exception):
    """What the scan reads is absent on this kernel (conntrack not loaded): nothing to count."""


class _PrepareFailed(Exception):
    """Reading procfs before the dump failed: its errno never means the dump was refused."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.reason = "parse" if isinstance(cause, ValueError) else "other"


class ScanState(enum.Enum):
    """Why a background collector serves what it serves."""

    WAITING = "waiting for the first scan"
    SCANNED = "serving the last good scan"
    ABSENT = "source absent"
    REFUSED = "refused"
    FAILED = "failing"


@dataclass(frozen=True)
class Scan(Generic[P, T]):
    """One good scan: what it read first, its tally, and how it went."""

    prepared: P
    tally: T
    complete: bool  # False when the collector's budget stopped the dump
    duration: float
    finished_at: float  # Unix time


class _Served(NamedTuple):
    """What scrapes serve, replaced whole by each scan (one reference: no lock needed)."""

    metrics: list[Metric] | None  # the last good scan's families, with the current errors
    errors: Metric  # the errors family alone, for when there is no good scan
    why: str  # for NoDataError while there is no good scan


class BackgroundScanCollector(Generic[R, P, T]):
    """A collector whose data comes from a periodic dump (a scanner.BackgroundJob)."""

    name: ClassVar[str]
    metric_prefix: ClassVar[str]  # e.g. "conntrack_table"
    subject: ClassVar[str]  # what is scanned, in HELP and NoDataError texts: "table"
    scan_name: ClassVar[str]  # in log messages: "conntrack table"
    refusal: ClassVar[str]  # the warning logged once when the kernel refuses the dump

    def __init__(self, interval: float, scan_timeout: float, open_reader: Callable[[], R]) -> None:
        self._interval = interval
        self._scan_timeout = scan_timeout
        self._open_reader = open_reader
        self._reader: R | None = None
        self._scan: Scan[P, T] | None = None
        self._errors: Counter[str] = Counter(dict.fromkeys(ERROR_REASONS, 0))
        self._state = ScanState.WAITING
        self._detail = ""  # what went wrong, for NoDataError
        self._logged: str | None = None  # the failure last logged, until a scan goes clean
        self._served = self._serving()

    @property
    def interval(self) -> float:
        return self._interval

    # -- what a subclass writes ---------------------------------------------------------

    def _prepare(self) -> P:
        """Read what the dump needs (raise SourceAbsent when the kernel lacks the feature)."""
        raise NotImplementedError

    def _dump(self, reader: R, prepared: P, bounds: DumpBounds) -> tuple[T, DumpResult]:
        """One dump into a fresh tally."""
        raise NotImplementedError

    def _families(self, scan: Scan[P, T]) -> list[Metric]:
        """The collector's own families of a scan."""
        raise NotImplementedError

    def _scan_counts(self, scan: Scan[P, T]) -> list[Metric]:
        """The families that say what the scan read, served among the health families."""
        raise NotImplementedError

    # -- background ---------------------------------------------------------------------

    def scan(self, stop: threading.Event | None = None) -> None:
        """One scan (a BackgroundJob's work); `stop` set cancels it without counting."""
        if self._state is ScanState.REFUSED:
            return  # refused once, refused for good: capabilities do not come back
        errors_before = self._errors.total()
        try:
            self._scan = self._scan_once(stop)
            self._state, self._detail = ScanState.SCANNED, ""
        except DumpCancelled:
            return
        except SourceAbsent as exc:
            self._state, self._detail = ScanState.ABSENT, str(exc)
        except _PrepareFailed as exc:
            self._count_error(exc.reason, exc.cause)
        except Exception as exc:
            self._count_error(_dump_reason(exc), exc)
        if self._errors.total() == errors_before:
            self._logged = None  # a clean scan: the next failure is news again
        self._served = self._serving()

    def _scan_once(self, stop: threading.Event | None) -> Scan[P, T]:
        try:
            prepared = self._prepare()
        except (OSError, ValueError) as exc:  # an unreadable or garbled /proc file
            raise _PrepareFailed(exc) from exc
        started = time.monotonic()
        bounds = DumpBounds.within(self._scan_timeout, stop)
        if self._reader is None:
            self._reader = self._open_reader()
        for attempt in (1, 2):
            tally, result = self._dump(self._reader, prepared, bounds)
            if not result.interrupted:
                break
            if attempt == 2:  # take what we have, and count it
                self._count_error("interrupted", None)
        tally.finish()
        return Scan(prepared, tally, result.complete, time.monotonic() - started, time.time())

    def _count_error(self, reason: str, exc: Exception | None) -> None:
        self._errors[reason] += 1
        log = logging.getLogger(type(self).__module__)
        if reason == "permission":
            self._state, self._detail = ScanState.REFUSED, self.refusal
            log.warning(self.refusal)
            return
        failure = f"{reason}: {exc}" if exc is not None else reason
        if self._scan is None:
            self._state, self._detail = ScanState.FAILED, failure
        # Once per failure, not once per interval: the counter says how often it recurs.
        if failure != self._logged:
            self._logged = failure
            # A traceback only for an exception nothing here expects, where it shows the bug.
            expected = exc is None or isinstance(exc, OSError | ValueError)
            log.warning(
                f"{self.scan_name} scan failed",
                extra={"reason": reason, "err": str(exc)},
                exc_info=None if expected else exc,
            )

    def _serving(self) -> _Served:
        errors = CounterMetricFamily(
            f"{self.metric_prefix}_scan_errors",
            f"{self.subject.capitalize()} scans that failed or were inconsistent, by reason.",
            labels=["reason"],
        )
        for reason, count in self._errors.items():
            errors.add_metric([reason], count)
        # Also after a failed scan: the last good result is served with new error counts.
        metrics = None
        if self._scan is not None:
            metrics = [*self._families(self._scan), *self._health_families(self._scan, errors)]
        why = f"no {self.subject} scan to serve: {self._state.value}"
        return _Served(metrics, errors, f"{why}: {self._detail}" if self._detail else why)

    def _health_families(self, scan: Scan[P, T], errors: Metric) -> list[Metric]:
        prefix, subject = self.metric_prefix, self.subject
        return [
            GaugeMetricFamily(
                f"{prefix}_scan_duration_seconds",
                f"How long the last {subject} scan took.",
                value=scan.duration,
            ),
            GaugeMetricFamily(
                f"{prefix}_scan_timestamp_seconds",
                f"When the last {subject} scan finished (Unix time).",
                value=scan.finished_at,
            ),
            GaugeMetricFamily(
                f"{prefix}_scan_interval_seconds",
                f"The configured seconds between {subject} scans (interval_seconds): how old "
                f"_scan_timestamp_seconds may grow.",
                value=self._interval,
            ),
            *self._scan_counts(scan),
            errors,
        ]

    # -- scrape and lifecycle -----------------------------------------------------------

    def collect(self) -> Collected:
        served = self._served
        if served.metrics is None:
            raise NoDataError(served.why, [served.errors])
        return Collected("netlink", served.metrics)

    def close(self) -> None:
        """Close the reader; the scanner that calls scan() must have stopped."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def _dump_reason(exc: Exception) -> str:
    """The reason label of what the dump raised (opening its socket included)."""
    if isinstance(exc, OSError):  # NetlinkError, or a netlink socket that cannot be opened
        return error_reason(exc)
    return "parse" if isinstance(exc, NetlinkParseError) else "other"


def error_reason(exc: OSError) -> str:
    if exc.errno in (errno.EPERM, errno.EACCES):
        return "permission"
    if isinstance(exc, NetlinkTimeout):
        return "timeout"
    if exc.errno == errno.ENOBUFS:
        return "no_buffer_space"
    return "other"
