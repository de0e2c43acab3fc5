"""Table scan: our conntrack dump decoder against `conntrack -L` and pyroute2, in one netns.

A throwaway network namespace is filled with --entries real conntrack entries (UDP flows on
loopback, some TCP SYN_SENT and IPv6 UDP entries, and UDP flows DNATed to a Service's backend
or masqueraded to the node's address: --no-nat leaves these out), the global nf_conntrack_max
raised for as long as the table is measured and restored afterwards. Then, in rounds whose
order rotates:

- full:      our `ConntrackTableReader.dump()` into a `TableTally` with no budget, in a fresh
             process in the netns (wall, CPU, peak RSS growth measured inside that process);
- conntrack: `conntrack -L > /dev/null` (wall; CPU is the child's user + sys from wait4);
- sampled:   the same as full with the --budget entries our scanner stops at by default;
- recv-only: the same dump request read with recv_into and thrown away: the kernel's work plus
             the least Python can do per datagram, the floor for any Python decoder;
- unpruned:  a diagnostic, no target: full with address tallies too large to be pruned;
- pods:      full with --pods pods' addresses known (TableTally's pod_of), as the pods
             collector would publish them: the fill's own sources are pods' addresses (every
             entry is attributed to a pod, a worst case), so are the DNAT flows' backends
             (those entries are a pod's inbound too), and the rest match nothing. The ratio
             pods / full, per round and of the medians, is the per-pod tally's cost.

Once, after the rounds: with --pods, a replay (a diagnostic of the pods' cost without the
kernel's and the machine's noise: the dump captured into memory once, then decoded and tallied
from there, --replays times without and with the pods' addresses in alternate order, CPU time
of each), and, where valgrind is installed, the dump's first --instructions entries replayed
once under cachegrind without and with them (instructions, which the machine's load does not
change); pyroute2's `Conntrack().dump_entries()` over the first --subset entries.

Needs root (netns, nft, the global sysctl). Run it with `make bench-table`, or:

    .venv/bin/python bench/table_scan.py --entries 1000000 --subset 100000 --rounds 3

It prints a table; it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__:  # python -m bench.table_scan
    from bench import common
else:  # python bench/table_scan.py, and the children it starts the same way
    import common

CONNTRACK_MAX = Path("/proc/sys/net/netfilter/nf_conntrack_max")
BUCKETS = Path("/proc/sys/net/netfilter/nf_conntrack_buckets")
# Room above --entries for the entries of other namespaces' tests, which share the limit.
MAX_MARGIN = 65536
# Parallel processes filling the table: one per CPU, each ~100k flows a second.
FILL_WORKERS = max(1, min(4, os.cpu_count() or 1))
# Flow mix of the fill, as fractions of --entries; the rest is IPv4 UDP.
TCP_SHARE = 0.05
UDP6_SHARE = 0.02
# NAT flows, so that the tallies' NAT branches run (the namespace's nat chains, see Namespace):
# pod -> Service flows DNATed to a backend pod (DST_NAT: a pod's inbound), and egress flows
# masqueraded to the node's address (SRC_NAT: the SNAT pools, a pod's pool ports).
DNAT_SHARE = 0.05
SNAT_SHARE = 0.05
NAT_CLIENTS = 8  # the first NAT_CLIENTS of the UDP sources send the NAT flows
SERVICES = 10  # Service VIPs 127.4.0.v, each DNATed to its backend pod 127.200.0.v
SERVICE_NET, BACKEND_NET = "127.4.0", "127.200.0"
EGRESS = ("127.5.0.1", "127.5.0.2", "127.5.0.3", "127.5.0.4")  # outside, port 443
EGRESS_PORT = 443
NODE_ADDRESS = "127.250.0.1"  # what egress flows are masqueraded to
SNAT_FIRST_PORT = 10000  # egress sockets bind their own source ports, below the ephemeral range
# IPv4 UDP flows come from this many source addresses, the k-th (from 1) sending to the first
# 1/k-proportional share of one destination list: a few destinations receive flows from every
# source, most from one, so the destination tally holds many distinct keys with a skew.
UDP_SOURCES = 32
DESTINATION_PORTS = (53, 80, 123, 443, 8080)
TCP_NET = "127.3"  # destinations of the TCP SYNs, dropped on input so entries stay SYN_SENT
TCP_PORT = 443
SCAN_TIMEOUT = 900.0  # the reader's deadline for one whole dump, in seconds
PROFILE_ROWS = 15
UNPRUNED_CAPACITY = 1 << 30  # address tallies that never reach their capacity
PODS = 110  # the kubelet's default maxPods
TARGET_POD_RATIO = 1.10  # issue 13: the per-pod tally adds at most 10 % to a full scan

# --- the namespace and the global limit -----------------------------------------------------------


class Namespace(common.Namespace):
    """The table's namespace; with `nat`, the nat chains the fill's NAT flows need (this
    script's table; bench/load.py's has no NAT flows)."""

    def __init__(self, nat: bool = False) -> None:
        # The input chain drops the TCP SYNs after conntrack has confirmed their entries on
        # output, so they stay SYN_SENT, and no RST comes back to close them.
        drop_syns = (
            "chain in { type filter hook input priority 0; "
            f"ip daddr {TCP_NET}.0.0/16 tcp dport {TCP_PORT} drop; }}"
        )
        # Keep every entry for the whole run (UDP unreplied: 30 s by default; SYN_SENT 120 s,
        # and no more than the max_retrans timeout, 300 s: the kernel gives an entry that has
        # seen no window yet, as one with only a SYN, the lesser of the two; without it the
        # SYN_SENT entries left 5 min after the fill, in the middle of a slow run's rounds.
        # conntrack -L's third column shows 299 without, 7199 with).
        timeouts = (
            "nf_conntrack_udp_timeout",
            "nf_conntrack_udp_timeout_stream",
            "nf_conntrack_tcp_timeout_syn_sent",
            "nf_conntrack_tcp_timeout_max_retrans",
        )
        # Pod -> Service flows DNATed to their backend pod (on output: locally generated),
        # egress flows masqueraded to the node's address (on postrouting).
        backends = ", ".join(
            f"{SERVICE_NET}.{v} : {BACKEND_NET}.{v}" for v in range(1, SERVICES + 1)
        )
        dnat = (
            "chain services { type nat hook output priority -100; "
            f"ip daddr {SERVICE_NET}.0/24 dnat ip to ip daddr map {{ {backends} }}; }}"
        )
        snat = (
            "chain egress { type nat hook postrouting priority 100; "
            f"ip daddr {{ {', '.join(EGRESS)} }} snat ip to {NODE_ADDRESS}; }}"
        )
        chains = (drop_syns, dnat, snat) if nat else (drop_syns,)
        super().__init__("ctx-tscan", timeouts, 7200, chains=chains)


class RaisedConntrackMax:
    """Raises the global nf_conntrack_max for the duration of a `with` block, then restores it.

    The limit must stay raised while the table is measured, not only while it is filled: when
    a namespace holds more than 95 % of nf_conntrack_max entries, the conntrack GC worker
    early-drops its unassured entries (all of ours), and the table would shrink under the scans.
    """

    def __init__(self, wanted: int) -> None:
        self.wanted = wanted
        self.old: int | None = None
        self.set_to: int | None = None

    def __enter__(self) -> RaisedConntrackMax:
        self.old = int(CONNTRACK_MAX.read_text())
        if self.old < self.wanted:
            self.set_to = self.wanted  # first: a signal right after the write still restores
            CONNTRACK_MAX.write_text(str(self.wanted))
            common.log(
                f"nf_conntrack_max {self.old} -> {self.wanted} (global; restored at the end)"
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def restore(self) -> None:
        if self.set_to is None:
            return
        current = int(CONNTRACK_MAX.read_text())
        if current == self.set_to:
            CONNTRACK_MAX.write_text(str(self.old))
            common.log(f"nf_conntrack_max restored to {self.old}")
        else:
            # Someone else changed the shared limit since: theirs to restore, not ours to clobber.
            common.log(
                f"nf_conntrack_max is {current}, not the {self.set_to} set here: left alone "
                f"(it was {self.old} before this run)"
            )
        self.set_to = None


def fill_plan(entries: int, nat: bool = False) -> dict[str, object]:
    tcp = int(entries * TCP_SHARE)
    udp6 = min(int(entries * UDP6_SHARE), 60000)
    dnat = int(entries * DNAT_SHARE) if nat else 0
    snat = int(entries * SNAT_SHARE) // len(EGRESS) * len(EGRESS) if nat else 0
    udp4 = entries - tcp - udp6 - dnat - snat
    weights = [1 / (k + 1) for k in range(UDP_SOURCES)]
    total = sum(weights)
    per_source = [int(udp4 * w / total) for w in weights]
    per_source[0] += udp4 - sum(per_source)
    return {"udp4": per_source, "tcp": tcp, "udp6": udp6, "dnat": dnat, "snat": snat}


def fill(ns: Namespace, entries: int, nat: bool = False) -> float:
    """Fill the table; with `nat` (in a Namespace(nat=True)), DNAT_SHARE and SNAT_SHARE of the
    entries are NAT flows."""
    plan = json.dumps(fill_plan(entries, nat))
    started = time.perf_counter()
    workers = [
        subprocess.Popen(
            ns.argv(
                [
                    sys.executable,
                    __file__,
                    "--role",
                    "fill",
                    "--plan",
                    plan,
                    "--worker",
                    f"{w}/{FILL_WORKERS}",
                ]
            ),
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for w in range(FILL_WORKERS)
    ]
    try:
        for worker in workers:
            _, err = worker.communicate()
            if worker.returncode:
                raise RuntimeError(f"fill worker failed ({worker.returncode}): {err[-2000:]}")
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    return time.perf_counter() - started


# --- the fill role --------------------------------------------------------------------------------


def fill_main(plan: dict, worker: str) -> None:
    import socket

    me, workers = (int(x) for x in worker.split("/"))
    ports = DESTINATION_PORTS
    nports = len(ports)
    # IPv4 UDP: source k sends to destinations me, me + workers, ... below its share. One
    # socket per (worker, source): the same source address, a different source port.
    for k, count in enumerate(plan["udp4"]):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((f"127.100.{k // 250}.{k % 250 + 1}", 0))
        sendto = s.sendto
        for d in range(me, count, workers):
            a = d // nports
            address = f"127.{1 + a // 62500}.{a // 250 % 250}.{a % 250 + 1}"
            sendto(b"x", (address, ports[d % nports]))
        s.close()
    # IPv6 UDP: [::1] to [::1]:port.
    if plan["udp6"]:
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.bind(("::1", 0))
        for d in range(me, plan["udp6"], workers):
            s.sendto(b"x", ("::1", 1024 + d))
        s.close()
    # TCP: a SYN each (dropped on input: the entry stays SYN_SENT), socket closed at once.
    for d in range(me, plan["tcp"], workers):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex((f"{TCP_NET}.{d // 250 % 250}.{d % 250 + 1}", TCP_PORT))
        s.close()
    clients = [f"127.100.0.{k + 1}" for k in range(NAT_CLIENTS)]
    # DNAT: client k to Service v's VIP, on a port of its own per flow; the nat chain sends it
    # to backend v, keeping the port, so that every reply tuple is distinct as well.
    if plan.get("dnat"):
        sockets = []
        for client in clients:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((client, 0))
            sockets.append(s)
        pairs = NAT_CLIENTS * SERVICES
        for d in range(me, plan["dnat"], workers):
            pair = d % pairs
            vip = f"{SERVICE_NET}.{pair % SERVICES + 1}"
            sockets[pair // SERVICES].sendto(b"x", (vip, 1024 + d // pairs))
        for s in sockets:
            s.close()
    # SNAT: egress to the few EGRESS addresses' port 443, masqueraded to NODE_ADDRESS: few
    # pools with many ports each, as a node's egress has. A socket per (client, source port
    # below the ephemeral range) sends to each of them.
    for i in range(me, plan.get("snat", 0) // len(EGRESS), workers):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((clients[i % NAT_CLIENTS], SNAT_FIRST_PORT + i // NAT_CLIENTS))
        for address in EGRESS:
            s.sendto(b"x", (address, EGRESS_PORT))
        s.close()


# --- the measured roles ---------------------------------------------------------------------------


def _cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def pod_addresses(pods: int) -> dict[int, int]:
    """TableTally's pod_of for `pods` pods (address key -> pod number), as the pods collector
    would learn it (pod_addresses.index_addresses), each pod with an IPv4 and an IPv6 address.

    The pods' IPv4 addresses are, in order: the UDP_SOURCES sources of the fill; 127.0.0.1, the
    TCP SYNs' source, in the pod that has ::1, the IPv6 flows' source (loopback stands in for
    a pod's address here: the collector leaves it out of a real pod's); the DNAT backends;
    then 10.244.0.0/16 addresses that match nothing. Every other IPv6 address matches nothing
    (fd00:10:244::/64). So every entry of the fill has a pod as its original source.
    """
    import ipaddress

    v4 = [f"127.100.{k // 250}.{k % 250 + 1}" for k in range(UDP_SOURCES)]
    loopback_pod = len(v4)
    v4.append("127.0.0.1")
    v4 += [f"{BACKEND_NET}.{v}" for v in range(1, SERVICES + 1)]
    v4 += [f"10.244.{i // 250}.{i % 250 + 1}" for i in range(max(0, pods - len(v4)))]
    pod_of = {}
    for pod in range(pods):
        v6 = "::1" if pod == loopback_pod else f"fd00:10:244::{pod + 1:x}"
        pod_of[int(ipaddress.IPv4Address(v4[pod])) << 1] = pod
        pod_of[int(ipaddress.IPv6Address(v6)) << 1 | 1] = pod
    return pod_of


def scan_main(budget: int, profile: bool, capacity: int, pods: int = 0) -> dict:
    """One dump into a TableTally, measured from inside this process; with `pods`, that many
    pods' addresses known (pod_addresses())."""
    import inspect

    sys.path.insert(0, str(common.REPO))
    from conntrack_exporter.netlink.ctnetlink import ConntrackTableReader
    from conntrack_exporter.netlink.cttable import TableTally

    reader = ConntrackTableReader(SCAN_TIMEOUT)
    # The budget is TableTally(stop_after=) since 092c234, dump(tally, max_entries) before it:
    # both, so that older commits can be staged and compared with this script.
    # capacity 0: TableTally's default address capacity.
    kwargs: dict = {"address_capacity": capacity} if capacity else {}
    if pods:
        if "pod_of" not in inspect.signature(TableTally).parameters:
            raise SystemExit("this TableTally takes no pods' addresses (before issue 13)")
        kwargs.update(pod_of=pod_addresses(pods), pods=pods)
    if "stop_after" in inspect.signature(TableTally).parameters:
        tally = TableTally(stop_after=budget, **kwargs)
        dump_args: tuple = (tally,)
    else:
        tally = TableTally(**kwargs)
        dump_args = (tally, budget)
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
    with common.Measured() as measured:
        if profiler is not None:
            profiler.enable()
        result = reader.dump(*dump_args)
        tally.finish()
        if profiler is not None:
            profiler.disable()
    reader.close()
    out = {
        "entries": tally.entries,
        "complete": result.complete,
        "interrupted": result.interrupted,
        **measured.result(),
        "tally": {
            "kinds": len(tally.kinds),
            "statuses": len(tally.statuses),
            "sources": len(tally.sources),
            "destinations": len(tally.destinations),
            "nat_pools": len(tally.nat_pools),
        },
        "pruned": tally.pruned,
        # The entries by the status bits we report (src_nat, dst_nat, ...), as label lists.
        "statuses": {str(bits): count for bits, count in tally.statuses.items()},
    }
    if pods:
        out["pods"] = {
            "pods": pods,
            "addresses": len(kwargs["pod_of"]),
            "outbound": sum(tally.pod_outbound),
            "inbound": sum(tally.pod_inbound),
            "pods_outbound": sum(1 for n in tally.pod_outbound if n),
            "pods_inbound": sum(1 for n in tally.pod_inbound if n),
            "nat_pool_ports": sum(tally.pod_nat_pools.values()),
            "nat_pool_keys": len(tally.pod_nat_pools),
        }
    if profiler is not None:
        import pstats

        stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
        rows = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)
        out["profile"] = [
            {
                "function": pstats.func_std_string(func).replace(str(common.REPO) + "/", ""),
                "ncalls": nc,
                "tottime": tt,
                "cumtime": ct,
            }
            for func, (_cc, nc, tt, ct, _callers) in rows[:PROFILE_ROWS]
        ]
        out["profile_total"] = sum(row[2] for row in stats.values())
    return out


def recv_only_main(keep: list[bytes] | None = None) -> dict:
    """The same dump request, every datagram received into one buffer and dropped (or, given
    `keep`, a copy of each appended to it)."""
    import socket
    import struct

    sys.path.insert(0, str(common.REPO))
    from conntrack_exporter.netlink.core import NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR
    from conntrack_exporter.netlink.ctnetlink import CT_GET, nfgen_request

    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)  # NETLINK_NETFILTER
    sock.bind((0, 0))
    buf = bytearray(64 * 1024)
    header = struct.Struct("=IHHII")
    payload = nfgen_request()
    request = header.pack(header.size + len(payload), CT_GET, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
    user0, sys0 = _cpu()
    started = time.perf_counter()
    sock.send(request + payload)
    datagrams = received = 0
    recv_into = sock.recv_into
    while True:
        n = recv_into(buf)
        datagrams += 1
        received += n
        if keep is not None:
            keep.append(bytes(buf[:n]))
        # ctnetlink ends a dump with NLMSG_DONE alone in the last datagram (its dump callback
        # returns 0 only once an skb stays empty): only short datagrams need a look.
        if n <= 64:
            msg_type = header.unpack_from(buf, 0)[1]
            if msg_type == NLMSG_DONE:
                break
            if msg_type == NLMSG_ERROR:
                raise OSError(f"netlink error {struct.unpack_from('=i', buf, 16)[0]}")
    wall = time.perf_counter() - started
    user1, sys1 = _cpu()
    sock.close()
    return {
        "wall": wall,
        "user": user1 - user0,
        "sys": sys1 - sys0,
        "datagrams": datagrams,
        "bytes": received,
    }


def _replay(datagrams: list[bytes], kwargs: dict):
    """A TableTally(**kwargs) fed every entry of the captured datagrams, as the socket's
    receive loop feeds it, and finished."""
    from conntrack_exporter.netlink.core import NLMSG_MIN_TYPE, iter_messages
    from conntrack_exporter.netlink.cttable import TableTally

    tally = TableTally(**kwargs)
    add = tally.add_message
    for data in datagrams:
        view = memoryview(data)
        for msg in iter_messages(view, len(data)):
            if msg[0] >= NLMSG_MIN_TYPE:
                add(view, msg)
    tally.finish()
    return tally


def replay_main(pods: int, replays: int, dump: str | None, limit: int) -> dict:
    """The dump captured once, then decoded and tallied from memory `replays` times without
    and `replays` times with `pods` pods' addresses, in turn (which goes first alternates):
    the user-space half of a scan, as the socket's receive loop runs it, with neither the
    kernel's time nor another process's start-up in the figure. CPU time of this thread.
    With `dump`, the datagrams that hold the first `limit` entries are saved there, for the
    instruction counts (count_main)."""
    sys.path.insert(0, str(common.REPO))
    datagrams: list[bytes] = []
    recv_only_main(datagrams)
    if dump:
        _save(datagrams, dump, limit)
    with_pods = {"pod_of": pod_addresses(pods), "pods": pods}

    def replay(kwargs: dict) -> float:
        started = time.thread_time()
        tally = _replay(datagrams, kwargs)
        spent = time.thread_time() - started
        entries.add(tally.entries)
        return spent

    entries: set[int] = set()
    without, with_ = [], []
    replay({})  # a warm-up: the first pass pays for the allocator's arenas
    for i in range(replays):
        if i % 2:
            with_.append(replay(with_pods))
            without.append(replay({}))
        else:
            without.append(replay({}))
            with_.append(replay(with_pods))
    return {
        "entries": sorted(entries),
        "datagrams": len(datagrams),
        "without": without,
        "with": with_,
    }


_LENGTH = struct.Struct("=I")


def _save(datagrams: list[bytes], path: str, limit: int) -> None:
    """The datagrams holding the first `limit` entries (each message but the last datagram's
    NLMSG_DONE is one), each after its length."""
    from conntrack_exporter.netlink.core import NLMSG_MIN_TYPE, iter_messages

    entries = 0
    with open(path, "wb") as f:
        for data in datagrams:
            f.write(_LENGTH.pack(len(data)) + data)
            entries += sum(1 for msg in iter_messages(data, len(data)) if msg[0] >= NLMSG_MIN_TYPE)
            if entries >= limit:
                break


def _load(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        data = f.read()
    datagrams, offset = [], 0
    while offset < len(data):
        (length,) = _LENGTH.unpack_from(data, offset)
        datagrams.append(data[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return datagrams


def count_main(dump: str, mode: str, pods: int) -> dict:
    """One replay of a saved dump, for cachegrind to count its instructions: `none` loads the
    dump and builds the pods' addresses only (what the other two also do), `without` and
    `with` replay it into a TableTally without and with them."""
    sys.path.insert(0, str(common.REPO))
    datagrams = _load(dump)
    pod_of = pod_addresses(pods)
    if mode == "none":
        return {"mode": mode}
    tally = _replay(datagrams, {"pod_of": pod_of, "pods": pods} if mode == "with" else {})
    return {"mode": mode, "entries": tally.entries}


def pyroute2_main(subset: int) -> dict:
    """pyroute2's high-level dump, stopped after `subset` entries."""
    from pyroute2 import Conntrack

    ct = Conntrack()
    user0, sys0 = _cpu()
    started = time.perf_counter()
    n = 0
    for _entry in ct.dump_entries():
        n += 1
        if n >= subset:
            break
    wall = time.perf_counter() - started
    user1, sys1 = _cpu()
    import pyroute2

    return {
        "entries": n,
        "wall": wall,
        "user": user1 - user0,
        "sys": sys1 - sys0,
        "version": getattr(pyroute2, "__version__", "?"),
    }


# --- the parent: running the roles ----------------------------------------------------------------


def count_instructions(dump: str, pods: int) -> dict:
    """cachegrind's count of the instructions (I refs) count_main runs in each mode, the three
    at once: a figure that does not depend on what else the machine is doing. The hash seed
    is fixed, so that the dicts' layouts are too."""
    version = common.run(["valgrind", "--version"]).stdout.strip()
    cachegrind = [
        "valgrind",
        "--tool=cachegrind",
        "--cache-sim=no",
        "--cachegrind-out-file=/dev/null",
    ]
    child = [sys.executable, __file__, "--role", "count", "--dump", dump, "--pods", str(pods)]
    procs = {
        mode: subprocess.Popen(
            [*cachegrind, *child, "--mode", mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=common.REPO,
            env={**os.environ, "PYTHONHASHSEED": "0"},
            start_new_session=True,
        )
        for mode in ("none", "without", "with")
    }
    out: dict = {"valgrind": version}
    try:
        for mode, proc in procs.items():
            stdout, stderr = proc.communicate()
            found = re.search(r"I\s+refs:\s+([\d,]+)", stderr)
            if proc.returncode or found is None:
                raise RuntimeError(
                    f"cachegrind of {mode} failed ({proc.returncode}): {stderr[-2000:]}"
                )
            out[mode] = {**json.loads(stdout), "instructions": int(found[1].replace(",", ""))}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return out


def run_role(ns: Namespace, role: list[str]) -> dict:
    # process_wall: the whole child, `ip netns exec` and Python's start-up and imports included.
    return common.run_json(ns.argv([sys.executable, __file__, "--role", *role]))


def conntrack_list(ns: Namespace) -> dict:
    # `ip netns exec` execs conntrack in place, so wait4 returns conntrack's own rusage.
    usage = common.command_usage(ns.argv(["conntrack", "-L"]))
    shown = next((int(w) for w in usage.pop("stderr").split() if w.isdigit()), -1)
    return {**usage, "entries": shown}


# --- reporting ------------------------------------------------------------------------------------


def _med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _cpu_total(r: dict) -> float:
    return r["user"] + r["sys"]


def report(args: argparse.Namespace, info: dict, runs: dict[str, list[dict]], py: dict) -> None:
    full, ct, sampled, recv = runs["full"], runs["conntrack"], runs["sampled"], runs["recv-only"]
    unpruned = runs["unpruned"]
    entries = info["entries"]
    lines = [
        "",
        f"{common.machine()}, {info['conntrack_version']}, pyroute2 {py['version']}",
        f"netns with {entries} conntrack entries (asked {args.entries}; filled in "
        f"{info['fill_seconds']:.1f} s by {FILL_WORKERS} processes), nf_conntrack_buckets "
        f"{info['buckets']}, {args.rounds} rounds in rotating order",
        "",
        f"{'':34}{'wall':>10}{'user':>9}{'sys':>9}{'CPU':>9}{'entries':>10}",
    ]

    def row(label: str, rs: list[dict]) -> str:
        return (
            f"{label:34}{_med(rs, 'wall'):>9.2f}s{_med(rs, 'user'):>8.2f}s"
            f"{_med(rs, 'sys'):>8.2f}s{statistics.median(_cpu_total(r) for r in rs):>8.2f}s"
            f"{int(statistics.median(r.get('entries', entries) for r in rs)):>10}"
        )

    lines += [
        row("ours, full scan (no budget)", full),
        row("conntrack -L > /dev/null", ct),
        row(f"ours, sampled (budget {args.budget})", sampled),
        row("recv-only floor (no decoding)", recv),
        row("diagnostic: ours, full, no pruning", unpruned),
        *([row(f"ours, full, {args.pods} pods' addresses", runs["pods"])] if args.pods else []),
        row(f"pyroute2 dump_entries(), first {py['entries']}", [py]),
        "",
    ]
    f_wall, c_wall, s_wall = _med(full, "wall"), _med(ct, "wall"), _med(sampled, "wall")
    f_cpu = statistics.median(map(_cpu_total, full))
    c_cpu = statistics.median(map(_cpu_total, ct))
    per100k_ours = f_wall / entries * 100_000
    per100k_py = py["wall"] / py["entries"] * 100_000
    growth = [r["growth_kib"] for r in full]
    s_growth = [r["growth_kib"] for r in sampled]
    lines += [
        f"full / conntrack -L, wall: {f_wall / c_wall:.2f} (per round "
        + " ".join(f"{f['wall'] / c['wall']:.2f}" for f, c in zip(full, ct, strict=True))
        + f"); CPU: {f_cpu / c_cpu:.2f}"
        "   [target <= 1.2]",
        f"  ours as a whole process (ip netns exec, Python start-up, imports, scan): "
        f"{_med(full, 'process_wall'):.2f} s, "
        f"{_med(full, 'process_wall') / c_wall:.2f} x conntrack -L",
        f"sampled / full, wall: {s_wall / f_wall:.2f} (sampled read {sampled[0]['entries']} of "
        f"{entries} = {sampled[0]['entries'] / entries:.2f} of the table)   [target <= 0.3]",
        f"peak RSS growth during the full scan (VmHWM after - VmRSS before): "
        f"{max(growth) / 1024:.1f} MiB max, rounds "
        + " ".join(f"{g / 1024:.1f}" for g in growth)
        + f" MiB (RSS before {full[0]['rss_before_kib'] / 1024:.1f} MiB); sampled "
        f"{max(s_growth) / 1024:.1f} MiB   [target <= 10 MB]",
        f"per 100k entries: ours {per100k_ours:.3f} s, pyroute2 {per100k_py:.2f} s: pyroute2 "
        f"takes {per100k_py / per100k_ours:.0f}x as long",
        "",
        "the kernel's share (sys time, median): "
        f"ours {_med(full, 'sys'):.2f} s of {statistics.median(map(_cpu_total, full)):.2f} s CPU, "
        f"conntrack -L {_med(ct, 'sys'):.2f} s of {statistics.median(map(_cpu_total, ct)):.2f} s, "
        f"recv-only {_med(recv, 'sys'):.2f} s of {statistics.median(map(_cpu_total, recv)):.2f} s "
        f"({recv[0]['datagrams']} datagrams, {recv[0]['bytes'] / 2**20:.0f} MiB)",
        f"  our user time above the recv-only floor: "
        f"{_med(full, 'user') - _med(recv, 'user'):.2f} s "
        f"({(_med(full, 'user') - _med(recv, 'user')) / entries * 1e6:.2f} us per entry)",
        f"pruning the address tallies (full - no pruning): "
        f"{f_wall - _med(unpruned, 'wall'):.2f} s wall, "
        f"{_med(full, 'user') - _med(unpruned, 'user'):.2f} s user; unpruned the tallies hold "
        f"{unpruned[0]['tally']['destinations']} destinations, RSS growth "
        f"{unpruned[0]['growth_kib'] / 1024:.1f} MiB",
        f"tally after a full scan: {full[0]['tally']}, pruned {full[0]['pruned']}; "
        f"complete={full[0]['complete']}, interrupted={full[0]['interrupted']}",
        f"table size before/after the rounds: {info['count_before']} / {info['count_after']}",
        *(pod_lines(args, full, runs["pods"], entries) if args.pods else []),
        *(replay_lines(info["replay"]) if info.get("replay", {}).get("without") else []),
        *(instruction_lines(info["instructions"], full) if "instructions" in info else []),
        "",
        "per round, wall seconds: "
        + "; ".join(
            f"{name} " + " ".join(f"{r['wall']:.2f}" for r in rs) for name, rs in runs.items()
        ),
    ]
    for key, what in (("profile", "one full scan"), ("profile_pods", "one with pods")):
        if key in info:
            lines += profile_lines(info[key], what)
    print("\n".join(lines))


def profile_lines(prof: dict, what: str) -> list[str]:
    return [
        "",
        f"cProfile of {what} (wall {prof['wall']:.2f} s under the profiler, "
        f"{prof['profile_total']:.2f} s tottime in all; top {PROFILE_ROWS} by tottime):",
        f"{'tottime':>9}{'cumtime':>9}{'ncalls':>10}  function",
        *(
            f"{r['tottime']:>8.2f}s{r['cumtime']:>8.2f}s{r['ncalls']:>10}  {r['function']}"
            for r in prof["profile"]
        ),
    ]


def _status_count(r: dict, bit: int) -> int:
    return sum(count for bits, count in r["statuses"].items() if int(bits) & bit)


def pod_lines(args: argparse.Namespace, full: list[dict], pods: list[dict], entries: int) -> list:
    """The per-pod tally's cost (with pods / without, per round and of the medians) and what
    it attributed."""

    def ratios(key) -> tuple[float, str]:
        per_round = " ".join(f"{key(p) / key(f):.3f}" for f, p in zip(full, pods, strict=True))
        median = statistics.median(map(key, pods)) / statistics.median(map(key, full))
        return median, per_round

    wall, wall_rounds = ratios(lambda r: r["wall"])
    cpu, cpu_rounds = ratios(_cpu_total)
    user, user_rounds = ratios(lambda r: r["user"])
    attributed = pods[0]["pods"]
    dnat, snat = _status_count(pods[0], 32), _status_count(pods[0], 16)  # IPS_DST/SRC_NAT
    return [
        "",
        f"full with {args.pods} pods' addresses ({attributed['addresses']} address keys) / "
        f"without, CPU: {cpu:.3f} (per round {cpu_rounds}); wall: {wall:.3f} (per round "
        f"{wall_rounds})   [target <= {TARGET_POD_RATIO:g}: "
        f"{'met' if cpu <= TARGET_POD_RATIO and wall <= TARGET_POD_RATIO else 'NOT met'}]",
        f"  user time alone (the tally is all user time): {user:.3f} (per round {user_rounds}); "
        f"added {statistics.median(r['user'] for r in pods) - _med(full, 'user'):+.2f} s, "
        f"{(statistics.median(r['user'] for r in pods) - _med(full, 'user')) / entries * 1e6:+.3f}"
        " us per entry",
        f"  attributed: outbound {attributed['outbound']} of {pods[0]['entries']} entries "
        f"({attributed['outbound'] / pods[0]['entries']:.1%}) to {attributed['pods_outbound']} "
        f"pods; inbound (DST_NAT to a pod) {attributed['inbound']} to "
        f"{attributed['pods_inbound']} pods; pods' SNAT pool ports {attributed['nat_pool_ports']} "
        f"under {attributed['nat_pool_keys']} (pod, pool) keys",
        f"  the table's NAT entries: {dnat} with DST_NAT, {snat} with SRC_NAT "
        f"(fill: {'NAT flows' if args.nat else '--no-nat'})",
    ]


def instruction_lines(counts: dict, full: list[dict]) -> list[str]:
    """The pods' cost in instructions, and what it comes to against a whole scan's CPU."""
    base = counts["none"]["instructions"]  # start-up, loading the dump, the pods' addresses
    without = counts["without"]["instructions"] - base
    with_ = counts["with"]["instructions"] - base
    n = counts["without"]["entries"]
    ratio = with_ / without
    # The pods change only user-space work; the kernel's dump (sys time) stays the same.
    user_share = _med(full, "user") / statistics.median(map(_cpu_total, full))
    whole = 1 + (ratio - 1) * user_share
    return [
        f"instructions (cachegrind, user space, {counts['valgrind']}; the dump's first {n} "
        f"entries replayed once, start-up and loading ({base / 1e6:.0f} M) taken off): without "
        f"pods {without / n:,.0f} per entry, with {with_ / n:,.0f}: "
        f"{(with_ - without) / n:+,.0f} per entry, {ratio:.3f}x",
        f"  against a full scan's CPU, of which user time is {user_share:.0%} here (the "
        f"kernel's dump the rest, which the pods do not change): {whole:.3f}x   "
        f"[target <= {TARGET_POD_RATIO:g}: {'met' if whole <= TARGET_POD_RATIO else 'NOT met'}]",
    ]


def replay_lines(replay: dict) -> list[str]:
    """The pods' cost in the replay from memory: user-space decoding and tallying only."""
    without, with_ = replay["without"], replay["with"]
    pairs = [w / o for o, w in zip(without, with_, strict=True)]
    added = statistics.median(with_) - statistics.median(without)
    entries = replay["entries"][0]
    return [
        f"replay of the dump from memory ({replay['datagrams']} datagrams, {entries} entries; "
        f"CPU time, {len(without)} of each in alternate order): without pods "
        f"{statistics.median(without):.2f} s (" + " ".join(f"{t:.2f}" for t in without) + "), "
        f"with {statistics.median(with_):.2f} s (" + " ".join(f"{t:.2f}" for t in with_) + ")",
        f"  with / without: {statistics.median(with_) / statistics.median(without):.3f} of the "
        f"medians, {statistics.median(pairs):.3f} the pairs' median (pairs "
        + " ".join(f"{r:.3f}" for r in pairs)
        + f"); added {added:+.3f} s, {added / entries * 1e6:+.3f} us per entry",
    ]


# --- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000, help="table size (1000000)")
    parser.add_argument(
        "--subset", type=int, default=100_000, help="entries pyroute2 reads (100000)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the timed scans (3)")
    parser.add_argument(
        "--budget", type=int, default=250_000, help="entries of the sampled scan (250000)"
    )
    parser.add_argument(
        "--pods",
        type=int,
        help=f"pods whose addresses the 'pods' scan knows; 0: no such scan ({PODS})",
    )
    parser.add_argument(
        "--replays",
        type=int,
        default=5,
        help="with --pods: in-memory replays of the dump without and with pods, each (5)",
    )
    parser.add_argument(
        "--instructions",
        type=int,
        default=100_000,
        help="with --pods: the first N entries replayed under cachegrind without and with "
        "pods, instructions counted (needs valgrind; 0: not) (100000)",
    )
    parser.add_argument(
        "--no-nat",
        dest="nat",
        action="store_false",
        help="fill no NAT flows (the table before issue 13's bench: no DNAT, no SNAT entries)",
    )
    parser.add_argument(
        "--profile",
        choices=["auto", "always", "never"],
        default="auto",
        help="cProfile one full scan: when it misses 1.2x conntrack -L (auto), always, never; "
        f"and one with pods when it costs more than {TARGET_POD_RATIO:g}x the full scan",
    )
    parser.add_argument(
        "--role",
        choices=["fill", "scan", "recv-only", "replay", "count", "pyroute2"],
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--cprofile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dump", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["none", "without", "with"], help=argparse.SUPPRESS)
    parser.add_argument("--capacity", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pods is None:  # the parent's default; a child scan knows no pods unless told
        args.pods = 0 if args.role else PODS
    return args


def child_main(args: argparse.Namespace) -> int:
    if args.role == "fill":
        fill_main(json.loads(args.plan), args.worker)
        return 0
    if args.role == "scan":
        out = scan_main(args.budget, args.cprofile, args.capacity, args.pods)
    elif args.role == "replay":
        out = replay_main(args.pods, args.replays, args.dump, args.instructions)
    elif args.role == "count":
        out = count_main(args.dump, args.mode, args.pods)
    elif args.role == "recv-only":
        out = recv_only_main()
    else:
        out = pyroute2_main(args.subset)
    sys.stdout.write(json.dumps(out))
    sys.stdout.flush()
    # pyroute2 would otherwise tidy up an abandoned dump at exit; nothing here needs it.
    os._exit(0)


def measure(ns: Namespace, args: argparse.Namespace, info: dict) -> tuple[dict, dict]:
    jobs = {
        "full": lambda: run_role(ns, ["scan", "--budget", "0"]),
        # The same with --pods pods' addresses known: the per-pod tally's cost.
        "pods": lambda: run_role(ns, ["scan", "--budget", "0", "--pods", str(args.pods)]),
        # A diagnostic, no target: the same scan with address tallies too large to be pruned,
        # so that full minus this is what bounding their memory costs on this table.
        "unpruned": lambda: run_role(
            ns, ["scan", "--budget", "0", "--capacity", str(UNPRUNED_CAPACITY)]
        ),
        "conntrack": lambda: conntrack_list(ns),
        "sampled": lambda: run_role(ns, ["scan", "--budget", str(args.budget)]),
        "recv-only": lambda: run_role(ns, ["recv-only"]),
    }
    if not args.pods:
        del jobs["pods"]
    names = list(jobs)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    info["count_before"] = ns.count()
    for i in range(args.rounds):
        for name in common.rotated(names, i):
            runs[name].append(jobs[name]())
        common.log(
            f"round {i + 1}/{args.rounds}: "
            + ", ".join(f"{n} {runs[n][-1]['wall']:.2f} s" for n in names)
        )
    info["count_after"] = ns.count()
    dump = None
    if args.pods and args.instructions:
        if shutil.which("valgrind"):
            fd, dump = tempfile.mkstemp(prefix="cte-tscan-", suffix=".dump")
            os.close(fd)
        else:
            common.log("no valgrind: no instruction counts (apt-get install valgrind)")
    try:
        if args.pods and (args.replays or dump):
            common.log(f"replay: the dump from memory, {args.replays} x without and with pods")
            role = ["replay", "--pods", str(args.pods), "--replays", str(args.replays)]
            if dump:
                role += ["--dump", dump, "--instructions", str(args.instructions)]
            info["replay"] = run_role(ns, role)
        if dump:
            common.log(f"cachegrind: the first {args.instructions} entries, without and with pods")
            info["instructions"] = count_instructions(dump, args.pods)
    finally:
        if dump:
            os.unlink(dump)
    common.log(f"pyroute2: dump_entries() over the first {args.subset} entries")
    py = run_role(ns, ["pyroute2", "--subset", str(args.subset)])
    ratio = _med(runs["full"], "wall") / _med(runs["conntrack"], "wall")
    if args.profile == "always" or (args.profile == "auto" and ratio > 1.2):
        common.log(f"full / conntrack -L = {ratio:.2f}: profiling one full scan")
        info["profile"] = run_role(ns, ["scan", "--budget", "0", "--cprofile"])
    if args.pods:
        pod_ratio = statistics.median(map(_cpu_total, runs["pods"])) / statistics.median(
            map(_cpu_total, runs["full"])
        )
        if args.profile == "always" or (args.profile == "auto" and pod_ratio > TARGET_POD_RATIO):
            common.log(f"with pods / without, CPU = {pod_ratio:.2f}: profiling one with pods")
            info["profile_pods"] = run_role(
                ns, ["scan", "--budget", "0", "--pods", str(args.pods), "--cprofile"]
            )
    return runs, py


def main() -> int:
    args = parse_args()
    if args.role:
        return child_main(args)
    if os.geteuid() != 0:
        sys.exit("table_scan.py needs root: it creates a network namespace and raises a sysctl")

    common.catch_interrupts()
    info: dict = {
        "buckets": int(BUCKETS.read_text()),
        "conntrack_version": common.run(["conntrack", "--version"]).stdout.split("(")[0].strip(),
    }
    try:
        with Namespace(args.nat) as ns, RaisedConntrackMax(args.entries + MAX_MARGIN):
            common.log(f"netns {ns.name}: filling {args.entries} entries")
            info["fill_seconds"] = fill(ns, args.entries, args.nat)
            info["entries"] = ns.count()
            common.log(f"{info['entries']} entries in {info['fill_seconds']:.1f} s")
            if info["entries"] < args.entries * 0.99:
                common.log(f"warning: only {info['entries']} of {args.entries} entries made it")
            runs, py = measure(ns, args, info)
    except KeyboardInterrupt:
        common.log("interrupted; nf_conntrack_max restored and namespace removed")
        return 130
    report(args, info, runs, py)
    return 0


if __name__ == "__main__":
    sys.exit(main())
