"""Pods' network namespaces: the pods collector on a simulated node of 50, 250 and 500 pods.

A simulated Kubernetes node is built, then grown, to each of --sizes (50 250 500) pods:

- a pod is a process in a network namespace of its own (`unshare -n sleep`: its pause
  container), with lo up, and --per-namespace - 1 more processes that join that namespace
  (`nsenter -t PID -n sleep`: its app container's): 4 processes a namespace, 1000 at 250;
- each pod has addresses as a CNI gives them (unless --no-addresses): eth0, one end of a veth
  pair whose peer stays in the pod's namespace too (nothing is added to the host's), with an
  IPv4 address in 10.244.0.0/16 (/24), an IPv6 one in fd00:10:244::/64, its link-local one,
  and a default route: what the pods collector reads from fib_trie and if_inet6;
- each pod sits in a kubelet-shaped cgroup on the cgroup v2 hierarchy, systemd driver
  (kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice/cri-containerd-<id>.scope,
  one scope for the pause process and one for the others, burstable and besteffort pods in
  turn), below a parent cgroup of this run's own (as kind nests the kubelet's), and has a
  pod-log directory <namespace>_<pod>_<uid> in a temporary directory, the collector's
  pod_logs_path;
- every --conntrack-every-th namespace uses conntrack (an nft `ct` rule, 20 UDP flows kept
  for the run), so that its stat file is not all zeros and its table is reported.

At each size a fresh process, as nobody (setpriv) unless --as-root, measures from inside,
time.thread_time() of its one thread around each call (getrusage(RUSAGE_THREAD) for the
user/sys split):

- discovery: PodsCollector.scan(), the first pass (which opens every namespace's eight
  files), then --scans more, what each interval costs; per pass and per 1000 processes on the
  node. Its floor, measured beside it: the listing of /proc and a stat of each process's
  net/sockstat (the namespace's key), nothing kept. Beside them too: the same scan() with its
  pods' addresses step left out (the pass as it was before issue 13), the address step's
  kernel part alone (a pread of each pod's fib_trie and if_inet6 on the collector's fds) and
  its parse alone (address_keys and index_addresses over texts read before);
- scrape: PodsCollector.collect(), --scrapes times, per scrape and per namespace. Its floor,
  the kernel's: one os.pread at offset 0 of each of the six files of every namespace on the
  collector's own open fds, the bytes thrown away: what reading them costs at the least;
- the calls measured beside each other take turns (who goes first rotates), so that the
  machine's ups and downs fall on all alike;
- RSS: VmRSS before the collector is made, VmRSS and VmHWM (the high-water mark reset first)
  after the discovery passes and the scrapes: the target's growth is the peak's;
- the whole exporter's scrape: generate_latest over an ExporterCollector that holds the
  collector (the text format, what a Prometheus text/plain scrape encodes), per scrape.

The pods are idle but for the conntrack flows made at the start: their files' numbers are
mostly zeros, which changes what the kernel and the parsers do little (the same lines, the
same number of fields), and nothing is cached by a file's text but an all-zero conntrack
file, which every namespace without conntrack has.

The node is undone in `finally`, on Ctrl-C and SIGTERM too: every process killed and reaped,
the cgroups removed deepest first once empty, the pod-log directory removed; the last line
says what was left (nothing, or what it found).

Needs root (namespaces, cgroups) and a cgroup v2 hierarchy at /sys/fs/cgroup/unified. Run it
with `make bench-netns`, or:

    .venv/bin/python bench/netns_scan.py --sizes 50 250 500 --per-namespace 4

It prints a table and whether each of issue 12's targets is met; it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

if __package__:  # python -m bench.netns_scan
    from bench import common
else:  # python bench/netns_scan.py, and the children it starts the same way
    import common

CGROUP2 = Path("/sys/fs/cgroup/unified")
NOBODY = "65534"
KEY_FILE = "net/sockstat"  # as conntrack_exporter.netns: a namespace's key is this file's inode
# What one pod's network namespace gets when it uses conntrack: a rule that activates it, its
# UDP entries kept for the whole run (unreplied: 30 s by default), a few flows on lo.
NFT_RULESET = (
    "table inet bench {\n"
    "    chain out { type filter hook output priority 0; ct state new counter; }\n"
    "}\n"
)
FLOWS = (
    "import socket\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "for port in range(20000, 20020):\n"
    "    s.sendto(b'x', ('127.0.0.1', port))\n"
)
BATCH = 50  # pods started together (each step waits for the whole batch)


def pod_network(index: int) -> str:
    """`ip -batch` commands giving pod `index` its addresses, as a CNI plugin would: eth0 (a
    veth whose peer stays in the namespace: nothing is added to the host's) with an IPv4 and
    an IPv6 address and a default route. The peer is up so that eth0 has a carrier, and so
    its link-local address, as a pod's eth0 has."""
    net = f"10.244.{index // 250}"
    return (
        "link set lo up\n"
        "link add eth0 type veth peer name veth0\n"
        "link set veth0 up\n"
        "link set eth0 up\n"
        f"addr add {net}.{index % 250 + 1}/24 dev eth0\n"
        f"addr add fd00:10:244::{index + 1:x}/64 dev eth0 nodad\n"
        f"route add default via {net}.254 dev eth0\n"
    )


SETUP_TIMEOUT = 30.0
PROFILE_ROWS = 15
PROFILE_SCRAPES = 20
READ_BYTES = 65536  # procfs.READ_CHUNK_BYTES: one pread takes any of the six files whole
# Issue 12's targets, at 250 namespaces.
TARGET_SIZE = 250
TARGET_RATIO = 2.0
TARGET_DISCOVERY_MS_PER_1000 = 10.0
TARGET_RSS_BYTES = 5_000_000

# --- the simulated node -------------------------------------------------------------------------


class Pod:
    def __init__(self, index: int) -> None:
        self.index = index
        self.qos = ("burstable", "besteffort")[index % 2]
        self.uid = str(uuid.uuid4())
        self.namespace = f"team-{index % 10}"
        self.name = f"app-{index}"
        self.processes: list[subprocess.Popen] = []
        self.key: tuple[int, int] | None = None

    def scopes(self) -> tuple[list[str], list[str]]:
        """The cgroup path parts of the pause container's scope and of the app's."""
        pod_slice = [
            "kubepods.slice",
            f"kubepods-{self.qos}.slice",
            f"kubepods-{self.qos}-pod{self.uid.replace('-', '_')}.slice",
        ]
        pause, app = (uuid.uuid4().hex * 2 for _ in range(2))
        return (
            [*pod_slice, f"cri-containerd-{pause}.scope"],
            [*pod_slice, f"cri-containerd-{app}.scope"],
        )


def _key(pid: int | str) -> tuple[int, int] | None:
    try:
        stat = os.stat(f"/proc/{pid}/{KEY_FILE}")
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _spawn(cmd: list[str]) -> subprocess.Popen:
    # A session of its own: a Ctrl-C at the terminal reaches only us, and we undo the rest.
    return subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _wait_all(processes: list[subprocess.Popen], what: str) -> None:
    for process in processes:
        _, err = process.communicate(timeout=SETUP_TIMEOUT)
        if process.returncode:
            raise RuntimeError(f"{what} failed ({process.returncode}): {err.decode()[-500:]}")


class Node:
    """The pods made so far, and everything to undo: processes, cgroup directories, logs."""

    def __init__(
        self, per_namespace: int, conntrack_every: int, lifetime: int, addresses: bool
    ) -> None:
        self.per_namespace = per_namespace
        self.addresses = addresses
        self.conntrack_every = conntrack_every
        self.lifetime = str(lifetime)
        self.host_key = _key("self")
        self.pods: list[Pod] = []
        self.processes: list[subprocess.Popen] = []  # every sleep started, to kill and reap
        self.cgroups: list[Path] = []  # made, parents before children
        self.root = CGROUP2 / f"netnsbench-{os.getpid()}.slice"
        self.logs = Path(tempfile.mkdtemp(prefix="cte-netnsbench-"))
        self.logs.chmod(0o755)  # for nobody
        self.pod_logs = self.logs / "pods"
        self.pod_logs.mkdir(mode=0o755)
        self._mkdir(self.root)

    def _mkdir(self, path: Path) -> None:
        if not path.exists():
            path.mkdir()
            self.cgroups.append(path)

    def grow(self, size: int) -> None:
        while len(self.pods) < size:
            batch = [Pod(len(self.pods) + i) for i in range(min(BATCH, size - len(self.pods)))]
            self.pods.extend(batch)
            self._start(batch)

    def _start(self, batch: list[Pod]) -> None:
        for pod in batch:
            pause = _spawn(["unshare", "-n", "sleep", self.lifetime])
            self.processes.append(pause)
            pod.processes.append(pause)
        self._wait_joined(batch, lambda pod: pod.processes[:1], new=True)
        setup = []
        for pod in batch:
            pid = str(pod.processes[0].pid)
            if self.addresses:
                network = subprocess.Popen(
                    ["nsenter", "-t", pid, "-n", "ip", "-batch", "-"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                )
                assert network.stdin is not None
                # A pipe takes these few hundred bytes at once; _wait_all's communicate()
                # closes it, and ip runs them.
                network.stdin.write(pod_network(pod.index).encode())
                network.stdin.flush()
                setup.append(network)
            else:
                setup.append(_spawn(["nsenter", "-t", pid, "-n", "ip", "link", "set", "lo", "up"]))
            for _ in range(self.per_namespace - 1):
                app = _spawn(["nsenter", "-t", pid, "-n", "sleep", self.lifetime])
                self.processes.append(app)
                pod.processes.append(app)
        _wait_all(setup, "the pods' network (ip)")
        self._wait_joined(batch, lambda pod: pod.processes[1:], new=False)
        for pod in batch:
            pause_scope, app_scope = pod.scopes()
            for parts, processes in (
                (pause_scope, pod.processes[:1]),
                (app_scope, pod.processes[1:]),
            ):
                path = self.root
                for part in parts:
                    path = path / part
                    self._mkdir(path)
                for process in processes:
                    (path / "cgroup.procs").write_text(str(process.pid))
            (self.pod_logs / f"{pod.namespace}_{pod.name}_{pod.uid}" / "app").mkdir(
                parents=True, mode=0o755
            )
            if self.conntrack_every and pod.index % self.conntrack_every == 0:
                self._use_conntrack(pod)

    def _wait_joined(self, batch: list[Pod], which, new: bool) -> None:
        """Until each process is in its pod's namespace: a new one (unshare) or the pod's."""
        deadline = time.monotonic() + SETUP_TIMEOUT
        for pod in batch:
            for process in which(pod):
                while True:
                    key = _key(process.pid)
                    if key is not None and (key != self.host_key if new else key == pod.key):
                        break
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"pid {process.pid} never joined pod {pod.index}")
                    time.sleep(0.005)
                if new:
                    pod.key = key

    def _use_conntrack(self, pod: Pod) -> None:
        enter = ["nsenter", "-t", str(pod.processes[0].pid), "-n"]
        common.run([*enter, "nft", "-f", "-"], input=NFT_RULESET, timeout=SETUP_TIMEOUT)
        common.run(
            [*enter, "sysctl", "-qw", f"net.netfilter.nf_conntrack_udp_timeout={self.lifetime}"],
            timeout=SETUP_TIMEOUT,
        )
        common.run([*enter, sys.executable, "-I", "-S", "-c", FLOWS], timeout=SETUP_TIMEOUT)

    def close(self) -> list[str]:
        """Undo everything; return what could not be undone (empty when all went)."""
        left = []
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                left.append(f"pid {process.pid} still running")
        deadline = time.monotonic() + 20
        for path in reversed(self.cgroups):  # children before their parents
            while True:  # a cgroup empties a moment after its last process is reaped
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if time.monotonic() > deadline:
                        left.append(f"{path}: {exc}")
                        break
                    time.sleep(0.02)
        shutil.rmtree(self.logs, ignore_errors=True)
        if self.logs.exists():
            left.append(f"{self.logs} still there")
        return left

    def check_clean(self) -> list[str]:
        """Whatever of ours is still there: our pids alive as our sleeps, our cgroups, logs."""
        found = []
        for process in self.processes:
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes()
                if b"sleep" in cmdline and self.lifetime.encode() in cmdline:
                    found.append(f"pid {process.pid} ({cmdline!r})")
        if self.root.exists():
            found.append(str(self.root))
        if self.logs.exists():
            found.append(str(self.logs))
        return found


def kubepods_anywhere() -> list[str]:
    """`find /sys/fs/cgroup -name '*kubepods*'`: ours and any other run's (tests make some)."""
    out = subprocess.run(
        ["find", "/sys/fs/cgroup", "-name", "*kubepods*"], capture_output=True, text=True
    )
    return out.stdout.split()


# --- the measuring role (a fresh process per size) ----------------------------------------------


def _thread_usage() -> tuple[float, float]:
    import resource

    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime, usage.ru_stime


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _processes() -> int:
    return sum(1 for name in os.listdir("/proc") if name.isdigit())


class Timings:
    """Per-call CPU (thread_time) of one thing measured, and its calls' user and sys."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self.user = 0.0
        self.sys = 0.0

    def call(self, fn) -> float:
        user0, sys0 = _thread_usage()
        started = time.thread_time()
        fn()
        spent = time.thread_time() - started
        user1, sys1 = _thread_usage()
        self.calls.append(spent)
        self.user += user1 - user0
        self.sys += sys1 - sys0
        return spent

    def result(self) -> dict:
        return {
            "median": statistics.median(self.calls),
            "min": min(self.calls),
            "max": max(self.calls),
            "calls": len(self.calls),
            # The split of the whole CPU time between user and kernel, from getrusage.
            "sys_share": self.sys / (self.user + self.sys) if self.user + self.sys else 0.0,
        }


def interleave(calls: list[tuple[Timings, object]], times: int) -> None:
    """`times` calls of each function, one of each in turn, the one going first rotating, so
    that the machine's ups and downs fall on all alike."""
    for i in range(times):
        for timings, fn in common.rotated(calls, i):
            timings.call(fn)


def pair_ratios(ours: Timings, floor: Timings) -> list[float]:
    """The ratio of each pair of calls made in the same turn of interleave()."""
    return [a / b for a, b in zip(ours.calls, floor.calls, strict=True)]


def measure_main(args: argparse.Namespace) -> dict:
    import gc

    sys.path.insert(0, str(common.REPO))
    from prometheus_client.exposition import generate_latest

    from conntrack_exporter.collectors.pods import PodsCollector, PodsOptions
    from conntrack_exporter.netns import NAMESPACE_FILES
    from conntrack_exporter.procfs import ProcFS
    from conntrack_exporter.registry import (
        CollectorContext,
        CollectorSet,
        ExporterCollector,
        Lasting,
        Readers,
    )

    gc.collect()
    rss_before = common.status_kib("VmRSS")
    hwm_reset = _reset_hwm()
    collector = PodsCollector(
        PodsOptions(pod_logs_path=args.pod_logs),
        CollectorContext(ProcFS("/proc"), Readers.netlink(1.0), Lasting()),
    )
    processes = [_processes()]
    first = Timings()
    first.call(collector.scan)

    discovery = collector._discovery
    assert discovery is not None
    pread, stat = os.pread, os.stat
    proc = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def discovery_floor() -> None:
        # What finding every process's namespace costs at the least: the listing of /proc
        # and the stat of each process's net/sockstat, its namespace's key, nothing kept.
        with os.scandir(proc) as entries:
            for entry in entries:
                name = entry.name
                if name.isdigit():
                    with contextlib.suppress(OSError):
                        stat(name + "/" + KEY_FILE, dir_fd=proc)

    scans, scans_floor = Timings(), Timings()
    discovery_calls: list[tuple[Timings, object]] = [
        (scans, collector.scan),
        (scans_floor, discovery_floor),
    ]
    addresses = _address_step(collector, discovery.targets, collector._table.files)
    if addresses is not None:
        discovery_calls += addresses.calls
    interleave(discovery_calls, args.scans)
    scan_ratios = pair_ratios(scans, scans_floor)
    processes.append(_processes())
    os.close(proc)

    # The namespaces of the last pass: each pass closes those whose processes have gone
    # (other runs' come and go), and no pass runs during the scrapes.
    discovery = collector._discovery
    assert discovery is not None
    targets = discovery.targets
    named = sum(1 for target in targets if "pod" in target.labels)
    files = collector._table.files
    # The floor reads the very fds the collector reads at a scrape, of the namespaces it
    # reports: the counters' six files (not the address files, read at discovery).
    fd_groups = [_fds(files[t.namespace.key], NAMESPACE_FILES) for t in targets]

    def floor() -> None:
        for fds in fd_groups:
            for fd in fds:
                pread(fd, READ_BYTES, 0)

    samples = 0
    conntrack_namespaces = set()
    for metric in collector.collect().metrics:
        samples += len(metric.samples)
        if metric.name == "conntrack_entries":
            conntrack_namespaces.update(tuple(sorted(s.labels.items())) for s in metric.samples)

    scrape, kernel = Timings(), Timings()
    interleave([(scrape, collector.collect), (kernel, floor)], args.scrapes)
    scrape_ratios = pair_ratios(scrape, kernel)
    rss_after = common.status_kib("VmRSS")
    hwm_after = common.status_kib("VmHWM")

    exporter = ExporterCollector(CollectorSet([collector]))
    body = generate_latest(exporter)
    whole = Timings()
    for _ in range(args.exporter_scrapes):
        whole.call(lambda: generate_latest(exporter))
    out = {
        "namespaces": len(targets),
        "named": named,
        "conntrack_namespaces": len(conntrack_namespaces),
        "files": sum(len(fds) for fds in fd_groups),
        "processes": statistics.mean(processes),
        "first_scan": first.result(),
        "scan": scans.result(),
        "scan_floor": scans_floor.result(),
        "scan_ratio": statistics.median(scan_ratios),
        "scrape": scrape.result(),
        "floor": kernel.result(),
        "scrape_ratio": statistics.median(scrape_ratios),
        "exporter": whole.result(),
        "samples": samples,
        "body_bytes": len(body),
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "hwm_after_kib": hwm_after,
        "hwm_reset": hwm_reset,
        "rss_after_exporter_kib": common.status_kib("VmRSS"),
        "hwm_after_exporter_kib": common.status_kib("VmHWM"),
        "uid": os.getuid(),
        "package": str(Path(sys.modules["conntrack_exporter"].__file__ or "?").parent),
    }
    if addresses is not None:
        out["addresses"] = addresses.result()
        out["addresses"]["with_without"] = pair_ratios(scans, addresses.without)
    if args.cprofile:
        out["profile"] = _profile(collector.collect, PROFILE_SCRAPES)
    collector.close()
    return out


class AddressStep:
    """What learning the pods' addresses adds to a discovery pass (issue 13), measured beside
    scan(): scan() without it, the preads alone, the parse alone."""

    def __init__(self, collector, targets: list, files: dict) -> None:
        from conntrack_exporter.netns import ADDRESS_FILES
        from conntrack_exporter.pod_addresses import address_keys, index_addresses

        self.collector = collector
        # The namespaces whose addresses a pass reads: the pods' (a cgroup's names nothing).
        pods = [t for t in targets if "cgroup" not in t.labels]
        self.pods = len(pods)
        self.names = ADDRESS_FILES
        self.texts = [
            (t.labels, *(files[t.namespace.key].read(name) for name in ADDRESS_FILES)) for t in pods
        ]
        self.sizes = [[len(text or "") for text in texts[1:]] for texts in self.texts]
        self._address_keys, self._index = address_keys, index_addresses
        self.without, self.reads, self.parse = Timings(), Timings(), Timings()
        self.calls = [
            (self.without, self.scan_without),
            (self.reads, self.read_all),
            (self.parse, self.parse_all),
        ]
        self.parse_all()  # what the texts index to (result()), unmeasured

    def scan_without(self) -> None:
        """scan() with its address step left out: the pass as before issue 13 (its first
        pass opened six files a namespace instead of eight; not measured here)."""
        collector = self.collector
        collector._pod_addresses = _no_addresses  # an instance attribute over the method
        try:
            collector.scan()
        finally:
            del collector._pod_addresses

    def read_all(self) -> None:
        """The kernel's part: a pread of each pod's fib_trie and if_inet6, bytes dropped, on
        the fds of the collector's last pass (a pass closes those of namespaces gone; finding
        the fds costs < 1 us a pod, the preads ~40)."""
        collector = self.collector
        files = collector._table.files
        pread = os.pread
        for target in collector._discovery.targets:
            if "cgroup" in target.labels:
                continue
            for fd in _fds(files[target.namespace.key], self.names):
                pread(fd, READ_BYTES, 0)

    def parse_all(self) -> None:
        """Ours: every pod's two texts parsed (address_keys), then indexed (index_addresses),
        the texts read once before."""
        keys = self._address_keys
        self.book = self._index(
            (labels, keys(fib_trie, if_inet6)) for labels, fib_trie, if_inet6 in self.texts
        )

    def result(self) -> dict:
        # What the pods' texts index to (the collector's own book may be the last stubbed
        # pass's, which published none).
        book = self.book
        return {
            "pods": self.pods,
            "keys": len(book.pod_of),
            "ambiguous": book.ambiguous,
            "fib_trie_bytes": statistics.median(size[0] for size in self.sizes),
            "if_inet6_bytes": statistics.median(size[1] for size in self.sizes),
            "scan_without": self.without.result(),
            "reads": self.reads.result(),
            "parse": self.parse.result(),
        }


def _fds(files, names: tuple[str, ...]) -> list[int]:
    """The collector's fds on a namespace's files of `names` (a file this kernel lacks has
    none)."""
    return [fd for name in names if (fd := files._fds.get(name)) is not None]


def _no_addresses(_targets, _files):
    return iter(())


def _address_step(collector, targets: list, files: dict) -> AddressStep | None:
    """An AddressStep, or None for a package before issue 13 (staged to compare)."""
    if not hasattr(collector, "_pod_addresses"):
        return None
    return AddressStep(collector, targets, files)


def _profile(fn, times: int) -> dict:
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(times):
        fn()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    rows = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)
    return {
        "calls": times,
        "total": sum(row[2] for row in stats.values()),
        "rows": [
            {
                "function": pstats.func_std_string(func).replace(str(common.REPO) + "/", ""),
                "ncalls": nc,
                "tottime": tt,
                "cumtime": ct,
            }
            for func, (_cc, nc, tt, ct, _callers) in rows[:PROFILE_ROWS]
        ],
    }


# --- the parent: building, measuring, reporting --------------------------------------------------


def measure(node: Node, args: argparse.Namespace, profile: bool) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--role",
        "measure",
        "--pod-logs",
        str(node.pod_logs),
        *("--scans", str(args.scans)),
        *("--scrapes", str(args.scrapes), "--exporter-scrapes", str(args.exporter_scrapes)),
    ]
    if profile:
        cmd.append("--cprofile")
    if not args.as_root:
        cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd]
    return common.run_json(cmd)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us"


def _mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


COLUMN = 14


def _row(label: str, cells: list[str]) -> str:
    return f"{label:44}" + "".join(f"{cell:>{COLUMN}}" for cell in cells)


def per_namespace(r: dict, what: str, stat: str = "median") -> float:
    return r[what][stat] / r["namespaces"]


def per_1000(r: dict, what: str = "scan") -> float:
    timings = r["addresses"][what] if what == "scan_without" else r[what]
    return timings["median"] / r["processes"] * 1000


def ratio(r: dict) -> float:
    return r["scrape"]["median"] / r["floor"]["median"]


def growth_kib(r: dict) -> float:
    return r["hwm_after_kib"] - r["rss_before_kib"]


def address_rows(rs: list[dict]) -> list[str]:
    """Issue 13's address step: what it adds to a discovery pass, per pod namespace."""
    if not all("addresses" in r for r in rs):
        return []
    a = [r["addresses"] for r in rs]

    def per_pod(r: dict, what: str) -> float:
        return r["addresses"][what]["median"] / max(r["addresses"]["pods"], 1)

    def added(r: dict) -> float:
        return r["scan"]["median"] - r["addresses"]["scan_without"]["median"]

    return [
        "",
        _row("pods' namespaces whose addresses are read", [str(x["pods"]) for x in a]),
        _row("  address keys learnt / ambiguous", [f"{x['keys']}/{x['ambiguous']}" for x in a]),
        _row(
            "  bytes a pod: fib_trie / if_inet6",
            [f"{x['fib_trie_bytes']:.0f}/{x['if_inet6_bytes']:.0f}" for x in a],
        ),
        _row(
            "discovery without the address step",
            [_ms(x["scan_without"]["median"]) for x in a],
        ),
        _row("  per 1000 processes", [_ms(per_1000(r, "scan_without")) for r in rs]),
        _row(
            "ratio discovery with / without (medians)",
            [f"{r['scan']['median'] / r['addresses']['scan_without']['median']:.3f}" for r in rs],
        ),
        _row(
            "  median of the pairs' ratios",
            [f"{statistics.median(x['with_without']):.3f}" for x in a],
        ),
        _row("added per pass (with - without)", [_ms(added(r)) for r in rs]),
        _row("  per pod namespace", [_us(added(r) / max(r["addresses"]["pods"], 1)) for r in rs]),
        _row("address preads (2 a pod), per pod", [_us(per_pod(r, "reads")) for r in rs]),
        _row("  kernel's share (sys)", [f"{x['reads']['sys_share']:.0%}" for x in a]),
        _row("address parse + index, per pod", [_us(per_pod(r, "parse")) for r in rs]),
    ]


def report(args: argparse.Namespace, info: dict, results: dict[int, dict]) -> None:
    sizes = sorted(results)
    rs = [results[size] for size in sizes]
    lines = [
        "",
        f"{common.machine()}; load average before: {info['load_before']}, after: "
        f"{info['load_after']}",
        f"a simulated node: {args.per_namespace} processes a namespace, conntrack in use in "
        f"every {args.conntrack_every}th; measured as uid {rs[0]['uid']}, one fresh process per "
        f"size: {args.scans} discovery passes and {args.scrapes} scrapes, each beside its floor "
        f"in turn, then {args.exporter_scrapes} whole-exporter scrapes",
        "built in: " + ", ".join(f"{s}: {info['build_seconds'][s]:.1f} s" for s in sizes),
        f"the collector measured: {rs[0]['package']}",
        "",
        _row("pods (namespaces made)", [str(s) for s in sizes]),
        _row("namespaces the collector reads", [str(r["namespaces"]) for r in rs]),
        _row("  named by their pod-log directory", [str(r["named"]) for r in rs]),
        _row("  with conntrack reported", [str(r["conntrack_namespaces"]) for r in rs]),
        _row("processes on the node", [f"{r['processes']:.0f}" for r in rs]),
        "",
        _row(
            "discovery, first pass (opens the files)", [_ms(r["first_scan"]["median"]) for r in rs]
        ),
        _row("discovery, per pass (median)", [_ms(r["scan"]["median"]) for r in rs]),
        _row(
            "  min..max",
            [f"{r['scan']['min'] * 1e3:.1f}..{r['scan']['max'] * 1e3:.1f}" for r in rs],
        ),
        _row("  per 1000 processes", [_ms(per_1000(r)) for r in rs]),
        _row("  kernel's share (sys)", [f"{r['scan']['sys_share']:.0%}" for r in rs]),
        _row(
            "discovery floor: scandir, a stat a process",
            [_ms(r["scan_floor"]["median"]) for r in rs],
        ),
        _row("  per 1000 processes", [_ms(per_1000(r, "scan_floor")) for r in rs]),
        _row("  kernel's share (sys)", [f"{r['scan_floor']['sys_share']:.0%}" for r in rs]),
        _row(
            "ratio discovery / floor (medians)",
            [f"{r['scan']['median'] / r['scan_floor']['median']:.2f}" for r in rs],
        ),
        *address_rows(rs),
        "",
        _row("scrape: collect() CPU (median)", [_ms(r["scrape"]["median"]) for r in rs]),
        _row(
            "  min..max",
            [f"{r['scrape']['min'] * 1e3:.1f}..{r['scrape']['max'] * 1e3:.1f}" for r in rs],
        ),
        _row("  per namespace", [_us(per_namespace(r, "scrape")) for r in rs]),
        _row("  kernel's share (sys)", [f"{r['scrape']['sys_share']:.0%}" for r in rs]),
        _row(
            "kernel floor: 6 preads a namespace (median)", [_ms(r["floor"]["median"]) for r in rs]
        ),
        _row("  per namespace", [_us(per_namespace(r, "floor")) for r in rs]),
        _row("  kernel's share (sys)", [f"{r['floor']['sys_share']:.0%}" for r in rs]),
        _row("ratio collect / floor (medians)", [f"{ratio(r):.2f}" for r in rs]),
        _row("  median of the pairs' ratios", [f"{r['scrape_ratio']:.2f}" for r in rs]),
        _row(
            "  ratio of minima",
            [f"{r['scrape']['min'] / r['floor']['min']:.2f}" for r in rs],
        ),
        _row(
            "above the floor, per namespace",
            [_us(per_namespace(r, "scrape") - per_namespace(r, "floor")) for r in rs],
        ),
        "",
        _row("RSS before the collector (VmRSS)", [_mib(r["rss_before_kib"]) for r in rs]),
        _row(
            "RSS growth after discovery + scrapes",
            [_mib(r["rss_after_kib"] - r["rss_before_kib"]) for r in rs],
        ),
        _row("peak RSS growth (VmHWM - RSS before)", [_mib(growth_kib(r)) for r in rs]),
        "",
        _row("whole exporter scrape (generate_latest)", [_ms(r["exporter"]["median"]) for r in rs]),
        _row("  per namespace", [_us(per_namespace(r, "exporter")) for r in rs]),
        _row(
            "  samples (pods collector) / bytes",
            [f"{r['samples']}/{r['body_bytes'] // 1024}K" for r in rs],
        ),
        _row(
            "  peak RSS growth after it",
            [_mib(r["hwm_after_exporter_kib"] - r["rss_before_kib"]) for r in rs],
        ),
        "",
    ]
    first = rs[0]
    for size, r in zip(sizes[1:], rs[1:], strict=True):
        factor = r["namespaces"] / first["namespaces"]
        lines.append(
            f"{sizes[0]} -> {size} pods ({factor:.1f}x the namespaces, "
            f"{r['processes'] / first['processes']:.1f}x the processes): scrape CPU "
            f"{r['scrape']['median'] / first['scrape']['median']:.2f}x, per namespace "
            f"{per_namespace(r, 'scrape') / per_namespace(first, 'scrape'):.2f}x, floor per "
            f"namespace {per_namespace(r, 'floor') / per_namespace(first, 'floor'):.2f}x, "
            f"discovery {r['scan']['median'] / first['scan']['median']:.2f}x (per 1000 "
            f"processes {per_1000(r) / per_1000(first):.2f}x), peak RSS growth "
            f"{growth_kib(first) / 1024:.1f} -> {growth_kib(r) / 1024:.1f} MiB"
        )
    target = results.get(TARGET_SIZE)
    if target is not None:
        verdict = {True: "met", False: "NOT met"}
        lines += [
            "",
            f"targets at {TARGET_SIZE} pods:",
            f"  scrape <= {TARGET_RATIO:g}x the kernel floor: {ratio(target):.2f} "
            f"({_us(per_namespace(target, 'scrape'))} against "
            f"{_us(per_namespace(target, 'floor'))} a namespace): "
            f"{verdict[ratio(target) <= TARGET_RATIO]}",
            f"  discovery <= {TARGET_DISCOVERY_MS_PER_1000:g} ms per 1000 processes: "
            f"{per_1000(target) * 1e3:.2f} ms (its floor, a stat a process: "
            f"{per_1000(target, 'scan_floor') * 1e3:.2f} ms): "
            f"{verdict[per_1000(target) * 1e3 <= TARGET_DISCOVERY_MS_PER_1000]}",
            f"  RSS growth <= 5 MB: peak {growth_kib(target) * 1024 / 1e6:.2f} MB: "
            f"{verdict[growth_kib(target) * 1024 <= TARGET_RSS_BYTES]}",
        ]
    if not all(r["hwm_reset"] for r in rs):
        lines.append("note: VmHWM could not be reset: peak growth includes start-up")
    for size, r in zip(sizes, rs, strict=True):
        if "profile" in r:
            prof = r["profile"]
            lines += [
                "",
                f"cProfile of {prof['calls']} collect() at {size} pods "
                f"({prof['total'] / prof['calls'] * 1e3:.1f} ms tottime a scrape under the "
                f"profiler; top {PROFILE_ROWS} by tottime):",
                f"{'tottime':>10}{'cumtime':>10}{'ncalls':>10}  function",
            ]
            lines += [
                f"{row['tottime'] * 1e3:>8.1f}ms{row['cumtime'] * 1e3:>8.1f}ms{row['ncalls']:>10}"
                f"  {row['function']}"
                for row in prof["rows"]
            ]
    print("\n".join(lines))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[50, 250, 500], help="pods (50 250 500)"
    )
    parser.add_argument(
        "--per-namespace", type=int, default=4, help="processes in each pod's namespace (4)"
    )
    parser.add_argument(
        "--conntrack-every", type=int, default=5, help="every Nth namespace uses conntrack (5)"
    )
    parser.add_argument(
        "--scans", type=int, default=40, help="discovery passes measured, and floors (40)"
    )
    parser.add_argument(
        "--scrapes", type=int, default=100, help="collect() calls measured, and floors (100)"
    )
    parser.add_argument(
        "--exporter-scrapes", type=int, default=10, help="whole-exporter scrapes (10)"
    )
    parser.add_argument(
        "--profile",
        choices=["auto", "always", "never"],
        default="auto",
        help=f"cProfile collect() at {TARGET_SIZE}: when it misses {TARGET_RATIO:g}x the floor "
        "(auto), always, never",
    )
    parser.add_argument(
        "--no-addresses",
        dest="addresses",
        action="store_false",
        help="pods with lo only: no eth0, no address but loopback's (as before issue 13)",
    )
    parser.add_argument("--as-root", action="store_true", help="measure as root, not nobody")
    parser.add_argument(
        "--lifetime", type=int, default=3600, help="seconds the pods' sleeps last at most (3600)"
    )
    parser.add_argument("--role", choices=["measure"], help=argparse.SUPPRESS)
    parser.add_argument("--pod-logs", help=argparse.SUPPRESS)
    parser.add_argument("--cprofile", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> int:
    import json

    args = parse_args()
    if args.role:
        sys.stdout.write(json.dumps(measure_main(args)))
        return 0
    if os.geteuid() != 0:
        sys.exit("netns_scan.py needs root: it makes network namespaces and cgroups")
    if not (CGROUP2 / "cgroup.procs").exists():
        sys.exit(f"netns_scan.py needs a cgroup v2 hierarchy at {CGROUP2}")
    if args.per_namespace < 1:
        sys.exit("--per-namespace must be at least 1")

    common.catch_interrupts()
    info: dict = {"load_before": _load(), "build_seconds": {}}
    results: dict[int, dict] = {}
    node = None
    interrupted = False
    try:
        node = Node(args.per_namespace, args.conntrack_every, args.lifetime, args.addresses)
        for size in sorted(args.sizes):
            started = time.monotonic()
            node.grow(size)
            info["build_seconds"][size] = time.monotonic() - started
            common.log(
                f"{size} pods, {len(node.processes)} processes: built in "
                f"{info['build_seconds'][size]:.1f} s; measuring"
            )
            results[size] = measure(node, args, profile=False)
            r = results[size]
            common.log(
                f"  {r['namespaces']} namespaces: scrape {_ms(r['scrape']['median'])}, "
                f"floor {_ms(r['floor']['median'])} (ratio {ratio(r):.2f}), discovery "
                f"{_ms(r['scan']['median'])} over {r['processes']:.0f} processes"
            )
            want = args.profile == "always" or (
                args.profile == "auto" and size == TARGET_SIZE and ratio(r) > TARGET_RATIO
            )
            if want:
                common.log(f"  profiling collect() at {size} pods")
                results[size]["profile"] = measure(node, args, profile=True)["profile"]
        info["load_after"] = _load()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        # Not to be cut short by a second Ctrl-C: what is half undone stays behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        left = node.close() if node is not None else []
        remaining = node.check_clean() if node is not None else []
        kubepods = kubepods_anywhere()
        processes = len(node.processes) if node is not None else 0
        cgroups = len(node.cgroups) if node is not None else 0
        found = f"{len(kubepods)}, " + ", ".join(kubepods[:3]) if kubepods else "nothing"
        common.log(
            f"cleanup: {processes} processes killed and reaped, {cgroups} cgroup directories "
            f"removed, pod logs removed; left: {left + remaining or 'nothing'}; "
            f"find /sys/fs/cgroup -name '*kubepods*': {found}"
        )
    if interrupted:
        common.log("interrupted; the node was undone")
        return 130
    report(args, info, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
