"""The netlink socket's contract, on real sockets and the real kernel: errors carry their
errno, stale replies are skipped by sequence number, and no read waits forever."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conntrack_exporter.netlink import NetlinkError, NetlinkTimeout
from conntrack_exporter.netlink.core import NLM_F_DUMP, NLM_F_REQUEST, build_message
from conntrack_exporter.netlink.ctnetlink import (
    CT_GET_STATS_CPU,
    READ_REQUESTS,
    ConntrackStatsReader,
    nfgen_request,
)
from conntrack_exporter.netlink.socket import NETLINK_NETFILTER, NetlinkSocket, open_netlink
from tests.collectors import Opened

pytestmark = pytest.mark.kernel


def test_refusal_surfaces_with_its_errno():
    code = (
        "from conntrack_exporter.netlink.ctnetlink import ConntrackStatsReader\n"
        "try:\n"
        "    ConntrackStatsReader(1.0).global_stats()\n"
        "except OSError as exc:\n"
        "    print(type(exc).__name__, exc.errno)\n"
    )
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert out.split() == ["NetlinkError", str(errno.EPERM)]


def stats_reader(timeout: float, open_socket: object) -> ConntrackStatsReader:
    sock = NetlinkSocket(NETLINK_NETFILTER, READ_REQUESTS, timeout, open_socket=open_socket)
    return ConntrackStatsReader(netlink_socket=sock)


def test_stale_reply_from_an_earlier_request_is_skipped():
    opened = Opened()
    reader = stats_reader(1.0, opened)
    # An earlier request whose answer nobody read, as after a timed-out scrape.
    # Its answer (per-CPU messages) would not parse as global stats if it were taken.
    stale_seq = 4242
    opened[-1].send(
        build_message(CT_GET_STATS_CPU, NLM_F_REQUEST | NLM_F_DUMP, stale_seq, nfgen_request())
    )
    time.sleep(0.05)
    stats = reader.global_stats()
    assert stats.max_entries == int(Path("/proc/sys/net/netfilter/nf_conntrack_max").read_text())
    # Nothing was left behind to confuse the next requests.
    assert reader.global_stats() == stats
    assert [row.cpu for row in reader.cpu_stats()] == list(range(os.cpu_count()))


class Undelivered:
    """The kernel's real end of the socket, but requests never reach it: nothing answers."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, data: bytes) -> int:
        return len(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self.sock, name)


def test_read_without_answer_times_out():
    reader = stats_reader(0.2, lambda *args: Undelivered(open_netlink(*args)))
    started = time.monotonic()
    with pytest.raises(NetlinkTimeout) as caught:
        reader.global_stats()
    assert caught.value.errno == errno.ETIMEDOUT
    assert "sent nothing for 0.2 s" in str(caught.value)
    assert time.monotonic() - started < 10  # bounded, whatever the machine's load
    reader.close()


def test_concurrent_requests_do_not_interleave():
    reader = ConntrackStatsReader(2.0)
    expected = (reader.global_stats().max_entries, len(reader.cpu_stats()))
    results, errors = [], []

    def hammer() -> None:
        try:
            for _ in range(200):
                results.append((reader.global_stats().max_entries, len(reader.cpu_stats())))
        except NetlinkError as exc:  # pragma: no cover - the failure this test is for
            errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert results == [expected] * 800
