"""Netlink framing as pure functions over bytes (linux/netlink.h).

Everything here works on a buffer and offsets: no sockets, no I/O. Malformed input raises
NetlinkParseError and nothing else, so a hostile or truncated reply can never crash a scrape.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import NamedTuple

Buffer = bytes | bytearray | memoryview

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
NLMSG_MIN_TYPE = 0x10  # types below are control messages, not protocol replies

NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLM_F_DUMP_INTR = 0x10
NLM_F_ROOT = 0x100
NLM_F_MATCH = 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH

# The top two bits of nla_type are flags (NLA_F_NESTED, NLA_F_NET_BYTEORDER), not the type.
NLA_TYPE_MASK = 0x3FFF

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NLATTR = struct.Struct("=HH")  # len, type
NLMSGERR_ERRNO = struct.Struct("=i")
MAX_ERRNO = 4095  # include/linux/err.h: the kernel's error numbers are 1 to 4095
_unpack_nlattr = NLATTR.unpack_from
_unpack_nlmsghdr = NLMSGHDR.unpack_from


class NetlinkParseError(ValueError):
    """A netlink message or attribute does not fit the bytes it came in."""


class NetlinkError(OSError):
    """The kernel answered a request with an error (errno is set), or the socket failed."""


class NetlinkTimeout(NetlinkError, TimeoutError):
    """No complete answer arrived before the deadline."""


class BudgetSpent(Exception):
    """A dump's consumer has read as many messages as it was allowed: stop the dump."""


class Message(NamedTuple):
    """One netlink message inside a receive buffer; the payload is buf[start:end]."""

    type: int
    flags: int
    seq: int
    pid: int
    start: int
    end: int


def build_message(msg_type: int, flags: int, seq: int, payload: bytes) -> bytes:
    return NLMSGHDR.pack(NLMSGHDR.size + len(payload), msg_type, flags, seq, 0) + payload


def iter_messages(buf: Buffer, length: int) -> Iterator[Message]:
    """Walk the netlink messages in buf[:length]."""
    # One message per conntrack entry in a table dump: locals, and the Message built by
    # tuple.__new__ directly, since a namedtuple's own __new__ is a Python-level call.
    unpack = _unpack_nlmsghdr
    new = tuple.__new__
    offset = 0
    while offset < length:
        if length - offset < 16:
            raise NetlinkParseError(f"{length - offset} trailing bytes at offset {offset}")
        msg_len, msg_type, flags, seq, pid = unpack(buf, offset)
        if msg_len < 16 or msg_len > length - offset:
            raise NetlinkParseError(
                f"message length {msg_len} at offset {offset} does not fit {length - offset} bytes"
            )
        yield new(Message, (msg_type, flags, seq, pid, offset + 16, offset + msg_len))
        offset += (msg_len + 3) & ~3


def iter_attributes(buf: Buffer, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """Yield (type, value_start, value_end) for each attribute in buf[start:end]."""
    # The innermost loop of a table dump (tens of attributes per entry): locals, no calls.
    unpack = _unpack_nlattr
    type_mask = NLA_TYPE_MASK
    offset = start
    while end - offset >= 4:
        attr_len, attr_type = unpack(buf, offset)
        if attr_len < 4 or attr_len > end - offset:
            raise NetlinkParseError(
                f"attribute length {attr_len} at offset {offset} does not fit {end - offset} bytes"
            )
        yield attr_type & type_mask, offset + 4, offset + attr_len
        offset += (attr_len + 3) & ~3
    # The last attribute's alignment padding was consumed with it (offset may now be past end
    # when a sender left that padding out); any byte still left is garbage, as for the kernel.
    if end - offset > 0:
        raise NetlinkParseError(f"{end - offset} stray bytes after the attributes")


def error_code(buf: Buffer, msg: Message) -> int:
    """The errno carried by an NLMSG_ERROR (0 for an acknowledgement) or an NLMSG_DONE."""
    if msg.end - msg.start < NLMSGERR_ERRNO.size:
        if msg.type == NLMSG_DONE:
            return 0  # older kernels send an empty DONE
        raise NetlinkParseError(f"netlink message type {msg.type} too short for an error code")
    code = -NLMSGERR_ERRNO.unpack_from(buf, msg.start)[0]
    # The kernel sends 0 or a negated errno; anything else is no errno (and -INT_MIN would
    # not even fit os.strerror's C int).
    if not 0 <= code <= MAX_ERRNO:
        raise NetlinkParseError(f"netlink error code {-code} is not 0 or a negated errno")
    return code
