"""The process_* metrics: held against prometheus_client's process collector, on this process."""

from __future__ import annotations

import os
import resource

import pytest
from prometheus_client.process_collector import ProcessCollector

from conntrack_exporter.process import ProcessMetrics, parse_boot_time, parse_stat

# A real /proc/PID/stat line, of a process whose name holds a space and a parenthesis.
STAT = (
    b"4242 (ex ) porter) S 1 4242 4242 0 -1 4194560 3262 0 0 0 150 25 0 0 20 0 6 0 "
    b"123456 36155392 7509 18446744073709551615 1 1 0 0 0 0 0 16781312 16386 0 0 0 17 1 0 0 "
    b"0 0 0 0 0 0 0 0 0 0\n"
)


def test_stat_fields_come_from_after_the_last_parenthesis():
    ticks = os.sysconf("SC_CLK_TCK")
    assert parse_stat(STAT) == {
        "cpu_seconds": 175 / ticks,
        "start_ticks": 123456,
        "virtual_memory_bytes": 36155392.0,
        "resident_memory_bytes": float(7509 * resource.getpagesize()),
    }


@pytest.mark.parametrize("data", [b"", b"4242 (x) S 1 2 3", STAT.replace(b" 150 ", b" x ")])
def test_a_garbled_stat_is_a_value_error(data):
    with pytest.raises(ValueError):
        parse_stat(data)


def test_boot_time():
    assert parse_boot_time(b"cpu  1 2 3\nintr 5\nbtime 1764000000\nprocesses 9\n") == 1.764e9
    with pytest.raises(ValueError):
        parse_boot_time(b"cpu  1 2 3\n")


def samples(collector: object) -> dict[str, tuple[str, str, float]]:
    return {
        sample.name: (family.type, family.documentation, sample.value)
        for family in collector.collect()  # type: ignore[attr-defined]
        for sample in family.samples
    }


def test_the_same_families_and_values_as_prometheus_clients_collector():
    ours = ProcessMetrics()
    try:
        mine, reference = samples(ours), samples(ProcessCollector(registry=None))
        listed = len(os.listdir("/proc/self/fd")) - 1  # less the listing's own
    finally:
        ours.close()
    assert {name: kind for name, (kind, _, _) in mine.items()} == {
        name: kind for name, (kind, _, _) in reference.items()
    }
    assert {name: doc for name, (_, doc, _) in mine.items()} == {
        name: doc for name, (_, doc, _) in reference.items()
    }
    for exact in ("process_start_time_seconds", "process_max_fds"):
        assert mine[exact][2] == reference[exact][2]
    # The others move between the two reads: memory by what the reference allocates, CPU by a
    # tick, and the reference counts the descriptor it lists /proc/self/fd with.
    assert abs(mine["process_open_fds"][2] - reference["process_open_fds"][2]) <= 1
    assert mine["process_open_fds"][2] == listed
    assert 0 < mine["process_cpu_seconds_total"][2] <= reference["process_cpu_seconds_total"][2]
    for gauge in ("process_resident_memory_bytes", "process_virtual_memory_bytes"):
        assert abs(mine[gauge][2] - reference[gauge][2]) <= 8 * 2**20


def test_closing_releases_the_descriptor_it_holds():
    before = set(os.listdir("/proc/self/fd"))
    metrics = ProcessMetrics()
    assert len(set(os.listdir("/proc/self/fd")) - before) == 1  # /proc/self/stat
    metrics.close()
    metrics.close()
    assert set(os.listdir("/proc/self/fd")) == before
    assert list(metrics.collect()) == []


def test_without_proc_there_are_no_process_metrics_and_a_warning(tmp_path, caplog):
    metrics = ProcessMetrics(str(tmp_path))
    assert list(metrics.collect()) == []
    assert [r.getMessage() for r in caplog.records] == ["no process metrics: /proc unreadable"]
