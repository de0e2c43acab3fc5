"""The kernel's 32-bit per-CPU counters wrap; the exported conntrack_stat_*_total never falls.

WrappingCounters on its own, then the conntrack collector over a scripted reader built from
captured ctnetlink replies (the real parser decodes rewritten counter values), over a procfs
root whose stat file changes between scrapes, and across a switch from one to the other.
"""

from __future__ import annotations

import errno
import shutil
import struct
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conntrack_exporter.collectors.conntrack import ConntrackCollector, ConntrackOptions
from conntrack_exporter.counters import U32, WrappingCounters
from conntrack_exporter.netlink import NetlinkError
from conntrack_exporter.netlink.core import iter_attributes, iter_messages
from conntrack_exporter.netlink.ctnetlink import (
    CPU_STAT_NAMES,
    CT_GET_STATS,
    CT_GET_STATS_CPU,
    EXPECT_STAT_NAMES,
    NFGENMSG,
    CpuStats,
    GlobalStats,
    parse_cpu_stats,
    parse_global_stats,
)
from conntrack_exporter.procfs import NF_CONNTRACK_STAT_ALIASES
from conntrack_exporter.registry import Lasting
from tests.collectors import context, exposition
from tests.metrics import parse_samples, sources, stat_counters, value
from tests.test_netlink_parsers import EXP_STATS_CPU_REPLY, datagrams, messages

PROCFS = Path(__file__).parent / "fixtures" / "procfs" / "conntrack"
STAT_FILE = "net/stat/nf_conntrack"
BE32 = struct.Struct("!I")
NEAR_WRAP = 0xFFFFFFF0
WRAPPED = 0x10  # NEAR_WRAP + 0x20, modulo 2^32


# --- WrappingCounters ---------------------------------------------------------------------------


def totals(rows: list[CpuStats]) -> dict[int, dict[str, int]]:
    return {row.cpu: row.counters for row in rows}


def test_the_first_reading_is_the_kernels_own_values():
    counters = WrappingCounters()
    rows = [CpuStats(0, {"drop": 3, "found": 7}), CpuStats(1, {"drop": NEAR_WRAP, "found": 1})]
    assert counters.update(rows) == rows


def test_a_wrap_adds_the_advance_modulo_2_32():
    counters = WrappingCounters()
    counters.update([CpuStats(0, {"drop": 3}), CpuStats(1, {"drop": NEAR_WRAP})])
    got = counters.update([CpuStats(0, {"drop": 4}), CpuStats(1, {"drop": WRAPPED})])
    assert totals(got) == {0: {"drop": 4}, 1: {"drop": NEAR_WRAP + 0x20}}
    got = counters.update([CpuStats(0, {"drop": 4}), CpuStats(1, {"drop": WRAPPED + 1})])
    assert totals(got)[1] == {"drop": NEAR_WRAP + 0x21}


def test_a_cpu_whose_row_disappears_keeps_its_total_and_resumes_from_its_last_value():
    counters = WrappingCounters()
    counters.update([CpuStats(0, {"drop": 5}), CpuStats(1, {"drop": NEAR_WRAP})])
    assert totals(counters.update([CpuStats(0, {"drop": 6})])) == {
        0: {"drop": 6},
        1: {"drop": NEAR_WRAP},
    }
    back = counters.update([CpuStats(0, {"drop": 6}), CpuStats(1, {"drop": WRAPPED})])
    assert totals(back)[1] == {"drop": NEAR_WRAP + 0x20}  # its advance only, not 0x10 again


def test_a_cpu_first_seen_later_adds_its_raw_value_as_the_kernels_sum_would():
    counters = WrappingCounters()
    counters.update([CpuStats(0, {"drop": 5})])
    got = counters.update([CpuStats(0, {"drop": 5}), CpuStats(3, {"drop": 9})])
    assert totals(got) == {0: {"drop": 5}, 3: {"drop": 9}}
    assert counters.cpus() == [0, 3]


def test_only_the_counters_of_this_reading_are_returned():
    counters = WrappingCounters()
    counters.update([CpuStats(0, {"drop": 5, "expect_new": 2}), CpuStats(1, {"drop": 1})])
    assert counters.update([CpuStats(0, {"drop": 6})]) == [
        CpuStats(0, {"drop": 6}),
        CpuStats(1, {"drop": 1}),
    ]
    # No counters read (a kernel without the procfs stat file): nothing to export, as before.
    assert counters.update([]) == []


CPUS = 3
U32S = st.integers(0, U32 - 1)
# Per scrape and CPU: None when its row is missing, else the true advance since the CPU's row
# was last read (less than 2^32, or no reader could tell it from a smaller one).
SCRAPES = st.lists(st.lists(st.none() | U32S, min_size=CPUS, max_size=CPUS), max_size=30)


@given(initial=st.lists(U32S, min_size=CPUS, max_size=CPUS), scrapes=SCRAPES)
def test_totals_never_fall_and_count_every_true_advance(initial, scrapes):
    counters = WrappingCounters()
    raw = list(initial)
    seen: set[int] = set()
    expected = [0] * CPUS  # per CPU: its raw value at first sight plus every advance since
    previous = {cpu: 0 for cpu in range(CPUS)}
    for advances in [[0] * CPUS, *scrapes]:
        rows = []
        for cpu, advance in enumerate(advances):
            if advance is None:
                continue
            if cpu in seen:
                raw[cpu] = (raw[cpu] + advance) % U32
                expected[cpu] += advance
            else:
                seen.add(cpu)
                expected[cpu] = raw[cpu]
            rows.append(CpuStats(cpu, {"drop": raw[cpu]}))
        got = totals(counters.update(rows))
        if not rows:
            assert got == {}
            continue
        assert got == {cpu: {"drop": expected[cpu]} for cpu in sorted(seen)}
        for cpu in seen:
            assert got[cpu]["drop"] >= previous[cpu]
            previous[cpu] = got[cpu]["drop"]
        assert sum(total["drop"] for total in got.values()) == sum(expected)


# --- the collector over netlink: captured replies, counters rewritten ------------------------

CPU_STAT_NUMBERS = {name: number for number, name in CPU_STAT_NAMES.items()}


def captured_cpu_rows(changes: dict[int, dict[str, int]]) -> list[CpuStats]:
    """The captured CT_GET_STATS_CPU reply (Linux 6.18, 2 CPUs) with the counters in `changes`
    ({cpu: {name: value}}) rewritten in its bytes, decoded by the real parser."""
    rows = []
    for datagram in datagrams("ct_get_stats_cpu.bin"):
        buf = bytearray(datagram)
        for msg in iter_messages(buf, len(buf)):
            if msg.type != CT_GET_STATS_CPU:
                continue
            cpu = NFGENMSG.unpack_from(buf, msg.start)[2]
            wanted = {CPU_STAT_NUMBERS[name]: v for name, v in changes.get(cpu, {}).items()}
            for attr_type, start, _end in iter_attributes(buf, msg.start + NFGENMSG.size, msg.end):
                if attr_type in wanted:
                    BE32.pack_into(buf, start, wanted.pop(attr_type))
            assert not wanted, f"CPU {cpu}'s reply lacks attributes {wanted}"
            rows.append(parse_cpu_stats(buf, msg, CPU_STAT_NAMES))
    assert [row.cpu for row in rows] == [0, 1]
    return rows


def captured_global() -> GlobalStats:
    (reply,) = [
        parse_global_stats(b, m) for b, m in messages("ct_get_stats.bin") if m.type == CT_GET_STATS
    ]
    return reply


def captured_expect_rows() -> list[CpuStats]:
    return [
        parse_cpu_stats(buf, msg, EXPECT_STAT_NAMES)
        for buf, msg in messages("exp_get_stats_cpu.bin")
        if msg.type == EXP_STATS_CPU_REPLY
    ]


class ScriptedStats:
    """Stands in for ConntrackStatsReader: each scrape serves the next per-CPU rows of
    `scrapes`, or raises the next item when it is an exception (global_stats() comes first in
    a scrape). Totals and expectation counters are the captured ones."""

    def __init__(self, *scrapes: list[CpuStats] | Exception) -> None:
        self.scrapes = list(scrapes)
        self.rows: list[CpuStats] = []
        self.closed = False

    def global_stats(self) -> GlobalStats:
        item = self.scrapes.pop(0)
        if isinstance(item, Exception):
            raise item
        self.rows = item
        return captured_global()

    def cpu_stats(self) -> list[CpuStats]:
        return self.rows

    def expect_cpu_stats(self) -> list[CpuStats]:
        # The captured rows, one for each CPU of this scrape, as the kernel's second dump
        # walks the same possible CPUs as the first.
        return [
            expect._replace(cpu=row.cpu)
            for row, expect in zip(self.rows, captured_expect_rows(), strict=False)
        ]

    def close(self) -> None:
        self.closed = True


def over_netlink(
    reader: object, per_cpu: bool = False, root: Path = PROCFS, lasting: Lasting | None = None
) -> ConntrackCollector:
    return ConntrackCollector(
        ConntrackOptions(per_cpu=per_cpu),
        context(root, lasting=lasting, conntrack_stats=lambda: reader),
    )


def scrape(collector: ConntrackCollector) -> dict:
    return parse_samples(exposition(collector))


def drops(samples: dict) -> dict[str, float]:
    """conntrack_stat_drop_total by cpu label ("" for the sum)."""
    return {
        dict(labels).get("cpu", ""): v for labels, v in samples["conntrack_stat_drop_total"].items()
    }


@pytest.mark.parametrize("per_cpu", [False, True], ids=["sum", "per_cpu"])
def test_netlink_wrap_on_one_cpu_rises_by_exactly_the_wrapped_advance(per_cpu):
    reader = ScriptedStats(
        captured_cpu_rows({0: {"drop": 7}, 1: {"drop": NEAR_WRAP}}),
        captured_cpu_rows({0: {"drop": 7}, 1: {"drop": WRAPPED}}),
        captured_cpu_rows({0: {"drop": 9}, 1: {"drop": WRAPPED + 5}}),
    )
    collector = over_netlink(reader, per_cpu)
    first, second, third = scrape(collector), scrape(collector), scrape(collector)

    assert sources(first, "conntrack") == sources(third, "conntrack") == ["netlink"]
    if per_cpu:
        assert drops(first) == {"0": 7, "1": NEAR_WRAP}
        assert drops(second) == {"0": 7, "1": NEAR_WRAP + 0x20}
        assert drops(third) == {"0": 9, "1": NEAR_WRAP + 0x25}
    else:
        assert drops(first) == {"": 7 + NEAR_WRAP}  # the kernel's sum, as before
        assert drops(second) == {"": 7 + NEAR_WRAP + 0x20}
        assert drops(third) == {"": 9 + NEAR_WRAP + 0x25}
    # Every other counter as captured (what `conntrack -S` said then).
    assert {k: v for k, v in stat_counters(third).items() if k != "drop"} == {
        k: v for k, v in stat_counters(first).items() if k != "drop"
    }
    assert stat_counters(first)["clash_resolve"] == 217 + 176


def test_a_cpu_row_that_disappears_keeps_its_contribution():
    both = captured_cpu_rows({0: {"drop": 7}, 1: {"drop": NEAR_WRAP}})
    reader = ScriptedStats(
        both,
        [row for row in both if row.cpu == 0],
        captured_cpu_rows({0: {"drop": 7}, 1: {"drop": WRAPPED}}),
    )
    summed = over_netlink(reader)
    assert drops(scrape(summed)) == {"": 7 + NEAR_WRAP}
    assert drops(scrape(summed)) == {"": 7 + NEAR_WRAP}
    assert drops(scrape(summed)) == {"": 7 + NEAR_WRAP + 0x20}


def test_a_cpu_row_that_disappears_keeps_its_series_per_cpu():
    both = captured_cpu_rows({0: {"drop": 7}, 1: {"drop": NEAR_WRAP}})
    reader = ScriptedStats(both, [row for row in both if row.cpu == 0])
    per_cpu = over_netlink(reader, per_cpu=True)
    scrape(per_cpu)
    # Frozen, so that the per-CPU series still add up to the summed one.
    assert drops(scrape(per_cpu)) == {"0": 7, "1": NEAR_WRAP}


def test_a_restart_starts_from_the_kernels_current_sum_and_a_reload_carries_on():
    near = captured_cpu_rows({0: {"drop": 7}, 1: {"drop": NEAR_WRAP}})
    wrapped = captured_cpu_rows({0: {"drop": 7}, 1: {"drop": WRAPPED}})
    lasting = Lasting()
    before = over_netlink(ScriptedStats(near), lasting=lasting)
    assert drops(scrape(before)) == {"": 7 + NEAR_WRAP}
    before.close()
    # A reload builds the collectors anew, with the state that outlives them: no reset.
    reloaded = over_netlink(ScriptedStats(wrapped), lasting=lasting)
    assert drops(scrape(reloaded)) == {"": 7 + NEAR_WRAP + 0x20}
    # A restart: the kernel's sum again (one reset, which Prometheus handles).
    restarted = over_netlink(ScriptedStats(wrapped))
    assert drops(scrape(restarted)) == {"": 7 + WRAPPED}


class HeldStats(ScriptedStats):
    """The second scrape is held after reading its rows, until `release` is set."""

    def __init__(self, *scrapes: list[CpuStats]) -> None:
        super().__init__(*scrapes)
        self.reads = 0
        self.holding = threading.Event()
        self.release = threading.Event()

    def cpu_stats(self) -> list[CpuStats]:
        self.reads += 1
        rows = self.rows
        if self.reads == 2:
            self.holding.set()
            assert self.release.wait(10)
        return rows


def test_concurrent_scrapes_account_their_readings_in_the_order_they_were_read():
    # Readings 100, 200, 300, 400 of CPU 1's drop; the second scrape is held between reading
    # 200 and accounting for it while a third reads 300. Had 300 been accounted first, 200
    # after it would count as a wrap: 2^32 drops that never happened, for good.
    reader = HeldStats(*(captured_cpu_rows({1: {"drop": d}}) for d in (100, 200, 300, 400)))
    collector = over_netlink(reader)
    results: dict[str, dict] = {}

    def scrape_as(name: str) -> None:
        results[name] = scrape(collector)

    scrape_as("first")
    held = threading.Thread(target=scrape_as, args=("held",))
    held.start()
    assert reader.holding.wait(10)
    other = threading.Thread(target=scrape_as, args=("other",))
    other.start()
    other.join(0.5)  # done by now unless it waits for the held scrape, as it should
    reader.release.set()
    held.join(10)
    other.join(10)
    scrape_as("last")

    assert [drops(results[n])[""] for n in ("first", "held", "other", "last")] == [
        100,
        200,
        300,
        400,
    ]


# --- the collector over procfs --------------------------------------------------------------

PROCFS_NAMES = {name: column for column, name in NF_CONNTRACK_STAT_ALIASES.items()}


def stat_text(rows: list[dict[str, int]]) -> str:
    """/proc/net/stat/nf_conntrack as Linux 6.18 writes it (the fixture's header), one line
    per row of ctnetlink-named counters; counters not given are 0."""
    header = (PROCFS / STAT_FILE).read_text().splitlines()[0].split()
    lines = [" ".join(header)]
    for row in rows:
        values = {PROCFS_NAMES.get(name, name): v for name, v in row.items()}
        values.setdefault("entries", 1234)
        assert set(values) <= set(header), set(values) - set(header)
        lines.append(" ".join(f"{values.get(column, 0):08x}" for column in header))
    return "\n".join(lines) + "\n"


@pytest.fixture
def procfs_root(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    shutil.copytree(PROCFS, root)
    return root


def refused() -> object:
    raise PermissionError(errno.EPERM, "Operation not permitted")


def over_procfs(root: Path, per_cpu: bool = False) -> ConntrackCollector:
    return ConntrackCollector(
        ConntrackOptions(per_cpu=per_cpu), context(root, conntrack_stats=refused)
    )


@pytest.mark.parametrize("per_cpu", [False, True], ids=["sum", "per_cpu"])
def test_procfs_wrap_on_one_cpu_rises_by_exactly_the_wrapped_advance(procfs_root, per_cpu):
    stat = procfs_root / STAT_FILE
    collector = over_procfs(procfs_root, per_cpu)
    stat.write_text(stat_text([{"drop": 7, "found": 1}, {"drop": NEAR_WRAP, "found": 2}]))
    first = scrape(collector)
    stat.write_text(stat_text([{"drop": 7, "found": 1}, {"drop": WRAPPED, "found": 2}]))
    second = scrape(collector)

    assert sources(first, "conntrack") == sources(second, "conntrack") == ["procfs"]
    if per_cpu:
        assert drops(first) == {"0": 7, "1": NEAR_WRAP}
        assert drops(second) == {"0": 7, "1": NEAR_WRAP + 0x20}
    else:
        assert drops(first) == {"": 7 + NEAR_WRAP}
        assert drops(second) == {"": 7 + NEAR_WRAP + 0x20}
    assert stat_counters(second)["found"] == 3


def test_procfs_stat_file_gone_serves_no_counters_and_back_carries_on(procfs_root):
    stat = procfs_root / STAT_FILE
    collector = over_procfs(procfs_root)
    stat.write_text(stat_text([{"drop": NEAR_WRAP}]))
    assert drops(scrape(collector)) == {"": NEAR_WRAP}
    stat.unlink()
    gone = scrape(collector)
    assert value(gone, "conntrack_entries") == 1234
    assert stat_counters(gone) == {}  # as without CONFIG_NF_CONNTRACK_PROCFS: counts only
    stat.write_text(stat_text([{"drop": WRAPPED}]))
    assert drops(scrape(collector)) == {"": NEAR_WRAP + 0x20}


# --- netlink refused at run time: procfs carries on the same totals ----------------------------


def merged(rows: list[CpuStats]) -> list[dict[str, int]]:
    """The netlink rows and the captured expectation rows, as one stat file row per CPU."""
    expect = {row.cpu: row.counters for row in captured_expect_rows()}
    return [row.counters | expect[row.cpu] for row in rows]


def eperm() -> NetlinkError:
    """What ctnetlink answers a process without CAP_NET_ADMIN."""
    return NetlinkError(errno.EPERM, "Operation not permitted")


def test_netlink_refused_at_run_time_procfs_carries_on_without_a_jump(procfs_root):
    before = captured_cpu_rows({0: {"drop": 7}, 1: {"drop": NEAR_WRAP}})
    after = captured_cpu_rows({0: {"drop": 8}, 1: {"drop": WRAPPED}})
    reader = ScriptedStats(before, eperm())
    collector = over_netlink(reader, root=procfs_root)
    first = scrape(collector)
    (procfs_root / STAT_FILE).write_text(stat_text(merged(after)))
    second = scrape(collector)

    assert sources(first, "conntrack") == ["netlink"]
    assert sources(second, "conntrack") == ["procfs"] and reader.closed
    assert drops(second)[""] - drops(first)[""] == 1 + 0x20
    # The same counters, under the same names, from either interface: no other series moved.
    assert {k: v for k, v in stat_counters(second).items() if k != "drop"} == {
        k: v for k, v in stat_counters(first).items() if k != "drop"
    }


def test_procfs_rows_keep_netlinks_cpu_numbers_where_the_possible_cpus_have_a_hole(procfs_root):
    # Possible CPUs 0 and 2: netlink says so in res_id, the stat file only lists two rows.
    rows = captured_cpu_rows({0: {"drop": 7}, 1: {"drop": NEAR_WRAP}})
    before = [rows[0], rows[1]._replace(cpu=2)]
    after = captured_cpu_rows({0: {"drop": 7}, 1: {"drop": WRAPPED}})
    collector = over_netlink(ScriptedStats(before, eperm()), per_cpu=True, root=procfs_root)
    assert drops(scrape(collector)) == {"0": 7, "2": NEAR_WRAP}
    (procfs_root / STAT_FILE).write_text(stat_text(merged(after)))
    assert drops(scrape(collector)) == {"0": 7, "2": NEAR_WRAP + 0x20}
