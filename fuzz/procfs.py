"""The /proc parsers on arbitrary text: ValueError is the only error any of them may raise.

The readers hand them ASCII only (procfs.ProcFile refuses the rest), but text is decoded here
as Latin-1, every byte a character, so that the parsers meet non-ASCII digits and spaces too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import partial

from conntrack_exporter.collectors.conntrack import counter_families
from conntrack_exporter.collectors.socket import TCPEXT_COUNTERS, UDP6_COLUMNS, UDP_COUNTERS
from conntrack_exporter.netlink.ctnetlink import CpuStats
from conntrack_exporter.pod_addresses import parse_fib_trie_local, parse_if_inet6
from conntrack_exporter.pod_identity import identify, parse_pod_log_dirs
from conntrack_exporter.procfs import (
    ephemeral_port_flags,
    parse_ints,
    parse_nf_conntrack_stat,
    parse_port_range,
    parse_port_ranges,
    parse_snmp6,
    parse_snmp6_values,
    parse_snmp_table,
    parse_snmp_tables,
    parse_sockstat,
)
from fuzz.harness import FIXTURES, fuzz

NOT_PROC_FILES = {".py", ".md", ".json"}


def seeds() -> Iterator[bytes]:
    """Every captured /proc file (this kernel's, an older one's, node_exporter's), the
    /proc/PID/cgroup files (this kernel's, other machines'), and pods' address files."""
    for directory in ("proc", "procfs", "cgroup", "pod_addresses"):
        for path in sorted((FIXTURES / directory).rglob("*")):
            if path.is_file() and path.suffix not in NOT_PROC_FILES:
                yield path.read_bytes()


def _stat_families(text: str) -> object:
    """The conntrack collector's families from the stat file's rows, as the procfs path
    builds them (a header name becomes part of a metric name)."""
    rows = parse_nf_conntrack_stat(text)
    return counter_families([CpuStats(cpu, row) for cpu, row in enumerate(rows)], True)


def _pod_log_dirs(text: str) -> object:
    """The kubelet's pod-log directory names, one a line."""
    return parse_pod_log_dirs(text.split("\n"))


def _port_flags(text: str) -> bytes:
    """The socket_ports scan's port table, from one text as both sysctls."""
    return ephemeral_port_flags(parse_port_range(text), parse_port_ranges(text))


PARSERS: tuple[Callable[[str], object], ...] = (
    _stat_families,
    parse_port_range,
    parse_port_ranges,
    _port_flags,
    parse_sockstat,
    parse_snmp_tables,
    partial(parse_snmp_table, table="TcpExt", columns=TCPEXT_COUNTERS),
    partial(parse_snmp_table, table="Udp", columns=UDP_COUNTERS),
    partial(parse_snmp_table, table="Ip"),
    parse_snmp6,
    partial(parse_snmp6_values, names=UDP6_COLUMNS),
    partial(parse_ints, count=3, source="tcp_mem"),
    partial(parse_ints, count=1, source="tcp_max_orphans"),
    identify,
    _pod_log_dirs,
    parse_fib_trie_local,
    parse_if_inet6,
)


def test_one_input(data: bytes) -> None:
    text = data.decode("latin-1")
    for parse in PARSERS:
        with contextlib.suppress(ValueError):
            parse(text)


def main() -> None:
    fuzz("procfs", test_one_input, seeds())


if __name__ == "__main__":
    main()
