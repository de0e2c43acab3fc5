"""The README's claims that code can check: its node_exporter mapping, against node_exporter's
own output (Debian's prometheus-node-exporter, which `make test` installs) and ours."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.metrics import parse_samples
from tests.test_web_load import free_port

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
GOLDEN = ROOT / "tests" / "golden"
NODE_EXPORTER = shutil.which("prometheus-node-exporter") or "/usr/bin/prometheus-node-exporter"
ROW = re.compile(r"^\| `([^`]+)` \| `([^`]+)` \|")
SELECTOR = re.compile(r"^([a-z_]+)(?:\{(.*)\})?$")


def mapping() -> list[tuple[str, str]]:
    text = README.read_text()
    table = text.split("<!-- node_exporter mapping: begin -->")[1]
    table = table.split("<!-- node_exporter mapping: end -->")[0]
    return [(m[1], m[2]) for line in table.splitlines() if (m := ROW.match(line))]


def node_exporter_names() -> set[str]:
    """The metric names node_exporter's conntrack, sockstat, netstat and filefd collectors
    serve on this machine."""
    port = free_port()
    process = subprocess.Popen(
        [
            NODE_EXPORTER,
            f"--web.listen-address=127.0.0.1:{port}",
            "--collector.disable-defaults",
            *("--collector.conntrack", "--collector.sockstat"),
            *("--collector.netstat", "--collector.filefd"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    text = r.read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline, "node_exporter did not start"
                time.sleep(0.1)
    finally:
        process.terminate()
        process.wait(timeout=10)
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def our_series() -> dict[str, set[frozenset[tuple[str, str]]]]:
    """Every series of the conntrack and socket collectors' golden files, by name."""
    found: dict[str, set[frozenset[tuple[str, str]]]] = {}
    for name in ("conntrack.prom", "socket.prom"):
        # Masked values (<duration>, <time>, <process>) read as 0.
        text = re.sub(r" <[a-z]+>$", " 0", (GOLDEN / name).read_text(), flags=re.M)
        for metric, series in parse_samples(text).items():
            found.setdefault(metric, set()).update(frozenset(key) for key in series)
    return found


def test_the_mapping_is_there():
    rows = mapping()
    assert len(rows) >= 25
    assert {theirs.split("_")[1] for theirs, _ in rows} == {"nf", "sockstat", "netstat", "filefd"}


@pytest.mark.skipif(not Path(NODE_EXPORTER).exists(), reason="needs prometheus-node-exporter")
def test_every_node_exporter_name_of_the_mapping_is_node_exporters():
    served = node_exporter_names()
    assert {theirs for theirs, _ in mapping()} - served == set()


def test_every_name_of_ours_in_the_mapping_is_a_series_we_serve():
    ours = our_series()
    for theirs, selector in mapping():
        name, labels = SELECTOR.match(selector).groups()
        wanted = frozenset(re.findall(r'([a-z_]+)="([^"]*)"', labels or ""))
        assert any(wanted <= key for key in ours.get(name, ())), (theirs, selector)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool")
def test_the_plain_scrape_config_is_valid_with_our_rules(tmp_path):
    text = README.read_text().split("<!-- scrape config: begin -->")[1]
    text = text.split("<!-- scrape config: end -->")[0]
    config = text.split("```yaml\n")[1].split("```")[0]
    rules = tmp_path / "conntrack-exporter.rules.yml"
    shutil.copy(ROOT / "grafana" / "rules" / "conntrack-exporter.rules.yml", rules)
    path = tmp_path / "prometheus.yml"
    path.write_text(config.replace("/etc/prometheus/conntrack-exporter.rules.yml", str(rules)))
    checked = subprocess.run(
        ["promtool", "check", "config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout and "rules found" in checked.stdout
    # The relabeling's regex takes the host's name off host:port.
    regex = re.search(r'regex: "(.*)"', config)[1].replace("\\\\", "\\")
    assert re.fullmatch(regex, "node-1.example.net:9371")[1] == "node-1.example.net"


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but - and _ dropped, spaces -."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_the_readmes_links_within_it_lead_to_its_headings():
    text = README.read_text()
    headings = {anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links and links - headings == set()


def test_the_readme_reads_in_a_new_users_order():
    """What it is, install, quick start (the two commands come first of all), privileges,
    metrics, then the rest."""
    text = README.read_text()
    assert text.split("```sh\n")[1].startswith("make run ")
    assert "\nmake test " in text.split("```")[1]
    sections = [line[3:] for line in text.splitlines() if line.startswith("## ")]
    assert sections[:5] == [
        "What it is, and why",
        "Install",
        "Quick start",
        "Privileges",
        "Metrics",
    ]
