"""Full table scans in the real exporter: a 1M-entry table, no budget, scrapes beside it.

A throwaway network namespace is filled with --entries real conntrack entries, exactly as
bench/table_scan.py fills it (the same processes and flow mix; the global nf_conntrack_max
raised for the run and restored in `finally`). Then, in that namespace:

1. `conntrack -C` and half of the --ct-runs `conntrack -L > /dev/null` (the C tool's full
   dump of the same table), before the exporter starts, so that nothing competes with them;
2. the real exporter, `python -m conntrack_exporter --config.file X --web.listen-address
   127.0.0.1:PORT` from this checkout, with a configuration that is the defaults except
   `collectors.conntrack_table.max_entries: 0` (every scan reads the whole table) and
   `interval_seconds: --interval`, and, only when given, `scan_timeout_seconds`
   (--scan-timeout) and `netlink.timeout_seconds` (--netlink-timeout). An nft raw rule leaves
   the scrape port untracked, so that scrapes add no entries;
3. for --seconds, a thread of this process that has joined the namespace (setns) scrapes
   /metrics once a second over one keep-alive connection, and records each scrape's latency
   and the values of the conntrack_table collector's health series; the exporter's CPU
   (utime + stime of all its threads, /proc/PID/stat) is read around the window, and its peak
   RSS (VmHWM) at the end;
4. the exporter is stopped (SIGTERM; the time it takes to exit is reported), then the other
   half of the `conntrack -L` runs and `conntrack -C` again.

A scan is known by its conntrack_table_scan_timestamp_seconds: each new value seen is one scan
that succeeded, with its duration and entries. Failed scans show only as increments of
conntrack_table_scan_errors_total{reason}. A scrape counts as "during a scan" when it overlaps
a succeeded scan's [finish - duration, finish].

Needs root (netns, nft, the global sysctl). Run it with `make bench-fullscan`, or:

    .venv/bin/python bench/full_scan.py --entries 1000000 --seconds 60 --interval 10

What a whole-dump deadline of 2 s did before scan_timeout_seconds existed:

    .venv/bin/python bench/full_scan.py --scan-timeout 2 --netlink-timeout 2

It prints figures; it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__:  # python -m bench.full_scan
    from bench import common, table_scan
else:  # python bench/full_scan.py
    import common
    import table_scan

PORT = 19373  # in a namespace of our own: nothing else listens there
CLK_TCK = os.sysconf("SC_CLK_TCK")
SCRAPE_TIMEOUT = 10.0  # Prometheus' default scrape timeout
STOP_WAIT = 30.0  # seconds the exporter gets to exit after SIGTERM before SIGKILL
# The series read from every scrape; errors are read by their reason label.
SERIES = {
    'conntrack_exporter_collector_success{collector="conntrack_table"}': "success",
    "conntrack_table_scan_entries": "entries",
    "conntrack_table_scan_duration_seconds": "duration",
    "conntrack_table_scan_timestamp_seconds": "timestamp",
    "conntrack_table_scan_sample_ratio": "ratio",
    "conntrack_entries": "table",
}
ERRORS_PREFIX = 'conntrack_table_scan_errors_total{reason="'
# Every collector's own time in a scrape, as values["collect:NAME"].
DURATION_PREFIX = 'conntrack_exporter_collector_duration_seconds{collector="'


class Namespace(common.Namespace):
    """table_scan's namespace (SYNs dropped on input, timeouts of two hours), and a raw chain
    that leaves the scrape port untracked, as tests/conftest.py's Netns.untrack_tcp_port."""

    def __init__(self, port: int) -> None:
        drop_syns = (
            "chain in { type filter hook input priority 0; "
            f"ip daddr {table_scan.TCP_NET}.0.0/16 tcp dport {table_scan.TCP_PORT} drop; }}"
        )
        untrack = (
            "chain raw { type filter hook output priority -300; "
            f"tcp dport {port} notrack; tcp sport {port} notrack; }}"
        )
        timeouts = (
            "nf_conntrack_udp_timeout",
            "nf_conntrack_udp_timeout_stream",
            "nf_conntrack_tcp_timeout_syn_sent",
        )
        super().__init__("ctx-fscan", timeouts, 7200, chains=(drop_syns, untrack))


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, all CPUs (/proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    total = sum(ticks[:8])  # guest time is already in user
    return (total - idle) / CLK_TCK, total / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of pid, dead threads included (the kernel sums them)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def config_text(args: argparse.Namespace) -> str:
    lines = []
    if args.netlink_timeout is not None:
        lines += ["netlink:", f"  timeout_seconds: {args.netlink_timeout}"]
    lines += [
        "collectors:",
        "  conntrack_table:",
        "    max_entries: 0",
        f"    interval_seconds: {args.interval}",
    ]
    if args.scan_timeout is not None:
        lines.append(f"    scan_timeout_seconds: {args.scan_timeout}")
    return "\n".join(lines) + "\n"


# --- scraping ---------------------------------------------------------------------------------


@dataclass
class Scrape:
    started: float  # Unix time
    latency: float | None = None  # seconds, request to last byte of the body
    healthz: float | None = None  # a /healthz right after, on the same connection
    status: int | None = None
    error: str = ""
    values: dict[str, float] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)


def parse(body: str) -> tuple[dict[str, float], dict[str, float]]:
    values: dict[str, float] = {}
    errors: dict[str, float] = {}
    for line in body.splitlines():
        if not line or line[0] == "#":
            continue
        series, _, value = line.rpartition(" ")
        if series in SERIES:
            values[SERIES[series]] = float(value)
        elif series.startswith(ERRORS_PREFIX):
            errors[series[len(ERRORS_PREFIX) : -2]] = float(value)
        elif series.startswith(DURATION_PREFIX):
            values["collect:" + series[len(DURATION_PREFIX) : -2]] = float(value)
    return values, errors


class Scraper(threading.Thread):
    """Scrapes once a second, on the second (a slow scrape skips ticks, never bunches them)."""

    def __init__(self, netns: str, port: int) -> None:
        super().__init__(name="scraper", daemon=True)
        self.netns = netns
        self.port = port
        self.scrapes: list[Scrape] = []
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.failure: BaseException | None = None
        self.missed = 0  # ticks skipped because a scrape was still running

    def run(self) -> None:
        try:
            common.join_netns(self.netns)
            self.ready.set()
            self._loop()
        except BaseException as exc:  # reported by the main thread
            self.failure = exc
            self.ready.set()

    def _loop(self) -> None:
        conn: http.client.HTTPConnection | None = None
        first = time.monotonic()
        tick = 0
        while True:
            delay = first + tick - time.monotonic()
            if delay <= -1:  # the last scrape overran whole ticks: skip them, scrape now
                behind = int(-delay)
                self.missed += behind
                tick += behind
                delay += behind
            if self.stop.wait(max(0.0, delay)):
                break
            tick += 1
            scrape = Scrape(time.time())
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(
                        "127.0.0.1", self.port, timeout=SCRAPE_TIMEOUT
                    )
                started = time.perf_counter()
                conn.request("GET", "/metrics")
                response = conn.getresponse()
                body = response.read()
                scrape.latency = time.perf_counter() - started
                scrape.status = response.status
                scrape.values, scrape.errors = parse(body.decode())
                # The server's answer without any collection: what the GIL and the CPUs
                # cost a request at that moment, beside what /metrics cost.
                started = time.perf_counter()
                conn.request("GET", "/healthz")
                conn.getresponse().read()
                scrape.healthz = time.perf_counter() - started
            except (OSError, http.client.HTTPException) as exc:
                scrape.error = f"{type(exc).__name__}: {exc}"
                if conn is not None:
                    conn.close()
                conn = None
            self.scrapes.append(scrape)
        if conn is not None:
            conn.close()


def wait_listening(ns: Namespace, port: int, proc: subprocess.Popen, seconds: float) -> float:
    """Wait until the exporter answers /healthz (from a thread in the netns); its start-up time."""
    started = time.monotonic()
    result: dict[str, object] = {}

    def probe() -> None:
        common.join_netns(ns.name)
        while time.monotonic() - started < seconds and proc.poll() is None:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/healthz")
                conn.getresponse().read()
                conn.close()
                result["up"] = time.monotonic() - started
                return
            except OSError:
                time.sleep(0.05)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join()
    if "up" not in result:
        raise RuntimeError("the exporter did not start listening")
    return float(result["up"])  # type: ignore[arg-type]


# --- the exporter -------------------------------------------------------------------------------


class Exporter:
    def __init__(self, ns: Namespace, config: Path, port: int, logfile: Path) -> None:
        self.log_path = logfile
        self._log = open(logfile, "w+b")  # noqa: SIM115
        argv = [
            sys.executable,
            "-m",
            "conntrack_exporter",
            "--config.file",
            str(config),
            "--web.listen-address",
            f"127.0.0.1:{port}",
        ]
        # `ip netns exec` execs the command, so the Popen pid is the exporter's own; its own
        # session, so that a Ctrl-C reaches only us and `finally` stops it in order.
        self.process = subprocess.Popen(
            ns.argv(argv),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=common.REPO,  # `-m conntrack_exporter` imports this checkout's package
        )
        self.pid = self.process.pid
        self.stop_seconds: float | None = None
        self.exit_status: int | None = None

    def stop(self) -> None:
        if self.process.poll() is not None:
            self.exit_status = self.process.returncode
            return
        started = time.monotonic()
        self.process.terminate()
        try:
            self.exit_status = self.process.wait(STOP_WAIT)
            self.stop_seconds = time.monotonic() - started
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.exit_status = self.process.wait()

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")


# --- the run ------------------------------------------------------------------------------------


def conntrack_runs(ns: Namespace, runs: int) -> list[dict]:
    out = []
    for _ in range(runs):
        out.append(table_scan.conntrack_list(ns))
        common.log(f"conntrack -L: {out[-1]['wall']:.2f} s, {out[-1]['entries']} entries shown")
    return out


def measure(ns: Namespace, args: argparse.Namespace, info: dict, workdir: Path) -> None:
    info["count_before"] = ns.count()
    before = args.ct_runs - args.ct_runs // 2
    info["ct_list"] = conntrack_runs(ns, before)

    config = workdir / "config.yml"
    config.write_text(config_text(args))
    info["config"] = config.read_text()
    exporter = Exporter(ns, config, PORT, workdir / "exporter.log")
    scraper = None
    try:
        info["startup"] = wait_listening(ns, PORT, exporter.process, 30)
        common.log(f"exporter pid {exporter.pid} listening after {info['startup']:.2f} s")
        scraper = Scraper(ns.name, PORT)
        cpu0, wall0, busy0 = cpu_seconds(exporter.pid), time.monotonic(), machine_busy()
        info["rss_start_kib"] = common.status_kib("VmRSS", exporter.pid)
        scraper.start()
        scraper.ready.wait()
        end = wall0 + args.seconds
        while time.monotonic() < end and exporter.process.poll() is None:
            time.sleep(min(5.0, max(0.0, end - time.monotonic())))
            done = len(scraper.scrapes)
            common.log(f"{time.monotonic() - wall0:5.0f} s: {done} scrapes")
        scraper.stop.set()
        scraper.join(SCRAPE_TIMEOUT + 5)
        if exporter.process.poll() is not None:
            raise RuntimeError(
                f"the exporter exited ({exporter.process.returncode}):\n"
                + exporter.log_text()[-3000:]
            )
        info["cpu"] = cpu_seconds(exporter.pid) - cpu0
        busy1 = machine_busy()
        info["machine_busy"] = (busy1[0] - busy0[0]) / (busy1[1] - busy0[1])
        info["window"] = time.monotonic() - wall0
        info["rss_end_kib"] = common.status_kib("VmRSS", exporter.pid)
        info["hwm_kib"] = common.status_kib("VmHWM", exporter.pid)
        info["threads"] = len(os.listdir(f"/proc/{exporter.pid}/task"))
        if scraper.failure is not None:
            raise RuntimeError(f"the scraping thread failed: {scraper.failure!r}")
    finally:
        if scraper is not None:
            scraper.stop.set()
        exporter.stop()
        info["stop_seconds"] = exporter.stop_seconds
        info["exit_status"] = exporter.exit_status
        info["log"] = exporter.log_text()
    info["scrapes"] = scraper.scrapes
    info["missed"] = scraper.missed
    info["ct_list"] += conntrack_runs(ns, args.ct_runs // 2)
    info["count_after"] = ns.count()


# --- reporting ----------------------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float:
    """The nearest-rank q-quantile (no interpolation: with few samples p99 is the maximum)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))]


def _ms(values: list[float]) -> str:
    if not values:
        return "none"
    return (
        f"p50 {quantile(values, 0.5) * 1e3:.1f} ms, p99 {quantile(values, 0.99) * 1e3:.1f} ms, "
        f"max {max(values) * 1e3:.1f} ms (n={len(values)})"
    )


def collect_times(scrapes: list[Scrape]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for s in scrapes:
        for key, value in s.values.items():
            if key.startswith("collect:"):
                out.setdefault(key[len("collect:") :], []).append(value)
    return out


def scans_seen(scrapes: list[Scrape]) -> list[dict]:
    """One row per distinct conntrack_table_scan_timestamp_seconds: the scans that succeeded."""
    seen: dict[float, dict] = {}
    for s in scrapes:
        ts = s.values.get("timestamp")
        if ts is not None and ts not in seen:
            seen[ts] = {
                "finished": ts,
                "duration": s.values.get("duration", float("nan")),
                "entries": int(s.values.get("entries", -1)),
                "ratio": s.values.get("ratio", float("nan")),
                "first_seen": s.started,
            }
    return sorted(seen.values(), key=lambda r: r["finished"])


def report(args: argparse.Namespace, info: dict) -> None:
    scrapes: list[Scrape] = info["scrapes"]
    ok = [s for s in scrapes if s.status == 200]
    failed = [s for s in scrapes if s.status != 200]
    t0 = scrapes[0].started if scrapes else time.time()
    scans = scans_seen(ok)
    ct_walls = [r["wall"] for r in info["ct_list"]]
    ct_med = statistics.median(ct_walls) if ct_walls else float("nan")
    count = info["count_before"]
    windows = [(r["finished"] - r["duration"], r["finished"]) for r in scans]

    def during_scan(s: Scrape) -> bool:
        assert s.latency is not None
        return any(a <= s.started + s.latency and s.started <= b for a, b in windows)

    scanning = [s.latency for s in ok if during_scan(s)]
    idle = [s.latency for s in ok if not during_scan(s)]
    timed = [s for s in ok if s.healthz is not None]
    scanning_h = [s.healthz for s in timed if during_scan(s)]
    idle_h = [s.healthz for s in timed if not during_scan(s)]
    all_h = [s.healthz for s in timed]
    success = [s.values.get("success") for s in ok]
    first_good = next((i for i, v in enumerate(success) if v == 1), None)
    errors_end = ok[-1].errors if ok else {}
    errors_start = ok[0].errors if ok else {}
    new_errors = sum(errors_end.values()) - sum(errors_start.values())

    lines = [
        "",
        f"{common.machine()}, {info['conntrack_version']}, commit {info['commit']}",
        f"load average {info['load_before']} at the start, {info['load_after']} at the end",
        f"netns with {count} conntrack entries (asked {args.entries}; filled in "
        f"{info['fill_seconds']:.1f} s), nf_conntrack_buckets {info['buckets']}, "
        f"nf_conntrack_max {info['max_during']} during the run ({info['max_before']} before)",
        "exporter configuration (the defaults otherwise): "
        + " ".join(info["config"].split()).replace(": ", ":"),
        f"window: {info['window']:.1f} s from the first answer ({info['startup']:.2f} s after "
        f"start), {len(scrapes)} scrapes once a second ({len(failed)} failed, "
        f"{info['missed']} ticks missed)",
        "",
        "scans that completed in the window (each new conntrack_table_scan_timestamp_seconds):",
        f"{'#':>3}{'finished at':>13}{'duration':>10}{'entries':>10}{'ratio':>7}"
        f"{'- conntrack -C':>16}{'/ conntrack -L':>16}",
    ]
    for i, r in enumerate(scans, 1):
        lines.append(
            f"{i:>3}{r['finished'] - t0:>12.1f}s{r['duration']:>9.2f}s{r['entries']:>10}"
            f"{r['ratio']:>7.2f}{r['entries'] - count:>+16}{r['duration'] / ct_med:>16.2f}"
        )
    durations = [r["duration"] for r in scans]
    if durations:
        lines += [
            f"scan duration: median {statistics.median(durations):.2f} s, min "
            f"{min(durations):.2f}, max {max(durations):.2f} (the first may predate the window: "
            "the scanner starts at once)",
        ]
    else:
        lines.append("no scan succeeded in the window")
    lines += [
        f"conntrack -L > /dev/null: median {ct_med:.2f} s, runs "
        + " ".join(f"{w:.2f}" for w in ct_walls)
        + f" (CPU median {statistics.median(r['user'] + r['sys'] for r in info['ct_list']):.2f}"
        f" s; {args.ct_runs - args.ct_runs // 2} before the exporter, {args.ct_runs // 2} after)",
    ]
    if durations:
        lines.append(
            f"our scan / conntrack -L, wall: median {statistics.median(durations) / ct_med:.2f}"
        )
    lines += [
        f"conntrack -C: {info['count_before']} before the exporter, {info['count_after']} after; "
        f"conntrack_entries in the last scrape: "
        f"{int(ok[-1].values['table']) if ok and 'table' in ok[-1].values else '?'}",
        "",
        f"scans succeeded: {len(scans)}; errors counted between the first and last scrape: "
        f"{new_errors:.0f}",
        "conntrack_table_scan_errors_total at the end: "
        + ", ".join(f"{k} {v:.0f}" for k, v in errors_end.items()),
        "collector_success{collector=conntrack_table}: "
        f"value 1 in {sum(1 for v in success if v == 1)} scrapes, 0 in "
        f"{sum(1 for v in success if v == 0)}"
        + (
            f" ({first_good} before the first scan finished)"
            if first_good is not None
            else " (no scan finished)"
        ),
        f"conntrack_table_scan_sample_ratio: "
        f"{sorted({s.values['ratio'] for s in ok if 'ratio' in s.values}) or 'not served'}",
        "",
        *(
            [
                f"scrape latency while a scan ran:   {_ms(scanning)}",
                f"scrape latency between scans:      {_ms(idle)}",
            ]
            if windows
            else ["scrape latency by scan: unknown (only a scan that succeeded has a window)"]
        ),
        f"scrape latency, all:               {_ms([s.latency for s in ok])}",
        "slowest scrapes: "
        + ", ".join(
            f"{s.latency * 1e3:.1f} ms at {s.started - t0:.0f} s"
            + (" (during a scan)" if windows and during_scan(s) else "")
            for s in sorted(ok, key=lambda s: s.latency or 0, reverse=True)[:3]
        ),
        *(
            [
                f"/healthz right after, while a scan ran: {_ms(scanning_h)}",
                f"/healthz right after, between scans:    {_ms(idle_h)}",
            ]
            if windows
            else [f"/healthz right after each scrape: {_ms(all_h)}"]
        ),
        "collector_duration_seconds by collector, p50 / max: "
        + ", ".join(
            f"{name} {quantile(v, 0.5) * 1e3:.2f} / {max(v) * 1e3:.2f} ms"
            for name, v in collect_times(ok).items()
        ),
    ]
    if failed:
        lines.append("failed scrapes: " + "; ".join(s.error or str(s.status) for s in failed[:5]))
    cpu, window = info["cpu"], info["window"]
    lines += [
        "",
        f"exporter CPU over the window: {cpu:.1f} s in {window:.1f} s = {cpu / window * 100:.0f} "
        f"% of one CPU" + (f"; {cpu / len(scans):.2f} s per succeeded scan" if scans else ""),
        f"the machine's CPUs over the window: {info['machine_busy'] * 100:.0f} % busy of "
        f"{os.cpu_count()} (the exporter is {cpu / window / (os.cpu_count() or 1) * 100:.0f} "
        "points of it; the rest is this script, conntrack's kernel work and others' jobs)",
        f"exporter RSS: {info['rss_start_kib'] / 1024:.1f} MiB at the window's start, "
        f"{info['rss_end_kib'] / 1024:.1f} MiB at its end, peak (VmHWM) "
        f"{info['hwm_kib'] / 1024:.1f} MiB; {info['threads']} threads",
        f"exporter stop: exit status {info['exit_status']}"
        + (
            f", {info['stop_seconds']:.2f} s after SIGTERM"
            if info["stop_seconds"] is not None
            else " (killed or already gone)"
        ),
    ]
    warnings = [x for x in info["log"].splitlines() if "level=warn" in x or "level=error" in x]
    lines.append(f"exporter log: {len(warnings)} warnings/errors")
    lines += [f"  {x[:300]}" for x in warnings[:5]]
    print("\n".join(lines))


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000, help="table size (1000000)")
    parser.add_argument("--seconds", type=float, default=60.0, help="scraping window, seconds (60)")
    parser.add_argument(
        "--interval", type=float, default=10.0, help="conntrack_table interval_seconds (10)"
    )
    parser.add_argument(
        "--scan-timeout",
        type=float,
        help="conntrack_table scan_timeout_seconds (unset: the exporter's default)",
    )
    parser.add_argument(
        "--netlink-timeout",
        type=float,
        help="netlink.timeout_seconds (unset: the exporter's default)",
    )
    parser.add_argument(
        "--ct-runs",
        type=int,
        default=4,
        help="conntrack -L runs, half before the exporter, half after (4)",
    )
    return parser.parse_args(argv)


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages: other work on the machine shows in them."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def commit() -> str:
    try:
        head = common.run(["git", "-C", str(common.REPO), "rev-parse", "--short", "HEAD"])
        dirty = common.run(["git", "-C", str(common.REPO), "status", "--porcelain", "--", "."])
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main() -> int:
    args = parse_args()
    if os.geteuid() != 0:
        sys.exit("full_scan.py needs root: it creates a network namespace and raises a sysctl")
    common.catch_interrupts()
    info: dict = {
        "buckets": int(table_scan.BUCKETS.read_text()),
        "conntrack_version": common.run(["conntrack", "--version"]).stdout.split("(")[0].strip(),
        "commit": commit(),
        "max_before": int(table_scan.CONNTRACK_MAX.read_text()),
        "load_before": loadavg(),
    }
    workdir = Path(tempfile.mkdtemp(prefix="full-scan-"))
    try:
        with (
            Namespace(PORT) as ns,
            table_scan.RaisedConntrackMax(args.entries + table_scan.MAX_MARGIN),
        ):
            info["max_during"] = int(table_scan.CONNTRACK_MAX.read_text())
            common.log(f"netns {ns.name}: filling {args.entries} entries")
            info["fill_seconds"] = table_scan.fill(ns, args.entries)
            entries = ns.count()
            common.log(f"{entries} entries in {info['fill_seconds']:.1f} s")
            if entries < args.entries * 0.99:
                common.log(f"warning: only {entries} of {args.entries} entries made it")
            measure(ns, args, info, workdir)
    except KeyboardInterrupt:
        common.log("interrupted; exporter stopped, nf_conntrack_max restored, namespace removed")
        return 130
    info["load_after"] = loadavg()
    report(args, info)
    common.log(f"exporter log and configuration kept in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
