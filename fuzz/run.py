"""`make fuzz`: every harness for its number of inputs, then inputs run and exec/s for each.

    python -m fuzz.run [--scale 0.1] [--only netlink] [-- libFuzzer flags]

Each harness runs in its own process (libFuzzer exits when done); its output goes to
build/fuzz/NAME/log.txt. Exits 1 if any harness found a crash (the input is written beside
the log, and the log says how to replay it).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from typing import NamedTuple

from fuzz.harness import ROOT, WORK

# At least a million for the netlink walkers, which see every byte a kernel sends; fewer for
# the rest, whose inputs are small files and which run far slower (YAML above all).
RUNS = {"netlink": 1_000_000, "procfs": 300_000, "config": 20_000}
STAT = re.compile(r"^stat::(\w+):\s+(\d+)$", re.MULTILINE)
ARTIFACT = re.compile(r"Test unit written to (\S+)")


class Outcome(NamedTuple):
    name: str
    inputs: int
    seconds: float
    exec_per_second: int
    new_units: int
    crash: str | None  # the crashing input's path


def run(name: str, runs: int, extra: list[str]) -> Outcome:
    log = WORK / name / "log.txt"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", f"fuzz.{name}", f"-runs={runs}", "-print_final_stats=1"]
    started = time.monotonic()
    with log.open("w") as out:
        subprocess.run([*command, *extra], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - started
    text = log.read_text(errors="replace")
    stats = {key: int(value) for key, value in STAT.findall(text)}
    inputs = stats.get("number_of_executed_units", 0)
    crash = ARTIFACT.search(text)
    return Outcome(
        name,
        inputs,
        seconds,
        # libFuzzer divides by whole seconds: a run shorter than one says 0.
        stats.get("average_exec_per_sec") or round(inputs / seconds),
        stats.get("new_units_added", 0),
        crash.group(1) if crash else None,
    )


def report(outcomes: list[Outcome]) -> str:
    lines = [f"{'harness':<10}{'inputs':>12}{'seconds':>10}{'exec/s':>10}{'new units':>11}  crash"]
    for o in outcomes:
        lines.append(
            f"{o.name:<10}{o.inputs:>12,}{o.seconds:>10.0f}{o.exec_per_second:>10,}"
            f"{o.new_units:>11,}  {o.crash or 'none'}"
        )
    return "\n".join(lines)


def say(text: str) -> None:
    """A line of the report on stdout (this is a command, not the package: no logging)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every run count")
    parser.add_argument("--only", choices=sorted(RUNS), action="append", help="this harness")
    parser.add_argument("libfuzzer", nargs="*", help="flags for libFuzzer, after --")
    args = parser.parse_args()
    outcomes = []
    for name in args.only or RUNS:
        runs = max(1, round(RUNS[name] * args.scale))
        say(f"fuzz/{name}.py: {runs:,} inputs (log: {WORK / name / 'log.txt'})")
        outcomes.append(run(name, runs, args.libfuzzer))
    say(report(outcomes))
    crashed = [o for o in outcomes if o.crash]
    for o in crashed:
        say(f"replay: {sys.executable} -m fuzz.{o.name} {o.crash}")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
