"""Who fills the conntrack table: breakdowns, top talkers and SNAT port pools.

A full dump costs O(entries), so it runs in the background scanner (see scanner.py) at its
own interval, bounded by a budget: past `max_entries` the dump stops and the counts are
scaled up. Dump order follows the hash buckets, so the entries read are a uniform sample.
Scrapes only turn the last scan's tallies into metrics.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import ClassVar, NamedTuple

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from conntrack_exporter.checks import non_negative, port_range, seconds
from conntrack_exporter.collectors.background import BackgroundScanCollector
from conntrack_exporter.netlink.ctnetlink import ConntrackTableReader
from conntrack_exporter.netlink.cttable import (
    FAMILY_NAMES,
    NO_STATE,
    PORT_PROTOCOLS,
    PROTOCOL_NAMES,
    STATUS_FLAGS,
    TCP_STATE_NAMES,
    TableTally,
    decode_address,
    decode_destination,
    decode_kind,
    decode_nat_pool,
    status_names,
    top,
)
from conntrack_exporter.netlink.socket import DumpResult
from conntrack_exporter.registry import CollectorContext

COUNT_FILE = "sys/net/netfilter/nf_conntrack_count"
CACHED = "From the last background table scan"
# SNAT maps ICMP echo ids, not ports, and picks them from the whole 16-bit range.
ICMP_NAMES = frozenset({"icmp", "icmpv6"})
ICMP_ID_POOL = 65536


@dataclass(frozen=True)
class ConntrackTableOptions:
    interval_seconds: float = field(default=30.0, metadata={"check": seconds})
    # Entries read per scan at most; 0 reads the whole table however large.
    max_entries: int = field(default=250_000, metadata={"check": non_negative})
    # How many sources, destinations and NAT pools to name; 0 turns those families off.
    top_k: int = field(default=10, metadata={"check": non_negative})
    label_ct_zone: bool = False
    label_mark: bool = False
    # The ports SNAT/masquerade picks from (the kernel's default without --to-ports).
    nat_port_range: str = field(default="1024-65535", metadata={"check": port_range})


class ScanResult(NamedTuple):
    tally: TableTally
    table_size: int  # entries in the table when the scan started
    complete: bool
    duration: float
    finished_at: float  # Unix time


class ConntrackTableCollector(BackgroundScanCollector[ScanResult]):
    name: ClassVar[str] = "conntrack_table"
    default_enabled: ClassVar[bool] = True
    options_type: ClassVar[type] = ConntrackTableOptions
    metric_prefix: ClassVar[str] = "conntrack_table"
    subject: ClassVar[str] = "table"
    scan_name: ClassVar[str] = "conntrack table"
    refusal: ClassVar[str] = (
        "conntrack table scan refused: dumping the table needs CAP_NET_ADMIN; the "
        "conntrack_table collector stays off (the conntrack collector still works)"
    )

    def __init__(self, options: ConntrackTableOptions, context: CollectorContext) -> None:
        super().__init__()
        self._options = options
        self._procfs = context.procfs
        self._timeout = context.netlink_timeout
        self._reader: ConntrackTableReader | None = None
        low, _, high = options.nat_port_range.partition("-")
        self._pool_size = int(high) - int(low) + 1

    @property
    def interval(self) -> float:
        return self._options.interval_seconds

    # -- background ---------------------------------------------------------------------

    def _scan(self) -> None:
        try:
            table_size = self._procfs.read_int(COUNT_FILE)
        except FileNotFoundError:
            self._failure = "conntrack is not loaded"
            return
        started = time.monotonic()
        dumped = self._counted(self._dump)
        if dumped is None:
            return
        tally, complete = dumped
        tally.finish()
        self._publish(
            ScanResult(
                tally,
                max(table_size, tally.entries),
                complete,
                time.monotonic() - started,
                time.time(),
            )
        )

    def _dump(self) -> tuple[TableTally, bool]:
        if self._reader is None:
            self._reader = ConntrackTableReader(self._timeout)
        return self._retried(partial(self._dump_once, self._reader))

    def _dump_once(self, reader: ConntrackTableReader) -> tuple[TableTally, DumpResult]:
        tally = TableTally(
            self._options.label_ct_zone,
            self._options.label_mark,
            stop_after=self._options.max_entries,
        )
        return tally, reader.dump(tally)

    # -- the families, built once per scan ----------------------------------------------

    def _families(self, result: ScanResult) -> list[Metric]:
        return [*self._table_families(result), *self._scan_families(result)]

    def _table_families(self, result: ScanResult) -> list[Metric]:
        tally = result.tally
        scale = result.table_size / tally.entries if not result.complete and tally.entries else 1.0
        entries = GaugeMetricFamily(
            "conntrack_table_entries",
            f"Conntrack entries by family, protocol and TCP state. {CACHED} (ctnetlink "
            "IPCTNL_MSG_CT_GET dump), scaled up when the scan read a sample.",
            labels=["family", "protocol", "state", *self._extra_labels()],
        )
        for key, count in sorted(tally.kinds.items()):
            entries.add_metric(self._kind_labels(key), round(count * scale))
        statuses = GaugeMetricFamily(
            "conntrack_table_status_entries",
            f"Conntrack entries with a status: assured, unreplied, src_nat, dst_nat, offload. "
            f"{CACHED}.",
            labels=["status"],
        )
        by_status = Counter[str]()
        for bits, count in tally.statuses.items():
            for name in status_names(bits):
                by_status[name] += count
        for name in STATUS_FLAGS:
            statuses.add_metric([name], round(by_status[name] * scale))
        metrics: list[Metric] = [entries, statuses]
        if self._options.top_k:
            metrics += self._top_families(tally, scale)
        return metrics

    def _extra_labels(self) -> list[str]:
        return (["ct_zone"] if self._options.label_ct_zone else []) + (
            ["mark"] if self._options.label_mark else []
        )

    def _kind_labels(self, key: int) -> list[str]:
        kind = decode_kind(key)
        labels = [
            FAMILY_NAMES.get(kind.family, "other"),
            PROTOCOL_NAMES.get(kind.protocol, "other"),
            "" if kind.state == NO_STATE else _tcp_state_name(kind.state),
        ]
        if self._options.label_ct_zone:
            labels.append(str(kind.zone))
        if self._options.label_mark:
            labels.append(str(kind.mark))
        return labels

    def _top_families(self, tally: TableTally, scale: float) -> list[Metric]:
        k = self._options.top_k
        sources = GaugeMetricFamily(
            "conntrack_table_top_source_entries",
            f"Entries of the {k} original-direction sources holding the most. {CACHED}.",
            labels=["address"],
        )
        for key, count in top(tally.sources, k):
            sources.add_metric([decode_address(key)], round(count * scale))
        destinations = GaugeMetricFamily(
            "conntrack_table_top_destination_entries",
            f"Entries of the {k} destinations (address, protocol, port) with the most. {CACHED}.",
            labels=["address", "protocol", "port"],
        )
        for key, count in top(tally.destinations, k):
            destinations.add_metric(
                list(_destination_labels(decode_destination(key))), round(count * scale)
            )
        used = GaugeMetricFamily(
            "conntrack_nat_port_pool_used",
            f"Source ports SNAT/masquerade has taken toward one destination from one "
            f"translated address, for the {k} fullest pools; compare with "
            f"conntrack_nat_port_pool_size. {CACHED}.",
            labels=["protocol", "nat_address", "destination", "port"],
        )
        pool_protocols = {"tcp", "udp"}
        for key, count in top(tally.nat_pools, k):
            pool = decode_nat_pool(key)
            address, protocol, port = _destination_labels(pool.destination)
            pool_protocols.add(protocol)
            used.add_metric([protocol, pool.nat_address, address, port], round(count * scale))
        size = GaugeMetricFamily(
            "conntrack_nat_port_pool_size",
            "Source ports available to one SNAT pool (collectors.conntrack_table."
            "nat_port_range; the kernel's default range is 1024-65535). ICMP pools map echo "
            "ids: 65536.",
            labels=["protocol"],
        )
        for protocol in sorted(pool_protocols):
            size.add_metric([protocol], ICMP_ID_POOL if protocol in ICMP_NAMES else self._pool_size)
        return [sources, destinations, used, size]

    def _scan_families(self, result: ScanResult) -> list[Metric]:
        ratio = 1.0 if result.complete else result.tally.entries / result.table_size
        counts = [
            GaugeMetricFamily(
                "conntrack_table_scan_entries",
                "Entries the last table scan read.",
                value=result.tally.entries,
            ),
            GaugeMetricFamily(
                "conntrack_table_scan_sample_ratio",
                "Entries the last scan read over the table's size: 1 for a full scan, less "
                "when collectors.conntrack_table.max_entries stopped it and counts are scaled.",
                value=ratio,
            ),
        ]
        return self._health_families(result.duration, result.finished_at, counts)


def _tcp_state_name(state: int) -> str:
    return TCP_STATE_NAMES[state] if 0 <= state < len(TCP_STATE_NAMES) else "other"


def _destination_labels(destination: tuple[str, int, int]) -> tuple[str, str, str]:
    """(address, protocol name, port or "" for protocols without ports)."""
    address, protocol, port = destination
    port_label = str(port) if protocol in PORT_PROTOCOLS else ""
    return address, PROTOCOL_NAMES.get(protocol, "other"), port_label
