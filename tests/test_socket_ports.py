"""The socket_ports collector over captured sock_diag replies: golden exposition and bookkeeping.

The replies captured by tests/fixtures/capture_sockdiag.py stand in for the netlink socket (the
I/O edge: tests.test_inet_diag.ReplayedSocket answers each request the reader makes with the
kernel's reply to the same bytes); the reader's requests, the tally, the collector and every
family are the real code. tests/test_kernel_ports.py covers the live socket.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conntrack_exporter.collectors.socket_ports import SocketPortsCollector, SocketPortsOptions
from conntrack_exporter.netlink import NetlinkError, NetlinkTimeout
from conntrack_exporter.netlink.inet_diag import SockDiagReader
from conntrack_exporter.registry import NoDataError
from tests.collectors import context, exposition
from tests.metrics import parse_samples, value
from tests.test_golden import MASKS
from tests.test_inet_diag import PORT_RANGE, ReplayedSocket

GOLDEN = Path(__file__).parent / "golden" / "socket_ports.prom"
TIME_MASK = (
    re.compile(r"^(socket_ports_scan_(?:duration|timestamp)_seconds) .*$", re.M),
    r"\1 <time>",
)
# What the captured mix holds (tests/test_inet_diag.py spells out where each count comes from).
USED = {
    ("tcp", "127.0.0.1", "8080"): 7,
    ("tcp", "127.0.0.1", "40001"): 4,
    ("tcp", "::1", "40001"): 2,
    ("tcp", "", ""): 1,
    ("udp", "127.0.0.1", "5353"): 3,
    ("udp", "::1", "5300"): 1,
    ("udp", "", ""): 4,
}
READ = 28  # the counted sockets and the 6 accepted on the listener inside the range


class ScriptedSocket(ReplayedSocket):
    """The replay, but each scan's first dump raises the next scripted fault first."""

    def __init__(self, *faults: Exception | None) -> None:
        super().__init__()
        self.faults = list(faults)

    def dump(self, msg_type, payload, on_message, bounds=None):
        if len(self.asked) % 6 == 0 and self.faults:  # six dumps a scan
            fault = self.faults.pop(0)
            if fault is not None:
                raise fault
        return super().dump(msg_type, payload, on_message, bounds)


def port_sysctls(root: Path, port_range: str = "32768\t60999\n", reserved: str = "\n") -> Path:
    """`root`, a procfs with the port sysctls (by default the capture's range)."""
    sysctl = root / "sys" / "net" / "ipv4"
    sysctl.mkdir(parents=True, exist_ok=True)
    (sysctl / "ip_local_port_range").write_text(port_range)
    (sysctl / "ip_local_reserved_ports").write_text(reserved)
    return root


def collector_over(
    root: Path, replay: ReplayedSocket | None = None, **options
) -> SocketPortsCollector:
    """A collector whose reader answers from the capture (through `replay`, if given);
    procfs holds the capture's range."""
    reader = SockDiagReader(netlink_socket=replay or ReplayedSocket())
    return SocketPortsCollector(
        SocketPortsOptions(**options), context(port_sysctls(root), sock_diag=lambda: reader)
    )


def used(samples: dict) -> dict[tuple[str, str, str], float]:
    return {
        (labels["protocol"], labels["destination"], labels["port"]): count
        for labels, count in (
            (dict(key), count) for key, count in samples["socket_ephemeral_ports_used"].items()
        )
    }


def errors(samples: dict) -> dict[str, float]:
    return {dict(key)["reason"]: n for key, n in samples["socket_ports_scan_errors_total"].items()}


def test_golden_exposition_from_captured_replies(tmp_path):
    collector = collector_over(tmp_path)
    collector.scan()
    text = exposition(collector)
    got = text
    for pattern, replacement in [*MASKS, TIME_MASK]:
        got = pattern.sub(replacement, got)
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(got)
    assert got == GOLDEN.read_text()
    samples = parse_samples(text)
    assert used(samples) == USED
    assert value(samples, "socket_ephemeral_ports_used_max", protocol="tcp") == 7
    assert value(samples, "socket_ephemeral_ports_used_max", protocol="udp") == 4
    assert value(samples, "socket_ports_scan_sockets") == READ
    assert value(samples, "socket_ports_scan_complete") == 1
    assert set(errors(samples).values()) == {0}


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="needs promtool (make test installs it)"
)
def test_promtool_accepts_the_golden_file():
    lint = subprocess.run(
        ["promtool", "check", "metrics"],
        input=GOLDEN.read_text().replace("<time>", "1").replace("<duration>", "1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert lint.returncode == 0 and lint.stdout + lint.stderr == "", lint.stdout + lint.stderr


def test_top_k_names_that_many_destinations_and_zero_turns_them_off(tmp_path):
    collector = collector_over(tmp_path, top_k=1)
    collector.scan()
    samples = parse_samples(exposition(collector))
    assert used(samples) == {("tcp", "127.0.0.1", "8080"): 7}

    collector = collector_over(tmp_path, top_k=0)
    collector.scan()
    samples = parse_samples(exposition(collector))
    assert "socket_ephemeral_ports_used" not in samples
    assert value(samples, "socket_ephemeral_ports_used_max", protocol="udp") == 4


def test_reserved_ports_are_read_at_each_scan(tmp_path):
    collector = collector_over(tmp_path)
    low, high = PORT_RANGE
    port_sysctls(tmp_path, reserved=f"{low}-{high}\n")  # the whole range reserved: nothing counts
    collector.scan()
    samples = parse_samples(exposition(collector))
    assert "socket_ephemeral_ports_used" not in samples  # a family without samples
    assert value(samples, "socket_ephemeral_ports_used_max", protocol="tcp") == 0
    assert value(samples, "socket_ephemeral_ports_used_max", protocol="udp") == 0
    assert value(samples, "socket_ports_scan_sockets") == READ  # read all the same

    port_sysctls(tmp_path, reserved="\n")
    collector.scan()
    assert used(parse_samples(exposition(collector))) == USED


def test_a_spent_budget_says_incomplete_and_counts_are_lower_bounds(tmp_path):
    collector = collector_over(tmp_path, max_sockets=5)
    collector.scan()
    samples = parse_samples(exposition(collector))
    assert value(samples, "socket_ports_scan_complete") == 0
    assert value(samples, "socket_ports_scan_sockets") == 5
    assert sum(used(samples).values()) <= 5
    for key, count in used(samples).items():
        assert count <= USED[key]


def test_without_the_port_range_file_there_is_no_data(tmp_path):
    collector = collector_over(tmp_path)
    (tmp_path / "sys" / "net" / "ipv4" / "ip_local_port_range").unlink()
    collector.scan()
    with pytest.raises(NoDataError, match="ip_local_port_range"):
        collector.collect()


def test_before_the_first_scan_there_is_no_data_but_the_error_counts(tmp_path):
    collector = collector_over(tmp_path)
    with pytest.raises(NoDataError, match="no socket scan to serve: waiting for the first scan"):
        collector.collect()
    samples = parse_samples(exposition(collector))
    assert set(errors(samples).values()) == {0}
    assert value(samples, "conntrack_exporter_collector_success", collector="socket_ports") == 0


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (NetlinkError(errno.ENOBUFS, "No buffer space available"), "no_buffer_space"),
        (NetlinkTimeout(errno.ETIMEDOUT, "the kernel sent nothing for 2 s"), "timeout"),
        (NetlinkError(errno.EIO, "Input/output error"), "other"),
    ],
)
def test_a_failed_scan_is_counted_and_the_last_good_one_served(tmp_path, fault, reason):
    collector = collector_over(tmp_path, ScriptedSocket(None, fault, fault))
    collector.scan()
    first = parse_samples(exposition(collector))
    collector.scan()
    collector.scan()
    samples = parse_samples(exposition(collector))
    assert errors(samples)[reason] == 2 and sum(errors(samples).values()) == 2
    assert used(samples) == USED
    stamp = "socket_ports_scan_timestamp_seconds"
    assert value(samples, stamp) == value(first, stamp)  # the age shows it is the old scan


def test_refusal_stops_scanning(tmp_path):
    replay = ScriptedSocket(NetlinkError(errno.EPERM, "Operation not permitted"))
    collector = collector_over(tmp_path, replay)
    collector.scan()
    collector.scan()  # not asked again: the refusal is final
    assert replay.asked == []
    with pytest.raises(NoDataError, match="refused: socket port scan refused"):
        collector.collect()
    assert errors(parse_samples(exposition(collector)))["permission"] == 1
