"""Which pod on this node an address belongs to, learnt from the pod's own network namespace.

The pods collector reads, at each discovery pass and through the fds it already holds on
each namespace (netns.NamespaceFiles), the namespace's local addresses: IPv4 from
`/proc/PID/net/fib_trie` (its `/32 host LOCAL` entries), IPv6 from `/proc/PID/net/if_inet6`.
Both show PID's namespace to any uid, with no setns. Loopback and link-local addresses are
left out: every namespace has the same ones. It publishes them in a PodAddressBook; the
conntrack_table collector reads the book at the start of each table scan, and counts the
entries each pod holds (netlink/cttable.py).

Addresses are packed as the table tally packs them (netlink/tally.py): `address << 1 |
is_ipv6`. An address found in two namespaces (two pods on separate networks, say) names
neither: it is counted in `ambiguous`, never attributed to the wrong one.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import NamedTuple

# IPv6 scopes of if_inet6's fourth column (IPV6_ADDR_LOOPBACK, IPV6_ADDR_LINKLOCAL).
_HOST_SCOPE, _LINK_SCOPE = 0x10, 0x20
_LOOPBACK_FIRST_OCTET = 127  # 127.0.0.0/8
_LINK_LOCAL_PREFIX = 169 << 8 | 254  # 169.254.0.0/16


def parse_fib_trie_local(text: str) -> set[int]:
    """The namespace's own IPv4 addresses: each leaf of fib_trie with a `/32 host LOCAL`
    entry, but loopback and link-local ones. Raises ValueError on a leaf that is not an
    address."""
    addresses = set()
    leaf = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("|-- "):
            leaf = line[4:]
        elif line.startswith("/32 host LOCAL") and leaf is not None:
            # inet_pton, not ipaddress: a strict dotted quad at a third of the cost (every
            # pod's file at every discovery pass).
            try:
                address = int.from_bytes(socket.inet_pton(socket.AF_INET, leaf), "big")
            except (OSError, UnicodeEncodeError, ValueError):
                raise ValueError(f"fib_trie: {leaf!r} is not an IPv4 address") from None
            if address >> 24 != _LOOPBACK_FIRST_OCTET and address >> 16 != _LINK_LOCAL_PREFIX:
                addresses.add(address)
    return addresses


def parse_if_inet6(text: str) -> set[int]:
    """The namespace's own IPv6 addresses (if_inet6: address in hex, ifindex, prefix length,
    scope, flags, device), but loopback and link-local ones."""
    addresses = set()
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            packed = bytes.fromhex(fields[0])  # strict: int() would take "0x" and "_" too
            scope = int(fields[3], 16)
            if len(packed) != 16:
                raise ValueError
        except (ValueError, IndexError):
            raise ValueError(f"if_inet6 line {number}: {line.strip()!r}") from None
        if not scope & (_HOST_SCOPE | _LINK_SCOPE):
            addresses.add(int.from_bytes(packed, "big"))
    return addresses


def address_keys(fib_trie: str | None, if_inet6: str | None) -> frozenset[int]:
    """A namespace's addresses as the table tally's keys (None: the file is absent)."""
    v4 = parse_fib_trie_local(fib_trie) if fib_trie is not None else set()
    v6 = parse_if_inet6(if_inet6) if if_inet6 is not None else set()
    return frozenset({address << 1 for address in v4} | {address << 1 | 1 for address in v6})


class PodAddresses(NamedTuple):
    """The pods of one discovery pass and the addresses each holds."""

    pods: tuple[dict[str, str], ...]  # each pod's labels, by its number
    pod_of: dict[int, int]  # address key -> pod number
    ambiguous: int  # addresses held by more than one pod, attributed to none

    def labels_of(self, key: int) -> dict[str, str]:
        """The labels of the pod holding the address key, or none."""
        pod = self.pod_of.get(key)
        return {} if pod is None else self.pods[pod]


NO_POD_ADDRESSES = PodAddresses((), {}, 0)


def index_addresses(owners: Iterable[tuple[dict[str, str], frozenset[int]]]) -> PodAddresses:
    """PodAddresses of (a pod's labels, its address keys) pairs: every pod is numbered, even
    one without an address yet (its CNI has not run), so that its count reads 0."""
    pods = []
    pod_of: dict[int, int] = {}
    shared: set[int] = set()
    for number, (labels, keys) in enumerate(owners):
        pods.append(labels)
        for key in keys:
            if pod_of.setdefault(key, number) != number:
                shared.add(key)
    for key in shared:
        del pod_of[key]
    return PodAddresses(tuple(pods), pod_of, len(shared))


class PodAddressBook:
    """Where the pods collector publishes PodAddresses and the table collector reads them.

    One per configuration's collectors (registry.CollectorContext), so that a reload that
    turns the pods collector off leaves no stale pods behind. Publishing replaces one
    reference: a reader sees the last pass's addresses whole, never half of two passes.
    """

    def __init__(self) -> None:
        self.current = NO_POD_ADDRESSES

    def publish(self, addresses: PodAddresses) -> None:
        self.current = addresses
