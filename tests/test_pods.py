"""The pods collector's bounds and lifecycle over a fixture procfs tree.

tests/fixtures/procfs/pods/: the exporter's own process (pid 1, `self`), a web pod of two
processes sharing one namespace (100, 101), a CoreDNS pod (200, besteffort, cgroupfs driver,
conntrack unused) and a podman container (300); `net` of each pid is a symlink to its
namespace's directory, so processes of one namespace share the key file's inode. logs/ holds
the kubelet's pod-log directories of the two pods. The real kernel: tests/test_kernel_pods.py.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
from pathlib import Path

import pytest

from conntrack_exporter.collectors.pods import PodsCollector, PodsOptions
from conntrack_exporter.pod_addresses import PodAddressBook
from conntrack_exporter.procfs import ProcFS
from conntrack_exporter.registry import NoDataError
from tests.collectors import context, exposition
from tests.metrics import parse_samples, value

ROOT = Path(__file__).parent / "fixtures" / "procfs" / "pods"
WEB = (("namespace", "team-a"), ("pod", "web-1"))
DNS = (("namespace", "kube-system"), ("pod", "coredns-7db6d8ff4d-x2x9q"))
PODMAN = (("cgroup", "/machine.slice/libpod-" + "d" * 64 + ".scope"),)


def pods(**options: object) -> PodsCollector:
    return PodsCollector(PodsOptions(pod_logs_path=str(ROOT / "logs"), **options), context(ROOT))


def reported(samples: dict) -> set[tuple]:
    """Whose namespaces are reported: the labels of socket_allocated but the host's."""
    return {key for key in samples["socket_allocated"] if key}


def scanned(collector: PodsCollector) -> dict:
    collector.scan()
    return parse_samples(exposition(collector))


def test_every_namespace_but_the_exporters_own_is_reported_once():
    samples = scanned(pods())
    assert reported(samples) == {WEB, DNS, PODMAN}
    assert value(samples, "conntrack_exporter_pod_namespaces") == 3
    assert value(samples, "conntrack_exporter_pod_namespaces_skipped") == 0
    # Conntrack where the namespace's stat file is not all zeros: the web pod only.
    assert set(samples["conntrack_entries"]) == {WEB}


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"include_namespaces": ("team-a",)}, {WEB}),
        ({"exclude_namespaces": ("kube-system",)}, {WEB, PODMAN}),
        ({"include_namespaces": ("team-a", "kube-system"), "exclude_namespaces": ("team-a",)},
         {DNS}),
    ],
)  # fmt: skip
def test_kubernetes_namespaces_included_and_excluded(options, expected):
    assert reported(scanned(pods(**options))) == expected


def test_past_max_namespaces_the_rest_is_counted_and_logged_once(caplog):
    collector = pods(max_namespaces=1)
    caplog.set_level(logging.WARNING)
    first = scanned(collector)
    second = scanned(collector)
    for samples in (first, second):
        assert reported(samples) == {WEB}  # the oldest: the lowest pid
        assert value(samples, "conntrack_exporter_pod_namespaces_skipped") == 2
    assert [r.getMessage() for r in caplog.records] == [
        "pod discovery: 2 network namespaces past max_namespaces"
    ]


def test_before_the_first_discovery_there_is_no_data_but_the_error_counts():
    collector = pods()
    with pytest.raises(NoDataError, match="no pod discovery has finished yet"):
        collector.collect()
    samples = parse_samples(exposition(collector))
    assert value(samples, "conntrack_exporter_collector_success", collector="pods") == 0
    assert set(samples["conntrack_exporter_pod_discovery_errors_total"].values()) == {0}


def test_an_unreadable_pod_log_directory_is_counted_and_pods_go_by_uid(tmp_path):
    collector = PodsCollector(PodsOptions(pod_logs_path=str(tmp_path / "absent")), context(ROOT))
    samples = scanned(collector)
    assert (("pod_uid", "0f9b2c4e-5d6a-4e7b-8c9d-0a1b2c3d4e5f"),) in reported(samples)
    assert value(samples, "conntrack_exporter_pod_discovery_errors_total", reason="pod_logs") == 0
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a directory should be")
    collector = PodsCollector(PodsOptions(pod_logs_path=str(blocked)), context(ROOT))
    samples = scanned(collector)
    assert value(samples, "conntrack_exporter_pod_discovery_errors_total", reason="pod_logs") == 1


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_close_closes_every_namespaces_files():
    before = open_fds()
    collector = pods()
    scanned(collector)
    assert open_fds() > before  # the namespaces' files, held open between scrapes
    collector.close()
    assert open_fds() == before


def test_a_pods_name_found_later_labels_every_series_from_the_next_pass(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    collector = PodsCollector(PodsOptions(pod_logs_path=str(logs)), context(ROOT))
    web_uid = (("pod_uid", "0f9b2c4e-5d6a-4e7b-8c9d-0a1b2c3d4e5f"),)
    assert web_uid in reported(scanned(collector))
    shutil.copytree(ROOT / "logs", logs, dirs_exist_ok=True)
    samples = scanned(collector)
    assert reported(samples) == {WEB, DNS, PODMAN}
    # The samples with labels of their own too (socket_inuse's family and protocol, the UDP
    # counters' family) carry the new names, and nothing carries the uid any more.
    for name in ("socket_inuse", "socket_udp_in_errors_total"):
        web = [dict(key) for key in samples[name] if set(WEB) <= set(key)]
        assert web and all("family" in labels for labels in web), name
    assert not [key for series in samples.values() for key in series if "pod_uid" in dict(key)]


def test_a_namespace_that_starts_using_conntrack_is_reported_at_the_next_scrape(tmp_path):
    # A copy of the tree, so that the DNS pod's all-zero stat file can change under its fd.
    root = tmp_path / "procfs"
    shutil.copytree(ROOT, root, symlinks=True)
    collector = PodsCollector(PodsOptions(pod_logs_path=str(root / "logs")), context(root))
    stat = root / "netns" / "dns" / "stat" / "nf_conntrack"
    idle = stat.read_text()
    assert set(scanned(collector)["conntrack_entries"]) == {WEB}
    assert set(parse_samples(exposition(collector))["conntrack_entries"]) == {WEB}
    lines = idle.splitlines()
    stat.write_text("\n".join([lines[0], *(line.replace("0", "1", 8) for line in lines[1:])]))
    samples = parse_samples(exposition(collector))
    assert set(samples["conntrack_entries"]) == {WEB, DNS}
    assert value(samples, "conntrack_entries", **dict(DNS)) == 0x11111111
    stat.write_text(idle)
    assert set(parse_samples(exposition(collector))["conntrack_entries"]) == {WEB}


def test_a_namespaces_pod_is_read_again_only_when_its_first_process_changes(tmp_path, monkeypatch):
    root = tmp_path / "procfs"
    shutil.copytree(ROOT, root, symlinks=True)
    collector = PodsCollector(PodsOptions(pod_logs_path=str(root / "logs")), context(root))
    reads: list[str] = []
    read_text = ProcFS.read_text

    def counted(self: ProcFS, relative: str) -> str:
        reads.append(relative)
        return read_text(self, relative)

    monkeypatch.setattr(ProcFS, "read_text", counted)
    collector.scan()
    assert sorted(reads) == ["100/cgroup", "200/cgroup", "300/cgroup"]
    reads.clear()
    collector.scan()
    # The pods' namespaces are known by their first process; the podman container, which
    # names no pod, is looked at again at every pass.
    assert reads == ["300/cgroup"]
    shutil.rmtree(root / "100")  # the web pod's first process exits: 101 is its first now
    reads.clear()
    samples = scanned(collector)
    assert sorted(reads) == ["101/cgroup", "300/cgroup"]
    assert reported(samples) == {WEB, DNS, PODMAN}


# -- the pods' addresses, for the table collector ---------------------------------------------


def book_after_scan(root: Path, **options: object) -> tuple[PodsCollector, PodAddressBook]:
    book = PodAddressBook()
    collector = PodsCollector(
        PodsOptions(pod_logs_path=str(root / "logs"), **options), context(root, pod_addresses=book)
    )
    collector.scan()
    return collector, book


def address_key(text: str) -> int:
    address = ipaddress.ip_address(text)
    return int(address) << 1 | (address.version == 6)


def test_each_pods_addresses_are_published_and_other_namespaces_name_nothing():
    collector, book = book_after_scan(ROOT)
    collector.close()
    addresses = book.current
    assert addresses.pods == (dict(WEB), dict(DNS))  # the podman container is no pod
    named = {address: addresses.pods[pod] for address, pod in addresses.pod_of.items()}
    assert named == {
        address_key("10.71.1.2"): dict(WEB),
        address_key("10.71.1.3"): dict(DNS),
        address_key("fd00:71:1::3"): dict(DNS),
    }


def test_the_addresses_follow_the_options_bounds():
    collector, book = book_after_scan(ROOT, exclude_namespaces=("kube-system",))
    collector.close()
    assert book.current.pods == (dict(WEB),)


def test_a_garbled_address_file_is_a_parse_error_for_that_pod_alone(tmp_path):
    root = tmp_path / "procfs"
    shutil.copytree(ROOT, root, symlinks=True)
    (root / "netns" / "dns" / "if_inet6").write_text("not an if_inet6 line\n")
    collector, book = book_after_scan(root)
    samples = parse_samples(exposition(collector))
    collector.close()
    assert value(samples, "conntrack_exporter_pod_discovery_errors_total", reason="parse") == 1
    addresses = book.current
    assert addresses.pods == (dict(WEB), dict(DNS))  # numbered, with no address
    assert [addresses.pods[pod] for pod in addresses.pod_of.values()] == [dict(WEB)]


def test_an_address_given_after_the_namespace_appeared_is_found_at_the_next_pass(tmp_path):
    """A pod's namespace has its processes before the CNI gives it an address: the files
    are read again at every pass, on the fds held since the first."""
    root = tmp_path / "procfs"
    shutil.copytree(ROOT, root, symlinks=True)
    fib_trie = root / "netns" / "web" / "fib_trie"
    given = fib_trie.read_text()
    fib_trie.write_text("")
    collector, book = book_after_scan(root)
    assert address_key("10.71.1.2") not in book.current.pod_of
    fib_trie.write_text(given)
    collector.scan()
    collector.close()
    assert book.current.labels_of(address_key("10.71.1.2")) == dict(WEB)


def test_a_pods_second_namespace_makes_no_duplicate_series(tmp_path):
    """A pod's sandbox recreated: for a moment two namespaces (the new one found first: a
    lower pid) name the same pod. The one reported already stays until its processes are
    gone, then the new one is the pod's."""
    root = tmp_path / "procfs"
    shutil.copytree(ROOT, root, symlinks=True)
    shutil.copytree(root / "netns" / "web", root / "netns" / "web2")
    (root / "netns" / "web2" / "sockstat").write_text(
        (root / "netns" / "web2" / "sockstat")
        .read_text()
        .replace("sockets: used 15", "sockets: used 99")
    )
    collector = PodsCollector(PodsOptions(pod_logs_path=str(root / "logs")), context(root))
    assert value(scanned(collector), "socket_allocated", **dict(WEB)) == 15
    new = root / "50"
    new.mkdir()
    (new / "net").symlink_to("../netns/web2")
    shutil.copy(root / "100" / "cgroup", new / "cgroup")
    collector.scan()
    text = exposition(collector)  # parse_samples would hide a duplicate
    assert text.count('socket_allocated{namespace="team-a",pod="web-1"}') == 1
    assert value(parse_samples(text), "socket_allocated", **dict(WEB)) == 15
    for old in ("100", "101"):
        shutil.rmtree(root / old)
    assert value(scanned(collector), "socket_allocated", **dict(WEB)) == 99
    collector.close()
