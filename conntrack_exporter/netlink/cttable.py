"""Streaming decoder for ctnetlink table dumps: tallies entries, builds no per-entry objects.

Each IPCTNL_MSG_CT_NEW message of a dump is one conntrack entry. `TableTally.add` walks only
the attributes the breakdowns need and bumps counters; addresses are packed into ints so that
a key costs no allocation beyond the int. Pure: it reads a buffer and offsets, nothing else.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from conntrack_exporter.netlink.core import (
    NLA_TYPE_MASK,
    BudgetSpent,
    Buffer,
    Message,
    NetlinkParseError,
    iter_attributes,
)
from conntrack_exporter.netlink.tally import (
    AF_INET,
    AF_INET6,
    DESTINATION_BITS,
    PRUNE_CHECK_INTERVAL,
    Destination,
    decode_address,
    decode_destination,
    prune,
)

# enum ctattr_type
CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_STATUS = 3
CTA_PROTOINFO = 4
CTA_MARK = 8
CTA_ZONE = 18
# enum ctattr_tuple, ctattr_ip, ctattr_l4proto
CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
# enum ctattr_protoinfo, ctattr_protoinfo_tcp
CTA_PROTOINFO_TCP = 1
CTA_PROTOINFO_TCP_STATE = 1

# enum ip_conntrack_status
IPS_SEEN_REPLY = 1 << 1
IPS_ASSURED = 1 << 2
IPS_SRC_NAT = 1 << 4
IPS_DST_NAT = 1 << 5
IPS_OFFLOAD = 1 << 14
IPS_HW_OFFLOAD = 1 << 15
# status label -> (bits any of which count, whether the bit must be *clear* instead)
STATUS_FLAGS = {
    "assured": (IPS_ASSURED, False),
    "unreplied": (IPS_SEEN_REPLY, True),
    "src_nat": (IPS_SRC_NAT, False),
    "dst_nat": (IPS_DST_NAT, False),
    "offload": (IPS_OFFLOAD | IPS_HW_OFFLOAD, False),
}

# enum tcp_conntrack, lower-cased (LISTEN is SYN_SENT2 on current kernels)
TCP_STATE_NAMES = (
    "none",
    "syn_sent",
    "syn_recv",
    "established",
    "fin_wait",
    "close_wait",
    "last_ack",
    "time_wait",
    "close",
    "syn_sent2",
)
NO_STATE = -1
# Protocols whose tuples carry ports (the rest have ICMP ids or nothing).
PORT_PROTOCOLS = frozenset({6, 17, 132, 33, 136})  # tcp, udp, sctp, dccp, udplite

BE16 = struct.Struct("!H")
BE32 = struct.Struct("!I")
BE128 = struct.Struct("!QQ")
NFGENMSG_SIZE = 4
# NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_NEW: the type of each entry in a dump reply.
CT_NEW_MESSAGE = 1 << 8 | 0


class Tuple:
    """One direction's addresses, protocol and ports, decoded into reused fields."""

    __slots__ = ("dport", "dst", "proto", "sport", "src", "v6")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.src = self.dst = self.proto = self.sport = self.dport = -1
        self.v6 = False

    def decode(self, buf: Buffer, start: int, end: int) -> None:
        self.clear()
        for attr_type, value_start, value_end in iter_attributes(buf, start, end):
            if attr_type == CTA_TUPLE_IP:
                self._decode_ip(buf, value_start, value_end)
            elif attr_type == CTA_TUPLE_PROTO:
                self._decode_proto(buf, value_start, value_end)
        if self.src < 0 or self.dst < 0 or self.proto < 0:
            raise NetlinkParseError("conntrack tuple lacks its addresses or protocol")

    def _decode_ip(self, buf: Buffer, start: int, end: int) -> None:
        for attr_type, value_start, value_end in iter_attributes(buf, start, end):
            if attr_type in (CTA_IP_V4_SRC, CTA_IP_V4_DST):
                address = _unpack(BE32, buf, value_start, value_end)[0]
            elif attr_type in (CTA_IP_V6_SRC, CTA_IP_V6_DST):
                high, low = _unpack(BE128, buf, value_start, value_end)
                address = high << 64 | low
                self.v6 = True
            else:
                continue
            if attr_type in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                self.src = address
            else:
                self.dst = address

    def _decode_proto(self, buf: Buffer, start: int, end: int) -> None:
        for attr_type, value_start, value_end in iter_attributes(buf, start, end):
            if attr_type == CTA_PROTO_NUM:
                if value_end - value_start != 1:
                    raise NetlinkParseError("protocol number is not one byte")
                self.proto = buf[value_start]
            elif attr_type == CTA_PROTO_SRC_PORT:
                self.sport = _unpack(BE16, buf, value_start, value_end)[0]
            elif attr_type == CTA_PROTO_DST_PORT:
                self.dport = _unpack(BE16, buf, value_start, value_end)[0]


NLA_F_NESTED = 0x8000


def _tuple_headers(direction: int, src_type: int, address_bytes: int) -> tuple[int, ...]:
    """The nlattr header words of one tuple as the kernel lays it out for a port protocol."""
    ip_len = 4 + 2 * (4 + address_bytes)
    return (
        4 + ip_len + 28, direction | NLA_F_NESTED,
        ip_len, CTA_TUPLE_IP | NLA_F_NESTED,
        4 + address_bytes, src_type,
        4 + address_bytes, src_type + 1,
        28, CTA_TUPLE_PROTO | NLA_F_NESTED,
        5, CTA_PROTO_NUM,
        6, CTA_PROTO_SRC_PORT,
        6, CTA_PROTO_DST_PORT,
    )  # fmt: skip


# The fast path: both tuples of an IPv4 or IPv6 TCP/UDP/SCTP entry in two struct calls, one
# for the 32 header words (checked against the only layout it accepts, so a different layout
# takes the generic walk instead of being misread) and one for the values. Headers are
# native-endian, values big-endian, hence two structs over the same bytes.
_V4_HEADERS = struct.Struct("=" + "HHHHHH4xHH4xHHHH4xHH4xHH4x" * 2)
_V4_VALUES = struct.Struct("!" + "12xI4xI8xB7xH6xH2x" * 2)
_V4_EXPECTED = _tuple_headers(CTA_TUPLE_ORIG, CTA_IP_V4_SRC, 4) + _tuple_headers(
    CTA_TUPLE_REPLY, CTA_IP_V4_SRC, 4
)
_V6_HEADERS = struct.Struct("=" + "HHHHHH16xHH16xHHHH4xHH4xHH4x" * 2)
_V6_VALUES = struct.Struct("!" + "12xQQ4xQQ8xB7xH6xH2x" * 2)
_V6_EXPECTED = _tuple_headers(CTA_TUPLE_ORIG, CTA_IP_V6_SRC, 16) + _tuple_headers(
    CTA_TUPLE_REPLY, CTA_IP_V6_SRC, 16
)
_v4_headers = _V4_HEADERS.unpack_from
_v4_values = _V4_VALUES.unpack_from
_v6_headers = _V6_HEADERS.unpack_from
_v6_values = _V6_VALUES.unpack_from
_NLATTR = struct.Struct("=HH")
# STATUS then MARK, as the kernel writes them right after the tuples of an entry in no zone.
_STATUS_MARK_HEADERS = struct.Struct("=HH4xHH4x")
_STATUS_MARK_VALUES = struct.Struct("!4xI4xI")
_STATUS_MARK = (8, 3, 8, 8)  # (len, CTA_STATUS, len, CTA_MARK)
_status_mark_headers = _STATUS_MARK_HEADERS.unpack_from
_status_mark_values = _STATUS_MARK_VALUES.unpack_from
_STATUS_BITS = (
    IPS_SEEN_REPLY | IPS_ASSURED | IPS_SRC_NAT | IPS_DST_NAT | IPS_OFFLOAD | IPS_HW_OFFLOAD
)


# A pod's SNAT pool key: the pod's number above the pool's key (nat address, destination).
NAT_POOL_BITS = 128 + DESTINATION_BITS


class TableTally:
    """Counts of one dump: by kind, by status, by source, destination and SNAT pool; and,
    given the address keys of the pods on this node (pod_addresses.py), by pod: the entries
    each pod opened (its address the original source), those that reached it through DNAT
    (its address the reply's source), and the ports its SNAT entries took from each pool.

    Address tallies keep at most `address_capacity` keys: past that, the keys with the lowest
    counts are dropped (their entries are lost to the top-K, counted in `pruned`), so memory
    stays bounded however many distinct addresses the table holds. Below the capacity every
    count is exact.
    """

    def __init__(
        self,
        zone: bool = False,
        mark: bool = False,
        address_capacity: int = 16384,
        stop_after: int = 0,
        pod_of: dict[int, int] | None = None,
        pods: int = 0,
    ) -> None:
        self.entries = 0
        self._stop_after = stop_after  # 0: no budget
        # Packed int keys (see add_message): no tuple per entry.
        self.kinds: dict[int, int] = {}
        self.statuses: dict[int, int] = {}  # by the status bits we report
        self.sources: dict[int, int] = {}
        self.destinations: dict[int, int] = {}
        # SNAT pools: reply tuples are unique per zone, so the entries of one pool (translated
        # address, destination, port) hold that many distinct translated source ports.
        self.nat_pools: dict[int, int] = {}
        # By pod number (pod_of: address key -> number, for `pods` pods).
        self._pod_of = pod_of or {}
        self.pod_outbound = [0] * pods
        self.pod_inbound = [0] * pods
        self.pod_nat_pools: dict[int, int] = {}  # pod << NAT_POOL_BITS | pool key
        self.pruned = 0
        self._zone_mask = 0xFFFF if zone else 0
        self._mark_mask = 0xFFFFFFFF if mark else 0
        self._capacity = address_capacity
        self._orig = Tuple()
        self._reply = Tuple()

    def add(self, buf: Buffer, start: int, end: int) -> None:
        """Tally one IPCTNL_MSG_CT_NEW message whose payload is buf[start:end]."""
        self.add_message(buf, Message(CT_NEW_MESSAGE, 0, 0, 0, start, end))

    def add_message(self, buf: Buffer, msg: Message) -> None:
        """Tally one message of a dump (others than IPCTNL_MSG_CT_NEW are ignored).

        The hottest code of a table scan, hence one function with everything inline, called
        by the socket directly. Raises BudgetSpent after the `stop_after`th entry.
        """
        if msg[0] != CT_NEW_MESSAGE:
            return
        start, end = msg[4], msg[5]
        if end - start < NFGENMSG_SIZE:
            raise NetlinkParseError("conntrack entry shorter than its nfgenmsg header")
        family = buf[start]
        pos = start + NFGENMSG_SIZE
        generic = False
        if family == AF_INET and end - pos >= 104 and _v4_headers(buf, pos) == _V4_EXPECTED:
            src, dst, proto, _, dport, reply_src, nat, _, _, _ = _v4_values(buf, pos)
            v6 = 0
            pos += 104
        elif family == AF_INET6 and end - pos >= 152 and _v6_headers(buf, pos) == _V6_EXPECTED:
            s1, s2, d1, d2, proto, _, dport, r1, r2, n1, n2, _, _, _ = _v6_values(buf, pos)
            src, dst, nat = s1 << 64 | s2, d1 << 64 | d2, n1 << 64 | n2
            reply_src = r1 << 64 | r2
            v6 = 1
            pos += 152
        else:
            v6, proto, src, dst, dport, reply_src, nat = self._generic_tuples(buf, pos, end)
            generic = True
        if generic:  # an unknown layout: no assumption about the order either
            status, state, zone, mark = _scalars(buf, pos, end, proto == 6, complete=True)
        elif proto != 6 and end - pos >= 16 and _status_mark_headers(buf, pos) == _STATUS_MARK:
            # The common case: STATUS then MARK after the tuples, no TCP info to look for.
            status, mark = _status_mark_values(buf, pos)
            state = NO_STATE
            zone = 0
        else:
            status, state, zone, mark = _scalars(buf, pos, end, proto == 6)

        # Packed int keys, plain dicts: no tuple, no Counter.__missing__ call per entry.
        self.entries += 1
        tally = self.kinds
        key = (
            (((family << 8 | proto) << 9 | state + 1) << 16 | zone & self._zone_mask) << 32
        ) | mark & self._mark_mask
        tally[key] = tally.get(key, 0) + 1
        tally = self.statuses
        key = status & _STATUS_BITS
        tally[key] = tally.get(key, 0) + 1
        tally = self.sources
        source = src << 1 | v6
        tally[source] = tally.get(source, 0) + 1
        tally = self.destinations
        destination = ((dst << 8 | proto) << 16 | dport) << 1 | v6
        tally[destination] = tally.get(destination, 0) + 1
        pool = -1
        if status & IPS_SRC_NAT:
            tally = self.nat_pools
            pool = nat << DESTINATION_BITS | destination
            tally[pool] = tally.get(pool, 0) + 1
        pod_of = self._pod_of
        if pod_of:
            pod = pod_of.get(source)
            if pod is not None:
                self.pod_outbound[pod] += 1
                if pool >= 0:
                    tally = self.pod_nat_pools
                    key = pod << NAT_POOL_BITS | pool
                    tally[key] = tally.get(key, 0) + 1
            if status & IPS_DST_NAT:
                pod = pod_of.get(reply_src << 1 | v6)
                if pod is not None:
                    self.pod_inbound[pod] += 1
        if not self.entries % PRUNE_CHECK_INTERVAL:
            self._prune()
        if self.entries == self._stop_after:
            raise BudgetSpent

    def _generic_tuples(
        self, buf: Buffer, pos: int, end: int
    ) -> tuple[int, int, int, int, int, int, int]:
        """Any layout (ICMP, GRE, tuples with zones, ...): (v6, protocol, source,
        destination, destination port, reply source, translated source) from a walk of
        every attribute."""
        have_orig = have_reply = False
        for attr_type, value_start, value_end in iter_attributes(buf, pos, end):
            if attr_type == CTA_TUPLE_ORIG:
                self._orig.decode(buf, value_start, value_end)
                have_orig = True
            elif attr_type == CTA_TUPLE_REPLY:
                self._reply.decode(buf, value_start, value_end)
                have_reply = True
        if not (have_orig and have_reply):
            raise NetlinkParseError("conntrack entry lacks its original or reply tuple")
        orig = self._orig
        # An SNAT pool's key holds the reply's address under the original's family bit: an
        # IPv6 address there would not even decode into a label.
        if orig.v6 != self._reply.v6:
            raise NetlinkParseError("conntrack entry's tuples are of different families")
        reply = self._reply
        return (
            int(orig.v6),
            orig.proto,
            orig.src,
            orig.dst,
            max(orig.dport, 0),
            reply.src,
            reply.dst,
        )

    def finish(self) -> None:
        """Bring the address tallies back within their capacity after the last entry."""
        self._prune()

    def _prune(self) -> None:
        for tally in (self.sources, self.destinations, self.nat_pools, self.pod_nat_pools):
            self.pruned += prune(tally, self._capacity)


def _scalars(
    buf: Buffer, pos: int, end: int, tcp: bool, complete: bool = False
) -> tuple[int, int, int, int]:
    """(status, TCP state, zone, mark) from the top-level attributes at buf[pos:end].

    The kernel puts zone, status and mark right after the tuples and the TCP protocol info
    near the end: unless `complete`, stop as soon as everything wanted has been seen.
    """
    status = mark = zone = 0
    state = NO_STATE
    seen_status = seen_mark = False
    unpack = _NLATTR.unpack_from
    type_mask = NLA_TYPE_MASK
    while end - pos >= 4:
        attr_len, attr_type = unpack(buf, pos)
        if attr_len < 4 or attr_len > end - pos:
            raise NetlinkParseError(
                f"attribute length {attr_len} at offset {pos} does not fit {end - pos} bytes"
            )
        attr_type &= type_mask
        if attr_type == CTA_STATUS:
            status = _unpack(BE32, buf, pos + 4, pos + attr_len)[0]
            seen_status = True
        elif attr_type == CTA_MARK:
            mark = _unpack(BE32, buf, pos + 4, pos + attr_len)[0]
            seen_mark = True
        elif attr_type == CTA_ZONE:
            zone = _unpack(BE16, buf, pos + 4, pos + attr_len)[0]
        elif attr_type == CTA_PROTOINFO:
            state = _tcp_state(buf, pos + 4, pos + attr_len)
        pos += (attr_len + 3) & ~3
        if not complete and seen_status and seen_mark and (not tcp or state != NO_STATE):
            return status, state, zone, mark
    if pos < end:
        raise NetlinkParseError(f"{end - pos} stray bytes after the attributes")
    return status, state, zone, mark


def _unpack(fmt: struct.Struct, buf: Buffer, start: int, end: int) -> tuple[int, ...]:
    if end - start != fmt.size:
        raise NetlinkParseError(f"expected a {fmt.size}-byte value, got {end - start} bytes")
    return fmt.unpack_from(buf, start)


def _tcp_state(buf: Buffer, start: int, end: int) -> int:
    for attr_type, value_start, value_end in iter_attributes(buf, start, end):
        if attr_type == CTA_PROTOINFO_TCP:
            for inner_type, inner_start, inner_end in iter_attributes(buf, value_start, value_end):
                if inner_type == CTA_PROTOINFO_TCP_STATE:
                    if inner_end - inner_start != 1:
                        raise NetlinkParseError("TCP state is not one byte")
                    return buf[inner_start]
    return NO_STATE


class Kind(NamedTuple):
    family: int
    protocol: int
    state: int  # NO_STATE for non-TCP
    zone: int
    mark: int


class NatPool(NamedTuple):
    nat_address: str
    destination: Destination


def decode_kind(key: int) -> Kind:
    mark = key & 0xFFFFFFFF
    key >>= 32
    zone = key & 0xFFFF
    key >>= 16
    state = (key & 0x1FF) - 1  # nine bits: a state byte + 1 (NO_STATE is 0)
    key >>= 9
    return Kind(key >> 8, key & 0xFF, state, zone, mark)


def split_pod_nat_pool(key: int) -> tuple[int, int]:
    """(pod number, pool key) of a key of TableTally.pod_nat_pools."""
    return key >> NAT_POOL_BITS, key & ((1 << NAT_POOL_BITS) - 1)


def nat_address_key(key: int) -> int:
    """The address key (address << 1 | is-IPv6) of a pool key's translated address."""
    return key >> DESTINATION_BITS << 1 | key & 1


def decode_nat_pool(key: int) -> NatPool:
    destination = key & ((1 << DESTINATION_BITS) - 1)
    return NatPool(
        decode_address(key >> DESTINATION_BITS << 1 | destination & 1),
        decode_destination(destination),
    )


def status_names(bits: int) -> list[str]:
    return [name for name, (mask, clear) in STATUS_FLAGS.items() if bool(bits & mask) != clear]
