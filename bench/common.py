"""What the benchmark scripts share: their throwaway namespace, signals, logging, /proc reads.

Imported as `common` when a script runs as `python bench/X.py` (Python puts bench/ first on
sys.path, for the children a script re-executes the same way too), as `bench.common` under
`python -m bench.X`.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import resource
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLONE_NEWNET = 0x40000000


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kwargs)


class Namespace:
    """A uniquely named netns with lo up and conntrack active; deleted on exit.

    conntrack stays idle in a fresh netns until a rule references it: the nft table `bench`
    counts new connections in an output chain, beside any `chains` given. The net.netfilter
    sysctls named in `timeouts` are set to `timeout` seconds in the namespace, to keep its
    entries for the whole run.
    """

    def __init__(
        self, prefix: str, timeouts: tuple[str, ...], timeout: int, chains: tuple[str, ...] = ()
    ) -> None:
        self.name = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
        self.timeouts = timeouts
        self.timeout = timeout
        self.chains = chains
        self.created = False

    def __enter__(self) -> Namespace:
        run(["ip", "netns", "add", self.name])
        self.created = True
        try:
            self._setup()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _setup(self) -> None:
        run(["ip", "-n", self.name, "link", "set", "lo", "up"])
        chains = ("chain out { type filter hook output priority 0; ct state new counter; }",)
        ruleset = "".join(f"    {chain}\n" for chain in chains + self.chains)
        run(self.argv(["nft", "-f", "-"]), input=f"table inet bench {{\n{ruleset}}}\n")
        for knob in self.timeouts:
            self.exec(["sysctl", "-qw", f"net.netfilter.{knob}={self.timeout}"])

    def __exit__(self, *exc: object) -> None:
        if self.created:
            subprocess.run(["ip", "netns", "del", self.name], check=False)

    def argv(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def exec(self, cmd: list[str]) -> str:
        return run(self.argv(cmd)).stdout

    def count(self) -> int:
        return int(self.exec(["conntrack", "-C"]).strip())


def status_kib(key: str, pid: int | str = "self") -> int:
    """A `key:  N kB` line of /proc/PID/status, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class Measured:
    """Wall time, CPU time and peak RSS growth of a `with` block, from inside this process.

    The peak is VmHWM after the block less VmRSS before it, the high-water mark reset to the
    current RSS on entry (proc(5), clear_refs "5"): start-up and imports do not count.
    """

    def __enter__(self) -> Measured:
        gc.collect()
        self.rss_before_kib = status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self._usage = resource.getrusage(resource.RUSAGE_SELF)
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._started
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.user = usage.ru_utime - self._usage.ru_utime
        self.sys = usage.ru_stime - self._usage.ru_stime
        self.growth_kib = status_kib("VmHWM") - self.rss_before_kib

    def result(self) -> dict:
        return {
            "wall": self.wall,
            "user": self.user,
            "sys": self.sys,
            "rss_before_kib": self.rss_before_kib,
            "growth_kib": self.growth_kib,
        }


def command_usage(cmd: list[str]) -> dict:
    """Wall and CPU time of a command whose output goes to /dev/null.

    CPU is the child's own user + sys from wait4: `ip netns exec` execs the command in place.
    """
    started = time.perf_counter()
    with open(os.devnull, "wb") as devnull:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=devnull, stderr=subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip
        try:
            assert proc.stderr is not None
            err = proc.stderr.read().decode(errors="replace")
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
    wall = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err}")
    return {"wall": wall, "user": usage.ru_utime, "sys": usage.ru_stime, "stderr": err}


def run_json(cmd: list[str]) -> dict:
    """Run a child that prints one JSON object, and add its whole wall time as process_wall."""
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, start_new_session=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout)
    out["process_wall"] = time.perf_counter() - started
    return out


def rotated(items: list, i: int) -> list:
    """items starting at the i-th (mod their number): who goes first in round i.

    Rotating the order from round to round makes a drift in machine load hit all alike.
    """
    shift = i % len(items)
    return items[shift:] + items[:shift]


def machine() -> str:
    return (
        f"machine: {platform.node()}, Linux {platform.release()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}"
    )


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def catch_interrupts() -> None:
    """A SIGTERM unwinds through the same `finally` blocks as a Ctrl-C."""
    signal.signal(signal.SIGTERM, _interrupt)
    # A shell without job control starts background commands with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def join_netns(name: str) -> None:
    """Move the calling thread (only it: namespaces are per thread) into netns `name`.

    The tests' fixtures use it too (tests/conftest.py): the sockets a joined thread opens,
    an HTTP client's say, live in that namespace.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns into {name}: {os.strerror(error)}")
    finally:
        os.close(fd)
