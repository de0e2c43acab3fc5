"""Pure tests of the /proc readers: parse_nf_conntrack_stat on captured and period files, and
ProcFS on a temporary root. No root and no kernel needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conntrack_exporter.procfs import (
    ProcFS,
    ephemeral_port_flags,
    parse_nf_conntrack_stat,
    parse_port_range,
    parse_port_ranges,
)

FIXTURES = Path(__file__).parent / "fixtures"
CAPTURE = json.loads((FIXTURES / "netlink" / "capture.json").read_text())

# Captured inside a netns on Linux 6.18 by tests/fixtures/capture_netlink.py, at the same moment
# as the netlink fixtures.
CURRENT = (FIXTURES / "proc" / "nf_conntrack_stat_6.18").read_text()
# Reproduces the format of Linux 4.19 (net/netfilter/nf_conntrack_standalone.c,
# ct_cpu_seq_show): the header with searched/delete_list, before 5.x kernels renamed those
# columns in place to clashres/chainlength, and rows printed as
# "%08x  %08x ... %08x  %08x %08x %08x %08x". Four CPUs; the values are made up, different in
# every column, so a column read by position instead of by name shows.
OLD = (FIXTURES / "proc" / "nf_conntrack_stat_4.19").read_text()


def test_current_header_maps_renamed_columns_and_drops_entries():
    rows = parse_nf_conntrack_stat(CURRENT)
    assert CURRENT.splitlines()[0].split()[:8] == [
        "entries", "clashres", "found", "new", "invalid", "ignore", "delete", "chainlength",
    ]  # fmt: skip
    assert rows == [
        {
            "clash_resolve": 0xD9,
            "found": 0,
            "new": 0,
            "invalid": 0x0C,
            "ignore": 0,
            "delete": 0,
            "chaintoolong": 0,
            "insert": 0,
            "insert_failed": 0,
            "drop": 0,
            "early_drop": 0,
            "error": 0x08,
            "expect_new": 2,
            "expect_create": 6,
            "expect_delete": 5,
            "search_restart": 0,
        },
        {
            "clash_resolve": 0xB0,
            "found": 0,
            "new": 0,
            "invalid": 0x14,
            "ignore": 0,
            "delete": 0,
            "chaintoolong": 0,
            "insert": 0,
            "insert_failed": 0,
            "drop": 0,
            "early_drop": 0,
            "error": 0x0E,
            "expect_new": 0,
            "expect_create": 0,
            "expect_delete": 0,
            "search_restart": 0,
        },
    ]


def test_current_file_agrees_with_netlink_at_capture_time():
    # Same netns, same moment: /proc and ctnetlink must tell the same story per CPU.
    text = (FIXTURES / "proc" / CAPTURE["proc_file"]).read_text()
    rows = parse_nf_conntrack_stat(text)
    assert len(rows) == CAPTURE["cpus"]
    for cpu, row in enumerate(rows):
        netlink = CAPTURE["conntrack_S"]["cpus"][str(cpu)]
        expect = CAPTURE["conntrack_S_exp"]["cpus"][str(cpu)]
        assert set(netlink) <= set(row)  # every counter conntrack -S shows is in /proc too
        assert {name: row[name] for name in netlink} == netlink
        assert {name: row[name] for name in expect} == expect
    # The dropped `entries` column is the netns's table size, repeated on every row.
    entries = {int(line.split()[0], 16) for line in text.splitlines()[1:]}
    assert entries == {CAPTURE["conntrack_C"]}


def test_old_header_keeps_its_own_names():
    rows = parse_nf_conntrack_stat(OLD)
    assert len(rows) == 4
    assert rows[0] == {
        "searched": 0x0A3F1C22,
        "found": 0x004E1B07,
        "new": 0x0012D687,
        "invalid": 0x00000B3A,
        "ignore": 0x0009FBF1,
        "delete": 0x0012C5E0,
        "delete_list": 0x0000FFEE,
        "insert": 0x0012C9A4,
        "insert_failed": 0xC8,
        "drop": 0x1D8,
        "early_drop": 0,
        "error": 0x2F,
        "expect_new": 3,
        "expect_create": 7,
        "expect_delete": 5,
        "search_restart": 0x4D,
    }
    assert not {"clash_resolve", "chaintoolong", "icmp_error", "entries"} & rows[0].keys()


def test_rows_are_per_cpu_in_order():
    rows = parse_nf_conntrack_stat(OLD)
    assert [row["insert_failed"] for row in rows] == [0xC8, 0xA2, 0xE1, 0x93]
    assert [row["early_drop"] for row in rows] == [0, 1, 0, 2]
    assert sum(row["drop"] for row in rows) == 0x1D8 + 0x16F + 0x203 + 0x150


def test_values_are_hexadecimal():
    assert parse_nf_conntrack_stat("entries drop found\n00000010 0000000a FFFFFFFF\n") == [
        {"drop": 10, "found": 0xFFFFFFFF}
    ]


def test_header_only_means_no_rows():
    assert parse_nf_conntrack_stat(CURRENT.splitlines()[0] + "\n") == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"empty"),
        ("\n00000001\n", r"header is not a list of names: ''"),
        ("entries drop-count\n1 2\n", r"header is not a list of names: 'entries drop-count'"),
        ("entries drop\n1 2\n3\n", r"line 3 has 1 fields, the header 2"),
        ("entries drop\n1 2\n3 4 5\n", r"line 3 has 3 fields, the header 2"),
        ("entries drop\n1 2\n\n3 4\n", r"line 3 has 0 fields, the header 2"),
        ("entries drop\n1 zz\n", r"line 2 is not hexadecimal: '1 zz'"),
        ("entries drop\n1 2\n1 0.5\n", r"line 3 is not hexadecimal"),
        ("entries drop\n1 -1\n", r"line 2 is not hexadecimal: '1 -1'"),
        ("entries drop\n1 0x10\n", r"line 2 is not hexadecimal"),
        ("entries drop\n1 1_0\n", r"line 2 is not hexadecimal"),
    ],
)
def test_malformed_input_names_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        parse_nf_conntrack_stat(text)


def test_ragged_row_in_a_real_file_names_its_line():
    lines = OLD.splitlines()
    lines[3] = lines[3].rsplit(" ", 1)[0]  # third CPU row loses search_restart
    with pytest.raises(ValueError, match=r"line 4 has 16 fields, the header 17"):
        parse_nf_conntrack_stat("\n".join(lines) + "\n")


@settings(max_examples=300)
@given(st.text(max_size=300))
def test_arbitrary_text_gives_rows_or_value_error(text):
    try:
        rows = parse_nf_conntrack_stat(text)
    except ValueError:
        return
    assert all(isinstance(v, int) for row in rows for v in row.values())


ALIASES = {"icmp_error": "error", "clashres": "clash_resolve", "chainlength": "chaintoolong"}
# Column names: the kernel's own (both layouts) or made up; never an alias target, since a
# header with both "icmp_error" and "error" is not a shape any kernel prints.
NAMES = st.one_of(
    st.sampled_from(sorted(set(OLD.split("\n", 1)[0].split() + CURRENT.split("\n", 1)[0].split()))),
    st.from_regex(r"[a-z][a-z_]{0,12}", fullmatch=True),
).filter(lambda name: name not in ALIASES.values())


@settings(max_examples=200)
@given(
    st.lists(NAMES, min_size=1, max_size=17, unique=True),
    st.lists(st.lists(st.integers(0, 0xFFFFFFFF), min_size=17, max_size=17), max_size=8),
)
def test_generated_files_parse_to_exactly_their_values(names, cpus):
    text = "  ".join(names) + "\n"
    text += "".join(" ".join(f"{v:08x}" for v in values[: len(names)]) + "\n" for values in cpus)
    expected = [
        {ALIASES.get(n, n): v for n, v in zip(names, values, strict=False) if n != "entries"}
        for values in cpus
    ]
    assert parse_nf_conntrack_stat(text) == expected


# --- ProcFS with an injectable root -------------------------------------------------------------


@pytest.fixture
def procfs(tmp_path):
    netfilter = tmp_path / "sys" / "net" / "netfilter"
    netfilter.mkdir(parents=True)
    (netfilter / "nf_conntrack_max").write_text("262144\n")
    (netfilter / "nf_conntrack_count").write_text("not a number\n")
    (netfilter / "nf_conntrack_buckets").write_text("")
    (tmp_path / "net" / "stat").mkdir(parents=True)
    (tmp_path / "net" / "stat" / "nf_conntrack").write_text(OLD)
    return ProcFS(str(tmp_path))


def test_read_int_reads_below_the_injected_root(procfs):
    assert procfs.read_int("sys/net/netfilter/nf_conntrack_max") == 262144


def test_read_int_rejects_a_non_integer_naming_file_and_content(procfs):
    path = Path(procfs.root) / "sys/net/netfilter/nf_conntrack_count"
    with pytest.raises(ValueError, match=rf"{path}: expected an integer, got 'not a number\\n'"):
        procfs.read_int("sys/net/netfilter/nf_conntrack_count")
    with pytest.raises(ValueError, match=r"nf_conntrack_buckets: expected an integer, got ''"):
        procfs.read_int("sys/net/netfilter/nf_conntrack_buckets")


def test_missing_file_is_an_os_error_not_a_value_error(procfs):
    # Callers tell "feature absent" (no CONFIG_NF_CONNTRACK_PROCFS) from "file garbled".
    with pytest.raises(FileNotFoundError):
        procfs.read_int("sys/net/netfilter/nf_conntrack_expect_max")


def test_read_text_and_path_use_the_root(procfs, tmp_path):
    assert procfs.path("net/stat/nf_conntrack") == str(tmp_path / "net" / "stat" / "nf_conntrack")
    assert parse_nf_conntrack_stat(procfs.read_text("net/stat/nf_conntrack")) == (
        parse_nf_conntrack_stat(OLD)
    )
    assert ProcFS().root == "/proc"


def test_port_range_and_reserved_ports():
    assert parse_port_range("32768\t60999\n") == (32768, 60999)
    assert parse_port_ranges("\n") == []
    assert parse_port_ranges("8080,32770-32779,60999\n") == [
        (8080, 8080),
        (32770, 32779),
        (60999, 60999),
    ]
    flags = ephemeral_port_flags((32768, 60999), [(8080, 8080), (32770, 32779), (60999, 60999)])
    assert len(flags) == 65536 and sum(flags) == 60999 - 32768 + 1 - 10 - 1
    assert flags[32768] == flags[32769] == flags[32780] == flags[60998] == 1
    assert flags[32767] == flags[32770] == flags[32779] == flags[60999] == flags[8080] == 0


@pytest.mark.parametrize("text", ["", "32768", "1 2 3", "60999 32768", "0 10", "1 65536", "-1 5"])
def test_bad_port_range_is_a_value_error(text):
    with pytest.raises(ValueError, match="ip_local_port_range"):
        parse_port_range(text)


@pytest.mark.parametrize("text", ["a", "5-3", "1-70000", "1,,x", "-5", "80-", "1-2-3"])
def test_bad_reserved_ports_are_a_value_error(text):
    with pytest.raises(ValueError, match="ip_local_reserved_ports"):
        parse_port_ranges(text)
