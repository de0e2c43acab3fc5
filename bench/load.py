"""Load: many concurrent clients against the exporter, with a large conntrack table behind it.

A throwaway network namespace gets a --entries conntrack table (built as bench/table_scan.py
builds its tables, the global nf_conntrack_max raised for the run and restored afterwards).
In it the exporter runs from this checkout with its default collectors, so the background
table scan runs during the load, once per --max-requests value asked for (default: 40, the
default cap, and 0, no cap). For each, after a short warm-up, `hey` in the namespace runs
--clients concurrent keep-alive clients for --seconds against /metrics with Prometheus' Accept
header and gzip, each sending its next request as soon as it has an answer. Beside them a
probe scrapes once a second as Prometheus would (one keep-alive connection, 10 s timeout, from
127.0.0.2: its own address, as a Prometheus server on another host has): what a real scraper
gets during the flood, against the targets of issue 15 (at least 99 % 200s within 1 s, p99
under 1 s).

Reported: requests served (200), the designed 503s, every other error (target 0), latency
percentiles as hey reports them (over all responses, the fast 503s included), the probe's
outcomes and latency, the exporter's CPU, and its RSS: idle after one scrape (the baseline of
the 5 MiB target), after a warm-up, after the load, at its peak, and its peak thread count,
sampled from /proc every 0.25 s. Then the same load runs once more, to tell a high-water mark
(the first run's growth, memory the allocators keep for reuse) from a leak (growth again in
the second run).

With --trees, the exporter runs from each checkout in turn for each --max-requests (e.g. the
code before a change and after it), so that both meet the same shared machine.

Needs root (netns, nft, the global sysctl) and `hey` (`make bench-load` installs it). Run it with
`make bench-load`, or:

    .venv/bin/python bench/load.py --clients 200 --seconds 30 --entries 100000
    .venv/bin/python bench/load.py --trees /tmp/before . --labels before after

It prints a table; it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__:  # python -m bench.load
    from bench import common, scrape_cpu, table_scan
else:  # python bench/load.py
    import common
    import scrape_cpu
    import table_scan

PORT = 19373
WARMUP_REQUESTS = 500
WARMUP_CLIENTS = 10
# After the warm-up and after the load: time for the threads of closed connections to exit
# and for a background scan in progress to finish, before RSS is read.
SETTLE_SECONDS = 3.0
SAMPLE_SECONDS = 0.25
HEY_TIMEOUT_SECONDS = 20  # per request, hey's default
# The probe scrapes as Prometheus does, once a second (a short scrape interval), from an
# address of its own: Prometheus runs on another host than a flooding client. All of 127/8 is
# loopback, so 127.0.0.2 needs no set-up.
PROBE_INTERVAL_SECONDS = 1.0
PROBE_TIMEOUT_SECONDS = 10  # Prometheus' default scrape timeout
PROBE_SOURCE = "127.0.0.2"
# The probe's targets (issue 15): at least this share of 200s, and p99 below this.
PROBE_SUCCESS_TARGET = 0.99
PROBE_P99_TARGET_SECONDS = 1.0

# --- hey ----------------------------------------------------------------------------------------


def hey(ns: common.Namespace, args: list[str]) -> dict:
    url = f"http://127.0.0.1:{PORT}/metrics"
    cmd = ["hey", "-t", str(HEY_TIMEOUT_SECONDS), "-H", f"Accept: {scrape_cpu.PROMETHEUS_ACCEPT}"]
    return parse_hey(ns.exec([*cmd, *args, url]))


def parse_hey(text: str) -> dict:
    """hey's summary: totals, status codes, errors and latency percentiles."""

    def section(title: str) -> str:
        match = re.search(rf"^{title}:\n((?:[ \t]+\S.*\n?)*)", text, re.MULTILINE)
        return match.group(1) if match else ""

    codes = section("Status code distribution")
    statuses = {
        int(code): int(count) for code, count in re.findall(r"\[(\d+)\]\s+(\d+) responses", codes)
    }
    errors = {
        message.strip(): int(count)
        for count, message in re.findall(r"\[(\d+)\]\s+(.*)", section("Error distribution"))
    }
    latency = {
        int(pct): float(seconds)
        for pct, seconds in re.findall(r"(\d+)% in ([\d.]+) secs", section("Latency distribution"))
    }
    total = re.search(r"Total:\s+([\d.]+) secs", text)
    return {
        "seconds": float(total.group(1)) if total else 0.0,
        "statuses": statuses,
        "errors": errors,
        "latency": latency,
    }


# --- the exporter under load ----------------------------------------------------------------------


class Sampler:
    """Peak VmRSS and thread count of a process, sampled in a thread while a `with` runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss_kib = 0
        self.peak_threads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.peak_rss_kib = max(self.peak_rss_kib, common.status_kib("VmRSS", self.pid))
            self.peak_threads = max(self.peak_threads, common.status_kib("Threads", self.pid))


def wait_listening(exporter: scrape_cpu.Exporter) -> None:
    deadline = time.monotonic() + 30
    while "msg=listening" not in scrape_cpu.exporter_log(exporter):
        assert exporter.process is not None
        if exporter.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the exporter did not start:\n{scrape_cpu.exporter_log(exporter)}")
        time.sleep(0.05)


def full_log(exporter: scrape_cpu.Exporter) -> str:
    assert exporter.log is not None
    exporter.log.seek(0)
    return exporter.log.read().decode(errors="replace")


def run_load(
    ns: common.Namespace, tree: Path, max_requests: int, args: argparse.Namespace, logdir: Path
) -> dict:
    argv = [
        sys.executable, "-m", "conntrack_exporter", "--web.listen-address", f"127.0.0.1:{PORT}",
        "--web.max-requests", str(max_requests),
    ]  # fmt: skip
    label = args.labels.get(str(tree), tree.resolve().name)
    name = f"{label}-max-requests-{max_requests}"
    exporter = scrape_cpu.Exporter(name, PORT, "/metrics", argv, cwd=tree)
    scrape_cpu.start(ns, exporter, logdir)
    try:
        wait_listening(exporter)
        pid = exporter.pid
        # The baseline: an idle exporter that has served one scrape.
        hey(ns, ["-n", "1", "-c", "1"])
        time.sleep(SETTLE_SECONDS)
        result = {
            "tree": str(tree),
            "label": label,
            "max_requests": max_requests,
            "rss_idle_kib": common.status_kib("VmRSS", pid),
        }
        hey(ns, ["-n", str(WARMUP_REQUESTS), "-c", str(WARMUP_CLIENTS)])
        time.sleep(SETTLE_SECONDS)
        result["rss_before_kib"] = common.status_kib("VmRSS", pid)
        cpu_before = scrape_cpu.cpu_seconds(pid)
        common.log(f"{name}: {args.clients} clients for {args.seconds} s")
        with Sampler(pid) as sampler:
            result |= flood(ns, args, probe=True)
        result["cpu_seconds"] = scrape_cpu.cpu_seconds(pid) - cpu_before
        time.sleep(SETTLE_SECONDS)
        result |= {
            "rss_after_kib": common.status_kib("VmRSS", pid),
            "threads_after": common.status_kib("Threads", pid),
            "peak_rss_kib": max(sampler.peak_rss_kib, common.status_kib("VmRSS", pid)),
            "peak_threads": sampler.peak_threads,
        }
        common.log(f"{name}: the same again, for RSS")
        flood(ns, args, probe=False)
        time.sleep(SETTLE_SECONDS)
        result["rss_again_kib"] = common.status_kib("VmRSS", pid)
        result["refusal_warnings"] = full_log(exporter).count("refusing scrapes")
    finally:
        scrape_cpu.stop(exporter)
        if exporter.log is not None:
            exporter.log.close()
    return result


def flood(ns: common.Namespace, args: argparse.Namespace, probe: bool) -> dict:
    """hey's clients for --seconds, with the probe beside them if asked."""
    prober = None
    if probe:
        cmd = [sys.executable, __file__, "--role", "probe", "--seconds", str(args.seconds)]
        prober = subprocess.Popen(ns.argv(cmd), stdout=subprocess.PIPE, text=True, cwd=common.REPO)
    try:
        result = hey(ns, ["-z", f"{args.seconds}s", "-c", str(args.clients)])
    finally:
        if prober is not None:
            out, _ = prober.communicate()
    if prober is not None:
        if prober.returncode:
            raise RuntimeError(f"the probe failed ({prober.returncode})")
        result["probe"] = json.loads(out)
    return result


# --- the probe role -------------------------------------------------------------------------------


def probe_main(seconds: float) -> None:
    """Scrape every PROBE_INTERVAL_SECONDS as Prometheus does; print [[outcome, seconds], ...]."""
    import http.client

    headers = {"Accept": scrape_cpu.PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"}
    outcomes = []
    connection = None
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        try:
            if connection is None:
                connection = http.client.HTTPConnection(
                    "127.0.0.1",
                    PORT,
                    timeout=PROBE_TIMEOUT_SECONDS,
                    source_address=(PROBE_SOURCE, 0),
                )
            connection.request("GET", "/metrics", headers=headers)
            response = connection.getresponse()
            response.read()
            outcome: int | str = response.status
        except (OSError, http.client.HTTPException) as exc:
            outcome = type(exc).__name__
            if connection is not None:
                connection.close()
            connection = None
        elapsed = time.perf_counter() - started
        outcomes.append([outcome, elapsed])
        time.sleep(max(0.0, PROBE_INTERVAL_SECONDS - elapsed))
    sys.stdout.write(json.dumps(outcomes))


# --- report ---------------------------------------------------------------------------------------


def report(args: argparse.Namespace, info: dict, results: list[dict]) -> None:
    print(common.machine())
    print(
        f"conntrack table: {info['entries']} entries ({info['entries_after']} after); "
        f"{args.clients} concurrent hey clients "
        f"for {args.seconds} s, keep-alive, Prometheus' Accept header, gzip; a probe scraping "
        f"every {PROBE_INTERVAL_SECONDS} s from {PROBE_SOURCE} beside them"
    )
    print()
    print(
        "| | "
        + " | ".join(f"{r['label']}, --web.max-requests {r['max_requests']}" for r in results)
        + " |"
    )
    print("|---|" + "---:|" * len(results))
    for label, cell in ROWS:
        print(f"| {label} | " + " | ".join(cell(r) for r in results) + " |")
    for r in results:
        for message, n in r["errors"].items():
            print(f"{r['label']}, max_requests {r['max_requests']}: {n} x {message}")


def _count(result: dict, *codes: int) -> int:
    return sum(n for code, n in result["statuses"].items() if code in codes)


def _responses(result: dict) -> int:
    return sum(result["statuses"].values())


def _other_errors(result: dict) -> int:
    return _responses(result) - _count(result, 200, 503) + sum(result["errors"].values())


def _rate(result: dict, code: int) -> str:
    count = _count(result, code)
    return f"{count} ({count / result['seconds']:.0f}/s)"


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def _growth(result: dict, start: str, end: str = "rss_after_kib") -> str:
    return _mib(result[end] - result[start])


def _cpu(result: dict) -> str:
    return f"{result['cpu_seconds']:.1f} s ({result['cpu_seconds'] / result['seconds']:.2f} cores)"


def _percentiles(result: dict, *pcts: int) -> str:
    return " / ".join(f"{result['latency'].get(p, float('nan')) * 1000:.1f} ms" for p in pcts)


def _probe_outcomes(result: dict) -> str:
    outcomes = collections.Counter(str(outcome) for outcome, _ in result["probe"])
    return ", ".join(f"{n} x {outcome}" for outcome, n in sorted(outcomes.items()))


def _probe_latency(result: dict) -> str:
    served = sorted(seconds for outcome, seconds in result["probe"] if outcome == 200)
    if not served:
        return "none served"
    p50, p99 = (served[min(len(served) - 1, len(served) * p // 100)] for p in (50, 99))
    return f"{p50 * 1000:.1f} / {p99 * 1000:.1f} ms"


def _probe_verdict(result: dict) -> str:
    """Success: a 200 within PROBE_P99_TARGET_SECONDS. The share of such scrapes, and the p99
    of every scrape's time (a failure counts at the time it took)."""
    probe = result["probe"]
    ok = sum(1 for outcome, s in probe if outcome == 200 and s < PROBE_P99_TARGET_SECONDS)
    times = sorted(seconds for _, seconds in probe)
    p99 = times[min(len(times) - 1, len(times) * 99 // 100)] if times else float("nan")
    share = ok / max(1, len(probe))
    met = share >= PROBE_SUCCESS_TARGET and p99 < PROBE_P99_TARGET_SECONDS
    verdict = "met" if met else "not met"
    return (
        f"{ok}/{len(probe)} 200s in 1 s ({100 * share:.1f} %), p99 {p99 * 1000:.0f} ms: {verdict}"
    )


ROWS = [
    ("responses", lambda r: str(_responses(r))),
    ("**served (200)**", lambda r: f"**{_rate(r, 200)}**"),
    ("503, the designed refusals", lambda r: _rate(r, 503)),
    ("**other errors** (target 0)", lambda r: f"**{_other_errors(r)}**"),
    ("latency p50 / p90, all responses", lambda r: _percentiles(r, 50, 90)),
    ("**latency p99**, all responses", lambda r: f"**{_percentiles(r, 99)}**"),
    ("probe: outcomes", _probe_outcomes),
    ("probe: latency p50 / p99 of its 200s", _probe_latency),
    ("**probe** (target >= 99 % 200s, p99 < 1 s)", lambda r: f"**{_probe_verdict(r)}**"),
    ("exporter CPU", _cpu),
    ("RSS idle, after one scrape", lambda r: _mib(r["rss_idle_kib"])),
    ("RSS before (after the warm-up)", lambda r: _mib(r["rss_before_kib"])),
    ("RSS after", lambda r: _mib(r["rss_after_kib"])),
    ("**RSS growth** over idle (target <= 5 MiB)", lambda r: f"**{_growth(r, 'rss_idle_kib')}**"),
    ("RSS growth over the warm-up", lambda r: _growth(r, "rss_before_kib")),
    ("RSS growth over a second run", lambda r: _growth(r, "rss_after_kib", "rss_again_kib")),
    ("peak RSS (sampled)", lambda r: _mib(r["peak_rss_kib"])),
    ("threads at peak / after", lambda r: f"{r['peak_threads']} / {r['threads_after']}"),
    ("refusal warnings logged (two runs)", lambda r: str(r["refusal_warnings"])),
]  # fmt: skip


# --- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200, help="concurrent clients (200)")
    parser.add_argument("--seconds", type=int, default=30, help="load duration per run (30)")
    parser.add_argument("--entries", type=int, default=100_000, help="table size (100000)")
    parser.add_argument("--role", choices=["probe"], help=argparse.SUPPRESS)
    parser.add_argument(
        "--trees",
        type=Path,
        nargs="+",
        default=[common.REPO],
        help="checkouts to run the exporter from, in turn for each --max-requests (this one); "
        "e.g. the code before a change and after it, measured in one session",
    )
    parser.add_argument(
        "--labels",
        nargs="*",
        default=[],
        help="a label for each of --trees in the report (their directory names)",
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        nargs="+",
        default=[40, 0],
        help="the exporter's --web.max-requests, one run each (40 0)",
    )
    return parser.parse_args(argv)


def main() -> int:
    args = parse_args()
    args.labels = dict(zip(map(str, args.trees), args.labels, strict=False))
    if args.role == "probe":
        probe_main(args.seconds)
        return 0
    if os.geteuid() != 0:
        sys.exit("load.py needs root: it creates a network namespace and raises a sysctl")
    if shutil.which("hey") is None:
        sys.exit("hey is missing: apt-get install hey")

    common.catch_interrupts()
    logdir = Path(tempfile.mkdtemp(prefix="bench-load-"))
    info: dict = {}
    try:
        with (
            table_scan.Namespace() as ns,
            table_scan.RaisedConntrackMax(args.entries + table_scan.MAX_MARGIN),
        ):
            common.log(f"netns {ns.name}: filling {args.entries} entries")
            table_scan.fill(ns, args.entries)
            info["entries"] = ns.count()
            # Each cap with each tree in turn, so that the trees share the machine's moods.
            results = [
                run_load(ns, tree, n, args, logdir)
                for n in args.max_requests
                for tree in args.trees
            ]
            info["entries_after"] = ns.count()
    except KeyboardInterrupt:
        common.log("interrupted; nf_conntrack_max restored, exporter and namespace removed")
        return 130
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    report(args, info, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
