"""Who fills the conntrack table: breakdowns, top talkers and SNAT port pools.

A full dump costs O(entries), so it runs in the background scanner (see scanner.py) at its
own interval, bounded by a budget: past `max_entries` the dump stops and the counts are
scaled up. Dump order follows the hash buckets, so the entries read are a uniform sample.
Scrapes only turn the last scan's tallies into metrics.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from conntrack_exporter.collectors.background import BackgroundScanCollector, Scan, SourceAbsent
from conntrack_exporter.config import NON_NEGATIVE, PORT_RANGE, SECONDS
from conntrack_exporter.netlink.ctnetlink import ConntrackTableReader
from conntrack_exporter.netlink.cttable import (
    NO_STATE,
    PORT_PROTOCOLS,
    STATUS_FLAGS,
    TCP_STATE_NAMES,
    TableTally,
    decode_kind,
    decode_nat_pool,
    status_names,
)
from conntrack_exporter.netlink.socket import DumpBounds, DumpResult
from conntrack_exporter.netlink.tally import (
    FAMILY_NAMES,
    PROTOCOL_NAMES,
    decode_address,
    decode_destination,
    top,
)
from conntrack_exporter.procfs import CONNTRACK_COUNT_FILE
from conntrack_exporter.registry import CollectorContext

CACHED = "From the last background table scan"
# SNAT maps ICMP echo ids, not ports, and picks them from the whole 16-bit range.
ICMP_NAMES = frozenset({"icmp", "icmpv6"})
ICMP_ID_POOL = 65536


@dataclass(frozen=True)
class ConntrackTableOptions:
    interval_seconds: float = field(default=30.0, metadata={"check": SECONDS})
    # The whole scan's bound; netlink.timeout_seconds bounds only the kernel's silence.
    scan_timeout_seconds: float = field(default=120.0, metadata={"check": SECONDS})
    # Entries read per scan at most; 0 reads the whole table however large.
    max_entries: int = field(default=250_000, metadata={"check": NON_NEGATIVE})
    # How many sources, destinations and NAT pools to name; 0 turns those families off.
    top_k: int = field(default=10, metadata={"check": NON_NEGATIVE})
    label_ct_zone: bool = False
    label_mark: bool = False
    # The ports SNAT/masquerade picks from (the kernel's default without --to-ports).
    nat_port_range: str = field(default="1024-65535", metadata={"check": PORT_RANGE})


# A scan of the table: the table's size when it started (from procfs), and its tally.
TableScan = Scan[int, TableTally]


class ConntrackTableCollector(BackgroundScanCollector[ConntrackTableReader, int, TableTally]):
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
        super().__init__(
            options.interval_seconds, options.scan_timeout_seconds, context.readers.conntrack_table
        )
        self._options = options
        self._procfs = context.procfs
        low, _, high = options.nat_port_range.partition("-")
        self._pool_size = int(high) - int(low) + 1

    # -- background ---------------------------------------------------------------------

    def _prepare(self) -> int:
        try:
            return self._procfs.read_int(CONNTRACK_COUNT_FILE)
        except FileNotFoundError:
            raise SourceAbsent("conntrack is not loaded") from None

    def _dump(
        self, reader: ConntrackTableReader, prepared: int, bounds: DumpBounds
    ) -> tuple[TableTally, DumpResult]:
        tally = TableTally(
            self._options.label_ct_zone,
            self._options.label_mark,
            stop_after=self._options.max_entries,
        )
        return tally, reader.dump(tally, bounds)

    # -- the families, built once per scan ----------------------------------------------

    def _families(self, scan: TableScan) -> list[Metric]:
        tally = scan.tally
        scale = _table_size(scan) / tally.entries if not scan.complete and tally.entries else 1.0
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

    def _scan_counts(self, scan: TableScan) -> list[Metric]:
        ratio = 1.0 if scan.complete else scan.tally.entries / _table_size(scan)
        return [
            GaugeMetricFamily(
                "conntrack_table_scan_entries",
                "Entries the last table scan read.",
                value=scan.tally.entries,
            ),
            GaugeMetricFamily(
                "conntrack_table_scan_sample_ratio",
                "Entries the last scan read over the table's size: 1 for a full scan, less "
                "when collectors.conntrack_table.max_entries stopped it and counts are scaled.",
                value=ratio,
            ),
        ]


def _table_size(scan: TableScan) -> int:
    """Entries in the table: its count when the scan started, or more if it read more."""
    return max(scan.prepared, scan.tally.entries)


def _tcp_state_name(state: int) -> str:
    return TCP_STATE_NAMES[state] if 0 <= state < len(TCP_STATE_NAMES) else "other"


def _destination_labels(destination: tuple[str, int, int]) -> tuple[str, str, str]:
    """(address, protocol name, port or "" for protocols without ports)."""
    address, protocol, port = destination
    port_label = str(port) if protocol in PORT_PROTOCOLS else ""
    return address, PROTOCOL_NAMES.get(protocol, "other"), port_label
