"""Scrape cost: our exporter against node_exporter, in one network namespace.

Six exporters run side by side in a throwaway netns with real conntrack entries (UDP flows on
loopback) and real sockets (held TCP connections): ours with its default collectors; ours with
only the collectors node_exporter has counterparts for (conntrack and socket: the row the
at-rest target is judged on); ours without the socket collectors (what they add to a
scrape); node_exporter with only its conntrack collector, with and without its own
go_/process_/promhttp_ metrics (the core issue's peer); and node_exporter with conntrack,
sockstat and netstat (the socket issue's peer). A
client process in the same netns scrapes each over one keep-alive connection with the headers
Prometheus sends, the same number of times, in rounds whose order rotates. Each exporter's CPU
time (utime + stime of all its threads, from /proc/PID/stat) is read around every round; the
client's own work is never counted. Then, in a separate process in the same netns, our
collection and exposition path runs under tracemalloc to report the memory a scrape allocates.

--scrapers 2 scrapes each exporter with two concurrent scrapers, each on its own connection, as
an HA pair of Prometheus servers does (CPU is then per scrape served). --compare-tree runs our
exporter from another checkout too (ours-before), in the same rotating rounds.

Needs root (netns, nft) and Debian's prometheus-node-exporter. Our exporter runs from the
checkout this script is in. Run it with `make bench`, or:

    .venv/bin/python bench/scrape_cpu.py --scrapes 3000 --rounds 7 --flows 5000
    .venv/bin/python bench/scrape_cpu.py --scrapers 2 --compare-tree /tmp/before

It prints a table; it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import array
import gzip
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if __package__:  # python -m bench.scrape_cpu
    from bench import common
else:  # python bench/scrape_cpu.py, and the children it starts the same way
    import common

NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"
OURS_PORT = 19371
NODE_PORT = 19100
NODE_LEAN_PORT = 19101
NODE_SOCKETS_PORT = 19102
OURS_NO_SOCKET_PORT = 19372
OURS_BEFORE_PORT = 19374
OURS_SAME_PORT = 19375
CLK_TCK = os.sysconf("SC_CLK_TCK")
SAME_AS_NODE_EXPORTER = (
    "--no-collector.pods",
    "--no-collector.conntrack_table",
    "--no-collector.socket_ports",
)

# What Prometheus 2.x sends on every scrape (scrape/scrape.go, scrapeAcceptHeader).
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
TEXT_ACCEPT = "text/plain;version=0.0.4;q=1,*/*;q=0.1"
ACCEPT = {"prometheus": PROMETHEUS_ACCEPT, "text": TEXT_ACCEPT}
# The table size as each exporter names it, to check that both see the namespace's entries.
ENTRIES_SAMPLES = ("node_nf_conntrack_entries ", "conntrack_entries ")

# Sends one datagram per flow from one socket to distinct loopback (address, port) pairs, so
# every datagram is a new conntrack entry. Nothing listens: the ICMP errors that come back are
# RELATED to their entry and create none.
FLOW_SCRIPT = """
import socket, sys
n = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(n):
    s.sendto(b"x", (f"127.1.{i // 250 % 250}.{i % 250 + 1}", 20000 + i // 62500))
"""

# Holds N established TCP connections on loopback (2N sockets) until its stdin closes, so that
# the socket collectors have real sockets to count.
HOLD_SCRIPT = """
import socket, sys
n = int(sys.argv[1])
listener = socket.create_server(("127.0.0.1", 18000), backlog=n)
clients = [socket.create_connection(("127.0.0.1", 18000)) for _ in range(n)]
accepted = [listener.accept()[0] for _ in range(n)]
print("ready", flush=True)
sys.stdin.read()
"""

# --- the parent: namespace, exporters, measurement -------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of pid, dead threads included (the kernel sums them)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    # Fields 14 and 15 of proc(5), counted after "pid (comm)": indexes 11 and 12 here.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass
class Exporter:
    name: str
    port: int
    path: str
    argv: list[str]
    process: subprocess.Popen | None = None
    log: object = None
    cpu_per_scrape: list[float] = field(default_factory=list)
    wall_per_scrape: list[float] = field(default_factory=list)  # as the client saw it
    info: dict = field(default_factory=dict)
    note: str = ""  # how it is configured, for the report
    cwd: Path = common.REPO  # ours: the checkout `python -m conntrack_exporter` runs from

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


class Namespace(common.Namespace):
    def __init__(self) -> None:
        # Unreplied UDP entries live nf_conntrack_udp_timeout (30 s): keep them for the run.
        timeouts = ("nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream")
        super().__init__("ctx-bench", timeouts, 3600)

    def make_flows(self, flows: int) -> int:
        self.exec([sys.executable, "-c", FLOW_SCRIPT, str(flows)])
        return self.count()

    def hold_connections(self, connections: int) -> subprocess.Popen:
        holder = subprocess.Popen(
            self.argv([sys.executable, "-c", HOLD_SCRIPT, str(connections)]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout is not None
        if holder.stdout.readline().strip() != "ready":
            raise RuntimeError("the connection holder did not start")
        return holder


def start(ns: Namespace, exporter: Exporter, logdir: Path) -> None:
    exporter.log = open(logdir / f"{exporter.name}.log", "w+b")  # noqa: SIM115
    # `ip netns exec` execs the command, so the Popen pid is the exporter's own.
    exporter.process = subprocess.Popen(
        ns.argv(exporter.argv),
        stdin=subprocess.DEVNULL,
        stdout=exporter.log,
        stderr=subprocess.STDOUT,
        # Its own process group: a Ctrl-C reaches only us, and `finally` stops it in order.
        start_new_session=True,
        # `python -m conntrack_exporter` then imports the package from that checkout.
        cwd=exporter.cwd,
    )


def stop(exporter: Exporter) -> None:
    proc = exporter.process
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def exporter_log(exporter: Exporter) -> str:
    if exporter.log is None:
        return ""
    exporter.log.seek(0)
    return exporter.log.read().decode(errors="replace")[-2000:]


class Client:
    """The scraping client: a child process in the netns, driven over its stdin and stdout."""

    def __init__(
        self, ns: Namespace, targets: list[Exporter], accept: str, scrapers: int = 1
    ) -> None:
        spec = json.dumps({t.name: [t.port, t.path] for t in targets})
        cmd = [sys.executable, __file__, "--role", "client", "--targets", spec]
        self.process = subprocess.Popen(
            ns.argv([*cmd, "--scrapers", str(scrapers)]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env={**os.environ, "BENCH_ACCEPT": accept},
        )

    def call(self, **request: object) -> dict:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the scraping client exited")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"client: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def measure_round(client: Client, exporter: Exporter, scrapes: int, scrapers: int = 1) -> None:
    """`scrapes` by each of `scrapers` concurrent scrapers; CPU and time per scrape served."""
    before = cpu_seconds(exporter.pid)
    reply = client.call(op="scrape", target=exporter.name, n=scrapes)
    total = scrapes * scrapers
    exporter.cpu_per_scrape.append((cpu_seconds(exporter.pid) - before) / total)
    exporter.wall_per_scrape.append(reply["seconds"] / scrapes)


def idle_cpu(exporters: list[Exporter], seconds: float) -> dict[str, float]:
    before = {e.name: cpu_seconds(e.pid) for e in exporters}
    time.sleep(seconds)
    return {e.name: (cpu_seconds(e.pid) - before[e.name]) / seconds for e in exporters}


def allocations(ns: Namespace, scrapes: int, accept: str) -> dict:
    out = ns.exec(
        [sys.executable, __file__, "--role", "alloc", "--scrapes", str(scrapes), "--accept", accept]
    )
    return json.loads(out)


# --- the client role ----------------------------------------------------------------------------


def client_main(targets: dict[str, list], accept: str, scrapers: int) -> None:
    """Scrape on request. With `scrapers` > 1, each scrape op runs that many scrapers at once,
    each on its own keep-alive connection, as an HA pair of Prometheus servers does."""
    import http.client
    import threading

    headers = {
        "Accept": accept,
        "Accept-Encoding": "gzip",
        "User-Agent": "Prometheus/2.42.0",
        "X-Prometheus-Scrape-Timeout-Seconds": "10",
    }
    pairs = {name: [_connect(port) for _ in range(scrapers)] for name, (port, _) in targets.items()}
    connections = {name: conns[0] for name, conns in pairs.items()}

    def scrape(
        name: str, conn: http.client.HTTPConnection | None = None
    ) -> http.client.HTTPResponse:
        conn = conn or connections[name]
        try:
            conn.request("GET", targets[name][1], headers=headers)
            response = conn.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            # Idle past the exporters' 120 s while the other exporters' rounds ran (a slow,
            # shared machine): closed, as Prometheus sees it too. It reconnects and asks again.
            conn.close()
            conn.request("GET", targets[name][1], headers=headers)
            response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{name}: HTTP {response.status}")
        return response

    for line in sys.stdin:
        request = json.loads(line)
        try:
            name = request["target"]
            if request["op"] == "probe":
                response = scrape(name)
                wire = response.read()
                encoding = response.getheader("Content-Encoding", "identity")
                text = gzip.decompress(wire) if encoding == "gzip" else wire
                lines = text.decode().splitlines()
                reply = {
                    "content_type": response.getheader("Content-Type"),
                    "encoding": encoding,
                    "wire_bytes": len(wire),
                    "body_bytes": len(text),
                    "samples": sum(1 for x in lines if x and not x.startswith("#")),
                    "conntrack_entries": next(
                        (x.split()[-1] for x in lines if x.startswith(ENTRIES_SAMPLES)), None
                    ),
                }
            else:
                errors: list[BaseException] = []
                started = time.perf_counter()
                threads = [
                    threading.Thread(target=_scraper, args=(scrape, name, c, request["n"], errors))
                    for c in pairs[name]
                ]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                if errors:
                    raise errors[0]
                reply = {"seconds": time.perf_counter() - started}
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


def _scraper(scrape: Callable, name: str, conn: object, n: int, errors: list) -> None:
    """One of the concurrent scrapers: `n` scrapes on its own connection."""
    try:
        for _ in range(n):
            scrape(name, conn).read()
    except BaseException as exc:  # reported by the op that started it
        errors.append(exc)


def _connect(port: int):
    import http.client

    deadline = time.monotonic() + 15
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return conn
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# --- the allocation role ------------------------------------------------------------------------


def alloc_main(scrapes: int, accept: str) -> None:
    import tracemalloc

    sys.path.insert(0, str(common.REPO))
    from conntrack_exporter.cli import build_collectors
    from conntrack_exporter.collectors import COLLECTORS
    from conntrack_exporter.config import load_config
    from conntrack_exporter.registry import ExporterCollector, Lasting
    from conntrack_exporter.server import metrics_response

    exporter = ExporterCollector(build_collectors(load_config(None, {}, COLLECTORS), Lasting()))

    def scrape() -> None:
        metrics_response(exporter, accept, "gzip")

    # Warm up first: the first scrapes fill caches (imports, interned strings, buffers).
    for _ in range(50):
        scrape()
    # Preallocated, so that recording a result allocates nothing that tracemalloc would count.
    peaks = array.array("q", bytes(8 * scrapes))
    tracemalloc.start()
    start_current = tracemalloc.get_traced_memory()[0]
    for i in range(scrapes):
        tracemalloc.reset_peak()
        current = tracemalloc.get_traced_memory()[0]
        scrape()
        peaks[i] = tracemalloc.get_traced_memory()[1] - current
    net = tracemalloc.get_traced_memory()[0] - start_current
    tracemalloc.stop()
    json.dump(
        {
            "scrapes": scrapes,
            "peak_median": statistics.median(peaks),
            "peak_max": max(peaks),
            "net_per_scrape": net / scrapes,
            "net_total": net,
        },
        sys.stdout,
    )


# --- reporting ----------------------------------------------------------------------------------

COLUMN = 23


def _row(label: str, cells: list[str]) -> str:
    return f"{label:30}" + "".join(f"{cell:>{COLUMN}}" for cell in cells)


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} us"


def _median(values: list[float]) -> float:
    return statistics.median(values)


def report(args: argparse.Namespace, exporters: list[Exporter], extra: dict) -> None:
    ours, peers = exporters[0], exporters[1:]
    alloc = extra["alloc"]
    lines = [
        "",
        f"{common.machine()}, {extra['node_version']}",
        f"netns with {extra['entries']} conntrack entries and {args.connections} held TCP "
        f"connections; {args.rounds} rounds x "
        f"{args.scrapes} scrapes per exporter and scraper, {args.scrapers} concurrent "
        f"scraper(s) each on its own keep-alive connection, Accept: {args.accept}, "
        "Accept-Encoding: gzip",
        "",
        _row("", [e.name for e in exporters]),
        _row("CPU per scrape, median", [_us(_median(e.cpu_per_scrape)) for e in exporters]),
        _row(
            "  min..max over rounds",
            [
                f"{min(e.cpu_per_scrape) * 1e6:.0f}..{max(e.cpu_per_scrape) * 1e6:.0f}"
                for e in exporters
            ],
        ),
        _row("latency per scrape, median", [_us(_median(e.wall_per_scrape)) for e in exporters]),
        _row("idle CPU, ms per second", [f"{extra['idle'][e.name] * 1e3:.1f}" for e in exporters]),
        _row("peak RSS (VmHWM)", [f"{e.info['hwm_kib'] / 1024:.1f} MiB" for e in exporters]),
        _row("samples per scrape", [str(e.info["samples"]) for e in exporters]),
        _row("bytes per scrape, gzip/plain", [_sizes(e.info) for e in exporters]),
        _row("content type", [_short(e.info["content_type"]) for e in exporters]),
        _row("conntrack entries reported", [str(e.info["conntrack_entries"]) for e in exporters]),
        "",
    ]
    ours_all = [ours] + [e for e in peers if e.name in ("ours-before", "ours-same")]
    for mine in ours_all:
        for peer in peers:
            if peer is mine:
                continue
            ratios = [o / n for o, n in zip(mine.cpu_per_scrape, peer.cpu_per_scrape, strict=True)]
            lines.append(
                f"CPU ratio {mine.name} / {peer.name}: "
                f"{_median(mine.cpu_per_scrape) / _median(peer.cpu_per_scrape):.2f} "
                f"(ratio of medians; per round {min(ratios):.2f}..{max(ratios):.2f})"
            )
    lines += [f"  {peer.name}: {peer.note}" for peer in peers]
    lines += [
        "",
        f"ours, tracemalloc over {alloc['scrapes']} in-process scrapes (collect, encode, gzip):",
        f"  peak allocated during a scrape: median {alloc['peak_median'] / 1024:.1f} KiB, "
        f"max {alloc['peak_max'] / 1024:.1f} KiB",
        f"  traced memory grown over the run: {alloc['net_total']} B "
        f"({alloc['net_per_scrape']:.1f} B per scrape; a leak grows with --alloc-scrapes)",
        "",
        "CPU per round, us per scrape: "
        + "; ".join(
            f"{e.name} " + " ".join(f"{v * 1e6:.0f}" for v in e.cpu_per_scrape) for e in exporters
        ),
        f"CPU times are /proc/PID/stat utime+stime in {1000 // CLK_TCK} ms ticks: "
        f"{1e6 / CLK_TCK / args.scrapes:.1f} us per scrape of resolution in one round.",
    ]
    print("\n".join(lines))


def _sizes(info: dict) -> str:
    return f"{info['wire_bytes']}/{info['body_bytes']}"


def _short(content_type: str) -> str:
    return content_type.split(";")[0].replace("application/", "")


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scrapes", type=int, default=3000, help="scrapes per round (3000)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds per exporter (7)")
    parser.add_argument("--warmup", type=int, default=300, help="unmeasured scrapes first (300)")
    parser.add_argument("--flows", type=int, default=5000, help="UDP flows to create (5000)")
    parser.add_argument(
        "--connections", type=int, default=500, help="TCP connections to hold (500)"
    )
    parser.add_argument(
        "--alloc-scrapes", type=int, default=500, help="scrapes under tracemalloc (500)"
    )
    parser.add_argument(
        "--accept",
        choices=sorted(ACCEPT),
        default="prometheus",
        help="Accept header: what Prometheus 2.x sends (OpenMetrics first), or text/plain only",
    )
    parser.add_argument(
        "--scrapers",
        type=int,
        default=1,
        help="concurrent scrapers per exporter, each on its own connection: 2 is an HA pair "
        "of Prometheus servers (1)",
    )
    parser.add_argument(
        "--compare-tree",
        type=Path,
        help="also run our exporter from this checkout (ours-before), in the same rounds",
    )
    parser.add_argument("--role", choices=["client", "alloc"], help=argparse.SUPPRESS)
    parser.add_argument("--targets", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build_exporters(compare_tree: Path | None = None) -> list[Exporter]:
    """Ours first (every other row is reported as a ratio of it), then the baselines."""

    def ours(
        name: str, port: int, *flags: str, note: str = "", cwd: Path = common.REPO
    ) -> Exporter:
        argv = [sys.executable, "-m", "conntrack_exporter", *flags]
        argv += [f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
        return Exporter(name, port, "/metrics", argv, note=note, cwd=cwd)

    before = []
    if compare_tree is not None:
        note = f"our default collectors, run from {compare_tree}"
        before = [ours("ours-before", OURS_BEFORE_PORT, note=note, cwd=compare_tree)]

    def node(name: str, port: int, *flags: str, note: str) -> Exporter:
        argv = [NODE_EXPORTER, "--collector.disable-defaults", *flags]
        argv += [f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
        return Exporter(name, port, "/metrics", argv, note=note)

    conntrack = "--collector.conntrack"
    lean = "--web.disable-exporter-metrics"
    return [
        ours("ours", OURS_PORT),
        *before,
        # The issue-15 target's row: only the collectors node_exporter-sockets has counterparts
        # for (conntrack, socket), as node_exporter has no pods, table or port scans.
        ours(
            "ours-same",
            OURS_SAME_PORT,
            *SAME_AS_NODE_EXPORTER,
            note=f"{' '.join(SAME_AS_NODE_EXPORTER)}: the conntrack and socket collectors, "
            "node_exporter-sockets' counterparts",
        ),
        ours(
            "ours-no-socket",
            OURS_NO_SOCKET_PORT,
            "--no-collector.socket",
            "--no-collector.socket_ports",
            note="--no-collector.socket --no-collector.socket_ports: the conntrack collectors "
            "only, so the ratio is what the socket collectors add to a scrape",
        ),
        # node_exporter as the core issue asks for it: only the conntrack collector. It still
        # serves its own go_*, process_* and promhttp_* metrics, which we have no counterpart
        # for, so a second instance without them compares like with like.
        node(
            "node_exporter",
            NODE_PORT,
            conntrack,
            note="--collector.disable-defaults --collector.conntrack",
        ),
        node(
            "node_exporter-lean",
            NODE_LEAN_PORT,
            conntrack,
            lean,
            note=f"the same with {lean}: its conntrack collector and scrape bookkeeping only, "
            "no go_/process_/promhttp_ metrics",
        ),
        # ... and as the socket issue asks for it: conntrack, sockstat and netstat.
        node(
            "node_exporter-sockets",
            NODE_SOCKETS_PORT,
            conntrack,
            "--collector.sockstat",
            "--collector.netstat",
            note="--collector.disable-defaults --collector.conntrack --collector.sockstat "
            "--collector.netstat (its default netstat field filter)",
        ),
    ]


def main() -> int:
    args = parse_args()
    if args.role == "client":
        client_main(json.loads(args.targets), os.environ["BENCH_ACCEPT"], args.scrapers)
        return 0
    if args.role == "alloc":
        alloc_main(args.scrapes, ACCEPT[args.accept])
        return 0
    if os.geteuid() != 0:
        sys.exit("scrape_cpu.py needs root: it creates a network namespace and nft rules")
    if not os.access(NODE_EXPORTER, os.X_OK):
        sys.exit(f"{NODE_EXPORTER} is missing: apt-get install prometheus-node-exporter")

    common.catch_interrupts()
    exporters = build_exporters(args.compare_tree)
    logdir = Path(tempfile.mkdtemp(prefix="scrape-cpu-"))
    client = holder = None
    try:
        with Namespace() as ns:
            try:
                common.log(f"netns {ns.name}: making {args.flows} UDP flows")
                entries = ns.make_flows(args.flows)
                common.log(f"holding {args.connections} TCP connections")
                holder = ns.hold_connections(args.connections)
                for exporter in exporters:
                    start(ns, exporter, logdir)
                client = Client(ns, exporters, ACCEPT[args.accept], args.scrapers)
                for exporter in exporters:
                    exporter.info = client.call(op="probe", target=exporter.name)
                    # The pid we measure must be the exporter, not an `ip` left in between.
                    exe = os.readlink(f"/proc/{exporter.pid}/exe")
                    if os.path.basename(exe) == "ip":
                        raise RuntimeError(f"{exporter.name}: pid {exporter.pid} is {exe}")
                common.log(f"warming up: {args.warmup} scrapes each")
                for exporter in exporters:
                    client.call(op="scrape", target=exporter.name, n=args.warmup)
                for i in range(args.rounds):
                    for exporter in common.rotated(exporters, i):
                        measure_round(client, exporter, args.scrapes, args.scrapers)
                    common.log(
                        f"round {i + 1}/{args.rounds}: "
                        + ", ".join(f"{e.name} {_us(e.cpu_per_scrape[-1])}" for e in exporters)
                    )
                idle = idle_cpu(exporters, 5.0)
                for exporter in exporters:
                    exporter.info["hwm_kib"] = common.status_kib("VmHWM", exporter.pid)
                common.log(f"tracemalloc: {args.alloc_scrapes} scrapes in-process")
                alloc = allocations(ns, args.alloc_scrapes, args.accept)
                node_version = common.run([NODE_EXPORTER, "--version"]).stdout.split("(")[0].strip()
            except BaseException:
                for exporter in exporters:
                    if exporter.process is not None and exporter.process.poll() is not None:
                        common.log(f"--- {exporter.name} exited:\n{exporter_log(exporter)}")
                raise
            finally:
                if client is not None:
                    client.close()
                if holder is not None:
                    holder.kill()
                    holder.wait()
                for exporter in exporters:
                    stop(exporter)
    except KeyboardInterrupt:
        common.log("interrupted; namespace and exporters cleaned up")
        return 130
    finally:
        for exporter in exporters:
            if exporter.log is not None:
                exporter.log.close()
        shutil.rmtree(logdir, ignore_errors=True)
    report(
        args,
        exporters,
        {"alloc": alloc, "idle": idle, "entries": entries, "node_version": node_version},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
