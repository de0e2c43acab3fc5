"""The conntrack collector: table size, limit, hash size and the per-CPU event counters.

Netlink (ctnetlink) first; without CAP_NET_ADMIN the same values come from procfs. The counters
are the kernel's 32-bit ones accumulated across wraps (counters.WrappingCounters), whichever
interface served them.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from prometheus_client.metrics_core import Metric

from conntrack_exporter.counters import WrappingCounters
from conntrack_exporter.families import NO_LABELS, Family, counter, gauge
from conntrack_exporter.netlink import NetlinkError
from conntrack_exporter.netlink.ctnetlink import GRANT_NET_ADMIN, ConntrackStatsReader, CpuStats
from conntrack_exporter.procfs import CONNTRACK_COUNT_FILE, parse_nf_conntrack_stat
from conntrack_exporter.registry import Collected, CollectorContext, NoDataError

log = logging.getLogger(__name__)

MAX_FILE = "sys/net/netfilter/nf_conntrack_max"
BUCKETS_FILE = "sys/net/netfilter/nf_conntrack_buckets"
STAT_FILE = "net/stat/nf_conntrack"

# The kernel marks these "no longer used" and reports them as 0 at best: not worth a series.
RETIRED_COUNTERS = frozenset({"searched", "new", "delete", "delete_list"})
# Retired too, but part of our metric contract (node_exporter has it): 0 when not reported.
ALWAYS_PRESENT = {"ignore": 0}

COUNTER_HELP = {
    "found": "Lookups that found an existing entry",
    "invalid": "Packets that conntrack could not track",
    "ignore": "Packets already tracked or untracked (retired by the kernel, always 0)",
    # Current kernels count no insert on the packet path: only ctnetlink's (README).
    "insert": "Entries inserted through ctnetlink (conntrack -I), not by the packet path: 0 "
    "on most nodes, however busy",
    "insert_failed": "Entries that failed to insert, e.g. a clash race (DNS stall signature)",
    "drop": "Packets dropped because the table was full and no entry could be evicted",
    "early_drop": "Entries evicted to make room in a full table",
    "error": "Packets with errors, e.g. ICMP errors that matched no entry",
    "search_restart": "Table lookups restarted because the table changed under them",
    "clash_resolve": "Insert clashes resolved by reusing the existing entry",
    "chaintoolong": "Packets dropped because a hash chain grew too long",
    "expect_new": "Expectations added",
    "expect_create": "Expectations created",
    "expect_delete": "Expectations deleted",
}
# The kernel's per-CPU counters are u32 and wrap; ours add up each CPU's advances instead, so
# that a wrap is no counter reset (see counters.py).
COUNTER_SOURCE = (
    "ctnetlink *_GET_STATS_CPU or /proc/net/stat/nf_conntrack; "
    "the kernel's 32-bit per-CPU counters, accumulated across wraps"
)

NETLINK_FORBIDDEN = (errno.EPERM, errno.EACCES)
ENTRIES = gauge(
    "conntrack_entries",
    "Conntrack table entries in this network namespace "
    "(ctnetlink CTA_STATS_GLOBAL_ENTRIES or nf_conntrack_count).",
)
LIMIT = gauge(
    "conntrack_entries_limit",
    "Most conntrack entries the kernel allows (ctnetlink "
    "CTA_STATS_GLOBAL_MAX_ENTRIES or nf_conntrack_max).",
)
BUCKETS = gauge("conntrack_buckets", "Size of the conntrack hash table (nf_conntrack_buckets).")
_counter_families: dict[str, Family] = {}
_cpu_label_sets: dict[int, dict[str, str]] = {}


class _Reading(NamedTuple):
    source: str
    entries: int
    limit: int
    rows: list[CpuStats]  # the kernel's raw 32-bit values


@dataclass(frozen=True)
class ConntrackOptions:
    per_cpu: bool = False  # a `cpu` label on every counter instead of the sum over CPUs


class ConntrackCollector:
    name: ClassVar[str] = "conntrack"
    default_enabled: ClassVar[bool] = True
    options_type: ClassVar[type] = ConntrackOptions

    def __init__(self, options: ConntrackOptions, context: CollectorContext) -> None:
        self._per_cpu = options.per_cpu
        self._procfs = context.procfs
        self._reader = self._open_netlink(context.readers.conntrack_stats)
        # Kept across reloads: a reload that started the totals afresh from the kernel's sum
        # would make a CPU that had wrapped read as a counter reset, at every SIGHUP.
        self._counters = context.lasting.get(
            f"conntrack.counters:{context.procfs.root}", WrappingCounters
        )

    def _open_netlink(
        self, open_reader: Callable[[], ConntrackStatsReader]
    ) -> ConntrackStatsReader | None:
        try:
            return open_reader()
        except OSError as exc:
            log.warning(
                "netfilter netlink unavailable, reading conntrack from procfs",
                extra={"err": str(exc)},
            )
            return None

    def collect(self) -> Collected:
        # Checked before any netlink request: asking ctnetlink about an absent conntrack
        # makes the kernel load the modules, a change this exporter must not cause.
        buckets = self._buckets()
        # One scrape at a time from the reading to the accounting: the counters must see the
        # readings in the order they were taken, or an older reading applied after a newer one
        # would count as a wrap of nearly 2^32. The netlink socket serializes requests anyway.
        with self._counters.lock:
            reading = self._read()
            rows = self._counters.update(reading.rows)
        metrics = self._families(reading.entries, reading.limit, buckets, rows)
        return Collected(reading.source, metrics)

    def _read(self) -> _Reading:
        if self._reader is not None:
            try:
                return self._read_netlink(self._reader)
            except NetlinkError as exc:
                if exc.errno not in NETLINK_FORBIDDEN:
                    raise
                self._drop_netlink(exc)
        return self._read_procfs()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _drop_netlink(self, exc: NetlinkError) -> None:
        log.warning(
            "ctnetlink refused (needs CAP_NET_ADMIN); falling back to procfs, which has no "
            "per-CPU counters without CONFIG_NF_CONNTRACK_PROCFS. To read over netlink, "
            + GRANT_NET_ADMIN,
            extra={"err": exc.strerror},
        )
        self.close()

    def _read_netlink(self, reader: ConntrackStatsReader) -> _Reading:
        totals = reader.global_stats()
        rows = _merge_rows(reader.cpu_stats(), reader.expect_cpu_stats())
        return _Reading("netlink", totals.entries, totals.max_entries, rows)

    def _read_procfs(self) -> _Reading:
        entries = self._procfs.read_int(CONNTRACK_COUNT_FILE)
        limit = self._procfs.read_int(MAX_FILE)
        try:
            rows = parse_nf_conntrack_stat(self._procfs.read_text(STAT_FILE))
        except FileNotFoundError:
            rows = []  # a kernel without CONFIG_NF_CONNTRACK_PROCFS: counts only
        # The file's rows carry no CPU number. Like ctnetlink's per-CPU replies (whose res_id
        # is the CPU), they are the *possible* CPUs in ascending order: ct_cpu_seq_start and
        # ctnetlink_ct_stat_cpu_dump both skip !cpu_possible. So row i is CPU i wherever the
        # possible CPUs are 0..n-1, as on nearly every machine. Where the mask has holes, row i
        # is the i-th possible CPU: if netlink named as many CPUs before it was refused, its
        # numbers are reused, so that each row carries on its own CPU's total; otherwise the
        # rows are numbered 0..n-1 and the `cpu` label differs from what netlink would say.
        seen = self._counters.cpus()
        numbers = seen if len(seen) == len(rows) else range(len(rows))
        cpu_rows = [CpuStats(cpu, counters) for cpu, counters in zip(numbers, rows, strict=True)]
        return _Reading("procfs", entries, limit, cpu_rows)

    def _buckets(self) -> int:
        try:
            return self._procfs.read_int(BUCKETS_FILE)
        except FileNotFoundError:
            raise NoDataError(
                f"{self._procfs.path(BUCKETS_FILE)} is absent: conntrack is not loaded"
            ) from None

    def _families(
        self, entries: int, limit: int, buckets: int, rows: list[CpuStats]
    ) -> list[Metric]:
        metrics = [ENTRIES.build_one(entries), LIMIT.build_one(limit), BUCKETS.build_one(buckets)]
        metrics.extend(counter_families(rows, self._per_cpu))
        return metrics


def _merge_rows(*sources: list[CpuStats]) -> list[CpuStats]:
    merged: dict[int, dict[str, int]] = {}
    for rows in sources:
        for row in rows:
            merged.setdefault(row.cpu, {}).update(row.counters)
    return [CpuStats(cpu, counters) for cpu, counters in sorted(merged.items())]


def counter_help(name: str) -> str:
    """The HELP of conntrack_stat_<name>_total, whoever reports it (the pods collector too)."""
    return f"{COUNTER_HELP.get(name, 'Conntrack counter ' + name)} ({COUNTER_SOURCE})."


def counter_family(name: str) -> Family:
    """conntrack_stat_<name>_total's family, whoever reports it (the pods collector too)."""
    family = _counter_families.get(name)
    if family is None:
        family = _counter_families[name] = counter(f"conntrack_stat_{name}", counter_help(name))
    return family


def counter_families(rows: Iterable[CpuStats], per_cpu: bool) -> list[Metric]:
    """One `conntrack_stat_<name>_total` family per counter, summed or labelled by CPU.

    `rows` hold the running totals of WrappingCounters.update(), one row per CPU.
    """
    rows = [CpuStats(row.cpu, ALWAYS_PRESENT | row.counters) for row in rows]
    names = sorted({name for row in rows for name in row.counters} - RETIRED_COUNTERS)
    families: list[Metric] = []
    for name in names:
        family = counter_family(name)
        if per_cpu:
            samples = [
                family.sample(_cpu_labels(row.cpu), row.counters[name])
                for row in rows
                if name in row.counters
            ]
        else:
            samples = [family.sample(NO_LABELS, sum(row.counters.get(name, 0) for row in rows))]
        families.append(family.build(samples))
    return families


def _cpu_labels(cpu: int) -> dict[str, str]:
    labels = _cpu_label_sets.get(cpu)
    if labels is None:
        labels = _cpu_label_sets[cpu] = {"cpu": str(cpu)}
    return labels
