"""Pure tests of the socket collector: its /proc parsers on captured files from this kernel
(6.18) and an older one (node_exporter's fixtures), ProcFile on a temporary root, and the
collector over temporary procfs trees. No root and no kernel needed."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conntrack_exporter.collectors.socket import SocketCollector, SocketOptions
from conntrack_exporter.procfs import (
    ProcFile,
    ProcFS,
    parse_ints,
    parse_snmp6,
    parse_snmp6_values,
    parse_snmp_table,
    parse_snmp_tables,
    parse_sockstat,
)
from tests import collectors
from tests.metrics import parse_samples

FIXTURES = Path(__file__).parent / "fixtures"
CAPTURED = FIXTURES / "proc" / "socket"
CURRENT = CAPTURED / "6.18" / "netns"  # a namespace with sockets of every kind, see README
HOST = CAPTURED / "6.18" / "host"
OLD = CAPTURED / "node_exporter"  # older kernels' files, see README
GOLDEN_TREE = FIXTURES / "procfs" / "socket"


def read(directory: Path, name: str) -> str:
    return (directory / name).read_text()


# --- sockstat ------------------------------------------------------------------------------


def test_sockstat_of_this_kernel():
    assert parse_sockstat(read(CURRENT, "sockstat")) == {
        "sockets": {"used": 15},
        "TCP": {"inuse": 5, "orphan": 0, "tw": 2, "alloc": 11, "mem": 69},
        "UDP": {"inuse": 2, "mem": 256},
        "UDPLITE": {"inuse": 0},
        "RAW": {"inuse": 0},
        "FRAG": {"inuse": 0, "memory": 0},
    }
    assert parse_sockstat(read(CURRENT, "sockstat6")) == {
        "TCP6": {"inuse": 5},
        "UDP6": {"inuse": 2},
        "UDPLITE6": {"inuse": 0},
        "RAW6": {"inuse": 0},
        "FRAG6": {"inuse": 0, "memory": 0},
    }


def test_sockstat_of_an_old_kernel_lacks_udp_memory_and_udplite():
    assert parse_sockstat(read(OLD, "sockstat")) == {
        "sockets": {"used": 229},
        "TCP": {"inuse": 4, "orphan": 0, "tw": 4, "alloc": 17, "mem": 1},
        "UDP": {"inuse": 0},
        "RAW": {"inuse": 0},
        "FRAG": {"inuse": 0, "memory": 0},
    }
    assert parse_sockstat(read(OLD, "sockstat6"))["RAW6"] == {"inuse": 1}


# --- netstat and snmp ----------------------------------------------------------------------


def test_snmp_of_this_kernel():
    tables = parse_snmp_tables(read(CURRENT, "snmp"))
    # No IcmpMsg: the kernel prints it only once some ICMP type was counted.
    assert list(tables) == ["Ip", "Icmp", "Tcp", "Udp", "UdpLite"]
    # 50 datagrams into a 1-byte receive buffer: one queued, 49 dropped and counted twice.
    assert tables["Udp"] == {
        "InDatagrams": 0,
        "NoPorts": 0,
        "InErrors": 49,
        "OutDatagrams": 50,
        "RcvbufErrors": 49,
        "SndbufErrors": 0,
        "InCsumErrors": 0,
        "IgnoredMulti": 0,
        "MemErrors": 0,
    }
    assert tables["Tcp"]["MaxConn"] == -1  # negative values are legal
    assert tables["Tcp"]["ActiveOpens"] == 6


def test_netstat_of_this_kernel():
    tables = parse_snmp_tables(read(CURRENT, "netstat"))
    assert list(tables) == ["TcpExt", "IpExt", "MPTcpExt"]
    assert len(tables["TcpExt"]) == 135
    assert tables["TcpExt"]["TW"] == 2  # the two connections closed into TIME_WAIT
    assert tables["TcpExt"]["ListenOverflows"] == 0


def test_snmp_of_an_old_kernel_has_no_memory_errors():
    udp = parse_snmp_tables(read(OLD, "snmp"))["Udp"]
    assert udp == {
        "InDatagrams": 88542,
        "NoPorts": 120,
        "InErrors": 0,
        "OutDatagrams": 53028,
        "RcvbufErrors": 0,
        "SndbufErrors": 0,
        "InCsumErrors": 0,
    }
    wanted = ["RcvbufErrors", "MemErrors", "InErrors"]
    assert parse_snmp_table(read(OLD, "snmp"), "Udp", wanted) == {"RcvbufErrors": 0, "InErrors": 0}
    tcpext = parse_snmp_tables(read(OLD, "netstat"))["TcpExt"]
    assert tcpext["DelayedACKs"] == 102471
    assert (tcpext["TCPPrequeued"], tcpext["TCPHPHits"], tcpext["TCPOFOQueue"]) == (
        80568,
        4471289,
        42,
    )


@pytest.mark.parametrize("directory", [CURRENT, HOST, OLD], ids=["netns", "host", "old"])
@pytest.mark.parametrize("name", ["snmp", "netstat"])
def test_one_table_reads_what_the_full_parse_reads(directory, name):
    """The scrape path (one table, some columns) agrees with the full parse of every table."""
    text = read(directory, name)
    for table, columns in parse_snmp_tables(text).items():
        assert parse_snmp_table(text, table) == columns
        some = [*list(columns)[1::3], "NoSuchColumn"]
        assert parse_snmp_table(text, table, some) == {name: columns[name] for name in some[:-1]}
    assert parse_snmp_table(text, "NoSuchTable") is None


def test_a_table_name_must_match_whole():
    text = "UdpLite: InErrors\nUdpLite: 7\nUdp: InErrors\nUdp: 3\n"
    assert parse_snmp_table(text, "Udp") == {"InErrors": 3}
    assert parse_snmp_table(text, "UdpLite") == {"InErrors": 7}
    assert parse_snmp_table(text, "Ud") is None


# --- snmp6 ---------------------------------------------------------------------------------


def test_snmp6_of_this_kernel():
    counters = parse_snmp6(read(CURRENT, "snmp6"))
    assert len(counters) == 86  # the host's has 90: Icmp6 In/OutType lines come and go
    udp6 = {name: value for name, value in counters.items() if name.startswith("Udp6")}
    assert udp6 == {
        "Udp6InDatagrams": 0,
        "Udp6NoPorts": 0,
        "Udp6InErrors": 49,
        "Udp6OutDatagrams": 50,
        "Udp6RcvbufErrors": 49,
        "Udp6SndbufErrors": 0,
        "Udp6InCsumErrors": 0,
        "Udp6IgnoredMulti": 0,
        "Udp6MemErrors": 0,
    }


def test_snmp6_of_an_old_kernel_has_no_memory_errors():
    names = ["Udp6RcvbufErrors", "Udp6SndbufErrors", "Udp6InErrors", "Udp6MemErrors"]
    assert parse_snmp6_values(read(OLD, "snmp6"), names) == {
        "Udp6RcvbufErrors": 9,
        "Udp6SndbufErrors": 8,
        "Udp6InErrors": 0,
    }


@pytest.mark.parametrize("directory", [CURRENT, HOST, OLD], ids=["netns", "host", "old"])
def test_snmp6_values_read_what_the_full_parse_reads(directory):
    text = read(directory, "snmp6")
    counters = parse_snmp6(text)
    names = [*list(counters)[::5], "Udp6", "NoSuchCounter"]
    assert parse_snmp6_values(text, names) == {name: counters[name] for name in names[:-2]}


def test_snmp6_names_must_match_whole():
    text = "Udp6InErrorsX   \t1\nUdp6InErrors    \t2\n"
    assert parse_snmp6_values(text, ["Udp6InErrors", "Udp6In"]) == {"Udp6InErrors": 2}


# --- malformed input -----------------------------------------------------------------------

SOCKSTAT_LINE = "TCP: inuse 3 orphan 0 tw 0 alloc 5 mem 1\n"
SNMP_PAIR = "Udp: InDatagrams NoPorts\nUdp: 1 2\n"
MALFORMED = [
    ("sockstat", parse_sockstat, "", "empty"),
    ("sockstat", parse_sockstat, "TCP: inuse 3 orphan\n", "a key without a value"),
    ("sockstat", parse_sockstat, "TCP: inuse 3 orph", "truncated mid-line"),
    ("sockstat", parse_sockstat, "TCP:\n", "a name alone"),
    ("sockstat", parse_sockstat, "TCP inuse 3\n", "no colon"),
    ("sockstat", parse_sockstat, "TCP: inuse three\n", "not a number"),
    ("sockstat", parse_sockstat, SOCKSTAT_LINE + "\n", "a blank line"),
    ("sockstat", parse_sockstat, "TCP: inuse 3\u00a0\n", "not ASCII"),
    ("snmp", parse_snmp_tables, "", "empty"),
    ("snmp", parse_snmp_tables, "Udp: InDatagrams NoPorts\n", "a header without values"),
    ("snmp", parse_snmp_tables, "Udp: InDatagrams NoPorts\nUdp: 1\n", "fewer values"),
    ("snmp", parse_snmp_tables, "Udp: InDatagrams\nUdp: 1 2\n", "more values"),
    ("snmp", parse_snmp_tables, "Udp: InDatagrams NoPorts\nTcp: 1 2\n", "another table"),
    ("snmp", parse_snmp_tables, "Udp: InDatagrams NoPorts\nUdp: 1 x\n", "not a number"),
    ("snmp", parse_snmp_tables, "Udp: 5 NoPorts\nUdp: 1 2\n", "a number for a name"),
    ("snmp", parse_snmp_tables, "Udp: In In\nUdp: 1 2\n", "a name twice"),
    ("snmp", parse_snmp_tables, SNMP_PAIR + "Tcp: MaxConn\nTcp: -", "truncated mid-line"),
    ("snmp6", parse_snmp6, "", "empty"),
    ("snmp6", parse_snmp6, "Udp6InErrors\n", "a name alone"),
    ("snmp6", parse_snmp6, "Udp6InErrors 1 2\n", "three fields"),
    ("snmp6", parse_snmp6, "Udp6InErrors x\n", "not a number"),
    ("snmp6", parse_snmp6, "1 2\n", "a number for a name"),
]
SELECTIVE_MALFORMED = [
    ("snmp", lambda text, source: parse_snmp_table(text, "Udp", None, source), SNMP_PAIR[:30]),
    ("snmp", lambda text, source: parse_snmp_table(text, "Udp", None, source), "Udp: A B\n"),
    ("snmp", lambda text, source: parse_snmp_table(text, "Udp", ["A"], source), "Udp: A\nUdp: x"),
    ("snmp", lambda text, source: parse_snmp_table(text, "Udp", ["A"], source), "Udp: A\nUdp: 1 2"),
    ("snmp6", lambda text, source: parse_snmp6_values(text, ["Udp6InErrors"], source), ""),
    (
        "snmp6",
        lambda text, source: parse_snmp6_values(text, ["Udp6InErrors"], source),
        "Udp6InErrors 1 1\n",
    ),
    ("tcp_mem", lambda text, source: parse_ints(text, 3, source), "1 2\n"),
    ("tcp_mem", lambda text, source: parse_ints(text, 3, source), "1 2 x\n"),
    ("tcp_mem", lambda text, source: parse_ints(text, 3, source), ""),
]


@pytest.mark.parametrize(
    ("name", "parse", "text"),
    [(name, parse, text) for name, parse, text, _ in MALFORMED] + SELECTIVE_MALFORMED,
    ids=[f"{name}: {why}" for name, _, _, why in MALFORMED]
    + [f"{name} on the scrape path #{i}" for i, (name, _, _) in enumerate(SELECTIVE_MALFORMED)],
)
def test_malformed_input_raises_a_value_error_naming_the_file(name, parse, text):
    source = f"/somewhere/proc/net/{name}"
    with pytest.raises(ValueError, match=f"^{source}"):
        parse(text, source=source)


PARSERS = [
    parse_sockstat,
    parse_snmp_tables,
    parse_snmp6,
    lambda text: parse_snmp_table(text, "Udp"),
    lambda text: parse_snmp_table(text, "TcpExt", ["ListenOverflows", "ListenDrops"]),
    lambda text: parse_snmp6_values(text, ["Udp6InErrors", "Udp6MemErrors"]),
    lambda text: parse_ints(text, 3, "tcp_mem"),
]
# Text made of the files' own pieces reaches deeper than uniformly random characters.
PIECES = st.sampled_from(
    ["TCP:", "Udp:", "TcpExt:", "Udp6InErrors", "inuse", "ListenOverflows", "InErrors",
     "Udp", "0", "-1", "42", "x", " ", "\t", "\n", ":", "\u00e9", "1_0", "+3"]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(), st.lists(PIECES, max_size=30).map("".join)))
@pytest.mark.parametrize("parse", PARSERS)
def test_any_text_raises_nothing_but_value_error(parse, text):
    with contextlib.suppress(ValueError):
        parse(text)


# --- ProcFile ------------------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_proc_file_keeps_one_fd_and_reads_changes(tmp_path):
    path = tmp_path / "sockstat"
    path.write_text("TCP: inuse 1\n")
    file = ProcFS(str(tmp_path)).file("sockstat")
    before = open_fds()
    assert file.read_text() == "TCP: inuse 1\n"
    path.write_text("TCP: inuse 22\n")  # the same inode, as procfs regenerates in place
    assert file.read_text() == "TCP: inuse 22\n"
    assert open_fds() == before + 1
    file.close()
    assert open_fds() == before


def test_proc_file_retries_an_absent_file_on_every_read(tmp_path):
    file = ProcFS(str(tmp_path)).file("sockstat6")
    for _ in range(2):
        with pytest.raises(FileNotFoundError):
            file.read_text()
    (tmp_path / "sockstat6").write_text("TCP6: inuse 4\n")
    assert file.read_text() == "TCP6: inuse 4\n"
    file.close()


def test_proc_file_reads_past_one_buffer(tmp_path):
    text = "".join(f"Counter{i} {i}\n" for i in range(20000))  # ~270 KB
    (tmp_path / "big").write_text(text)
    file = ProcFile(str(tmp_path / "big"))
    assert file.read_text() == text
    assert file.read_text() == text
    file.close()


def test_proc_file_says_which_file_is_not_ascii(tmp_path):
    (tmp_path / "snmp").write_bytes(b"Udp: \xff\n")
    file = ProcFile(str(tmp_path / "snmp"))
    with pytest.raises(ValueError, match=f"^{tmp_path / 'snmp'}: not ASCII"):
        file.read_text()
    file.close()


def test_proc_file_serves_threads_at_once(tmp_path):
    (tmp_path / "netstat").write_text(read(CURRENT, "netstat"))
    file = ProcFile(str(tmp_path / "netstat"))
    expected = read(CURRENT, "netstat")
    results: list[bool] = []

    def reader() -> None:
        results.extend(file.read_text() == expected for _ in range(200))

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True] * 1600
    file.close()


# --- the collector over temporary procfs trees ---------------------------------------------


@pytest.fixture
def tree(tmp_path):
    """A copy of the golden fixture tree (this kernel's files, reserved ports set)."""
    root = tmp_path / "proc"
    shutil.copytree(GOLDEN_TREE, root)
    return root


def exposition(root: Path, collector: SocketCollector | None = None) -> str:
    if collector is None:
        collector = make_collector(root)
    return collectors.exposition(collector)


def scrape(root: Path, collector: SocketCollector | None = None) -> tuple[dict, float]:
    """The samples of one scrape and the collector's success."""
    samples = parse_samples(exposition(root, collector))
    success = samples["conntrack_exporter_collector_success"][(("collector", "socket"),)]
    return samples, success


def make_collector(root: Path) -> SocketCollector:
    return SocketCollector(SocketOptions(), collectors.context(root))


def one(samples: dict, name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


def test_collector_reads_every_file(tree, monkeypatch):
    page_size = 16384  # an arm64 kernel's: the collector must ask, not assume 4096
    real_sysconf = os.sysconf
    monkeypatch.setattr(
        os, "sysconf", lambda name: page_size if name == "SC_PAGE_SIZE" else real_sysconf(name)
    )
    samples, success = scrape(tree)
    assert success == 1
    assert one(samples, "socket_inuse", family="ipv4", protocol="tcp") == 5
    assert one(samples, "socket_inuse", family="ipv6", protocol="udp") == 2
    assert len(samples["socket_inuse"]) == 8
    assert one(samples, "socket_allocated") == 15
    assert one(samples, "socket_tcp_allocated") == 11
    assert one(samples, "socket_tcp_timewait") == 2
    assert one(samples, "socket_tcp_timewait_limit") == 131072
    assert one(samples, "socket_tcp_orphans_limit") == 131072
    assert one(samples, "socket_memory_bytes", protocol="tcp") == 69 * page_size
    assert one(samples, "socket_memory_bytes", protocol="udp") == 256 * page_size
    assert one(samples, "socket_memory_min_bytes", protocol="tcp") == 287901 * page_size
    assert one(samples, "socket_memory_pressure_bytes", protocol="tcp") == 383868 * page_size
    assert one(samples, "socket_memory_limit_bytes", protocol="udp") == 1151604 * page_size
    assert one(samples, "socket_udp_receive_buffer_errors_total", family="ipv4") == 49
    assert one(samples, "socket_udp_in_errors_total", family="ipv6") == 49
    assert one(samples, "socket_udp_memory_errors_total", family="ipv6") == 0
    assert one(samples, "socket_listen_overflows_total") == 0
    assert one(samples, "socket_file_handles_allocated") == 378
    assert one(samples, "socket_file_handles_limit") == 2466177
    # 32768-60999 less 40000-40099 and 50000; 61000-61010 lies outside the range.
    assert one(samples, "socket_ephemeral_ports_range_size") == 28232 - 100 - 1


def test_files_the_kernel_lacks_give_absent_series_not_zero(tree):
    # A child network namespace has no tcp_mem, udp_mem, tcp_max_orphans; no IPv6 no sockstat6
    # nor snmp6.
    for relative in [
        "sys/net/ipv4/tcp_mem",
        "sys/net/ipv4/udp_mem",
        "sys/net/ipv4/tcp_max_orphans",
        "net/sockstat6",
        "net/snmp6",
        "net/netstat",
        "sys/fs/file-nr",
    ]:
        (tree / relative).unlink()
    text = exposition(tree)
    samples, success = scrape(tree)
    assert success == 1
    for name in [
        "socket_memory_min_bytes",
        "socket_memory_pressure_bytes",
        "socket_memory_limit_bytes",
        "socket_tcp_orphans_limit",
        "socket_listen_overflows_total",
        "socket_tcp_timewait_overflows_total",
        "socket_file_handles_allocated",
        "socket_file_handles_limit",
    ]:
        assert name not in samples
        assert f"# HELP {name} " not in text  # no empty family either
    protocols = ("tcp", "udp", "udplite", "raw")
    assert set(samples["socket_inuse"]) == {
        (("family", "ipv4"), ("protocol", protocol)) for protocol in protocols
    }
    assert list(samples["socket_udp_receive_buffer_errors_total"]) == [(("family", "ipv4"),)]
    assert one(samples, "socket_tcp_timewait_limit") == 131072


def test_an_older_kernel_has_no_udp_memory_series(tree):
    for name in ("sockstat", "sockstat6", "netstat", "snmp", "snmp6"):
        shutil.copyfile(OLD / name, tree / "net" / name)
    samples, success = scrape(tree)
    assert success == 1
    assert "socket_udp_memory_errors_total" not in samples  # neither Udp nor Udp6 MemErrors
    assert "socket_udp_memory_errors" not in exposition(tree)
    assert list(samples["socket_memory_bytes"]) == [(("protocol", "tcp"),)]
    assert (("family", "ipv4"), ("protocol", "udplite")) not in samples["socket_inuse"]
    assert one(samples, "socket_inuse", family="ipv6", protocol="raw") == 1
    # Distinct values in the old snmp6 tell the columns apart (this kernel's are 49 alike).
    assert one(samples, "socket_udp_receive_buffer_errors_total", family="ipv6") == 9
    assert one(samples, "socket_udp_send_buffer_errors_total", family="ipv6") == 8
    assert one(samples, "socket_udp_in_errors_total", family="ipv6") == 0
    assert one(samples, "socket_udp_receive_buffer_errors_total", family="ipv4") == 0
    assert one(samples, "socket_tcp_timewait") == 4


def test_without_sockstat_the_collector_fails(tree):
    (tree / "net" / "sockstat").unlink()
    collector = make_collector(tree)
    with pytest.raises(FileNotFoundError):
        collector.collect()
    samples, success = scrape(tree, collector)
    assert success == 0
    assert not any(name.startswith("socket_") for name in samples)


@pytest.mark.parametrize(
    ("relative", "text"),
    [
        ("net/sockstat", "TCP: inuse 3 orphan\n"),
        ("net/sockstat6", "TCP6: inuse x\n"),
        ("net/netstat", "TcpExt: ListenOverflows ListenDrops\nTcpExt: 1\n"),
        ("net/snmp", "Udp: InErrors\nUdp: many\n"),
        ("net/snmp6", "Udp6InErrors 1 2\n"),
        ("sys/net/ipv4/tcp_mem", "1 2\n"),
        ("sys/net/ipv4/tcp_max_tw_buckets", "lots\n"),
        ("sys/net/ipv4/ip_local_port_range", "60999 32768\n"),
        ("sys/net/ipv4/ip_local_reserved_ports", "80-x\n"),
        ("sys/fs/file-nr", "1 0\n"),
    ],
)
def test_a_garbled_file_fails_the_collector_with_its_path(tree, relative, text):
    (tree / relative).write_text(text)
    collector = make_collector(tree)
    with pytest.raises(ValueError, match=f"^{tree / relative}"):
        collector.collect()
    _, success = scrape(tree, collector)
    assert success == 0


def test_range_size_follows_the_reserved_ports(tree):
    range_file = tree / "sys/net/ipv4/ip_local_port_range"
    reserved_file = tree / "sys/net/ipv4/ip_local_reserved_ports"
    range_file.write_text("1000\t1999\n")
    reserved_file.write_text("900-1000,1500,1998-2100,5000\n")
    collector = make_collector(tree)
    samples, _ = scrape(tree, collector)
    assert one(samples, "socket_ephemeral_ports_range_size") == 1000 - 1 - 1 - 2
    reserved_file.write_text("\n")  # emptied: the whole range again
    samples, _ = scrape(tree, collector)
    assert one(samples, "socket_ephemeral_ports_range_size") == 1000
    reserved_file.unlink()  # a kernel without the sysctl reserves nothing
    samples, _ = scrape(tree, make_collector(tree))
    assert one(samples, "socket_ephemeral_ports_range_size") == 1000


def test_values_are_read_on_every_scrape(tree):
    collector = make_collector(tree)
    samples, _ = scrape(tree, collector)
    assert one(samples, "socket_tcp_timewait") == 2
    sockstat = tree / "net" / "sockstat"
    sockstat.write_text(sockstat.read_text().replace("tw 2", "tw 7"))
    samples, _ = scrape(tree, collector)
    assert one(samples, "socket_tcp_timewait") == 7


def numbered(text: str) -> str:
    """An snmp/netstat text whose every value is its column's position: 1, 2, 3, ..."""
    lines = text.splitlines()
    for index in range(1, len(lines), 2):
        prefix, count = lines[index].split()[0], len(lines[index].split()) - 1
        lines[index] = " ".join([prefix, *(str(position) for position in range(1, count + 1))])
    return "\n".join(lines) + "\n"


def test_each_counter_reads_its_own_column(tree):
    """Distinct values in every column, so that a counter read from its neighbour shows."""
    for name in ("netstat", "snmp"):
        path = tree / "net" / name
        path.write_text(numbered(path.read_text()))
    snmp6 = tree / "net" / "snmp6"
    snmp6.write_text(
        "".join(
            f"{line.split()[0]:<32s}\t{position}\n"
            for position, line in enumerate(snmp6.read_text().splitlines(), start=1)
        )
    )
    tcpext = read(CURRENT, "netstat").splitlines()[0].split()
    udp = next(line for line in read(CURRENT, "snmp").splitlines() if line.startswith("Udp:"))
    names6 = [line.split()[0] for line in read(CURRENT, "snmp6").splitlines()]
    samples, success = scrape(tree)
    assert success == 1
    for column, name in [
        ("ListenOverflows", "socket_listen_overflows_total"),
        ("ListenDrops", "socket_listen_drops_total"),
        ("TCPMemoryPressures", "socket_tcp_memory_pressures_total"),
        ("TCPAbortOnMemory", "socket_tcp_aborts_on_memory_total"),
        ("TCPTimeWaitOverflow", "socket_tcp_timewait_overflows_total"),
    ]:
        assert one(samples, name) == tcpext.index(column)
    for column, name in [
        ("RcvbufErrors", "socket_udp_receive_buffer_errors_total"),
        ("SndbufErrors", "socket_udp_send_buffer_errors_total"),
        ("InErrors", "socket_udp_in_errors_total"),
        ("MemErrors", "socket_udp_memory_errors_total"),
    ]:
        assert one(samples, name, family="ipv4") == udp.split().index(column)
        assert one(samples, name, family="ipv6") == names6.index("Udp6" + column) + 1


def test_concurrent_scrapes_see_the_same_values(tree):
    """The HTTP server collects on several threads at once, over the same open files."""
    collector = make_collector(tree)
    expected = [(m.name, m.samples) for m in collector.collect().metrics]
    results: list[bool] = []

    def scraper() -> None:
        for _ in range(100):
            got = [(m.name, m.samples) for m in collector.collect().metrics]
            results.append(got == expected)

    threads = [threading.Thread(target=scraper) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True] * 800
