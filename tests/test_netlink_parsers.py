"""Pure tests of the netlink walker and the ctnetlink stats parsers on captured kernel replies.

The fixtures under tests/fixtures/netlink/ are raw recv() bytes from Linux 6.18, written by
tests/fixtures/capture_netlink.py together with what `conntrack -S`/`-C` said at that moment
(capture.json). No root and no kernel needed here.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.netlink import nlmsgerr
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_CTNETLINK as PR_SUBSYS_CTNETLINK
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_CTNETLINK_EXP as PR_SUBSYS_CTNETLINK_EXP
from pyroute2.netlink.nfnetlink import nfctsocket as pr_nfct
from pyroute2.netlink.nfnetlink import nfgen_msg

from conntrack_exporter.netlink import ctnetlink
from conntrack_exporter.netlink.core import (
    NLM_F_MULTI,
    NLMSG_DONE,
    NLMSG_ERROR,
    Message,
    NetlinkParseError,
    error_code,
    iter_attributes,
    iter_messages,
)
from conntrack_exporter.netlink.ctnetlink import (
    CPU_STAT_NAMES,
    CT_GET_STATS,
    CT_GET_STATS_CPU,
    EXP_GET_STATS_CPU,
    EXPECT_STAT_NAMES,
    parse_cpu_stats,
    parse_global_stats,
)

FIXTURES = Path(__file__).parent / "fixtures" / "netlink"
CAPTURE = json.loads((FIXTURES / "capture.json").read_text())
FILES = ["ct_get_stats.bin", "ct_get_stats_cpu.bin", "exp_get_stats_cpu.bin"]
UAPI = Path("/usr/include/linux/netfilter")

# The kernel answers IPCTNL_MSG_EXP_GET_STATS_CPU with NFNL_SUBSYS_CTNETLINK, not _EXP, in the
# reply's type (net/netfilter/nf_conntrack_netlink.c, ctnetlink_exp_stat_fill_info, since the
# call was added): 0x0103, which is numerically (CTNETLINK, IPCTNL_MSG_CT_GET_CTRZERO). A reader
# that matched replies against the request type would drop every expectation stats message.
EXP_STATS_CPU_REPLY = ctnetlink.NFNL_SUBSYS_CTNETLINK << 8 | ctnetlink.IPCTNL_MSG_EXP_GET_STATS_CPU

NLMSGHDR = struct.Struct("=IHHII")
NLATTR = struct.Struct("=HH")
NFGEN = struct.Struct("!BBH")


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def datagrams(name: str) -> list[bytes]:
    """Split a fixture back into the datagrams recv() returned, using capture.json."""
    data, out, offset = fixture(name), [], 0
    for length in CAPTURE["datagram_lengths"][name]:
        out.append(data[offset : offset + length])
        offset += length
    assert offset == len(data), f"{name}: capture.json datagram lengths do not add up"
    return out


def messages(name: str) -> list[tuple[bytes, Message]]:
    """Every message of a fixture, walked datagram by datagram as the socket does."""
    return [(d, msg) for d in datagrams(name) for msg in iter_messages(d, len(d))]


def be32_attributes(buf: bytes, msg: Message) -> list[tuple[int, int]]:
    return [
        (attr_type, int.from_bytes(buf[start:end], "big"))
        for attr_type, start, end in iter_attributes(buf, msg.start + NFGEN.size, msg.end)
    ]


# --- the captured replies, decoded ------------------------------------------------------------


def test_fixtures_come_from_the_kernel_they_claim():
    assert CAPTURE["kernel_release"].startswith("6.18.")
    assert CAPTURE["cpus"] == 2
    assert CAPTURE["conntrack_C"] > 1000  # real traffic, not an idle table


def test_message_sequence_of_each_reply():
    kinds = {name: [msg.type for _, msg in messages(name)] for name in FILES}
    assert kinds == {
        # The stats reply is followed by the ACK our socket asks for.
        "ct_get_stats.bin": [CT_GET_STATS, NLMSG_ERROR],
        # One message per CPU, then NLMSG_DONE (in its own datagram on this kernel).
        "ct_get_stats_cpu.bin": [CT_GET_STATS_CPU, CT_GET_STATS_CPU, NLMSG_DONE],
        "exp_get_stats_cpu.bin": [EXP_STATS_CPU_REPLY, EXP_STATS_CPU_REPLY, NLMSG_DONE],
    }
    assert EXP_STATS_CPU_REPLY == 0x0103 != EXP_GET_STATS_CPU == 0x0203
    for name in FILES:
        for buf, msg in messages(name):
            assert msg.seq == 1
            if msg.type in (NLMSG_ERROR, NLMSG_DONE):
                assert error_code(buf, msg) == 0


def test_global_stats_reply_is_flagged_multi_although_not_a_dump():
    # Why NetlinkSocket asks for an ACK instead of waiting for NLMSG_DONE after CT_GET_STATS.
    (_buf, reply), _ack = messages("ct_get_stats.bin")
    assert reply.flags & NLM_F_MULTI


def test_concatenated_datagrams_walk_like_separate_ones():
    for name in FILES:
        data = fixture(name)
        whole = [(m.type, m.flags, m.seq, m.end - m.start) for m in iter_messages(data, len(data))]
        split = [(m.type, m.flags, m.seq, m.end - m.start) for _, m in messages(name)]
        assert whole == split


def test_stale_bytes_after_length_in_a_reused_buffer_are_ignored():
    data = fixture("ct_get_stats_cpu.bin")
    buffer = bytearray(b"\xff" * 65536)
    buffer[: len(data)] = data
    view = memoryview(buffer)
    stats = [
        parse_cpu_stats(view, msg, CPU_STAT_NAMES)
        for msg in iter_messages(view, len(data))
        if msg.type == CT_GET_STATS_CPU
    ]
    expected = [
        parse_cpu_stats(b, m, CPU_STAT_NAMES)
        for b, m in messages("ct_get_stats_cpu.bin")
        if m.type == CT_GET_STATS_CPU
    ]
    assert len(stats) == 2
    assert stats == expected


def captured_cpu_stats(fixture: str, reply_type: int, names: dict[int, str]) -> list:
    return [
        parse_cpu_stats(buf, msg, names) for buf, msg in messages(fixture) if msg.type == reply_type
    ]


def test_global_stats_match_conntrack_count():
    (buf, msg), _ack = messages("ct_get_stats.bin")
    stats = parse_global_stats(buf, msg)
    assert stats.entries == CAPTURE["conntrack_C"] == 3811
    assert stats.max_entries == CAPTURE["nf_conntrack_max"] == 262144


def test_cpu_stats_match_conntrack_dash_s_per_cpu():
    parsed = captured_cpu_stats("ct_get_stats_cpu.bin", CT_GET_STATS_CPU, CPU_STAT_NAMES)
    assert [s.cpu for s in parsed] == [0, 1]
    for stats in parsed:
        # Exact equality: the kernel sends just the ten counters conntrack -S prints.
        assert stats.counters == CAPTURE["conntrack_S"]["cpus"][str(stats.cpu)]
    # Spot-check against the numbers themselves, so a regenerated capture gets looked at.
    assert parsed[0].counters["invalid"] == 12
    assert parsed[1].counters["invalid"] == 20
    assert parsed[0].counters["error"] == 8
    assert parsed[1].counters["error"] == 14
    assert all(s.counters["clash_resolve"] > 0 for s in parsed)


def test_cpu_stats_totals_match_conntrack_dash_s():
    parsed = captured_cpu_stats("ct_get_stats_cpu.bin", CT_GET_STATS_CPU, CPU_STAT_NAMES)
    reference = CAPTURE["conntrack_S"]["cpus"].values()
    for name in CAPTURE["conntrack_S"]["cpus"]["0"]:
        assert sum(s.counters[name] for s in parsed) == sum(cpu[name] for cpu in reference), name
    assert sum(s.counters["invalid"] for s in parsed) == 32
    assert sum(s.counters["error"] for s in parsed) == 22


def test_kernel_no_longer_sends_the_unused_counters():
    # linux/netfilter/nfnetlink_conntrack.h marks these "no longer used"; 6.18 omits them.
    for buf, msg in messages("ct_get_stats_cpu.bin"):
        if msg.type == CT_GET_STATS_CPU:
            counters = parse_cpu_stats(buf, msg, CPU_STAT_NAMES).counters
            assert not {"searched", "new", "ignore", "delete", "delete_list"} & counters.keys()


def test_expect_stats_match_conntrack_dash_s_exp():
    parsed = captured_cpu_stats("exp_get_stats_cpu.bin", EXP_STATS_CPU_REPLY, EXPECT_STAT_NAMES)
    assert [s.cpu for s in parsed] == [0, 1]
    for stats in parsed:
        assert stats.counters == CAPTURE["conntrack_S_exp"]["cpus"][str(stats.cpu)]
    assert parsed[0].counters == {"expect_new": 2, "expect_create": 6, "expect_delete": 5}
    assert parsed[1].counters == {"expect_new": 0, "expect_create": 0, "expect_delete": 0}


def test_names_are_the_ones_conntrack_tools_prints():
    printed = set(CAPTURE["conntrack_S"]["cpus"]["0"])
    assert printed <= set(CPU_STAT_NAMES.values())
    assert set(CAPTURE["conntrack_S_exp"]["cpus"]["0"]) == set(EXPECT_STAT_NAMES.values())


# --- differential: pyroute2's own message classes decode the same bytes -------------------------


class ExpectStatsCpu(nfgen_msg):
    """pyroute2 has no class for IPCTNL_MSG_EXP_GET_STATS_CPU; this is its generic nfgen
    decoder with enum ctattr_expect_stats (checked against the header below)."""

    prefix = "CTA_STATS_EXP_"
    nla_map = (
        ("CTA_STATS_EXP_UNSPEC", "none"),
        ("CTA_STATS_EXP_NEW", "be32"),
        ("CTA_STATS_EXP_CREATE", "be32"),
        ("CTA_STATS_EXP_DELETE", "be32"),
    )


# (fixture, reply type) -> pyroute2 class; NLMSG_ERROR and NLMSG_DONE decode as nlmsgerr.
PYROUTE2_CLASSES = {
    ("ct_get_stats.bin", CT_GET_STATS): pr_nfct.nfct_stats,
    ("ct_get_stats_cpu.bin", CT_GET_STATS_CPU): pr_nfct.nfct_stats_cpu,
    ("exp_get_stats_cpu.bin", EXP_STATS_CPU_REPLY): ExpectStatsCpu,
}


@pytest.mark.parametrize("name", FILES)
def test_pyroute2_agrees_message_by_message(name):
    compared = 0
    for buf, msg in messages(name):
        data = buf[msg.start - NLMSGHDR.size : msg.end]
        if msg.type in (NLMSG_ERROR, NLMSG_DONE):
            cls = nlmsgerr
        else:
            cls = PYROUTE2_CLASSES[name, msg.type]
        theirs = cls(data)
        theirs.decode()
        header = theirs["header"]
        assert (header["length"], header["type"], header["flags"]) == (
            msg.end - msg.start + NLMSGHDR.size,
            msg.type,
            msg.flags,
        )
        assert (header["sequence_number"], header["pid"]) == (msg.seq, msg.pid)
        if cls is nlmsgerr:
            assert -theirs["error"] == error_code(buf, msg) == 0
            compared += 1
            continue
        numbers = {attr_name: number for number, (attr_name, _) in enumerate(cls.nla_map)}
        their_attributes = [(numbers[n], value) for n, value in theirs["attrs"]]
        assert be32_attributes(buf, msg) == their_attributes
        assert len(their_attributes) >= 2
        if msg.type == CT_GET_STATS:
            ours = parse_global_stats(buf, msg)
            assert ours.entries == theirs.get_attr("CTA_STATS_GLOBAL_ENTRIES")
            assert ours.max_entries == theirs.get_attr("CTA_STATS_GLOBAL_MAX_ENTRIES")
        else:
            table = EXPECT_STAT_NAMES if name == "exp_get_stats_cpu.bin" else CPU_STAT_NAMES
            ours = parse_cpu_stats(buf, msg, table)
            assert ours.cpu == theirs["res_id"]
            assert ours.counters == {table[numbers[n]]: value for n, value in theirs["attrs"]}
        compared += 1
    assert compared == {"ct_get_stats.bin": 2}.get(name, 3)


# --- constant tables against the kernel's UAPI header and pyroute2 -------------------------------


def parse_enums(text: str) -> dict[str, dict[str, int]]:
    """enum name -> {member: value} for the plain enums of a UAPI header."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.DOTALL)
    enums = {}
    for match in re.finditer(r"enum\s+(\w+)\s*\{(.*?)\}\s*;", text, flags=re.DOTALL):
        members: dict[str, int] = {}
        following = 0
        for line in match.group(2).splitlines():
            line = line.strip()
            if line.startswith("#"):
                continue
            for item in filter(None, (part.strip() for part in line.split(","))):
                member, _, value = (part.strip() for part in item.partition("="))
                if value:
                    following = members[value] if value in members else int(value, 0)
                members[member] = following
                following += 1
        enums[match.group(1)] = members
    return enums


def uapi(name: str) -> str:
    path = UAPI / name
    if not path.exists():
        pytest.skip(f"{path} is absent (Debian: apt-get install linux-libc-dev)")
    return path.read_text()


def real_members(enum: dict[str, int]) -> dict[int, str]:
    """value -> name, without the UNSPEC placeholder and the __*_MAX sentinel."""
    return {v: n for n, v in enum.items() if not n.startswith("__") and not n.endswith("UNSPEC")}


def test_parse_enums_reads_a_header_shaped_enum():
    text = "enum e {\n\tA,\t/* a */\n\tB = 5,\n#define C B\n\tD,\n\tE = B,\n\t__E_MAX\n};"
    assert parse_enums(text) == {"e": {"A": 0, "B": 5, "D": 6, "E": 5, "__E_MAX": 6}}


def test_message_types_agree_with_the_header():
    enums = parse_enums(uapi("nfnetlink_conntrack.h"))
    kernel = {**enums["cntl_msg_types"], **enums["ctnl_exp_msg_types"]}
    ours = {name: getattr(ctnetlink, name) for name in dir(ctnetlink) if name.startswith("IPCTNL")}
    assert set(ours) == {
        "IPCTNL_MSG_CT_NEW",  # the type of each entry in a dump reply; never in READ_REQUESTS
        "IPCTNL_MSG_CT_GET",
        "IPCTNL_MSG_CT_GET_STATS_CPU",
        "IPCTNL_MSG_CT_GET_STATS",
        "IPCTNL_MSG_EXP_GET_STATS_CPU",
    }
    assert ours == {name: kernel[name] for name in ours}


def test_subsystem_numbers_agree_with_the_header():
    defines = dict(re.findall(r"#define\s+(NFNL_SUBSYS_\w+)\s+(\d+)", uapi("nfnetlink.h")))
    assert int(defines["NFNL_SUBSYS_CTNETLINK"]) == ctnetlink.NFNL_SUBSYS_CTNETLINK == 1
    assert int(defines["NFNL_SUBSYS_CTNETLINK_EXP"]) == ctnetlink.NFNL_SUBSYS_CTNETLINK_EXP == 2


# The kernel's CTA_STATS_CHAIN_TOOLONG is "chaintoolong" in conntrack -S (and our tables).
KERNEL_NAME_EXCEPTIONS = {"chain_toolong": "chaintoolong"}


def test_cpu_stat_names_agree_with_the_header():
    kernel = real_members(parse_enums(uapi("nfnetlink_conntrack.h"))["ctattr_stats_cpu"])
    expected = {}
    for number, name in kernel.items():
        short = name.removeprefix("CTA_STATS_").lower()
        expected[number] = KERNEL_NAME_EXCEPTIONS.get(short, short)
    assert expected == CPU_STAT_NAMES


def test_expect_and_global_stat_attributes_agree_with_the_header():
    enums = parse_enums(uapi("nfnetlink_conntrack.h"))
    expect = real_members(enums["ctattr_expect_stats"])
    expected = {
        n: "expect_" + name.removeprefix("CTA_STATS_EXP_").lower() for n, name in expect.items()
    }
    assert expected == EXPECT_STAT_NAMES
    glob = enums["ctattr_stats_global"]
    assert glob["CTA_STATS_GLOBAL_ENTRIES"] == ctnetlink.CTA_STATS_GLOBAL_ENTRIES
    assert glob["CTA_STATS_GLOBAL_MAX_ENTRIES"] == ctnetlink.CTA_STATS_GLOBAL_MAX_ENTRIES
    # Our hand-written pyroute2 class for the differential test follows the header too.
    assert {n: v for v, (n, _) in enumerate(ExpectStatsCpu.nla_map)} == {
        n: v for n, v in enums["ctattr_expect_stats"].items() if not n.startswith("__")
    }


def test_pyroute2_nla_maps_agree_with_the_header():
    enums = parse_enums(uapi("nfnetlink_conntrack.h"))
    for cls, enum in [
        (pr_nfct.nfct_stats_cpu, "ctattr_stats_cpu"),
        (pr_nfct.nfct_stats, "ctattr_stats_global"),
    ]:
        kernel = {n: v for n, v in enums[enum].items() if not n.startswith("__")}
        assert {name: v for v, (name, _) in enumerate(cls.nla_map)} == kernel, enum


def test_our_tables_agree_with_pyroute2():
    # Runs without the header: pyroute2 is a dependency.
    pyroute2_names = {
        number: name.removeprefix("CTA_STATS_").lower()
        for number, (name, _) in enumerate(pr_nfct.nfct_stats_cpu.nla_map)
        if number
    }
    assert {
        n: KERNEL_NAME_EXCEPTIONS.get(name, name) for n, name in pyroute2_names.items()
    } == CPU_STAT_NAMES
    assert [name for name, _ in pr_nfct.nfct_stats.nla_map][1:] == [
        "CTA_STATS_GLOBAL_ENTRIES",
        "CTA_STATS_GLOBAL_MAX_ENTRIES",
    ]
    assert ctnetlink.IPCTNL_MSG_CT_GET == pr_nfct.IPCTNL_MSG_CT_GET
    assert ctnetlink.IPCTNL_MSG_CT_GET_STATS_CPU == pr_nfct.IPCTNL_MSG_CT_GET_STATS_CPU
    assert ctnetlink.IPCTNL_MSG_CT_GET_STATS == pr_nfct.IPCTNL_MSG_CT_GET_STATS
    assert ctnetlink.NFNL_SUBSYS_CTNETLINK == PR_SUBSYS_CTNETLINK
    assert ctnetlink.NFNL_SUBSYS_CTNETLINK_EXP == PR_SUBSYS_CTNETLINK_EXP


# --- malformed input: NetlinkParseError, and nothing else --------------------------------------


def nlmsg(msg_type: int, payload: bytes, length: int | None = None, seq: int = 1) -> bytes:
    size = NLMSGHDR.size + len(payload) if length is None else length
    return NLMSGHDR.pack(size, msg_type, 0, seq, 0) + payload


def nlattr(attr_type: int, value: bytes, length: int | None = None) -> bytes:
    size = NLATTR.size + len(value) if length is None else length
    raw = NLATTR.pack(size, attr_type) + value
    return raw + b"\0" * (-len(raw) % 4)


def be32(value: int) -> bytes:
    return struct.pack("!I", value)


NFGEN_CPU1 = NFGEN.pack(0, 0, 1)


def only_message(data: bytes) -> Message:
    (msg,) = iter_messages(data, len(data))
    return msg


def test_handmade_reply_parses_so_the_malformed_cases_below_are_meaningful():
    data = nlmsg(CT_GET_STATS_CPU, NFGEN_CPU1 + nlattr(4, be32(7)) + nlattr(9, be32(3)))
    assert parse_cpu_stats(data, only_message(data), CPU_STAT_NAMES) == (
        1,
        {"invalid": 7, "insert_failed": 3},
    )
    data = nlmsg(CT_GET_STATS, NFGEN_CPU1 + nlattr(1, be32(10)) + nlattr(2, be32(99)))
    assert parse_global_stats(data, only_message(data)) == (10, 99)


def test_truncated_message():
    data = nlmsg(CT_GET_STATS_CPU, NFGEN_CPU1 + nlattr(4, be32(7)))[:-3]
    with pytest.raises(NetlinkParseError, match=r"message length 28 at offset 0 does not fit 25"):
        list(iter_messages(data, len(data)))


def test_fewer_bytes_than_a_header():
    with pytest.raises(NetlinkParseError, match=r"10 trailing bytes at offset 0"):
        list(iter_messages(b"\x10" * 10, 10))


@pytest.mark.parametrize("length", [0, 1, 15])
def test_nlmsg_len_shorter_than_its_header(length):
    # nlmsg_len 0 must not loop forever on the same offset.
    data = nlmsg(NLMSG_DONE, be32(0), length=length)
    with pytest.raises(NetlinkParseError, match=rf"message length {length} at offset 0"):
        list(iter_messages(data, len(data)))


def test_nlmsg_len_past_the_end():
    data = nlmsg(NLMSG_DONE, be32(0)) + nlmsg(NLMSG_DONE, be32(0), length=4096)
    with pytest.raises(
        NetlinkParseError, match=r"message length 4096 at offset 20 does not fit 20"
    ):
        list(iter_messages(data, len(data)))


def test_stray_bytes_after_the_last_message():
    data = nlmsg(NLMSG_DONE, be32(0)) + b"\0" * 7
    with pytest.raises(NetlinkParseError, match=r"7 trailing bytes at offset 20"):
        list(iter_messages(data, len(data)))


def test_zero_length_attribute():
    # attribute length 0 must not loop forever either.
    data = nlmsg(CT_GET_STATS_CPU, NFGEN_CPU1 + nlattr(4, be32(7)) + NLATTR.pack(0, 4) + be32(1))
    with pytest.raises(NetlinkParseError, match=r"attribute length 0 at offset 28"):
        parse_cpu_stats(data, only_message(data), CPU_STAT_NAMES)


def test_overlong_attribute():
    data = nlmsg(CT_GET_STATS_CPU, NFGEN_CPU1 + nlattr(4, be32(7), length=200))
    with pytest.raises(
        NetlinkParseError, match=r"attribute length 200 at offset 20 does not fit 8"
    ):
        parse_cpu_stats(data, only_message(data), CPU_STAT_NAMES)


@pytest.mark.parametrize("stray", [b"\0", b"\xab\xcd", b"\0\0\0"])
def test_stray_bytes_after_the_attributes(stray):
    # Padding of an unaligned attribute is consumed with it: anything after is garbage.
    data = nlmsg(CT_GET_STATS_CPU, NFGEN_CPU1 + nlattr(4, be32(7)) + stray)
    with pytest.raises(NetlinkParseError, match=rf"{len(stray)} stray bytes after the attributes"):
        parse_cpu_stats(data, only_message(data), CPU_STAT_NAMES)


def test_alignment_padding_of_an_unaligned_last_attribute_is_fine():
    value = b"\x01\x02\x03"  # 7-byte attribute, padded to 8
    data = nlmsg(CT_GET_STATS_CPU, NFGEN_CPU1 + nlattr(99, value))
    assert len(data) == NLMSGHDR.size + NFGEN.size + 8
    msg = only_message(data)
    assert list(iter_attributes(data, msg.start + 4, msg.end)) == [(99, 24, 27)]
    assert parse_cpu_stats(data, msg, CPU_STAT_NAMES) == (1, {})


@pytest.mark.parametrize("value", [b"", b"\0\0\0", b"\0\0\0\0\0\0\0\x07"])
def test_counter_attribute_that_is_not_four_bytes(value):
    data = nlmsg(CT_GET_STATS_CPU, NFGEN_CPU1 + nlattr(4, value))
    with pytest.raises(NetlinkParseError, match=rf"expected a 4-byte counter, got {len(value)}"):
        parse_cpu_stats(data, only_message(data), CPU_STAT_NAMES)
    data = nlmsg(CT_GET_STATS, NFGEN_CPU1 + nlattr(1, value) + nlattr(2, be32(1)))
    with pytest.raises(NetlinkParseError, match=rf"expected a 4-byte counter, got {len(value)}"):
        parse_global_stats(data, only_message(data))


@pytest.mark.parametrize("present", [(), (1,), (2,), (1, 3)])
def test_global_stats_reply_missing_an_attribute(present):
    data = nlmsg(CT_GET_STATS, NFGEN_CPU1 + b"".join(nlattr(t, be32(5)) for t in present))
    with pytest.raises(NetlinkParseError, match=r"lacks entries or max entries"):
        parse_global_stats(data, only_message(data))


@pytest.mark.parametrize("parse", ["cpu", "global"])
def test_ctnetlink_message_shorter_than_nfgenmsg(parse):
    data = nlmsg(CT_GET_STATS_CPU, b"\0\0")
    msg = only_message(data)
    with pytest.raises(NetlinkParseError, match=r"shorter than its nfgenmsg header"):
        if parse == "cpu":
            parse_cpu_stats(data, msg, CPU_STAT_NAMES)
        else:
            parse_global_stats(data, msg)


def test_empty_done_is_success():
    # Older kernels end a dump with an NLMSG_DONE that carries no errno.
    data = nlmsg(NLMSG_DONE, b"")
    assert error_code(data, only_message(data)) == 0


def test_done_and_error_carry_errno():
    data = nlmsg(NLMSG_ERROR, struct.pack("=i", -1) + bytes(16))
    assert error_code(data, only_message(data)) == 1  # EPERM, as without CAP_NET_ADMIN
    data = nlmsg(NLMSG_DONE, struct.pack("=i", -4))
    assert error_code(data, only_message(data)) == 4


@pytest.mark.parametrize("payload", [b"", b"\0\0\0"])
def test_nlmsg_error_too_short(payload):
    data = nlmsg(NLMSG_ERROR, payload)
    with pytest.raises(NetlinkParseError, match=r"message type 2 too short for an error code"):
        error_code(data, only_message(data))


def test_attribute_flag_bits_are_not_part_of_the_type():
    nla_f_net_byteorder = 0x4000
    data = nlmsg(CT_GET_STATS_CPU, NFGEN_CPU1 + nlattr(4 | nla_f_net_byteorder, be32(9)))
    assert parse_cpu_stats(data, only_message(data), CPU_STAT_NAMES).counters == {"invalid": 9}


# --- robustness: every input gives a result or NetlinkParseError --------------------------------


def decode_everything(data: bytes | bytearray) -> list:
    """Run every parser on every message; only NetlinkParseError may escape from inside."""
    outcomes = []

    def attempt(function, *args) -> None:
        try:
            outcomes.append(function(*args))
        except NetlinkParseError as exc:
            outcomes.append(("error", str(exc)))

    for msg in iter_messages(data, len(data)):
        assert NLMSGHDR.size <= msg.start <= msg.end <= len(data)
        attempt(error_code, data, msg)
        attempt(lambda m: list(iter_attributes(data, m.start, m.end)), msg)
        attempt(parse_global_stats, data, msg)
        attempt(parse_cpu_stats, data, msg, CPU_STAT_NAMES)
        attempt(parse_cpu_stats, data, msg, EXPECT_STAT_NAMES)
    return outcomes


def decodes(data: bytes | bytearray) -> bool:
    try:
        decode_everything(data)
    except NetlinkParseError:
        return False
    return True


ALL_FIXTURE_BYTES = [fixture(name) for name in FILES]


def message_boundaries(data: bytes) -> set[int]:
    return {m.start - NLMSGHDR.size for m in iter_messages(data, len(data))} | {len(data)}


@pytest.mark.parametrize("name", FILES)
def test_truncation_at_every_offset(name):
    data = fixture(name)
    boundaries = message_boundaries(data)
    for cut in range(len(data) + 1):
        # A prefix ending on a message boundary is a valid, shorter stream; any other cut
        # leaves a message that does not fit its bytes.
        assert decodes(data[:cut]) == (cut in boundaries), cut


@pytest.mark.parametrize("name", FILES)
def test_every_single_bit_flip(name):
    data = fixture(name)
    for position in range(len(data)):
        for bit in range(8):
            mutated = bytearray(data)
            mutated[position] ^= 1 << bit
            decodes(mutated)


@settings(max_examples=300)
@given(st.binary(max_size=512))
def test_arbitrary_bytes(data):
    decodes(data)


@settings(max_examples=300)
@given(
    st.sampled_from(ALL_FIXTURE_BYTES),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), min_size=1, max_size=8),
    st.integers(0, 10_000),
)
def test_mutated_fixtures(data, flips, cut):
    mutated = bytearray(data)
    for position, mask in flips:
        mutated[position % len(mutated)] ^= mask
    decodes(mutated[: cut % (len(mutated) + 1)])


@st.composite
def plausible_messages(draw) -> bytes:
    """Well-framed-looking messages whose length fields may lie: reaches the attribute code."""
    out = b""
    for _ in range(draw(st.integers(1, 3))):
        attributes = b""
        for _ in range(draw(st.integers(0, 6))):
            value = draw(st.binary(max_size=9))
            length = draw(st.one_of(st.just(None), st.integers(0, 40)))
            attributes += nlattr(draw(st.integers(0, 0xFFFF)), value, length)
        attributes += draw(st.binary(max_size=3))
        payload = draw(st.binary(min_size=0, max_size=4)) + attributes
        length = draw(st.one_of(st.just(None), st.integers(0, len(payload) + 40)))
        msg_type = draw(st.sampled_from([NLMSG_ERROR, NLMSG_DONE, CT_GET_STATS, CT_GET_STATS_CPU]))
        out += nlmsg(msg_type, payload, length)
        out += b"\0" * (-len(out) % 4)
    return out


@settings(max_examples=300)
@given(plausible_messages())
def test_plausible_but_lying_messages(data):
    decodes(data)
