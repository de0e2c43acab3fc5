"""Shared fixtures. Kernel tests run in throwaway network namespaces with real conntrack."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.common import join_netns

KERNEL_TOOLS = ("ip", "nft", "conntrack", "setpriv")
MAX_FILE = Path("/proc/sys/net/netfilter/nf_conntrack_max")
HOST_COUNT_FILE = Path("/proc/sys/net/netfilter/nf_conntrack_count")
# A full table of ours holds at least this many entries, and this many more than the host's.
MIN_FULL_TABLE = 40
HOST_MARGIN = 200


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

    def thread_pool(self) -> ThreadPoolExecutor:
        """A one-thread pool whose thread has joined the namespace: the sockets it opens (an
        HTTP client, say) live there. Network namespaces are per thread."""
        return ThreadPoolExecutor(max_workers=1, initializer=join_netns, initargs=(self.name,))

    def hold_tcp_connections(self, count: int) -> subprocess.Popen:
        """Open `count` established loopback TCP connections in the namespace and hold them
        until the returned process is killed; the table then holds exactly `count` entries
        more."""
        code = """
            import socket, sys
            listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
            port = listener.getsockname()[1]
            held = []
            for _ in range(int(sys.argv[1])):
                client = socket.create_connection(("127.0.0.1", port))
                held += [client, listener.accept()[0]]
            print("ready", flush=True)
            sys.stdin.read()
        """
        before = self.conntrack_count()
        proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.name,
                sys.executable,
                "-c",
                textwrap.dedent(code),
                str(count),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        # One entry per connection (loopback: both directions are one entry); wait for all.
        deadline = time.monotonic() + 10
        while self.conntrack_count() < before + count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.conntrack_count() == before + count
        return proc

    @contextlib.contextmanager
    def table_full(self) -> Iterator[int]:
        """This namespace's table full for real: enough TCP connections held that its count
        stands well above the host's, then the global nf_conntrack_max lowered to that count
        (it is global, and each namespace's count is compared with it), restored on exit.

        Yields the count: every new flow in this namespace is then dropped, while the host's
        own table (smaller by HOST_MARGIN) keeps room for its traffic.
        """
        host_entries = int(HOST_COUNT_FILE.read_text())
        holder = self.hold_tcp_connections(max(MIN_FULL_TABLE, host_entries + HOST_MARGIN))
        old_max = MAX_FILE.read_text().strip()
        try:
            entries = self.conntrack_count()
            if int(HOST_COUNT_FILE.read_text()) + HOST_MARGIN // 2 > entries:
                pytest.skip("the host's table grew too fast to fill ours above it")
            MAX_FILE.write_text(str(entries))
            yield entries
        finally:
            MAX_FILE.write_text(old_max)
            holder.kill()
            holder.wait()

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
