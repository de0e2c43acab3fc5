"""NetlinkSocket only ever sends read requests. Opening a netlink socket needs no privilege."""

from __future__ import annotations

import errno
import socket
import struct
import sys

import pytest
from pyroute2.netlink.nfnetlink import nfctsocket as pr_nfct

from conntrack_exporter.netlink.core import NLM_F_ACK, NLM_F_REQUEST
from conntrack_exporter.netlink.ctnetlink import (
    CT_GET_STATS,
    NFNL_SUBSYS_CTNETLINK,
    NFNL_SUBSYS_CTNETLINK_EXP,
    READ_REQUESTS,
    nfgen_request,
)
from conntrack_exporter.netlink.socket import NETLINK_NETFILTER, NetlinkSocket, open_netlink
from tests.test_netlink_parsers import parse_enums, uapi

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="netlink sockets are Linux-only")

# enum ctnl_exp_msg_types (linux/netfilter/nfnetlink_conntrack.h; pyroute2 does not define it),
# checked against the header below.
IPCTNL_MSG_EXP_NEW = 0
IPCTNL_MSG_EXP_GET = 1
IPCTNL_MSG_EXP_DELETE = 2
IPCTNL_MSG_EXP_GET_STATS_CPU = 3


def ct(msg: int) -> int:
    return NFNL_SUBSYS_CTNETLINK << 8 | msg


def exp(msg: int) -> int:
    return NFNL_SUBSYS_CTNETLINK_EXP << 8 | msg


# Requests that create, change or delete kernel state. IPCTNL_MSG_CT_GET_CTRZERO reads the table
# and zeroes every entry's counters. A CT_DELETE without attributes flushes the whole table.
STATE_CHANGING = {
    "IPCTNL_MSG_CT_NEW": ct(pr_nfct.IPCTNL_MSG_CT_NEW),
    "IPCTNL_MSG_CT_DELETE": ct(pr_nfct.IPCTNL_MSG_CT_DELETE),
    "IPCTNL_MSG_CT_GET_CTRZERO": ct(pr_nfct.IPCTNL_MSG_CT_GET_CTRZERO),
    "IPCTNL_MSG_EXP_NEW": exp(IPCTNL_MSG_EXP_NEW),
    "IPCTNL_MSG_EXP_DELETE": exp(IPCTNL_MSG_EXP_DELETE),
}
# Every ctnetlink request type that only reads.
READ_ONLY = {
    ct(pr_nfct.IPCTNL_MSG_CT_GET),
    ct(pr_nfct.IPCTNL_MSG_CT_GET_STATS_CPU),
    ct(pr_nfct.IPCTNL_MSG_CT_GET_STATS),
    ct(pr_nfct.IPCTNL_MSG_CT_GET_DYING),
    ct(pr_nfct.IPCTNL_MSG_CT_GET_UNCONFIRMED),
    exp(IPCTNL_MSG_EXP_GET),
    exp(IPCTNL_MSG_EXP_GET_STATS_CPU),
}


class RecordingSocket:
    """Stands in for the kernel socket: records what would be sent, sends nothing."""

    class Sent(Exception):
        pass

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(bytes(data))
        raise self.Sent  # stop before waiting for an answer

    def close(self) -> None:
        pass


@pytest.fixture
def recorded():
    try:
        open_netlink(NETLINK_NETFILTER, 0.1).close()
    except OSError as exc:
        if exc.errno == errno.EPROTONOSUPPORT:
            pytest.skip("this kernel has no nfnetlink (NETLINK_NETFILTER)")
        raise
    # Opening the real socket proves it needs no privilege; the recorder stands in for it, so
    # that a broken allowlist can never send a flush or a counter reset to the host as root.
    recorder = RecordingSocket()
    sock = NetlinkSocket(NETLINK_NETFILTER, READ_REQUESTS, 0.1, open_socket=lambda *_: recorder)
    yield sock, recorder
    sock.close()


def test_read_requests_contain_no_state_changing_type():
    assert READ_REQUESTS, "an empty allowlist would make this test vacuous"
    assert not READ_REQUESTS & set(STATE_CHANGING.values())
    assert READ_REQUESTS <= READ_ONLY
    assert ct(pr_nfct.IPCTNL_MSG_CT_GET_STATS) in READ_REQUESTS


def test_message_numbers_agree_with_the_header():
    enums = parse_enums(uapi("nfnetlink_conntrack.h"))
    kernel = {
        **{n: ct(v) for n, v in enums["cntl_msg_types"].items()},
        **{n: exp(v) for n, v in enums["ctnl_exp_msg_types"].items()},
    }
    assert {name: kernel[name] for name in STATE_CHANGING} == STATE_CHANGING
    reads = {"GET", "GET_STATS_CPU", "GET_STATS", "GET_DYING", "GET_UNCONFIRMED"}
    assert {kernel[f"IPCTNL_MSG_CT_{n}"] for n in reads} | {
        kernel["IPCTNL_MSG_EXP_GET"],
        kernel["IPCTNL_MSG_EXP_GET_STATS_CPU"],
    } == READ_ONLY
    # Every request type the header knows is classified as one or the other.
    assert set(kernel.values()) - {ct(enums["cntl_msg_types"]["IPCTNL_MSG_MAX"])} - {
        exp(enums["ctnl_exp_msg_types"]["IPCTNL_MSG_EXP_MAX"])
    } == READ_ONLY | set(STATE_CHANGING.values())


@pytest.mark.parametrize(("name", "msg_type"), sorted(STATE_CHANGING.items()))
def test_socket_refuses_a_type_outside_its_allowlist(recorded, name, msg_type):
    sock, recorder = recorded
    with pytest.raises(ValueError, match=rf"message type {msg_type:#x} is not a read request"):
        sock.request(msg_type, 0, nfgen_request(), lambda buf, msg: None)
    assert recorder.sent == [], name


def test_socket_sends_an_allowed_read_request(recorded):
    # The positive control: the allowlist is not simply refusing everything.
    sock, recorder = recorded
    with pytest.raises(RecordingSocket.Sent):
        sock.request(CT_GET_STATS, 0, nfgen_request(), lambda buf, msg: None)
    (sent,) = recorder.sent
    length, msg_type, flags, _seq, _pid = struct.unpack_from("=IHHII", sent)
    assert (length, msg_type, flags) == (20, CT_GET_STATS, NLM_F_REQUEST | NLM_F_ACK)
    assert sent[16:] == struct.pack("!BBH", socket.AF_UNSPEC, 0, 0)
