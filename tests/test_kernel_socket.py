"""The socket collector against the real kernel, in network namespaces of our own.

Every value is checked against what the kernel's own tools (`ss`, `nstat`) and /proc say in
the same namespace right after the scrape. Needs root; skips without it. Conntrack plays no
part: nothing here depends on nf_conntrack_max, which other tests lower for a while.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.metrics import parse_samples, value

pytestmark = pytest.mark.kernel

NOBODY = "65534"
ONLY_SOCKET = ("--collector.disable-defaults", "--collector.socket")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# Sockets a test keeps open while the exporter scrapes: made by a process in the namespace,
# which says "ready" and then holds them until its stdin closes.
HOLD = """
import socket, sys, time
keep = []

def pairs(family, host, count, backlog=16):
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((host, 0))
    listener.listen(backlog)
    keep.append(listener)
    made = []
    for _ in range(count):
        client = socket.create_connection(listener.getsockname()[:2], timeout=5)
        server, _ = listener.accept()
        made.append((client, server))
    return made

def bound_udp(family, host, count):
    for _ in range(count):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        udp.bind((host, 0))
        keep.append(udp)
"""
READY = """
print("ready", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def holding(netns, script: str) -> Iterator[None]:
    """Run HOLD + `script` in the namespace; yield once its sockets are open."""
    code = HOLD + textwrap.dedent(script) + READY
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns.name, sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        readable, _, _ = select.select([proc.stdout], [], [], 20)
        line = proc.stdout.readline() if readable else ""
        if line.strip() != "ready":
            proc.kill()
            pytest.fail(f"socket holder did not start: {line!r} {proc.stderr.read()}")
        yield
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def scrape(netns, user: str | None = None) -> dict:
    result = netns.exporter(*ONLY_SOCKET, user=user)
    samples = parse_samples(result.stdout)
    assert value(samples, "conntrack_exporter_collector_success", collector="socket") == 1
    return samples


def sockstat(netns, name: str = "sockstat") -> dict[str, dict[str, int]]:
    pools = {}
    for line in netns.read(f"/proc/net/{name}").splitlines():
        fields = line.split()
        pools[fields[0].rstrip(":")] = dict(zip(fields[1::2], map(int, fields[2::2]), strict=True))
    return pools


def snmp_udp(netns) -> dict[str, int]:
    lines = [line.split() for line in netns.read("/proc/net/snmp").splitlines()]
    header, values = [line for line in lines if line[0] == "Udp:"]
    return dict(zip(header[1:], map(int, values[1:]), strict=True))


def snmp6(netns) -> dict[str, int]:
    return {
        name: int(number)
        for name, number in (line.split() for line in netns.read("/proc/net/snmp6").splitlines())
    }


def nstat(netns, counter: str) -> int:
    """A counter's absolute value as `nstat` says it, without touching nstat's history."""
    for line in netns.run("nstat", "-asz", counter).stdout.splitlines():
        fields = line.split()
        if fields and fields[0] == counter:
            return int(fields[1])
    raise AssertionError(f"nstat has no {counter}")


def require_ipv6(netns) -> None:
    if netns.run("test", "-e", "/proc/net/sockstat6", check=False).returncode != 0:
        pytest.skip("IPv6 is off on this kernel")


def test_inuse_counts_the_sockets_that_hold_a_port(netns):
    require_ipv6(netns)
    script = """
    keep += [s for pair in pairs(socket.AF_INET, "127.0.0.1", 3) for s in pair]
    bound_udp(socket.AF_INET, "127.0.0.1", 4)
    keep.append(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))  # unbound: not in use
    keep += [s for pair in pairs(socket.AF_INET6, "::1", 1) for s in pair]
    bound_udp(socket.AF_INET6, "::1", 2)
    """
    with holding(netns, script):
        samples = scrape(netns)
        v4, v6 = sockstat(netns), sockstat(netns, "sockstat6")

    inuse = samples["socket_inuse"]
    expected = {("ipv4", "tcp"): 7, ("ipv4", "udp"): 4, ("ipv6", "tcp"): 3, ("ipv6", "udp"): 2}
    for (family, protocol), count in expected.items():
        assert inuse[(("family", family), ("protocol", protocol))] == count
    assert (v4["TCP"]["inuse"], v4["UDP"]["inuse"]) == (7, 4)
    assert (v6["TCP6"]["inuse"], v6["UDP6"]["inuse"]) == (3, 2)
    # Every socket in the namespace, bound or not: 7 + 4 + 1 + 3 + 2.
    assert value(samples, "socket_allocated") == v4["sockets"]["used"] == 17


def test_timewait_matches_ss_and_sockstat(netns):
    script = """
    import subprocess
    made = pairs(socket.AF_INET, "127.0.0.1", 6)
    for client, server in made[:4]:
        client.close()  # the active closer holds TIME_WAIT
        server.close()
    keep += [s for pair in made[4:] for s in pair]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = subprocess.run(["ss", "-Htan", "state", "time-wait"], capture_output=True, text=True)
        if len(out.stdout.splitlines()) == 4:
            break
        time.sleep(0.05)
    """
    with holding(netns, script):
        samples = scrape(netns)
        in_ss = len(netns.run("ss", "-Htan", "state", "time-wait").stdout.splitlines())
        tw = sockstat(netns)["TCP"]["tw"]

    assert value(samples, "socket_tcp_timewait") == in_ss == tw == 4
    assert value(samples, "socket_tcp_timewait_limit") == int(
        netns.read("/proc/sys/net/ipv4/tcp_max_tw_buckets")
    )


OVERFLOW = """
import socket, time
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(0)  # an accept queue of one; never accepted
clients = []
for _ in range(8):
    client = socket.socket()
    client.setblocking(False)
    client.connect_ex(listener.getsockname())
    clients.append(client)
time.sleep(0.3)
# Close everything: no SYN is retransmitted, so the counters stay where they are.
for client in clients:
    client.close()
listener.close()
time.sleep(0.2)
"""


def test_listen_overflows_match_nstat(netns):
    before = scrape(netns)
    assert value(before, "socket_listen_overflows_total") == 0
    netns.python(OVERFLOW)
    after = scrape(netns)
    overflows = nstat(netns, "TcpExtListenOverflows")
    drops = nstat(netns, "TcpExtListenDrops")

    assert value(after, "socket_listen_overflows_total") == overflows > 0
    assert value(after, "socket_listen_drops_total") == drops >= overflows


FLOOD = """
import socket, sys
family = socket.AF_INET6 if sys.argv[1] == "6" else socket.AF_INET
host = "::1" if sys.argv[1] == "6" else "127.0.0.1"
receiver = socket.socket(family, socket.SOCK_DGRAM)
receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel's minimum
receiver.bind((host, 0))
sender = socket.socket(family, socket.SOCK_DGRAM)
for _ in range(200):
    sender.sendto(b"x" * 1000, receiver.getsockname()[:2])
"""


@pytest.mark.parametrize(
    ("version", "family", "read_errors"),
    [
        ("4", "ipv4", lambda netns: snmp_udp(netns)["RcvbufErrors"]),
        ("6", "ipv6", lambda netns: snmp6(netns)["Udp6RcvbufErrors"]),
    ],
)
def test_udp_receive_buffer_errors_rise_by_the_kernels_count(netns, version, family, read_errors):
    if version == "6":
        require_ipv6(netns)
    before = scrape(netns)
    errors_before = read_errors(netns)
    netns.python(FLOOD, version)
    after = scrape(netns)
    errors_after = read_errors(netns)

    name = "socket_udp_receive_buffer_errors_total"
    rise = value(after, name, family=family) - value(before, name, family=family)
    assert value(before, name, family=family) == errors_before
    assert rise == errors_after - errors_before > 100  # most of 200 datagrams dropped
    in_errors = "socket_udp_in_errors_total"
    assert value(after, in_errors, family=family) - value(before, in_errors, family=family) >= rise


HOST_ONLY = [
    "socket_tcp_orphans_limit",
    "socket_memory_min_bytes",
    "socket_memory_pressure_bytes",
    "socket_memory_limit_bytes",
]


def test_host_only_sysctls_are_absent_in_a_child_namespace(netns):
    for name in ("tcp_mem", "udp_mem", "tcp_max_orphans"):
        path = f"/proc/sys/net/ipv4/{name}"
        assert netns.run("test", "-e", path, check=False).returncode != 0, path
    samples = scrape(netns)
    for name in HOST_ONLY:
        assert name not in samples
    # Not zeros either: the rest of the pools are there.
    assert "socket_memory_bytes" in samples and "socket_tcp_timewait_limit" in samples


def test_host_namespace_has_the_memory_limits_in_bytes():
    """The host's own namespace, read-only: the exporter only reads /proc."""
    result = subprocess.run(
        [sys.executable, "-m", "conntrack_exporter", "--once", *ONLY_SOCKET],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    samples = parse_samples(result.stdout)
    sysctl = Path("/proc/sys/net/ipv4")
    assert value(samples, "socket_tcp_orphans_limit") == int(
        (sysctl / "tcp_max_orphans").read_text()
    )
    for protocol in ("tcp", "udp"):
        low, pressure, high = map(int, (sysctl / f"{protocol}_mem").read_text().split())
        assert value(samples, "socket_memory_min_bytes", protocol=protocol) == low * PAGE_SIZE
        assert (
            value(samples, "socket_memory_pressure_bytes", protocol=protocol)
            == pressure * PAGE_SIZE
        )
        assert value(samples, "socket_memory_limit_bytes", protocol=protocol) == high * PAGE_SIZE


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv to drop root")
def test_nobody_reads_every_socket_pool(netns):
    netns.python(FLOOD, "4")
    samples = scrape(netns, user=NOBODY)  # asserts success 1
    assert (
        value(samples, "socket_udp_receive_buffer_errors_total", family="ipv4")
        == (snmp_udp(netns)["RcvbufErrors"])
    )
    assert value(samples, "socket_file_handles_limit") > 0
    assert value(samples, "socket_ephemeral_ports_range_size") > 0
