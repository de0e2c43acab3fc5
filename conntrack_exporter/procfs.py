"""Readers for /proc with an injectable root, and pure parsers of its formats.

/proc/net and /proc/sys/net show the network namespace of the *reading process*.
"""

from __future__ import annotations

import os
import string
import threading
from collections.abc import Iterable

READ_CHUNK_BYTES = 65536
# The entries in the reader's network namespace's conntrack table (absent without conntrack).
CONNTRACK_COUNT_FILE = "sys/net/netfilter/nf_conntrack_count"


class ProcFS:
    """Reads files below a procfs mount point (`--path.procfs`)."""

    def __init__(self, root: str = "/proc") -> None:
        self.root = root

    def path(self, relative: str) -> str:
        return os.path.join(self.root, relative)

    def file(self, relative: str) -> ProcFile:
        """A reader that keeps `relative` open across scrapes (see ProcFile)."""
        return ProcFile(self.path(relative))

    def read_text(self, relative: str) -> str:
        # os.open/os.read: three system calls where open() in text mode makes nine, and
        # these files are read on every scrape.
        fd = os.open(self.path(relative), os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks = []
            while chunk := os.read(fd, READ_CHUNK_BYTES):
                chunks.append(chunk)
        finally:
            os.close(fd)
        return b"".join(chunks).decode("ascii")

    def read_int(self, relative: str) -> int:
        text = self.read_text(relative)
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{self.path(relative)}: expected an integer, got {text!r}") from None


class ProcFile:
    """One procfs file held open and re-read with pread at offset 0 on every read_text().

    seq_file (/proc/net/*) and sysctl (/proc/sys/*) files regenerate their text on a read at
    offset 0, and an open costs several times a small pread (~8 us against 1-3 us), so the fd
    is kept. A file that is absent (sockstat6 without IPv6, the host-only sysctls inside a
    child network namespace) raises FileNotFoundError, and its open is retried on every call.
    Once closed it stays closed: a late read raises ValueError instead of opening an fd that
    nothing would close (on /proc/PID/net, one that keeps a network namespace alive).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._closed = False
        # Held across the open and the read: a thread must never pread an fd number that
        # another thread has just closed and the process may have reused for something else.
        # seq_file serializes readers of one file under its own mutex anyway.
        self._lock = threading.Lock()

    def read_text(self) -> str:
        with self._lock:
            if self._closed:
                raise ValueError(f"{self.path}: read after close")
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = _pread_all(self._fd)
            except OSError:
                # The file went away under the fd (a sysctl unregistered): open it afresh,
                # which says FileNotFoundError if it is gone for good.
                self._close()
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                data = _pread_all(self._fd)
        try:
            return data.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"{self.path}: not ASCII text") from None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._close()

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _pread_all(fd: int) -> bytes:
    data = os.pread(fd, READ_CHUNK_BYTES, 0)
    if len(data) < READ_CHUNK_BYTES:
        return data
    # Larger than one buffer: continue where the first read stopped, to the end.
    chunks = [data]
    offset = len(data)
    while chunk := os.pread(fd, READ_CHUNK_BYTES, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


# Columns of /proc/net/stat/nf_conntrack whose header name differs from ctnetlink's name for
# the same counter. Kernels 5.x+ renamed columns in place, so positions are meaningless.
NF_CONNTRACK_STAT_ALIASES = {
    "icmp_error": "error",
    "clashres": "clash_resolve",
    "chainlength": "chaintoolong",
}
HEX_DIGITS = frozenset(string.hexdigits)
# Not a per-CPU counter: every row repeats the namespace's entry count.
NF_CONNTRACK_STAT_GAUGES = frozenset({"entries"})


def parse_nf_conntrack_stat(text: str) -> list[dict[str, int]]:
    """Parse /proc/net/stat/nf_conntrack into one {counter: value} per CPU row, by header name.

    Values are hexadecimal. Column names are mapped to ctnetlink's names.
    """
    lines = text.splitlines()
    if not lines:
        raise ValueError("nf_conntrack stat file is empty")
    cached = _nf_conntrack_headers.get(lines[0])
    if cached is None:
        header = lines[0].split()
        if not header or any(not name.replace("_", "").isalnum() for name in header):
            raise ValueError(f"nf_conntrack stat header is not a list of names: {lines[0]!r}")
        columns = [
            (NF_CONNTRACK_STAT_ALIASES.get(name, name), position)
            for position, name in enumerate(header)
            if name not in NF_CONNTRACK_STAT_GAUGES
        ]
        cached = (len(header), columns)
        if len(_nf_conntrack_headers) >= 64:  # only a fuzzer sees that many headers
            _nf_conntrack_headers.clear()
        _nf_conntrack_headers[lines[0]] = cached
    width, columns = cached
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if len(fields) != width:
            raise ValueError(
                f"nf_conntrack stat line {number} has {len(fields)} fields, the header {width}"
            )
        # int(x, 16) alone would also take "-1", "0x10" and "1_0": none is a kernel counter.
        if not HEX_DIGITS.issuperset("".join(fields)):
            raise ValueError(f"nf_conntrack stat line {number} is not hexadecimal: {line!r}")
        rows.append({name: int(fields[position], 16) for name, position in columns})
    return rows


# header line -> (its width, its per-CPU counters as (name, position)). Every read has the
# same header (a pods scrape reads a file a namespace): it is checked and mapped once. A dict
# item is replaced atomically, so threads may share this.
_nf_conntrack_headers: dict[str, tuple[int, list[tuple[str, int]]]] = {}


def parse_nf_conntrack_entries(text: str) -> int:
    """The `entries` column of /proc/net/stat/nf_conntrack: the namespace's entry count,
    repeated on every CPU's row (0 without a row)."""
    lines = text.splitlines()
    header = lines[0].split() if lines else []
    if "entries" not in header:
        raise ValueError(f"nf_conntrack stat header has no entries column: {text[:80]!r}")
    if len(lines) < 2:
        return 0
    fields = lines[1].split()
    column = header.index("entries")
    if len(fields) != len(header) or not HEX_DIGITS.issuperset(fields[column]):
        raise ValueError(f"nf_conntrack stat line 2 is not a row of the header: {lines[1]!r}")
    return int(fields[column], 16)


def parse_port_range(text: str) -> tuple[int, int]:
    """net.ipv4.ip_local_port_range ("32768\\t60999"): the (low, high) ephemeral ports."""
    fields = text.split()
    if len(fields) != 2 or not all(field.isdigit() for field in fields):
        raise ValueError(f"ip_local_port_range is not two port numbers: {text!r}")
    low, high = int(fields[0]), int(fields[1])
    if not 0 < low <= high <= 65535:
        raise ValueError(f"ip_local_port_range is not a range of ports: {text!r}")
    return low, high


def parse_port_ranges(text: str) -> list[tuple[int, int]]:
    """net.ipv4.ip_local_reserved_ports ("8080,9000-9010", or empty): inclusive ranges."""
    ranges = []
    for item in text.strip().split(","):
        if not item:
            continue
        low, dash, high = item.partition("-")
        if not dash:
            high = low
        if not (low.isdigit() and high.isdigit()) or not int(low) <= int(high) <= 65535:
            raise ValueError(f"ip_local_reserved_ports has a bad range {item!r}: {text!r}")
        ranges.append((int(low), int(high)))
    return ranges


def ephemeral_port_flags(port_range: tuple[int, int], reserved: list[tuple[int, int]]) -> bytes:
    """65536 bytes, 1 where the kernel may pick the port as an ephemeral one, else 0.

    Indexed by port: one lookup per socket when a scan walks every socket.
    """
    low, high = port_range
    flags = bytearray(65536)
    flags[low : high + 1] = b"\x01" * (high - low + 1)
    for first, last in reserved:
        flags[first : last + 1] = bytes(last - first + 1)
    return bytes(flags)


def parse_sockstat(text: str, source: str = "sockstat") -> dict[str, dict[str, int]]:
    """/proc/net/sockstat or sockstat6, one "NAME: key value key value ..." line per pool.

    "TCP: inuse 3 orphan 0 tw 0 alloc 5 mem 1" -> {"TCP": {"inuse": 3, "orphan": 0, ...}}.
    `source` names the file in error messages.
    """
    if not text.isascii():
        raise ValueError(f"{source}: not ASCII text")
    lines = text.splitlines()
    if not lines:
        raise ValueError(f"{source} is empty")
    pools: dict[str, dict[str, int]] = {}
    for line in lines:
        fields = line.split()
        # A name and at least one pair: an even count means a key without its value.
        if len(fields) < 3 or len(fields) % 2 == 0 or not fields[0].endswith(":"):
            raise ValueError(f"{source}: not a 'NAME: key value ...' line: {line!r}")
        # Keys and values taken in turn from one iterator, by zip, map and dict in C: a pods
        # scrape parses two of these files a namespace.
        values = iter(fields)
        name = next(values)
        try:
            pools[name[:-1]] = dict(zip(values, map(int, values)))  # noqa: B905 (an even count)
        except ValueError:
            raise ValueError(f"{source}: a value is not an integer: {line!r}") from None
    return pools


def parse_snmp_tables(text: str, source: str = "snmp") -> dict[str, dict[str, int]]:
    """/proc/net/snmp or /proc/net/netstat: every table, as {table: {column: value}}.

    Each table is a header line of names and a line of values, both led by "Table:". Values
    may be negative (Tcp MaxConn is -1). The collector reads single tables with
    parse_snmp_table instead; this full parse is the reference the tests hold it to.
    """
    if not text.isascii():
        raise ValueError(f"{source}: not ASCII text")
    lines = text.splitlines()
    if not lines or len(lines) % 2:
        raise ValueError(f"{source}: not pairs of header and value lines ({len(lines)} lines)")
    tables: dict[str, dict[str, int]] = {}
    for header, values in zip(lines[::2], lines[1::2], strict=True):
        table = header.split(":", 1)[0]
        # IcmpMsg comes in several pairs of 16 columns when many ICMP types were seen.
        tables.setdefault(table, {}).update(_snmp_columns(header, values, table, None, source))
    return tables


def parse_snmp_table(
    text: str, table: str, columns: Iterable[str] | None = None, source: str = "snmp"
) -> dict[str, int] | None:
    """One table of /proc/net/snmp or netstat ("TcpExt"), None when the kernel has none.

    With `columns`, only those are converted; a column this kernel lacks is left out. The
    rest of the file is not looked at (netstat is 6 KB of which we want five numbers), and
    only the table's first header and value pair is: enough for every table but IcmpMsg.
    """
    if not text.isascii():
        raise ValueError(f"{source}: not ASCII text")
    prefix = table + ":"
    start = _line_start(text, prefix)
    if start < 0:
        return None
    header_end = _line_end(text, start)
    values_end = _line_end(text, header_end + 1)
    header = text[start:header_end]
    values = text[header_end + 1 : values_end]
    if not values.startswith(prefix):
        raise ValueError(f"{source}: the {table} header is not followed by its values")
    return _snmp_columns(header, values, table, columns, source)


def _snmp_columns(
    header: str, values: str, table: str, columns: Iterable[str] | None, source: str
) -> dict[str, int]:
    numbers = values.split()
    index = _snmp_header_index(header, table, source)
    if not numbers or numbers[0] != table + ":":
        raise ValueError(f"{source}: not a '{table}:' value line: {values[:40]!r}")
    if len(index) + 1 != len(numbers):
        raise ValueError(f"{source}: {table} has {len(index)} names and {len(numbers) - 1} values")
    try:
        if columns is None:
            return {name: int(numbers[position]) for name, position in index.items()}
        return {name: int(numbers[index[name]]) for name in columns if name in index}
    except ValueError:
        raise ValueError(f"{source}: a {table} value is not an integer") from None


# table -> (its last header line, {column: position}). The kernel prints the same header on
# every read: comparing it with the last one is far cheaper than splitting and checking its
# hundred-odd names again. A dict item is replaced atomically, so threads may share this.
_snmp_headers: dict[str, tuple[str, dict[str, int]]] = {}


def _snmp_header_index(header: str, table: str, source: str) -> dict[str, int]:
    cached = _snmp_headers.get(table)
    if cached is not None and cached[0] == header:
        return cached[1]
    names = header.split()
    if not names or names[0] != table + ":":
        raise ValueError(f"{source}: not a '{table}:' header line: {header[:40]!r}")
    if not all(name.isidentifier() for name in names[1:]):
        raise ValueError(f"{source}: the {table} header is not a list of names")
    index = {name: position for position, name in enumerate(names) if position}
    if len(index) != len(names) - 1:
        raise ValueError(f"{source}: the {table} header names a column twice")
    if len(_snmp_headers) >= 64:  # only a fuzzer sees that many tables
        _snmp_headers.clear()
    _snmp_headers[table] = (header, index)
    return index


def parse_snmp6(text: str, source: str = "snmp6") -> dict[str, int]:
    """/proc/net/snmp6, one "Name<spaces>value" line per counter: {name: value}."""
    if not text.isascii():
        raise ValueError(f"{source}: not ASCII text")
    lines = text.splitlines()
    if not lines:
        raise ValueError(f"{source} is empty")
    return dict(_snmp6_line(line, source) for line in lines)


def parse_snmp6_values(text: str, names: Iterable[str], source: str = "snmp6") -> dict[str, int]:
    """The named counters of /proc/net/snmp6; a counter this kernel lacks is left out.

    Finds each name's line instead of splitting 90 lines for four of them.
    """
    if not text.isascii():
        raise ValueError(f"{source}: not ASCII text")
    if not text.strip():
        raise ValueError(f"{source} is empty")
    found: dict[str, int] = {}
    for name in names:
        start = _line_start(text, name)
        if start >= 0:
            found.update([_snmp6_line(text[start : _line_end(text, start)], source)])
    return found


def _snmp6_line(line: str, source: str) -> tuple[str, int]:
    fields = line.split()
    if len(fields) != 2 or not fields[0].isidentifier():
        raise ValueError(f"{source}: not a 'Name value' line: {line!r}")
    try:
        return fields[0], int(fields[1])
    except ValueError:
        raise ValueError(f"{source}: not an integer: {line!r}") from None


def _line_start(text: str, word: str) -> int:
    """Where the first line that starts with `word` and then blank space starts, or -1.

    str.find runs in C: much cheaper than splitting the whole file into lines.
    """
    start = 0
    while True:
        if text.startswith(word, start):
            after = start + len(word)
            if after == len(text) or text[after] in " \t\n":
                return start
            # else a longer name that starts with `word` ("Udp6InErrorsX"): look further on
        newline = text.find("\n" + word, start)
        if newline < 0:
            return -1
        start = newline + 1


def _line_end(text: str, start: int) -> int:
    end = text.find("\n", start)
    return len(text) if end < 0 else end


def parse_ints(text: str, count: int, source: str) -> list[int]:
    """A sysctl of `count` integers ("4096\\t87380\\t6291456\\n" for tcp_mem), in order."""
    fields = text.split()
    if len(fields) != count or not text.isascii():
        raise ValueError(f"{source}: expected {count} integers, got {text!r}")
    try:
        return [int(field) for field in fields]
    except ValueError:
        raise ValueError(f"{source}: expected {count} integers, got {text!r}") from None
