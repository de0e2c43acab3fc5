"""Network namespaces on the node, found through /proc without setns or any capability.

`/proc/PID/net/*` shows the network namespace of process PID to any uid. A namespace's key is
`(st_dev, st_ino)` of `/proc/PID/net/sockstat`: the same for every process of the namespace,
different across namespaces, and reused once a namespace dies, so every discovery pass checks
it again. (`readlink /proc/PID/ns/net` would name the namespace too, but needs
CAP_SYS_PTRACE.)

An open fd on a `/proc/PID/net` file keeps its namespace alive after the last process has
gone, and goes on reading the dead namespace: NamespaceFiles are closed as soon as a pass
finds no process in their namespace. They are opened once and never reopened by path: after
the process exits, its pid may name a process of another namespace.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from typing import NamedTuple

from conntrack_exporter.procfs import READ_CHUNK_BYTES, ProcFS

KEY_FILE = "net/sockstat"
# What a namespace's own counters are read from (see collectors/socket.py and conntrack.py).
NAMESPACE_FILES = (
    "net/sockstat",
    "net/sockstat6",
    "net/netstat",
    "net/snmp",
    "net/snmp6",
    "net/stat/nf_conntrack",
)
# A namespace's own addresses (pod_addresses.py): read at discovery, not at scrapes.
ADDRESS_FILES = ("net/fib_trie", "net/if_inet6")
# A process that exits while we look, or a kernel thread's (it has no net/ of its own).
_GONE = (errno.ENOENT, errno.ESRCH, errno.EINVAL)


class NamespaceTexts(NamedTuple):
    """A namespace's files' texts (None: absent on this kernel), field by field the files
    of NAMESPACE_FILES."""

    sockstat: str | None
    sockstat6: str | None
    netstat: str | None
    snmp: str | None
    snmp6: str | None
    nf_conntrack: str | None


class NetnsKey(NamedTuple):
    dev: int
    ino: int


class Namespace(NamedTuple):
    """A network namespace and its processes at one discovery pass."""

    key: NetnsKey
    pids: tuple[int, ...]  # ascending


def _key(stat: os.stat_result) -> NetnsKey:
    return NetnsKey(stat.st_dev, stat.st_ino)


def namespace_key(procfs: ProcFS, pid: int | str) -> NetnsKey:
    """The key of the namespace `pid` ("self" for the reader's own) is in."""
    return _key(os.stat(procfs.path(f"{pid}/{KEY_FILE}")))


def discover(procfs: ProcFS, exclude: NetnsKey | None = None) -> list[Namespace]:
    """Every network namespace a process of `procfs` is in, but `exclude` (the reader's own,
    usually: its counters are the host collectors'), ordered by their lowest pid.

    One stat per process (8 us here): /proc lists processes, not threads, and a namespace
    without a process (held by a bind mount or an fd only) has no pid to find it by.
    """
    pids: dict[tuple[int, int], list[int]] = {}
    skip = tuple(exclude) if exclude is not None else None
    # The hot loop (once per process on the node): a stat relative to an fd on the procfs
    # root, a plain tuple for the key, the pid's digits as scandir gives them.
    root = os.open(procfs.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with os.scandir(root) as entries:
            for entry in entries:
                name = entry.name
                if not name.isdigit():
                    continue
                try:
                    stat = os.stat(f"{name}/{KEY_FILE}", dir_fd=root)
                except OSError as exc:
                    if exc.errno in _GONE:
                        continue
                    raise
                key = (stat.st_dev, stat.st_ino)
                if key != skip:
                    pids.setdefault(key, []).append(int(name))
    finally:
        os.close(root)
    found = [Namespace(NetnsKey(*key), tuple(sorted(members))) for key, members in pids.items()]
    return sorted(found, key=lambda namespace: namespace.pids[0])


class NamespaceFiles:
    """The counters' and addresses' files of one namespace, held open on fds that pin it.

    Opened through one of its processes, all at once, and checked: the key file's fd must
    have the namespace's key, or the pid named another namespace by then (it exited and was
    reused) and nothing is kept. A file this kernel lacks (sockstat6 without IPv6,
    stat/nf_conntrack without CONFIG_NF_CONNTRACK_PROCFS) reads as None.
    """

    def __init__(self, procfs: ProcFS, namespace: Namespace) -> None:
        self.key = namespace.key
        self._fds: dict[str, int] = {}
        try:
            self._open(procfs, namespace)
        except BaseException:
            self.close()
            raise

    def _open(self, procfs: ProcFS, namespace: Namespace) -> None:
        for pid in namespace.pids:
            try:
                self._open_through(procfs, pid)
                return
            except OSError as exc:
                if exc.errno not in _GONE:
                    raise
                self.close()  # that pid went or moved: try the namespace's next one
        raise FileNotFoundError(errno.ENOENT, "no process of the namespace is left", self.key)

    def _open_through(self, procfs: ProcFS, pid: int) -> None:
        for name in NAMESPACE_FILES + ADDRESS_FILES:
            try:
                self._fds[name] = os.open(procfs.path(f"{pid}/{name}"), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                if name == KEY_FILE:
                    raise
        if _key(os.fstat(self._fds[KEY_FILE])) != self.key:
            raise FileNotFoundError(errno.ENOENT, f"pid {pid} is in another namespace now")

    def read(self, name: str) -> str | None:
        """The file's text now (None if this kernel has no such file)."""
        fd = self._fds.get(name)
        return None if fd is None else self._read(fd, name)

    def read_all(self) -> NamespaceTexts:
        """Every file's text now: read() of each, in one call."""
        fds = self._fds
        texts = [
            None if (fd := fds.get(name)) is None else self._read(fd, name)
            for name in NAMESPACE_FILES
        ]
        return NamespaceTexts(*texts)

    def _read(self, fd: int, name: str) -> str:
        # One pread takes any of these files whole (the largest, netstat, is ~4 KB): a short
        # read is the end. Only a longer file costs the reads up to an empty one.
        data = os.pread(fd, READ_CHUNK_BYTES, 0)
        if len(data) == READ_CHUNK_BYTES:
            chunks = [data]
            offset = len(data)
            while chunk := os.pread(fd, READ_CHUNK_BYTES, offset):
                chunks.append(chunk)
                offset += len(chunk)
            data = b"".join(chunks)
        try:
            return data.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"{name} of namespace {self.key}: not ASCII text") from None

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


class NamespaceTable:
    """The namespaces of the last discovery pass, each with its files open.

    `update()` opens the files of new namespaces and closes those of namespaces no process
    is in any more. While our fds hold a namespace its key cannot be reused, so a key found
    again is the same namespace. Not thread-safe: the caller serializes update(), close()
    and reads.
    """

    def __init__(self, procfs: ProcFS) -> None:
        self._procfs = procfs
        self.files: dict[NetnsKey, NamespaceFiles] = {}

    def update(self, namespaces: Iterable[Namespace]) -> list[NetnsKey]:
        """Track exactly `namespaces`; return the keys that could not be opened (their
        processes exited during the pass)."""
        wanted = {namespace.key: namespace for namespace in namespaces}
        for key in [key for key in self.files if key not in wanted]:
            self.files.pop(key).close()
        missed = []
        for key, namespace in wanted.items():
            if key in self.files:
                continue
            try:
                self.files[key] = NamespaceFiles(self._procfs, namespace)
            except FileNotFoundError:
                missed.append(key)
        return missed

    def close(self) -> None:
        for files in self.files.values():
            files.close()
        self.files = {}
