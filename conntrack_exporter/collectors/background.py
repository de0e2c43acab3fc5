"""What the collectors fed by a background scan share: failures, retries and scan health.

conntrack_table and socket_ports dump a kernel table in the scanner's thread (see scanner.py)
and serve the metric families of their last good scan. Around each dump the bookkeeping is the
same: failures counted by reason and logged once, a refusal that stops scanning for good, one
retry of a dump the kernel flagged as interrupted, the families rebuilt once per scan, and the
scan health families (`<prefix>_scan_duration_seconds`, `_timestamp_seconds`,
`_errors_total{reason}`). Whatever a scan raises is counted here, procfs trouble and bugs
included: nothing reaches the scanner's last-resort handler uncounted.
"""

from __future__ import annotations

import errno
import logging
from collections import Counter
from collections.abc import Callable
from typing import ClassVar, Generic, TypeVar

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from conntrack_exporter.netlink import NetlinkParseError, NetlinkTimeout
from conntrack_exporter.netlink.socket import DumpResult
from conntrack_exporter.registry import Collected, NoDataError

ERROR_REASONS = ("permission", "timeout", "no_buffer_space", "interrupted", "parse", "other")

R = TypeVar("R")  # a collector's scan result
T = TypeVar("T")


class BackgroundScanCollector(Generic[R]):
    """Base of a collector whose data comes from a periodic dump (a scanner BackgroundJob).

    A subclass implements `_scan()`, which publishes a result through `_publish()`, and
    `_families(result)`, which turns it into every family a scrape serves. Scrapes cost a list
    read: the families are built once per scan, in the scanner's thread.
    """

    metric_prefix: ClassVar[str]  # e.g. "conntrack_table"
    subject: ClassVar[str]  # what is scanned, in HELP and NoDataError texts: "table"
    scan_name: ClassVar[str]  # in log messages: "conntrack table"
    refusal: ClassVar[str]  # the warning logged once when the kernel refuses the dump

    def __init__(self) -> None:
        self._result: R | None = None  # the last good scan
        self._metrics: list[Metric] | None = None  # its families, served to every scrape
        self._errors: Counter[str] = Counter(dict.fromkeys(ERROR_REASONS, 0))
        self._failure: str | None = None  # why there is no result, for the scrape to say
        self._logged: str | None = None  # the failure last logged, until a scan goes clean

    # -- background ---------------------------------------------------------------------

    def scan(self) -> None:
        if self._failure == "permission":
            return  # refused once, refused for good: capabilities do not come back
        errors_before = self._errors.total()
        try:
            self._scan()
        except Exception as exc:  # what _counted does not expect: a procfs file, or a bug
            self._count_error("parse" if isinstance(exc, ValueError) else "other", exc)
        if self._errors.total() == errors_before:
            self._logged = None  # a clean scan: the next failure is news again
        # Also after a failed scan: the last good result is served with new error counts.
        if self._result is not None:
            self._metrics = self._families(self._result)

    def _scan(self) -> None:
        raise NotImplementedError

    def _families(self, result: R) -> list[Metric]:
        raise NotImplementedError

    def _publish(self, result: R) -> None:
        self._result = result
        self._failure = None

    def _counted(self, dump: Callable[[], T]) -> T | None:
        """dump(), its failure counted by reason instead of raised (None then)."""
        try:
            return dump()
        except OSError as exc:  # NetlinkError, or a netlink socket that cannot be opened
            self._count_error(error_reason(exc), exc)
        except NetlinkParseError as exc:
            self._count_error("parse", exc)
        return None

    def _retried(self, dump_once: Callable[[], tuple[T, DumpResult]]) -> tuple[T, bool]:
        """(data, complete) of dump_once(), run again once when the kernel flagged it
        interrupted (the table changed under the dump); after that, take what we have and
        count it."""
        for attempt in (1, 2):
            data, result = dump_once()
            if not result.interrupted:
                break
            if attempt == 2:
                self._count_error("interrupted", None)
        return data, result.complete

    def _count_error(self, reason: str, exc: Exception | None) -> None:
        self._errors[reason] += 1
        if reason == "permission":
            self._failure = reason
            logging.getLogger(type(self).__module__).warning(self.refusal)
            return
        failure = f"{reason}: {exc}"
        if self._result is None:
            self._failure = f"no {self.subject} scan has finished yet, the last failed: {failure}"
        # Once per failure, not once per interval: the counter says how often it recurs.
        if failure != self._logged:
            self._logged = failure
            self._log_failure(reason, exc)

    def _log_failure(self, reason: str, exc: Exception | None) -> None:
        # A traceback only for an exception nothing here expects, where it shows the bug.
        expected = exc is None or isinstance(exc, OSError | ValueError)
        logging.getLogger(type(self).__module__).warning(
            f"{self.scan_name} scan failed",
            extra={"reason": reason, "err": str(exc)},
            exc_info=None if expected else exc,
        )

    # -- scrape -------------------------------------------------------------------------

    def collect(self) -> Collected:
        metrics = self._metrics
        if metrics is None:
            raise NoDataError(self._failure or f"no {self.subject} scan has finished yet")
        return Collected("netlink", metrics)

    def _health_families(
        self, duration: float, finished_at: float, counts: list[Metric]
    ) -> list[Metric]:
        """The scan health families, with the collector's own `counts` of what it read."""
        prefix, subject = self.metric_prefix, self.subject
        errors = CounterMetricFamily(
            f"{prefix}_scan_errors",
            f"{subject.capitalize()} scans that failed or were inconsistent, by reason.",
            labels=["reason"],
        )
        for reason, count in self._errors.items():
            errors.add_metric([reason], count)
        return [
            GaugeMetricFamily(
                f"{prefix}_scan_duration_seconds",
                f"How long the last {subject} scan took.",
                value=duration,
            ),
            GaugeMetricFamily(
                f"{prefix}_scan_timestamp_seconds",
                f"When the last {subject} scan finished (Unix time).",
                value=finished_at,
            ),
            *counts,
            errors,
        ]


def error_reason(exc: OSError) -> str:
    if exc.errno in (errno.EPERM, errno.EACCES):
        return "permission"
    if isinstance(exc, NetlinkTimeout):
        return "timeout"
    if exc.errno == errno.ENOBUFS:
        return "no_buffer_space"
    return "other"
