"""The socket_ports collector against the real kernel, in namespaces of its own.

A helper process holds a known mix of TCP and UDP sockets (IPv4 and IPv6) in a fresh network
namespace whose ephemeral range and reserved ports are set for the test; the exporter runs
there (`--once`, or as a server) and what it says is compared with what `ss -tuan` lists in the
same namespace at the same moment. Needs root for the namespace; the exporter also runs as
nobody, since sock_diag needs no privilege.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import Netns
from tests.metrics import parse_samples, value
from tests.test_inet_diag import parse_ss, ss_counts
from tests.test_kernel_conntrack import fetch, start_exporter
from tests.test_kernel_table import (  # noqa: F401 (spawn is a fixture)
    ERROR_REASONS,
    NOBODY,
    series,
    spawn,
    wait_ready,
)

pytestmark = pytest.mark.kernel

# The namespace's own sysctls: a small range with a reserved tail.
LOW, HIGH = 40000, 40999
RESERVED = (40990, 40999)
# Ports of the mix: listeners outside (A) and inside (B) the range, a reserved port a client
# binds to, a port outside the range a client binds to, UDP peers.
PA, PB, P_RESERVED, P_OUTSIDE, PU, PU6 = 7301, 40500, 40995, 7399, 7353, 7354
N, M, M6 = 7, 4, 3  # TCP clients to A, to B over IPv4, to B over IPv6
TIME_WAIT = 2  # of the N, closed client first after the first look
UDP_CONNECTED, UDP_UNCONNECTED, UDP6_CONNECTED = 3, 5, 2
MANY_UDP = 700  # unconnected, half IPv4, half IPv6: dumps of several datagrams each

HOLD = """
    import socket, sys
    pa, pb, p_reserved, p_outside, pu, pu6, n, m, m6, tw, uc, uu, uc6 = map(int, sys.argv[1:14])
    held, to_a = [], []
    la = socket.create_server(("127.0.0.1", pa))
    lb = socket.create_server(("", pb), family=socket.AF_INET6, dualstack_ipv6=True)
    def connect(listener, family, target, bind=None):
        client = socket.socket(family, socket.SOCK_STREAM)
        if bind:
            client.bind(bind)
        client.connect(target)
        pair = (client, listener.accept()[0])
        held.append(pair)
        return pair
    to_a = [connect(la, socket.AF_INET, ("127.0.0.1", pa)) for _ in range(n)]
    for _ in range(m):
        connect(lb, socket.AF_INET, ("127.0.0.1", pb))
    for _ in range(m6):
        connect(lb, socket.AF_INET6, ("::1", pb))
    connect(la, socket.AF_INET, ("127.0.0.1", pa), ("127.0.0.1", p_reserved))
    connect(la, socket.AF_INET, ("127.0.0.1", pa), ("127.0.0.1", p_outside))
    for _ in range(uc):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect(("127.0.0.1", pu))
        held.append(s)
    for _ in range(uc6):
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.connect(("::1", pu6))
        held.append(s)
    for i in range(uu):  # unconnected: sendto binds them to an ephemeral port
        s = socket.socket(socket.AF_INET6 if i % 2 else socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b"x", ("::1" if i % 2 else "127.0.0.1", pu))
        held.append(s)
    print("ready", flush=True)
    sys.stdin.readline()
    for client, server in to_a[:tw]:  # the client closes first: TIME_WAIT on its side
        client.shutdown(socket.SHUT_WR)
        server.recv(1)
        server.close()
        client.recv(1)
        client.close()
    print("ready", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def ports_ns(netns: Netns) -> Netns:
    netns.run("sysctl", "-qw", f"net.ipv4.ip_local_port_range={LOW} {HIGH}")
    netns.run("sysctl", "-qw", f"net.ipv4.ip_local_reserved_ports={RESERVED[0]}-{RESERVED[1]}")
    return netns


@pytest.fixture
def ports_config() -> Iterator[Callable[..., str]]:
    """collectors.socket_ports options in a file in /tmp that nobody may read too."""
    written: list[Path] = []

    def write(**options: object) -> str:
        path = Path("/tmp") / f"cte-ports-{uuid.uuid4().hex[:12]}.yml"
        path.write_text(yaml.safe_dump({"collectors": {"socket_ports": options}}))
        path.chmod(0o644)
        written.append(path)
        return str(path)

    yield write
    for path in written:
        path.unlink(missing_ok=True)


def counted_ports() -> bytes:
    flags = bytearray(65536)
    flags[LOW : HIGH + 1] = b"\x01" * (HIGH - LOW + 1)
    flags[RESERVED[0] : RESERVED[1] + 1] = bytes(RESERVED[1] - RESERVED[0] + 1)
    return bytes(flags)


def scan(ns: Netns, config: str, user: str | None = None) -> dict:
    result = ns.exporter(
        "--collector.disable-defaults", "--collector.socket_ports", "--config.file", config,
        user=user,
    )  # fmt: skip
    assert "level=warn" not in result.stderr and "level=error" not in result.stderr
    return parse_samples(result.stdout)


def used(samples: dict) -> Counter:
    return Counter(
        series(samples, "socket_ephemeral_ports_used", "protocol", "destination", "port")
    )


def in_range(text: str) -> int:
    """Sockets ss lists whose local port lies in the range: all that may cross the filter."""
    return sum(
        1
        for s in parse_ss(text)
        if LOW <= s.local_port <= HIGH and s.state not in ("LISTEN", "SYN-RECV")
    )


def assert_healthy(samples: dict) -> None:
    assert value(samples, "conntrack_exporter_collector_success", collector="socket_ports") == 1
    errors = series(samples, "socket_ports_scan_errors_total", "reason")
    assert errors == {(reason,): 0 for reason in ERROR_REASONS}


def look(ns: Netns, config: str, user: str | None = None) -> tuple[dict, str]:
    """One scan and ss around it, retried until ss says the same before and after."""
    for _attempt in range(3):
        before = ns.run("ss", "-tuan").stdout
        samples = scan(ns, config, user)
        after = ns.run("ss", "-tuan").stdout
        if before == after:
            return samples, after
    pytest.fail("the sockets kept changing under the scans")


def test_counts_match_ss_for_every_destination(ports_ns, spawn, ports_config):  # noqa: F811
    holder = spawn(ports_ns, HOLD, PA, PB, P_RESERVED, P_OUTSIDE, PU, PU6, N, M, M6, TIME_WAIT,
                   UDP_CONNECTED, UDP_UNCONNECTED, UDP6_CONNECTED)  # fmt: skip
    wait_ready(holder)
    config = ports_config(top_k=50)
    samples, text = look(ports_ns, config)
    assert_healthy(samples)
    truth = ss_counts(text, counted_ports())
    assert used(samples) == truth
    # Spelled out, so that the comparison cannot pass on a wrong mix: not the accepted
    # sockets of B (inside the range), not the client bound to the reserved port.
    assert dict(truth) == {
        ("tcp", "127.0.0.1", str(PA)): N,
        ("tcp", "127.0.0.1", str(PB)): M,
        ("tcp", "::1", str(PB)): M6,
        ("udp", "127.0.0.1", str(PU)): UDP_CONNECTED,
        ("udp", "::1", str(PU6)): UDP6_CONNECTED,
        ("udp", "", ""): UDP_UNCONNECTED,
    }
    assert value(samples, "socket_ephemeral_ports_used_max", protocol="tcp") == N
    assert value(samples, "socket_ephemeral_ports_used_max", protocol="udp") == UDP_UNCONNECTED
    # Received: the counted sockets, B's accepted ones and the reserved-port client; the
    # sockets outside the range (A's accepted ones, the client from P_OUTSIDE, ...) never are.
    assert (
        value(samples, "socket_ports_scan_sockets")
        == in_range(text)
        == sum(truth.values()) + (M + M6 + 1)
    )
    outside = sum(1 for s in parse_ss(text) if not LOW <= s.local_port <= HIGH)
    assert outside == (N + 2) + 1 + 1  # A's accepted ones, the client from P_OUTSIDE, A

    # Unprivileged: the same answer.
    as_nobody, text_nobody = look(ports_ns, config, user=NOBODY)
    assert_healthy(as_nobody)
    assert used(as_nobody) == ss_counts(text_nobody, counted_ports()) == truth

    # Some connections to A closed client first: TIME_WAIT holds the ports all the same.
    holder.stdin.write("close\n")
    holder.stdin.flush()
    wait_ready(holder)
    samples, text = look(ports_ns, config)
    states = Counter(s.state for s in parse_ss(text) if s.peer_port == PA and s.protocol == "tcp")
    assert states["TIME-WAIT"] == TIME_WAIT
    assert used(samples) == ss_counts(text, counted_ports()) == truth
    assert used(samples)[("tcp", "127.0.0.1", str(PA))] == N


def test_a_spent_budget_says_incomplete_and_the_next_scans_work(ports_ns, spawn, ports_config):  # noqa: F811
    # Enough unconnected UDP sockets that their dump spans several datagrams, and a budget
    # that stops the scan inside it: the kernel still has the rest of that dump to send.
    holder = spawn(ports_ns, HOLD, PA, PB, P_RESERVED, P_OUTSIDE, PU, PU6, N, M, M6, 0, 0,
                   MANY_UDP, 0)  # fmt: skip
    wait_ready(holder)
    tcp = N + 2 * (M + M6) + 1  # clients, B's accepted ones, the reserved-port client
    budget = tcp + 8
    once = scan(ports_ns, ports_config(max_sockets=budget))
    assert value(once, "socket_ports_scan_complete") == 0
    assert value(once, "socket_ports_scan_sockets") == budget
    assert sum(used(once).values()) <= budget

    config = ports_config(max_sockets=budget, interval_seconds=0.3)
    proc, port = start_exporter(ports_ns, "--collector.disable-defaults",
                                "--collector.socket_ports", "--config.file", config)  # fmt: skip
    try:
        scrapes = []
        for _ in range(3):
            scrapes.append(parse_samples(fetch(ports_ns, f"http://127.0.0.1:{port}/metrics")[2]))
            time.sleep(0.8)
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=5)
    assert proc.returncode == 0, stderr
    # Scans that keep finishing without errors: a dump stopped half-way and left running on
    # its socket would make the next dump request there fail (EBUSY): the reader reopened it.
    stamps = [value(s, "socket_ports_scan_timestamp_seconds") for s in scrapes]
    assert stamps[0] < stamps[1] < stamps[2]
    for samples in scrapes:
        assert_healthy(samples)
        assert value(samples, "socket_ports_scan_complete") == 0
        assert value(samples, "socket_ports_scan_sockets") == budget
    # The full scan afterwards, in the same namespace, reads everything.
    full, text = look(ports_ns, ports_config(max_sockets=0))
    assert value(full, "socket_ports_scan_complete") == 1
    # and the scrapes' own connections, if their client side is in TIME_WAIT
    assert value(full, "socket_ports_scan_sockets") == in_range(text) >= tcp + MANY_UDP
