"""The socket collector: every kernel socket pool beside its limit, from procfs.

Counts and limits come from /proc/net/sockstat(6) and the sysctls that bound them; the
counters that say a pool ran out come from /proc/net/netstat, snmp and snmp6. A value the
running kernel does not have (a missing file or column) is left out, never reported as 0:
sockstat6 is absent without IPv6, and tcp_mem, udp_mem and tcp_max_orphans exist only in the
host's network namespace. Needs no privilege.

Every file is read on every scrape, over a file descriptor kept open (procfs.ProcFile).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from conntrack_exporter.families import NO_LABELS, Family, counter, gauge
from conntrack_exporter.procfs import (
    ProcFile,
    ProcFS,
    ephemeral_port_flags,
    parse_ints,
    parse_port_range,
    parse_port_ranges,
    parse_snmp6_values,
    parse_snmp_table,
    parse_sockstat,
)
from conntrack_exporter.registry import Collected, CollectorContext

SOCKSTAT_FILE = "net/sockstat"
SOCKSTAT6_FILE = "net/sockstat6"
NETSTAT_FILE = "net/netstat"
SNMP_FILE = "net/snmp"
SNMP6_FILE = "net/snmp6"
MAX_ORPHANS_FILE = "sys/net/ipv4/tcp_max_orphans"
MAX_TIMEWAIT_FILE = "sys/net/ipv4/tcp_max_tw_buckets"
TCP_MEM_FILE = "sys/net/ipv4/tcp_mem"
UDP_MEM_FILE = "sys/net/ipv4/udp_mem"
PORT_RANGE_FILE = "sys/net/ipv4/ip_local_port_range"
RESERVED_PORTS_FILE = "sys/net/ipv4/ip_local_reserved_ports"
FILE_NR_FILE = "sys/fs/file-nr"


INUSE = gauge(
    "socket_inuse",
    "Sockets in this network namespace that hold an address or port (bound, listening or "
    "connected), by address family and protocol (/proc/net/sockstat and sockstat6 inuse).",
)
# (family label, sockstat line, labels). FRAG lines count reassembly queues, not sockets.
INUSE_POOLS = [
    (family, line, {"family": family, "protocol": protocol})
    for family, suffix in (("ipv4", ""), ("ipv6", "6"))
    for line, protocol in (
        ("TCP" + suffix, "tcp"),
        ("UDP" + suffix, "udp"),
        ("UDPLITE" + suffix, "udplite"),
        ("RAW" + suffix, "raw"),
    )
]
ALLOCATED = gauge(
    "socket_allocated",
    "Sockets of every family (inet, unix, netlink, ...) open in this network namespace, bound "
    "or not (/proc/net/sockstat sockets: used).",
)
TCP_ALLOCATED = gauge(
    "socket_tcp_allocated",
    "TCP sockets allocated on the host, IPv4 and IPv6 in every network namespace, orphans "
    "included (/proc/net/sockstat TCP alloc).",
)
ORPHANS = gauge(
    "socket_tcp_orphans",
    "TCP sockets closed by their process but not yet finished, on the host "
    "(/proc/net/sockstat TCP orphan).",
)
ORPHANS_LIMIT = gauge(
    "socket_tcp_orphans_limit",
    "Most orphaned TCP sockets the kernel keeps before it resets them "
    "(net.ipv4.tcp_max_orphans, in the host's network namespace only).",
)
TIMEWAIT = gauge(
    "socket_tcp_timewait",
    "TCP sockets in TIME_WAIT in this network namespace, IPv4 and IPv6 "
    "(/proc/net/sockstat TCP tw).",
)
TIMEWAIT_LIMIT = gauge(
    "socket_tcp_timewait_limit",
    "Most TIME_WAIT sockets this network namespace keeps; past it they are destroyed at once "
    "(net.ipv4.tcp_max_tw_buckets).",
)
MEMORY = gauge(
    "socket_memory_bytes",
    "Memory charged to the protocol's socket buffers on the host "
    "(/proc/net/sockstat TCP and UDP mem, pages times the page size).",
)
MEMORY_POOLS = [("TCP", {"protocol": "tcp"}), ("UDP", {"protocol": "udp"})]
# tcp_mem and udp_mem: three page counts, in this order.
MEMORY_THRESHOLDS = [
    gauge(
        "socket_memory_min_bytes",
        "Socket buffer memory of the protocol below which the kernel does not regulate it "
        "(net.ipv4.tcp_mem or udp_mem min, in the host's network namespace only).",
    ),
    gauge(
        "socket_memory_pressure_bytes",
        "Socket buffer memory of the protocol above which the kernel is under memory pressure "
        "and shrinks buffers (net.ipv4.tcp_mem or udp_mem pressure, in the host's network "
        "namespace only).",
    ),
    gauge(
        "socket_memory_limit_bytes",
        "Most socket buffer memory the protocol may use on the host; past it allocations fail "
        "(net.ipv4.tcp_mem or udp_mem max, in the host's network namespace only).",
    ),
]
# TcpExt column -> family.
TCPEXT_COUNTERS = {
    "ListenOverflows": counter(
        "socket_listen_overflows",
        "Connections that completed the handshake while the listener's accept queue was full "
        "(/proc/net/netstat TcpExt ListenOverflows).",
    ),
    "ListenDrops": counter(
        "socket_listen_drops",
        "Connections dropped at a listening socket for any reason, overflows included "
        "(/proc/net/netstat TcpExt ListenDrops).",
    ),
    "TCPMemoryPressures": counter(
        "socket_tcp_memory_pressures",
        "Times TCP entered memory pressure, past tcp_mem's pressure threshold "
        "(/proc/net/netstat TcpExt TCPMemoryPressures).",
    ),
    "TCPAbortOnMemory": counter(
        "socket_tcp_aborts_on_memory",
        "TCP connections reset for lack of memory or because there were too many orphans "
        "(/proc/net/netstat TcpExt TCPAbortOnMemory).",
    ),
    "TCPTimeWaitOverflow": counter(
        "socket_tcp_timewait_overflows",
        "TIME_WAIT sockets not kept because tcp_max_tw_buckets was reached "
        "(/proc/net/netstat TcpExt TCPTimeWaitOverflow).",
    ),
}
# snmp's Udp column (snmp6 calls it Udp6<column>) -> family.
UDP_COUNTERS = {
    "RcvbufErrors": counter(
        "socket_udp_receive_buffer_errors",
        "UDP datagrams dropped because the receiving socket's buffer was full "
        "(/proc/net/snmp Udp RcvbufErrors, /proc/net/snmp6 Udp6RcvbufErrors).",
    ),
    "SndbufErrors": counter(
        "socket_udp_send_buffer_errors",
        "UDP datagrams not sent because the socket's send buffer was full "
        "(/proc/net/snmp Udp SndbufErrors, /proc/net/snmp6 Udp6SndbufErrors).",
    ),
    "InErrors": counter(
        "socket_udp_in_errors",
        "UDP datagrams received but not delivered, buffer and memory errors included "
        "(/proc/net/snmp Udp InErrors, /proc/net/snmp6 Udp6InErrors).",
    ),
    "MemErrors": counter(
        "socket_udp_memory_errors",
        "UDP datagrams dropped because UDP memory (udp_mem) was exhausted; absent on kernels "
        "without the counter (/proc/net/snmp Udp MemErrors, /proc/net/snmp6 Udp6MemErrors).",
    ),
}
UDP6_COLUMNS = ["Udp6" + column for column in UDP_COUNTERS]
# (snmp's column, snmp6's, family), in exposition order.
_UDP_COLUMNS = [
    (column, column6, family)
    for (column, family), column6 in zip(UDP_COUNTERS.items(), UDP6_COLUMNS, strict=True)
]
IPV4 = {"family": "ipv4"}
IPV6 = {"family": "ipv6"}
FILE_HANDLES = gauge(
    "socket_file_handles_allocated",
    "File handles allocated on the host, sockets among them (/proc/sys/fs/file-nr, first field).",
)
FILE_HANDLES_LIMIT = gauge(
    "socket_file_handles_limit",
    "Most file handles the kernel allocates (fs.file-max, /proc/sys/fs/file-nr third field).",
)
EPHEMERAL_RANGE = gauge(
    "socket_ephemeral_ports_range_size",
    "Local ports the kernel may pick for outgoing connections: net.ipv4.ip_local_port_range "
    "minus the ports of ip_local_reserved_ports within it.",
)


@dataclass(frozen=True)
class SocketOptions:
    pass


class SocketCollector:
    name: ClassVar[str] = "socket"
    default_enabled: ClassVar[bool] = True
    options_type: ClassVar[type] = SocketOptions

    def __init__(self, options: SocketOptions, context: CollectorContext) -> None:
        procfs = context.procfs
        # The kernel counts socket memory in pages of the running system: 4 KiB is not a
        # given (arm64 and ppc64 kernels may use 16 or 64 KiB pages).
        self._page_size = os.sysconf("SC_PAGE_SIZE")
        self._files: list[ProcFile] = []
        self._sockstat = self._file(procfs, SOCKSTAT_FILE)
        self._sockstat6 = self._file(procfs, SOCKSTAT6_FILE)
        self._netstat = self._file(procfs, NETSTAT_FILE)
        self._snmp = self._file(procfs, SNMP_FILE)
        self._snmp6 = self._file(procfs, SNMP6_FILE)
        self._max_orphans = self._file(procfs, MAX_ORPHANS_FILE)
        self._max_timewait = self._file(procfs, MAX_TIMEWAIT_FILE)
        self._memory_sysctls = [
            (self._file(procfs, TCP_MEM_FILE), {"protocol": "tcp"}),
            (self._file(procfs, UDP_MEM_FILE), {"protocol": "udp"}),
        ]
        self._port_range = self._file(procfs, PORT_RANGE_FILE)
        self._reserved_ports = self._file(procfs, RESERVED_PORTS_FILE)
        self._file_nr = self._file(procfs, FILE_NR_FILE)
        # The last (ip_local_port_range, ip_local_reserved_ports) texts and the range size
        # they give: both rarely change, and the size takes a 64 KiB table to compute.
        self._ports: tuple[str, str, int] | None = None

    def _file(self, procfs: ProcFS, relative: str) -> ProcFile:
        file = procfs.file(relative)
        self._files.append(file)
        return file

    def close(self) -> None:
        for file in self._files:
            file.close()

    def collect(self) -> Collected:
        metrics: list[Metric] = []
        self._sockstat_families(metrics)
        self._memory_limit_families(metrics)
        _add_value(metrics, EPHEMERAL_RANGE, self._ephemeral_range_size())
        self._counter_families(metrics)
        self._file_families(metrics)
        return Collected("procfs", metrics)

    def _sockstat_families(self, out: list[Metric]) -> None:
        # Required, unlike every other file: sockstat exists on every kernel with networking,
        # so without it the procfs root is wrong and the collector must say so.
        sockstat = parse_sockstat(self._sockstat.read_text(), self._sockstat.path)
        text6 = _read_optional(self._sockstat6)
        sockstat6 = None if text6 is None else parse_sockstat(text6, self._sockstat6.path)
        _add(out, INUSE, inuse_samples(sockstat, sockstat6, HOST_LABELS))

        _add_value(out, ALLOCATED, sockstat.get("sockets", {}).get("used"))
        tcp = sockstat.get("TCP", {})
        _add_value(out, TCP_ALLOCATED, tcp.get("alloc"))
        _add_value(out, ORPHANS, tcp.get("orphan"))
        _add_value(out, ORPHANS_LIMIT, _read_int(self._max_orphans))
        _add_value(out, TIMEWAIT, tcp.get("tw"))
        _add_value(out, TIMEWAIT_LIMIT, _read_int(self._max_timewait))
        memory = []
        for line, labels in MEMORY_POOLS:
            pages = sockstat.get(line, {}).get("mem")
            if pages is not None:
                memory.append(MEMORY.sample(labels, pages * self._page_size))
        _add(out, MEMORY, memory)

    def _memory_limit_families(self, out: list[Metric]) -> None:
        thresholds: list[list[Sample]] = [[], [], []]
        for file, labels in self._memory_sysctls:
            text = _read_optional(file)
            if text is None:
                continue
            for samples, family, pages in zip(
                thresholds, MEMORY_THRESHOLDS, parse_ints(text, 3, file.path), strict=True
            ):
                samples.append(family.sample(labels, pages * self._page_size))
        for family, samples in zip(MEMORY_THRESHOLDS, thresholds, strict=True):
            _add(out, family, samples)

    def _counter_families(self, out: list[Metric]) -> None:
        texts = [
            (_read_optional(file), file.path) for file in (self._netstat, self._snmp, self._snmp6)
        ]
        netstat, snmp, snmp6 = texts
        for family, samples in counter_samples(netstat, snmp, snmp6, HOST_LABELS):
            _add(out, family, samples)

    def _file_families(self, out: list[Metric]) -> None:
        text = _read_optional(self._file_nr)
        if text is not None:
            # The second field is always 0 since Linux 2.6; the third is fs.file-max.
            allocated, _, limit = parse_ints(text, 3, self._file_nr.path)
            _add_value(out, FILE_HANDLES, allocated)
            _add_value(out, FILE_HANDLES_LIMIT, limit)

    def _ephemeral_range_size(self) -> int | None:
        port_range = _read_optional(self._port_range)
        if port_range is None:
            return None
        reserved = _read_optional(self._reserved_ports) or ""
        cached = self._ports
        if cached is not None and cached[0] == port_range and cached[1] == reserved:
            return cached[2]
        try:
            low_high = parse_port_range(port_range)
        except ValueError as exc:
            raise ValueError(f"{self._port_range.path}: {exc}") from None
        try:
            reserved_ranges = parse_port_ranges(reserved)
        except ValueError as exc:
            raise ValueError(f"{self._reserved_ports.path}: {exc}") from None
        size = ephemeral_port_flags(low_high, reserved_ranges).count(1)  # the sum of the flags
        self._ports = (port_range, reserved, size)
        return size


# The parts of a network namespace's sockstat, netstat, snmp and snmp6 that are its own, as
# samples labelled with the namespace's labels besides their own: the host's (no labels)
# here, each pod's in collectors/pods.py. The rest of those files is host-wide.


class NamespaceLabels:
    """The labels of one namespace's samples: `labels` on each (a pod's; none for the host's),
    merged with each sample's own (address family, protocol) once, not at every scrape. The
    samples of every scrape share these dicts: nothing downstream writes to a sample."""

    __slots__ = ("inuse", "ipv4", "ipv6", "labels")

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels
        # socket_inuse's pools, (sockstat line, labels): IPv4's, then IPv6's.
        self.inuse = tuple(
            [(line, _labelled(labels, pool)) for family, line, pool in INUSE_POOLS if family == f]
            for f in ("ipv4", "ipv6")
        )
        self.ipv4 = _labelled(labels, IPV4)
        self.ipv6 = _labelled(labels, IPV6)


def inuse_samples(
    sockstat: dict[str, dict[str, int]],
    sockstat6: dict[str, dict[str, int]] | None,
    labels: NamespaceLabels,
) -> list[Sample]:
    """socket_inuse's samples from parsed sockstat and sockstat6 (None: no IPv6)."""
    samples = []
    ipv4, ipv6 = labels.inuse
    for pools, parsed in ((ipv4, sockstat), (ipv6, sockstat6)):
        if not parsed:
            continue
        for line, pool_labels in pools:
            counts = parsed.get(line)
            if counts is not None and (value := counts.get("inuse")) is not None:
                samples.append(INUSE.sample(pool_labels, value))
    return samples


Text = tuple[str | None, str]  # a file's text (None: absent on this kernel) and its name


def counter_samples(
    netstat: Text, snmp: Text, snmp6: Text, labels: NamespaceLabels
) -> list[tuple[Family, list[Sample]]]:
    """The counters that say a pool ran out (listen queues, TCP memory, TIME_WAIT, UDP
    buffers), each family with its samples, in exposition order; a counter this kernel lacks
    has none."""
    out: list[tuple[Family, list[Sample]]] = []
    text, source = netstat
    tcpext = None if text is None else parse_snmp_table(text, "TcpExt", TCPEXT_COUNTERS, source)
    own = labels.labels
    for column, family in TCPEXT_COUNTERS.items():
        value = None if tcpext is None else tcpext.get(column)
        out.append((family, [] if value is None else [family.sample(own, value)]))
    text, source = snmp
    udp = {} if text is None else parse_snmp_table(text, "Udp", UDP_COUNTERS, source) or {}
    text, source = snmp6
    udp6 = {} if text is None else parse_snmp6_values(text, UDP6_COLUMNS, source)
    for column, column6, family in _UDP_COLUMNS:
        samples = []
        if column in udp:
            samples.append(family.sample(labels.ipv4, udp[column]))
        if column6 in udp6:
            samples.append(family.sample(labels.ipv6, udp6[column6]))
        out.append((family, samples))
    return out


def _labelled(labels: dict[str, str], own: dict[str, str]) -> dict[str, str]:
    # The host's samples share their label dicts between scrapes: no copy without labels.
    return {**labels, **own} if labels else own


HOST_LABELS = NamespaceLabels(NO_LABELS)


def _read_optional(file: ProcFile) -> str | None:
    try:
        return file.read_text()
    except FileNotFoundError:
        return None


def _read_int(file: ProcFile) -> int | None:
    text = _read_optional(file)
    return None if text is None else parse_ints(text, 1, file.path)[0]


def _add(out: list[Metric], family: Family, samples: list[Sample]) -> None:
    # A family without samples is left out whole: the kernel does not have it.
    if samples:
        out.append(family.build(samples))


def _add_value(out: list[Metric], family: Family, value: int | None) -> None:
    if value is not None:
        out.append(family.build_one(value))
