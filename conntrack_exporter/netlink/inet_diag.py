"""sock_diag / inet_diag (linux/sock_diag.h, linux/inet_diag.h): TCP and UDP socket dumps.

`build_request` and `PortTally` are pure: bytes in, bytes or counts out. `SockDiagReader` is
the thin I/O edge. The kernel filters each dump twice before a socket reaches us: by TCP
state (`idiag_states`) and by local port, with a small INET_DIAG_REQ_BYTECODE program. On a
server, the sockets accepted on 443 or 8080 lie outside the ephemeral range and never cross
into userspace.

The first request may make the kernel load the inet_diag, tcp_diag and udp_diag modules
(sock_diag autoloads its handlers): diagnostics only, unlike loading conntrack, which would
start tracking.
"""

from __future__ import annotations

import struct

from conntrack_exporter.netlink.core import (
    NLATTR,
    BudgetSpent,
    Buffer,
    Message,
    NetlinkParseError,
)
from conntrack_exporter.netlink.socket import DumpBounds, DumpResult, NetlinkReader
from conntrack_exporter.netlink.tally import (
    AF_INET,
    AF_INET6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    PRUNE_CHECK_INTERVAL,
    prune,
)

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20  # the request, and the type of each socket in its reply
# SOCK_DESTROY (21) closes the sockets it names (CONFIG_INET_DIAG_DESTROY): never sent, and
# not in READ_REQUESTS, so NetlinkSocket refuses it.
READ_REQUESTS = frozenset({SOCK_DIAG_BY_FAMILY})

FAMILIES = (AF_INET, AF_INET6)  # inet_diag wants one per request, not AF_UNSPEC

# enum in include/net/tcp_states.h; UDP sockets use TCP_ESTABLISHED (connected) and TCP_CLOSE.
TCP_ESTABLISHED = 1
TCP_SYN_SENT = 2
TCP_SYN_RECV = 3
TCP_FIN_WAIT1 = 4
TCP_FIN_WAIT2 = 5
TCP_TIME_WAIT = 6
TCP_CLOSE = 7
TCP_CLOSE_WAIT = 8
TCP_LAST_ACK = 9
TCP_LISTEN = 10
TCP_CLOSING = 11
TCP_NEW_SYN_RECV = 12  # a request socket (the kernel adds it to a SYN_RECV request)
TCP_BOUND_INACTIVE = 13  # bound, neither listening nor connected
# Every state a socket holding a port it did not listen on can be in. Not LISTEN, and not
# SYN_RECV / NEW_SYN_RECV: those are connections being accepted, on the listener's port.
# TIME_WAIT in: it holds its port for 60 s, the classic way to run out.
PORT_STATES = sum(
    1 << state
    for state in (
        TCP_ESTABLISHED,
        TCP_SYN_SENT,
        TCP_FIN_WAIT1,
        TCP_FIN_WAIT2,
        TCP_TIME_WAIT,
        TCP_CLOSE,
        TCP_CLOSE_WAIT,
        TCP_LAST_ACK,
        TCP_CLOSING,
        TCP_BOUND_INACTIVE,
    )
)
LISTEN_STATES = 1 << TCP_LISTEN

# enum of inet_diag_req_v2 attributes, and of inet_diag_bc_op codes
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_S_GE = 2
INET_DIAG_BC_S_LE = 3

# struct inet_diag_req_v2: family, protocol, ext, pad, states, then a struct inet_diag_sockid
# (48 bytes) left zero: a dump of every socket the states and the bytecode let through.
INET_DIAG_REQ_V2 = struct.Struct("=BBBBI48x")
BC_OP = struct.Struct("=BBH")  # code, yes, no (host order: the kernel compares u16 ports)
# struct inet_diag_msg, 72 bytes: of its fields, the family, the local and remote ports and
# the remote address (two big-endian halves of idiag_dst), in one call.
INET_DIAG_MSG = struct.Struct("!B3xHH16xQQ32x")
_unpack_msg = INET_DIAG_MSG.unpack_from
MSG_SIZE = INET_DIAG_MSG.size
V4_MAPPED = 0xFFFF  # the high 32 bits of the low half of ::ffff:a.b.c.d


def port_range_bytecode(low: int, high: int) -> bytes:
    """An inet_diag filter program: accept sockets whose local port is in [low, high].

    Each op is a conditional jump `yes` or `no` bytes forward; a port comparison carries its
    port in the `no` field of the op after it. The program accepts a socket that runs exactly
    to its end, and rejects one that jumps 4 bytes past it: `no` = the bytes left + 4, the
    longest jump inet_diag_bc_audit allows. So: 16 bytes, sport >= low (else reject), then
    sport <= high (else reject).
    """
    return b"".join(
        (
            BC_OP.pack(INET_DIAG_BC_S_GE, 8, 16 + 4),
            BC_OP.pack(0, 0, low),
            BC_OP.pack(INET_DIAG_BC_S_LE, 8, 8 + 4),
            BC_OP.pack(0, 0, high),
        )
    )


def build_request(
    family: int, protocol: int, states: int, port_range: tuple[int, int] | None
) -> bytes:
    """The payload of a SOCK_DIAG_BY_FAMILY dump request; no filter without a port range."""
    payload = INET_DIAG_REQ_V2.pack(family, protocol, 0, 0, states)
    if port_range is None:
        return payload
    program = port_range_bytecode(*port_range)
    return payload + NLATTR.pack(NLATTR.size + len(program), INET_DIAG_REQ_BYTECODE) + program


def local_port(buf: Buffer, msg: Message) -> int:
    """The local port of one socket message (a listener's, for instance)."""
    if msg[5] - msg[4] < MSG_SIZE:
        raise NetlinkParseError(f"inet_diag message of {msg[5] - msg[4]} bytes, under {MSG_SIZE}")
    family, sport, _, _, _ = _unpack_msg(buf, msg[4])
    if family not in FAMILIES:
        raise NetlinkParseError(f"inet_diag message of address family {family}")
    return sport


class PortTally:
    """Sockets of one scan by destination, for the local ports that count.

    A destination key is (remote address, protocol, remote port, is-IPv6) packed as in
    tally.py, as cttable's TableTally packs one. A socket without a
    remote port (unconnected UDP, a bound TCP socket) counts under the key of address 0 port 0.
    An IPv4-mapped IPv6 remote address counts as the IPv4 address: both families draw on the
    same ports toward it.

    Each protocol keeps at most `capacity` destinations, pruned as TableTally prunes (the
    top half stays); below the capacity every count is exact.
    """

    def __init__(self, capacity: int = 16384, stop_after: int = 0) -> None:
        self.sockets = 0  # read, whether their port counted or not
        self.destinations: dict[int, dict[int, int]] = {IPPROTO_TCP: {}, IPPROTO_UDP: {}}
        self.pruned = 0
        self._capacity = capacity
        self._stop_after = stop_after  # 0: no budget
        self._protocol = IPPROTO_TCP
        self._counted: bytes | bytearray = bytes(65536)
        self._tally = self.destinations[IPPROTO_TCP]

    def expect(self, protocol: int, counted_ports: bytes | bytearray) -> None:
        """Say what the next messages are (a reply does not name its protocol), and which
        local ports count: a 65536-byte table, non-zero where a port counts."""
        self._protocol = protocol
        self._counted = counted_ports
        self._tally = self.destinations[protocol]

    def add_message(self, buf: Buffer, msg: Message) -> None:
        """Tally one message of a dump. Raises BudgetSpent after the `stop_after`th socket.

        Once per socket: everything inline, one struct call, no object per socket.
        """
        if msg[0] != SOCK_DIAG_BY_FAMILY:
            return
        start = msg[4]
        if msg[5] - start < MSG_SIZE:
            raise NetlinkParseError(
                f"inet_diag message of {msg[5] - start} bytes, under {MSG_SIZE}"
            )
        family, sport, dport, high, low = _unpack_msg(buf, start)
        if family == AF_INET:
            dst, v6 = high >> 32, 0
        elif family == AF_INET6:
            if high == 0 and low >> 32 == V4_MAPPED:
                dst, v6 = low & 0xFFFFFFFF, 0
            else:
                dst, v6 = high << 64 | low, 1
        else:
            raise NetlinkParseError(f"inet_diag message of address family {family}")
        self.sockets += 1
        if self._counted[sport]:
            if not dport:
                dst = v6 = 0
            key = ((dst << 8 | self._protocol) << 16 | dport) << 1 | v6
            tally = self._tally
            tally[key] = tally.get(key, 0) + 1
        if not self.sockets % PRUNE_CHECK_INTERVAL:
            self._prune()
        if self.sockets == self._stop_after:
            raise BudgetSpent

    def finish(self) -> None:
        """Bring the tallies back within their capacity after the last socket."""
        self._prune()

    def _prune(self) -> None:
        for tally in self.destinations.values():
            self.pruned += prune(tally, self._capacity)

    def largest(self, protocol: int) -> int:
        """The most sockets toward one destination of the protocol (0 with none)."""
        return max(self.destinations[protocol].values(), default=0)


class SockDiagReader(NetlinkReader):
    """Dumps the TCP and UDP sockets (IPv4 and IPv6) of the socket's network namespace.

    Needs no privilege: sock_diag shows every socket of the namespace to anyone.
    """

    protocol = NETLINK_SOCK_DIAG
    read_requests = READ_REQUESTS

    def listening_ports(
        self, port_range: tuple[int, int] | None, bounds: DumpBounds | None = None
    ) -> set[int]:
        """Ports a TCP socket listens on (in the range), IPv4 and IPv6 alike: a listener on
        :: owns the IPv4 port too."""
        ports: set[int] = set()

        def add(buf: Buffer, msg: Message) -> None:
            if msg[0] == SOCK_DIAG_BY_FAMILY:
                ports.add(local_port(buf, msg))

        for family in FAMILIES:
            request = build_request(family, IPPROTO_TCP, LISTEN_STATES, port_range)
            self._socket.dump(SOCK_DIAG_BY_FAMILY, request, add, bounds)
        return ports

    def dump_ports(
        self,
        tally: PortTally,
        port_range: tuple[int, int],
        ephemeral: bytes,
        kernel_filter: bool = True,
        bounds: DumpBounds | None = None,
    ) -> DumpResult:
        """Feed tally every TCP and UDP socket that may hold an ephemeral port.

        `ephemeral` is procfs.ephemeral_port_flags: the range minus the reserved ports.
        Accepted TCP sockets carry their listener's port: ports with a listener do not count
        (connect() never picks a port that has one). `kernel_filter=False` drops the
        bytecode, to measure what it saves: the sockets outside the range then reach the
        tally, which skips them. `bounds` holds for the whole scan, every dump of it.
        """
        bytecode_range = port_range if kernel_filter else None
        tcp_ports = bytearray(ephemeral)
        for port in self.listening_ports(bytecode_range, bounds):
            tcp_ports[port] = 0
        interrupted = False
        for protocol, counted in ((IPPROTO_TCP, tcp_ports), (IPPROTO_UDP, ephemeral)):
            tally.expect(protocol, counted)
            for family in FAMILIES:
                request = build_request(family, protocol, PORT_STATES, bytecode_range)
                result = self._socket.dump(SOCK_DIAG_BY_FAMILY, request, tally.add_message, bounds)
                if not result.complete:
                    return result
                interrupted |= result.interrupted
        return DumpResult(complete=True, interrupted=interrupted)
