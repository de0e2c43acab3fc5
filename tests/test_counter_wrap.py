"""The kernel's 32-bit per-CPU counters wrap; the exported conntrack_stat_*_total never falls.

WrappingCounters on its own.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from conntrack_exporter.counters import U32, WrappingCounters
from conntrack_exporter.netlink.ctnetlink import CpuStats

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
