"""Readers for /proc with an injectable root, and pure parsers of its formats.

/proc/net and /proc/sys/net show the network namespace of the *reading process*.
"""

from __future__ import annotations

import os
import string

READ_CHUNK_BYTES = 65536


class ProcFS:
    """Reads files below a procfs mount point (`--path.procfs`)."""

    def __init__(self, root: str = "/proc") -> None:
        self.root = root

    def path(self, relative: str) -> str:
        return os.path.join(self.root, relative)

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
    header = lines[0].split()
    if not header or any(not name.replace("_", "").isalnum() for name in header):
        raise ValueError(f"nf_conntrack stat header is not a list of names: {lines[0]!r}")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if len(fields) != len(header):
            raise ValueError(
                f"nf_conntrack stat line {number} has {len(fields)} fields, "
                f"the header {len(header)}"
            )
        # int(x, 16) alone would also take "-1", "0x10" and "1_0": none is a kernel counter.
        if not all(HEX_DIGITS.issuperset(field) for field in fields):
            raise ValueError(f"nf_conntrack stat line {number} is not hexadecimal: {line!r}")
        values = [int(field, 16) for field in fields]
        rows.append(
            {
                NF_CONNTRACK_STAT_ALIASES.get(name, name): value
                for name, value in zip(header, values, strict=True)
                if name not in NF_CONNTRACK_STAT_GAUGES
            }
        )
    return rows


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
        low, _, high = item.partition("-")
        high = high or low
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
