"""Shared fixtures. Kernel tests run in throwaway network namespaces with real conntrack."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

KERNEL_TOOLS = ("ip", "nft", "conntrack", "setpriv")


def kernel_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces (CI runs as root)"
    missing = [tool for tool in KERNEL_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"needs {', '.join(missing)} (make test installs them)"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = kernel_unavailable_reason()
    if reason is None:
        return
    for item in items:
        if "kernel" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@dataclass
class Netns:
    """A network namespace of our own, with conntrack active on its output hook."""

    name: str

    def run(self, *cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *cmd],
            check=check,
            capture_output=True,
            text=True,
            timeout=120,
            **kwargs,
        )

    def python(self, code: str, *args: str, user: str | None = None) -> str:
        prefix = _as_user(user)
        return self.run(*prefix, sys.executable, "-c", textwrap.dedent(code), *args).stdout

    def exporter(self, *flags: str, user: str | None = None) -> subprocess.CompletedProcess:
        """Run `conntrack-exporter --once` inside the namespace."""
        cmd = [*_as_user(user), sys.executable, "-m", "conntrack_exporter", "--once", *flags]
        return self.run(*cmd)

    def popen_exporter(self, *flags: str, user: str | None = None) -> subprocess.Popen:
        cmd = [*_as_user(user), sys.executable, "-m", "conntrack_exporter", *flags]
        return subprocess.Popen(
            ["ip", "netns", "exec", self.name, *cmd],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def conntrack_count(self) -> int:
        return int(self.run("conntrack", "-C").stdout)

    def conntrack_stats(self) -> dict[str, int]:
        """`conntrack -S`, summed over CPUs."""
        totals: dict[str, int] = {}
        for line in self.run("conntrack", "-S").stdout.splitlines():
            for field in line.split()[1:]:
                name, _, value = field.partition("=")
                totals[name] = totals.get(name, 0) + int(value)
        return totals

    def read(self, path: str) -> str:
        return self.run("cat", path).stdout

    def untrack_tcp_port(self, port: int) -> None:
        """Keep connections to `port` (our scrapes) out of the table the tests count."""
        self.run(
            "nft",
            "add",
            "chain",
            "inet",
            "cte",
            "raw",
            "{ type filter hook output priority -300; }",
        )
        self.run("nft", "add", "rule", "inet", "cte", "raw", "tcp", "dport", str(port), "notrack")
        self.run("nft", "add", "rule", "inet", "cte", "raw", "tcp", "sport", str(port), "notrack")

    def inject(self, count: int, protocol: str = "tcp", zone: int = 0) -> None:
        """Insert entries through ctnetlink (`conntrack -I`); the kernel counts each `insert`."""
        script = (
            f"for i in $(seq 1 {count}); do conntrack -I -p {protocol} -s 10.9.0.1 -d 10.9.0.2 "
            f"--sport $((10000 + i)) --dport 80 --state ESTABLISHED -t 600 --zone {zone} "
            "2>/dev/null || exit 1; done"
        )
        self.run("sh", "-c", script)

    def udp_flows(self, count: int, first_port: int = 20000) -> None:
        """Send one datagram to each of `count` distinct ports: one conntrack entry each."""
        self.python(
            """
            import socket, sys
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            first, count = int(sys.argv[1]), int(sys.argv[2])
            for port in range(first, first + count):
                try:
                    s.sendto(b"x", ("127.0.0.1", port))
                except OSError:
                    pass  # a full table drops the packet and sendto says EPERM
            """,
            str(first_port),
            str(count),
        )


def _as_user(user: str | None) -> list[str]:
    if user is None:
        return []
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def netns() -> Iterator[Netns]:
    name = f"cte-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    _sh("ip", "netns", "add", name)
    try:
        ns = Netns(name)
        ns.run("ip", "link", "set", "lo", "up")
        ns.run("nft", "add", "table", "inet", "cte")
        ns.run(
            "nft", "add", "chain", "inet", "cte", "out", "{ type filter hook output priority 0; }"
        )
        ns.run("nft", "add", "rule", "inet", "cte", "out", "ct", "state", "new", "counter")
        # Unreplied UDP entries expire after 30 s by default: outlive a slow test.
        ns.run("sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=600")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
