"""The exporter never writes kernel state: no netlink request that creates, changes or deletes
anything, no write to /proc or /sys, no sysctl touched.

Three ways: the package's source (every netlink message type it can send resolves into a
read-only allowlist; nothing opens a file for writing), the socket's refusal of every other
type, and the real thing: the exporter's system calls under strace, and a namespace's conntrack
table, counters and sysctls before and after a full run with every collector on.
"""

from __future__ import annotations

import ast
import importlib
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache, partial
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import pytest

import conntrack_exporter
from conntrack_exporter.collectors import COLLECTORS
from conntrack_exporter.netlink import ctnetlink, inet_diag
from conntrack_exporter.netlink import socket as netlink_socket
from conntrack_exporter.netlink.ctnetlink import nfgen_request
from conntrack_exporter.netlink.socket import NETLINK_NETFILTER, NetlinkReader, NetlinkSocket
from tests.conftest import Netns
from tests.metrics import parse_samples, value
from tests.test_faults import EXPORTER, scraped
from tests.test_inet_diag import defines
from tests.test_inet_diag import uapi as linux_uapi
from tests.test_kernel_table import raise_timeouts
from tests.test_netlink_parsers import parse_enums, uapi
from tests.test_netlink_socket import RecordingSocket

PACKAGE = Path(conntrack_exporter.__file__).parent
NETLINK_PACKAGE = PACKAGE / "netlink"
ALLOWLISTS = {ctnetlink: NETLINK_NETFILTER, inet_diag: inet_diag.NETLINK_SOCK_DIAG}


class Source(NamedTuple):
    module: ModuleType
    path: Path
    tree: ast.Module


@cache
def package_sources() -> list[Source]:
    sources = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        name = name.removesuffix(".__init__")
        # __main__ runs the exporter when imported: its source alone is enough.
        module = ModuleType(name) if path.stem == "__main__" else importlib.import_module(name)
        sources.append(Source(module, path, ast.parse(path.read_text(), str(path))))
    return sources


def calls(tree: ast.AST) -> Iterator[ast.Call]:
    return (node for node in ast.walk(tree) if isinstance(node, ast.Call))


def dotted(node: ast.AST) -> str:
    return ast.unparse(node)


def functions(tree: ast.AST) -> Iterator[ast.FunctionDef]:
    return (node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef))


# -- 1. the source: what can be sent ----------------------------------------------------------


def test_only_the_netlink_socket_opens_netlink_sockets():
    opened = [
        (source.path.relative_to(PACKAGE).as_posix(), dotted(call))
        for source in package_sources()
        for call in calls(source.tree)
        if dotted(call.func) in ("socket.socket", "socket") and call.args
        and dotted(call.args[0]) in ("socket.AF_NETLINK", "AF_NETLINK", "16")
    ]  # fmt: skip
    assert [path for path, _ in opened] == ["netlink/socket.py"], opened
    # ...and nothing else talks to the kernel another way (a helper binary, raw syscalls,
    # pyroute2, which can send anything).
    imported = {
        alias.name.partition(".")[0]
        for source in package_sources()
        for node in ast.walk(source.tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (
            node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")]
        )
    }
    assert not imported & {"subprocess", "ctypes", "pyroute2", "shutil", "pty"}


def test_the_socket_sends_only_in_request_after_the_allowlist_check():
    tree = ast.parse((NETLINK_PACKAGE / "socket.py").read_text())
    sends = [
        (function.name, call.lineno)
        for function in functions(tree)
        for call in calls(function)
        if isinstance(call.func, ast.Attribute) and call.func.attr.startswith("send")
    ]
    assert [name for name, _ in sends] == ["request"]
    [request] = [f for f in functions(tree) if f.name == "request"]
    check = next(node for node in request.body if isinstance(node, ast.If))
    assert dotted(check.test) == "msg_type not in self._allowed_types"
    assert isinstance(check.body[0], ast.Raise) and check.lineno < sends[0][1]
    # The netlink package's other modules never touch a raw socket.
    for path in NETLINK_PACKAGE.glob("*.py"):
        if path.name != "socket.py":
            text = path.read_text()
            assert "._sock." not in text and ".send(" not in text, path


def resolve(source: Source, function: ast.FunctionDef, expression: ast.expr) -> set[int]:
    """Every value `expression` can take in `function`: a module constant, or a parameter,
    resolved through every call of the function in the module."""
    if isinstance(expression, ast.Constant):
        return {expression.value}
    if not isinstance(expression, ast.Name):
        raise AssertionError(f"{source.path.name}: cannot follow {dotted(expression)}")
    parameters = [arg.arg for arg in function.args.args if arg.arg != "self"]
    if expression.id not in parameters:
        return {getattr(source.module, expression.id)}
    index = parameters.index(expression.id)
    values: set[int] = set()
    for caller in functions(source.tree):
        for call in calls(caller):
            if dotted(call.func) in (function.name, f"self.{function.name}"):
                values |= resolve(source, caller, call.args[index])
    assert values, f"{source.path.name}: nothing calls {function.name}"
    return values


def test_every_type_the_package_can_send_is_in_its_modules_read_only_allowlist():
    sent: dict[str, set[int]] = {}
    for source in package_sources():
        for function in functions(source.tree):
            for call in calls(function):
                func = call.func
                if (
                    isinstance(func, ast.Attribute)
                    and dotted(func.value) == "self._socket"
                    and func.attr in ("request", "dump")
                ):
                    types = resolve(source, function, call.args[0])
                    sent.setdefault(source.module.__name__, set()).update(types)
    assert set(sent) == {module.__name__ for module in ALLOWLISTS}
    for module in ALLOWLISTS:
        assert sent[module.__name__] <= module.READ_REQUESTS, module.__name__
    assert sent[ctnetlink.__name__] == ctnetlink.READ_REQUESTS  # the resolver sees them all


def test_every_netlink_socket_is_built_by_the_reader_base_on_its_classs_allowlist():
    built = [
        (source.module, call)
        for source in package_sources()
        for call in calls(source.tree)
        if dotted(call.func) == "NetlinkSocket"
    ]
    assert [module for module, _ in built] == [netlink_socket]
    [(_, call)] = built
    assert [dotted(arg) for arg in call.args[:2]] == ["self.protocol", "self.read_requests"]
    readers = [
        cls
        for module in ALLOWLISTS
        for cls in vars(module).values()
        if isinstance(cls, type) and issubclass(cls, NetlinkReader) and cls is not NetlinkReader
    ]
    assert {cls.__module__ for cls in readers} == {module.__name__ for module in ALLOWLISTS}
    for cls in readers:
        module = sys.modules[cls.__module__]
        assert cls.read_requests is module.READ_REQUESTS, cls
        assert cls.protocol == ALLOWLISTS[module], cls


def test_no_package_code_hands_a_reader_or_socket_another_socket():
    """netlink_socket= and open_socket= are the seams for tests' fakes; the exporter opens
    every socket itself, so the allowlists above are what it sends on."""
    seams = [
        (source.path.name, dotted(call))
        for source in package_sources()
        for call in calls(source.tree)
        for keyword in call.keywords
        if keyword.arg in ("netlink_socket", "open_socket")
    ]
    assert seams == []


# -- 2. the allowlists, against the kernel's headers, and the socket's refusal ---------------


def test_the_allowlists_hold_only_get_requests_by_the_kernel_headers_names():
    enums = parse_enums(uapi("nfnetlink_conntrack.h"))
    names = {
        **{ctnetlink.NFNL_SUBSYS_CTNETLINK << 8 | v: n for n, v in enums["cntl_msg_types"].items()},
        **{
            ctnetlink.NFNL_SUBSYS_CTNETLINK_EXP << 8 | v: n
            for n, v in enums["ctnl_exp_msg_types"].items()
        },
    }
    allowed = sorted(names[t] for t in ctnetlink.READ_REQUESTS)
    assert all("_GET" in name and "CTRZERO" not in name for name in allowed), allowed
    for forbidden in ("CT_NEW", "CT_DELETE", "CT_GET_CTRZERO", "EXP_NEW", "EXP_DELETE"):
        assert f"IPCTNL_MSG_{forbidden}" not in allowed
    diag = defines(linux_uapi("sock_diag.h"))
    assert {diag["SOCK_DIAG_BY_FAMILY"]} == inet_diag.READ_REQUESTS
    assert diag["SOCK_DESTROY"] not in inet_diag.READ_REQUESTS


@pytest.mark.parametrize("module", list(ALLOWLISTS), ids=lambda m: m.__name__.rsplit(".")[-1])
def test_the_socket_refuses_every_other_type_and_sends_nothing(module):
    # A broken check must send nothing to the host: the recorder stands in for the kernel's
    # end of the socket, also after the reopen that a failed dump does.
    recorder = RecordingSocket()
    sock = NetlinkSocket(
        ALLOWLISTS[module], module.READ_REQUESTS, 0.1, open_socket=lambda *_: recorder
    )
    payload = nfgen_request()
    refused = 0
    for msg_type in range(1 << 16):
        if msg_type in module.READ_REQUESTS:
            continue
        for send in (
            partial(sock.request, msg_type, 0, payload, ignore),
            partial(sock.dump, msg_type, payload, ignore),
        ):
            try:
                send()
            except ValueError:
                refused += 1
    assert refused == 2 * ((1 << 16) - len(module.READ_REQUESTS))
    assert recorder.sent == []


def ignore(buf: object, msg: object) -> None:
    pass


# -- 3. the source: nothing opened for writing ------------------------------------------------

READ_ONLY_FLAGS = {"O_RDONLY", "O_CLOEXEC", "O_NOFOLLOW", "O_NONBLOCK", "O_DIRECTORY"}
# Calls that write or change files whatever their arguments say.
FILE_CHANGES = {
    "os.write", "os.pwrite", "os.writev", "os.truncate", "os.ftruncate", "os.remove",
    "os.unlink", "os.rename", "os.replace", "os.chmod", "os.chown", "os.mkdir", "os.makedirs",
    "os.symlink", "os.link", "os.mknod", "os.system", "os.popen", "os.sendfile",
}  # fmt: skip
PATH_CHANGES = {"write_text", "write_bytes", "touch", "unlink", "mkdir", "rmdir", "symlink_to"}


def writes(tree: ast.AST, where: str) -> list[str]:
    """Every call in the tree that opens a file for writing or changes one."""
    found = []
    for call in calls(tree):
        name = dotted(call.func)
        if name == "open":
            mode = call.args[1] if len(call.args) > 1 else None
            mode = next((k.value for k in call.keywords if k.arg == "mode"), mode)
            writing = mode is not None and not (
                isinstance(mode, ast.Constant) and not set(mode.value) & set("wax+")
            )
        elif name == "os.open":
            flags = {n.attr for n in ast.walk(call.args[1]) if isinstance(n, ast.Attribute)}
            writing = not flags <= READ_ONLY_FLAGS or "O_RDONLY" not in flags
        else:
            method = call.func.attr if isinstance(call.func, ast.Attribute) else None
            writing = name in FILE_CHANGES or method in PATH_CHANGES
        if writing:
            found.append(f"{where}:{call.lineno}: {dotted(call)}")
    return found


def test_nothing_in_the_package_opens_a_file_for_writing():
    found = [
        problem
        for source in package_sources()
        for problem in writes(source.tree, source.path.relative_to(PACKAGE).as_posix())
    ]
    assert found == []


def test_the_write_check_sees_each_kind_of_write():
    # The negative control: what the test above looks for is found where it is.
    snippet = (
        "open(p)\nopen(p, 'rb')\nos.open(p, os.O_RDONLY | os.O_CLOEXEC)\n"
        "open(p, 'a')\nopen(p, mode)\nos.open(p, os.O_WRONLY)\nos.write(fd, b'1')\n"
        "Path(p).write_text('1')\n"
    )
    assert [line.split(":")[1] for line in writes(ast.parse(snippet), "x")] == [
        "4", "5", "6", "7", "8"
    ]  # fmt: skip


# -- 4. the real thing: system calls ---------------------------------------------------------

# How strace names the requests the exporter may send.
READ_REQUEST_NAMES = {
    "NFNL_SUBSYS_CTNETLINK<<8|IPCTNL_MSG_CT_GET",
    "NFNL_SUBSYS_CTNETLINK<<8|IPCTNL_MSG_CT_GET_STATS",
    "NFNL_SUBSYS_CTNETLINK<<8|IPCTNL_MSG_CT_GET_STATS_CPU",
    "NFNL_SUBSYS_CTNETLINK_EXP<<8|IPCTNL_MSG_EXP_GET_STATS_CPU",
    "SOCK_DIAG_BY_FAMILY",
}
WRITE_FLAGS = re.compile(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC|O_APPEND")
EVERY_COLLECTOR = (
    "collectors:\n"
    "  conntrack: {per_cpu: true}\n"
    "  conntrack_table: {interval_seconds: 0.2, label_ct_zone: true, label_mark: true}\n"
    "  socket_ports: {interval_seconds: 0.2}\n"
    "  pods: {interval_seconds: 0.2}\n"
)


@pytest.mark.kernel
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (apt-get install strace)")
def test_the_exporters_system_calls_send_only_reads_and_open_nothing_for_writing(netns, tmp_path):
    netns.udp_flows(50)
    config = tmp_path / "config.yml"
    config.write_text(EVERY_COLLECTOR)
    trace = netns.run(
        "env",
        "PYTHONDONTWRITEBYTECODE=1",  # or Python would write its bytecode caches
        "strace", "-f", "-qq", "-e", "signal=none",
        "-e", "trace=open,openat,openat2,creat,truncate,sendto,sendmsg,sendmmsg,write,pwrite64",
        *EXPORTER, "--once", "--config.file", str(config),
    ).stderr  # fmt: skip
    sends = [line for line in trace.splitlines() if re.search(r"\bsend(to|msg|mmsg)\(", line)]
    sent = [re.search(r"nlmsg_type=([^,]+),", line) for line in sends]
    assert all(sent), [line for line, match in zip(sends, sent, strict=True) if not match]
    assert {match.group(1) for match in sent} <= READ_REQUEST_NAMES
    assert {"SOCK_DIAG_BY_FAMILY", "NFNL_SUBSYS_CTNETLINK<<8|IPCTNL_MSG_CT_GET"} <= {
        match.group(1) for match in sent
    }  # the positive control: the scans ran and strace decoded them
    opens = [line for line in trace.splitlines() if re.search(r"\b(open|openat2?|creat)\(", line)]
    assert [line for line in opens if WRITE_FLAGS.search(line) or "creat(" in line] == []
    assert any("/proc/sys/net/netfilter/nf_conntrack_count" in line for line in opens)
    assert not re.search(r"\b(truncate|pwrite64)\(", trace)
    # write(2) only to standard output and error (the exposition and the log).
    assert set(re.findall(r"\bwrite\((\d+),", trace)) <= {"1", "2"}


# -- 5. the real thing: the table, its counters and the sysctls, before and after -------------


def entries(ns: Netns) -> set[str]:
    """`conntrack -L` (with each entry's id and, with accounting on, its packet and byte
    counters), less what changes by itself: the timeout counting down, and the reference
    count (`use=`), which a dump in progress holds."""
    out = ns.run("conntrack", "-L", "-o", "extended,id").stdout
    kept = set()
    for line in out.splitlines():
        tokens = line.split()
        del tokens[4]  # family, its number, protocol, its number, then the timeout
        kept.add(" ".join(t for t in tokens if not t.startswith("use=")))
    return kept


def cpu_counters(ns: Netns) -> dict[tuple[str, str], int]:
    counters = {}
    for line in ns.run("conntrack", "-S").stdout.splitlines():
        cpu, *fields = line.split()
        for field in fields:
            name, _, count = field.partition("=")
            counters[(cpu, name)] = int(count)
    return counters


def settings(ns: Netns) -> dict[str, str]:
    """Every readable sysctl under /proc/sys/net that can be written, in the namespace, and
    the global ones the exporter reads or that size the table."""
    listing = ns.run(
        "sh", "-c",
        "find /proc/sys/net -type f -perm /222 -exec grep -H . {} + 2>/dev/null;"
        "grep -H . /proc/sys/fs/file-max /sys/module/nf_conntrack/parameters/* 2>/dev/null",
        check=False,
    ).stdout  # fmt: skip
    found: dict[str, str] = {}
    for line in listing.splitlines():
        path, _, text = line.partition(":")
        found[path] = found.get(path, "") + text + "\n"
    return found


TRAFFIC = """
    import socket, sys, time
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    print("ready", flush=True)
    for port in range(40000, 60000):  # a new entry each, never a packet for an old one
        s.sendto(b"x", ("127.0.0.9", port))
        time.sleep(0.001)
"""


@pytest.mark.kernel
def test_a_full_run_changes_no_entry_counter_or_sysctl(netns, tmp_path):
    netns.run("sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1")  # per-entry counters
    raise_timeouts(netns)
    holder = netns.hold_tcp_connections(20)  # established, assured, packets counted
    try:
        netns.inject(4, zone=3)
        netns.run(
            "conntrack", "-I", "-p", "udp", "-s", "10.9.0.3", "-d", "10.9.0.4", "--sport", "53",
            "--dport", "53", "-t", "600", "--mark", "7",
        )  # fmt: skip
        netns.udp_flows(100, first_port=31000)
        before = (entries(netns), cpu_counters(netns), settings(netns))
        traffic = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                netns.name,
                sys.executable,
                "-c",
                TRAFFIC.replace("\n    ", "\n"),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert traffic.stdout.readline().strip() == "ready"
        try:
            scrapes = run_every_collector(netns, tmp_path / "config.yml")
        finally:
            traffic.kill()
            traffic.wait()
        after = (entries(netns), cpu_counters(netns), settings(netns))
    finally:
        holder.kill()
        holder.wait()

    (entries_before, counters_before, settings_before) = before
    (entries_after, counters_after, settings_after) = after
    assert len(entries_before) == 20 + 4 + 1 + 100
    assert any("packets=" in entry and "mark=7" not in entry for entry in entries_before)
    assert entries_before - entries_after == set()  # every entry there, exactly as it was
    assert len(entries_after) > len(entries_before)  # the traffic went on meanwhile
    lowered = {
        k: (v, counters_after[k]) for k, v in counters_before.items() if counters_after[k] < v
    }
    assert lowered == {}
    assert sum(v for (_, name), v in counters_before.items() if name == "insert") >= 5
    assert settings_after == settings_before
    assert len(settings_before) > 100  # the namespace's sysctls were read
    for samples in scrapes:
        successes = samples["conntrack_exporter_collector_success"].values()
        assert list(successes) == [1.0] * len(COLLECTORS)
        assert value(samples, "conntrack_table_scan_entries") >= len(entries_before)


def run_every_collector(ns: Netns, config: Path) -> list[dict]:
    """Every collector, scans every 0.2 s, three scrapes over a second and a half; then one
    `--once` run."""
    config.write_text(EVERY_COLLECTOR)
    scrapes, status, stderr = scraped(ns, EXPORTER, str(config), times=3, pause=0.5)
    assert status == 0 and "level=warn" not in stderr, stderr
    scrapes.append(parse_samples(ns.exporter("--config.file", str(config)).stdout))
    return scrapes
