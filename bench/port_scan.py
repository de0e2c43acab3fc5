"""Port scan: our socket_ports scan against `ss -tan state established`, in one netns.

A throwaway network namespace (lo up, nothing else: no conntrack) holds --connections TCP
client connections to --listeners listeners (more if the helpers need them) on 127.0.0.1,
ports 8001 and up, outside the ephemeral range: twice as many established sockets, client
halves on ephemeral ports, accepted halves on the listeners' ports. Helper processes hold them,
as many as their RLIMIT_NOFILE hard limit takes. Then, in rounds whose order rotates:

- ours:           the socket_ports collector's own scan (`SocketPortsCollector.scan()`: procfs
                  range, listener dumps, TCP and UDP dumps over both families with the kernel's
                  port-range filter, the tally, the families), in a fresh process in the netns
                  (wall, CPU, peak RSS growth measured inside that process);
- ours, no filter: the same scan with the reader's kernel filter off, so that every socket
                  crosses into userspace and is decoded (the tally drops the accepted halves);
- ss:             `ss -tan state established > /dev/null` (wall; CPU is the child's own from
                  wait4). It asks the kernel for established sockets only, and formats them all.

The kernel filter means our scan reads only the client halves: half of what ss reads here.
"ours, no filter" is the like-for-like comparison of decoding.

Needs root (netns). Run it with `make bench-ports`, or:

    .venv/bin/python bench/port_scan.py --connections 50000 --listeners 4 --rounds 5

It prints a table; it asserts nothing about time. The namespace and the helper are removed in
`finally`, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import select
import statistics
import subprocess
import sys
import time
from functools import partial

if __package__:  # python -m bench.port_scan
    from bench import common
else:  # python bench/port_scan.py, and the children it starts the same way
    import common

FIRST_PORT = 8001  # the listeners' ports: below the default ephemeral range
SCAN_TIMEOUT = 120.0  # the reader's deadline for one dump, in seconds
READY_TIMEOUT = 600.0
FD_MARGIN = 256  # descriptors a helper keeps for Python itself
TARGET = 1.5


class Namespace(common.Namespace):
    """lo up and nothing else: conntrack stays idle (no rule references it), so the helper's
    connections fill no table that other namespaces share."""

    def __init__(self) -> None:
        super().__init__("ctx-pscan", (), 0)

    def _setup(self) -> None:
        common.run(["ip", "-n", self.name, "link", "set", "lo", "up"])


# --- the helpers holding the sockets --------------------------------------------------------------


def plan(connections: int, listeners: int) -> list[dict[int, int]]:
    """{listener port: connections} for each helper process.

    A process may hold as many sockets as its RLIMIT_NOFILE hard limit allows, which root
    cannot raise without CAP_SYS_RESOURCE: as many helpers as that takes, at least one
    listener each, each helper connecting to its own listeners only.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    pairs = (hard - FD_MARGIN) // 2  # a client and its accepted socket
    helpers = -(-connections // pairs)
    listeners = max(listeners, helpers)
    out: list[dict[int, int]] = [{} for _ in range(helpers)]
    for i in range(listeners):
        share = connections // listeners + (i < connections % listeners)
        out[i % helpers][FIRST_PORT + i] = share
    return out


def hold_main(shares: dict[str, int]) -> None:
    import socket

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this process only
    held = []
    for port, count in shares.items():
        server = socket.create_server(("127.0.0.1", int(port)), backlog=4096)
        held.append(server)
        for _ in range(count):
            client = socket.socket()
            client.connect(("127.0.0.1", int(port)))
            held += [client, server.accept()[0]]
    print("ready", flush=True)
    sys.stdin.read()


def start_holder(ns: Namespace, shares: dict[int, int]) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--role", "hold", "--shares", json.dumps(shares)]
    return subprocess.Popen(
        ns.argv(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip


def wait_ready(holders: list[subprocess.Popen]) -> float:
    started = time.perf_counter()
    for holder in holders:
        assert holder.stdout is not None
        readable, _, _ = select.select([holder.stdout], [], [], READY_TIMEOUT)
        line = holder.stdout.readline() if readable else ""
        if line.strip() != "ready":
            holder.kill()
            raise RuntimeError(f"a socket holder did not get ready: {holder.communicate()[1]}")
    return time.perf_counter() - started


# --- the measured roles ---------------------------------------------------------------------------


def scan_main(kernel_filter: bool) -> dict:
    """One socket_ports scan, as the collector's scanner runs it, measured from inside."""
    sys.path.insert(0, str(common.REPO))
    from prometheus_client.exposition import generate_latest

    from conntrack_exporter.collectors.socket_ports import (
        SocketPortsCollector,
        SocketPortsOptions,
    )
    from conntrack_exporter.netlink.inet_diag import SockDiagReader
    from conntrack_exporter.netlink.tally import IPPROTO_TCP
    from conntrack_exporter.procfs import ProcFS
    from conntrack_exporter.registry import (
        CollectorContext,
        CollectorSet,
        ExporterCollector,
        Readers,
    )

    filtered = kernel_filter

    class Kept(SockDiagReader):
        """The real reader, which keeps the scan's tally for the figures printed below, and
        drops the kernel filter when the run measures without it."""

        def dump_ports(self, tally, port_range, ephemeral, kernel_filter=True, bounds=None):
            self.tally = tally
            return super().dump_ports(tally, port_range, ephemeral, filtered, bounds)

    options = SocketPortsOptions()
    reader = Kept(SCAN_TIMEOUT)  # opened up front, as a scanner's second scan finds it
    readers = Readers.netlink(SCAN_TIMEOUT)
    context = CollectorContext(ProcFS(), dataclasses.replace(readers, sock_diag=lambda: reader))
    collector = SocketPortsCollector(options, context)
    with common.Measured() as measured:
        collector.scan()
    exposition = generate_latest(ExporterCollector(CollectorSet([collector]))).decode()
    if 'collector_success{collector="socket_ports"} 1.0' not in exposition:
        errors = [line for line in exposition.splitlines() if "scan_errors_total{" in line]
        raise RuntimeError(f"the scan failed: {errors}")
    tally = reader.tally
    tcp = tally.destinations[IPPROTO_TCP]
    return {
        **measured.result(),
        "sockets": tally.sockets,
        "counted": sum(tcp.values()),
        "destinations": len(tcp),
        "largest": tally.largest(IPPROTO_TCP),
        "complete": "socket_ports_scan_complete 1.0" in exposition,
        "max_sockets": options.max_sockets,
    }


def run_scan(ns: Namespace, kernel_filter: bool) -> dict:
    """A scan in a fresh process; its process_wall adds `ip netns exec`, Python's start-up and
    the imports to the scan."""
    cmd = [sys.executable, __file__, "--role", "scan"]
    return common.run_json(ns.argv(cmd if kernel_filter else [*cmd, "--no-filter"]))


def ss_established(ns: Namespace) -> dict:
    return common.command_usage(ns.argv(["ss", "-tan", "state", "established"]))


# --- reporting ------------------------------------------------------------------------------------


def _med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _cpu(runs: list[dict]) -> float:
    return statistics.median(r["user"] + r["sys"] for r in runs)


def _ratio_line(label: str, ours: list[dict], ss: list[dict], target: bool) -> str:
    per_round = " ".join(f"{o['wall'] / s['wall']:.2f}" for o, s in zip(ours, ss, strict=True))
    return (
        f"{label}: wall {_med(ours, 'wall') / _med(ss, 'wall'):.2f} (per round {per_round}); "
        f"CPU {_cpu(ours) / _cpu(ss):.2f}" + (f"   [target <= {TARGET}]" if target else "")
    )


def report(args: argparse.Namespace, info: dict, runs: dict[str, list[dict]]) -> None:
    ours, raw, ss = runs["ours"], runs["ours, no filter"], runs["ss"]
    lines = [
        "",
        f"{common.machine()}, {info['ss_version']}",
        f"netns with {args.connections} client connections to {len(info['ports'])} listeners "
        f"on 127.0.0.1:{info['ports'][0]}-{info['ports'][-1]}: {info['established']} "
        f"established sockets per ss (held by {info['helpers']} processes, set up in "
        f"{info['setup_seconds']:.1f} s), "
        f"ip_local_port_range {'-'.join(info['port_range'])}; {args.rounds} rounds in "
        "rotating order",
        "",
        f"{'':40}{'wall':>9}{'user':>9}{'sys':>9}{'CPU':>9}{'sockets read':>14}",
    ]

    def row(label: str, rs: list[dict], read: object) -> str:
        return (
            f"{label:40}{_med(rs, 'wall') * 1e3:>7.0f}ms{_med(rs, 'user') * 1e3:>7.0f}ms"
            f"{_med(rs, 'sys') * 1e3:>7.0f}ms{_cpu(rs) * 1e3:>7.0f}ms{read!s:>14}"
        )

    lines += [
        row("ours (kernel port filter)", ours, ours[0]["sockets"]),
        row("ours, no filter (all decoded)", raw, raw[0]["sockets"]),
        row("ss -tan state established >/dev/null", ss, info["established"]),
        "",
        _ratio_line("ours / ss", ours, ss, target=True),
        _ratio_line("ours without the filter / ss", raw, ss, target=False),
        f"  ours as a whole process (ip netns exec, Python start-up, imports, scan): "
        f"{_med(ours, 'process_wall') * 1e3:.0f} ms, "
        f"{_med(ours, 'process_wall') / _med(ss, 'wall'):.2f} x ss",
        f"peak RSS growth during the scan (VmHWM after - VmRSS before, max of the rounds): "
        f"{max(r['growth_kib'] for r in ours)} KiB, without the filter "
        f"{max(r['growth_kib'] for r in raw)} KiB (RSS before "
        f"{ours[0]['rss_before_kib'] / 1024:.1f} MiB)",
        f"our tally: {ours[0]['counted']} TCP sockets counted toward {ours[0]['destinations']} "
        f"destinations, the largest {ours[0]['largest']}; complete={ours[0]['complete']} "
        f"(max_sockets {ours[0]['max_sockets']}); without the filter the same count: "
        f"{raw[0]['counted'] == ours[0]['counted']}",
        "",
        "per round, wall ms: "
        + "; ".join(
            f"{name} " + " ".join(f"{r['wall'] * 1e3:.0f}" for r in rs) for name, rs in runs.items()
        ),
    ]
    print("\n".join(lines))


# --- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--connections", type=int, default=50_000, help="client connections (50000)"
    )
    parser.add_argument("--listeners", type=int, default=4, help="listeners they go to (4)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the timed scans (5)")
    parser.add_argument("--role", choices=["hold", "scan"], help=argparse.SUPPRESS)
    parser.add_argument("--no-filter", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shares", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def measure(ns: Namespace, args: argparse.Namespace) -> dict[str, list[dict]]:
    jobs = {
        "ours": partial(run_scan, ns, True),
        "ours, no filter": partial(run_scan, ns, False),
        "ss": partial(ss_established, ns),
    }
    runs: dict[str, list[dict]] = {name: [] for name in jobs}
    for i in range(args.rounds):
        for name in common.rotated(list(jobs), i):
            runs[name].append(jobs[name]())
        common.log(
            f"round {i + 1}/{args.rounds}: "
            + ", ".join(f"{n} {runs[n][-1]['wall'] * 1e3:.0f} ms" for n in jobs)
        )
    return runs


def census(ns: Namespace) -> dict:
    established = ns.exec(["ss", "-Htan", "state", "established"]).count("\n")
    return {
        "established": established,
        "port_range": ns.exec(["cat", "/proc/sys/net/ipv4/ip_local_port_range"]).split(),
        "ss_version": common.run(["ss", "-V"]).stdout.strip(),
    }


def main() -> int:
    args = parse_args()
    if args.role == "hold":
        hold_main(json.loads(args.shares))
        return 0
    if args.role == "scan":
        sys.stdout.write(json.dumps(scan_main(kernel_filter=not args.no_filter)))
        return 0
    if os.geteuid() != 0:
        sys.exit("port_scan.py needs root: it creates a network namespace")

    common.catch_interrupts()
    try:
        with Namespace() as ns:
            common.log(f"netns {ns.name}: {args.connections} connections")
            shares = plan(args.connections, args.listeners)
            holders = [start_holder(ns, share) for share in shares]
            try:
                setup = wait_ready(holders)
                ports = sorted(port for share in shares for port in share)
                info = {**census(ns), "setup_seconds": setup, "ports": ports,
                        "helpers": len(holders)}  # fmt: skip
                common.log(f"{info['established']} established sockets in {setup:.1f} s")
                runs = measure(ns, args)
            finally:
                for holder in holders:
                    holder.kill()
                    holder.communicate()
    except KeyboardInterrupt:
        common.log("interrupted; helper stopped and namespace removed")
        return 130
    report(args, info, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
