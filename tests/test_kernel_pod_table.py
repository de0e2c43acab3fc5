"""The conntrack_table collector names the pods of a simulated node with a real pod network.

Four network namespaces, all made here and undone in `finally`:

    pod A (team-a/web) --veth--+                                   +--veth-- world
                               +-- node (forwards, masquerades, --+
    pod B (team-b/dns) --veth--+         DNATs a Service)

`node` plays the host: the exporter runs in it, as root (the table dump needs CAP_NET_ADMIN),
and its conntrack table is the one the test reads. It forwards between the pods and the world,
masquerades what the pod subnet sends to the world (so the pods' outbound entries are SRC_NAT)
and DNATs a Service's ClusterIP:port to pod B's address:port. The pods are processes in network
namespaces of their own (`unshare -n sleep`), in kubelet-shaped cgroups (systemd driver for A,
cgroupfs for B; below a cgroup of the run's own, as in kind) with the kubelet's pod-log
directories, so the exporter finds and names them through /proc as on a node. The world holds
clients of the Service; nothing names it a pod.

Traffic, all held for the whole test: pod A sends UDP to the world from many source ports over
IPv4 and IPv6 and opens TCP connections to pod B, directly and through the Service; pod B sends
UDP and ICMP echo requests to the world and serves the Service; the world's clients reach pod B
through the Service, over IPv4 and IPv6.
What the exporter says of each pod is compared with `conntrack -L` in the node namespace at
the same moment, filtered by the pod's addresses; then once more with a scan budget well below
the table's size, within the statistical bound of test_kernel_table's budget test.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Netns
from tests.metrics import parse_samples, value
from tests.test_kernel_pods import CGROUP2, SimulatedPod, remove_cgroups
from tests.test_kernel_table import (
    ECHO_REQUEST,
    ERROR_REASONS,
    MAX_FILE,
    Entry,
    conntrack_list,
    plain_netns,
    raise_timeouts,
    series,
    tolerance,
    wait_for_room,
    wait_ready,
)

pytestmark = pytest.mark.kernel
ROOT = Path(__file__).parent.parent

# The flows, each a count of conntrack entries in the node's table. Pools and sources are far
# apart, so that the sample's estimates cannot be confused; all of them fit in TOP_K.
A_TO_DNS, A_TO_METRICS, A_TO_DNS6 = 1500, 1000, 150  # UDP from pod A to the world
A_DIRECT, A_VIA_SERVICE = 20, 30  # TCP from pod A to pod B: its address, the Service's
B_TO_DNS, B_TO_SYSLOG = 500, 700  # UDP from pod B to the world
B_PINGS = 3  # ICMP echo requests from pod B to the world (the tally's generic path)
WORLD_VIA_SERVICE, WORLD_VIA_SERVICE6 = 120, 10  # TCP from the world to pod B, by the Service
DNS, METRICS, SYSLOG = 5353, 5354, 5355  # the world's UDP ports (it drops what they get)
SERVICE_PORT, TARGET_PORT = 80, 8080
FIRST_SOURCE_PORT = 20000  # below the ephemeral range: a UDP flow per source port
TOP_K = 10
BUDGET = 500  # of 4,033 entries: the sample is an eighth of the table
# The sample's estimates are held to the bound of test_kernel_table's budget test (tolerance:
# 4.5 standard deviations and 1). Computed from the hypergeometric distribution itself rather
# than its normal approximation, a false failure is below 5e-5 for each of the 28 values
# compared here (the worst are the small, skewed counts) and ~3.4e-4 for the whole test.
TABLE_ERRORS = {(reason,): 0 for reason in ERROR_REASONS}


@dataclass(frozen=True)
class Addresses:
    """One run's addresses. The pods' are drawn at random: the exporter sees every pod on the
    machine, other runs' too, and names no pod by an address that two pods hold."""

    a: str
    a6: str
    b: str
    b6: str
    gateway_a: str
    gateway_a6: str
    gateway_b: str
    gateway_b6: str
    pod_subnet: str
    pod_subnet6: str
    node: str  # the node's side toward the world: the masquerade's address
    node6: str
    world: str
    world6: str
    service: str = "10.96.0.10"
    service6: str = "fd96::10"

    @classmethod
    def draw(cls) -> Addresses:
        octet, slot, world = secrets.randbelow(256), secrets.randbelow(32), secrets.randbelow(256)
        base = 8 * slot  # a /30 a pod: A in base+0/30, B in base+4/30; a /64 each
        subnet6 = f"fd24:{octet:x}:{slot:x}"
        return cls(
            a=f"10.244.{octet}.{base + 2}",
            a6=f"{subnet6}:a::2",
            b=f"10.244.{octet}.{base + 6}",
            b6=f"{subnet6}:b::2",
            gateway_a=f"10.244.{octet}.{base + 1}",
            gateway_a6=f"{subnet6}:a::1",
            gateway_b=f"10.244.{octet}.{base + 5}",
            gateway_b6=f"{subnet6}:b::1",
            pod_subnet=f"10.244.{octet}.0/24",
            pod_subnet6=f"{subnet6}::/48",
            node=f"198.18.{world}.1",
            node6=f"fd18:{world:x}::1",
            world=f"198.18.{world}.2",
            world6=f"fd18:{world:x}::2",
        )


@dataclass
class PodNode:
    node: Netns
    world: Netns
    a: SimulatedPod
    b: SimulatedPod
    addresses: Addresses
    scratch: Path
    pod_logs: Path
    spawn: Callable[..., subprocess.Popen]

    def addresses_of(self, pod: SimulatedPod) -> set[str]:
        ours = self.addresses
        return {ours.a, ours.a6} if pod is self.a else {ours.b, ours.b6}


# -- the node ------------------------------------------------------------------------------


def sh(run: Callable[..., object], command: str, *more: str) -> None:
    """A command line (split on spaces, then `more` as whole arguments) through `run`."""
    run(*command.split(), *more)


def mac_of(node: Netns, link: str) -> str:
    return json.loads(node.run("ip", "-j", "link", "show", "dev", link).stdout)[0]["address"]


def plug_pod(node: Netns, pod: SimulatedPod, link: str, addresses: tuple[str, ...]) -> None:
    """A veth pair from the node (`link`, the gateways: a /30 and a /64) to the pod (eth0, its
    addresses), the pod's default routes through the node, and the gateways' neighbour entries
    made permanent: the pod's first datagrams are not queued (and some dropped) behind ARP."""
    address, address6, gateway, gateway6 = addresses
    sh(node.run, f"ip link add {link} type veth peer name eth0 netns {pod.pid}")
    sh(node.run, f"ip addr add {gateway}/30 dev {link}")
    sh(node.run, f"ip -6 addr add {gateway6}/64 dev {link} nodad")
    sh(node.run, f"ip link set {link} up")
    sh(pod.run, f"ip addr add {address}/30 dev eth0")
    sh(pod.run, f"ip -6 addr add {address6}/64 dev eth0 nodad")
    sh(pod.run, "ip link set eth0 up")
    sh(pod.run, f"ip route add default via {gateway}")
    sh(pod.run, f"ip -6 route add default via {gateway6}")
    mac = mac_of(node, link)
    for neighbour in (gateway, gateway6):
        sh(pod.run, f"ip neigh replace {neighbour} lladdr {mac} dev eth0 nud permanent")


def build_network(net: PodNode) -> None:
    node, world, ours = net.node, net.world, net.addresses
    # The node's own settings: forwarding, and timeouts that outlive the test (per namespace).
    sh(node.run, "sysctl -qw net.ipv4.ip_forward=1")
    sh(node.run, "sysctl -qw net.ipv6.conf.all.forwarding=1")
    sh(node.run, "sysctl -qw net.netfilter.nf_conntrack_udp_timeout=600")
    raise_timeouts(node)
    plug_pod(node, net.a, "pa", (ours.a, ours.a6, ours.gateway_a, ours.gateway_a6))
    plug_pod(node, net.b, "pb", (ours.b, ours.b6, ours.gateway_b, ours.gateway_b6))

    sh(node.run, f"ip link add w type veth peer name eth0 netns {world.name}")
    sh(node.run, f"ip addr add {ours.node}/24 dev w")
    sh(node.run, f"ip -6 addr add {ours.node6}/64 dev w nodad")
    sh(node.run, "ip link set w up")
    sh(world.run, f"ip addr add {ours.world}/24 dev eth0")
    sh(world.run, f"ip -6 addr add {ours.world6}/64 dev eth0 nodad")
    sh(world.run, "ip link set eth0 up")
    sh(world.run, f"ip route add {ours.service}/32 via {ours.node}")
    sh(world.run, f"ip -6 route add {ours.service6}/128 via {ours.node6}")
    # The world takes the pods' datagrams and answers none (no ICMP errors either).
    sh(world.run, "nft add table inet world")
    sh(world.run, "nft add chain inet world in", "{ type filter hook input priority 0; }")
    sh(world.run, f"nft add rule inet world in udp dport {DNS}-{SYSLOG} drop")

    # The node's NAT, as kube-proxy and a CNI's masquerade would set it up.
    sh(node.run, "nft add table inet k8s")
    sh(node.run, "nft add chain inet k8s pre", "{ type nat hook prerouting priority dstnat; }")
    sh(
        node.run,
        f"nft add rule inet k8s pre ip daddr {ours.service} tcp dport {SERVICE_PORT} "
        f"dnat ip to {ours.b}:{TARGET_PORT}",
    )
    sh(
        node.run,
        f"nft add rule inet k8s pre ip6 daddr {ours.service6} tcp dport {SERVICE_PORT} "
        f"dnat ip6 to [{ours.b6}]:{TARGET_PORT}",
    )
    sh(node.run, "nft add chain inet k8s post", "{ type nat hook postrouting priority srcnat; }")
    sh(node.run, f"nft add rule inet k8s post ip saddr {ours.pod_subnet} oifname w masquerade")
    sh(node.run, f"nft add rule inet k8s post ip6 saddr {ours.pod_subnet6} oifname w masquerade")


@pytest.fixture
def pod_node() -> Iterator[PodNode]:
    if not (CGROUP2 / "cgroup.procs").exists():
        pytest.skip(f"needs a cgroup v2 hierarchy at {CGROUP2}")
    wanted = A_TO_DNS + A_TO_METRICS + A_TO_DNS6 + B_TO_DNS + B_TO_SYSLOG
    wait_for_room(wanted + 1000)
    tag = uuid.uuid4().hex[:6]
    # Every step's undoing is registered before the step: whatever fails, the rest is undone,
    # last made first (helpers, then pods, then their cgroups, namespaces, files).
    with contextlib.ExitStack() as undo:
        scratch = Path("/tmp") / f"cte-podtable-{os.getpid()}-{tag}"
        scratch.mkdir(mode=0o755)
        undo.callback(shutil.rmtree, scratch)
        pod_logs = scratch / "pods"
        pod_logs.mkdir(mode=0o755)
        node = undo.enter_context(plain_netns("node"))
        world = undo.enter_context(plain_netns("world"))
        # The pods' cgroups below one of this run's own, as kind nests a node's kubelet
        # hierarchy: a kubepods directory at the root would be shared with concurrent runs,
        # and whichever made it could not remove it while another's pod was in it.
        made = [CGROUP2 / f"cte-node-{os.getpid()}-{tag}"]
        made[0].mkdir()
        undo.callback(remove_cgroups, made)  # removed once every pod process is gone
        a = SimulatedPod("team-a", f"web-{tag}", "systemd", root=made[0])
        b = SimulatedPod("team-b", f"dns-{tag}", "cgroupfs", root=made[0])
        for pod in (a, b):
            undo.callback(stop_pod, pod)
            pod.start(pod_logs, made)
        helpers: list[subprocess.Popen] = []
        undo.callback(stop_helpers, helpers)

        def spawn(cmd: list[str], code: str, *args: object) -> subprocess.Popen:
            proc = subprocess.Popen(
                [*cmd, sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            helpers.append(proc)
            return proc

        net = PodNode(node, world, a, b, Addresses.draw(), scratch, pod_logs, spawn)
        build_network(net)
        yield net


def stop_pod(pod: SimulatedPod) -> None:
    with contextlib.suppress(AttributeError):  # one that never started
        pod.stop()


def stop_helpers(helpers: list[subprocess.Popen]) -> None:
    for proc in helpers:
        proc.kill()
        proc.communicate()


def in_pod(pod: SimulatedPod) -> list[str]:
    return ["nsenter", "-t", str(pod.pid), "-n"]


def in_netns(ns: Netns) -> list[str]:
    return ["ip", "netns", "exec", ns.name]


# -- the traffic ---------------------------------------------------------------------------

UDP_FLOWS = """
    import socket, sys
    def flows(family, address, port, count, first):
        # One datagram from each of `count` source ports: one entry each, the same entry if
        # sent again (another test lowering the global nf_conntrack_max drops some).
        for source in range(first, first + count):
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", source))
            s.sendto(b"x", (address, port))
            s.close()
    def serve_requests(send):
        # Ready once sent; sends again at each line read, until killed.
        send()
        print("ready", flush=True)
        for _line in sys.stdin:
            send()
            print("ready", flush=True)
"""
# TCP connections wait for SYNs dropped by a full table to be sent again (1 s, 3 s, ...).
CONNECT_TIMEOUT = 30

POD_B = (
    UDP_FLOWS
    + ECHO_REQUEST
    + """
    import threading
    world, target, dns, syslog, to_dns, to_syslog, first, pings = sys.argv[1:9]
    held = []
    listener = socket.create_server(
        ("::", int(target)), family=socket.AF_INET6, dualstack_ipv6=True, backlog=256
    )
    def serve():
        while True:
            held.append(listener.accept()[0])
    threading.Thread(target=serve, daemon=True).start()
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    def send():
        flows(socket.AF_INET, world, int(dns), int(to_dns), int(first))
        flows(socket.AF_INET, world, int(syslog), int(to_syslog), int(first))
        for ident in range(4300, 4300 + int(pings)):  # an entry each: one per echo id
            raw.sendto(echo_request(ident), (world, 0))
    serve_requests(send)
"""
)

POD_A = (
    UDP_FLOWS
    + """
    world, world6, pod_b, service = sys.argv[1:5]
    dns, metrics, target, service_port, first = map(int, sys.argv[5:10])
    to_dns, to_metrics, to_dns6, direct, via_service, timeout = map(int, sys.argv[10:16])
    held = [socket.create_connection((pod_b, target), timeout) for _ in range(direct)]
    held += [socket.create_connection((service, service_port), timeout) for _ in range(via_service)]
    def send():
        flows(socket.AF_INET, world, dns, to_dns, first)
        flows(socket.AF_INET, world, metrics, to_metrics, first)
        flows(socket.AF_INET6, world6, dns, to_dns6, first)
    serve_requests(send)
"""
)

WORLD = """
    import socket, sys
    service, service6, port, count, count6, timeout = sys.argv[1:7]
    def connect(address):
        return socket.create_connection((address, int(port)), int(timeout))
    held = [connect(service) for _ in range(int(count))]
    held += [connect(service6) for _ in range(int(count6))]
    print("ready", flush=True)
    sys.stdin.read()
"""


def expected_flows(ours: Addresses) -> Counter:
    """(original source, destination, port) of every entry the node's table should hold."""
    return Counter(
        {
            (ours.a, ours.world, str(DNS)): A_TO_DNS,
            (ours.a, ours.world, str(METRICS)): A_TO_METRICS,
            (ours.a6, ours.world6, str(DNS)): A_TO_DNS6,
            (ours.a, ours.b, str(TARGET_PORT)): A_DIRECT,
            (ours.a, ours.service, str(SERVICE_PORT)): A_VIA_SERVICE,
            (ours.b, ours.world, str(DNS)): B_TO_DNS,
            (ours.b, ours.world, str(SYSLOG)): B_TO_SYSLOG,
            (ours.b, ours.world, ""): B_PINGS,
            (ours.world, ours.service, str(SERVICE_PORT)): WORLD_VIA_SERVICE,
            (ours.world6, ours.service6, str(SERVICE_PORT)): WORLD_VIA_SERVICE6,
        }
    )


def make_traffic(net: PodNode) -> None:
    """The flows, held by helpers; once the node's table holds exactly them."""
    ours = net.addresses
    pod_b = net.spawn(
        in_pod(net.b), POD_B, ours.world, TARGET_PORT, DNS, SYSLOG, B_TO_DNS, B_TO_SYSLOG,
        FIRST_SOURCE_PORT, B_PINGS,
    )  # fmt: skip
    wait_ready(pod_b)
    world = net.spawn(
        in_netns(net.world), WORLD, ours.service, ours.service6, SERVICE_PORT,
        WORLD_VIA_SERVICE, WORLD_VIA_SERVICE6, CONNECT_TIMEOUT,
    )  # fmt: skip
    pod_a = net.spawn(
        in_pod(net.a), POD_A, ours.world, ours.world6, ours.b, ours.service,
        DNS, METRICS, TARGET_PORT, SERVICE_PORT, FIRST_SOURCE_PORT,
        A_TO_DNS, A_TO_METRICS, A_TO_DNS6, A_DIRECT, A_VIA_SERVICE, CONNECT_TIMEOUT,
    )  # fmt: skip
    for helper in (world, pod_a):
        wait_ready(helper, timeout=2 * CONNECT_TIMEOUT)
    expected = expected_flows(ours)
    deadline = time.monotonic() + 2 * CONNECT_TIMEOUT
    while True:
        now = Counter((e.src, e.dst, e.dport) for e in conntrack_list(net.node))
        if now == expected:
            return
        extra, missing = now - expected, expected - now
        assert not extra, f"the node's table holds flows not made: {extra}"
        assert time.monotonic() < deadline, (
            f"the node's table never held every flow made: {missing} missing; "
            f"nf_conntrack_max {MAX_FILE.read_text().strip()}, the node's drops "
            f"{net.node.conntrack_stats().get('drop')}"
        )
        time.sleep(0.5)
        for helper in (pod_a, pod_b):  # datagrams a full table dropped, sent again
            assert helper.stdin is not None
            helper.stdin.write("again\n")
            helper.stdin.flush()
            wait_ready(helper)


# -- what conntrack-tools says, by pod -----------------------------------------------------


def truth_outbound(entries: list[Entry], addresses: set[str]) -> int:
    return sum(1 for e in entries if e.src in addresses)


def truth_inbound(entries: list[Entry], addresses: set[str]) -> int:
    """Entries DNATed to the pod: it answers (reply source), and was not the destination."""
    return sum(1 for e in entries if e.dst_nat and e.reply_src in addresses)


def truth_pod_pools(net: PodNode, entries: list[Entry], pod: SimulatedPod) -> Counter:
    """The pod's SNAT entries (ports taken) by pool: the node's address toward the world
    (the reply's destination), the destination, its port, the protocol."""
    node = {net.addresses.node, net.addresses.node6}
    addresses = net.addresses_of(pod)
    return Counter(
        labelled(
            protocol=e.protocol, nat_address=e.reply_dst, destination=e.dst, port=e.dport,
            **pod.labels(),
        )
        for e in entries
        if e.src in addresses and e.src_nat and e.reply_dst in node
    )  # fmt: skip


def labelled(**labels: str) -> tuple[tuple[str, str], ...]:
    """A series' key as parse_samples makes it."""
    return tuple(sorted(labels.items()))


def pod_labels_of(net: PodNode, address: str) -> dict[str, str]:
    for pod in (net.a, net.b):
        if address in net.addresses_of(pod):
            return pod.labels()
    return {}


def truth_sources(net: PodNode, entries: list[Entry]) -> Counter:
    return Counter(labelled(address=e.src, **pod_labels_of(net, e.src)) for e in entries)


def truth_destinations(net: PodNode, entries: list[Entry]) -> Counter:
    return Counter(
        labelled(address=e.dst, protocol=e.protocol, port=e.dport, **pod_labels_of(net, e.dst))
        for e in entries
    )


def truth_pools(entries: list[Entry]) -> Counter:
    return Counter(
        labelled(protocol=e.protocol, nat_address=e.reply_dst, destination=e.dst, port=e.dport)
        for e in entries
        if e.src_nat
    )


# -- what the exporter says ----------------------------------------------------------------


def write_config(net: PodNode, max_entries: int) -> Path:
    path = net.scratch / f"config-{max_entries}.yml"
    path.write_text(
        "collectors:\n"
        "  disable_defaults: true\n"
        f"  pods: {{enabled: true, pod_logs_path: {net.pod_logs}}}\n"
        f"  conntrack_table: {{enabled: true, top_k: {TOP_K}, max_entries: {max_entries}}}\n"
    )
    return path


def scrape_once(net: PodNode, config: Path) -> dict:
    """`--once` in the node namespace, as root, this checkout's exporter."""
    result = net.node.run(
        sys.executable, "-m", "conntrack_exporter", "--once", f"--config.file={config}", cwd=ROOT
    )
    assert "level=warn" not in result.stderr and "level=error" not in result.stderr
    samples = parse_samples(result.stdout)
    for collector in ("pods", "conntrack_table"):
        assert value(samples, "conntrack_exporter_collector_success", collector=collector) == 1
    assert series(samples, "conntrack_table_scan_errors_total", "reason") == TABLE_ERRORS
    return samples


def pod_entries(samples: dict, pod: SimulatedPod) -> dict[str, float]:
    """{direction: entries} of the pod's conntrack_table_pod_entries."""
    name = "conntrack_table_pod_entries"
    return {
        direction: value(samples, name, direction=direction, **pod.labels())
        for direction in ("outbound", "inbound")
    }


def pod_pools(samples: dict, pod: SimulatedPod) -> dict:
    mine = set(pod.labels().items())
    return {
        key: count
        for key, count in samples.get("conntrack_nat_port_pool_pod_used", {}).items()
        if mine <= set(key)
    }


# -- the test ------------------------------------------------------------------------------


def test_each_pods_entries_and_ports_are_what_conntrack_lists_for_its_addresses(pod_node):
    net = pod_node
    a, b, ours = net.a, net.b, net.addresses
    make_traffic(net)

    exact_config = write_config(net, max_entries=0)
    for _attempt in range(3):
        entries = sorted(conntrack_list(net.node))
        exact = scrape_once(net, exact_config)
        if sorted(conntrack_list(net.node)) == entries:
            break  # the table held still over the scan: one moment
    else:
        pytest.fail("the node's table kept changing under the scans")
    table = len(entries)
    assert value(exact, "conntrack_table_scan_entries") == table
    assert value(exact, "conntrack_table_scan_sample_ratio") == 1

    # Each pod's entries, both directions, as conntrack -L counts them for its addresses...
    for pod in (a, b):
        addresses = net.addresses_of(pod)
        assert pod_entries(exact, pod) == {
            "outbound": truth_outbound(entries, addresses),
            "inbound": truth_inbound(entries, addresses),
        }, pod.labels()
    # ... which are the flows made: pod-to-pod without a Service is the client's alone.
    a_out = A_TO_DNS + A_TO_METRICS + A_TO_DNS6 + A_DIRECT + A_VIA_SERVICE
    assert pod_entries(exact, a) == {"outbound": a_out, "inbound": 0}
    assert pod_entries(exact, b) == {
        "outbound": B_TO_DNS + B_TO_SYSLOG + B_PINGS,
        "inbound": WORLD_VIA_SERVICE + WORLD_VIA_SERVICE6 + A_VIA_SERVICE,
    }

    # The ports each pod took from each SNAT pool; the pools themselves, bare (the node's).
    for pod in (a, b):
        assert pod_pools(exact, pod) == truth_pod_pools(net, entries, pod), pod.labels()
    dns = {"protocol": "udp", "nat_address": ours.node, "destination": ours.world, "port": "5353"}
    exported = exact["conntrack_nat_port_pool_pod_used"]
    assert exported[labelled(**dns, **a.labels())] == A_TO_DNS
    assert exported[labelled(**dns, **b.labels())] == B_TO_DNS
    dns6 = {**dns, "nat_address": ours.node6, "destination": ours.world6}
    assert exported[labelled(**dns6, **a.labels())] == A_TO_DNS6
    pings = {**dns, "protocol": "icmp", "port": ""}
    assert exported[labelled(**pings, **b.labels())] == B_PINGS
    assert len(exported) == 6  # A: dns, metrics, dns over IPv6; B: dns, syslog, pings
    assert exact["conntrack_nat_port_pool_used"] == truth_pools(entries)
    assert exact["conntrack_nat_port_pool_used"][labelled(**dns)] == A_TO_DNS + B_TO_DNS

    # Top-K: a pod's addresses carry its labels (both of A's families), the world's none.
    assert exact["conntrack_table_top_source_entries"] == truth_sources(net, entries)
    assert exact["conntrack_table_top_destination_entries"] == truth_destinations(net, entries)
    sources = exact["conntrack_table_top_source_entries"]
    assert sources[labelled(address=ours.a6, **a.labels())] == A_TO_DNS6
    assert sources[labelled(address=ours.b, **b.labels())] == B_TO_DNS + B_TO_SYSLOG + B_PINGS
    assert sources[labelled(address=ours.world)] == WORLD_VIA_SERVICE
    assert sources[labelled(address=ours.world6)] == WORLD_VIA_SERVICE6
    destination = labelled(address=ours.b, protocol="tcp", port=str(TARGET_PORT), **b.labels())
    assert exact["conntrack_table_top_destination_entries"][destination] == A_DIRECT

    # A budget well below the table: the dump stops, the counts are scaled up, and each pod's
    # estimates stay within the bound of test_kernel_table's budget test.
    sampled = scrape_once(net, write_config(net, max_entries=BUDGET))
    assert sorted(conntrack_list(net.node)) == entries  # the same moment as the exact scan
    assert value(sampled, "conntrack_table_scan_entries") == BUDGET
    assert value(sampled, "conntrack_table_scan_sample_ratio") == pytest.approx(BUDGET / table)
    for pod in (a, b):
        addresses = net.addresses_of(pod)
        truth = {"outbound": truth_outbound(entries, addresses)}
        truth["inbound"] = truth_inbound(entries, addresses)
        assert_estimates(pod_entries(sampled, pod), truth, table)
        assert_estimates(pod_pools(sampled, pod), truth_pod_pools(net, entries, pod), table)
    assert pod_entries(sampled, a)["inbound"] == 0  # none to sample
    assert_estimates(sampled["conntrack_nat_port_pool_used"], truth_pools(entries), table)
    sources = sampled["conntrack_table_top_source_entries"]
    assert_estimates(sources, truth_sources(net, entries), table)
    assert labelled(address=ours.a, **a.labels()) in sources
    assert labelled(address=ours.b, **b.labels()) in sources
    destinations = sampled["conntrack_table_top_destination_entries"]
    assert_estimates(destinations, truth_destinations(net, entries), table)


def assert_estimates(estimated: dict, truth: dict, table: int) -> None:
    """Every estimate names something the table holds, under the same labels, and each true
    count is estimated within tolerance (something the sample missed is estimated 0)."""
    assert set(estimated) <= set(truth), "an estimate for something the table does not hold"
    for key, true_count in truth.items():
        estimate = estimated.get(key, 0)
        allowed = tolerance(true_count, table, BUDGET)
        assert abs(estimate - true_count) <= allowed, (key, estimate, true_count, allowed)
