"""Pure tests of the sock_diag request builder and socket tally (netlink/inet_diag.py).

tests/fixtures/netlink/sockdiag_*.bin are the raw recv() bytes of SOCK_DIAG_BY_FAMILY dumps from
Linux 6.18 and sockdiag.ss-tuan.txt what `ss -tuan` listed at the same moment, both written by
tests/fixtures/capture_sockdiag.py, which describes the mix of sockets (and sockdiag.json records
each request and the size of each group). The tally is checked socket by socket against pyroute2's
decoding of the same bytes, as a whole against the ss text, and on malformed input. One test
asks this machine's kernel (no privilege needed) whether it accepts the filter program.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import re
import socket
import struct
import sys
from collections import Counter
from functools import cache
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.netlink import diag as pr_diag

from conntrack_exporter.netlink.core import (
    NLMSG_DONE,
    NLMSG_MIN_TYPE,
    BudgetSpent,
    Message,
    NetlinkError,
    NetlinkParseError,
    iter_messages,
)
from conntrack_exporter.netlink.inet_diag import (
    INET_DIAG_MSG,
    LISTEN_STATES,
    NETLINK_SOCK_DIAG,
    PORT_STATES,
    READ_REQUESTS,
    SOCK_DIAG_BY_FAMILY,
    PortTally,
    SockDiagReader,
    build_request,
    local_port,
)
from conntrack_exporter.netlink.socket import DumpResult, NetlinkSocket
from conntrack_exporter.netlink.tally import IPPROTO_TCP, IPPROTO_UDP, decode_destination
from tests.test_netlink_parsers import parse_enums

FIXTURES = Path(__file__).parent / "fixtures" / "netlink"
RECORD = json.loads((FIXTURES / "sockdiag.json").read_text())
SS_TEXT = (FIXTURES / "sockdiag.ss-tuan.txt").read_text()
REQUESTS: dict[str, dict] = RECORD["requests"]
PORT_RANGE: tuple[int, int] = tuple(RECORD["ip_local_port_range"])
LOW, HIGH = PORT_RANGE
EVERY_PORT = b"\x01" * 65536
# The exporter's own requests (the rest are ss's, for comparison).
READER_DUMPS = ("sockdiag_tcp4", "sockdiag_tcp6", "sockdiag_udp4", "sockdiag_udp6")
LISTEN_DUMPS = ("sockdiag_tcp4_listen", "sockdiag_tcp6_listen")
ALL_DUMPS = ("sockdiag_tcp4_all", "sockdiag_tcp6_all", "sockdiag_udp4_all", "sockdiag_udp6_all")
UAPI = Path("/usr/include/linux")

# The kernel's numbers, written out here rather than taken from the module under test.
TCP_CLOSE, TCP_LISTEN, TCP_BOUND_INACTIVE = 7, 10, 13
SS_STATES = {
    1: "ESTAB", 2: "SYN-SENT", 3: "SYN-RECV", 4: "FIN-WAIT-1", 5: "FIN-WAIT-2", 6: "TIME-WAIT",
    7: "UNCONN", 8: "CLOSE-WAIT", 9: "LAST-ACK", 10: "LISTEN", 11: "CLOSING",
}  # fmt: skip
PROTOCOLS = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp"}


# --- the fixture -------------------------------------------------------------------------------


@cache
def datagrams(name: str) -> tuple[bytes, ...]:
    """A fixture split back into the datagrams recv() returned."""
    data = (FIXTURES / f"{name}.bin").read_bytes()
    out, offset = [], 0
    for length in REQUESTS[name]["datagram_lengths"]:
        out.append(data[offset : offset + length])
        offset += length
    assert offset == len(data), f"{name}: datagram lengths do not add up"
    return tuple(out)


def messages(name: str) -> list[tuple[bytes, Message]]:
    return [(d, msg) for d in datagrams(name) for msg in iter_messages(d, len(d))]


def sockets(name: str) -> list[tuple[bytes, Message]]:
    return [(d, msg) for d, msg in messages(name) if msg.type == SOCK_DIAG_BY_FAMILY]


def protocol_of(name: str) -> int:
    return REQUESTS[name]["protocol"]


def test_fixtures_are_complete_dumps_from_the_kernel_they_claim():
    assert RECORD["kernel_release"].startswith("6.18.")
    for name in REQUESTS:
        kinds = [msg.type for _, msg in messages(name)]
        assert kinds[-1] == NLMSG_DONE and set(kinds[:-1]) <= {SOCK_DIAG_BY_FAMILY}, name
    assert PORT_RANGE == (32768, 60999)  # the kernel's default in a fresh namespace


# --- what pyroute2 and ss say ------------------------------------------------------------------


class Sock(NamedTuple):
    """One socket as ss prints it: addresses normalised by ipaddress."""

    protocol: str
    state: str
    local: str
    local_port: int
    peer: str
    peer_port: int  # 0 for none ("*")


def address(text: str) -> str:
    return str(ipaddress.ip_address("::" if text == "*" else text.strip("[]")))


def parse_ss(text: str) -> list[Sock]:
    out = []
    for line in text.splitlines()[1:]:
        netid, state, _recv_q, _send_q, local, peer = line.split()[:6]
        local_addr, _, local_port = local.rpartition(":")
        peer_addr, _, peer_port = peer.rpartition(":")
        peer_number = 0 if peer_port == "*" else int(peer_port)
        out.append(
            Sock(
                netid, state, address(local_addr), int(local_port), address(peer_addr), peer_number
            )
        )
    return out


def pyroute2_socket(buf: bytes, msg: Message, protocol: int) -> Sock:
    decoded = pr_diag.inet_diag_msg(buf[msg.start - 16 : msg.end])
    decoded.decode()
    return Sock(
        PROTOCOLS[protocol],
        SS_STATES.get(decoded["idiag_state"], str(decoded["idiag_state"])),
        address(decoded["idiag_src"]),
        decoded["idiag_sport"],
        address(decoded["idiag_dst"]),
        decoded["idiag_dport"],
    )


def pyroute2_sockets(names: tuple[str, ...]) -> list[Sock]:
    return [pyroute2_socket(b, m, protocol_of(name)) for name in names for b, m in sockets(name)]


def unmapped(text: str) -> str:
    """An IPv4-mapped IPv6 address as the IPv4 address it maps (both draw on one pool)."""
    parsed = ipaddress.ip_address(text)
    mapped = getattr(parsed, "ipv4_mapped", None)
    return str(mapped) if mapped else text


def test_fixture_dumps_list_what_ss_listed():
    # ss 6.1 does not ask for BOUND_INACTIVE (kernel 6.5+): the bound-only TCP socket, which
    # the kernel reports as CLOSE, is only in our dumps.
    ours = [
        s for s in pyroute2_sockets(ALL_DUMPS) if not (s.protocol == "tcp" and s.state == "UNCONN")
    ]
    listed = parse_ss(SS_TEXT)
    assert Counter(ours) == Counter(listed)
    assert len(listed) == 37
    bound = [s for s in pyroute2_sockets(ALL_DUMPS) if s.protocol == "tcp" and s.state == "UNCONN"]
    assert len(bound) == RECORD["groups"]["tcp_bound_inactive"] == 1


def ss_counts(text: str, counted: bytes) -> Counter:
    """What the collector should count, from `ss -tuan` text alone: sockets whose local port
    counts (`counted`, by port: the range less reserved ports), listeners and the sockets
    they accepted excluded, by (protocol, peer, port)."""
    listed = parse_ss(text)
    listening = {s.local_port for s in listed if s.protocol == "tcp" and s.state == "LISTEN"}
    truth: Counter = Counter()
    for s in listed:
        if s.state in ("LISTEN", "SYN-RECV") or not counted[s.local_port]:
            continue
        if s.protocol == "tcp" and s.local_port in listening:
            continue
        peer = ("", "") if not s.peer_port else (unmapped(s.peer), str(s.peer_port))
        truth[(s.protocol, *peer)] += 1
    return truth


def ss_truth() -> Counter:
    """ss_counts of the fixture, and the bound-only TCP socket that ss 6.1 does not show."""
    truth = ss_counts(SS_TEXT, ephemeral())
    truth[("tcp", "", "")] += RECORD["groups"]["tcp_bound_inactive"]
    return truth


# --- our decoding ------------------------------------------------------------------------------


def labels(key: int) -> tuple[str, str, str]:
    destination = decode_destination(key)
    peer = ("", "") if not destination.port else (destination.address, str(destination.port))
    return (PROTOCOLS[destination.protocol], *peer)


def counts(tally: PortTally) -> Counter:
    return Counter(
        {
            labels(key): n
            for per_protocol in tally.destinations.values()
            for key, n in per_protocol.items()
        }
    )


def tally_of(names: tuple[str, ...], tcp_ports: bytes, udp_ports: bytes, **options) -> PortTally:
    tally = PortTally(**options)
    for name in names:
        protocol = protocol_of(name)
        tally.expect(protocol, tcp_ports if protocol == IPPROTO_TCP else udp_ports)
        for buf, msg in messages(name):
            tally.add_message(buf, msg)
    tally.finish()
    return tally


def ephemeral() -> bytes:
    flags = bytearray(65536)
    flags[LOW : HIGH + 1] = b"\x01" * (HIGH - LOW + 1)
    return bytes(flags)


def listening() -> set[int]:
    return {local_port(b, m) for name in LISTEN_DUMPS for b, m in sockets(name)}


def without(ports: bytes, excluded: set[int]) -> bytes:
    out = bytearray(ports)
    for port in excluded:
        out[port] = 0
    return bytes(out)


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_every_socket_decodes_as_pyroute2_decodes_it(name):
    protocol = protocol_of(name)
    assert sockets(name) or name == "sockdiag_tcp4_listen"  # no IPv4 listener in the range
    for buf, msg in sockets(name):
        reference = pyroute2_socket(buf, msg, protocol)
        tally = PortTally()
        tally.expect(protocol, EVERY_PORT)
        tally.add_message(buf, msg)
        [key] = tally.destinations[protocol]
        peer = (
            ("", "")
            if not reference.peer_port
            else (unmapped(reference.peer), str(reference.peer_port))
        )
        assert labels(key) == (PROTOCOLS[protocol], *peer)
        assert local_port(buf, msg) == reference.local_port
        assert tally.sockets == 1


def test_listeners_in_the_range_are_found_ipv4_and_ipv6():
    assert listening() == {RECORD["listeners"]["inside"]}
    every = {local_port(b, m) for name in ALL_DUMPS[:2] for b, m in sockets(name)}
    assert RECORD["listeners"]["outside"] in every  # there, but outside the range


def test_the_reader_dumps_count_what_ss_shows():
    tally = tally_of(READER_DUMPS, without(ephemeral(), listening()), ephemeral())
    assert counts(tally) == ss_truth()
    # Spelled out, so that the comparison cannot pass on a wrong mix (sockdiag.json's groups).
    assert counts(tally) == {
        ("tcp", "127.0.0.1", "8080"): 5 + 2,  # established + TIME_WAIT; not the one from :20000
        ("tcp", "127.0.0.1", "40001"): 3 + 1,  # IPv4 + IPv4-mapped IPv6; not the accepted ones
        ("tcp", "::1", "40001"): 2,
        ("tcp", "", ""): 1,  # bound to port 0, nothing else
        ("udp", "127.0.0.1", "5353"): 3,
        ("udp", "::1", "5300"): 1,
        ("udp", "", ""): 3 + 1,  # unconnected, IPv4 and IPv6
    }
    assert (tally.largest(IPPROTO_TCP), tally.largest(IPPROTO_UDP)) == (7, 4)
    # Read: the counted ones and the 6 sockets accepted on the listener inside the range.
    assert tally.sockets == sum(counts(tally).values()) + 6


def test_the_kernel_filter_drops_exactly_the_sockets_outside_the_range():
    filtered = pyroute2_sockets(READER_DUMPS + LISTEN_DUMPS)
    assert filtered and all(LOW <= s.local_port <= HIGH for s in filtered)
    unfiltered = pyroute2_sockets(ALL_DUMPS)
    outside = [s for s in unfiltered if not LOW <= s.local_port <= HIGH]
    # 6 accepted on 8080, 8080's listener, the client bound to 20000, the UDP server on 5353
    assert len(outside) == 9
    # The filter changes nothing but what crosses into userspace: counting every socket of the
    # unfiltered dumps in userspace gives the same counts.
    ports = without(ephemeral(), listening())
    unfiltered_tally = tally_of(ALL_DUMPS, ports, ephemeral())
    assert counts(unfiltered_tally) == counts(tally_of(READER_DUMPS, ports, ephemeral()))


def test_reserved_and_listening_ports_do_not_count():
    udp_clients = {s.local_port for s in pyroute2_sockets(("sockdiag_udp4",)) if s.peer_port}
    reserved = without(ephemeral(), udp_clients)
    tally = tally_of(("sockdiag_udp4",), reserved, reserved)
    assert ("udp", "127.0.0.1", "5353") not in counts(tally)
    # Without the listener's port taken out, its accepted sockets count, each toward the
    # client's own (address, port).
    accepted = {s.peer_port for s in pyroute2_sockets(("sockdiag_tcp6",)) if s.local_port == 40001}
    tally = tally_of(("sockdiag_tcp6",), ephemeral(), ephemeral())
    assert len(accepted) == RECORD["groups"]["tcp_accepted_inside"] == 6
    assert {int(port) for (_, _, port), n in counts(tally).items() if n == 1} >= accepted
    assert sum(counts(tally).values()) == 1 + 2 + 6  # IPv4-mapped client, IPv6 clients
    tally = tally_of(("sockdiag_tcp6",), without(ephemeral(), listening()), ephemeral())
    assert sum(counts(tally).values()) == 1 + 2


# --- the request --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_requests_match_the_capture_scripts_own_construction(name):
    request = REQUESTS[name]
    port_range = PORT_RANGE if request["filtered"] else None
    built = build_request(request["family"], request["protocol"], request["states"], port_range)
    assert built.hex() == request["payload"]


def test_request_fields_sit_where_the_header_puts_them():
    built = build_request(socket.AF_INET6, IPPROTO_UDP, PORT_STATES, (1024, 2048))
    # struct inet_diag_req_v2: family, protocol, ext, pad, states; sockid (48 bytes)
    assert struct.unpack_from("=BBBBI", built) == (socket.AF_INET6, IPPROTO_UDP, 0, 0, PORT_STATES)
    assert built[8:56] == bytes(48)
    # struct nlattr INET_DIAG_REQ_BYTECODE, then four struct inet_diag_bc_op
    assert struct.unpack_from("=HH", built, 56) == (20, 1)
    ops = [struct.unpack_from("=BBH", built, 60 + 4 * i) for i in range(4)]
    assert ops == [(2, 8, 20), (0, 0, 1024), (3, 8, 12), (0, 0, 2048)]
    assert len(built) == 76
    assert build_request(socket.AF_INET, IPPROTO_TCP, LISTEN_STATES, None) == struct.pack(
        "=BBBBI", socket.AF_INET, IPPROTO_TCP, 0, 0, 1 << TCP_LISTEN
    ) + bytes(48)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
@pytest.mark.parametrize("protocol", [IPPROTO_TCP, IPPROTO_UDP])
def test_request_header_is_what_pyroute2_builds(family, protocol):
    reference = pr_diag.inet_diag_req()
    reference["header"] = {"type": SOCK_DIAG_BY_FAMILY, "flags": 0x301, "sequence_number": 1}
    for field, value in {
        "sdiag_family": family,
        "sdiag_protocol": protocol,
        "idiag_ext": 0,
        "idiag_states": PORT_STATES,
        "idiag_sport": 0,
        "idiag_dport": 0,
    }.items():
        reference[field] = value
    reference.encode()
    built = build_request(family, protocol, PORT_STATES, PORT_RANGE)
    assert built[:56] == bytes(reference.data[16:])


def test_port_states_are_every_state_but_the_listening_ones():
    expected = sum(1 << s for s in (1, 2, 4, 5, 6, 7, 8, 9, 11, TCP_BOUND_INACTIVE))
    assert expected == PORT_STATES
    assert LISTEN_STATES == 1 << pr_diag.SS_LISTEN
    assert not PORT_STATES & (1 << pr_diag.SS_LISTEN | 1 << pr_diag.SS_SYN_RECV | 1 << 12)
    assert PORT_STATES & (1 << pr_diag.SS_TIME_WAIT)


def uapi(header: str) -> str:
    path = UAPI / header
    if not path.exists():
        pytest.skip(f"{path} is absent (Debian: apt-get install linux-libc-dev)")
    return path.read_text()


def defines(text: str) -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r"#define\s+(\w+)\s+(\d+)\b", text)}


def enum_with(text: str, member: str) -> dict[str, int]:
    """The members of the (possibly anonymous) enum of a header that holds `member`."""
    for match in re.finditer(r"enum\s*\w*\s*\{.*?\}\s*;", text, flags=re.DOTALL):
        if re.search(rf"\b{member}\b", match.group(0)):
            [members] = parse_enums(re.sub(r"enum\s*\w*\s*\{", "enum e {", match.group(0))).values()
            return members
    raise AssertionError(f"no enum holds {member}")


def test_constants_agree_with_the_headers():
    from conntrack_exporter.netlink import inet_diag

    sock_diag, inet_diag_h = uapi("sock_diag.h"), uapi("inet_diag.h")
    kernel = {
        **defines(sock_diag),
        **defines(uapi("netlink.h")),
        **enum_with(inet_diag_h, "INET_DIAG_REQ_BYTECODE"),
        **enum_with(inet_diag_h, "INET_DIAG_BC_S_GE"),
        **enum_with(uapi("bpf.h"), "BPF_TCP_ESTABLISHED"),
    }
    names = ("SOCK_DIAG_BY_FAMILY", "INET_DIAG_REQ_BYTECODE", "INET_DIAG_BC_S_GE")
    for name in (*names, "INET_DIAG_BC_S_LE", "NETLINK_SOCK_DIAG"):
        assert getattr(inet_diag, name) == kernel[name], name
    # tcp_states.h is not UAPI; bpf.h mirrors it (the kernel checks they agree at build time).
    for state in ("ESTABLISHED", "SYN_SENT", "TIME_WAIT", "CLOSE", "LISTEN", "NEW_SYN_RECV"):
        assert getattr(inet_diag, f"TCP_{state}") == kernel[f"BPF_TCP_{state}"], state
    assert INET_DIAG_MSG.size == 72  # sizeof(struct inet_diag_msg)
    # SOCK_DESTROY closes sockets: the one request that must never be allowed.
    assert kernel["SOCK_DESTROY"] == 21 and kernel["SOCK_DESTROY"] not in READ_REQUESTS
    assert {kernel["SOCK_DIAG_BY_FAMILY"]} == READ_REQUESTS


# --- the kernel accepts the program ------------------------------------------------------------


@pytest.fixture
def diag_socket():
    if sys.platform != "linux":
        pytest.skip("sock_diag is Linux-only")
    sock = NetlinkSocket(NETLINK_SOCK_DIAG, READ_REQUESTS, timeout=2.0)
    yield sock
    sock.close()


def ignore(_buf: object, _msg: object) -> None:
    pass


@pytest.mark.parametrize("protocol", [IPPROTO_TCP, IPPROTO_UDP])
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_this_kernel_accepts_the_filter_program(diag_socket, family, protocol):
    request = build_request(family, protocol, PORT_STATES, PORT_RANGE)
    assert diag_socket.dump(SOCK_DIAG_BY_FAMILY, request, ignore).complete


@pytest.mark.parametrize(
    ("op", "value"),
    [
        (0, struct.pack("=BBH", 2, 8, 24)),  # a reject jump 8 past the end
        (0, struct.pack("=BBH", 2, 4, 20)),  # a comparison without its port op
        (0, struct.pack("=BBH", 99, 8, 20)),  # an unknown code
    ],
)
def test_this_kernel_refuses_a_broken_program(diag_socket, op, value):
    # The negative control: the audit is real, so acceptance above means a valid program.
    request = bytearray(build_request(socket.AF_INET, IPPROTO_TCP, PORT_STATES, PORT_RANGE))
    request[60 + op * 4 : 64 + op * 4] = value
    with pytest.raises(NetlinkError) as raised:
        diag_socket.dump(SOCK_DIAG_BY_FAMILY, bytes(request), ignore)
    assert raised.value.errno == errno.EINVAL


# --- budget and bounded tallies ------------------------------------------------------------------


@pytest.mark.parametrize("budget", [1, 5, 18])
def test_budget_stops_after_that_many_sockets(budget):
    tally = PortTally(stop_after=budget)
    tally.expect(IPPROTO_TCP, EVERY_PORT)
    with pytest.raises(BudgetSpent):
        for buf, msg in sockets("sockdiag_tcp4_all"):
            tally.add_message(buf, msg)
    assert tally.sockets == budget < len(sockets("sockdiag_tcp4_all"))
    assert sum(tally.destinations[IPPROTO_TCP].values()) == budget


def synthetic(family: int, dport: int, dst: bytes, sport: int = 40000) -> tuple[bytes, Message]:
    """One inet_diag_msg as the kernel lays it out, in a buffer of its own."""
    body = struct.pack("!BBBBHH16s16s", family, 1, 0, 0, sport, dport, bytes(16), dst)
    body += bytes(72 - len(body))
    return body, Message(SOCK_DIAG_BY_FAMILY, 0, 0, 0, 0, len(body))


def test_pruning_keeps_the_largest_destinations_and_accounts_for_the_rest():
    tally = PortTally(capacity=4)
    tally.expect(IPPROTO_TCP, EVERY_PORT)
    for port, repeat in enumerate([9, 7, 5, 1, 1, 1, 1, 1, 1, 1], start=1000):
        for _ in range(repeat):
            tally.add_message(*synthetic(socket.AF_INET, port, bytes([10, 0, 0, 1]) + bytes(12)))
    tally.finish()
    kept = {labels(key)[2]: n for key, n in tally.destinations[IPPROTO_TCP].items()}
    assert kept == {"1000": 9, "1001": 7}
    assert tally.pruned == 28 - 16
    assert tally.largest(IPPROTO_TCP) == 9 and tally.largest(IPPROTO_UDP) == 0


def test_ipv4_mapped_destinations_count_with_ipv4_and_unconnected_sockets_with_each_other():
    tally = PortTally()
    tally.expect(IPPROTO_UDP, EVERY_PORT)
    v4 = bytes([192, 0, 2, 7]) + bytes(12)
    mapped = bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 7])
    for buf, msg in (
        synthetic(socket.AF_INET, 53, v4),
        synthetic(socket.AF_INET6, 53, mapped),
        synthetic(socket.AF_INET6, 53, ipaddress.IPv6Address("2001:db8::7").packed),
        synthetic(socket.AF_INET, 0, bytes(16)),
        synthetic(socket.AF_INET6, 0, bytes(16)),
    ):
        tally.add_message(buf, msg)
    assert counts(tally) == {
        ("udp", "192.0.2.7", "53"): 2,
        ("udp", "2001:db8::7", "53"): 1,
        ("udp", "", ""): 2,
    }


def test_a_port_outside_the_table_is_read_but_not_counted():
    tally = PortTally()
    tally.expect(IPPROTO_TCP, bytes(65536))
    tally.add_message(*synthetic(socket.AF_INET, 80, bytes(16)))
    assert (tally.sockets, counts(tally)) == (1, Counter())


# --- malformed input -----------------------------------------------------------------------------


def feed(data: bytes) -> None:
    """Walk and tally one datagram, as the socket would hand it over."""
    tally = PortTally()
    tally.expect(IPPROTO_TCP, EVERY_PORT)
    for msg in iter_messages(data, len(data)):
        if msg.type >= NLMSG_MIN_TYPE:
            tally.add_message(data, msg)
            local_port(data, msg)


def reader_datagrams() -> list[bytes]:
    return [d for name in READER_DUMPS for d in datagrams(name)]


def test_truncation_at_every_offset_raises_only_a_parse_error():
    for data in reader_datagrams():
        for cut in range(len(data)):
            with contextlib.suppress(NetlinkParseError):
                feed(data[:cut])


def test_a_short_header_and_an_unknown_family_are_parse_errors():
    buf, msg = synthetic(socket.AF_INET, 80, bytes(16))
    short = msg._replace(end=71)
    with pytest.raises(NetlinkParseError, match="71 bytes"):
        PortTally().add_message(buf, short)
    with pytest.raises(NetlinkParseError, match="71 bytes"):
        local_port(buf, short)
    unknown = bytes([1]) + buf[1:]  # AF_UNIX
    with pytest.raises(NetlinkParseError, match="address family 1"):
        PortTally().add_message(unknown, msg)
    with pytest.raises(NetlinkParseError, match="address family 1"):
        local_port(unknown, msg)


def test_every_single_bit_flip_raises_only_a_parse_error():
    data = datagrams("sockdiag_tcp4")[0]
    for offset in range(len(data)):
        for bit in range(8):
            mutated = bytearray(data)
            mutated[offset] ^= 1 << bit
            with contextlib.suppress(NetlinkParseError):
                feed(bytes(mutated))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_raise_only_a_parse_error(data):
    with contextlib.suppress(NetlinkParseError):
        feed(data)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(READER_DUMPS),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
)
def test_corrupted_captures_raise_only_a_parse_error(name, edits):
    data = bytearray(datagrams(name)[0])
    for offset, value in edits:
        data[offset % len(data)] = value
    with contextlib.suppress(NetlinkParseError):
        feed(bytes(data))


# --- the reader over the captured replies -------------------------------------------------------


class ReplayedSocket:
    """Stands in for NetlinkSocket: answers each dump request with the captured reply to the
    same payload (a KeyError for a request the capture did not make)."""

    def __init__(self) -> None:
        self.replies = {bytes.fromhex(req["payload"]): name for name, req in REQUESTS.items()}
        self.asked: list[str] = []

    def dump(self, msg_type: int, payload: bytes, on_message, bounds=None) -> DumpResult:
        assert msg_type == SOCK_DIAG_BY_FAMILY
        name = self.replies[payload]
        self.asked.append(name)
        try:
            for buf, msg in messages(name):
                if msg.type >= NLMSG_MIN_TYPE:
                    on_message(buf, msg)
        except BudgetSpent:
            return DumpResult(complete=False, interrupted=False)
        return DumpResult(complete=True, interrupted=False)

    def close(self) -> None:
        pass


def replayed_reader() -> tuple[SockDiagReader, ReplayedSocket]:
    replay = ReplayedSocket()
    return SockDiagReader(netlink_socket=replay), replay


def test_the_reader_asks_for_listeners_first_then_each_protocol_and_family():
    reader, replay = replayed_reader()
    tally = PortTally()
    assert reader.dump_ports(tally, PORT_RANGE, ephemeral()) == DumpResult(True, False)
    assert replay.asked == [*LISTEN_DUMPS, *READER_DUMPS]
    assert counts(tally) == ss_truth()


def test_the_reader_without_the_kernel_filter_reads_more_and_counts_the_same():
    reader, replay = replayed_reader()
    tally = PortTally()
    assert reader.dump_ports(tally, PORT_RANGE, ephemeral(), kernel_filter=False).complete
    assert replay.asked == [f"{name}_unfiltered" for name in (*LISTEN_DUMPS, *READER_DUMPS)]
    assert counts(tally) == ss_truth()
    assert tally.sockets == sum(len(sockets(f"{name}_unfiltered")) for name in READER_DUMPS)
    # Also read: the 6 accepted inside the range, and outside it the 6 accepted on 8080, the
    # client bound to 20000 and the UDP server (not 8080's listener: the states leave it out).
    assert tally.sockets == sum(counts(tally).values()) + 6 + 8


def test_a_spent_budget_stops_the_reader_early():
    reader, replay = replayed_reader()
    tally = PortTally(stop_after=5)
    assert reader.dump_ports(tally, PORT_RANGE, ephemeral()) == DumpResult(False, False)
    assert tally.sockets == 5
    assert replay.asked == [*LISTEN_DUMPS, "sockdiag_tcp4"]
