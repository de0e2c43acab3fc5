"""Pure tests of the table dump decoder (netlink/cttable.py) on a captured kernel dump.

tests/fixtures/netlink/ct_dump_mix.bin is the raw recv() bytes of one ctnetlink CT_GET dump from
Linux 6.18, and ct_dump_mix.conntrack-L.txt what `conntrack -L` listed at the same moment; both
written by tests/fixtures/capture_dump.py, which describes the mix of entries (and
ct_dump_mix.json records the size of each group of it). The decoder is checked entry by entry
against pyroute2's decoding of the same bytes, as a whole against the conntrack -L text, on both
of its paths (the fixed-layout fast path and the generic attribute walk), with bounded address
tallies, and on malformed input. No root and no kernel needed here.
"""

from __future__ import annotations

import ipaddress
import json
import signal
import struct
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg

from conntrack_exporter.netlink import cttable
from conntrack_exporter.netlink.core import (
    NLM_F_DUMP_INTR,
    NLMSG_DONE,
    BudgetSpent,
    Message,
    NetlinkParseError,
    iter_attributes,
    iter_messages,
)
from conntrack_exporter.netlink.ctnetlink import CT_NEW
from conntrack_exporter.netlink.cttable import (
    NatPool,
    TableTally,
    decode_kind,
    decode_nat_pool,
    status_names,
)
from conntrack_exporter.netlink.tally import Destination, decode_address, decode_destination

FIXTURES = Path(__file__).parent / "fixtures" / "netlink"
RECORD = json.loads((FIXTURES / "ct_dump_mix.json").read_text())
DUMP = (FIXTURES / "ct_dump_mix.bin").read_bytes()
LISTING = (FIXTURES / "ct_dump_mix.conntrack-L.txt").read_text()

NLMSGHDR = struct.Struct("=IHHII")
NLATTR = struct.Struct("=HH")
NLA_F_NESTED = 0x8000
NFGENMSG_SIZE = 4

# The kernel's numbers, written out here rather than taken from the module under test
# (linux/netfilter/nf_conntrack_common.h, nf_conntrack_tcp.h; `conntrack -L` prints the names).
IPS_SEEN_REPLY, IPS_ASSURED, IPS_SRC_NAT, IPS_DST_NAT = 1 << 1, 1 << 2, 1 << 4, 1 << 5
IPS_SRC_NAT_DONE, IPS_DST_NAT_DONE = 1 << 7, 1 << 8
IPS_OFFLOAD, IPS_HW_OFFLOAD = 1 << 14, 1 << 15
REPORTED_BITS = IPS_SEEN_REPLY | IPS_ASSURED | IPS_SRC_NAT | IPS_DST_NAT | IPS_OFFLOAD
REPORTED_BITS |= IPS_HW_OFFLOAD
TCP_STATES = {
    "NONE": 0, "SYN_SENT": 1, "SYN_RECV": 2, "ESTABLISHED": 3, "FIN_WAIT": 4, "CLOSE_WAIT": 5,
    "LAST_ACK": 6, "TIME_WAIT": 7, "CLOSE": 8, "SYN_SENT2": 9,
}  # fmt: skip
AF_INET, AF_INET6 = 2, 10
TCP, UDP, ICMP, ICMPV6, GRE = 6, 17, 1, 58, 47
NO_STATE = -1


# --- the fixture -------------------------------------------------------------------------------


def datagrams() -> list[bytes]:
    """The fixture split back into the datagrams recv() returned."""
    out, offset = [], 0
    for length in RECORD["datagram_lengths"]:
        out.append(DUMP[offset : offset + length])
        offset += length
    assert offset == len(DUMP), "ct_dump_mix.json datagram lengths do not add up"
    return out


@cache
def all_messages() -> tuple[tuple[bytes, Message], ...]:
    return tuple((d, msg) for d in datagrams() for msg in iter_messages(d, len(d)))


def entries() -> list[tuple[bytes, Message]]:
    """Every CT_NEW message (one conntrack entry each), with the datagram it came in."""
    return [(d, msg) for d, msg in all_messages() if msg.type == CT_NEW]


def message_bytes(buf: bytes, msg: Message) -> bytes:
    return buf[msg.start - NLMSGHDR.size : msg.end]


def tally_of(messages: list[tuple[bytes, Message]], **options) -> TableTally:
    tally = TableTally(**options)
    for buf, msg in messages:
        tally.add(buf, msg.start, msg.end)
    tally.finish()
    return tally


def counters(tally: TableTally) -> tuple:
    """Everything a tally counts, as plain values."""
    return (
        tally.entries,
        tally.pruned,
        dict(tally.kinds),
        dict(tally.statuses),
        dict(tally.sources),
        dict(tally.destinations),
        dict(tally.nat_pools),
        tally.pod_outbound,
        tally.pod_inbound,
        dict(tally.pod_nat_pools),
    )


def address_key(text: str) -> int:
    """The tally's key of an address (address << 1 | is-IPv6)."""
    parsed = ipaddress.ip_address(text)
    return int(parsed) << 1 | (parsed.version == 6)


@cache
def every_address_a_pod() -> dict[int, int]:
    """A pod number for every source and reply source of the fixture: every entry is some
    pod's, outbound, and (DNAT) inbound."""
    found = {address_key(a) for ref in references() for a in (ref.src, ref.reply_src)}
    return {key: number for number, key in enumerate(sorted(found))}


def with_pods() -> dict:
    pods = every_address_a_pod()
    return {"pod_of": pods, "pods": len(pods)}


def address(text: str) -> str:
    return str(ipaddress.ip_address(text))


def test_fixture_is_one_complete_dump_from_the_kernel_it_claims():
    assert RECORD["kernel_release"].startswith("6.18.")
    kinds = [msg.type for _, msg in all_messages()]
    assert kinds[-1] == NLMSG_DONE and set(kinds[:-1]) == {CT_NEW}
    assert not any(msg.flags & NLM_F_DUMP_INTR for _, msg in all_messages())
    assert len(entries()) == RECORD["entries"] == 386
    # The first datagram is small: the kernel sizes a dump's first skb before it has seen a
    # receive buffer; later ones fill up to 32 KiB.
    assert RECORD["datagram_lengths"][0] < 4096 < max(RECORD["datagram_lengths"]) <= 32768


# --- pyroute2, the reference decoder ------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """What pyroute2 decodes from one CT_NEW message: every field the tally uses."""

    id: int
    family: int
    protocol: int
    state: int
    zone: int
    mark: int
    status: int
    src: str
    dst: str
    dport: int
    reply_src: str
    reply_dst: str
    attributes: tuple[str, ...]


def reference(buf: bytes, msg: Message) -> Reference:
    theirs = nfct_msg(message_bytes(buf, msg))
    theirs.decode()
    orig = theirs.get_attr("CTA_TUPLE_ORIG")
    reply = theirs.get_attr("CTA_TUPLE_REPLY")
    family = theirs["nfgen_family"]
    src_name, dst_name = ("CTA_IP_V4_SRC", "CTA_IP_V4_DST")
    if family == AF_INET6:
        src_name, dst_name = ("CTA_IP_V6_SRC", "CTA_IP_V6_DST")
    ip, proto = orig.get_attr("CTA_TUPLE_IP"), orig.get_attr("CTA_TUPLE_PROTO")
    state = theirs.get_nested("CTA_PROTOINFO", "CTA_PROTOINFO_TCP", "CTA_PROTOINFO_TCP_STATE")
    return Reference(
        id=theirs.get_attr("CTA_ID"),
        family=family,
        protocol=proto.get_attr("CTA_PROTO_NUM"),
        state=NO_STATE if state is None else state,
        # Absent attributes (in the truncated messages below) count as 0, as in the tally.
        zone=theirs.get_attr("CTA_ZONE") or 0,
        mark=theirs.get_attr("CTA_MARK") or 0,
        status=theirs.get_attr("CTA_STATUS") or 0,
        src=address(ip.get_attr(src_name)),
        dst=address(ip.get_attr(dst_name)),
        dport=proto.get_attr("CTA_PROTO_DST_PORT") or 0,
        reply_src=address(reply.get_attr("CTA_TUPLE_IP").get_attr(src_name)),
        reply_dst=address(reply.get_attr("CTA_TUPLE_IP").get_attr(dst_name)),
        attributes=tuple(name for name, _ in theirs["attrs"]),
    )


@cache
def references() -> tuple[Reference, ...]:
    return tuple(reference(buf, msg) for buf, msg in entries())


def expected_status_names(status: int) -> list[str]:
    names = []
    if status & IPS_ASSURED:
        names.append("assured")
    if not status & IPS_SEEN_REPLY:
        names.append("unreplied")
    if status & IPS_SRC_NAT:
        names.append("src_nat")
    if status & IPS_DST_NAT:
        names.append("dst_nat")
    if status & (IPS_OFFLOAD | IPS_HW_OFFLOAD):
        names.append("offload")
    return names


def assert_tally_is(tally: TableTally, ref: Reference) -> None:
    """A tally fed one entry holds exactly what pyroute2 decoded from it."""
    where = f"entry id={ref.id}"
    assert tally.entries == 1 and tally.pruned == 0, where
    (kind,) = tally.kinds
    assert decode_kind(kind) == (ref.family, ref.protocol, ref.state, ref.zone, ref.mark), where
    (source,) = tally.sources
    assert decode_address(source) == ref.src, where
    (destination,) = tally.destinations
    expected_destination = Destination(ref.dst, ref.protocol, ref.dport)
    assert decode_destination(destination) == expected_destination, where
    (status,) = tally.statuses
    assert status == ref.status & REPORTED_BITS, where
    assert status_names(status) == expected_status_names(ref.status), where
    if ref.status & IPS_SRC_NAT:
        (pool,) = tally.nat_pools
        assert decode_nat_pool(pool) == NatPool(ref.reply_dst, expected_destination), where
    else:
        assert not tally.nat_pools, where


def test_each_entry_agrees_with_pyroute2():
    for (buf, msg), ref in zip(entries(), references(), strict=True):
        assert_tally_is(tally_of([(buf, msg)], zone=True, mark=True), ref)


def test_each_entry_counts_for_the_pods_pyroute2_says():
    """With every address a pod's: the entry is its original source's (outbound), its reply
    source's too when DNATed (inbound: a pod reached through a Service), and its SNAT pool's
    ports are its source pod's."""
    pod_of = every_address_a_pod()
    dnat = 0
    for (buf, msg), ref in zip(entries(), references(), strict=True):
        tally = tally_of([(buf, msg)], **with_pods())
        where = f"entry id={ref.id}"
        source = pod_of[address_key(ref.src)]
        assert tally.pod_outbound == [int(i == source) for i in range(len(pod_of))], where
        inbound = [0] * len(pod_of)
        if ref.status & IPS_DST_NAT:
            inbound[pod_of[address_key(ref.reply_src)]] = 1
            dnat += 1
        assert tally.pod_inbound == inbound, where
        if ref.status & IPS_SRC_NAT:
            (key,) = tally.pod_nat_pools
            assert cttable.split_pod_nat_pool(key) == (source, *tally.nat_pools), where
        else:
            assert not tally.pod_nat_pools, where
    assert dnat == 4  # the fixture's DNAT entries: each took the inbound branch


def test_addresses_of_no_pod_count_for_none():
    tally = tally_of(entries(), pod_of={address_key("192.0.2.1"): 0}, pods=1)
    assert (tally.pod_outbound, tally.pod_inbound, tally.pod_nat_pools) == ([0], [0], {})
    assert counters(tally)[:7] == counters(tally_of(entries()))[:7]


def test_the_fixture_covers_what_the_decoder_distinguishes():
    refs = references()
    assert {(r.family, r.protocol) for r in refs} == {
        (AF_INET, TCP), (AF_INET, UDP), (AF_INET, ICMP), (AF_INET, 132), (AF_INET, 136),
        (AF_INET, GRE), (AF_INET6, TCP), (AF_INET6, UDP), (AF_INET6, ICMPV6),
    }  # fmt: skip
    assert {r.state for r in refs if r.protocol == TCP} == {1, 3, 5, 7, 8}
    assert {r.zone for r in refs} == {0, 7}
    assert {r.mark for r in refs} == {0, 3, 7, 16, 0x2A}
    names = Counter(name for r in refs for name in expected_status_names(r.status))
    assert names.keys() == {"assured", "unreplied", "src_nat", "dst_nat"}
    snat_families = {r.family for r in refs if r.status & IPS_SRC_NAT and r.reply_dst != r.src}
    assert snat_families == {AF_INET, AF_INET6}
    # Entries made before and after accounting and timestamps were switched on.
    assert {"CTA_COUNTERS_ORIG" in r.attributes for r in refs} == {True, False}
    assert {"CTA_ZONE" in r.attributes for r in refs} == {True, False}


def test_the_mix_is_what_the_capture_script_made():
    g = RECORD["groups"]
    established, zero = TCP_STATES["ESTABLISHED"], NO_STATE
    expected = {
        (AF_INET, TCP, established, 0, 0): g["tcp4_established"] + g["snat_tcp4"]
        + g["inj_tcp_zone0"] + g["inj_tcp_zone0_assured"],
        (AF_INET, TCP, TCP_STATES["TIME_WAIT"], 0, 0): g["tcp4_time_wait"],
        (AF_INET, TCP, TCP_STATES["CLOSE_WAIT"], 0, 0): g["tcp4_close_wait"],
        (AF_INET, TCP, TCP_STATES["CLOSE"], 0, 0): g["tcp4_close"],
        (AF_INET, TCP, TCP_STATES["SYN_SENT"], 0, 0): g["tcp4_syn_sent"],
        (AF_INET, TCP, established, 7, 0): g["inj_tcp_zone7"],
        (AF_INET, UDP, zero, 0, 0): g["udp4_unreplied"] - g["udp4_marked"] + g["udp4_replied"]
        + g["udp4_assured"] + g["udp4_dnat"] + g["snat_udp4"] + g["snat_udp4_unreplied"]
        + g["inj_udp_orig_zone9"] + g["inj_udp_reply_zone11"],
        (AF_INET, UDP, zero, 0, 0x2A): g["udp4_marked"],
        (AF_INET, UDP, zero, 0, 16): g["inj_udp_zone0_mark16"],
        (AF_INET, UDP, zero, 7, 7): g["inj_udp_zone7_mark7"],
        (AF_INET, ICMP, zero, 0, 0): g["icmp4"] + g["inj_icmp"],
        (AF_INET, 132, zero, 0, 0): g["inj_sctp"],
        (AF_INET, 136, zero, 0, 0): g["inj_udplite"],
        (AF_INET, GRE, zero, 0, 0): g["inj_gre"],
        (AF_INET6, TCP, established, 0, 0): g["tcp6_established"] + g["snat_tcp6"],
        (AF_INET6, TCP, TCP_STATES["TIME_WAIT"], 0, 0): g["tcp6_time_wait"],
        (AF_INET6, TCP, established, 7, 3): g["inj_tcp6_zone7_mark3"],
        (AF_INET6, UDP, zero, 0, 0): g["udp6_unreplied"] + g["udp6_replied"] + g["snat_udp6"]
        + g["snat_udp6_unreplied"],
        (AF_INET6, ICMPV6, zero, 0, 0): g["icmp6"],
    }  # fmt: skip
    tally = tally_of(entries(), zone=True, mark=True)
    assert {decode_kind(k): n for k, n in tally.kinds.items()} == expected
    assert sum(expected.values()) == tally.entries == 386
    statuses = Counter()
    for bits, n in tally.statuses.items():
        statuses.update(dict.fromkeys(status_names(bits), n))
    snat = ("snat_tcp4", "snat_udp4", "snat_udp4_unreplied", "snat_tcp6", "snat_udp6")
    assert statuses["src_nat"] == sum(g[name] for name in snat) + g["snat_udp6_unreplied"] == 116
    assert statuses["dst_nat"] == g["udp4_dnat"] == 4
    # Only UDP flows still talking 2 s after their first reply are ASSURED (6.x kernels).
    udp4_assured = sum(
        1 for r in references() if (r.family, r.protocol, r.dport) == (AF_INET, UDP, 5353)
        and r.status & IPS_ASSURED
    )  # fmt: skip
    assert udp4_assured == g["udp4_assured"] == 5


# --- the conntrack -L text ------------------------------------------------------------------


@dataclass(frozen=True)
class Listed:
    """One `conntrack -L -o extended,id` line."""

    id: int
    family: int
    protocol: int
    state: int
    orig: dict
    reply: dict
    flags: frozenset[str]
    zone: int
    mark: int

    @property
    def tuple_zone(self) -> bool:
        return "zone-orig" in self.orig or "zone-reply" in self.reply


def parse_listing_line(line: str) -> Listed:
    fields = line.split()
    _family_name, family, _protocol_name, protocol, _timeout = fields[:5]
    rest = fields[5:]
    assert rest[-1].startswith("id="), line
    entry_id = int(rest.pop().removeprefix("id="))
    state = NO_STATE
    if "=" not in rest[0]:
        word = rest.pop(0)
        if int(protocol) == TCP:  # SCTP prints its own state too; the tally keeps TCP's only
            state = TCP_STATES[word]
    tuples: list[dict] = []
    flags, extra = set(), {}
    for field in rest:
        if field.startswith("["):
            flags.add(field.strip("[]"))
            continue
        key, _, value = field.partition("=")
        if key == "src" and len(tuples) < 2:
            tuples.append({})
        if key in ("mark", "zone", "use", "delta-time") or len(tuples) == 0:
            extra[key] = value
        elif "mark" in extra:
            raise AssertionError(f"tuple field after mark= in {line!r}")
        else:
            tuples[-1][key] = value
    orig, reply = tuples
    return Listed(
        id=entry_id,
        family=int(family),
        protocol=int(protocol),
        state=state,
        orig=orig,
        reply=reply,
        flags=frozenset(flags),
        zone=int(extra.get("zone", 0)),
        mark=int(extra["mark"]),
    )


def listing_sections() -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = None
    for line in LISTING.splitlines():
        if line.startswith("# "):
            current = sections.setdefault(line[2:], [])
        else:
            assert current is not None
            current.append(line)
    return sections


@cache
def listed() -> dict[int, Listed]:
    lines = listing_sections()["conntrack -L -o extended,id"]
    return {entry.id: entry for entry in map(parse_listing_line, lines)}


def port(fields: dict, name: str, protocol: int) -> int:
    """A tuple's port as the kernel carries it: GRE keys ride in the port attributes."""
    if protocol == GRE:
        return int(fields[{"sport": "srckey", "dport": "dstkey"}[name]], 16)
    return int(fields.get(name, 0))


def nat_bits(entry: Listed) -> int:
    """IPS_SRC_NAT/IPS_DST_NAT from the tuples: the reply is not the original reversed."""
    o, r, p = entry.orig, entry.reply, entry.protocol
    bits = 0
    if address(r["dst"]) != address(o["src"]) or port(r, "dport", p) != port(o, "sport", p):
        bits |= IPS_SRC_NAT
    if address(r["src"]) != address(o["dst"]) or port(r, "sport", p) != port(o, "dport", p):
        bits |= IPS_DST_NAT
    return bits


def test_conntrack_nat_filters_agree_with_the_tuples_except_for_icmp():
    sections = listing_sections()
    status = {r.id: r.status for r in references()}
    for section, bit, done_bit in [
        ("conntrack -L --src-nat -o extended,id", IPS_SRC_NAT, IPS_SRC_NAT_DONE),
        ("conntrack -L --dst-nat -o extended,id", IPS_DST_NAT, IPS_DST_NAT_DONE),
    ]:
        by_filter = {parse_listing_line(line).id for line in sections[section]}
        by_tuples = {i for i, entry in listed().items() if nat_bits(entry) & bit}
        assert by_tuples == {i for i, bits in status.items() if bits & bit}
        assert by_tuples  # real NAT in both directions
        # libnetfilter_conntrack's IS_SNAT/IS_DNAT take an entry that went through the NAT
        # hooks (*_NAT_DONE) and whose reply "port" differs: for ICMP they compare the id
        # with the reply's type/code, so conntrack-tools lists every ICMP entry made by real
        # traffic under both filters (but not one injected by conntrack -I, which never
        # passed the hooks).
        icmp = {
            i for i, entry in listed().items()
            if entry.protocol in (ICMP, ICMPV6) and status[i] & done_bit
        }  # fmt: skip
        assert by_filter - by_tuples == icmp
        assert len(icmp) == 5
        assert by_tuples <= by_filter


def test_ipv6_listing_is_the_ipv6_part_of_the_full_listing():
    ipv6 = {parse_listing_line(line).id for line in listing_sections()[
        "conntrack -L -f ipv6 -o extended,id"]}  # fmt: skip
    assert ipv6 == {i for i, entry in listed().items() if entry.family == AF_INET6}
    assert len(ipv6) == 71


def test_listing_lists_exactly_the_dumped_entries():
    assert sorted(listed()) == sorted(r.id for r in references())


@pytest.mark.parametrize(("zone", "mark"), [(True, True), (False, False), (True, False)])
def test_whole_dump_tally_equals_counts_from_conntrack_listing(zone, mark):
    kinds, statuses, sources, destinations, pools = (Counter() for _ in range(5))
    for entry in listed().values():
        o = entry.orig
        kinds[
            entry.family, entry.protocol, entry.state, entry.zone if zone else 0,
            entry.mark if mark else 0,
        ] += 1  # fmt: skip
        bits = nat_bits(entry)
        if "UNREPLIED" not in entry.flags:
            bits |= IPS_SEEN_REPLY
        if "ASSURED" in entry.flags:
            bits |= IPS_ASSURED
        if entry.flags & {"OFFLOAD", "HW_OFFLOAD"}:
            bits |= IPS_OFFLOAD
        statuses[bits] += 1
        sources[address(o["src"])] += 1
        destination = (address(o["dst"]), entry.protocol, port(o, "dport", entry.protocol))
        destinations[destination] += 1
        if bits & IPS_SRC_NAT:
            pools[address(entry.reply["dst"]), destination] += 1

    tally = tally_of(entries(), zone=zone, mark=mark)
    assert tally.entries == len(listed()) == 386
    assert {decode_kind(k): n for k, n in tally.kinds.items()} == kinds
    assert dict(tally.statuses) == statuses
    assert {decode_address(k): n for k, n in tally.sources.items()} == sources
    assert {decode_destination(k): n for k, n in tally.destinations.items()} == destinations
    assert {decode_nat_pool(k): n for k, n in tally.nat_pools.items()} == pools
    assert tally.pruned == 0
    # Spot checks, so that a new capture gets looked at.
    assert sources["127.0.0.1"] == 156
    assert pools["10.71.2.1", ("10.71.2.2", UDP, 53)] == 80
    assert pools["fd00:71:2::1", ("fd00:71:2::2", UDP, 53)] == 12


def test_directional_zones_are_not_ct_zone():
    # `--orig-zone`/`--reply-zone` put CTA_TUPLE_ZONE inside one tuple and no CTA_ZONE: the
    # entry counts under zone 0, as conntrack -L prints no `zone=` for it.
    directional = [e for e in listed().values() if e.tuple_zone]
    assert len(directional) == 6
    assert all(e.zone == 0 for e in directional)
    ids = {e.id for e in directional}
    picked = [(b, m) for (b, m), r in zip(entries(), references(), strict=True) if r.id in ids]
    tally = tally_of(picked, zone=True)
    assert {decode_kind(k).zone for k in tally.kinds} == {0}


# --- the fast path and the generic walk --------------------------------------------------------


# The tests below reach into cttable's internals by these names, to see which path an entry
# takes and to switch the fast path off; if the module renames them, update them here.
GENERIC_METHOD = "_generic_tuples"  # TableTally method: the generic walk of the tuples
SCALARS = "_scalars"  # module function: the walk of status, zone, mark and TCP state
FAST_LAYOUTS = ("_V4_EXPECTED", "_V6_EXPECTED")  # expected header words of the fast path
STATUS_MARK_LAYOUT = "_STATUS_MARK"  # expected header words of the status-then-mark shortcut


def generic_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Spy on the generic walk; returns the list each call appends its start offset to."""
    calls: list[int] = []
    original = getattr(TableTally, GENERIC_METHOD)

    def spy(self: TableTally, buf: bytes, pos: int, end: int) -> tuple:
        calls.append(pos)
        return original(self, buf, pos, end)

    monkeypatch.setattr(TableTally, GENERIC_METHOD, spy)
    return calls


def test_which_entries_take_which_path(monkeypatch):
    calls = generic_calls(monkeypatch)
    generic_ids, fast_ids = set(), set()
    for (buf, msg), ref in zip(entries(), references(), strict=True):
        before = len(calls)
        TableTally().add(buf, msg.start, msg.end)
        (generic_ids if len(calls) > before else fast_ids).add(ref.id)
    by_id = listed()
    # ICMP tuples carry id/type/code instead of ports, and a tuple zone lengthens a tuple:
    # those take the generic walk, everything else the fast path.
    expected_generic = {i for i, e in by_id.items() if e.protocol in (ICMP, ICMPV6) or e.tuple_zone}
    assert generic_ids == expected_generic
    assert len(generic_ids) == 12
    assert len(fast_ids) == 374
    fast_kinds = {(by_id[i].family, by_id[i].protocol) for i in fast_ids}
    assert fast_kinds == {
        (AF_INET, TCP), (AF_INET, UDP), (AF_INET, 132), (AF_INET, 136), (AF_INET, GRE),
        (AF_INET6, TCP), (AF_INET6, UDP),
    }  # fmt: skip


def test_status_and_mark_shortcut_is_taken_for_entries_without_zone(monkeypatch):
    scalar_walks = []
    original = getattr(cttable, SCALARS)

    def spy(*args, **kwargs):
        if not kwargs.get("complete"):  # the generic path walks everything, always
            scalar_walks.append(args[3])
        return original(*args, **kwargs)

    monkeypatch.setattr(cttable, SCALARS, spy)
    tally_of(entries())
    # Fast-path entries walk the scalars only when TCP (for the state) or zoned.
    zoned_udp = sum(1 for r in references() if r.zone and r.protocol != TCP)
    fast_tcp = sum(1 for r in references() if r.protocol == TCP)
    assert scalar_walks.count(False) == zoned_udp == 10
    assert scalar_walks.count(True) == fast_tcp


@pytest.mark.parametrize(
    "disabled",
    [
        (*FAST_LAYOUTS, STATUS_MARK_LAYOUT),  # everything generic
        (STATUS_MARK_LAYOUT,),  # fast tuples, scalars always walked
        FAST_LAYOUTS[:1],
        FAST_LAYOUTS[1:],
    ],
)
@pytest.mark.parametrize(("zone", "mark"), [(True, True), (False, False)])
def test_generic_walk_gives_the_fast_path_tallies(monkeypatch, disabled, zone, mark):
    normal = counters(tally_of(entries(), zone=zone, mark=mark, **with_pods()))
    calls = generic_calls(monkeypatch)
    for name in disabled:
        monkeypatch.setattr(cttable, name, ("impossible",))
    forced = tally_of(entries(), zone=zone, mark=mark, **with_pods())
    assert counters(forced) == normal
    if set(FAST_LAYOUTS) <= set(disabled):
        assert len(calls) == 386


def test_memoryview_over_a_reused_buffer_tallies_like_bytes():
    expected = counters(tally_of(entries(), zone=True, mark=True))
    tally = TableTally(zone=True, mark=True)
    buffer = bytearray(b"\xa5" * 65536)
    view = memoryview(buffer)
    for data in datagrams():
        buffer[: len(data)] = data
        for msg in iter_messages(view, len(data)):
            if msg.type == CT_NEW:
                tally.add(view, msg.start, msg.end)
    tally.finish()
    assert counters(tally) == expected


def test_add_message_takes_the_socket_messages_as_they_come():
    # The socket hands every message of the dump to add_message; only CT_NEW is an entry.
    tally = TableTally(zone=True, mark=True)
    for buf, msg in all_messages():
        tally.add_message(buf, msg)
    tally.finish()
    assert counters(tally) == counters(tally_of(entries(), zone=True, mark=True))


@pytest.mark.parametrize("budget", [1, 100, 385])
def test_budget_stops_after_that_many_entries(budget):
    tally = TableTally(stop_after=budget)
    with pytest.raises(BudgetSpent):
        for buf, msg in entries():
            tally.add(buf, msg.start, msg.end)
    assert counters(tally) == counters(tally_of(entries()[:budget]))
    assert tally.entries == budget


def test_budget_larger_than_the_table_is_never_spent():
    assert tally_of(entries(), stop_after=387).entries == 386


# --- bounded address tallies ----------------------------------------------------------------

ADDRESS_TALLIES = ("sources", "destinations", "nat_pools")


def check_prune_accounting(small: TableTally, full: TableTally) -> None:
    lost = 0
    for name in ADDRESS_TALLIES:
        kept, whole = getattr(small, name), getattr(full, name)
        for key, count in kept.items():
            assert 0 < count <= whole[key], (name, key)
        lost += sum(whole.values()) - sum(kept.values())
    assert small.pruned == lost
    # The other counters are never pruned.
    assert (small.entries, small.kinds, small.statuses) == (full.entries, full.kinds, full.statuses)


@pytest.mark.parametrize("capacity", [1, 2, 3, 4, 6, 8, 16, 64])
def test_pruning_keeps_exact_counts_for_dominant_keys(capacity):
    full = tally_of(entries())
    small = tally_of(entries(), address_capacity=capacity)
    check_prune_accounting(small, full)
    strict = 0
    half = max(capacity // 2, 1)  # what a prune keeps: half the capacity, at least one key
    for name in ADDRESS_TALLIES:
        kept, whole = getattr(small, name), getattr(full, name)
        if len(whole) <= capacity:
            assert kept == whole, name
            continue
        assert len(kept) == half, name
        counts = sorted(whole.values(), reverse=True)
        if counts[half - 1] > counts[half]:  # no tie at the cut
            assert kept == dict(Counter(whole).most_common(half)), name
            strict += 1
    assert small.pruned > 0  # 70 sources, 171 destinations, 6 pools in the fixture
    if capacity in (1, 2, 3, 4):
        assert strict == 3  # the cut is clean in every tally: the test means something


def test_pruning_loses_nothing_below_capacity():
    full = tally_of(entries())
    exact = max(len(getattr(full, name)) for name in ADDRESS_TALLIES)
    assert counters(tally_of(entries(), address_capacity=exact)) == counters(full)
    assert tally_of(entries(), address_capacity=exact - 1).pruned > 0


@pytest.mark.parametrize("interval", [7, 50, 128])
def test_pruning_during_the_dump(monkeypatch, interval):
    full = tally_of(entries())
    monkeypatch.setattr(cttable, "PRUNE_CHECK_INTERVAL", interval)
    small = tally_of(entries(), address_capacity=8)
    check_prune_accounting(small, full)
    for name in ADDRESS_TALLIES:
        assert len(getattr(small, name)) <= 8
    # 127.0.0.1 is the source of 40% of the entries, spread over the dump: never cut.
    (loopback,) = [k for k in full.sources if decode_address(k) == "127.0.0.1"]
    assert small.sources[loopback] == full.sources[loopback] == 156
    assert small.pruned > 0


# --- malformed input: NetlinkParseError or a tally, and nothing else ---------------------------


class Hang(Exception):
    pass


def _hang(_signum: int, _frame: object) -> None:
    raise Hang("TableTally.add took more than a second on one message")


def attempt(tally: TableTally, buf: bytes | bytearray, start: int, end: int) -> bool:
    """Feed one message; True if tallied. A failure must leave every counter as it was."""
    before = counters(tally)
    previous = signal.signal(signal.SIGALRM, _hang)
    signal.setitimer(signal.ITIMER_REAL, 1.0)  # a loop that never ends fails, not hangs
    try:
        tally.add(buf, start, end)
    except NetlinkParseError:
        assert counters(tally) == before
        return False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    after = counters(tally)
    assert after[0] == before[0] + 1
    for index in (2, 3, 4, 5):  # kinds, statuses, sources, destinations: one more each
        assert sum(after[index].values()) == sum(before[index].values()) + 1
    return True


def fed(tally: TableTally) -> TableTally:
    """A tally with one real entry in it already, so that 'unchanged' has something to keep."""
    buf, msg = entries()[0]
    tally.add(buf, msg.start, msg.end)
    return tally


def payload(buf: bytes, msg: Message) -> bytes:
    return bytes(buf[msg.start : msg.end])


@cache
def payloads() -> tuple[bytes, ...]:
    return tuple(payload(buf, msg) for buf, msg in entries())


def test_truncation_at_every_offset_of_every_entry():
    tally = fed(TableTally(zone=True, mark=True))
    outcomes = Counter()
    for buf, msg in entries():
        for end in range(msg.start, msg.end):
            # Inside the datagram (bytes beyond `end` exist and must not be read) ...
            inside = attempt(tally, buf, msg.start, end)
            # ... and alone (reading past `end` would be an IndexError or struct.error).
            alone = attempt(tally, buf[msg.start : end], 0, end - msg.start)
            assert inside == alone, (msg.start, end)
            outcomes[inside] += 1
    assert outcomes[False] > outcomes[True] > 0


def top_level_boundaries(data: bytes) -> set[int]:
    """Where a cut leaves whole top-level attributes: before one, or after one with all, part
    or none of its alignment padding (which the last attribute of a message may lack)."""
    cuts = {len(data)}
    for offset, _end, _type in top_level_headers(data):
        length = NLATTR.unpack_from(data, offset)[0]
        cuts |= {offset, *range(offset + length, offset + ((length + 3) & ~3) + 1)}
    return cuts


def top_level_headers(data: bytes) -> list[tuple[int, int, int]]:
    return attribute_headers(data, NFGENMSG_SIZE, len(data), nested=False)


def test_truncated_entries_that_still_tally_agree_with_pyroute2():
    # A cut between two top-level attributes leaves a well-formed, shorter entry: it tallies
    # as pyroute2 decodes that entry (missing status or mark count as 0) unless a tuple is
    # gone. Any other cut fails, or changes nothing because the fast path had already read
    # everything it needs (status, mark and the TCP state) when it reached the cut.
    cut_at_boundary = Counter()
    for buf, msg in entries():
        data = payload(buf, msg)
        whole = counters(tally_of([(buf, msg)], zone=True, mark=True))
        boundaries = top_level_boundaries(data)
        for cut in range(len(data)):
            tally = TableTally(zone=True, mark=True)
            try:
                tally.add(data, 0, cut)
            except NetlinkParseError:
                cut_at_boundary["failed"] += cut in boundaries
                continue
            if cut in boundaries:
                shorter = NLMSGHDR.pack(NLMSGHDR.size + cut, CT_NEW, 0, 0, 0) + data[:cut]
                ref = reference(shorter, Message(CT_NEW, 0, 0, 0, NLMSGHDR.size, len(shorter)))
                assert_tally_is(tally, ref)
                cut_at_boundary["tallied"] += 1
            else:
                assert counters(tally) == whole, (msg.start, cut)
    assert cut_at_boundary["failed"] > 0 and cut_at_boundary["tallied"] > 0


def attribute_headers(
    data: bytes, start: int, end: int, nested: bool = True
) -> list[tuple[int, int, int]]:
    """(offset, parent end, type) of every attribute header, nested ones too if `nested`."""
    found = []
    offset = start
    while end - offset >= 4:
        length, attr_type = NLATTR.unpack_from(data, offset)
        assert 4 <= length <= end - offset
        found.append((offset, end, attr_type))
        if nested and attr_type & NLA_F_NESTED:
            found += attribute_headers(data, offset + 4, offset + length)
        offset += (length + 3) & ~3
    assert offset == end
    return found


def nested_attribute_headers(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    return attribute_headers(data, start, end)


@cache
def samples() -> tuple[bytes, ...]:
    """One entry payload of each layout: family, protocol, and the top-level attribute names."""
    seen, out = set(), []
    for data, ref in zip(payloads(), references(), strict=True):
        key = (ref.family, ref.protocol, ref.attributes, ref.zone)
        if key not in seen:
            seen.add(key)
            out.append(data)
    return tuple(out)


def test_samples_cover_both_paths():
    assert len(samples()) >= 15


@pytest.mark.parametrize("new_length", ["zero-length", 0, 3, "overlong", 0xFFFF, "one-short"])
def test_bad_attribute_lengths_everywhere(new_length):
    tally = fed(TableTally(zone=True, mark=True))
    failures = 0
    for data in samples():
        for offset, parent_end, _type in nested_attribute_headers(data, NFGENMSG_SIZE, len(data)):
            length = {
                "zero-length": 4,
                "overlong": parent_end - offset + 4,
                "one-short": NLATTR.unpack_from(data, offset)[0] - 1,
            }.get(new_length, new_length)
            mutated = bytearray(data)
            struct.pack_into("=H", mutated, offset, length)
            failures += not attempt(tally, mutated, 0, len(mutated))
    assert failures > 0


def test_clearing_the_nested_flag_changes_the_path_not_the_result(monkeypatch):
    calls = generic_calls(monkeypatch)
    for data in samples():
        whole = counters(tally_of([(data, Message(CT_NEW, 0, 0, 0, 0, len(data)))], zone=True))
        for offset, _end, attr_type in nested_attribute_headers(data, NFGENMSG_SIZE, len(data)):
            if not attr_type & NLA_F_NESTED:
                continue
            mutated = bytearray(data)
            struct.pack_into("=H", mutated, offset + 2, attr_type & ~NLA_F_NESTED)
            tally = TableTally(zone=True)
            calls.clear()
            tally.add(mutated, 0, len(mutated))
            assert counters(tally) == whole
            if offset < NFGENMSG_SIZE + 104:  # a tuple's header: the fast path declines it
                assert calls


# An entry as a tree of attributes, to rebuild it with one part changed and every enclosing
# length still right: (type with its flag bits, bytes or a list of children).
Tree = list[tuple[int, "bytes | Tree"]]


def parse_tree(data: bytes, start: int, end: int) -> Tree:
    tree: Tree = []
    for offset, _end, attr_type in attribute_headers(data, start, end, nested=False):
        length = NLATTR.unpack_from(data, offset)[0]
        if attr_type & NLA_F_NESTED:
            tree.append((attr_type, parse_tree(data, offset + 4, offset + length)))
        else:
            tree.append((attr_type, data[offset + 4 : offset + length]))
    return tree


def encode_tree(tree: Tree) -> bytes:
    out = b""
    for attr_type, value in tree:
        body = value if isinstance(value, bytes) else encode_tree(value)
        raw = NLATTR.pack(4 + len(body), attr_type) + body
        out += raw + b"\0" * (-len(raw) % 4)
    return out


def entry_tree(data: bytes) -> Tree:
    return parse_tree(data, NFGENMSG_SIZE, len(data))


def rebuilt(data: bytes, tree: Tree) -> bytes:
    return data[:NFGENMSG_SIZE] + encode_tree(tree)


def variants(tree: Tree, change, path: tuple[int, ...] = ()):
    """Every tree with one attribute replaced by change(path, attribute) (a list of
    attributes, so [] removes it), for each attribute change does not answer None for."""
    for index, (attr_type, value) in enumerate(tree):
        here = (*path, attr_type & 0x3FFF)
        replacement = change(here, (attr_type, value))
        if replacement is not None:
            yield here, [*tree[:index], *replacement, *tree[index + 1 :]]
        if not isinstance(value, bytes):
            for inner_path, inner in variants(value, change, here):
                yield inner_path, [*tree[:index], (attr_type, inner), *tree[index + 1 :]]


def test_attribute_trees_rebuild_the_kernel_bytes():
    for data in payloads():
        assert rebuilt(data, entry_tree(data)) == data


# The fixed-size values the decoder reads, by path of attribute types.
READ_VALUES = {
    (3,): 4, (8,): 4, (18,): 2,  # CTA_STATUS, CTA_MARK, CTA_ZONE
    (4, 1, 1): 1,  # CTA_PROTOINFO > CTA_PROTOINFO_TCP > CTA_PROTOINFO_TCP_STATE
    **{(tup, 1, ip): 4 for tup in (1, 2) for ip in (1, 2)},  # CTA_IP_V4_SRC/DST in both tuples
    **{(tup, 1, ip): 16 for tup in (1, 2) for ip in (3, 4)},  # CTA_IP_V6_SRC/DST
    **{(tup, 2, 1): 1 for tup in (1, 2)},  # CTA_PROTO_NUM
    **{(tup, 2, port): 2 for tup in (1, 2) for port in (2, 3)},  # CTA_PROTO_SRC/DST_PORT
}  # fmt: skip


@pytest.mark.parametrize("delta", [-1, +1, +4, "empty"])
def test_values_of_the_wrong_size_are_errors(delta):
    def resize(path, attribute):
        attr_type, value = attribute
        if path not in READ_VALUES:
            return None
        assert len(value) == READ_VALUES[path], path
        size = 0 if delta == "empty" else len(value) + delta
        return [(attr_type, (value * 2)[:size])]

    checked = set()
    tally = fed(TableTally(zone=True, mark=True))
    for data in samples():
        for path, tree in variants(entry_tree(data), resize):
            assert not attempt(tally, rebuilt(data, tree), 0, len(rebuilt(data, tree))), path
            checked.add(path)
    assert checked == READ_VALUES.keys()


# What an entry cannot lose: its tuples, their addresses and protocol number.
REQUIRED = {(1,), (2,), *((tup, part) for tup in (1, 2) for part in (1, 2))}
REQUIRED |= {(tup, 1, ip) for tup in (1, 2) for ip in (1, 2, 3, 4)}
REQUIRED |= {(tup, 2, 1) for tup in (1, 2)}


def test_entries_missing_a_tuple_an_address_or_the_protocol_are_errors():
    checked = set()
    tally = fed(TableTally())
    for data in samples():
        for path, tree in variants(entry_tree(data), lambda p, a: [] if p in REQUIRED else None):
            assert not attempt(tally, rebuilt(data, tree), 0, len(rebuilt(data, tree))), path
            checked.add(path)
    assert checked == REQUIRED


def test_entries_missing_what_is_optional_still_tally():
    # Attributes the kernel itself leaves out: ports (ICMP has none), CTA_ZONE (zone 0),
    # CTA_MARK (kernels without CONFIG_NF_CONNTRACK_MARK), CTA_PROTOINFO (offloaded flows).
    # They count as 0 (no TCP state), never as an error.
    optional = {(8,), (18,), (4,), (1, 2, 2), (1, 2, 3), (2, 2, 2), (2, 2, 3)}
    checked = set()
    tally = TableTally()
    for data in samples():
        for path, tree in variants(entry_tree(data), lambda p, a: [] if p in optional else None):
            assert attempt(tally, rebuilt(data, tree), 0, len(rebuilt(data, tree))), path
            checked.add(path)
    assert checked == optional


def test_tuple_attribute_with_content_that_is_not_nested_attributes():
    # Raw bytes where a tuple, CTA_TUPLE_IP or CTA_TUPLE_PROTO should hold attributes: the
    # bytes either do not parse as attributes or hold no address or protocol. An error.
    tally = fed(TableTally())
    checked = set()
    for data in samples():
        for filler in (b"\0", b"\xff", b"\x04\x00\x01\x00", b"\x08\x00"):

            def flatten(path, attribute, filler=filler):
                if path not in REQUIRED or len(path) > 2:
                    return None
                attr_type, value = attribute
                raw = encode_tree(value)
                return [(attr_type, (filler * len(raw))[: len(raw)])]

            for path, tree in variants(entry_tree(data), flatten):
                assert not attempt(tally, rebuilt(data, tree), 0, len(rebuilt(data, tree)))
                checked.add(path)
    assert len(checked) == 6


FUZZ = settings(max_examples=300, deadline=500, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(data=st.binary(max_size=600))
def test_arbitrary_bytes(data):
    tally = fed(TableTally(zone=True, mark=True))
    attempt(tally, data, 0, len(data))


@FUZZ
@given(family=st.sampled_from([AF_INET, AF_INET6, 0, 7]), body=st.binary(max_size=400))
def test_arbitrary_attributes_after_a_plausible_header(family, body):
    data = bytes([family, 0, 0, 0]) + body
    attempt(fed(TableTally(zone=True, mark=True)), data, 0, len(data))


@FUZZ
@given(
    index=st.integers(min_value=0, max_value=385),
    position=st.integers(min_value=0),
    value=st.integers(min_value=0, max_value=255),
)
def test_single_byte_mutations(index, position, value):
    data = bytearray(payloads()[index])
    data[position % len(data)] = value
    attempt(fed(TableTally(zone=True, mark=True)), data, 0, len(data))


@FUZZ
@given(
    index=st.integers(min_value=0, max_value=385),
    cuts=st.lists(st.integers(min_value=0), min_size=1, max_size=4),
    junk=st.binary(min_size=1, max_size=16),
)
def test_spliced_junk(index, cuts, junk):
    data = payloads()[index]
    for cut in cuts:
        cut %= len(data) + 1
        data = data[:cut] + junk + data[cut:]
    attempt(fed(TableTally()), data, 0, len(data))


def test_any_tcp_state_byte_round_trips_through_the_kind_key():
    # The kernel sends 0..9; even a byte of 255 must not spill into the protocol field.
    dump = bytearray((FIXTURES / "ct_dump_mix.bin").read_bytes())
    for msg in iter_messages(dump, len(dump)):
        if msg.type != CT_NEW:
            continue
        tally = TableTally()
        tally.add(dump, msg.start, msg.end)
        if decode_kind(next(iter(tally.kinds))).protocol == 6:
            break
    state_offset = None
    for attr, start, end in iter_attributes(dump, msg.start + 4, msg.end):
        if attr == 4:  # CTA_PROTOINFO > CTA_PROTOINFO_TCP > CTA_PROTOINFO_TCP_STATE
            for inner, inner_start, inner_end in iter_attributes(dump, start, end):
                for field, value_start, _ in iter_attributes(dump, inner_start, inner_end):
                    if inner == 1 and field == 1:
                        state_offset = value_start
    assert state_offset is not None
    for state in (0, 9, 254, 255):
        dump[state_offset] = state
        tally = TableTally()
        tally.add(dump, msg.start, msg.end)
        (kind,) = [decode_kind(key) for key in tally.kinds]
        assert (kind.family, kind.protocol, kind.state) == (2, 6, state)


def service_entry() -> bytes:
    """One of the fixture's DNAT entries (a REDIRECT on loopback: every address 127.0.0.1)
    made a Service's: original destination a ClusterIP, reply source a pod behind it."""
    buf, msg = next(
        (buf, msg) for (buf, msg), ref in zip(entries(), references(), strict=True)
        if ref.status & IPS_DST_NAT and ref.family == AF_INET
    )  # fmt: skip
    data = payload(buf, msg)
    tree = entry_tree(data)

    def readdress(tuple_type: int, ip_type: int, new: str) -> None:
        (tuple_tree,) = [v for t, v in tree if t & ~NLA_F_NESTED == tuple_type]
        (ip_tree,) = [v for t, v in tuple_tree if t & ~NLA_F_NESTED == 1]  # CTA_TUPLE_IP
        index = next(i for i, (t, _) in enumerate(ip_tree) if t == ip_type)
        ip_tree[index] = (ip_type, ipaddress.IPv4Address(new).packed)

    readdress(1, 2, "10.96.0.10")  # CTA_TUPLE_ORIG, CTA_IP_V4_DST
    readdress(2, 1, "10.244.1.5")  # CTA_TUPLE_REPLY, CTA_IP_V4_SRC
    return rebuilt(data, tree)


@pytest.mark.parametrize("path", ["fast", "generic"])
def test_an_entry_through_a_service_is_inbound_for_the_pod_behind_it(monkeypatch, path):
    data = service_entry()
    calls = generic_calls(monkeypatch)
    if path == "generic":
        for name in FAST_LAYOUTS:
            monkeypatch.setattr(cttable, name, ("impossible",))
    pods = {address_key("10.96.0.10"): 0, address_key("10.244.1.5"): 1}
    tally = TableTally(pod_of=pods, pods=2)
    tally.add(data, 0, len(data))
    assert tally.pod_inbound == [0, 1]
    assert (tally.pod_outbound, tally.pod_nat_pools) == ([0, 0], {})  # the source: no pod
    (destination,) = tally.destinations
    assert decode_destination(destination).address == "10.96.0.10"
    assert len(calls) == (path == "generic")
