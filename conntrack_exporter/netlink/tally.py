"""What the table and socket tallies share: key layouts, bounded tallies, and top-K.

Both decoders count entries under packed int keys (no tuple per entry). A destination key is
(address: up to 128 bits, IP protocol: 8, port: 16, is-IPv6: 1), most significant first:

    ((address << 8 | protocol) << 16 | port) << 1 | is_ipv6

and an address key is `address << 1 | is_ipv6`. The hot loops pack keys inline; these
functions turn them back into labels, once per scan and only for the keys reported.
"""

from __future__ import annotations

import heapq
import ipaddress
from typing import NamedTuple

AF_INET, AF_INET6 = 2, 10
FAMILY_NAMES = {AF_INET: "ipv4", AF_INET6: "ipv6"}
IPPROTO_TCP, IPPROTO_UDP = 6, 17
PROTOCOL_NAMES = {
    IPPROTO_TCP: "tcp",
    IPPROTO_UDP: "udp",
    1: "icmp",
    58: "icmpv6",
    132: "sctp",
    47: "gre",
}
DESTINATION_BITS = 128 + 8 + 16 + 1
# How many entries between checks of a tally's size against its capacity.
PRUNE_CHECK_INTERVAL = 1024


class Destination(NamedTuple):
    address: str
    protocol: int
    port: int


def destination_key(address: int, protocol: int, port: int, v6: bool) -> int:
    """The packed key the hot loops build inline (for tests and cold paths)."""
    return ((address << 8 | protocol) << 16 | port) << 1 | v6


def decode_address(key: int) -> str:
    """An address key (address << 1 | is-IPv6) as text."""
    address = key >> 1
    return str(ipaddress.IPv6Address(address) if key & 1 else ipaddress.IPv4Address(address))


def address_key(destination: int) -> int:
    """The address key (address << 1 | is-IPv6) of a destination key's address."""
    return destination >> 25 << 1 | destination & 1


def decode_destination(key: int) -> Destination:
    v6 = key & 1
    key >>= 1
    port = key & 0xFFFF
    key >>= 16
    return Destination(decode_address(key >> 8 << 1 | v6), key & 0xFF, port)


def prune(tally: dict[int, int], capacity: int) -> int:
    """Past `capacity` keys, keep the half (at least one) counted most; return the count lost.

    Keys counted more often than the median-ish cutoff stay: a C-level sort of the counts
    alone, not a key function called per item (a 1M-entry table with 300k destinations
    prunes ~90 times per scan). Then ties at the cutoff, up to half.
    """
    if len(tally) <= capacity:
        return 0
    half = max(capacity // 2, 1)  # a capacity of 1 still keeps the top key
    cutoff = sorted(tally.values(), reverse=True)[half - 1]
    keep = {key: count for key, count in tally.items() if count > cutoff}
    for key, count in tally.items():
        if len(keep) == half:
            break
        if count == cutoff:
            keep[key] = count
    lost = sum(tally.values()) - sum(keep.values())
    tally.clear()
    tally.update(keep)
    return lost


def _count_of(item: tuple[int, int]) -> int:
    return item[1]


def top(tally: dict[int, int], k: int) -> list[tuple[int, int]]:
    """The k (key, count) pairs with the highest counts, highest first."""
    return heapq.nlargest(k, tally.items(), key=_count_of)
