"""The pods collector on a simulated Kubernetes node, against the real kernel.

A "pod" is a process in a network namespace of its own (`unshare -n sleep`), placed in a
kubelet-shaped cgroup on this machine's cgroup v2 hierarchy (systemd driver for two pods,
cgroupfs driver for one), with the pod-log directory the kubelet would make. What each pod's
series say is compared with `nstat` and `conntrack -C` run inside its namespace. Everything
made here is undone in `finally`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.metrics import parse_samples
from tests.test_kernel_netns import OVERFLOW, Pod, fds_into, namespace_witness
from tests.test_reload import Exporter

pytestmark = pytest.mark.kernel
CGROUP2 = Path("/sys/fs/cgroup/unified")
NOBODY = "65534"

UDP_FLOOD = """
import socket
receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
receiver.bind(("127.0.0.1", 0))
sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(3000):
    sender.sendto(b"x" * 200, receiver.getsockname())
"""
UDP_FLOWS = """
import socket
sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for port in range(20000, 20025):
    sender.sendto(b"x", ("127.0.0.1", port))
"""


@dataclass
class SimulatedPod:
    namespace: str
    name: str
    driver: str  # "systemd" or "cgroupfs"
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    container: str = field(default_factory=lambda: uuid.uuid4().hex * 2)
    # Where the kubelet's hierarchy starts: the hierarchy's root, or a cgroup below it, as a
    # kind node's kubelet nests its own below the node container's.
    root: Path = CGROUP2

    def start(self, pod_logs: Path, made: list[Path]) -> None:
        """Start the pod; the cgroup directories it makes are added to `made`."""
        self.netns = Pod()
        self.pid = self.netns.pid
        scope = self.root
        for part in self.cgroup_parts():
            scope = scope / part
            if not scope.exists():
                scope.mkdir()
                made.append(scope)
        (scope / "cgroup.procs").write_text(str(self.pid))
        (pod_logs / f"{self.namespace}_{self.name}_{self.uid}" / "app").mkdir(parents=True)

    def cgroup_parts(self) -> list[str]:
        if self.driver == "systemd":
            slice_uid = self.uid.replace("-", "_")
            return [
                "kubepods.slice",
                "kubepods-burstable.slice",
                f"kubepods-burstable-pod{slice_uid}.slice",
                f"cri-containerd-{self.container}.scope",
            ]
        return ["kubepods", "burstable", f"pod{self.uid}", self.container]

    def run(self, *cmd: str) -> str:
        return self.netns.run(*cmd).stdout

    def nstat(self, counter: str) -> int:
        fields = self.run("nstat", "-asz", counter).split()
        return int(fields[fields.index(counter) + 1])

    def stop(self) -> None:
        self.netns.stop()

    def labels(self) -> dict[str, str]:
        return {"namespace": self.namespace, "pod": self.name}


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory nobody can read, for pod logs and configuration files (pytest's tmp_path
    is root's alone)."""
    path = Path("/tmp") / f"cte-pods-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir(mode=0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture
def node(scratch) -> Iterator[tuple[list[SimulatedPod], Path]]:
    if not (CGROUP2 / "cgroup.procs").exists():
        pytest.skip(f"needs a cgroup v2 hierarchy at {CGROUP2}")
    pod_logs = scratch / "pods"
    pod_logs.mkdir(mode=0o755)
    pods = [
        SimulatedPod("team-a", "web-1", "systemd"),
        SimulatedPod("team-b", "dns-1", "cgroupfs"),
        SimulatedPod("team-c", "mesh-1", "systemd"),
    ]
    made: list[Path] = []  # cgroup directories, removed in reverse once every pod stopped
    try:
        for pod in pods:
            pod.start(pod_logs, made)
        yield pods, pod_logs
    finally:
        # Every step tried, whatever fails: one failure must not leave the rest behind.
        failures = []
        for pod in pods:
            with contextlib.suppress(AttributeError):  # one that never started
                try:
                    pod.stop()
                except Exception as exc:
                    failures.append(exc)
        try:
            remove_cgroups(made)
        except OSError as exc:
            failures.append(exc)
        if failures:
            raise failures[0]


def remove_cgroups(made: list[Path]) -> None:
    """Remove the cgroup directories made, deepest (last made) first; try every one, then
    raise the first failure."""
    failures = []
    for directory in reversed(made):
        try:
            remove_cgroup(directory)
        except OSError as exc:
            failures.append(exc)
    if failures:
        raise failures[0]


def remove_cgroup(directory: Path) -> None:
    deadline = time.monotonic() + 10
    while True:  # a cgroup empties a moment after its last process is reaped
        try:
            directory.rmdir()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def config(scratch: Path, pod_logs: Path, interval: float = 15.0) -> Path:
    path = scratch / f"config-{uuid.uuid4().hex[:6]}.yml"
    path.write_text(
        "collectors:\n"
        "  disable_defaults: true\n"
        "  socket: {enabled: true}\n"
        "  conntrack: {enabled: true}\n"
        f"  pods: {{enabled: true, interval_seconds: {interval}, pod_logs_path: {pod_logs}}}\n"
    )
    path.chmod(0o644)
    return path


def once_as_nobody(config_file: Path) -> dict:
    result = subprocess.run(
        [
            *("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"),
            *(sys.executable, "-m", "conntrack_exporter", "--once"),
            f"--config.file={config_file}",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
    )
    assert "Traceback" not in result.stderr
    return parse_samples(result.stdout)


def of(samples: dict, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    matches = [v for key, v in samples.get(name, {}).items() if wanted <= set(key)]
    assert len(matches) == 1, (name, labels, matches)
    return matches[0]


def host_listen_overflows() -> int:
    lines = Path("/proc/net/netstat").read_text().splitlines()
    names, values = (line.split() for line in lines if line.startswith("TcpExt:"))
    return int(values[names.index("ListenOverflows")])


def test_each_pods_counters_are_its_own_namespaces_under_its_name(node, scratch):
    pods, pod_logs = node
    web, dns, mesh = pods
    host_before = host_listen_overflows()
    web.run(sys.executable, "-c", textwrap.dedent(OVERFLOW))
    dns.run(sys.executable, "-c", textwrap.dedent(UDP_FLOOD))
    mesh.run("sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=600")
    mesh.run("nft", "add", "table", "inet", "pod")
    mesh.run("nft", "add", "chain", "inet", "pod", "out", "{ type filter hook output priority 0; }")
    mesh.run("nft", "add", "rule", "inet", "pod", "out", "ct", "state", "new", "counter")
    mesh.run(sys.executable, "-c", textwrap.dedent(UDP_FLOWS))

    samples = once_as_nobody(config(scratch, pod_logs))

    overflows = of(samples, "socket_listen_overflows_total", **web.labels())
    assert overflows > 0 and overflows == web.nstat("TcpExtListenOverflows")
    drops = of(samples, "socket_udp_receive_buffer_errors_total", family="ipv4", **dns.labels())
    assert drops > 0 and drops == dns.nstat("UdpRcvbufErrors")
    entries = of(samples, "conntrack_entries", **mesh.labels())
    assert entries >= 25 and entries == int(mesh.run("conntrack", "-C"))
    assert of(samples, "conntrack_stat_insert_total", **mesh.labels()) == 0
    # Conntrack only where something in the namespace uses it.
    for pod in (web, dns):
        assert not [k for k in samples["conntrack_entries"] if ("pod", pod.name) in k]
    # Sockets in use, per pod: the web pod's listener and clients were closed.
    assert of(samples, "socket_inuse", family="ipv4", protocol="udp", **dns.labels()) == 0
    # The host's series: no pod labels, its own value, unchanged by the pods.
    host = [v for k, v in samples["socket_listen_overflows_total"].items() if not k]
    assert host == [host_before] and host_listen_overflows() == host_before
    assert of(samples, "conntrack_exporter_collector_success", collector="pods") == 1
    assert of(samples, "conntrack_exporter_pod_namespaces") >= 3

    # Without the pods' log directories, the pods are known by their uids only.
    empty = scratch / "no-pods"
    empty.mkdir(mode=0o755)
    unnamed = once_as_nobody(config(scratch, empty))
    for pod in pods:
        assert of(unnamed, "socket_allocated", pod_uid=pod.uid) >= 0
        assert not [k for k in unnamed["socket_allocated"] if ("pod", pod.name) in k]


def reported(samples: dict, pod: SimulatedPod) -> bool:
    return any(("pod", pod.name) in key for key in samples.get("socket_allocated", {}))


def test_a_gone_pod_disappears_and_its_namespace_is_freed(node, scratch):
    pods, pod_logs = node
    gone = pods[2]
    with namespace_witness(gone.pid) as namespace_exists:
        running = Exporter(config(scratch, pod_logs, interval=0.5), user=NOBODY)
        try:
            served_until_gone(running, pods, namespace_exists)
        finally:
            running.process.send_signal(signal.SIGTERM)
            running.process.wait(timeout=10)
    assert running.process.returncode == 0


def served_until_gone(
    running: Exporter, pods: list[SimulatedPod], namespace_exists: Callable[[], bool]
) -> None:
    """The last pod appears; once its process is gone, its series go, the exporter holds no
    fd into it, and its namespace is destroyed; the other pods stay."""
    gone = pods[2]
    deadline = time.monotonic() + 20
    while not reported(running.scrape(), gone):
        assert time.monotonic() < deadline, "the pod never appeared"
        time.sleep(0.2)
    assert fds_into(gone.pid, running.process.pid)
    gone_pid = gone.pid
    gone.stop()
    while reported(running.scrape(), gone):
        assert time.monotonic() < deadline, "the gone pod's series stayed"
        time.sleep(0.2)
    assert fds_into(gone_pid, running.process.pid) == []
    while namespace_exists():
        assert time.monotonic() < deadline, "the gone pod's namespace was not freed"
        time.sleep(0.1)
    assert reported(running.scrape(), pods[0])
