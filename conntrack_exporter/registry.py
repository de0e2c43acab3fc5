"""The collector framework: the collector contract, and the exporter's view of all collectors.

Each collector turns kernel state into fresh metric families on every scrape. The registry
runs them one by one, times them, and isolates failures: a collector that raises reports
`conntrack_exporter_collector_success 0` while the others keep serving.

The contract, checked statically (mypy, in `make lint`) against every class of the collector
table (collectors.COLLECTORS):

- class attributes `name` (its config key and label), `default_enabled`, and `options_type`,
  a frozen dataclass whose fields are the keys `collectors.NAME.*` (validated by config.py);
- a constructor `Cls(options, context)`: options of `options_type`, and a CollectorContext,
  through which alone it reaches the kernel (procfs, and netlink reader factories), and which
  keeps what must outlive a reload (`context.lasting`);
- `collect() -> Collected`, called once per collection (the scrapes that arrive while one runs
  share it), on any of the server's worker threads; it raises NoDataError when the kernel lacks
  the feature and any other exception when it fails;
- `close()`: releases whatever the constructor or collect() opened (netlink sockets, kept-open
  /proc fds). Called once, after the last collect(), and after the scanner that drives a
  background collector has stopped. An open /proc/PID/net fd keeps a network namespace alive.

A collector whose data comes from a periodic scan is also a scanner.BackgroundJob.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple, Protocol, TypeVar

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from conntrack_exporter import __version__
from conntrack_exporter.exposition import SupportsCollect
from conntrack_exporter.families import gauge
from conntrack_exporter.netlink.ctnetlink import ConntrackStatsReader, ConntrackTableReader
from conntrack_exporter.netlink.inet_diag import SockDiagReader
from conntrack_exporter.pod_addresses import PodAddressBook
from conntrack_exporter.procfs import ProcFS
from conntrack_exporter.revision import revision
from conntrack_exporter.scanner import BackgroundJob, Scanner

log = logging.getLogger(__name__)
T = TypeVar("T")


class NoDataError(Exception):
    """The collector has nothing to serve now: the feature it reads is absent on this kernel,
    or (for a background collector) no scan has succeeded yet. Logged at debug, not as a
    warning. `metrics` are served all the same: a scan's error counts, say."""

    def __init__(self, message: str, metrics: Sequence[Metric] = ()) -> None:
        super().__init__(message)
        self.metrics = list(metrics)


class Collected(NamedTuple):
    source: str  # where the values came from, e.g. "netlink" or "procfs"
    metrics: list[Metric]


@dataclass(frozen=True)
class Readers:
    """Factories of the netlink readers, each opening a socket of its own: the seam where
    tests put a replayed or scripted reader instead of the kernel."""

    conntrack_stats: Callable[[], ConntrackStatsReader]
    conntrack_table: Callable[[], ConntrackTableReader]
    sock_diag: Callable[[], SockDiagReader]

    @classmethod
    def netlink(cls, timeout: float) -> Readers:
        """The real readers; `timeout` bounds the kernel's silence within an answer."""
        return cls(
            partial(ConntrackStatsReader, timeout),
            partial(ConntrackTableReader, timeout),
            partial(SockDiagReader, timeout),
        )


class Lasting:
    """State that outlives one configuration's collectors: made once per process and handed
    to every configuration's, so that a reload does not lose it (the conntrack counters'
    running totals: lost, a CPU that had wrapped would read as a counter reset)."""

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, key: str, make: Callable[[], T]) -> T:
        """The value kept under `key`, made by `make()` the first time it is asked for."""
        with self._lock:
            if key not in self._values:
                self._values[key] = make()
            value: T = self._values[key]
            return value


@dataclass(frozen=True)
class CollectorContext:
    """All a collector may reach the kernel through, the state it keeps across reloads, and
    what one configuration's collectors share: the pods' addresses, which the pods collector
    finds and the conntrack_table collector names pods by."""

    procfs: ProcFS
    readers: Readers
    lasting: Lasting = field(default_factory=Lasting)
    pod_addresses: PodAddressBook = field(default_factory=PodAddressBook)


class Collector(Protocol):
    """A collector instance (see the module's docstring)."""

    @property
    def name(self) -> str: ...

    def collect(self) -> Collected: ...

    def close(self) -> None: ...


class CollectorClass(Protocol):
    """A collector class, as the collector table lists it (see the module's docstring)."""

    name: str
    default_enabled: bool
    options_type: type

    def __call__(self, options: Any, context: CollectorContext) -> Collector: ...


@dataclass(frozen=True)
class CollectorStatus:
    """How a collector's last run went, in the last scrape that ran it: the landing page's."""

    success: bool
    finished: float  # seconds since the epoch
    duration: float
    source: str | None  # which interface served it, when it succeeded
    error: str | None  # why it failed, when it did


class CollectorSet:
    """The collectors of one configuration, and the scanner that runs the background ones.

    Started once and closed once. Scrapes use the collectors through `in_use()`; close()
    stops and joins the scanner, waits for the scrapes still using the collectors, then
    closes every collector, so that nothing is used after it is closed and nothing stays
    open after a reload. `last_runs` holds each collector's last run (a reload's new set
    starts with none).
    """

    def __init__(self, collectors: Sequence[Collector]) -> None:
        self.collectors = list(collectors)
        self.scanner = Scanner([c for c in self.collectors if isinstance(c, BackgroundJob)])
        self.last_runs: dict[str, CollectorStatus] = {}
        self._users = 0
        self._closed = False
        self._idle = threading.Condition()

    def statuses(self) -> list[tuple[str, CollectorStatus | None]]:
        """Each collector's name and last run, None before its first."""
        return [(c.name, self.last_runs.get(c.name)) for c in self.collectors]

    @property
    def names(self) -> list[str]:
        return [collector.name for collector in self.collectors]

    def start(self) -> None:
        self.scanner.start()

    @contextlib.contextmanager
    def in_use(self) -> Iterator[list[Collector] | None]:
        """The collectors, for one scrape; None once close() has begun."""
        with self._idle:
            if self._closed:
                yield None
                return
            self._users += 1
        try:
            yield self.collectors
        finally:
            with self._idle:
                self._users -= 1
                self._idle.notify_all()

    def close(self) -> None:
        self.scanner.stop()
        with self._idle:
            self._closed = True
            self._idle.wait_for(lambda: self._users == 0)
        for collector in self.collectors:
            try:
                collector.close()
            except Exception:  # one collector's trouble must not leave the others open
                log.exception("closing a collector failed", extra={"collector": collector.name})


class _Outcome(NamedTuple):
    name: str
    success: bool
    duration: float
    source: str | None


class ConfigReloads:
    """Whether the last load of the configuration succeeded, and when the last successful one
    was, as Prometheus' and Alertmanager's `config_last_reload_*`: the start-up load counts as
    one (a failed one ends the process), then each SIGHUP's."""

    def __init__(self) -> None:
        self.successful = True
        self.success_time = time.time()

    def succeeded(self) -> None:
        self.successful, self.success_time = True, time.time()

    def failed(self) -> None:
        self.successful = False

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "conntrack_exporter_config_last_reload_successful",
            "1 if the last load of the configuration files succeeded (at start, or on SIGHUP), "
            "0 if the last SIGHUP found problems and the previous configuration stayed.",
            value=1.0 if self.successful else 0.0,
        )
        yield GaugeMetricFamily(
            "conntrack_exporter_config_last_reload_success_timestamp_seconds",
            "When the configuration was last loaded successfully, in seconds since the epoch.",
            value=self.success_time,
        )


class ExporterCollector:
    """Runs every enabled collector for a scrape and adds the exporter's own health metrics,
    then `self_metrics`' families (the process's, the configuration's reload status)."""

    def __init__(self, active: CollectorSet, self_metrics: Sequence[SupportsCollect] = ()) -> None:
        self.active = active
        self.self_metrics = list(self_metrics)
        self._last_error: dict[str, str] = {}
        self._lock = threading.Lock()

    def replace(self, active: CollectorSet) -> CollectorSet:
        """Serve `active` from the next scrape on; return the set it replaces."""
        old, self.active = self.active, active
        return old

    def collect(self) -> Iterator[Metric]:
        outcomes: list[_Outcome] = []
        yield from _merged(self._collect_all(outcomes))
        yield from _health_metrics(outcomes)
        for source in self.self_metrics:
            yield from source.collect()

    def _collect_all(self, outcomes: list[_Outcome]) -> Iterator[Metric]:
        while True:
            active = self.active
            with active.in_use() as collectors:
                if collectors is None:
                    # Closed by a reload after this scrape read `active`: a reload replaces
                    # the set before it closes it, so a second read finds the new one.
                    if self.active is not active:
                        continue
                    collectors = []
                for collector in collectors:
                    outcome, error, metrics = self._run(collector)
                    outcomes.append(outcome)
                    active.last_runs[outcome.name] = CollectorStatus(
                        outcome.success, time.time(), outcome.duration, outcome.source, error
                    )
                    yield from metrics
                break

    def _run(self, collector: Collector) -> tuple[_Outcome, str | None, list[Metric]]:
        """The outcome, why it failed (None if it did not), and the families to serve."""
        started = time.perf_counter()
        try:
            collected = collector.collect()
        except NoDataError as exc:
            error = f"no data: {exc}"
            self._note_failure(collector.name, error, logging.DEBUG)
            outcome = _Outcome(collector.name, False, time.perf_counter() - started, None)
            return outcome, error, exc.metrics
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            self._note_failure(collector.name, error, logging.WARNING)
            outcome = _Outcome(collector.name, False, time.perf_counter() - started, None)
            return outcome, error, []
        self._note_success(collector.name)
        duration = time.perf_counter() - started
        return _Outcome(collector.name, True, duration, collected.source), None, collected.metrics

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


def _merged(metrics: Iterable[Metric]) -> list[Metric]:
    """One family per name: a family may appear only once in an exposition, and two
    collectors report some under one name (the host's socket_inuse and every pod's). The
    first family's HELP and type stand; the samples follow in the order collected."""
    merged: dict[str, Metric] = {}
    copied: set[str] = set()  # collectors may cache their families: merge into copies
    for metric in metrics:
        name = metric.name
        first = merged.get(name)
        if first is None:
            merged[name] = metric
        elif first.type != metric.type:  # a bug: the scrape goes on without the second
            log.error("two collectors report a family as two types", extra={"family": name})
        else:
            if name not in copied:
                first = merged[name] = _copy(first)
                copied.add(name)
            first.samples = [*first.samples, *metric.samples]
    return list(merged.values())


def _copy(metric: Metric) -> Metric:
    copy = Metric.__new__(Metric)
    copy.__dict__.update(metric.__dict__)
    return copy


SUCCESS = gauge(
    "conntrack_exporter_collector_success",
    "1 if the collector's last run succeeded, 0 if it failed or its source is absent.",
)
DURATION = gauge(
    "conntrack_exporter_collector_duration_seconds", "Time the collector's last run took."
)
SOURCE = gauge(
    "conntrack_exporter_source_info",
    "Which kernel interface served the collector's values: netlink or procfs.",
)
BUILD = gauge(
    "conntrack_exporter_build_info",
    "A constant 1 labelled with the exporter's version, the source revision it was built "
    "from (unknown when not recorded) and the Python it runs on.",
)


def _health_metrics(outcomes: list[_Outcome]) -> Iterator[Metric]:
    success, duration, source = [], [], []
    for outcome in outcomes:
        labels = {"collector": outcome.name}
        success.append(SUCCESS.sample(labels, 1.0 if outcome.success else 0.0))
        duration.append(DURATION.sample(labels, outcome.duration))
        if outcome.source is not None:
            source_labels = {"collector": outcome.name, "source": outcome.source}
            source.append(SOURCE.sample(source_labels, 1.0))
    build_labels = {
        "version": __version__,
        "revision": revision(),
        "python_version": platform.python_version(),
    }
    build = BUILD.build([BUILD.sample(build_labels, 1.0)])
    return iter((SUCCESS.build(success), DURATION.build(duration), SOURCE.build(source), build))
