"""The conntrack collector against the real kernel, in network namespaces of our own.

Every value is checked against what conntrack-tools (`conntrack -C`, `conntrack -S`) and
/proc say in the same namespace at the same moment. Needs root; skips without it.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.metrics import parse_samples, sources, stat_counters, value

pytestmark = pytest.mark.kernel

NOBODY = "65534"
DEFAULT_PORT = 9371
MAX_FILE = "/proc/sys/net/netfilter/nf_conntrack_max"
# Counters the kernel no longer reports over netlink but procfs still shows, always 0.
PROCFS_ONLY_RETIRED = {"new", "delete", "searched", "delete_list"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_once_over_netlink_matches_conntrack_tools(netns):
    netns.udp_flows(300)
    netns.inject(20)
    result = netns.exporter()
    samples = parse_samples(result.stdout)

    assert netns.conntrack_count() == 320
    assert value(samples, "conntrack_entries") == 320
    assert value(samples, "conntrack_entries_limit") == int(netns.read(MAX_FILE))
    assert value(samples, "conntrack_buckets") == int(
        netns.read("/proc/sys/net/netfilter/nf_conntrack_buckets")
    )
    assert (
        value(samples, "conntrack_exporter_source_info", collector="conntrack", source="netlink")
        == 1
    )
    assert value(samples, "conntrack_exporter_collector_success", collector="conntrack") == 1
    tools = netns.conntrack_stats()
    ours = stat_counters(samples)
    assert ours["insert"] == tools["insert"] == 20  # the kernel counts ctnetlink inserts only
    for name, count in tools.items():
        assert ours[name] == count, name
    assert ours["ignore"] == 0  # retired by the kernel, kept in our contract


def test_per_cpu_option_labels_each_cpu(netns, tmp_path):
    netns.inject(30)
    config = tmp_path / "config.yml"
    config.write_text("collectors:\n  conntrack:\n    per_cpu: true\n")
    samples = parse_samples(netns.exporter("--config.file", str(config)).stdout)

    # The host's series, per CPU (the pods collector sums other namespaces' over CPUs).
    pod_labels = {"cgroup", "pod_uid", "namespace", "pod"}
    series = samples["conntrack_stat_insert_total"]
    per_cpu = {k: v for k, v in series.items() if not pod_labels & dict(k).keys()}
    assert all(labels[0][0] == "cpu" for labels in per_cpu)
    assert len(per_cpu) == len(netns.run("conntrack", "-S").stdout.splitlines())
    assert sum(per_cpu.values()) == netns.conntrack_stats()["insert"] == 30


def test_unprivileged_falls_back_to_procfs(netns):
    netns.udp_flows(100)
    netns.inject(20)
    result = netns.exporter("--log.format", "json", user=NOBODY)
    samples = parse_samples(result.stdout)

    assert value(samples, "conntrack_entries") == netns.conntrack_count() == 120
    assert (
        value(samples, "conntrack_exporter_source_info", collector="conntrack", source="procfs")
        == 1
    )
    assert value(samples, "conntrack_exporter_collector_success", collector="conntrack") == 1
    ours = stat_counters(samples)
    tools = netns.conntrack_stats()
    assert ours["insert"] == tools["insert"] == 20
    for name, count in tools.items():
        assert ours[name] == count, name
    assert set(ours) - set(tools) <= {"ignore", "expect_new", "expect_create", "expect_delete"}
    warnings = [json.loads(line) for line in result.stderr.splitlines()]
    assert sorted((w["level"], w["logger"]) for w in warnings) == [
        ("warn", "conntrack_exporter.collectors.conntrack"),
        ("warn", "conntrack_exporter.collectors.conntrack_table"),
    ]
    assert all("CAP_NET_ADMIN" in w["msg"] for w in warnings)
    assert value(samples, "conntrack_exporter_collector_success", collector="conntrack_table") == 0


@pytest.mark.parametrize("user", [None, NOBODY], ids=["root", "nobody"])
def test_conntrack_absent_reports_failure_and_no_series(netns, user):
    # A procfs without conntrack files: as root too, no netlink request is made (it would
    # make the kernel load conntrack), and nothing partial is reported.
    with tempfile.TemporaryDirectory() as empty:
        Path(empty).chmod(0o755)  # readable by nobody: absent files, not a refused directory
        # The conntrack collectors only: an empty procfs is a bad root for the socket ones,
        # which rightly warn about it.
        result = netns.exporter(
            "--path.procfs",
            empty,
            "--log.level",
            "debug",
            "--collector.disable-defaults",
            "--collector.conntrack",
            "--collector.conntrack_table",
            user=user,
        )
    samples = parse_samples(result.stdout)

    assert result.returncode == 0
    assert value(samples, "conntrack_exporter_collector_success", collector="conntrack") == 0
    # No data series; only the table scan's error counts, at zero, as from every first scrape.
    assert [
        name
        for name in samples
        if name.startswith("conntrack_") and not name.startswith("conntrack_exporter_")
    ] == ["conntrack_table_scan_errors_total"]
    assert set(samples["conntrack_table_scan_errors_total"].values()) == {0}
    assert "conntrack_exporter_source_info" not in samples
    assert "nf_conntrack_buckets is absent: conntrack is not loaded" in result.stderr
    assert "level=debug" in result.stderr and "level=warn" not in result.stderr


def test_table_full_drops_counted_like_conntrack_tools(netns):
    before_tools = netns.conntrack_stats()
    before = stat_counters(parse_samples(netns.exporter().stdout))
    with netns.table_full():
        netns.udp_flows(25, first_port=30000)
        after = stat_counters(parse_samples(netns.exporter().stdout))
        after_tools = netns.conntrack_stats()

    dropped = after_tools["drop"] - before_tools["drop"]
    assert dropped >= 25  # every datagram found the table full of assured TCP entries
    assert after["drop"] - before["drop"] == dropped
    assert after["early_drop"] - before["early_drop"] == (
        after_tools["early_drop"] - before_tools["early_drop"]
    )


def fetch(netns, url: str, headers: dict[str, str] | None = None) -> tuple[int, dict, str]:
    """GET a URL from inside the namespace (where the exporter listens)."""
    out = netns.python(
        """
        import json, sys, urllib.error, urllib.request
        request = urllib.request.Request(sys.argv[1], headers=json.loads(sys.argv[2]))
        try:
            response = urllib.request.urlopen(request, timeout=10)
        except urllib.error.HTTPError as exc:
            response = exc
        body = response.read().decode()
        print(json.dumps([response.status, dict(response.headers), body]))
        """,
        url,
        json.dumps(headers or {}),
    )
    status, response_headers, body = json.loads(out)
    return status, response_headers, body


def start_exporter(netns, *flags: str, user: str | None = None) -> tuple[subprocess.Popen, int]:
    port = free_port()
    netns.untrack_tcp_port(port)
    proc = netns.popen_exporter("--web.listen-address", f"127.0.0.1:{port}", *flags, user=user)
    wait_listening(netns, port, proc)
    return proc, port


def wait_listening(netns, port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exporter exited: {proc.communicate()}")
        try:
            fetch(netns, f"http://127.0.0.1:{port}/healthz")
            return
        except subprocess.CalledProcessError:
            time.sleep(0.1)
    raise AssertionError("exporter did not start listening")


def test_live_server_serves_metrics_landing_page_and_health(netns):
    netns.udp_flows(77)
    proc, port = start_exporter(netns, "--web.telemetry-path", "/probe")
    try:
        status, headers, body = fetch(netns, f"http://127.0.0.1:{port}/probe")
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
        samples = parse_samples(body)
        assert value(samples, "conntrack_entries") == netns.conntrack_count() == 77
        assert stat_counters(samples)["insert"] == netns.conntrack_stats()["insert"]

        status, headers, page = fetch(netns, f"http://127.0.0.1:{port}/")
        assert status == 200 and 'href="/probe"' in page
        # The scrape above ran every collector: the conntrack collector's row says how.
        row = re.search(r"<tr><td>conntrack</td><td>[^<]* UTC \([^<]*\)</td>(.*?)</tr>", page)
        assert row is not None, page
        assert row.group(1) == "<td>ok</td><td>netlink</td><td></td>"
        assert fetch(netns, f"http://127.0.0.1:{port}/healthz")[0] == 200
        assert fetch(netns, f"http://127.0.0.1:{port}/metrics")[0] == 404

        status, headers, body = fetch(
            netns,
            f"http://127.0.0.1:{port}/probe",
            {"Accept": "application/openmetrics-text; version=1.0.0"},
        )
        assert headers["Content-Type"].startswith("application/openmetrics-text")
        assert body.rstrip().endswith("# EOF")
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=5)
    # SIGTERM: a clean stop, promptly (the generous timeout above is not a benchmark).
    assert proc.returncode == 0, stderr
    assert "msg=stopping signal=SIGTERM" in stderr


def test_default_listen_address_serves_ipv4_and_ipv6(netns):
    """No --web.listen-address: ':9371', every interface, IPv4 and IPv6 on one socket."""
    netns.untrack_tcp_port(DEFAULT_PORT)
    proc = netns.popen_exporter()
    try:
        wait_listening(netns, DEFAULT_PORT, proc)
        for host in ("127.0.0.1", "[::1]"):
            status, _, body = fetch(netns, f"http://{host}:{DEFAULT_PORT}/healthz")
            assert (status, body) == (200, "ok\n")
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=5)
    assert proc.returncode == 0, stderr
    assert f"address=[::]:{DEFAULT_PORT}" in stderr


def test_live_server_falls_back_once_when_unprivileged(netns):
    netns.udp_flows(10)
    proc, port = start_exporter(netns, user=NOBODY)
    try:
        for _ in range(3):
            samples = parse_samples(fetch(netns, f"http://127.0.0.1:{port}/metrics")[2])
            assert value(samples, "conntrack_entries") == 10
            assert sources(samples, "conntrack") == ["procfs"]
    finally:
        proc.send_signal(2)  # SIGINT stops it as cleanly as SIGTERM
        _, stderr = proc.communicate(timeout=5)
    assert proc.returncode == 0
    # One line each from the conntrack collector and the table scan, however many scrapes.
    assert stderr.count("ctnetlink refused") == 1
    assert stderr.count("conntrack table scan refused") == 1


def test_taken_listen_address_exits_1(netns):
    blocker, port = start_exporter(netns)
    try:
        second = netns.run(
            sys.executable,
            "-m",
            "conntrack_exporter",
            "--web.listen-address",
            f"127.0.0.1:{port}",
            check=False,
        )
    finally:
        blocker.terminate()
        blocker.communicate(timeout=5)
    assert second.returncode == 1
    assert "cannot listen" in second.stderr and "Address already in use" in second.stderr


def test_open_files_soft_limit_is_raised_to_the_hard_one(netns):
    """Started with systemd's soft limit below its hard one, the exporter raises it, as Go
    programs do: the pods collector holds fds on every pod's counter files."""
    port = free_port()
    netns.untrack_tcp_port(port)
    proc = subprocess.Popen(
        [
            *("ip", "netns", "exec", netns.name, "prlimit", "--nofile=512:8192"),
            *(sys.executable, "-m", "conntrack_exporter"),
            *("--web.listen-address", f"127.0.0.1:{port}"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_listening(netns, port, proc)
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
    finally:
        proc.terminate()
        proc.communicate(timeout=5)
    assert re.search(r"^Max open files\s+8192\s+8192\s", limits, re.MULTILINE), limits
