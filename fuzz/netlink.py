"""The netlink walkers and decoders on arbitrary bytes, as a receive buffer would hold them.

Every message the walk finds goes to every decoder whatever its type: the ctnetlink stats
parsers, TableTally (as a conntrack entry), PortTally and local_port (as a socket), the error
code; then every key the tallies hold goes through the decoders that label the metrics, and
the whole buffer through NetlinkSocket's receive loop. NetlinkParseError is the only error a
decoder may raise (and NetlinkError, with the errno a reply carried, from the receive loop).

One more oracle: the socket reads into a reused 64 KiB buffer whose bytes past the datagram
are left over from earlier ones, so every result must be the same whatever those bytes are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from conntrack_exporter.netlink.core import (
    NLM_F_DUMP,
    Buffer,
    Message,
    NetlinkError,
    NetlinkParseError,
    error_code,
    iter_attributes,
    iter_messages,
)
from conntrack_exporter.netlink.ctnetlink import (
    CPU_STAT_NAMES,
    EXPECT_STAT_NAMES,
    parse_cpu_stats,
    parse_global_stats,
)
from conntrack_exporter.netlink.cttable import (
    CT_NEW_MESSAGE,
    TableTally,
    decode_kind,
    decode_nat_pool,
    status_names,
)
from conntrack_exporter.netlink.inet_diag import (
    NETLINK_SOCK_DIAG,
    SOCK_DIAG_BY_FAMILY,
    PortTally,
    local_port,
)
from conntrack_exporter.netlink.socket import RECEIVE_BUFFER_BYTES, NetlinkSocket
from conntrack_exporter.netlink.tally import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    decode_address,
    decode_destination,
    top,
)
from conntrack_exporter.procfs import ephemeral_port_flags
from fuzz.harness import FIXTURES, fuzz

NETLINK_FIXTURES = FIXTURES / "netlink"
# The ports a default kernel hands out: some sockets count, some do not.
COUNTED_PORTS = ephemeral_port_flags((32768, 60999), [(40000, 40010)])
# Small enough that a few distinct keys make the tallies prune.
CAPACITY = 4
JUNK = (b"\x00", b"\xff")  # what the reused buffer may hold past the datagram


def seeds() -> Iterator[bytes]:
    """Every message of every captured reply on its own, and each small reply whole."""
    for path in sorted(NETLINK_FIXTURES.glob("*.bin")):
        data = path.read_bytes()
        if len(data) <= 4096:
            yield data
        for msg in iter_messages(data, len(data)):
            yield data[msg.start - 16 : msg.end]


def test_one_input(data: bytes) -> None:
    results = [_decode(_buffer(data, junk), len(data)) for junk in JUNK]
    if results[0] != results[1]:
        raise AssertionError(f"bytes past the datagram changed a result: {results}")
    _receive(data)


def _buffer(data: bytes, junk: bytes) -> memoryview:
    return memoryview(bytearray(data) + junk * 256)


def _decode(buf: memoryview, length: int) -> list[Any]:
    """What every decoder made of each message, then of the tallies: comparable values."""
    table = TableTally(zone=True, mark=True, address_capacity=CAPACITY)
    ports = PortTally(capacity=CAPACITY)
    out: list[Any] = []
    try:
        for msg in iter_messages(buf, length):
            ports.expect(IPPROTO_UDP if msg.flags & 1 else IPPROTO_TCP, COUNTED_PORTS)
            out += [_outcome(decode, buf, msg) for decode in _decoders(table, ports)]
    except NetlinkParseError as exc:
        out.append(str(exc))
    table.finish()
    ports.finish()
    return [*out, _labels(table), _port_labels(ports)]


def _decoders(table: TableTally, ports: PortTally) -> list[Callable[[Buffer, Message], Any]]:
    return [
        lambda buf, msg: table.add_message(buf, msg._replace(type=CT_NEW_MESSAGE)),
        lambda buf, msg: ports.add_message(buf, msg._replace(type=SOCK_DIAG_BY_FAMILY)),
        parse_global_stats,
        partial(_cpu_stats, names=CPU_STAT_NAMES),
        partial(_cpu_stats, names=EXPECT_STAT_NAMES),
        local_port,
        error_code,
        _attribute_tree,
    ]


def _outcome(decode: Callable[[Buffer, Message], Any], buf: Buffer, msg: Message) -> Any:
    try:
        return decode(buf, msg)
    except NetlinkParseError as exc:
        return str(exc)


def _cpu_stats(buf: Buffer, msg: Message, names: dict[int, str]) -> Any:
    return parse_cpu_stats(buf, msg, names)


def _attribute_tree(buf: Buffer, msg: Message) -> list[Any]:
    """The payload after a 4-byte header as attributes, each value as nested ones if it
    walks as such (what cttable does with tuples and protocol info)."""
    tree: list[Any] = []
    for attr_type, start, end in iter_attributes(buf, msg.start + 4, msg.end):
        try:
            tree.append((attr_type, list(iter_attributes(buf, start, end))))
        except NetlinkParseError:
            tree.append((attr_type, bytes(buf[start:end])))
    return tree


def _labels(table: TableTally) -> list[Any]:
    """What the conntrack_table collector makes of the tallies' keys."""
    return [
        table.entries,
        table.pruned,
        sorted((decode_kind(key), count) for key, count in table.kinds.items()),
        sorted((status_names(bits), count) for bits, count in table.statuses.items()),
        [(decode_address(key), count) for key, count in top(table.sources, CAPACITY)],
        [(decode_destination(key), count) for key, count in top(table.destinations, CAPACITY)],
        [(decode_nat_pool(key), count) for key, count in top(table.nat_pools, CAPACITY)],
    ]


def _port_labels(ports: PortTally) -> list[Any]:
    return [
        ports.sockets,
        ports.pruned,
        {protocol: ports.largest(protocol) for protocol in ports.destinations},
        [
            sorted((decode_destination(key), count) for key, count in tally.items())
            for tally in ports.destinations.values()
        ],
    ]


class _OneDatagram:
    """Stands in for the kernel socket: answers any request with the input, then nothing."""

    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    def send(self, request: bytes) -> int:
        return len(request)

    def recv_into(self, buffer: bytearray, size: int, flags: int) -> int:
        data, self._data = self._data, None
        if data is None:
            raise BlockingIOError  # what an expired SO_RCVTIMEO looks like
        buffer[: len(data)] = data[: len(buffer)]
        return len(data)  # MSG_TRUNC: the datagram's real length

    def close(self) -> None:
        pass


def _receive(data: bytes) -> None:
    """NetlinkSocket's receive loop over the input, as the reply to request number 1: a
    fresh socket per input (the kernel's end is the input), so the request is number 1, as in
    every captured reply."""
    kernel = _OneDatagram(data[:RECEIVE_BUFFER_BYTES])
    sock = NetlinkSocket(
        NETLINK_SOCK_DIAG, frozenset({SOCK_DIAG_BY_FAMILY}), 1.0, open_socket=lambda *_: kernel
    )
    with contextlib.suppress(NetlinkParseError, NetlinkError):
        sock.request(SOCK_DIAG_BY_FAMILY, NLM_F_DUMP, b"", lambda buf, msg: None)


def main() -> None:
    fuzz("netlink", test_one_input, seeds())


if __name__ == "__main__":
    main()
