"""The socket_ports collector: ephemeral ports in use toward each destination.

A node that opens connections to one destination (address, port) faster than they leave
TIME_WAIT runs out of local ports for it: connect() fails with EADDRNOTAVAIL, whatever the
conntrack table says. A background sock_diag dump (see scanner.py and netlink/inet_diag.py)
counts, per destination, the TCP and UDP sockets whose local port the kernel could have picked
as an ephemeral one: inside net.ipv4.ip_local_port_range, outside ip_local_reserved_ports (both
read from procfs at each scan), and not a TCP listener's port (the sockets a listener accepted
carry it). Unconnected UDP sockets and bound-only TCP sockets draw from the same range without
a destination: they count under destination="".

Past `max_sockets` the scan stops and the counts are lower bounds. Unlike conntrack_table's
they are not scaled up: the kernel filters the dump by port, so what share of the sockets the
scan walked is unknown. Scrapes only serve the families of the last scan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from conntrack_exporter.collectors.background import BackgroundScanCollector, Scan, SourceAbsent
from conntrack_exporter.config import NON_NEGATIVE, SECONDS
from conntrack_exporter.netlink.inet_diag import PortTally, SockDiagReader
from conntrack_exporter.netlink.socket import DumpBounds, DumpResult
from conntrack_exporter.netlink.tally import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    PROTOCOL_NAMES,
    decode_destination,
    top,
)
from conntrack_exporter.procfs import ephemeral_port_flags, parse_port_range, parse_port_ranges
from conntrack_exporter.registry import CollectorContext

RANGE_FILE = "sys/net/ipv4/ip_local_port_range"
RESERVED_FILE = "sys/net/ipv4/ip_local_reserved_ports"
CACHED = "From the last background socket scan (sock_diag SOCK_DIAG_BY_FAMILY dump)"
SCANNED_PROTOCOLS = (IPPROTO_TCP, IPPROTO_UDP)


@dataclass(frozen=True)
class SocketPortsOptions:
    interval_seconds: float = field(default=30.0, metadata={"check": SECONDS})
    # The whole scan's bound; netlink.timeout_seconds bounds only the kernel's silence.
    scan_timeout_seconds: float = field(default=120.0, metadata={"check": SECONDS})
    # Sockets read per scan at most; 0 reads them all however many.
    max_sockets: int = field(default=1_000_000, metadata={"check": NON_NEGATIVE})
    # How many destinations to name in socket_ephemeral_ports_used; 0 turns that family off.
    top_k: int = field(default=10, metadata={"check": NON_NEGATIVE})


class EphemeralPorts(NamedTuple):
    """What a scan reads from procfs first: the range, and which ports of it count."""

    port_range: tuple[int, int]
    flags: bytes  # procfs.ephemeral_port_flags


PortScan = Scan[EphemeralPorts, PortTally]


class SocketPortsCollector(BackgroundScanCollector[SockDiagReader, EphemeralPorts, PortTally]):
    name: ClassVar[str] = "socket_ports"
    default_enabled: ClassVar[bool] = True
    options_type: ClassVar[type] = SocketPortsOptions
    metric_prefix: ClassVar[str] = "socket_ports"
    subject: ClassVar[str] = "socket"
    scan_name: ClassVar[str] = "socket port"
    refusal: ClassVar[str] = (
        "socket port scan refused: sock_diag needs no privilege, so a security policy "
        "(seccomp, an LSM) denies it; the socket_ports collector stays off"
    )

    def __init__(self, options: SocketPortsOptions, context: CollectorContext) -> None:
        super().__init__(
            options.interval_seconds, options.scan_timeout_seconds, context.readers.sock_diag
        )
        self._options = options
        self._procfs = context.procfs

    # -- background ---------------------------------------------------------------------

    def _prepare(self) -> EphemeralPorts:
        try:
            port_range = parse_port_range(self._procfs.read_text(RANGE_FILE))
            reserved = parse_port_ranges(self._procfs.read_text(RESERVED_FILE))
        except FileNotFoundError:
            raise SourceAbsent(f"no {RANGE_FILE} or {RESERVED_FILE} in procfs") from None
        return EphemeralPorts(port_range, ephemeral_port_flags(port_range, reserved))

    def _dump(
        self, reader: SockDiagReader, prepared: EphemeralPorts, bounds: DumpBounds
    ) -> tuple[PortTally, DumpResult]:
        tally = PortTally(stop_after=self._options.max_sockets)
        result = reader.dump_ports(tally, prepared.port_range, prepared.flags, bounds=bounds)
        return tally, result

    # -- the families, built once per scan ----------------------------------------------

    def _families(self, scan: PortScan) -> list[Metric]:
        tally = scan.tally
        metrics: list[Metric] = []
        k = self._options.top_k
        if k:
            used = GaugeMetricFamily(
                "socket_ephemeral_ports_used",
                f"Local ports of the ephemeral range (net.ipv4.ip_local_port_range less "
                f"ip_local_reserved_ports) that sockets hold toward one destination, for the "
                f'{k} destinations holding the most; destination="" for unconnected UDP and '
                f"bound-only TCP sockets. Listeners' ports are left out. {CACHED}.",
                labels=["protocol", "destination", "port"],
            )
            every: dict[int, int] = {}  # keys name their protocol: no clash
            for per_protocol in tally.destinations.values():
                every.update(per_protocol)
            for key, count in top(every, k):
                used.add_metric(_labels(key), count)
            metrics.append(used)
        largest = GaugeMetricFamily(
            "socket_ephemeral_ports_used_max",
            f"The most ephemeral ports held toward any one destination: the largest "
            f"socket_ephemeral_ports_used of the protocol, 0 with none. {CACHED}.",
            labels=["protocol"],
        )
        for protocol in SCANNED_PROTOCOLS:
            largest.add_metric([PROTOCOL_NAMES[protocol]], tally.largest(protocol))
        metrics.append(largest)
        return metrics

    def _scan_counts(self, scan: PortScan) -> list[Metric]:
        return [
            GaugeMetricFamily(
                "socket_ports_scan_sockets",
                "Sockets the last socket scan read: those whose local port lies in "
                "ip_local_port_range (the kernel filters out the others).",
                value=scan.tally.sockets,
            ),
            GaugeMetricFamily(
                "socket_ports_scan_complete",
                "1 if the last socket scan read every socket, 0 when "
                "collectors.socket_ports.max_sockets stopped it: counts are then lower bounds.",
                value=1.0 if scan.complete else 0.0,
            ),
        ]


def _labels(key: int) -> list[str]:
    """[protocol, destination, port] of a destination key; "" for no destination."""
    address, protocol, port = decode_destination(key)
    if not port:
        return [PROTOCOL_NAMES[protocol], "", ""]
    return [PROTOCOL_NAMES[protocol], address, str(port)]
