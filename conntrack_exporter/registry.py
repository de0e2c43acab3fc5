"""The collector framework: the Collector protocol, and the exporter's view of all collectors.

Each collector turns kernel state into fresh metric families on every scrape. The registry
runs them one by one, times them, and isolates failures: a collector that raises reports
`conntrack_exporter_collector_success 0` while the others keep serving.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Protocol

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from conntrack_exporter import __version__
from conntrack_exporter.procfs import ProcFS

log = logging.getLogger(__name__)


class NoDataError(Exception):
    """The feature a collector reads is absent on this kernel (not an error worth a warning)."""


class Collected(NamedTuple):
    source: str  # where the values came from, e.g. "netlink" or "procfs"
    metrics: list[Metric]


@dataclass(frozen=True)
class CollectorContext:
    """What every collector may use: the procfs reader and the netlink deadline."""

    procfs: ProcFS
    netlink_timeout: float


class Collector(Protocol):
    name: ClassVar[str]
    default_enabled: ClassVar[bool]

    def collect(self) -> Collected: ...


class _Outcome(NamedTuple):
    name: str
    success: bool
    duration: float
    source: str | None


class ExporterCollector:
    """Runs every enabled collector for a scrape and adds the exporter's own health metrics."""

    def __init__(self, collectors: Sequence[Collector]) -> None:
        self.collectors = list(collectors)
        self._last_error: dict[str, str] = {}
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        outcomes = []
        for collector in self.collectors:
            outcome, metrics = self._run(collector)
            outcomes.append(outcome)
            yield from metrics
        yield from _health_metrics(outcomes)

    def _run(self, collector: Collector) -> tuple[_Outcome, list[Metric]]:
        started = time.perf_counter()
        try:
            collected = collector.collect()
        except NoDataError as exc:
            self._note_failure(collector.name, f"no data: {exc}", logging.DEBUG)
            return _Outcome(collector.name, False, time.perf_counter() - started, None), []
        except Exception as exc:
            self._note_failure(collector.name, f"{type(exc).__name__}: {exc}", logging.WARNING)
            return _Outcome(collector.name, False, time.perf_counter() - started, None), []
        self._note_success(collector.name)
        duration = time.perf_counter() - started
        return _Outcome(collector.name, True, duration, collected.source), collected.metrics

    def _note_failure(self, name: str, reason: str, level: int) -> None:
        # Log when a collector starts failing or fails differently, not on every scrape.
        with self._lock:
            if self._last_error.get(name) == reason:
                return
            self._last_error[name] = reason
        log.log(level, "collector failed", extra={"collector": name, "err": reason})

    def _note_success(self, name: str) -> None:
        if name in self._last_error:
            with self._lock:
                if self._last_error.pop(name, None) is not None:
                    log.info("collector recovered", extra={"collector": name})


def _health_metrics(outcomes: list[_Outcome]) -> Iterator[Metric]:
    success = GaugeMetricFamily(
        "conntrack_exporter_collector_success",
        "1 if the collector's last run succeeded, 0 if it failed or its source is absent.",
        labels=["collector"],
    )
    duration = GaugeMetricFamily(
        "conntrack_exporter_collector_duration_seconds",
        "Time the collector's last run took.",
        labels=["collector"],
    )
    source = GaugeMetricFamily(
        "conntrack_exporter_source_info",
        "Which kernel interface served the collector's values: netlink or procfs.",
        labels=["collector", "source"],
    )
    for outcome in outcomes:
        success.add_metric([outcome.name], 1.0 if outcome.success else 0.0)
        duration.add_metric([outcome.name], outcome.duration)
        if outcome.source is not None:
            source.add_metric([outcome.name, outcome.source], 1.0)
    build = GaugeMetricFamily(
        "conntrack_exporter_build_info",
        "A constant 1 labelled with the exporter's version and the Python it runs on.",
        labels=["version", "python_version"],
    )
    build.add_metric([__version__, platform.python_version()], 1.0)
    return iter((success, duration, source, build))
