"""Golden exposition per collector, and promtool's lint over the whole output.

The golden cases read a fixed procfs tree (tests/fixtures/procfs/<case>/) with netlink
refused, as an unprivileged process: the same code path an exporter without CAP_NET_ADMIN
takes. Values that change every run (durations, the Python version) are masked.
Regenerate after an intended change with `UPDATE_GOLDEN=1 make test`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
GOLDEN = HERE / "golden"
PROCFS = HERE / "fixtures" / "procfs"

CASES = {
    "conntrack": ("conntrack", []),
    "conntrack_per_cpu": ("conntrack", ["--config.file", str(HERE / "fixtures" / "per_cpu.yml")]),
    "socket": ("socket", []),
}
MASKS = [
    (
        re.compile(r"^(conntrack_exporter_collector_duration_seconds\{[^}]*\}) .*$", re.M),
        r"\1 <duration>",
    ),
    (re.compile(r'python_version="[^"]*"'), 'python_version="<python>"'),
]


def unprivileged() -> list[str]:
    """Run as nobody when root, so that ctnetlink refuses us as it would any unprivileged user."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv to drop root")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def run_once(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*unprivileged(), sys.executable, "-m", "conntrack_exporter", "--once", *flags],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )


def masked(text: str) -> str:
    for pattern, replacement in MASKS:
        text = pattern.sub(replacement, text)
    return text


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_exposition(case):
    fixture, flags = CASES[case]
    result = run_once(
        "--collector.disable-defaults",
        f"--collector.{fixture.split('_')[0]}",
        "--path.procfs",
        str(PROCFS / fixture),
        *flags,
    )
    got = masked(result.stdout)
    golden = GOLDEN / f"{case}.prom"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(got)
    assert got == golden.read_text()


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="needs promtool (make test installs it)"
)
@pytest.mark.parametrize("flags", [[], ["--path.procfs", str(PROCFS / "conntrack")]])
def test_promtool_accepts_full_output(flags):
    exposition = subprocess.run(
        [sys.executable, "-m", "conntrack_exporter", "--once", *flags],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert "conntrack_entries " in exposition
    lint = subprocess.run(
        ["promtool", "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert lint.returncode == 0 and lint.stdout + lint.stderr == "", lint.stdout + lint.stderr


TABLE_MASKS = [
    (re.compile(r"^(conntrack_table_scan_(?:duration|timestamp)_seconds) .*$", re.M),
     r"\1 <time>"),
]  # fmt: skip
TABLE_CASES = {
    "conntrack_table": {"top_k": 5, "label_ct_zone": True, "label_mark": True},
    "conntrack_table_no_top": {"top_k": 0},
    "conntrack_table_every_pool": {"top_k": 100},
}


@pytest.mark.parametrize("case", sorted(TABLE_CASES))
def test_golden_table_exposition_from_a_captured_dump(case, tmp_path, monkeypatch):
    """The conntrack_table collector over a real dump captured by capture_dump.py.

    The dump's bytes stand in for the socket (the I/O edge); decoding, tallying and every
    metric family are the real code. The kernel tests cover the live socket.
    """
    from prometheus_client.exposition import generate_latest

    from conntrack_exporter.collectors.conntrack_table import (
        ConntrackTableCollector,
        ConntrackTableOptions,
    )
    from conntrack_exporter.netlink.core import iter_messages
    from conntrack_exporter.netlink.cttable import TableTally
    from conntrack_exporter.procfs import ProcFS
    from conntrack_exporter.registry import CollectorContext, ExporterCollector

    dump = (HERE / "fixtures" / "netlink" / "ct_dump_mix.bin").read_bytes()
    entries = sum(1 for msg in iter_messages(dump, len(dump)) if msg.type == 0x100)
    count = tmp_path / "sys" / "net" / "netfilter" / "nf_conntrack_count"
    count.parent.mkdir(parents=True)
    count.write_text(f"{entries}\n")
    options = ConntrackTableOptions(**TABLE_CASES[case])
    collector = ConntrackTableCollector(options, CollectorContext(ProcFS(str(tmp_path)), 1.0))

    def replay() -> tuple[TableTally, bool]:
        tally = TableTally(options.label_ct_zone, options.label_mark)
        for msg in iter_messages(dump, len(dump)):
            tally.add_message(dump, msg)
        return tally, True

    monkeypatch.setattr(collector, "_dump", replay)
    collector.scan()
    got = generate_latest(ExporterCollector([collector])).decode()
    for pattern, replacement in [*MASKS, *TABLE_MASKS]:
        got = pattern.sub(replacement, got)
    golden = GOLDEN / f"{case}.prom"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(got)
    assert got == golden.read_text()
    assert f"conntrack_table_scan_entries {float(entries)}" in got
