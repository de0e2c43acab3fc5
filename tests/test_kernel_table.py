"""The conntrack_table collector against the real kernel: the acceptance tests of issue 3.

Each test builds a table of known content in namespaces of its own (real loopback and
forwarded traffic, SNAT through a router namespace, `conntrack -I` for zones and marks) and
compares what the exporter says with what conntrack-tools (`conntrack -L`, `conntrack -C`)
says in the same namespace at the same moment. Needs root; skips without it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import os
import select
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.conftest import Netns
from tests.metrics import assert_scan_refused, parse_samples, value
from tests.test_kernel_conntrack import fetch, start_exporter

pytestmark = pytest.mark.kernel

NOBODY = "65534"
MAX_FILE = Path("/proc/sys/net/netfilter/nf_conntrack_max")
ERROR_REASONS = ("permission", "timeout", "no_buffer_space", "interrupted", "parse", "other")
DEFAULT_POOL_SIZE = 65535 - 1024 + 1  # the kernel's masquerade range without --to-ports


# -- what conntrack-tools says ------------------------------------------------------------


class Entry(NamedTuple):
    """One line of `conntrack -L -o extended`, reduced to what the collector reports."""

    family: str
    protocol: str
    state: str  # lower-case TCP state, "" for other protocols
    zone: str
    mark: str
    flags: frozenset[str]  # ASSURED, UNREPLIED, OFFLOAD, HW_OFFLOAD
    src: str
    dst: str
    dport: str  # "" for protocols without ports
    src_nat: bool
    dst_nat: bool
    reply_dst: str  # the translated source (the NAT address) of an SNAT entry
    reply_src: str  # who answers: the translated destination of a DNAT entry


def parse_conntrack_line(line: str) -> Entry:
    tokens = line.split()
    family, protocol = tokens[0], tokens[2]
    rest = tokens[5:]  # after family, its number, protocol, its number and the timeout
    state = ""
    if rest and "=" not in rest[0] and not rest[0].startswith("["):
        state = rest.pop(0).lower()
    orig: dict[str, str] = {}
    reply: dict[str, str] = {}
    flags = set()
    scalars = {"zone": "0", "mark": "0"}
    for token in rest:
        if token.startswith("["):
            flags.add(token.strip("[]"))
            continue
        key, _, val = token.partition("=")
        if key in ("zone", "mark"):
            scalars[key] = val
        elif key in ("src", "dst", "sport", "dport", "type", "code", "id"):
            # Tuple keys appear twice: the original direction first, then the reply.
            (reply if key in orig else orig)[key] = val
    for tup in (orig, reply):
        for key in ("src", "dst"):
            tup[key] = str(ipaddress.ip_address(tup[key]))
    # The kernel sets IPS_SRC_NAT (IPS_DST_NAT) exactly when NAT changed the source
    # (destination) of the tuple, which conntrack -L shows as a reply tuple that is not the
    # inverse of the original.
    src_nat = (reply["dst"], reply.get("dport")) != (orig["src"], orig.get("sport"))
    dst_nat = (reply["src"], reply.get("sport")) != (orig["dst"], orig.get("dport"))
    return Entry(
        family,
        protocol,
        state,
        scalars["zone"],
        str(int(scalars["mark"], 0)),
        frozenset(flags),
        orig["src"],
        orig["dst"],
        orig.get("dport", ""),
        src_nat,
        dst_nat,
        reply["dst"],
        reply["src"],
    )


def conntrack_list(ns: Netns) -> list[Entry]:
    """Every entry of the namespace, IPv4 and IPv6 (`-o extended` names the family)."""
    out = ns.run("conntrack", "-L", "-o", "extended").stdout
    return [parse_conntrack_line(line) for line in out.splitlines() if line.strip()]


def truth_kinds(entries: list[Entry], zone: bool, mark: bool) -> Counter:
    return Counter(
        (e.family, e.protocol, e.state, *([e.zone] if zone else []), *([e.mark] if mark else []))
        for e in entries
    )


def truth_statuses(entries: list[Entry]) -> dict[tuple[str], int]:
    tests: dict[str, Callable[[Entry], bool]] = {
        "assured": lambda e: "ASSURED" in e.flags,
        "unreplied": lambda e: "UNREPLIED" in e.flags,
        "src_nat": lambda e: e.src_nat,
        "dst_nat": lambda e: e.dst_nat,
        "offload": lambda e: bool({"OFFLOAD", "HW_OFFLOAD"} & e.flags),
    }
    return {(name,): sum(1 for e in entries if test(e)) for name, test in tests.items()}


def truth_sources(entries: list[Entry]) -> Counter:
    return Counter((e.src,) for e in entries)


def truth_destinations(entries: list[Entry]) -> Counter:
    return Counter((e.dst, e.protocol, e.dport) for e in entries)


def truth_nat_pools(entries: list[Entry]) -> Counter:
    return Counter((e.protocol, e.reply_dst, e.dst, e.dport) for e in entries if e.src_nat)


def top(counts: Counter, k: int) -> dict:
    """The k largest counts. The mixes are built so that no tie straddles the cut."""
    ranked = counts.most_common()
    if len(ranked) > k:
        assert ranked[k - 1][1] > ranked[k][1], f"the mix has a tie at the top-{k} cut: {ranked}"
    return dict(ranked[:k])


# -- what the exporter says ---------------------------------------------------------------


def series(samples: dict, name: str, *labels: str) -> dict[tuple[str, ...], float]:
    """{label values in the order given: value} of one metric (empty when absent)."""
    return {
        tuple(dict(key)[label] for label in labels): val
        for key, val in samples.get(name, {}).items()
    }


KIND_LABELS = ("family", "protocol", "state")


def exported_kinds(samples: dict, zone: bool, mark: bool) -> dict:
    extra = (["ct_zone"] if zone else []) + (["mark"] if mark else [])
    return series(samples, "conntrack_table_entries", *KIND_LABELS, *extra)


def exported_destinations(samples: dict) -> dict:
    return series(samples, "conntrack_table_top_destination_entries", "address", "protocol", "port")


def exported_nat_pools(samples: dict) -> dict:
    return series(
        samples, "conntrack_nat_port_pool_used", "protocol", "nat_address", "destination", "port"
    )


def assert_scan_healthy(samples: dict) -> None:
    assert value(samples, "conntrack_exporter_collector_success", collector="conntrack_table") == 1
    errors = series(samples, "conntrack_table_scan_errors_total", "reason")
    assert errors == {(reason,): 0 for reason in ERROR_REASONS}


def assert_exact(samples: dict, entries: list[Entry], k: int, zone: bool, mark: bool) -> None:
    """Every breakdown, status count and top-k list equals conntrack-tools' count."""
    assert exported_kinds(samples, zone, mark) == truth_kinds(entries, zone, mark)
    assert series(samples, "conntrack_table_status_entries", "status") == truth_statuses(entries)
    sources = series(samples, "conntrack_table_top_source_entries", "address")
    assert sources == top(truth_sources(entries), k)
    assert exported_destinations(samples) == top(truth_destinations(entries), k)
    assert exported_nat_pools(samples) == top(truth_nat_pools(entries), k)
    assert value(samples, "conntrack_table_scan_entries") == len(entries)
    assert value(samples, "conntrack_table_scan_sample_ratio") == 1


# -- namespaces, helper processes, configuration ------------------------------------------


@contextlib.contextmanager
def plain_netns(role: str) -> Iterator[Netns]:
    """A namespace with only lo up (conntrack stays idle there: no rules)."""
    name = f"cte-{role}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=60)
    try:
        ns = Netns(name)
        ns.run("ip", "link", "set", "lo", "up")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen]]:
    """Start a Python helper in a namespace; it prints "ready" and holds its sockets until
    killed at teardown."""
    procs: list[subprocess.Popen] = []

    def start(ns: Netns, code: str, *args: str) -> subprocess.Popen:
        cmd = [sys.executable, "-c", textwrap.dedent(code), *map(str, args)]
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns.name, *cmd],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()


def wait_ready(proc: subprocess.Popen, timeout: float = 20) -> None:
    readable, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if readable else ""
    if line.strip() != "ready":
        proc.kill()
        _, stderr = proc.communicate()
        raise AssertionError(f"helper not ready ({line!r}): {stderr}")


@pytest.fixture
def config_file() -> Iterator[Callable[..., str]]:
    """Write collectors.conntrack_table options to a file anyone can read (0644 in /tmp:
    the unprivileged exporter reads it too)."""
    paths: list[str] = []

    def write(**options: object) -> str:
        body = "".join(f"    {key}: {json.dumps(val)}\n" for key, val in options.items())
        with tempfile.NamedTemporaryFile(
            "w", prefix="cte-table-", suffix=".yml", dir="/tmp", delete=False
        ) as f:
            f.write("collectors:\n  conntrack_table:\n" + body)
        os.chmod(f.name, 0o644)
        paths.append(f.name)
        return f.name

    try:
        yield write
    finally:
        for path in paths:
            Path(path).unlink(missing_ok=True)


def sh(ns: Netns, command: str, *more: str) -> subprocess.CompletedProcess:
    """Run a command line (split on spaces, then `more` as whole arguments) in `ns`."""
    return ns.run(*command.split(), *more)


def wait_for(check: Callable[[], object], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        outcome = check()
        if outcome is True:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: {outcome}")
        time.sleep(0.1)


def wait_for_room(entries: int, timeout: float = 30) -> None:
    """nf_conntrack_max is global and another run may lower it for a while: wait, never
    write it."""
    deadline = time.monotonic() + timeout
    while int(MAX_FILE.read_text()) < entries:
        if time.monotonic() > deadline:
            pytest.skip(f"nf_conntrack_max stayed below the {entries} entries this test needs")
        time.sleep(0.5)


def raise_timeouts(ns: Netns) -> None:
    """Per-namespace timeouts long enough that no entry of the mix expires during a test."""
    for name in ("icmp_timeout", "tcp_timeout_close", "tcp_timeout_syn_sent"):
        ns.run("sysctl", "-qw", f"net.netfilter.nf_conntrack_{name}=600")


# -- 1. a known mix, every value exact ----------------------------------------------------

# Ports inside our own namespaces (nothing else listens there).
S1, S2, S3, S4 = 7101, 7102, 7103, 7104  # behind the router: TCP x3, UDP echo
PE, PT, PU, PA, P6, P7 = 7201, 7202, 7203, 7204, 7205, 7206  # on the router's loopback
# Two scans: one names the top 4, over entry counts chosen so that no two sources,
# destinations or pools tie at that cut: destinations 9 (S1), 8 (PE), 7 (S2), 6 (PT) | 5 (S3),
# 4, 4, ...; sources 27 (client), 20 (127.0.0.1), 6 (injected), 4 (::1) | 3 (client over
# IPv6); SNAT pools 9, 7, 5 (TCP), 4 (UDP) | 3 (TCP over IPv6), 2 (ICMP). The other names
# more than there are (no cut at all), so every source, destination and pool is compared.
TOP_K, WIDE_TOP_K = 4, 50
SNAT_TCP = {S1: 9, S2: 7, S3: 5}
SNAT_TCP6 = 3  # to S1 over IPv6
SNAT_UDP = 4  # to S4, echoed: seen reply, not assured
SNAT_ICMP = 2  # echo requests with ids of their own (ICMP takes the decoder's generic path)
# (protocol, source port, destination port, zone, mark) injected with conntrack -I
INJECTED = (
    ("tcp", 1001, 80, 0, 0x10),
    ("tcp", 1002, 80, 0, 0x10),
    ("tcp", 1003, 80, 5, 0),
    ("tcp", 1004, 80, 5, 0x20),
    ("udp", 1005, 53, 5, 0x10),
    ("udp", 1006, 53, 0, 0x30),
)
EXPECTED_SHAPE = {
    # (family, protocol, state, assured, src_nat): count, as the mix is built below
    ("ipv4", "tcp", "established", True, True): sum(SNAT_TCP.values()),
    ("ipv6", "tcp", "established", True, True): SNAT_TCP6,
    ("ipv4", "udp", "", False, True): SNAT_UDP,
    ("ipv4", "icmp", "", False, True): SNAT_ICMP,
    ("ipv4", "tcp", "established", True, False): 8,
    ("ipv4", "tcp", "time_wait", True, False): 6,
    ("ipv4", "udp", "", False, False): 3 + 2,  # unreplied, and injected
    ("ipv4", "udp", "", True, False): 2,
    ("ipv6", "tcp", "established", True, False): 2,
    ("ipv6", "udp", "", False, False): 2,
    ("ipv4", "icmp", "", False, False): 1,
    ("ipv4", "tcp", "established", False, False): 4,  # injected: no reply seen, not assured
}

SERVER = """
    import socket, sys, threading
    held = []
    def serve(listener):
        while True:
            held.append(listener.accept()[0])
    for port in map(int, sys.argv[1:4]):
        listener = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
        threading.Thread(target=serve, args=(listener,), daemon=True).start()
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("0.0.0.0", int(sys.argv[4])))
    def reply():
        while True:
            data, peer = echo.recvfrom(100)
            echo.sendto(data, peer)
    threading.Thread(target=reply, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()
"""

ECHO_REQUEST = """
    import struct
    def echo_request(ident):
        packet = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"ping"
        total = sum(struct.unpack("!6H", packet))
        total = (total >> 16) + (total & 0xFFFF)
        checksum = ~(total + (total >> 16)) & 0xFFFF
        return packet[:2] + struct.pack("!H", checksum) + packet[4:]
"""

CLIENT = (
    ECHO_REQUEST
    + """
    import json, socket, sys
    tcp, tcp6, udp = json.loads(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
    held = []
    for port, count in tcp.items():
        held += [socket.create_connection(("10.202.0.2", int(port)), 5) for _ in range(count)]
    held += [socket.create_connection(("fd00:202::2", int(sys.argv[4])), 5) for _ in range(tcp6)]
    port, count = udp
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(5)
        s.sendto(b"x", ("10.202.0.2", port))
        assert s.recv(10) == b"x"
        held.append(s)
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    for ident in range(4200, 4200 + int(sys.argv[5])):
        raw.sendto(echo_request(ident), ("10.202.0.2", 0))
    print("ready", flush=True)
    sys.stdin.read()
"""
)

LOCAL = (
    ECHO_REQUEST
    + """
    import socket, sys, time
    pe, pt, pu, pa, p6, p7 = map(int, sys.argv[1:7])
    held = []
    # UDP assured: the kernel assures a UDP flow only when it is still active more than
    # 2 s after its first packet, with a reply seen: exchange now, send again at the end.
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", pa))
    streams = []
    for _ in range(2):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b"1", ("127.0.0.1", pa))
        data, peer = echo.recvfrom(10)
        echo.sendto(data, peer)
        assert s.recv(10) == b"1"
        streams.append(s)
    first = time.monotonic()
    # TCP established, held
    listener = socket.create_server(("127.0.0.1", pe), backlog=64)
    for _ in range(8):
        held += [socket.create_connection(("127.0.0.1", pe)), listener.accept()[0]]
    # TCP closed cleanly by both sides: TIME_WAIT in conntrack
    closing = socket.create_server(("127.0.0.1", pt), backlog=64)
    for _ in range(6):
        client = socket.create_connection(("127.0.0.1", pt))
        server = closing.accept()[0]
        client.close()
        assert server.recv(1) == b""
        server.close()
    # UDP to a closed port: unreplied (each socket held, so each has its own port)
    for _ in range(3):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b"x", ("127.0.0.1", pu))
        held.append(s)
    # IPv6: TCP established and UDP unreplied on ::1
    listener6 = socket.create_server(("::1", p6), family=socket.AF_INET6)
    for _ in range(2):
        held += [socket.create_connection(("::1", p6)), listener6.accept()[0]]
    for _ in range(2):
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.sendto(b"x", ("::1", p7))
        held.append(s)
    # One ICMP echo request (answered by the kernel)
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    raw.sendto(echo_request(4242), ("127.0.0.1", 0))
    time.sleep(max(0.0, first + 2.2 - time.monotonic()))
    for s in streams:
        s.sendto(b"2", ("127.0.0.1", pa))
        data, peer = echo.recvfrom(10)
        echo.sendto(data, peer)
        assert s.recv(10) == b"2"
    print("ready", flush=True)
    sys.stdin.read()
"""
)


NAT_CHAIN = "{ type nat hook postrouting priority srcnat; }"


@dataclass
class Topology:
    router: Netns  # holds every entry the test asserts on
    client: Netns
    server: Netns


@pytest.fixture
def snat(netns: Netns) -> Iterator[Topology]:
    """client (10.201.0.2, fd00:201::2) -> router (masquerade) -> server (10.202.0.2,
    fd00:202::2). The router is the `netns` fixture, conntrack active there."""
    router = netns
    with plain_netns("client") as client, plain_netns("server") as server:
        for ns, side, peer in ((client, "201", "rc"), (server, "202", "rs")):
            sh(ns, f"ip link add eth0 type veth peer name {peer} netns {router.name}")
            sh(ns, f"ip addr add 10.{side}.0.2/24 dev eth0")
            sh(ns, f"ip addr add fd00:{side}::2/64 dev eth0 nodad")
            sh(ns, "ip link set eth0 up")
            sh(router, f"ip addr add 10.{side}.0.1/24 dev {peer}")
            sh(router, f"ip addr add fd00:{side}::1/64 dev {peer} nodad")
            sh(router, f"ip link set {peer} up")
        sh(client, "ip route add default via 10.201.0.1")
        sh(client, "ip -6 route add default via fd00:201::1")
        # Per-namespace settings of the router's own namespace.
        sh(router, "sysctl -qw net.ipv4.ip_forward=1")
        sh(router, "sysctl -qw net.ipv6.conf.all.forwarding=1")
        sh(router, "nft add table inet ctesnat")
        sh(router, "nft add chain inet ctesnat post", NAT_CHAIN)
        sh(router, "nft add rule inet ctesnat post oifname rs masquerade")
        yield Topology(router, client, server)


def shape(entries: list[Entry]) -> dict:
    return dict(
        Counter((e.family, e.protocol, e.state, "ASSURED" in e.flags, e.src_nat) for e in entries)
    )


def test_known_mix_matches_conntrack_tools_exactly(snat, spawn, config_file):
    router = snat.router
    raise_timeouts(router)
    local = spawn(router, LOCAL, PE, PT, PU, PA, P6, P7)  # sleeps 2.2 s: start it first
    for proto, sport, dport, zone, mark in INJECTED:
        command = (
            f"conntrack -I -p {proto} -s 10.99.0.1 -d 10.99.0.2 --sport {sport} "
            f"--dport {dport} --zone {zone} --mark {mark} -t 600"
        )
        sh(router, command, *(["--state", "ESTABLISHED"] if proto == "tcp" else []))
    server = spawn(snat.server, SERVER, S1, S2, S3, S4)
    wait_ready(server)
    client = spawn(
        snat.client,
        CLIENT,
        json.dumps(SNAT_TCP),
        SNAT_TCP6,
        json.dumps([S4, SNAT_UDP]),
        S1,
        SNAT_ICMP,
    )
    wait_ready(client)
    wait_ready(local)

    def settled() -> bool | dict:
        now = shape(conntrack_list(router))
        return now == EXPECTED_SHAPE or now

    wait_for(settled, "the router's table never held the mix")

    labelled = config_file(top_k=TOP_K, label_ct_zone=True, label_mark=True)
    plain = config_file(top_k=WIDE_TOP_K)
    for _attempt in range(3):
        before = sorted(conntrack_list(router))
        count = router.conntrack_count()
        with_labels = router.exporter("--config.file", labelled)
        without = router.exporter("--config.file", plain)
        if sorted(conntrack_list(router)) == before:
            break  # the table held still over both scans: one moment
    else:
        pytest.fail("the table kept changing under the scans")

    assert count == len(before) == sum(EXPECTED_SHAPE.values())
    for result, zone_mark, k in ((with_labels, True, TOP_K), (without, False, WIDE_TOP_K)):
        assert "level=warn" not in result.stderr and "level=error" not in result.stderr
        samples = parse_samples(result.stdout)
        assert_scan_healthy(samples)
        assert_exact(samples, before, k, zone=zone_mark, mark=zone_mark)
        assert value(samples, "conntrack_table_scan_entries") == count
        sizes = series(samples, "conntrack_nat_port_pool_size", "protocol")
        assert sizes[("tcp",)] == sizes[("udp",)] == DEFAULT_POOL_SIZE
        assert value(samples, "conntrack_table_scan_duration_seconds") > 0
        assert time.time() - value(samples, "conntrack_table_scan_timestamp_seconds") < 60

    # A few values spelled out, so that the comparison above cannot pass on a wrong mix.
    samples = parse_samples(with_labels.stdout)
    assert (
        value(
            samples,
            "conntrack_table_entries",
            family="ipv4",
            protocol="tcp",
            state="established",
            ct_zone="5",
            mark="32",
        )
        == 1
    )
    assert value(samples, "conntrack_table_status_entries", status="src_nat") == 21 + 3 + 4 + 2
    assert (
        value(
            samples,
            "conntrack_table_top_destination_entries",
            address="10.202.0.2",
            protocol="tcp",
            port=str(S1),
        )
        == 9
    )
    assert len(samples["conntrack_nat_port_pool_used"]) == TOP_K
    assert set(samples["conntrack_nat_port_pool_size"]) == {
        (("protocol", "tcp"),),
        (("protocol", "udp"),),
    }
    samples = parse_samples(without.stdout)
    assert len(samples["conntrack_nat_port_pool_used"]) == 6
    assert (
        value(
            samples,
            "conntrack_nat_port_pool_used",
            protocol="icmp",
            nat_address="10.202.0.1",
            destination="10.202.0.2",
            port="",
        )
        == SNAT_ICMP
    )
    assert (
        value(
            samples,
            "conntrack_nat_port_pool_used",
            protocol="tcp",
            nat_address="fd00:202::1",
            destination="fd00:202::2",
            port=str(S1),
        )
        == 3
    )
    assert value(samples, "conntrack_table_top_source_entries", address="::1") == 4


# -- 2. the budget and the sample ---------------------------------------------------------

FILL = """
    import socket, sys
    distinct, to_b, to_c, port_b, port_c = map(int, sys.argv[1:6])
    def send(s, address):
        try:
            s.sendto(b"x", address)
            return True
        except OSError:
            return False  # a full table drops the packet: the test counts what is there
    # A: UDP to distinct closed ports, from one socket
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for port in range(10000, 10000 + distinct):
        send(u, ("127.0.0.1", port))
    u.close()
    # B: UDP from 127.0.0.4 to one echo server, each from a source port of its own (below
    # the ephemeral range, so that nothing else holds them): replied
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.2", port_b))
    for i in range(to_b):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.4", 23000 + i))
        if send(s, ("127.0.0.2", port_b)):
            data, peer = echo.recvfrom(10)
            send(echo, peer)
        s.close()
    # C: TCP SYNs that the input hook drops (SYN_SENT, unreplied), each from its own port;
    # closing a socket in SYN_SENT sends nothing more
    for i in range(to_c):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 23000 + i))
        s.setblocking(False)
        s.connect_ex(("127.0.0.3", port_c))
        s.close()
    print("ready", flush=True)
"""
# 30000 entries: 43% UDP unreplied, 27% UDP replied (from another source), 30% TCP
FILL_A, FILL_B, FILL_C = 13000, 8000, 9000
PORT_B, PORT_C = 7301, 7302
BUDGET = 3000
SAMPLE_K = 2  # the top-2 destinations are B and C, far above A's single entries
# Standard deviations of slack around an estimate: a false failure 4.5 sd out has a
# probability below 1e-5 per value (normal approximation), so the test is not flaky.
SIGMAS = 4.5


def tolerance(true_count: int, table: int, sample: int) -> float:
    """Allowed |estimate - true| for estimate = table * k / sample, where k is how many of a
    uniform sample of `sample` entries (without replacement) out of `table` fall in a
    category holding `true_count`: k is hypergeometric, so
        sd(estimate) = table * sqrt(p (1 - p) / sample) * sqrt((table - sample) / (table - 1))
    with p = true_count / table. Plus 1 for the exporter rounding to whole entries."""
    p = true_count / table
    sd = table * math.sqrt(p * (1 - p) / sample) * math.sqrt((table - sample) / (table - 1))
    return SIGMAS * sd + 1


def assert_estimates(estimated: dict, truth: Counter, table: int) -> None:
    assert set(estimated) <= set(truth), "an estimate for something the table does not hold"
    for key, true_count in truth.items():
        estimate = estimated.get(key, 0)
        allowed = tolerance(true_count, table, BUDGET)
        assert abs(estimate - true_count) <= allowed, (key, estimate, true_count, allowed)


def test_budget_samples_and_scales_within_statistical_error(netns, spawn, config_file):
    wanted = FILL_A + FILL_B + FILL_C
    wait_for_room(wanted + 1000)
    raise_timeouts(netns)
    # A RST to an unreplied SYN would delete its entry at once: drop the SYNs instead.
    sh(netns, "nft add chain inet cte in", "{ type filter hook input priority 0; }")
    sh(netns, f"nft add rule inet cte in ip daddr 127.0.0.3 tcp dport {PORT_C} drop")
    wait_ready(spawn(netns, FILL, FILL_A, FILL_B, FILL_C, PORT_B, PORT_C), timeout=60)
    entries = conntrack_list(netns)
    table = netns.conntrack_count()
    assert table == len(entries)
    # Fewer if another run lowered nf_conntrack_max meanwhile: the checks below use the
    # table as it is, and need only that the budget reads a small part of it.
    assert table > 5 * BUDGET
    assert truth_kinds(entries, False, False).keys() == {
        ("ipv4", "udp", ""),
        ("ipv4", "tcp", "syn_sent"),
    }

    sampled = parse_samples(
        netns.exporter("--config.file", config_file(max_entries=BUDGET, top_k=SAMPLE_K)).stdout
    )
    full = parse_samples(
        netns.exporter("--config.file", config_file(max_entries=0, top_k=SAMPLE_K)).stdout
    )
    assert netns.conntrack_count() == table  # one moment for both scans

    assert_scan_healthy(sampled)
    assert value(sampled, "conntrack_table_scan_entries") == BUDGET
    assert value(sampled, "conntrack_table_scan_sample_ratio") == pytest.approx(BUDGET / table)
    assert_estimates(
        exported_kinds(sampled, False, False), truth_kinds(entries, False, False), table
    )
    assert_estimates(
        series(sampled, "conntrack_table_status_entries", "status"),
        Counter(truth_statuses(entries)),
        table,
    )
    sources = series(sampled, "conntrack_table_top_source_entries", "address")
    assert set(sources) == {("127.0.0.1",), ("127.0.0.4",)}
    assert_estimates(sources, truth_sources(entries), table)
    destinations = exported_destinations(sampled)
    truth = truth_destinations(entries)
    assert (
        set(destinations)
        == set(top(truth, SAMPLE_K))
        == {
            ("127.0.0.2", "udp", str(PORT_B)),
            ("127.0.0.3", "tcp", str(PORT_C)),
        }
    )
    assert_estimates(destinations, Counter({key: truth[key] for key in destinations}), table)

    assert_scan_healthy(full)
    assert_exact(full, entries, SAMPLE_K, zone=False, mark=False)
    assert value(full, "conntrack_table_scan_entries") == table


# -- 3. without CAP_NET_ADMIN -------------------------------------------------------------


TABLE_LOGGER = "conntrack_exporter.collectors.conntrack_table"


def assert_table_refused(samples: dict) -> None:
    assert value(samples, "conntrack_exporter_collector_success", collector="conntrack_table") == 0
    assert value(samples, "conntrack_exporter_collector_success", collector="conntrack") == 1
    assert value(samples, "conntrack_entries") == 50
    assert not [n for n in samples if n.startswith("conntrack_nat_")]
    assert_scan_refused(samples, "conntrack_table")


def table_log_lines(stderr: str) -> list[dict]:
    lines = [json.loads(line) for line in stderr.splitlines()]
    return [line for line in lines if line["logger"] == TABLE_LOGGER]


def test_unprivileged_reports_failure_and_no_table_series(netns, config_file):
    netns.udp_flows(50, first_port=21000)
    result = netns.exporter("--log.format", "json", user=NOBODY)
    assert_table_refused(parse_samples(result.stdout))
    [line] = table_log_lines(result.stderr)
    assert line["level"] == "warn"
    assert "CAP_NET_ADMIN" in line["msg"]

    # The server too, scanning every 0.2 s: refused once, said once, not asked again.
    config = config_file(interval_seconds=0.2)
    proc, port = start_exporter(netns, "--config.file", config, "--log.format", "json", user=NOBODY)
    try:
        for _ in range(2):
            time.sleep(0.6)
            body = fetch(netns, f"http://127.0.0.1:{port}/metrics")[2]
            assert_table_refused(parse_samples(body))
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=5)
    assert proc.returncode == 0
    [line] = table_log_lines(stderr)
    assert line["level"] == "warn" and "CAP_NET_ADMIN" in line["msg"]


# -- 4. a scan stopped by the budget leaves the next one possible -------------------------


def test_stopped_scans_repeat_in_the_server(netns, config_file):
    netns.udp_flows(1000, first_port=22000)
    config = config_file(interval_seconds=0.5, max_entries=100)
    proc, port = start_exporter(netns, "--config.file", config)
    try:
        scrapes = []
        for i in range(3):
            if i:
                time.sleep(1.1)
            scrapes.append(parse_samples(fetch(netns, f"http://127.0.0.1:{port}/metrics")[2]))
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=5)
    assert proc.returncode == 0, stderr

    stamps = [value(s, "conntrack_table_scan_timestamp_seconds") for s in scrapes]
    assert stamps[0] < stamps[1] < stamps[2]
    assert stamps[2] - stamps[0] >= 1.5  # scans every 0.5 s over scrapes 2.2 s apart
    for samples in scrapes:
        assert_scan_healthy(samples)
        assert value(samples, "conntrack_table_scan_entries") == 100
        assert value(samples, "conntrack_table_scan_sample_ratio") == pytest.approx(100 / 1000)
        assert value(samples, "conntrack_table_status_entries", status="unreplied") == 1000
    assert "level=warn" not in stderr and "level=error" not in stderr
