"""What the exporter says of itself: --version, conntrack_exporter_build_info's revision, and
the process_* metrics, from the real exporter; the revision's sources against git itself."""

from __future__ import annotations

import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import conntrack_exporter
from conntrack_exporter.revision import REVISION_FILE, git_revision
from tests.metrics import value
from tests.test_reload import SOCKET_ONLY, Exporter

ROOT = Path(__file__).resolve().parent.parent
VERSION = conntrack_exporter.__version__


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()


needs_git = pytest.mark.skipif(
    shutil.which("git") is None or not (ROOT / ".git").exists(),
    reason="needs git and a git checkout",
)


def run_version(*python_args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *python_args, "--version"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@needs_git
def test_version_says_version_revision_and_python_as_node_exporter_does():
    result = run_version("-m", "conntrack_exporter")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines() == [
        f"conntrack-exporter, version {VERSION} (revision: {git('rev-parse', 'HEAD')})",
        f"  python version:   {platform.python_version()} ({platform.python_implementation()})",
        f"  platform:         {sys.platform}/{platform.machine()}",
    ]


def copied_package(tmp_path: Path) -> Path:
    """The package alone, outside any checkout, as an installed wheel has it."""
    shutil.copytree(
        ROOT / "conntrack_exporter",
        tmp_path / "conntrack_exporter",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return tmp_path


def first_line_of_version(site: Path) -> str:
    code = f"import sys; sys.path.insert(0, {str(site)!r}); from conntrack_exporter.cli import main"
    result = run_version("-c", f"{code}; sys.exit(main())", cwd=site)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[0]


def test_the_revision_is_unknown_outside_a_checkout_without_a_recorded_one(tmp_path):
    site = copied_package(tmp_path)
    assert (
        first_line_of_version(site) == f"conntrack-exporter, version {VERSION} (revision: unknown)"
    )


@pytest.mark.parametrize(
    ("recorded", "shown"),
    [
        ("0123456789abcdef0123456789abcdef01234567\n", "0123456789abcdef0123456789abcdef01234567"),
        ("v0.1.0-3-g0123abc\n", "v0.1.0-3-g0123abc"),
        ("not a revision; rm -rf\n", "unknown"),  # refused as written, never shown
    ],
)
def test_a_revision_recorded_at_build_time_is_shown(tmp_path, recorded, shown):
    site = copied_package(tmp_path)
    (site / "conntrack_exporter" / REVISION_FILE).write_text(recorded)
    assert (
        first_line_of_version(site) == f"conntrack-exporter, version {VERSION} (revision: {shown})"
    )


@needs_git
def test_the_checkouts_revision_is_read_as_git_reads_it(tmp_path):
    """Loose refs, packed refs, a detached HEAD and a linked worktree, each against
    `git rev-parse HEAD`."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git("init", "-q", "-b", "main", cwd=repo)
    identity = ("-c", "user.name=t", "-c", "user.email=t@example.com")

    def commit(message: str) -> str:
        git(*identity, "commit", "-q", "--allow-empty", "-m", message, cwd=repo)
        return git("rev-parse", "HEAD", cwd=repo)

    assert git_revision(repo) is None  # no commit yet: HEAD names a branch with no ref
    first = commit("one")
    assert git_revision(repo) == first  # a loose ref
    git("pack-refs", "--all", cwd=repo)
    assert not (repo / ".git" / "refs" / "heads" / "main").exists()
    assert git_revision(repo) == first  # packed
    second = commit("two")
    assert git_revision(repo) == second != first  # a loose ref beside the packed one
    git("checkout", "-q", "--detach", first, cwd=repo)
    assert git_revision(repo) == first  # detached
    worktree = tmp_path / "worktree"
    git("worktree", "add", "-q", "-b", "side", str(worktree), "main", cwd=repo)
    assert git_revision(worktree) == git("rev-parse", "HEAD", cwd=worktree) == second
    assert git_revision(tmp_path) is None  # not a checkout


@needs_git
def test_a_scrape_serves_build_info_with_the_revision_and_the_process_metrics(tmp_path):
    config = tmp_path / "config.yml"
    config.write_text(SOCKET_ONLY)
    started = time.time()
    running = Exporter(config)
    try:
        listening = time.time()
        first = running.scrape()
        second = running.scrape()
        nofile_soft, _ = resource.prlimit(running.process.pid, resource.RLIMIT_NOFILE)
        fds = len(os.listdir(f"/proc/{running.process.pid}/fd"))
    finally:
        running.process.terminate()
        running.process.wait(timeout=10)
    labels = {
        "version": VERSION,
        "revision": git("rev-parse", "HEAD"),
        "python_version": platform.python_version(),
    }
    assert value(first, "conntrack_exporter_build_info", **labels) == 1
    assert len(first["conntrack_exporter_build_info"]) == 1

    # Boot time plus the process's start in clock ticks: /proc/stat gives the boot time in whole
    # seconds (rounded down) and the start in ticks, so the value may be up to a second early.
    assert started - 1.02 <= value(first, "process_start_time_seconds") <= listening
    assert value(first, "process_max_fds") == nofile_soft  # raised to the hard limit
    assert 3 <= value(first, "process_open_fds") <= fds + 5  # give or take the scrape's own
    assert 5e6 < value(first, "process_resident_memory_bytes") < 1e9
    assert value(first, "process_virtual_memory_bytes") > value(
        first, "process_resident_memory_bytes"
    )
    cpu = value(first, "process_cpu_seconds_total")
    assert 0 < cpu <= value(second, "process_cpu_seconds_total")


def test_version_needs_nothing_else():
    """--version ignores every other flag's value and reads no configuration file."""
    result = run_version("-m", "conntrack_exporter", "--config.file", "/nonexistent.yml")
    assert result.returncode == 0 and result.stdout.startswith("conntrack-exporter, version ")
