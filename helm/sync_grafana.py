#!/usr/bin/env python3
"""Copy the alert rules and dashboards from grafana/ into the Helm chart's files/.

grafana/ is the single source; the chart's copies are never edited by hand. Run this after
changing a rule or a dashboard and commit both. With --check nothing is written: the exit
status is 1, with every stale, missing or extra copy named on stderr, when the copies differ
from their sources.

    python helm/sync_grafana.py            # rewrite the copies
    python helm/sync_grafana.py --check    # exit 1 if a copy is stale (tests/test_helm.py)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "grafana"
CHART = ROOT / "helm" / "conntrack-exporter"

# (source folder under grafana/, glob, destination folder under the chart's files/)
COPIES = (
    ("rules", "*.rules.yml", "files/rules"),
    ("dashboards", "*.json", "files/dashboards"),
)


@dataclass(frozen=True)
class Copy:
    source: Path
    target: Path


def planned_copies(grafana: Path = GRAFANA, chart: Path = CHART) -> list[Copy]:
    """Every file of grafana/ the chart carries, with the path of its copy."""
    copies = []
    for folder, pattern, destination in COPIES:
        for source in sorted((grafana / folder).glob(pattern)):
            copies.append(Copy(source, chart / destination / source.name))
    return copies


def problems(grafana: Path = GRAFANA, chart: Path = CHART) -> list[str]:
    """What differs between the sources and the chart's copies, one line per file."""
    copies = planned_copies(grafana, chart)
    found = []
    for copy in copies:
        if not copy.target.is_file():
            found.append(f"{copy.target}: missing (copy of {copy.source})")
        elif copy.target.read_bytes() != copy.source.read_bytes():
            found.append(f"{copy.target}: stale, differs from {copy.source}")
    expected = {copy.target for copy in copies}
    for _folder, pattern, destination in COPIES:
        for target in sorted((chart / destination).glob(pattern)):
            if target not in expected:
                found.append(f"{target}: extra, no source under {grafana}")
    return found


def sync(grafana: Path = GRAFANA, chart: Path = CHART) -> list[Path]:
    """Rewrite every stale or missing copy and delete extra ones; return the paths changed."""
    copies = planned_copies(grafana, chart)
    changed = []
    for copy in copies:
        data = copy.source.read_bytes()
        if not copy.target.is_file() or copy.target.read_bytes() != data:
            copy.target.parent.mkdir(parents=True, exist_ok=True)
            copy.target.write_bytes(data)
            changed.append(copy.target)
    expected = {copy.target for copy in copies}
    for _folder, pattern, destination in COPIES:
        for target in sorted((chart / destination).glob(pattern)):
            if target not in expected:
                target.unlink()
                changed.append(target)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if a copy is stale"
    )
    parser.add_argument("--grafana", type=Path, default=GRAFANA, help="source folder")
    parser.add_argument("--chart", type=Path, default=CHART, help="chart folder")
    args = parser.parse_args(argv)
    if args.check:
        found = problems(args.grafana, args.chart)
        for line in found:
            sys.stderr.write(f"{line}\n")
        if found:
            sys.stderr.write("run: python helm/sync_grafana.py, then commit the copies\n")
            return 1
        return 0
    for path in sync(args.grafana, args.chart):
        sys.stdout.write(f"updated {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
