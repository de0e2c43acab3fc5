"""conntrack_table's scan bookkeeping: retries, error counting, serving the last good scan.

NLM_F_DUMP_INTR, ENOBUFS and timeouts cannot be provoked on demand here, so a stand-in for
ConntrackTableReader (the narrowest seam: the socket edge) returns or raises them; the
entries it "reads" are real captured kernel messages.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest

from conntrack_exporter.collectors.conntrack_table import (
    ConntrackTableCollector,
    ConntrackTableOptions,
)
from conntrack_exporter.netlink import NetlinkError, NetlinkTimeout
from conntrack_exporter.netlink.core import iter_messages
from conntrack_exporter.netlink.socket import DumpResult
from conntrack_exporter.procfs import ProcFS
from conntrack_exporter.registry import CollectorContext, ExporterCollector, NoDataError
from tests.metrics import parse_samples, value

DUMP = (Path(__file__).parent / "fixtures" / "netlink" / "ct_dump_mix.bin").read_bytes()
ENTRIES = 386


class ScriptedReader:
    """Answers each dump with the next scripted outcome: a DumpResult flag or an exception."""

    def __init__(self, *outcomes: object) -> None:
        self.outcomes = list(outcomes)
        self.dumps = 0

    def dump(self, tally) -> DumpResult:
        self.dumps += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        for msg in iter_messages(DUMP, len(DUMP)):
            tally.add_message(DUMP, msg)
        return DumpResult(complete=True, interrupted=outcome == "interrupted")


@pytest.fixture
def collector(tmp_path):
    count = tmp_path / "sys" / "net" / "netfilter" / "nf_conntrack_count"
    count.parent.mkdir(parents=True)
    count.write_text(f"{ENTRIES}\n")
    return ConntrackTableCollector(
        ConntrackTableOptions(), CollectorContext(ProcFS(str(tmp_path)), 1.0)
    )


def scrape(collector) -> dict:
    return parse_samples(generate_latest(ExporterCollector([collector])).decode())


def errors(samples: dict) -> dict[str, float]:
    return {dict(labels)["reason"]: count for labels, count in
            samples["conntrack_table_scan_errors_total"].items()}  # fmt: skip


def test_interrupted_dump_is_retried_once_and_then_served_and_counted(collector):
    collector._reader = ScriptedReader("interrupted", "ok")
    collector.scan()
    assert collector._reader.dumps == 2
    assert errors(scrape(collector))["interrupted"] == 0

    collector._reader = ScriptedReader("interrupted", "interrupted")
    collector.scan()
    samples = scrape(collector)
    assert collector._reader.dumps == 2
    assert errors(samples)["interrupted"] == 1
    assert value(samples, "conntrack_table_scan_entries") == ENTRIES  # served all the same


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (NetlinkError(errno.ENOBUFS, "No buffer space available"), "no_buffer_space"),
        (NetlinkTimeout(errno.ETIMEDOUT, "netlink read timed out"), "timeout"),
        (NetlinkError(errno.EIO, "Input/output error"), "other"),
    ],
)
def test_a_failed_scan_is_counted_and_the_last_good_one_served(collector, fault, reason):
    collector._reader = ScriptedReader("ok", fault, fault)
    collector.scan()
    first = scrape(collector)
    collector.scan()
    collector.scan()
    samples = scrape(collector)
    assert errors(samples)[reason] == 2
    assert sum(errors(samples).values()) == 2
    assert value(samples, "conntrack_exporter_collector_success", collector="conntrack_table") == 1
    stamp = "conntrack_table_scan_timestamp_seconds"
    assert value(samples, stamp) == value(first, stamp)  # the age shows it is the old scan


def test_refusal_stops_scanning_and_reports_no_data(collector):
    collector._reader = ScriptedReader(NetlinkError(errno.EPERM, "Operation not permitted"))
    collector.scan()
    collector.scan()  # no second dump: the refusal is final
    assert collector._reader.dumps == 1
    with pytest.raises(NoDataError, match="permission"):
        collector.collect()


def test_before_the_first_scan_there_is_no_data(collector):
    with pytest.raises(NoDataError, match="no table scan has finished yet"):
        collector.collect()


def test_a_socket_that_cannot_be_opened_is_a_counted_failure(collector, monkeypatch):
    # A kernel without nfnetlink refuses the socket itself; it cannot be unloaded here.
    import conntrack_exporter.collectors.conntrack_table as module

    def no_netlink(timeout: float) -> None:
        raise OSError(errno.EPROTONOSUPPORT, "Protocol not supported")

    monkeypatch.setattr(module, "ConntrackTableReader", no_netlink)
    collector.scan()  # must not raise into the scanner's last-resort handler
    collector.scan()
    assert collector._errors["other"] == 2
    with pytest.raises(NoDataError, match="no table scan has finished yet"):
        collector.collect()
