"""Pure tests of pod_identity: identify() on captured /proc/PID/cgroup files and on
lines built here in the kernel's format, and the pod-log directory names. No root needed."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conntrack_exporter.pod_identity import (
    Cgroup,
    Pod,
    PodName,
    identify,
    parse_pod_log_dirs,
    read_pod_log_dirs,
)

FIXTURES = Path(__file__).parent / "fixtures" / "cgroup"
CAPTURED = FIXTURES / "captured"
# Made by tests/fixtures/cgroup/capture.py: where each process was placed and what its file
# must be identified as (see the README there).
CAPTURE = json.loads((CAPTURED / "expected.json").read_text())["files"]
UID = "0b7632a2-a56e-4278-987a-22de18008dbe"
CID = "0bc5eac79e3ae7a0c2651f14722aa10fa333eb2325c2ca97da33aa284cda81b0"
STATIC_UID = "487a0dc6dccaeefbcfedba7a7ce1ca18"  # a static pod's: the MD5 of its manifest


def expectation(expect: dict | None) -> Pod | Cgroup | None:
    if expect is None:
        return None
    if "pod_uid" in expect:
        return Pod(expect["pod_uid"], expect["container"])
    return Cgroup(expect["cgroup"])


# --- captured on this machine ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CAPTURE))
def test_captured_file_identifies_as_placed(name):
    text = (CAPTURED / name).read_text()
    assert identify(text, name) == expectation(CAPTURE[name]["expect"])


def v2_path(text: str) -> str:
    return next(line[3:] for line in text.splitlines() if line.startswith("0::"))


def v1_paths(text: str) -> set[str]:
    return {
        line.split(":", 2)[2]
        for line in text.splitlines()
        if not line.startswith("0::") and ":memory:" not in line and ":cpuset:" not in line
    }


def test_captured_files_have_the_shapes_their_cases_claim():
    # Each case tests what its name says only if the file has that shape: a hybrid file, the
    # pod on one hierarchy only, relative paths from the private namespace.
    files = {name: (CAPTURED / name).read_text() for name in CAPTURE}
    assert len(files) >= 36
    for name, text in files.items():
        lines = text.splitlines()
        assert text.endswith("\n") and lines[-1].startswith("0::"), name
        assert len(lines) > 1, name  # a hybrid host: the v1 hierarchies' lines too
        placed = CAPTURE[name]
        if name.endswith("-self"):
            assert v2_path(text) == "/", name
        elif name.startswith("private-"):
            assert v2_path(text).startswith("/.."), name
        elif placed["v2_path"] is not None:
            assert v2_path(text) == placed["v2_path"], name
        if name.endswith("-v2-only"):
            assert v1_paths(text) == {"/"}, name
        if name.endswith("-v1-only"):
            assert v2_path(text) == "/", name
            assert v1_paths(text) == {placed["v1_path"]}, name
    assert v2_path(files["private-systemd-other-qos"]).startswith(
        "/../../../kubepods-besteffort.slice/kubepods-besteffort-pod"
    )
    assert v2_path(files["private-cgroupfs-same-qos"]).startswith("/../../pod")
    assert ":cri-containerd:" in v2_path(files["driver-mismatch-colons"])
    assert set(files["host-self"].splitlines()) == set(files["private-systemd-self"].splitlines())


def test_captured_cases_cover_every_kind_of_answer():
    answers = [CAPTURE[name]["expect"] for name in CAPTURE]
    assert any(a and a.get("container") for a in answers)  # a pod's container
    assert any(a and "pod_uid" in a and a["container"] is None for a in answers)  # conmon
    assert any(a and "cgroup" in a for a in answers)
    assert any(a is None for a in answers)


# --- other machines' files -------------------------------------------------------------------

# --- the kubelet's layouts, built here in the kernel's format (made up, not captured) ---------

QOS = ("guaranteed", "burstable", "besteffort")
# A runtime's container cgroup name under each driver, from its id.
RUNTIMES = {
    "containerd": ("cri-containerd-{}.scope", "{}"),
    "crio": ("crio-{}.scope", "crio-{}"),
    "docker": ("docker-{}.scope", "{}"),
}


def systemd_path(qos: str, uid: str, container: str) -> str:
    slice_uid = uid.replace("-", "_")
    if qos == "guaranteed":
        return f"/kubepods.slice/kubepods-pod{slice_uid}.slice/{container}"
    return f"/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{slice_uid}.slice/{container}"


def cgroupfs_path(qos: str, uid: str, container: str) -> str:
    if qos == "guaranteed":
        return f"/kubepods/pod{uid}/{container}"
    return f"/kubepods/{qos}/pod{uid}/{container}"


def kubelet_path(driver: str, qos: str, runtime: str, uid: str, cid: str) -> str:
    if driver == "systemd":
        return systemd_path(qos, uid, RUNTIMES[runtime][0].format(cid))
    return cgroupfs_path(qos, uid, RUNTIMES[runtime][1].format(cid))


def v1_file(path: str, unified: str | None = "/") -> str:
    """A hybrid host's file (unified None: a v1-only host's), the path on every v1 hierarchy."""
    controllers = ("cpuset", "cpu,cpuacct", "blkio", "memory", "devices", "pids", "name=systemd")
    lines = [f"{len(controllers) - n}:{c}:{path}" for n, c in enumerate(controllers)]
    if unified is not None:
        lines.append(f"0::{unified}")
    return "\n".join(lines) + "\n"


MATRIX = [
    (driver, qos, runtime)
    for driver in ("systemd", "cgroupfs")
    for qos in QOS
    for runtime in RUNTIMES
]


@pytest.mark.parametrize(("driver", "qos", "runtime"), MATRIX)
def test_kubelet_layouts_on_every_hierarchy_layout(driver, qos, runtime):
    path = kubelet_path(driver, qos, runtime, UID, CID)
    expected = Pod(UID, CID)
    assert identify(f"0::{path}\n") == expected  # cgroup v2 only
    assert identify(v1_file(path, unified=None)) == expected  # cgroup v1 only
    assert identify(v1_file(path, unified=path)) == expected  # hybrid, both
    assert identify(v1_file(path, unified="/")) == expected  # hybrid, the pod on v1 alone


@pytest.mark.parametrize(("driver", "qos", "runtime"), MATRIX)
def test_kubelet_layouts_seen_from_a_private_cgroup_namespace(driver, qos, runtime):
    # The exporter's own container: a burstable pod's, under the same driver.
    exporter_uid = str(uuid.uuid4())
    exporter = kubelet_path(driver, "burstable", "containerd", exporter_uid, "e" * 64)
    target = kubelet_path(driver, qos, runtime, UID, CID)
    relative = os.path.relpath(target, exporter)  # what the kernel prints, after its "/"
    assert relative.startswith("..")
    assert identify(f"0::/{relative}\n") == Pod(UID, CID)
    assert identify(v1_file(f"/{relative}", unified=None)) == Pod(UID, CID)


def test_systemd_slice_names_write_the_uid_with_underscores():
    path = systemd_path("burstable", UID, f"cri-containerd-{CID}.scope")
    assert "pod0b7632a2_a56e_4278_987a_22de18008dbe.slice" in path
    assert identify(f"0::{path}\n") == Pod(UID, CID)
    # cgroupfs writes it with dashes, and the slice name with dashes is not the kubelet's
    assert identify(f"0::{cgroupfs_path('burstable', UID, CID)}\n") == Pod(UID, CID)
    dashed = f"/kubepods.slice/kubepods-burstable-pod{UID}.slice/cri-containerd-{CID}.scope"
    assert identify(f"0::{dashed}\n") == Cgroup(dashed)


@pytest.mark.parametrize(
    "path",
    [
        systemd_path("burstable", UID, f"crio-conmon-{CID}.scope"),
        cgroupfs_path("besteffort", UID, f"crio-conmon-{CID}"),
        systemd_path("besteffort", UID, "").rstrip("/"),  # the pod's own cgroup
        cgroupfs_path("guaranteed", UID, "").rstrip("/"),
        systemd_path("burstable", UID, "crio-notanid.scope"),
        cgroupfs_path("burstable", UID, CID[:12]),  # not a 64-digit id
        cgroupfs_path("burstable", UID, CID.upper()),
    ],
)
def test_a_process_of_the_pod_but_of_no_known_container(path):
    assert identify(f"0::{path}\n") == Pod(UID, None)


@pytest.mark.parametrize(
    "path",
    [
        systemd_path("burstable", UID, f"crio-{CID}.scope/container"),
        cgroupfs_path("besteffort", UID, f"{CID}/kube-proxy"),
        "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
        f"kubelet-kubepods-besteffort-pod{UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope",
        # kind on podman: the node container's own cgroup first
        f"/machine.slice/libpod-{'a' * 64}.scope/container/kubelet.slice/kubelet-kubepods.slice/"
        f"kubelet-kubepods-pod{UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope",
        f"/system.slice/containerd.service/kubepods-burstable-pod{UID.replace('-', '_')}.slice"
        f":cri-containerd:{CID}",
    ],
)
def test_a_container_below_other_cgroups_or_above_its_processes(path):
    assert identify(f"0::{path}\n") == Pod(UID, CID)


def test_static_pods_have_md5_uids():
    path = systemd_path("burstable", STATIC_UID, f"crio-{CID}.scope")
    assert identify(f"0::{path}\n") == Pod(STATIC_UID, CID)
    assert identify(f"0::{cgroupfs_path('burstable', STATIC_UID, CID)}\n") == Pod(STATIC_UID, CID)


@pytest.mark.parametrize(
    "uid",
    [
        UID.upper(),  # the API server writes lower case
        UID[:-1],
        UID + "0",
        UID.replace("-", "")[:-1] + "g",  # 32 digits would be a static pod's, but hex ones
        "g" + UID[1:],
        UID[:8] + UID[9] + "-" + UID[10:],  # a dash out of its place
        STATIC_UID[:-1],
        "",
    ],
)
def test_a_pod_directory_without_a_uid_is_not_a_pod(uid):
    for path in (
        systemd_path("burstable", uid, f"cri-containerd-{CID}.scope"),
        cgroupfs_path("burstable", uid, CID),
    ):
        assert identify(f"0::{path}\n") == Cgroup(path)


@pytest.mark.parametrize(
    "path",
    [
        f"/system.slice/docker-{CID}.scope",
        f"/machine.slice/libpod-{CID}.scope/container",
        f"/machine.slice/machine-libpod_pod_{CID}.slice/libpod-{CID}.scope",  # a podman pod
        "/user.slice/user-1000.slice/user@1000.service/app.slice/podman.service",
        "/user.slice/user-1000.slice/session-3.scope",
        "/system.slice/foo.service",
        f"/docker/{CID}",
        # "pod" components that are not the kubelet's
        f"/kubepods.slice/other-pod{UID.replace('-', '_')}.slice/x.scope",
        f"/kubepods.slice/notkubepods-pod{UID.replace('-', '_')}.slice/x.scope",
        "/kubepods.slice/kubepods-burstable.slice",  # the QoS class's own cgroup
    ],
)
def test_outside_kubernetes_the_cgroup_is_the_answer(path):
    assert identify(f"0::{path}\n") == Cgroup(path)
    assert identify(v1_file(path, unified=path)) == Cgroup(path)
    # from a private cgroup namespace, the same path without its "/.." steps
    assert identify(f"0::/../../..{path}\n") == Cgroup(path)


def test_a_cgroupfs_pod_directory_needs_the_kubelets_parent_or_a_namespace_root_above():
    assert identify(f"0::/pod{UID}/{CID}\n") == Cgroup(f"/pod{UID}/{CID}")
    assert identify(f"0::/system.slice/pod{UID}/{CID}\n") == Cgroup(f"/system.slice/pod{UID}/{CID}")
    # Seen from a pod of the same QoS class, the kubepods and QoS parents are cut off.
    assert identify(f"0::/../../pod{UID}/{CID}\n") == Pod(UID, CID)
    assert identify(f"0::/kubelet/kubepods/burstable/pod{UID}/{CID}\n") == Pod(UID, CID)


@pytest.mark.parametrize("path", ["/", "/..", "/../..", "/../../../.."])
def test_a_root_says_nothing(path):
    assert identify(f"0::{path}\n") is None
    assert identify(v1_file(path, unified=None)) is None
    assert identify(v1_file(path, unified=path)) is None


def test_only_leading_parent_steps_are_taken_off():
    assert identify("0::/..foo/bar\n") == Cgroup("/..foo/bar")
    assert identify("0::/../a/../b\n") == Cgroup("/a/../b")


def test_the_v2_line_wins_when_it_names_a_pod():
    other = str(uuid.uuid4())
    v1 = cgroupfs_path("besteffort", other, "f" * 64)
    v2 = systemd_path("burstable", UID, f"cri-containerd-{CID}.scope")
    assert identify(v1_file(v1, unified=v2)) == Pod(UID, CID)


def test_a_v1_line_names_the_pod_when_the_v2_line_does_not():
    v1 = cgroupfs_path("besteffort", UID, CID)
    assert identify(v1_file(v1, unified="/system.slice/containerd.service")) == Pod(UID, CID)
    # on one v1 hierarchy only, the others at their roots
    text = f"3:memory:/\n2:pids:{v1}\n1:name=systemd:/\n0::/\n"
    assert identify(text) == Pod(UID, CID)


def test_outside_kubernetes_v2_then_systemd_then_the_other_v1_hierarchies():
    assert identify("2:pids:/p\n1:name=systemd:/s\n0::/u\n") == Cgroup("/u")
    # A v1 host on which something mounted cgroup2 shows everything at "0::/".
    assert identify("2:pids:/p\n1:name=systemd:/s\n0::/\n") == Cgroup("/s")
    assert identify("3:cpu:/\n2:pids:/p\n1:name=systemd:/\n0::/\n") == Cgroup("/p")
    assert identify("3:cpu:/../..\n2:pids:/../../p\n0::/..\n") == Cgroup("/p")


def test_without_a_final_newline_or_with_colons_in_the_path():
    path = systemd_path("besteffort", UID, f"docker-{CID}.scope")
    assert identify(f"0::{path}") == Pod(UID, CID)
    assert identify("0::/a:b:c\n") == Cgroup("/a:b:c")
    assert identify("1:name=systemd:/x:y\n") == Cgroup("/x:y")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"^/proc/42/cgroup is empty$"),
        ("\n", r"line 1 is not 'hierarchy-ID:controller-list:/path': ''"),
        ("0:/\n", r"line 1 .*'0:/'"),
        ("0\n", r"line 1 .*'0'"),
        ("x::/\n", r"line 1 .*'x::/'"),
        ("-1::/\n", r"line 1"),
        (" 0::/\n", r"line 1"),
        ("0::relative\n", r"line 1 .*'0::relative'"),
        ("0::\n", r"line 1"),
        ("1:cpu:/\n\n0::/\n", r"line 2 .*''"),
        ("1:cpu:/\n0::/\ngarbage", r"line 3 .*'garbage'"),
        ("0::/k\u00e9\n", r"not ASCII"),
        ("\u0661::/\n", r"not ASCII"),  # an Arabic-Indic digit one
        ("TCP: inuse 3 orphan 0 tw 0 alloc 5 mem 1\n", r"line 1"),  # another /proc file
        ("0::/" + "x" * 500 + "\nbad\n", r"line 2 .*'bad'$"),
    ],
)
def test_text_that_is_not_a_cgroup_file_names_the_problem_and_its_source(text, message):
    with pytest.raises(ValueError, match=message) as raised:
        identify(text, "/proc/42/cgroup")
    assert str(raised.value).startswith("/proc/42/cgroup")


def test_a_bad_line_after_a_pod_still_fails():
    # One pass over every line: an answer found early does not skip the rest's checks.
    path = cgroupfs_path("burstable", UID, CID)
    with pytest.raises(ValueError, match="line 2"):
        identify(f"0::{path}\nnot a line\n")


def test_long_lines_are_cut_short_in_the_message():
    with pytest.raises(ValueError) as raised:
        identify("x" * 10_000)
    assert len(str(raised.value)) < 200


# --- properties ------------------------------------------------------------------------------

ALL_FIXTURES = sorted(CAPTURED / name for name in CAPTURE)
# A path component: printable ASCII but "/" (cgroup names may hold ":" and spaces).
COMPONENT = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="/"),
    min_size=1,
    max_size=20,
)
PATHS = st.lists(COMPONENT, max_size=6).map(lambda parts: "/" + "/".join(parts))
V1_LINES = st.tuples(
    st.integers(1, 15),
    st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz_=,"), max_size=20),
    PATHS,
).map(lambda t: f"{t[0]}:{t[1]}:{t[2]}")


def well_formed_files() -> st.SearchStrategy[str]:
    v2 = PATHS.map(lambda path: f"0::{path}")
    return (
        st.tuples(st.lists(V1_LINES, max_size=12), st.one_of(st.none(), v2))
        .map(lambda t: "\n".join([*t[0], *([t[1]] if t[1] else [])]) + "\n")
        .filter(lambda text: text != "\n")
    )


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(well_formed_files())
def test_a_well_formed_file_never_raises(text):
    result = identify(text)
    assert result is None or isinstance(result, Pod | Cgroup)


@settings(max_examples=300)
@given(st.lists(V1_LINES, max_size=12), st.sampled_from(MATRIX), st.integers(0, 5))
def test_a_pod_on_the_v2_line_wins_over_any_v1_lines(v1_lines, case, depth):
    driver, qos, runtime = case
    path = kubelet_path(driver, qos, runtime, UID, CID)
    text = "\n".join([*v1_lines, f"0::{'/..' * depth}{path}"]) + "\n"
    assert identify(text) == Pod(UID, CID)


@settings(max_examples=500)
@given(st.text(max_size=400))
def test_arbitrary_text_raises_only_value_error(text):
    try:
        result = identify(text)
    except ValueError:
        return
    assert result is None or isinstance(result, Pod | Cgroup)


def mutated(seed: bytes, cut: int, edits: list[tuple[int, int]]) -> str:
    data = bytearray(seed[:cut] if cut else seed)
    for position, byte in edits:
        if data:
            data[position % len(data)] = byte
    return data.decode("latin-1")


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(ALL_FIXTURES),
    st.integers(0, 4096),
    st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=8),
)
def test_mutated_fixtures_raise_only_value_error(path, cut, edits):
    text = mutated(path.read_bytes(), cut, edits)
    try:
        result = identify(text)
    except ValueError:
        return
    assert result is None or isinstance(result, Pod | Cgroup)


@settings(max_examples=300)
@given(st.sampled_from(ALL_FIXTURES), st.data())
def test_fixtures_cut_at_a_line_end_still_parse(path, data):
    # Any non-empty run of a real file's lines is itself a well-formed file.
    lines = path.read_text().splitlines(keepends=True)
    start = data.draw(st.integers(0, len(lines) - 1))
    end = data.draw(st.integers(start + 1, len(lines)))
    identify("".join(lines[start:end]))


# --- pod-log directories ---------------------------------------------------------------------


def test_pod_log_directory_names():
    names = [
        f"kube-system_coredns-5d78c9869d-8xk2p_{UID}",
        f"default_web.example-0_{STATIC_UID}",  # a pod name may hold dots; a static pod's uid
        f"{'n' * 63}_{'p' * 253}_11111111-2222-3333-4444-555555555555",
    ]
    assert parse_pod_log_dirs(names) == {
        UID: PodName("kube-system", "coredns-5d78c9869d-8xk2p"),
        STATIC_UID: PodName("default", "web.example-0"),
        "11111111-2222-3333-4444-555555555555": PodName("n" * 63, "p" * 253),
    }


@pytest.mark.parametrize(
    "name",
    [
        f"default_web_{UID}_extra",  # too many parts
        f"default_web-{UID}",  # too few
        f"web_{UID}",
        UID,
        f"default__{UID}",  # an empty pod name
        f"_web_{UID}",
        "default_web_",
        f"default_web_{UID.upper()}",  # bad uids
        f"default_web_{UID[:-1]}",
        f"default_web_{UID.replace('-', '_')}",
        "default_web_not-a-uid",
        f"Default_web_{UID}",  # bad namespaces: upper case, a dot, a dash at an end, too long
        f"kube.system_web_{UID}",
        f"-default_web_{UID}",
        f"default-_web_{UID}",
        f"{'n' * 64}_web_{UID}",
        f"default_Web_{UID}",  # bad pod names
        f"default_web._{UID}",
        f"default_.web_{UID}",
        f"default_web..x_{UID}",
        f"default_{'p' * 254}_{UID}",
        f"default_w\u00e9b_{UID}",
        f"default_web\n_{UID}",
        ".",
        "..",
        "",
        "lost+found",
    ],
)
def test_names_that_are_not_a_pods_are_left_out(name):
    assert parse_pod_log_dirs([name, f"default_kept_{STATIC_UID}"]) == {
        STATIC_UID: PodName("default", "kept")
    }


def test_a_uid_under_two_names_is_left_out():
    other = str(uuid.uuid4())
    names = [
        f"default_web_{UID}",
        f"default_web_{UID}",  # the same name again is the same pod
        f"default_api_{other}",
        f"default_api-renamed_{other}",
        f"staging_api_{other}",  # a third name does not bring it back
    ]
    assert parse_pod_log_dirs(names) == {UID: PodName("default", "web")}
    assert parse_pod_log_dirs(reversed(names)) == {UID: PodName("default", "web")}


def test_read_pod_log_dirs_reads_directories_only(tmp_path):
    (tmp_path / f"kube-system_coredns-0_{UID}" / "coredns").mkdir(parents=True)
    (tmp_path / f"default_web_{STATIC_UID}").mkdir()
    (tmp_path / f"default_file_{uuid.uuid4()!s}").write_text("a stray file")
    (tmp_path / "not a pod").mkdir()
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / f"default_link_{uuid.uuid4()!s}").symlink_to(target)
    assert read_pod_log_dirs(str(tmp_path)) == {
        UID: PodName("kube-system", "coredns-0"),
        STATIC_UID: PodName("default", "web"),
    }


def test_read_pod_log_dirs_of_an_empty_or_missing_root(tmp_path):
    assert read_pod_log_dirs(str(tmp_path)) == {}
    assert read_pod_log_dirs(str(tmp_path / "absent")) == {}


def test_read_pod_log_dirs_raises_other_errors(tmp_path, monkeypatch):
    root = tmp_path / "file"
    root.write_text("")
    with pytest.raises(NotADirectoryError):
        read_pod_log_dirs(str(root))

    def refused(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "scandir", refused)
    with pytest.raises(PermissionError):
        read_pod_log_dirs(str(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a directory without permission")
def test_read_pod_log_dirs_without_permission(tmp_path):
    root = tmp_path / "pods"
    root.mkdir(mode=0)
    try:
        with pytest.raises(PermissionError):
            read_pod_log_dirs(str(root))
    finally:
        root.chmod(0o755)
