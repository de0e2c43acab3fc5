"""ctnetlink (linux/netfilter/nfnetlink_conntrack.h): conntrack statistics requests and replies.

Parsers are pure functions of a buffer; `ConntrackStatsReader` is the thin I/O edge.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import NamedTuple, TypeVar

from conntrack_exporter.netlink.core import (
    NLM_F_DUMP,
    Buffer,
    Message,
    NetlinkParseError,
    iter_attributes,
)
from conntrack_exporter.netlink.cttable import CT_NEW_MESSAGE, TableTally
from conntrack_exporter.netlink.socket import (
    NETLINK_NETFILTER,
    DumpBounds,
    DumpResult,
    NetlinkReader,
)

# ctnetlink answers only a process with CAP_NET_ADMIN: how to grant it, in the warnings that say
# it is missing. The entry point is a Python script, whose file capabilities (setcap) the kernel
# ignores: the capability must be inherited, as an ambient one, or held as root.
GRANT_NET_ADMIN = (
    "grant CAP_NET_ADMIN as an ambient capability (systemd: AmbientCapabilities=CAP_NET_ADMIN, "
    "as packaging/systemd/conntrack-exporter.service does; or setpriv --inh-caps +net_admin "
    "--ambient-caps +net_admin), or in Kubernetes run as root with capabilities.add: "
    "[NET_ADMIN] (the Helm chart does); setcap cannot work: the entry point is a script"
)

NFNL_SUBSYS_CTNETLINK = 1
NFNL_SUBSYS_CTNETLINK_EXP = 2
IPCTNL_MSG_CT_NEW = 0  # also the type of each entry in a dump reply; never sent
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_GET_STATS_CPU = 4
IPCTNL_MSG_CT_GET_STATS = 5
IPCTNL_MSG_EXP_GET_STATS_CPU = 3

CT_NEW = CT_NEW_MESSAGE
CT_GET = NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET
CT_GET_STATS_CPU = NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET_STATS_CPU
CT_GET_STATS = NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET_STATS
EXP_GET_STATS_CPU = NFNL_SUBSYS_CTNETLINK_EXP << 8 | IPCTNL_MSG_EXP_GET_STATS_CPU

# Only requests that read. IPCTNL_MSG_CT_GET_CTRZERO reads *and zeroes* counters: never here.
READ_REQUESTS = frozenset({CT_GET, CT_GET_STATS_CPU, CT_GET_STATS, EXP_GET_STATS_CPU})

# enum ctattr_stats_cpu, by attribute number; the kernel's names, lower-cased.
CPU_STAT_NAMES = {
    1: "searched",
    2: "found",
    3: "new",
    4: "invalid",
    5: "ignore",
    6: "delete",
    7: "delete_list",
    8: "insert",
    9: "insert_failed",
    10: "drop",
    11: "early_drop",
    12: "error",
    13: "search_restart",
    14: "clash_resolve",
    15: "chaintoolong",
}
# enum ctattr_expect_stats
EXPECT_STAT_NAMES = {1: "expect_new", 2: "expect_create", 3: "expect_delete"}
# enum ctattr_stats_global
CTA_STATS_GLOBAL_ENTRIES = 1
CTA_STATS_GLOBAL_MAX_ENTRIES = 2

NFGENMSG = struct.Struct("!BBH")  # family, version, res_id (the CPU, in per-CPU replies)
BE32 = struct.Struct("!I")
NFNETLINK_V0 = 0
T = TypeVar("T")


class GlobalStats(NamedTuple):
    entries: int
    max_entries: int


class CpuStats(NamedTuple):
    cpu: int
    counters: dict[str, int]


def nfgen_request(family: int = socket.AF_UNSPEC) -> bytes:
    return NFGENMSG.pack(family, NFNETLINK_V0, 0)


def _be32(buf: Buffer, start: int, end: int) -> int:
    if end - start != BE32.size:
        raise NetlinkParseError(f"expected a 4-byte counter, got {end - start} bytes")
    return BE32.unpack_from(buf, start)[0]


def _attributes_start(msg: Message) -> int:
    if msg.end - msg.start < NFGENMSG.size:
        raise NetlinkParseError("ctnetlink message shorter than its nfgenmsg header")
    return msg.start + NFGENMSG.size


def parse_global_stats(buf: Buffer, msg: Message) -> GlobalStats:
    """Decode an IPCTNL_MSG_CT_GET_STATS reply."""
    values = {}
    for attr_type, start, end in iter_attributes(buf, _attributes_start(msg), msg.end):
        if attr_type in (CTA_STATS_GLOBAL_ENTRIES, CTA_STATS_GLOBAL_MAX_ENTRIES):
            values[attr_type] = _be32(buf, start, end)
    if len(values) != 2:
        raise NetlinkParseError("conntrack global stats reply lacks entries or max entries")
    return GlobalStats(values[CTA_STATS_GLOBAL_ENTRIES], values[CTA_STATS_GLOBAL_MAX_ENTRIES])


def parse_cpu_stats(buf: Buffer, msg: Message, names: dict[int, str]) -> CpuStats:
    """Decode one per-CPU reply of a *_GET_STATS_CPU dump; attributes not in names are skipped."""
    start = _attributes_start(msg)
    cpu = NFGENMSG.unpack_from(buf, msg.start)[2]
    counters = {}
    for attr_type, value_start, value_end in iter_attributes(buf, start, msg.end):
        name = names.get(attr_type)
        if name is not None:
            counters[name] = _be32(buf, value_start, value_end)
    return CpuStats(cpu, counters)


class ConntrackTableReader(NetlinkReader):
    """Dumps the conntrack table (IPv4 and IPv6) of the socket's network namespace."""

    protocol = NETLINK_NETFILTER
    read_requests = READ_REQUESTS

    def dump(self, tally: TableTally, bounds: DumpBounds | None = None) -> DumpResult:
        """Feed every entry to tally, until the tally's budget is spent."""
        return self._socket.dump(CT_GET, nfgen_request(), tally.add_message, bounds)


class ConntrackStatsReader(NetlinkReader):
    """Reads conntrack statistics of the network namespace the socket was opened in."""

    protocol = NETLINK_NETFILTER
    read_requests = READ_REQUESTS

    def global_stats(self) -> GlobalStats:
        replies = self._collect(CT_GET_STATS, 0, parse_global_stats)
        if not replies:
            raise NetlinkParseError("no reply to the conntrack global stats request")
        return replies[0]

    def cpu_stats(self) -> list[CpuStats]:
        return self._collect(
            CT_GET_STATS_CPU, NLM_F_DUMP, lambda buf, msg: parse_cpu_stats(buf, msg, CPU_STAT_NAMES)
        )

    def expect_cpu_stats(self) -> list[CpuStats]:
        return self._collect(
            EXP_GET_STATS_CPU,
            NLM_F_DUMP,
            lambda buf, msg: parse_cpu_stats(buf, msg, EXPECT_STAT_NAMES),
        )

    def _collect(self, msg_type: int, flags: int, parse: Callable[[Buffer, Message], T]) -> list[T]:
        replies: list[T] = []
        self._socket.request(
            msg_type, flags, nfgen_request(), lambda buf, msg: replies.append(parse(buf, msg))
        )
        return replies
