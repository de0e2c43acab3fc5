"""conntrack_table's scan bookkeeping: retries, error counting, serving the last good scan.

NLM_F_DUMP_INTR, ENOBUFS and timeouts cannot be provoked on demand here, so a stand-in for
ConntrackTableReader (the narrowest seam: the socket edge) returns or raises them; the
entries it "reads" are real captured kernel messages.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable

import pytest

from conntrack_exporter.collectors.conntrack_table import (
    ConntrackTableCollector,
    ConntrackTableOptions,
)
from conntrack_exporter.netlink import NetlinkError, NetlinkTimeout
from conntrack_exporter.netlink.socket import DumpBounds, DumpCancelled, DumpResult
from conntrack_exporter.registry import NoDataError
from tests.collectors import CAPTURED_ENTRIES, ReplayedTable, context, exposition
from tests.metrics import parse_samples, value

ENTRIES = CAPTURED_ENTRIES
SUCCESS = "conntrack_exporter_collector_success"


class ScriptedReader(ReplayedTable):
    """Answers each dump with the next scripted outcome: the captured dump, flagged
    interrupted or not, or an exception."""

    def __init__(self, *outcomes: object) -> None:
        super().__init__()
        self.outcomes = list(outcomes)
        self.bounds: list[DumpBounds | None] = []

    def dump(self, tally, bounds: DumpBounds | None = None) -> DumpResult:
        self.bounds.append(bounds)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            self.dumps += 1
            raise outcome
        return super().dump(tally, bounds)._replace(interrupted=outcome == "interrupted")


TableOver = Callable[..., ConntrackTableCollector]


@pytest.fixture
def table(tmp_path) -> TableOver:
    """A table collector over a procfs with the dump's entry count, reading from `reader`."""
    count = tmp_path / "sys" / "net" / "netfilter" / "nf_conntrack_count"
    count.parent.mkdir(parents=True)
    count.write_text(f"{ENTRIES}\n")

    def over(reader: object, **options: object) -> ConntrackTableCollector:
        return ConntrackTableCollector(
            ConntrackTableOptions(**options), context(tmp_path, conntrack_table=lambda: reader)
        )

    return over


def scrape(collector) -> dict:
    return parse_samples(exposition(collector))


def errors(samples: dict) -> dict[str, float]:
    return {dict(labels)["reason"]: count for labels, count in
            samples["conntrack_table_scan_errors_total"].items()}  # fmt: skip


def test_interrupted_dump_is_retried_once_and_then_served_and_counted(table):
    reader = ScriptedReader("interrupted", "ok", "interrupted", "interrupted")
    collector = table(reader)
    collector.scan()
    assert reader.dumps == 2
    assert errors(scrape(collector))["interrupted"] == 0

    collector.scan()
    samples = scrape(collector)
    assert reader.dumps == 4
    assert errors(samples)["interrupted"] == 1
    assert value(samples, "conntrack_table_scan_entries") == ENTRIES  # served all the same


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (NetlinkError(errno.ENOBUFS, "No buffer space available"), "no_buffer_space"),
        (NetlinkTimeout(errno.ETIMEDOUT, "the kernel sent nothing for 2 s"), "timeout"),
        (NetlinkError(errno.EIO, "Input/output error"), "other"),
    ],
)
def test_a_failed_scan_is_counted_and_the_last_good_one_served(table, fault, reason):
    collector = table(ScriptedReader("ok", fault, fault))
    collector.scan()
    first = scrape(collector)
    collector.scan()
    collector.scan()
    samples = scrape(collector)
    assert errors(samples)[reason] == 2
    assert sum(errors(samples).values()) == 2
    assert value(samples, SUCCESS, collector="conntrack_table") == 1
    stamp = "conntrack_table_scan_timestamp_seconds"
    assert value(samples, stamp) == value(first, stamp)  # the age shows it is the old scan


def test_refusal_stops_scanning_and_reports_no_data(table):
    reader = ScriptedReader(NetlinkError(errno.EPERM, "Operation not permitted"))
    collector = table(reader)
    collector.scan()
    collector.scan()  # no second dump: the refusal is final
    assert reader.dumps == 1
    with pytest.raises(NoDataError, match="refused: conntrack table scan refused"):
        collector.collect()
    samples = scrape(collector)
    assert errors(samples)["permission"] == 1
    assert value(samples, SUCCESS, collector="conntrack_table") == 0


def test_before_the_first_scan_the_error_counts_are_served_at_zero(table):
    collector = table(ScriptedReader())
    with pytest.raises(NoDataError, match="no table scan to serve: waiting for the first scan"):
        collector.collect()
    samples = scrape(collector)
    assert errors(samples) == dict.fromkeys(errors(samples), 0.0)
    assert set(errors(samples)) == {
        "permission", "timeout", "no_buffer_space", "interrupted", "parse", "other"
    }  # fmt: skip
    assert value(samples, SUCCESS, collector="conntrack_table") == 0
    assert "conntrack_table_scan_timestamp_seconds" not in samples


def test_scans_that_always_fail_show_their_count_not_only_success_0(table):
    fault = NetlinkTimeout(errno.ETIMEDOUT, "the kernel sent nothing for 2 s")
    collector = table(ScriptedReader(fault, fault, fault))
    for _ in range(3):
        collector.scan()
    samples = scrape(collector)
    assert errors(samples)["timeout"] == 3
    assert value(samples, SUCCESS, collector="conntrack_table") == 0
    with pytest.raises(NoDataError, match=r"failing: timeout: .*the kernel sent nothing"):
        collector.collect()


def test_a_socket_that_cannot_be_opened_is_a_counted_failure(tmp_path):
    # A kernel without nfnetlink refuses the socket itself; it cannot be unloaded here.
    def no_netlink() -> None:
        raise OSError(errno.EPROTONOSUPPORT, "Protocol not supported")

    count = tmp_path / "sys" / "net" / "netfilter" / "nf_conntrack_count"
    count.parent.mkdir(parents=True)
    count.write_text("1\n")
    options = ConntrackTableOptions()
    collector = ConntrackTableCollector(options, context(tmp_path, conntrack_table=no_netlink))
    collector.scan()  # must not raise into the scanner's last-resort handler
    collector.scan()
    assert errors(scrape(collector))["other"] == 2
    with pytest.raises(NoDataError, match=r"failing: other: .*Protocol not supported"):
        collector.collect()


def test_each_scan_gets_its_own_whole_scan_deadline_and_the_stop_event(table):
    reader = ScriptedReader("ok", "ok")
    collector = table(reader, scan_timeout_seconds=77.0)
    stop = threading.Event()
    collector.scan(stop)
    collector.scan(stop)
    first, second = reader.bounds
    assert first is not None and second is not None
    assert first.stop is stop
    # Each deadline is 77 s after its own scan began, not one deadline for every scan.
    assert second.deadline >= first.deadline
    assert 70 < first.deadline - time.monotonic() <= 77


def test_a_cancelled_scan_counts_nothing_and_keeps_the_last_good_one(table):
    collector = table(ScriptedReader("ok", DumpCancelled()))
    collector.scan()
    first = scrape(collector)
    collector.scan()
    samples = scrape(collector)
    assert sum(errors(samples).values()) == 0
    stamp = "conntrack_table_scan_timestamp_seconds"
    assert value(samples, stamp) == value(first, stamp)


def test_close_closes_the_reader_the_scan_opened(table):
    reader = ScriptedReader("ok")
    collector = table(reader)
    collector.close()  # never scanned: nothing opened, nothing to close
    assert not reader.closed
    collector.scan()
    collector.close()
    assert reader.closed


def test_the_pods_discovery_runs_before_the_table_scan_and_shares_its_addresses():
    """The scanner runs its jobs in the collector table's order at start (and --once runs
    each once, in that order): the first table scan already names the pods."""
    from conntrack_exporter.cli import build_collectors
    from conntrack_exporter.collectors import COLLECTORS
    from conntrack_exporter.config import load_config
    from conntrack_exporter.registry import Lasting

    collectors = build_collectors(load_config(None, {}, COLLECTORS), Lasting())
    try:
        jobs = [job.name for job in collectors.scanner.jobs]
        assert jobs.index("pods") < jobs.index("conntrack_table")
        by_name = {collector.name: collector for collector in collectors.collectors}
        assert by_name["pods"]._addresses is by_name["conntrack_table"]._pod_addresses
    finally:
        collectors.close()
