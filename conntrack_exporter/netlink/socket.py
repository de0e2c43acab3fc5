"""A netlink socket that only ever sends read requests, with one reused receive buffer."""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import ClassVar, NamedTuple

from conntrack_exporter.netlink.core import (
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_DUMP_INTR,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_MIN_TYPE,
    BudgetSpent,
    Buffer,
    Message,
    NetlinkError,
    NetlinkParseError,
    NetlinkTimeout,
    build_message,
    error_code,
    iter_messages,
)

log = logging.getLogger(__name__)

NETLINK_NETFILTER = 12

# Large enough for the biggest single skb the kernel sends on a dump (32 KiB on 4 KiB pages).
RECEIVE_BUFFER_BYTES = 64 * 1024
TIMEVAL = struct.Struct("@ll")

MessageHandler = Callable[[Buffer, Message], None]
# (protocol, timeout) -> the kernel's end of a netlink socket: the seam for fakes in tests.
SocketOpener = Callable[[int, float], socket.socket]


def open_netlink(protocol: int, timeout: float) -> socket.socket:
    """A bound and connected AF_NETLINK socket whose receives wait `timeout` at most."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
    try:
        sock.bind((0, 0))
        sock.connect((0, 0))
        # A kernel-side receive timeout, set once: Python's own socket timeout would add a
        # poll() and an ioctl() to every receive. It bounds the silence before each datagram;
        # the request's deadline bounds the total. At least 1 us: a zero timeval would mean
        # "block forever".
        micros = max(1, round(timeout * 1e6))
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVTIMEO, TIMEVAL.pack(*divmod(micros, 1_000_000))
        )
    except BaseException:
        sock.close()
        raise
    return sock


class DumpResult(NamedTuple):
    complete: bool  # every message was read (False when the consumer's budget stopped it)
    interrupted: bool  # the kernel flagged the dump NLM_F_DUMP_INTR: the data changed under it


class DumpCancelled(Exception):
    """A dump given up because its `stop` event was set (the exporter is stopping or
    reloading): no failure, and no result."""


class DumpBounds(NamedTuple):
    """What ends a dump besides its last message: a monotonic deadline for the whole dump,
    and an event that cancels it (checked between datagrams)."""

    deadline: float
    stop: threading.Event | None = None

    @classmethod
    def within(cls, seconds: float, stop: threading.Event | None = None) -> DumpBounds:
        return cls(time.monotonic() + seconds, stop)


class NetlinkSocket:
    """One netlink socket, its receive buffer, and a lock that serialises requests.

    The socket belongs to the network namespace it was opened in. Requests are checked
    against `allowed_types`: this exporter observes the kernel and must never change it.

    `timeout` bounds the kernel's silence: the wait for each datagram of an answer. It is
    what catches a kernel that stops answering. A request's whole answer gets the same bound
    by default; a dump of a large table streams for seconds and gets its own (DumpBounds).
    """

    def __init__(
        self,
        protocol: int,
        allowed_types: frozenset[int],
        timeout: float = 2.0,
        open_socket: SocketOpener = open_netlink,
    ) -> None:
        self._protocol = protocol
        self._allowed_types = allowed_types
        self._timeout = timeout
        self._open_socket = open_socket
        self._buffer = bytearray(RECEIVE_BUFFER_BYTES)
        self._view = memoryview(self._buffer)
        self._lock = threading.Lock()
        self._seq = 0
        self._sock = self._open()

    def _open(self) -> socket.socket:
        return self._open_socket(self._protocol, self._timeout)

    def reopen(self) -> None:
        """A fresh socket (same buffer): drops what an abandoned dump left in the old one.

        Cheaper than reading the rest of a dump stopped early, which the kernel would go on
        producing for the old socket.
        """
        with self._lock:
            self._sock.close()
            self._sock = self._open()

    def close(self) -> None:
        with self._lock:
            self._sock.close()

    def request(
        self,
        msg_type: int,
        flags: int,
        payload: bytes,
        on_message: MessageHandler,
        bounds: DumpBounds | None = None,
    ) -> bool:
        """Send one request and feed every reply message to on_message.

        A dump ends with NLMSG_DONE; any other request asks for an acknowledgement and ends
        with it, since some replies (ctnetlink's stats) carry NLM_F_MULTI without being dumps.
        Without `bounds`, the whole answer must come within the socket's timeout.

        Returns True when the kernel flagged a dump as interrupted (NLM_F_DUMP_INTR): the
        table changed under the dump and its result may be inconsistent.
        """
        if msg_type not in self._allowed_types:
            raise ValueError(f"netlink message type {msg_type:#x} is not a read request")
        with self._lock:
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            if not flags & NLM_F_DUMP:
                flags |= NLM_F_ACK
            self._sock.send(build_message(msg_type, flags | NLM_F_REQUEST, self._seq, payload))
            return self._receive(self._seq, bounds or DumpBounds.within(self._timeout), on_message)

    def dump(
        self,
        msg_type: int,
        payload: bytes,
        on_message: MessageHandler,
        bounds: DumpBounds | None = None,
    ) -> DumpResult:
        """A dump request whose messages go to on_message, until it raises BudgetSpent.

        A dump stopped early, cancelled, or failed, leaves the kernel with more to send to
        this socket: it is reopened then, so that the next request starts clean.
        """
        try:
            interrupted = self.request(msg_type, NLM_F_DUMP, payload, on_message, bounds)
        except BudgetSpent:
            self.reopen()
            return DumpResult(complete=False, interrupted=False)
        except BaseException:
            self.reopen()  # whatever the kernel still sends belongs to a dead dump
            raise
        return DumpResult(complete=True, interrupted=interrupted)

    def _receive(self, seq: int, bounds: DumpBounds, on_message: MessageHandler) -> bool:
        interrupted = False
        view = self._view
        deadline, stop = bounds
        while True:
            if stop is not None and stop.is_set():
                raise DumpCancelled
            length = self._recv(deadline)
            # Once per conntrack entry in a dump: Message fields by index (type 0, flags 1,
            # seq 2), which is cheaper than a namedtuple's attribute descriptors.
            for msg in iter_messages(view, length):
                if msg[2] != seq:
                    # A late answer to an earlier request that timed out: not ours to read.
                    log.debug("dropping netlink message with sequence %d, expected %d", msg[2], seq)
                    continue
                # The kernel checks a dump's consistency as it writes each message, NLMSG_DONE
                # included: a change after the last entry flags only the DONE.
                if msg[1] & NLM_F_DUMP_INTR:
                    interrupted = True
                msg_type = msg[0]
                if msg_type < NLMSG_MIN_TYPE:
                    if msg_type in (NLMSG_ERROR, NLMSG_DONE):
                        code = error_code(view, msg)
                        if code:
                            raise NetlinkError(code, os.strerror(code))
                        return interrupted
                    continue  # NLMSG_NOOP, NLMSG_OVERRUN and reserved control types
                on_message(view, msg)

    def _recv(self, deadline: float) -> int:
        if time.monotonic() >= deadline:
            raise NetlinkTimeout(errno.ETIMEDOUT, "the netlink answer did not end by its deadline")
        try:
            length = self._sock.recv_into(self._buffer, 0, socket.MSG_TRUNC)
        except BlockingIOError:  # SO_RCVTIMEO expired
            raise NetlinkTimeout(
                errno.ETIMEDOUT, f"the kernel sent nothing for {self._timeout:g} s"
            ) from None
        except OSError as exc:
            raise NetlinkError(exc.errno, exc.strerror) from exc
        if length > len(self._buffer):
            raise NetlinkParseError(
                f"netlink datagram of {length} bytes exceeds the {len(self._buffer)} byte buffer"
            )
        return length


class NetlinkReader:
    """The base of the protocol readers: one NetlinkSocket of the reader's own, which only
    sends the reader's read requests, closed with the reader.

    `netlink_socket` is the seam for tests: a socket that replays captured answers.
    """

    protocol: ClassVar[int]
    read_requests: ClassVar[frozenset[int]]

    def __init__(self, timeout: float = 2.0, netlink_socket: NetlinkSocket | None = None) -> None:
        self._socket = netlink_socket or NetlinkSocket(self.protocol, self.read_requests, timeout)

    def close(self) -> None:
        self._socket.close()
