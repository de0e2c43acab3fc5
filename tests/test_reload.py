"""SIGHUP reloads the configuration file; a bad new file is refused and the old one kept.

The real exporter as a process, on loopback, with only the socket collectors (no privilege,
no namespace needed); real signals, real scrapes.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conntrack_exporter.netns import ADDRESS_FILES, NAMESPACE_FILES
from tests.metrics import parse_samples, value
from tests.test_counter_wrap import NEAR_WRAP, WRAPPED, stat_text
from tests.test_counter_wrap import PROCFS as WRAP_PROCFS
from tests.test_counter_wrap import STAT_FILE as WRAP_STAT_FILE
from tests.test_web_load import free_port

SOCKET_ONLY = "collectors:\n  disable_defaults: true\n  socket:\n    enabled: true\n"
PORTS_ONLY = (
    "collectors:\n"
    "  disable_defaults: true\n"
    "  socket_ports:\n"
    "    enabled: true\n"
    "    interval_seconds: 1\n"
)
BAD = "collectors:\n  socket:\n    enabled: maybe\n  sockets: {}\n"
CONNTRACK_ONLY = "collectors:\n  disable_defaults: true\n  conntrack:\n    enabled: true\n"


def wait_for_line(
    lines: queue.Queue[str], process: subprocess.Popen, text: str, timeout: float
) -> str:
    """The first log line holding `text` that the exporter writes within `timeout` seconds
    (a reader thread puts its lines in `lines`); fails as soon as the exporter exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            assert process.poll() is None, "the exporter exited"
            continue
        if text in line:
            return line
    raise AssertionError(f"no log line with {text!r}")


class Exporter:
    """The exporter as a process, its log lines as they come."""

    def __init__(self, config: Path, *flags: str, user: str | None = None) -> None:
        self.port = free_port()
        as_user = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
        self.process = subprocess.Popen(
            [
                *(as_user if user else []),
                *(sys.executable, "-m", "conntrack_exporter", f"--config.file={config}"),
                f"--web.listen-address=127.0.0.1:{self.port}",
                *flags,
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_for("msg=listening")

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float = 20) -> str:
        return wait_for_line(self.lines, self.process, text, timeout)

    def reload(self, text: str) -> str:
        self.process.send_signal(signal.SIGHUP)
        return self.wait_for(text)

    def scrape(self) -> dict:
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return parse_samples(response.read().decode())


@pytest.fixture
def exporter(tmp_path) -> Iterator[tuple[Exporter, Path]]:
    config = tmp_path / "config.yml"
    config.write_text(SOCKET_ONLY)
    running = Exporter(config)
    try:
        yield running, config
    finally:
        running.process.terminate()
        running.process.wait(timeout=10)
    assert running.process.returncode == 0


def test_sighup_applies_a_new_configuration(exporter):
    running, config = exporter
    samples = running.scrape()
    assert value(samples, "conntrack_exporter_collector_success", collector="socket") == 1
    assert "socket_ephemeral_ports_used_max" not in samples

    config.write_text(PORTS_ONLY)
    line = running.reload('msg="configuration reloaded"')
    assert "collectors=socket_ports" in line
    deadline = time.monotonic() + 20
    while "socket_ephemeral_ports_used_max" not in (samples := running.scrape()):
        assert time.monotonic() < deadline, "the new collector's scan never showed"
        time.sleep(0.2)
    assert value(samples, "conntrack_exporter_collector_success", collector="socket_ports") == 1
    assert "socket_inuse" not in samples
    assert set(samples["conntrack_exporter_collector_success"]) == {
        (("collector", "socket_ports"),)
    }


def test_sighup_with_a_bad_file_keeps_the_running_configuration(exporter):
    running, config = exporter
    before = running.scrape()
    config.write_text(BAD)
    line = running.reload("configuration reload failed")
    assert "level=error" in line
    assert f"{config}:3: collectors.socket.enabled: expected a boolean" in line
    assert f"{config}:4: collectors.sockets: unknown key" in line
    after = running.scrape()
    assert value(after, "conntrack_exporter_collector_success", collector="socket") == 1
    assert set(after) == set(before)

    # Fixed again, it reloads: the refusal left nothing half-applied.
    config.write_text(SOCKET_ONLY + "log:\n  level: debug\n")
    running.reload('msg="configuration reloaded"')


def reload_status(samples: dict) -> tuple[float, float]:
    return (
        value(samples, "conntrack_exporter_config_last_reload_successful"),
        value(samples, "conntrack_exporter_config_last_reload_success_timestamp_seconds"),
    )


def test_the_reload_gauges_follow_each_sighup(tmp_path):
    """As Prometheus' config_last_reload_*: set by the start-up load, 0 after a refused reload
    (the old configuration serving on, the timestamp that of the last success), 1 again with
    a new timestamp after a good one."""
    config = tmp_path / "config.yml"
    config.write_text(SOCKET_ONLY)
    started = time.time()
    running = Exporter(config)
    try:
        listening = time.time()
        successful, loaded = reload_status(running.scrape())
        assert successful == 1 and started <= loaded <= listening

        config.write_text(BAD)
        before_bad = time.time()
        running.reload("configuration reload failed")
        samples = running.scrape()
        assert reload_status(samples) == (0, loaded)
        assert value(samples, "conntrack_exporter_collector_success", collector="socket") == 1
        assert "socket_ephemeral_ports_used_max" not in samples  # still the old configuration

        config.write_text(PORTS_ONLY)
        running.reload('msg="configuration reloaded"')
        successful, reloaded = reload_status(running.scrape())
        assert successful == 1 and before_bad <= reloaded <= time.time()
    finally:
        running.process.terminate()
        running.process.wait(timeout=10)
    assert running.process.returncode == 0


def test_sighup_says_which_web_settings_need_a_restart(exporter):
    running, config = exporter
    config.write_text(SOCKET_ONLY + "web:\n  max_requests: 3\n  read_timeout_seconds: 5\n")
    line = running.reload("take effect at the next start")
    assert "settings=web.max_requests,web.read_timeout_seconds" in line
    running.wait_for('msg="configuration reloaded"')
    # Still serving where it was.
    assert value(running.scrape(), "conntrack_exporter_collector_success", collector="socket")


# -- the lifecycle: what a reload opens, it closes ---------------------------------------------

EVERY_COLLECTOR = (
    "collectors:\n"
    "  conntrack_table:\n"
    "    interval_seconds: 0.3\n"
    "  socket_ports:\n"
    "    interval_seconds: 0.3\n"
)
FEWER_COLLECTORS = (
    "collectors:\n"
    "  conntrack:\n"
    "    per_cpu: true\n"
    "  conntrack_table:\n"
    "    enabled: false\n"
    "  socket_ports:\n"
    "    interval_seconds: 0.5\n"
)
SCANNED = ("conntrack_table", "socket_ports")


# The pods collector's fds: one on each of a namespace's files (none is absent here).
NAMESPACE_FILE = re.compile(r"^/proc/(\d+)/net/")
FILES_PER_NAMESPACE = len(NAMESPACE_FILES + ADDRESS_FILES)


def held(pid: int) -> dict[str, int]:
    """The process's open fds but the pods collector's, threads, and netlink sockets among
    the fds; and the pods collector's fds on other network namespaces' files, whose number
    follows the namespaces on the machine (other tests make and remove some meanwhile)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    sockets = set()
    fds = namespace_files = 0
    for fd in fd_dir.iterdir():
        with contextlib.suppress(FileNotFoundError):  # an fd closed while we look
            target = os.readlink(fd)
            if target.startswith("socket:["):
                sockets.add(target[len("socket:[") : -1])
            found = NAMESPACE_FILE.match(target)
            if found and found[1] != str(pid):  # its own: the host collectors' files
                namespace_files += 1
            else:
                fds += 1
    rows = Path(f"/proc/{pid}/net/netlink").read_text().splitlines()[1:]
    netlink = {row.split()[-1] for row in rows}  # the Inode column
    return {
        "fds": fds,
        "threads": len(list(Path(f"/proc/{pid}/task").iterdir())),
        "netlink_sockets": len(sockets & netlink),
        "namespace_files": namespace_files,
    }


def settled(running: Exporter, scanned: tuple[str, ...]) -> dict[str, int]:
    """What the process holds once the collectors have scraped and scanned: waits until each
    background collector served a scan and the counts stop moving (transient connection
    threads end), 20 s at most."""
    deadline = time.monotonic() + 20
    last: dict[str, int] = {}
    while True:
        # Before this round's scrape, half a second after the last one: that scrape's
        # connection (an fd) and its thread are gone by now, this one's not yet there.
        now = held(running.process.pid)
        samples = running.scrape()
        done = all(
            value(samples, "conntrack_exporter_collector_success", collector=name) == 1
            for name in scanned
        )
        if "conntrack_exporter_pod_namespaces" in samples:
            now["pod_namespaces"] = value(samples, "conntrack_exporter_pod_namespaces")
        if done and now == last:
            return now
        assert time.monotonic() < deadline, f"never settled: {now} after {last}"
        last = now
        time.sleep(0.5)


@pytest.mark.skipif(os.geteuid() != 0, reason="conntrack_table needs CAP_NET_ADMIN (CI is root)")
def test_fifty_reloads_leave_fds_threads_and_netlink_sockets_where_they_were(tmp_path):
    """Each reload stops and joins the old scanner and closes the old collectors (their
    netlink sockets and kept-open /proc files) before the new ones start. Before, 31 reloads
    took the process from 16 to 298 open fds. The pods collector's fds on other namespaces
    follow the machine's namespaces: at each point, exactly those of the namespaces it
    reports."""
    config = tmp_path / "config.yml"
    config.write_text(EVERY_COLLECTOR)
    running = Exporter(config)
    try:
        before = settled(running, SCANNED)
        assert before["netlink_sockets"] == 3  # conntrack's stats, the table's, sock_diag's
        for reload in range(50):
            config.write_text(FEWER_COLLECTORS if reload % 2 == 0 else EVERY_COLLECTOR)
            running.reload('msg="configuration reloaded"')
            if reload == 0:
                fewer = settled(running, ("socket_ports",))
                assert fewer["netlink_sockets"] == 2  # the table's is closed
        after = settled(running, SCANNED)
    finally:
        running.process.terminate()
        running.process.wait(timeout=10)
    for point in (before, fewer, after):
        assert point.pop("namespace_files") == point.pop("pod_namespaces") * FILES_PER_NAMESPACE
    assert after == before
    assert running.process.returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the exporter as nobody with setpriv")
def test_a_reload_keeps_the_running_totals_of_counters_that_wrapped():
    """The real exporter, as nobody (netlink refused: procfs serves the counters), over a
    procfs root whose per-CPU stat file a CPU's 32-bit drop counter wraps in, across a real
    SIGHUP. The totals outlive the reload's new collectors: the counter rises by the wrapped
    advance, where a reload that started again from the kernel's sum would fall by 2^32."""
    root = Path(tempfile.mkdtemp(prefix="cte-wrap-", dir="/tmp"))  # nobody reads it
    try:
        shutil.copytree(WRAP_PROCFS, root, dirs_exist_ok=True)
        for path in [root, *root.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        stat = root / WRAP_STAT_FILE
        stat.write_text(stat_text([{"drop": 7}, {"drop": NEAR_WRAP}]))
        config = root / "config.yml"
        config.write_text(CONNTRACK_ONLY)
        running = Exporter(config, "--path.procfs", str(root), user="65534")
        try:
            before = value(running.scrape(), "conntrack_stat_drop_total")
            stat.write_text(stat_text([{"drop": 7}, {"drop": WRAPPED}]))
            config.write_text(CONNTRACK_ONLY + "log:\n  level: debug\n")
            running.reload('msg="configuration reloaded"')
            after = value(running.scrape(), "conntrack_stat_drop_total")
        finally:
            running.process.terminate()
            running.process.wait(timeout=10)
    finally:
        shutil.rmtree(root)
    assert before == 7 + NEAR_WRAP
    assert after == before + 0x20
