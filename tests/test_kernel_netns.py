"""Network namespace discovery on the real kernel (conntrack_exporter/netns.py).

"Pods" here are processes in network namespaces of their own (`unshare -n sleep`), as on a
Kubernetes node; a veth pair with one end in a pod's namespace shows when that namespace is
really destroyed (the kernel deletes the host end with it).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conntrack_exporter.netns import NamespaceFiles, NamespaceTable, discover, namespace_key
from conntrack_exporter.procfs import ProcFS, parse_snmp_table

pytestmark = pytest.mark.kernel
PROC = ProcFS("/proc")


class Pod:
    """A process in a network namespace of its own, with lo up."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(["unshare", "-n", "sleep", "600"])
        self.pid = self.process.pid
        deadline = time.monotonic() + 10
        while namespace_key(PROC, self.pid) == namespace_key(PROC, "self"):
            assert time.monotonic() < deadline, "unshare never entered a new namespace"
            time.sleep(0.01)
        self.key = namespace_key(PROC, self.pid)
        self.run("ip", "link", "set", "lo", "up")

    def run(self, *cmd: str, **kwargs: object) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["nsenter", "-t", str(self.pid), "-n", *cmd],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
            **kwargs,
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def pods() -> Iterator[list[Pod]]:
    started: list[Pod] = []
    try:
        for _ in range(3):
            started.append(Pod())
        yield started
    finally:
        for pod in started:
            pod.stop()


def test_discovery_finds_each_namespace_with_its_processes_but_its_own(pods):
    # A second process in the first pod's namespace, as a pod's containers share one.
    sidecar = subprocess.Popen(["nsenter", "-t", str(pods[0].pid), "-n", "sleep", "600"])
    try:
        deadline = time.monotonic() + 10
        while namespace_key(PROC, sidecar.pid) != pods[0].key:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        own = namespace_key(PROC, "self")
        found = {namespace.key: namespace.pids for namespace in discover(PROC, exclude=own)}
    finally:
        sidecar.kill()
        sidecar.wait()
    assert found[pods[0].key] == tuple(sorted((pods[0].pid, sidecar.pid)))
    assert found[pods[1].key] == (pods[1].pid,)
    assert found[pods[2].key] == (pods[2].pid,)
    assert own not in found
    assert len({pod.key for pod in pods}) == 3


def test_discovery_as_nobody_finds_the_same_namespaces(pods):
    """No capability, no setns: /proc/PID/net is readable by any uid."""
    code = textwrap.dedent(
        """
        from conntrack_exporter.netns import discover, namespace_key
        from conntrack_exporter.procfs import ProcFS
        proc = ProcFS("/proc")
        for namespace in discover(proc, exclude=namespace_key(proc, "self")):
            print(namespace.key.dev, namespace.key.ino, *namespace.pids)
        """
    )
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
    ).stdout
    seen = {}
    for line in out.splitlines():
        dev, ino, *pids = map(int, line.split())
        seen[(dev, ino)] = tuple(pids)
    for pod in pods:
        assert seen[tuple(pod.key)] == (pod.pid,)


def listen_overflows(text: str) -> int:
    table = parse_snmp_table(text, "TcpExt", ["ListenOverflows"])
    assert table is not None
    return table["ListenOverflows"]


OVERFLOW = """
import socket
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1)
port = listener.getsockname()[1]
clients = []
for _ in range(40):
    client = socket.socket()
    client.setblocking(False)
    client.connect_ex(("127.0.0.1", port))
    clients.append(client)
import time
time.sleep(1)
for client in clients:
    client.close()
"""


def test_the_files_read_the_namespaces_own_counters(pods):
    """Listen overflows made for real in one pod: its files say what nstat says inside it,
    another pod's and the host's files do not move."""
    table = NamespaceTable(PROC)
    try:
        table.update(discover(PROC, exclude=namespace_key(PROC, "self")))
        host_before = listen_overflows(Path("/proc/net/netstat").read_text())
        pods[0].run(sys.executable, "-c", OVERFLOW)
        ours = listen_overflows(table.files[pods[0].key].read("net/netstat") or "")
        nstat = pods[0].run("nstat", "-az", "TcpExtListenOverflows").stdout.split()
        other = listen_overflows(table.files[pods[1].key].read("net/netstat") or "")
        host_after = listen_overflows(Path("/proc/net/netstat").read_text())
    finally:
        table.close()
    assert ours > 0
    assert ours == int(nstat[nstat.index("TcpExtListenOverflows") + 1])
    assert other == 0
    assert host_after == host_before


def fds_into(pid: int, holder: int | str = "self") -> list[str]:
    """What process `holder` has open of process `pid`'s /proc files."""
    links = []
    for fd in os.listdir(f"/proc/{holder}/fd"):
        with contextlib.suppress(FileNotFoundError):  # an fd closed while we look
            links.append(os.readlink(f"/proc/{holder}/fd/{fd}"))
    return [link for link in links if link.startswith(f"/proc/{pid}/")]


@contextlib.contextmanager
def namespace_witness(pid: int) -> Iterator[Callable[[], bool]]:
    """A veth pair with one end in `pid`'s network namespace; yields whether the host's end
    is there, which is whether that namespace still exists (the kernel deletes the pair with
    it)."""
    host_end = f"vh{uuid.uuid4().hex[:10]}"
    subprocess.run(
        ["ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", str(pid)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    try:
        yield Path(f"/sys/class/net/{host_end}").exists
    finally:
        subprocess.run(["ip", "link", "del", host_end], capture_output=True, timeout=30)


def test_a_gone_pods_namespace_is_dropped_and_really_freed(pods):
    """The host end of a veth pair whose other end is in the pod's namespace lives exactly
    as long as that namespace: after the pod's last process exits, our open files still hold
    the namespace (the host end stays); the next pass closes them and the kernel destroys
    the namespace (the host end goes)."""
    gone = pods[0]
    table = NamespaceTable(PROC)
    with namespace_witness(gone.pid) as namespace_exists, contextlib.closing(table):
        own = namespace_key(PROC, "self")
        table.update(discover(PROC, exclude=own))
        assert gone.key in table.files and fds_into(gone.pid)
        gone.stop()
        time.sleep(1)  # namespace clean-up is asynchronous: give it time to go, wrongly
        assert namespace_exists(), "the namespace went while our fds held it"
        assert table.files[gone.key].read("net/sockstat")  # still reads the dead namespace

        namespaces = discover(PROC, exclude=own)
        assert gone.key not in {namespace.key for namespace in namespaces}
        table.update(namespaces)
        assert gone.key not in table.files
        assert fds_into(gone.pid) == []
        assert {pods[1].key, pods[2].key} <= table.files.keys()
        deadline = time.monotonic() + 20
        while namespace_exists():
            assert time.monotonic() < deadline, "the namespace was not freed"
            time.sleep(0.1)


def test_files_are_not_kept_through_a_pid_of_another_namespace(pods):
    """Opened through a pid that is no longer in the namespace (it exited and its number
    went to a process elsewhere): nothing is kept, rather than another namespace's files."""
    from conntrack_exporter.netns import Namespace

    elsewhere = pods[1].pid
    with pytest.raises(FileNotFoundError):
        NamespaceFiles(PROC, Namespace(pods[0].key, (elsewhere,)))
    files = NamespaceFiles(PROC, Namespace(pods[0].key, (elsewhere, pods[0].pid)))
    try:
        assert files.read("net/sockstat")  # through the namespace's next pid
    finally:
        files.close()
    assert fds_into(elsewhere) == [] and fds_into(pods[0].pid) == []
