"""The conntrack collector: table size, limit, hash size and the per-CPU event counters.

Netlink (ctnetlink) first; without CAP_NET_ADMIN the same values come from procfs.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from conntrack_exporter.netlink import NetlinkError
from conntrack_exporter.netlink.ctnetlink import ConntrackStatsReader, CpuStats
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
    "insert": "Entries inserted into the table",
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
# The kernel's per-CPU counters are u32 and wrap; Prometheus treats a wrap as a counter reset.
COUNTER_SOURCE = "ctnetlink *_GET_STATS_CPU or /proc/net/stat/nf_conntrack"

NETLINK_FORBIDDEN = (errno.EPERM, errno.EACCES)


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
        if self._reader is not None:
            try:
                return self._collect_netlink(self._reader, buckets)
            except NetlinkError as exc:
                if exc.errno not in NETLINK_FORBIDDEN:
                    raise
                self._drop_netlink(exc)
        return self._collect_procfs(buckets)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _drop_netlink(self, exc: NetlinkError) -> None:
        log.warning(
            "ctnetlink refused (needs CAP_NET_ADMIN); falling back to procfs, which has no "
            "per-CPU counters without CONFIG_NF_CONNTRACK_PROCFS. Grant the capability "
            "(e.g. `setcap cap_net_admin+ep`, or capabilities.add: [NET_ADMIN] in Kubernetes) "
            "to read over netlink",
            extra={"err": exc.strerror},
        )
        self.close()

    def _collect_netlink(self, reader: ConntrackStatsReader, buckets: int) -> Collected:
        totals = reader.global_stats()
        rows = _merge_rows(reader.cpu_stats(), reader.expect_cpu_stats())
        metrics = self._families(totals.entries, totals.max_entries, buckets, rows)
        return Collected("netlink", metrics)

    def _collect_procfs(self, buckets: int) -> Collected:
        entries = self._procfs.read_int(CONNTRACK_COUNT_FILE)
        limit = self._procfs.read_int(MAX_FILE)
        try:
            rows = parse_nf_conntrack_stat(self._procfs.read_text(STAT_FILE))
        except FileNotFoundError:
            rows = []  # a kernel without CONFIG_NF_CONNTRACK_PROCFS: counts only
        cpu_rows = [CpuStats(cpu, counters) for cpu, counters in enumerate(rows)]
        return Collected("procfs", self._families(entries, limit, buckets, cpu_rows))

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
        metrics: list[Metric] = [
            GaugeMetricFamily(
                "conntrack_entries",
                "Conntrack table entries in this network namespace "
                "(ctnetlink CTA_STATS_GLOBAL_ENTRIES or nf_conntrack_count).",
                value=entries,
            ),
            GaugeMetricFamily(
                "conntrack_entries_limit",
                "Most conntrack entries the kernel allows (ctnetlink "
                "CTA_STATS_GLOBAL_MAX_ENTRIES or nf_conntrack_max).",
                value=limit,
            ),
            GaugeMetricFamily(
                "conntrack_buckets",
                "Size of the conntrack hash table (nf_conntrack_buckets).",
                value=buckets,
            ),
        ]
        metrics.extend(counter_families(rows, self._per_cpu))
        return metrics


def _merge_rows(*sources: list[CpuStats]) -> list[CpuStats]:
    merged: dict[int, dict[str, int]] = {}
    for rows in sources:
        for row in rows:
            merged.setdefault(row.cpu, {}).update(row.counters)
    return [CpuStats(cpu, counters) for cpu, counters in sorted(merged.items())]


def counter_families(rows: Iterable[CpuStats], per_cpu: bool) -> list[Metric]:
    """One `conntrack_stat_<name>_total` family per counter, summed or labelled by CPU."""
    rows = [CpuStats(row.cpu, ALWAYS_PRESENT | row.counters) for row in rows]
    names = sorted({name for row in rows for name in row.counters} - RETIRED_COUNTERS)
    families = []
    for name in names:
        family = CounterMetricFamily(
            f"conntrack_stat_{name}",
            f"{COUNTER_HELP.get(name, 'Conntrack counter ' + name)} ({COUNTER_SOURCE}).",
            labels=["cpu"] if per_cpu else None,
        )
        if per_cpu:
            for row in rows:
                if name in row.counters:
                    family.add_metric([str(row.cpu)], row.counters[name])
        else:
            family.add_metric([], sum(row.counters.get(name, 0) for row in rows))
        families.append(family)
    return families
