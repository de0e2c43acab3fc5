"""Golden exposition per collector, and promtool's lint over the whole output.

Every collector of the collector table with a procfs fixture tree
(tests/fixtures/procfs/<collector>/) has a golden case, tests/golden/<collector>.prom: the
exporter run with that collector alone over that tree, with netlink refused, as an
unprivileged process (the code path of an exporter without CAP_NET_ADMIN). A new collector
needs no line here: its tree and its golden file are enough. EXTRA_CASES add configurations.
Values that change every run (durations, the Python version, the source revision, the process's
own metrics, when the configuration loaded) are masked.
Regenerate after an intended change with `UPDATE_GOLDEN=1 make test`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import pytest

from conntrack_exporter.collectors import COLLECTORS

HERE = Path(__file__).parent
GOLDEN = HERE / "golden"
PROCFS = HERE / "fixtures" / "procfs"


class Case(NamedTuple):
    collector: str
    flags: tuple[str, ...] = ()


CASES = {name: Case(name) for name in COLLECTORS if (PROCFS / name).is_dir()}
EXTRA_CASES = {
    "conntrack_per_cpu": Case(
        "conntrack", ("--config.file", str(HERE / "fixtures" / "per_cpu.yml"))
    ),
}
MASKS = [
    (
        re.compile(r"^(conntrack_exporter_collector_duration_seconds\{[^}]*\}) .*$", re.M),
        r"\1 <duration>",
    ),
    (re.compile(r'python_version="[^"]*"'), 'python_version="<python>"'),
    (re.compile(r'revision="[^"]*"'), 'revision="<revision>"'),
    # The process's own: its memory, CPU, fds and start, and when its configuration loaded.
    (re.compile(r"^(process_[a-z_]+) .*$", re.M), r"\1 <process>"),
    (
        re.compile(r"^(conntrack_exporter_config_last_reload_success_timestamp_seconds) .*$", re.M),
        r"\1 <time>",
    ),
    (
        re.compile(r"^(conntrack_exporter_pod_discovery_(?:duration|timestamp)_seconds) .*$", re.M),
        r"\1 <time>",
    ),
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


def test_the_procfs_collectors_have_golden_cases():
    assert set(CASES) >= {"conntrack", "socket", "pods"}  # from the collector table, not listed


@pytest.mark.parametrize("case", sorted(CASES.keys() | EXTRA_CASES.keys()))
def test_golden_exposition(case):
    collector, flags = CASES.get(case) or EXTRA_CASES[case]
    result = run_once(
        "--collector.disable-defaults",
        f"--collector.{collector}",
        "--path.procfs",
        str(PROCFS / collector),
        *flags,
    )
    assert_golden(case, masked(result.stdout))


def test_golden_pods_named_from_their_log_directories():
    """The pods collector over its fixture tree with the kubelet's pod-log directories
    (tests/fixtures/procfs/pods/logs): pods by namespace and name, the podman container by
    its cgroup; the automatic case above has no such directory and names pods by uid."""
    root = PROCFS / "pods"
    with tempfile.NamedTemporaryFile("w", suffix=".yml", dir="/tmp") as config:
        config.write(f"collectors:\n  pods:\n    pod_logs_path: {root / 'logs'}\n")
        config.flush()
        os.chmod(config.name, 0o644)  # read by nobody
        result = run_once(
            "--collector.disable-defaults",
            "--collector.pods",
            "--path.procfs",
            str(root),
            "--config.file",
            config.name,
        )
    got = masked(result.stdout)
    assert_golden("pods_named", got)
    assert 'socket_allocated{namespace="team-a",pod="web-1"} 15.0' in got


def assert_golden(case: str, got: str) -> None:
    golden = GOLDEN / f"{case}.prom"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(got)
    assert golden.exists(), f"no {golden}: write it with UPDATE_GOLDEN=1"
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
def test_golden_table_exposition_from_a_captured_dump(case, tmp_path):
    """The conntrack_table collector over a real dump captured by capture_dump.py.

    The dump's bytes stand in for the reader (the I/O edge); decoding, tallying and every
    metric family are the real code. The kernel tests cover the live socket.
    """
    from conntrack_exporter.collectors.conntrack_table import (
        ConntrackTableCollector,
        ConntrackTableOptions,
    )
    from tests.collectors import CAPTURED_ENTRIES, ReplayedTable, context, exposition

    count = tmp_path / "sys" / "net" / "netfilter" / "nf_conntrack_count"
    count.parent.mkdir(parents=True)
    count.write_text(f"{CAPTURED_ENTRIES}\n")
    options = ConntrackTableOptions(**TABLE_CASES[case])
    reader = ReplayedTable()
    collector = ConntrackTableCollector(options, context(tmp_path, conntrack_table=lambda: reader))
    collector.scan()
    got = exposition(collector)
    for pattern, replacement in [*MASKS, *TABLE_MASKS]:
        got = pattern.sub(replacement, got)
    assert_golden(case, got)
    assert f"conntrack_table_scan_entries {float(CAPTURED_ENTRIES)}" in got


def test_golden_table_names_the_pods_on_this_node(tmp_path):
    """The pods collector over its fixture tree, whose pods' namespaces hold addresses of
    the captured dump (web-1 10.71.1.2; coredns 10.71.1.3 and fd00:71:1::3; the podman
    container, not a pod, 10.72.0.4), then the table collector over the dump, the two
    sharing one configuration's pod addresses: each pod's entries, and its labels on the
    top-K and SNAT families."""
    from conntrack_exporter.collectors.conntrack_table import (
        ConntrackTableCollector,
        ConntrackTableOptions,
    )
    from conntrack_exporter.collectors.pods import PodsCollector, PodsOptions
    from conntrack_exporter.pod_addresses import PodAddressBook
    from tests.collectors import CAPTURED_ENTRIES, ReplayedTable, context, exposition

    count = tmp_path / "sys" / "net" / "netfilter" / "nf_conntrack_count"
    count.parent.mkdir(parents=True)
    count.write_text(f"{CAPTURED_ENTRIES}\n")
    book = PodAddressBook()
    root = PROCFS / "pods"
    pods = PodsCollector(
        PodsOptions(pod_logs_path=str(root / "logs")), context(root, pod_addresses=book)
    )
    reader = ReplayedTable()
    table = ConntrackTableCollector(
        ConntrackTableOptions(top_k=3),
        context(tmp_path, pod_addresses=book, conntrack_table=lambda: reader),
    )
    try:
        pods.scan()
        table.scan()
    finally:
        pods.close()
    got = exposition(table)
    for pattern, replacement in [*MASKS, *TABLE_MASKS]:
        got = pattern.sub(replacement, got)
    assert_golden("conntrack_table_pods", got)
    web = 'namespace="team-a",pod="web-1"'
    assert f'conntrack_table_top_source_entries{{address="10.71.1.2",{web}}} 55.0' in got
    assert 'conntrack_table_top_source_entries{address="127.0.0.1"} 156.0' in got
    # Two pods, two directions each; the podman container is no pod, though it has an address.
    assert got.count("conntrack_table_pod_entries{") == 4
    assert f'conntrack_table_pod_entries{{direction="outbound",{web}}} 55.0' in got
