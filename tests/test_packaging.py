"""The package as pip builds it: a wheel made from the files the image's build gets (the
.dockerignore allowlist), with setuptools from the index in pip's isolated build environment,
as the Dockerfile and `pip install .` do.

Needs a reachable package index (PyPI, or the one pip is configured with).
"""

from __future__ import annotations

import ast
import email.parser
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import conntrack_exporter
from conntrack_exporter.revision import REVISION_FILE

ROOT = Path(__file__).resolve().parent.parent
LICENSE = ROOT / "LICENSE"


def build_context_files() -> list[str]:
    """The paths .dockerignore lets into the image's build: `*`, then `!path` for each."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line[1:].rstrip("/") for line in lines if line.startswith("!")]


class Built:
    def __init__(self, wheel: Path, log: str) -> None:
        self.wheel = wheel
        self.log = log
        with zipfile.ZipFile(wheel) as archive:
            self.names = archive.namelist()
            dist_info = next(n.split("/")[0] for n in self.names if ".dist-info/" in n)
            self.dist_info = dist_info
            self.metadata = email.parser.Parser().parsestr(
                archive.read(f"{dist_info}/METADATA").decode()
            )
            self.files = {name: archive.read(name) for name in self.names}


def copy_build_context(target: Path) -> Path:
    target.mkdir(exist_ok=True)
    for name in build_context_files():
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, target / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, target / name)
    return target


def build_wheel(source: Path, dist: Path, revision: str | None = None) -> Built:
    env = {k: v for k, v in os.environ.items() if k != "CONNTRACK_EXPORTER_REVISION"}
    if revision is not None:
        env["CONNTRACK_EXPORTER_REVISION"] = revision
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--wheel-dir", str(dist), "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    [wheel] = dist.glob("*.whl")
    return Built(wheel, log)


def backend_warnings(log: str) -> list[str]:
    """The Python warnings the build backend printed (pip -v shows its output): their class
    names end in Warning (BuildBackendWarning, SetuptoolsDeprecationWarning)."""
    return [line for line in log.splitlines() if re.search(r"[a-z]Warning\b", line)]


# As the Dockerfile passes its REVISION build argument: the build context has no .git.
BUILD_REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    source = copy_build_context(tmp_path_factory.mktemp("source"))
    return build_wheel(source, tmp_path_factory.mktemp("dist"), revision=BUILD_REVISION)


def test_the_build_context_holds_what_the_package_needs():
    assert set(build_context_files()) >= {
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "conntrack_exporter",
    }


def test_the_wheel_carries_the_license_and_its_spdx_expression(built):
    assert built.metadata["License-Expression"] == "Apache-2.0"
    assert built.metadata.get_all("License-File") == ["LICENSE"]
    assert built.metadata["License"] is None  # the deprecated free-text field is gone
    assert built.files[f"{built.dist_info}/licenses/LICENSE"] == LICENSE.read_bytes()
    assert built.metadata["Version"] == conntrack_exporter.__version__


def test_setuptools_warns_of_nothing(built, tmp_path):
    assert "Building wheel for conntrack-exporter" in built.log
    assert backend_warnings(built.log) == []
    # The control: the license as a table, as it was, makes setuptools warn, and it is seen.
    source = copy_build_context(tmp_path / "source")
    pyproject = source / "pyproject.toml"
    text = pyproject.read_text()
    assert 'license = "Apache-2.0"\nlicense-files = ["LICENSE"]\n' in text
    pyproject.write_text(
        text.replace(
            'license = "Apache-2.0"\nlicense-files = ["LICENSE"]\n',
            'license = { text = "Apache-2.0" }\n',
        )
    )
    (tmp_path / "dist").mkdir()
    control = build_wheel(source, tmp_path / "dist")
    # Built with no revision given and no .git: none recorded (the exporter says "unknown").
    assert f"conntrack_exporter/{REVISION_FILE}" not in control.names
    assert any(
        "`project.license` as a TOML table is deprecated" in line
        for line in backend_warnings(control.log)
    )


def test_license_is_the_apache_2_text():
    text = LICENSE.read_text()
    assert text.split()[:5] == ["Apache", "License", "Version", "2.0,", "January"]
    assert "END OF TERMS AND CONDITIONS" in text
    assert "APPENDIX: How to apply the Apache License to your work." in text


def runtime_requirements(built: Built) -> list[str]:
    """The wheel's Requires-Dist without an extra's marker: what `pip install` always pulls."""
    return sorted(
        requirement.split(">")[0].split("=")[0].strip()
        for requirement in built.metadata.get_all("Requires-Dist")
        if "extra ==" not in requirement
    )


def test_the_runtime_needs_prometheus_client_and_pyyaml_only(built):
    assert runtime_requirements(built) == ["prometheus-client", "pyyaml"]
    by_extra = [r for r in built.metadata.get_all("Requires-Dist") if r.startswith("pyroute2")]
    assert by_extra == ['pyroute2>=0.9; extra == "test"']


def test_the_package_imports_no_pyroute2():
    """pyroute2 is the tests' reference decoder: the exporter speaks netlink itself."""
    imported: dict[str, set[str]] = {}
    for path in sorted((ROOT / "conntrack_exporter").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                imported.setdefault(name.split(".")[0], set()).add(path.name)
    assert "pyroute2" not in imported, imported["pyroute2"]
    assert {"prometheus_client", "yaml"} <= set(imported)  # the scan sees imports at all


def test_the_wheel_records_the_revision_it_was_built_from(built, tmp_path):
    assert built.files[f"conntrack_exporter/{REVISION_FILE}"] == f"{BUILD_REVISION}\n".encode()
    # The wheel, unpacked as pip installs it, away from any checkout, says so.
    with zipfile.ZipFile(built.wheel) as archive:
        archive.extractall(tmp_path / "site")
    code = "import sys; from conntrack_exporter.cli import main; sys.exit(main(['--version']))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.splitlines()[0] == (
        f"conntrack-exporter, version {conntrack_exporter.__version__} (revision: {BUILD_REVISION})"
    )


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_wheel_built_in_a_checkout_records_its_head(tmp_path):
    """pip wheel . in a git checkout, with no revision given: setup.py reads HEAD itself."""
    source = copy_build_context(tmp_path / "source")

    def git(*args: str) -> str:
        identity = ("-c", "user.name=t", "-c", "user.email=t@example.com")
        done = subprocess.run(
            ["git", *identity, *args], cwd=source, capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "the package")
    (tmp_path / "dist").mkdir()
    built = build_wheel(source, tmp_path / "dist")
    head = git("rev-parse", "HEAD")
    assert built.files[f"conntrack_exporter/{REVISION_FILE}"] == f"{head}\n".encode()
