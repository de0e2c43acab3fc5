"""Pure tests of a pod's addresses (pod_addresses.py) on files captured from this kernel.

tests/fixtures/pod_addresses/: `multi.*` is a namespace with two IPv4 addresses, an IPv4
link-local one and a default route on eth0, a ULA IPv6 address on eth0 and a global one on
lo (its link-local ones too); `down.*` a namespace whose loopback is down and which has no
interface yet: a pod before its CNI ran (both files empty). Captured with `ip netns` and
`cat /proc/net/fib_trie /proc/net/if_inet6` inside.
"""

from __future__ import annotations

import contextlib
import ipaddress
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conntrack_exporter.pod_addresses import (
    NO_POD_ADDRESSES,
    address_keys,
    index_addresses,
    parse_fib_trie_local,
    parse_if_inet6,
)

FIXTURES = Path(__file__).parent / "fixtures" / "pod_addresses"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def key(text: str) -> int:
    address = ipaddress.ip_address(text)
    return int(address) << 1 | (address.version == 6)


def test_a_namespaces_own_addresses_but_loopback_and_link_local():
    assert parse_fib_trie_local(fixture("multi.fib_trie")) == {
        int(ipaddress.IPv4Address(a)) for a in ("10.244.1.5", "10.244.1.77")
    }
    assert parse_if_inet6(fixture("multi.if_inet6")) == {
        int(ipaddress.IPv6Address(a)) for a in ("fd00:10:244:1::5", "2001:db8::7")
    }
    # What was left out is in the files: the parser skipped it, it did not miss it.
    assert "169.254.3.3" in fixture("multi.fib_trie")
    assert "fe80" in fixture("multi.if_inet6")


def test_a_namespace_before_its_cni_ran_has_no_address():
    assert address_keys(fixture("down.fib_trie"), fixture("down.if_inet6")) == frozenset()


def test_address_keys_are_the_table_tallys():
    keys = address_keys(fixture("multi.fib_trie"), fixture("multi.if_inet6"))
    assert keys == {
        key(a) for a in ("10.244.1.5", "10.244.1.77", "fd00:10:244:1::5", "2001:db8::7")
    }
    # An absent file (a kernel without IPv6): the other's addresses only.
    assert address_keys(fixture("multi.fib_trie"), None) == {key("10.244.1.5"), key("10.244.1.77")}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Main:\n  |-- 10.0.0.999\n     /32 host LOCAL\n", "fib_trie: '10.0.0.999'"),
        ("Main:\n  |-- fd00::1\n     /32 host LOCAL\n", "fib_trie: 'fd00::1'"),
    ],
)
def test_a_leaf_that_is_no_ipv4_address_is_a_parse_error(text, message):
    with pytest.raises(ValueError, match=message):
        parse_fib_trie_local(text)


@pytest.mark.parametrize(
    "line",
    [
        "fd00 02 40 00 80 eth0",  # short address
        "zz000000000000000000000000000005 02 40 00 80 eth0",
        "fd000000000000000000000000000005 02 40",  # no scope
        "fd000000000000000000000000000005 02 40 xx 80 eth0",
    ],
)
def test_a_bad_if_inet6_line_is_a_parse_error_naming_it(line):
    text = fixture("multi.if_inet6") + line + "\n"
    with pytest.raises(ValueError, match="if_inet6 line 6"):
        parse_if_inet6(text)


@given(st.text())
def test_any_text_parses_or_raises_value_error(text):
    for parse in (parse_fib_trie_local, parse_if_inet6):
        with contextlib.suppress(ValueError):
            parse(text)


def test_every_pod_is_numbered_and_a_shared_address_names_neither():
    web, dns, other = {"pod": "web"}, {"pod": "dns"}, {"pod_uid": "u-1"}
    addresses = index_addresses(
        [
            (web, frozenset({key("10.244.1.5"), key("10.0.0.1")})),
            (dns, frozenset({key("10.244.1.6"), key("10.0.0.1")})),
            (other, frozenset()),  # no address yet: numbered all the same
        ]
    )
    assert addresses.pods == (web, dns, other)
    assert addresses.pod_of == {key("10.244.1.5"): 0, key("10.244.1.6"): 1}
    assert addresses.ambiguous == 1
    assert addresses.labels_of(key("10.244.1.6")) == dns
    assert addresses.labels_of(key("10.0.0.1")) == {}
    assert NO_POD_ADDRESSES.labels_of(key("10.244.1.5")) == {}
