"""Who fills the conntrack table: breakdowns, top talkers and SNAT port pools.

A full dump costs O(entries), so it runs in the background scanner (see scanner.py) at its
own interval, bounded by a budget: past `max_entries` the dump stops and the counts are
scaled up. Dump order follows the hash buckets, so the entries read are a uniform sample.
Scrapes only turn the last scan's tallies into metrics.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.samples import Sample

from conntrack_exporter.collectors.background import BackgroundScanCollector, Scan, SourceAbsent
from conntrack_exporter.config import NON_NEGATIVE, PORT_RANGE, SECONDS
from conntrack_exporter.netlink.ctnetlink import GRANT_NET_ADMIN, ConntrackTableReader
from conntrack_exporter.netlink.cttable import (
    NO_STATE,
    PORT_PROTOCOLS,
    STATUS_FLAGS,
    TCP_STATE_NAMES,
    NatPool,
    TableTally,
    decode_kind,
    decode_nat_pool,
    nat_address_key,
    split_pod_nat_pool,
    status_names,
)
from conntrack_exporter.netlink.socket import DumpBounds, DumpResult
from conntrack_exporter.netlink.tally import (
    FAMILY_NAMES,
    PROTOCOL_NAMES,
    address_key,
    decode_address,
    decode_destination,
    top,
)
from conntrack_exporter.pod_addresses import PodAddresses
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


class TableStart(NamedTuple):
    """What a table scan starts from: the table's size (from procfs), and the pods on this
    node with their addresses (from the pods collector's last discovery)."""

    size: int
    pods: PodAddresses


TableScan = Scan[TableStart, TableTally]


class ConntrackTableCollector(
    BackgroundScanCollector[ConntrackTableReader, TableStart, TableTally]
):
    name: ClassVar[str] = "conntrack_table"
    default_enabled: ClassVar[bool] = True
    options_type: ClassVar[type] = ConntrackTableOptions
    metric_prefix: ClassVar[str] = "conntrack_table"
    subject: ClassVar[str] = "table"
    scan_name: ClassVar[str] = "conntrack table"
    refusal: ClassVar[str] = (
        "conntrack table scan refused: dumping the table needs CAP_NET_ADMIN; the "
        "conntrack_table collector stays off (the conntrack collector still works). To scan, "
        + GRANT_NET_ADMIN
    )

    def __init__(self, options: ConntrackTableOptions, context: CollectorContext) -> None:
        super().__init__(
            options.interval_seconds, options.scan_timeout_seconds, context.readers.conntrack_table
        )
        self._options = options
        self._procfs = context.procfs
        self._pod_addresses = context.pod_addresses
        low, _, high = options.nat_port_range.partition("-")
        self._pool_size = int(high) - int(low) + 1

    # -- background ---------------------------------------------------------------------

    def _prepare(self) -> TableStart:
        try:
            size = self._procfs.read_int(CONNTRACK_COUNT_FILE)
        except FileNotFoundError:
            raise SourceAbsent("conntrack is not loaded") from None
        return TableStart(size, self._pod_addresses.current)

    def _dump(
        self, reader: ConntrackTableReader, prepared: TableStart, bounds: DumpBounds
    ) -> tuple[TableTally, DumpResult]:
        pods = prepared.pods
        tally = TableTally(
            self._options.label_ct_zone,
            self._options.label_mark,
            stop_after=self._options.max_entries,
            pod_of=pods.pod_of,
            pods=len(pods.pods),
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
        if scan.prepared.pods.pods:
            metrics.append(_pod_entries(scan, scale))
        if self._options.top_k:
            metrics += self._top_families(tally, scale, scan.prepared.pods)
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

    def _top_families(self, tally: TableTally, scale: float, pods: PodAddresses) -> list[Metric]:
        k = self._options.top_k
        sources = GaugeMetricFamily(
            "conntrack_table_top_source_entries",
            f"Entries of the {k} original-direction sources holding the most; a pod's address "
            f"also carries the pod's labels. {CACHED}.",
            labels=["address"],
        )
        for key, count in top(tally.sources, k):
            _add(sources, {"address": decode_address(key), **pods.labels_of(key)}, count * scale)
        destinations = GaugeMetricFamily(
            "conntrack_table_top_destination_entries",
            f"Entries of the {k} destinations (address, protocol, port) with the most; a pod's "
            f"address also carries the pod's labels. {CACHED}.",
            labels=["address", "protocol", "port"],
        )
        for key, count in top(tally.destinations, k):
            labels = _destination_labels(decode_destination(key))
            _add(destinations, {**labels, **pods.labels_of(address_key(key))}, count * scale)
        used = GaugeMetricFamily(
            "conntrack_nat_port_pool_used",
            f"Source ports SNAT/masquerade has taken toward one destination from one "
            f"translated address, for the {k} fullest pools; compare with "
            f"conntrack_nat_port_pool_size. {CACHED}.",
            labels=["protocol", "nat_address", "destination", "port"],
        )
        pools = top(tally.nat_pools, k)
        for key, count in pools:
            labels = _pool_labels(decode_nat_pool(key))
            _add(used, {**labels, **pods.labels_of(nat_address_key(key))}, count * scale)
        size = GaugeMetricFamily(
            "conntrack_nat_port_pool_size",
            "Source ports available to one SNAT pool (collectors.conntrack_table."
            "nat_port_range; the kernel's default range is 1024-65535). ICMP pools map echo "
            "ids: 65536.",
            labels=["protocol"],
        )
        protocols = {"tcp", "udp"} | {sample.labels["protocol"] for sample in used.samples}
        for protocol in sorted(protocols):
            size.add_metric([protocol], ICMP_ID_POOL if protocol in ICMP_NAMES else self._pool_size)
        families: list[Metric] = [sources, destinations, used, size]
        if pods.pods:
            families.append(self._pod_pools(tally, scale, pods, {key for key, _ in pools}))
        return families

    def _pod_pools(
        self, tally: TableTally, scale: float, pods: PodAddresses, reported: set[int]
    ) -> Metric:
        """The ports of each reported pool that each pod's entries took, the top_k pods of
        each pool: at most top_k squared series."""
        k = self._options.top_k
        family = GaugeMetricFamily(
            "conntrack_nat_port_pool_pod_used",
            f"Source ports of a pool of conntrack_nat_port_pool_used taken by one pod's "
            f"outbound connections, for the {k} pods taking the most from each. {CACHED}.",
            labels=["protocol", "nat_address", "destination", "port"],
        )
        by_pool: dict[int, dict[int, int]] = {}
        for key, count in tally.pod_nat_pools.items():
            pod, pool = split_pod_nat_pool(key)
            if pool in reported:
                by_pool.setdefault(pool, {})[pod] = count
        for pool, counts in sorted(by_pool.items()):
            labels = _pool_labels(decode_nat_pool(pool))
            for pod, count in top(counts, k):
                _add(family, {**labels, **pods.pods[pod]}, count * scale)
        return family

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
    return max(scan.prepared.size, scan.tally.entries)


def _tcp_state_name(state: int) -> str:
    return TCP_STATE_NAMES[state] if 0 <= state < len(TCP_STATE_NAMES) else "other"


def _destination_labels(destination: tuple[str, int, int]) -> dict[str, str]:
    """address, protocol name, and port ("" for protocols without ports)."""
    address, protocol, port = destination
    return {
        "address": address,
        "protocol": PROTOCOL_NAMES.get(protocol, "other"),
        "port": str(port) if protocol in PORT_PROTOCOLS else "",
    }


def _pool_labels(pool: NatPool) -> dict[str, str]:
    destination = _destination_labels(pool.destination)
    return {
        "protocol": destination["protocol"],
        "nat_address": pool.nat_address,
        "destination": destination["address"],
        "port": destination["port"],
    }


def _add(family: GaugeMetricFamily, labels: dict[str, str], value: float) -> None:
    """A sample with its own labels: a pod's carry the pod's on top of the family's."""
    family.samples.append(Sample(family.name, labels, round(value)))


def _pod_entries(scan: TableScan, scale: float) -> Metric:
    """Every pod's entries, each direction, zeros included: a pod is a series whatever it
    does, and there are no more of them than pods on the node."""
    family = GaugeMetricFamily(
        "conntrack_table_pod_entries",
        "Entries of the node's table whose original source is a pod on this node "
        "(direction outbound) or whose reply comes from it after DNAT, i.e. reached through "
        f"a Service (inbound), scaled up when the scan read a sample. {CACHED}.",
        labels=["direction"],
    )
    tally = scan.tally
    for pod, labels in enumerate(scan.prepared.pods.pods):
        _add(family, {**labels, "direction": "outbound"}, tally.pod_outbound[pod] * scale)
        _add(family, {**labels, "direction": "inbound"}, tally.pod_inbound[pod] * scale)
    return family
