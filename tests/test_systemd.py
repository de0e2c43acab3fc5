"""The systemd unit (packaging/systemd/conntrack-exporter.service), and the advice on granting
CAP_NET_ADMIN that it follows.

No systemd runs here (PID 1 is no init), so the unit is checked as far as systemd's own tools
go offline (`systemd-analyze verify` and `security --offline`, against a root holding the
paths it names), and what it does to the process is done for real with setpriv: the exporter
runs under an unnamed uid, as a dynamic user does, with CAP_NET_ADMIN as its only capability,
ambient, the bounding set reduced to it and no_new_privs set, under strace. It must then read
conntrack over netlink and scan the table, reload on SIGHUP and stop on SIGTERM, and every
system call, socket family and memory mapping it made must pass the unit's filters. The
advice it replaces, setcap on the entry point, is shown not to work.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.metrics import parse_samples, sources, value
from tests.test_reload import wait_for_line

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "packaging" / "systemd" / "conntrack-exporter.service"
UNIT_NAME = UNIT.name
# A uid from systemd's dynamic user range (61184-65519) with no account, as DynamicUser has.
DYNAMIC_UID = "61999"
NET_ADMIN = 1 << 12  # CAP_NET_ADMIN's bit in /proc/PID/status
AS_THE_UNIT_RUNS_IT = (
    "setpriv",
    f"--reuid={DYNAMIC_UID}",
    f"--regid={DYNAMIC_UID}",
    "--clear-groups",
    "--no-new-privs",  # NoNewPrivileges=yes
    "--bounding-set=-all,+net_admin",  # CapabilityBoundingSet=CAP_NET_ADMIN
    "--inh-caps=-all,+net_admin",  # AmbientCapabilities=CAP_NET_ADMIN: inheritable first,
    "--ambient-caps=-all,+net_admin",  # then ambient, which execve keeps
)
ONE_FLOW_PORT = 20000


def tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def service_settings() -> dict[str, list[str]]:
    """The [Service] section's settings, each key's values in order (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    section = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        key, _, setting = line.partition("=")
        if section == "[Service]":
            settings.setdefault(key, []).append(setting)
    return settings


def test_the_unit_is_hardened_as_promised():
    settings = service_settings()
    single = {key: values[-1] for key, values in settings.items()}
    assert {
        key: single.get(key)
        for key in (
            "DynamicUser",
            "CapabilityBoundingSet",
            "AmbientCapabilities",
            "NoNewPrivileges",
            "ProtectSystem",
            "ProtectHome",
            "PrivateTmp",
            "PrivateDevices",
            "ProtectKernelTunables",
            "ProtectControlGroups",
            "RestrictAddressFamilies",
            "MemoryDenyWriteExecute",
            "SystemCallArchitectures",
            "ExecReload",
        )
    } == {
        "DynamicUser": "yes",
        "CapabilityBoundingSet": "CAP_NET_ADMIN",
        "AmbientCapabilities": "CAP_NET_ADMIN",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
        "ExecReload": "/bin/kill -HUP $MAINPID",
    }
    assert settings["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    # What would break it: a user namespace of its own (the capability would not reach the
    # host's table), a private network, a /proc without /proc/sys or other processes.
    for key in ("PrivateUsers", "PrivateNetwork", "ProcSubset", "ProtectProc", "User"):
        assert key not in settings, key
    assert single["ExecStart"].split()[0] == "/opt/conntrack-exporter/bin/conntrack-exporter"


# -- systemd's own checks ------------------------------------------------------------------------


@pytest.fixture
def unit_root(tmp_path) -> Path:
    """A file system root for systemd-analyze --root: the unit installed, systemd's own units,
    and the two commands the unit runs (stand-ins: verify checks that they are executable)."""
    root = tmp_path / "root"
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc" / "systemd" / "system" / UNIT_NAME)
    shutil.copytree("/lib/systemd/system", root / "lib" / "systemd" / "system", symlinks=True)
    for command in ("opt/conntrack-exporter/bin/conntrack-exporter", "bin/kill"):
        path = root / command
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    return root


def systemd_analyze(*args: str) -> subprocess.CompletedProcess:
    if tool("systemd-analyze") is None or not Path("/lib/systemd/system").is_dir():
        pytest.skip("needs systemd-analyze and systemd's units (apt-get install systemd)")
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_systemd_analyze_verify_finds_nothing_to_say(unit_root):
    result = systemd_analyze("verify", f"--root={unit_root}", UNIT_NAME)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    # The control: verify does read the file (a misspelt key is reported, with its line).
    installed = unit_root / "etc" / "systemd" / "system" / UNIT_NAME
    installed.write_text(installed.read_text().replace("ProtectClock=", "ProtectClok="))
    result = systemd_analyze("verify", f"--root={unit_root}", UNIT_NAME)
    assert "Unknown key 'ProtectClok' in section [Service]" in result.stderr


def test_systemd_analyze_security_rates_the_exposure_low(unit_root):
    result = systemd_analyze("security", "--offline=yes", f"--root={unit_root}", UNIT_NAME)
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert match is not None, result.stdout
    # 0 is perfect, 10 is no sandbox at all. What remains is by design: CAP_NET_ADMIN, the
    # host's network, a whole /proc, the address families it needs.
    assert float(match.group(1)) <= 2.0, result.stdout
    assert match.group(2) == "OK"


# -- the process as the unit makes it ----------------------------------------------------------


def syscall_groups() -> dict[str, list[str]]:
    """systemd's system call groups (`systemd-analyze syscall-filter`): group -> members,
    which may be groups."""
    listing = systemd_analyze("syscall-filter").stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in listing.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif current is not None and line.startswith("    ") and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    calls: set[str] = set()
    for name in names:
        calls |= expand(groups[name], groups) if name.startswith("@") else {name}
    return calls


def allowed_syscalls() -> set[str]:
    """What the unit's SystemCallFilter lets through: the first line's allow list, less every
    later `~` line's."""
    groups = syscall_groups()
    first, *rest = service_settings()["SystemCallFilter"]
    allowed = expand(first.split(), groups)
    for line in rest:
        assert line.startswith("~")
        allowed -= expand(line[1:].split(), groups)
    return allowed


class Traced:
    """The exporter started in `netns` as the unit runs it, under strace; its log lines as
    they come."""

    def __init__(self, netns, trace: Path, config: Path, port: int) -> None:
        self.netns = netns
        self.port = port
        self.process = subprocess.Popen(
            [
                "ip", "netns", "exec", netns.name,
                "strace", "-f", "-qq", "-e", "signal=none", "-o", str(trace),
                *AS_THE_UNIT_RUNS_IT,
                sys.executable, "-m", "conntrack_exporter", f"--config.file={config}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            self.wait_for("msg=listening")
            self.pid = self._exporter_pid()
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        """The exporter first: killed, strace would let its tracee run on, detached."""
        if self.process.poll() is None:
            for pid in self._children():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.process.kill()
        self.process.wait(timeout=30)

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.put(line)

    def _children(self) -> list[int]:
        pid = self.process.pid
        with contextlib.suppress(FileNotFoundError):
            return [
                int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            ]
        return []

    def _exporter_pid(self) -> int:
        """strace's child (setpriv, which became the exporter): signals go to it, as systemd's
        go to $MAINPID."""
        [pid] = self._children()
        return pid

    def wait_for(self, text: str, timeout: float = 30) -> str:
        return wait_for_line(self.lines, self.process, text, timeout)

    def get(self, path: str) -> str:
        url = f"http://127.0.0.1:{self.port}{path}"

        def fetch() -> str:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.read().decode()

        with self.netns.thread_pool() as pool:
            return pool.submit(fetch).result()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the unnamed uid can write to (pytest's tmp_path is root's alone)."""
    directory = Path(tempfile.mkdtemp(prefix="cte-systemd-", dir="/tmp"))
    directory.chmod(0o777)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def require(*tools: str) -> None:
    missing = [name for name in tools if tool(name) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    try:
        pwd.getpwuid(int(DYNAMIC_UID))
    except KeyError:
        return
    pytest.skip(f"uid {DYNAMIC_UID} has an account here; the test wants one without")


EVERY_COLLECTOR = (
    "collectors:\n"
    "  conntrack_table: {interval_seconds: 0.5}\n"
    "  socket_ports: {interval_seconds: 0.5}\n"
    "  pods: {interval_seconds: 0.5}\n"
)


@pytest.mark.kernel
def test_as_the_unit_runs_it_the_exporter_reads_netlink_and_stays_within_its_filters(
    netns, shared_dir
):
    require("strace", "systemd-analyze")
    netns.udp_flows(30, first_port=ONE_FLOW_PORT)
    port = 19371
    netns.untrack_tcp_port(port)
    config = shared_dir / "config.yml"
    config.write_text(EVERY_COLLECTOR)
    config.chmod(0o644)
    trace = shared_dir / "trace"
    exporter = Traced(netns, trace, config, port)
    try:
        status = Path(f"/proc/{exporter.pid}/status").read_text()
        caps = {k: int(v, 16) for k, v in re.findall(r"^(Cap\w+):\s+([0-9a-f]+)$", status, re.M)}
        assert caps == dict.fromkeys(("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"), NET_ADMIN)
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.M)
        assert re.search(rf"^Uid:\s+{DYNAMIC_UID}\s", status, re.M)

        deadline = time.monotonic() + 30
        while True:
            samples = parse_samples(exporter.get("/metrics"))
            success = samples["conntrack_exporter_collector_success"]
            if all(v == 1 for v in success.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert success == {(("collector", name),): 1.0 for name in (
            "conntrack", "pods", "conntrack_table", "socket", "socket_ports"
        )}  # fmt: skip
        assert sources(samples, "conntrack") == ["netlink"]
        assert value(samples, "conntrack_entries") == netns.conntrack_count() == 30
        assert (
            value(samples, "conntrack_table_entries", family="ipv4", protocol="udp", state="") == 30
        )
        assert "<html" in exporter.get("/").lower()

        # systemctl reload: ExecReload sends SIGHUP to $MAINPID.
        os.kill(exporter.pid, signal.SIGHUP)
        exporter.wait_for('msg="configuration reloaded"')
        os.kill(exporter.pid, signal.SIGTERM)
        assert exporter.process.wait(timeout=30) == 0
    finally:
        exporter.kill()
    log = list(exporter.lines.queue)
    assert not [line for line in log if "level=warn" in line or "level=error" in line], log

    calls, families, writable_and_executable = read_trace(trace)
    # The positive control: the trace holds the exporter's work (netlink and TCP sockets, the
    # listener, /proc, its open-files limit raised).
    assert {"socket", "bind", "listen", "accept4", "openat", "pread64", "prlimit64"} <= set(
        calls
    ), sorted(calls)
    assert {"AF_NETLINK", "AF_INET"} <= families
    refused = sorted(set(calls) - allowed_syscalls())
    assert refused == [], {name: sorted(calls[name])[:3] for name in refused}
    assert families <= set(service_settings()["RestrictAddressFamilies"][-1].split())
    assert writable_and_executable == []


def read_trace(trace: Path) -> tuple[dict[str, set[str]], set[str], list[str]]:
    """The exporter's system calls in strace's output (each name with its lines), the socket
    families it asked for, and the calls MemoryDenyWriteExecute would refuse: a writable and
    executable mapping, or memory made executable by mprotect. Only what follows setpriv's
    execve of the exporter counts (the unit's filters apply from there)."""
    lines = trace.read_text().splitlines()
    exec_line = re.compile(rf'\d+\s+execve\("{re.escape(sys.executable)}".* = 0$')
    start = next(i for i, line in enumerate(lines) if exec_line.match(line))
    calls: dict[str, set[str]] = {}
    families: set[str] = set()
    writable_and_executable = []
    for line in lines[start + 1 :]:
        match = re.match(r"\d+\s+([a-z0-9_]+)\((.*)", line)
        if match is None:
            continue  # a resumed call, a signal, an exit
        name, arguments = match.groups()
        calls.setdefault(name, set()).add(line)
        if name == "socket":
            families.add(arguments.split(",")[0])
        made_executable = name in ("mprotect", "pkey_mprotect") and "PROT_EXEC" in arguments
        if made_executable or (name == "mmap" and "PROT_WRITE|PROT_EXEC" in arguments):
            writable_and_executable.append(line)
    return calls, families, writable_and_executable


ENTRY_POINT = """#!{python}
import sys
sys.path.insert(0, {root!r})
from conntrack_exporter.cli import main
sys.exit(main())
"""


@pytest.mark.kernel
def test_setcap_on_the_entry_point_grants_nothing_and_the_warning_says_what_does(netns, shared_dir):
    """The old advice, `setcap cap_net_admin+ep` on the conntrack-exporter script, leaves the
    exporter without the capability: the kernel ignores file capabilities on scripts. The
    same script given the capability as an ambient one, as the new advice says, reads netlink."""
    require("setcap")
    netns.udp_flows(5)
    script = shared_dir / "conntrack-exporter"
    script.write_text(ENTRY_POINT.format(python=sys.executable, root=str(ROOT)))
    script.chmod(0o755)
    subprocess.run(["setcap", "cap_net_admin+ep", str(script)], check=True, timeout=30)
    flags = ("--once", "--collector.disable-defaults", "--collector.conntrack")
    flags += ("--collector.conntrack_table",)
    as_user = ("setpriv", f"--reuid={DYNAMIC_UID}", f"--regid={DYNAMIC_UID}", "--clear-groups")

    with_setcap = netns.run(*as_user, str(script), *flags)
    samples = parse_samples(with_setcap.stdout)
    assert sources(samples, "conntrack") == ["procfs"]
    assert value(samples, "conntrack_exporter_collector_success", collector="conntrack_table") == 0
    warnings = [line for line in with_setcap.stderr.splitlines() if "level=warn" in line]
    assert len(warnings) == 2  # ctnetlink refused, the table scan refused
    for warning in warnings:
        assert "AmbientCapabilities=CAP_NET_ADMIN" in warning
        assert "setpriv --inh-caps +net_admin --ambient-caps +net_admin" in warning
        assert "capabilities.add: [NET_ADMIN]" in warning
        assert "setcap cannot work" in warning

    ambient = netns.run(*AS_THE_UNIT_RUNS_IT, str(script), *flags)
    samples = parse_samples(ambient.stdout)
    assert sources(samples, "conntrack") == ["netlink"]
    assert value(samples, "conntrack_exporter_collector_success", collector="conntrack_table") == 1
    assert value(samples, "conntrack_table_scan_entries") == 5
    assert "level=warn" not in ambient.stderr
