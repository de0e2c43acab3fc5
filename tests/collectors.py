"""Collectors in tests: a context whose netlink readers a test replaces, and an exporter.

The readers are the seam between a collector and the kernel: a test hands a collector a
replayed or scripted reader through the context, as the exporter hands it the real ones.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable
from pathlib import Path

from prometheus_client.exposition import generate_latest

from conntrack_exporter.netlink.core import BudgetSpent, iter_messages
from conntrack_exporter.netlink.cttable import TableTally
from conntrack_exporter.netlink.socket import DumpBounds, DumpResult, open_netlink
from conntrack_exporter.pod_addresses import PodAddressBook
from conntrack_exporter.procfs import ProcFS
from conntrack_exporter.registry import (
    Collector,
    CollectorContext,
    CollectorSet,
    ExporterCollector,
    Lasting,
    Readers,
)


def context(
    root: str | Path = "/proc",
    timeout: float = 1.0,
    lasting: Lasting | None = None,
    pod_addresses: PodAddressBook | None = None,
    **readers: Callable[[], object],
) -> CollectorContext:
    """The context of a collector over the procfs at `root`, with the real netlink readers
    but for those given (conntrack_stats=, conntrack_table=, sock_diag= factories). A reload
    hands the new collectors the `lasting` state of the old ones; by default it is new. Two
    collectors given the same `pod_addresses` share the pods' addresses, as one
    configuration's do."""
    return CollectorContext(
        ProcFS(str(root)),
        dataclasses.replace(Readers.netlink(timeout), **readers),
        lasting or Lasting(),
        pod_addresses or PodAddressBook(),
    )


def exporter(*collectors: Collector) -> ExporterCollector:
    return ExporterCollector(CollectorSet(collectors))


def exposition(*collectors: Collector) -> str:
    """One scrape of the collectors, as the text format."""
    return generate_latest(exporter(*collectors)).decode()


CAPTURED_DUMP = (Path(__file__).parent / "fixtures" / "netlink" / "ct_dump_mix.bin").read_bytes()
CAPTURED_ENTRIES = 386  # the IPCTNL_MSG_CT_NEW messages in it


class ReplayedTable:
    """Stands in for ConntrackTableReader: every dump replays a captured kernel dump
    (tests/fixtures/capture_dump.py). A spent budget stops it as it stops a real dump."""

    def __init__(self, dump: bytes = CAPTURED_DUMP) -> None:
        self.dump_bytes = dump
        self.dumps = 0
        self.closed = False

    def dump(self, tally: TableTally, bounds: DumpBounds | None = None) -> DumpResult:
        self.dumps += 1
        try:
            for msg in iter_messages(self.dump_bytes, len(self.dump_bytes)):
                tally.add_message(self.dump_bytes, msg)
        except BudgetSpent:
            return DumpResult(complete=False, interrupted=False)
        return DumpResult(complete=True, interrupted=False)

    def close(self) -> None:
        self.closed = True


class Opened(list):
    """An `open_socket` for NetlinkSocket: opens the kernel's end as the exporter does, and
    keeps each socket it opened (the last is the live one), for a test that sends behind the
    NetlinkSocket's back."""

    def __call__(self, protocol: int, timeout: float) -> socket.socket:
        self.append(open_netlink(protocol, timeout))
        return self[-1]
