"""`make run` as a new user types it: a fresh virtualenv with the runtime only, and the
exporter's output alone on standard output, so that it pipes into promtool.

The virtualenv is made in a temporary directory (VENV=...), never the repository's .venv. It
needs a reachable package index (pip installs the runtime dependencies), and root for the
conntrack_table collector's scan of this namespace's table (which --once runs).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EGG_INFO = ROOT / "conntrack_exporter.egg-info"  # written by pip install -e
# What make run installs: the package, its runtime dependencies and the bcrypt extra. pip and
# setuptools come with every venv of Python 3.11.
RUNTIME = {"bcrypt", "conntrack-exporter", "prometheus-client", "pyyaml"}
VENV_OWN = {"pip", "setuptools"}
LIST_DISTRIBUTIONS = (
    "import importlib.metadata as m, re\n"
    "for d in m.distributions(): print(re.sub(r'[-_.]+', '-', d.metadata['Name']).lower())"
)

pytestmark = pytest.mark.skipif(
    shutil.which("make") is None or shutil.which("promtool") is None,
    reason="needs make and promtool (make test installs promtool)",
)


def make(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def promtool_check(exposition: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["promtool", "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def venv(tmp_path):
    had_egg_info = EGG_INFO.exists()
    yield tmp_path / "venv"
    if not had_egg_info:
        shutil.rmtree(EGG_INFO, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="the table scan of --once needs CAP_NET_ADMIN")
def test_make_run_once_pipes_into_promtool_on_a_fresh_venv_holding_the_runtime_only(venv):
    for attempt in ("fresh", "set up"):
        result = make("run", f"VENV={venv}", "ARGS=--once")
        assert result.returncode == 0, result.stderr
        # stdout is the exposition and nothing else: no recipe echo, no set-up chatter.
        assert result.stdout.startswith("# HELP "), (attempt, result.stdout[:300])
        assert "conntrack_exporter_collector_success" in result.stdout
        lint = promtool_check(result.stdout)
        assert (lint.returncode, lint.stdout + lint.stderr) == (0, ""), attempt
        if attempt == "fresh":
            assert f"setting up {venv} for make run" in result.stderr
        else:
            assert "setting up" not in result.stderr  # nothing installed again
    listing = subprocess.run(
        [str(venv / "bin" / "python"), "-c", LIST_DISTRIBUTIONS],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd="/",  # not the repository, whose egg-info would be listed too
    )
    assert set(listing.stdout.split()) - VENV_OWN == RUNTIME


def test_make_run_installs_the_runtime_and_make_test_the_test_extra(tmp_path):
    """The recipes (make -n prints them without running anything)."""
    venv = tmp_path / "venv"
    run = make("-n", "run", f"VENV={venv}", "ARGS=--once")
    installs = re.findall(r"pip install -q -e '([^']*)'", run.stdout)
    assert installs == [".[bcrypt]"]
    assert run.stdout.splitlines()[-1] == f"{venv}/bin/conntrack-exporter --once"
    test = make("-n", "test", f"VENV={venv}")
    assert re.findall(r"pip install -q -e '([^']*)'", test.stdout) == [".[test]"]
    # After make test, make run has nothing to install: the full set includes the runtime's.
    assert f"touch {venv}/.installed {venv}/.installed-run" in test.stdout
