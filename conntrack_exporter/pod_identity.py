"""Which pod a process belongs to: pure parsers of /proc/PID/cgroup and of the kubelet's
pod-log directory names (/var/log/pods/<namespace>_<pod>_<uid>/).

A pod's uid and container are in the path of its processes' cgroup, whichever cgroup driver
the kubelet uses; its namespace and name are not, and the kubelet's pod-log directories are
the one place on the node that pairs them with the uid without asking the API server.

identify() runs once per process on every discovery pass (a node has ~1000 processes), so it
walks the file once, with str methods that run in C, and compiles nothing per call.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

# What the kernel prints for a cgroup namespace's ancestors: a process seen from a private
# cgroup namespace (the exporter in a container with cgroupns=private) has a path relative to
# the namespace's root, "/../../kubepods-besteffort-pod<uid>.slice/...".
_PARENT = "/.."
# Pod uids: RFC 4122 UUIDs as the API server writes them (lower-case), or, for a static pod
# (kubelet's pkg/kubelet/config/common.go), the 32 lower-case hex digits of an MD5 sum.
_UID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}")
# Container ids of containerd, CRI-O and Docker alike: 64 lower-case hex digits (SHA-256).
_CONTAINER_ID = re.compile(r"[0-9a-f]{64}")
_CONTAINER_ID_LENGTH = 64
# The components a cgroupfs-driver pod directory (pod<uid>) may follow: the kubelet's root,
# a QoS class, or "..", when the path is relative to a private cgroup namespace's root.
_CGROUPFS_POD_PARENTS = frozenset({"kubepods", "burstable", "besteffort", ".."})
# DNS-1123: a namespace is a label, a pod name a subdomain (labels joined by dots).
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS_LABEL_MAX = 63
_DNS_SUBDOMAIN_MAX = 253
_ERROR_EXCERPT = 100


@dataclass(frozen=True, slots=True)
class Pod:
    """A process of a Kubernetes pod. `uid` is written with dashes, as the API server has it.

    `container` is the runtime's 64-hex container id when the process is in a container's
    cgroup, None when it is in the pod's own cgroup or in a runtime helper's (CRI-O's
    crio-conmon-<id>.scope holds conmon, which runs in the node's namespaces, not the pod's).
    """

    uid: str
    container: str | None


@dataclass(frozen=True, slots=True)
class Cgroup:
    """A process outside Kubernetes: its cgroup, to tell network namespaces apart by
    (`/system.slice/docker-<id>.scope`, `/machine.slice/libpod-<id>.scope`, ...)."""

    path: str


@dataclass(frozen=True, slots=True)
class PodName:
    """A pod's namespace and name, from its pod-log directory."""

    namespace: str
    pod: str


def identify(cgroup_text: str, source: str = "cgroup") -> Pod | Cgroup | None:
    """The pod (or, outside Kubernetes, the cgroup) of a process, from /proc/PID/cgroup.

    Each line is "hierarchy-ID:controller-list:path"; "0::path" is cgroup v2's, the others are
    v1 hierarchies (a hybrid host prints both). The v2 path is preferred when it names a pod,
    else any v1 path that does: on a hybrid host the runtime may leave a container in its
    own service's cgroup on the unified hierarchy. Outside Kubernetes the answer is the first
    of the v2 path, the name=systemd one and the other v1 ones (in the file's order) that is
    not a root once a private cgroup namespace's leading "/.." steps are taken off: the v2 and
    systemd hierarchies hold the unit and container names an operator knows, but a v1 host
    shows "0::/" for every process as soon as anything has mounted cgroup2. None when every
    path is a root: nothing can be said of a process there (the exporter's own container, seen
    from its own namespace, is "/").

    A well-formed file never raises, whatever its paths; ValueError, naming `source`, says
    that the text is not a cgroup file at all (empty, not ASCII, a line without two colons).
    """
    if not cgroup_text.isascii():
        raise ValueError(f"{source}: not ASCII text")
    lines = cgroup_text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the kernel ends every line, the last one too, with a newline
    if not lines:
        raise ValueError(f"{source} is empty")
    unified: str | None = None
    systemd: str | None = None
    others: list[str] = []  # the other v1 paths but the roots, in the file's order
    # v1 paths that may name a pod, each once (the hierarchies mostly repeat one path): they
    # are looked into only if the v2 line names none, which the kernel prints last.
    maybe_pods: list[str] = []
    for number, line in enumerate(lines, start=1):
        hierarchy, _, rest = line.partition(":")
        controllers, colon, path = rest.partition(":")
        # A path may hold colons of its own (a cgroup named "x.slice:cri-containerd:<id>"),
        # hence partition at the first two only.
        if not colon or not hierarchy.isdigit() or not path.startswith("/"):
            raise ValueError(
                f"{source}: line {number} is not 'hierarchy-ID:controller-list:/path': "
                f"{line[:_ERROR_EXCERPT]!r}"
            )
        if hierarchy == "0" and not controllers:
            if unified is None:
                unified = path
            continue
        if "pod" in path and path not in maybe_pods:
            maybe_pods.append(path)
        if controllers == "name=systemd":
            systemd = path
        elif path != "/":
            others.append(path)
    if unified is not None and "pod" in unified:
        maybe_pods.insert(0, unified)
    for path in maybe_pods:
        pod = _pod(path)
        if pod is not None:
            return pod
    for outside in (unified, systemd, *others):
        if outside is not None and (path := _outside_root(outside)):
            return Cgroup(path)
    return None


def _outside_root(path: str) -> str:
    """The path without a private cgroup namespace's leading "/.." steps; "" for a root."""
    while path.startswith(_PARENT) and (len(path) == len(_PARENT) or path[len(_PARENT)] == "/"):
        path = path[len(_PARENT) :]
    return "" if path == "/" else path


def _pod(path: str) -> Pod | None:
    """The pod a cgroup path names, under either cgroup driver, or None.

    systemd driver: .../kubepods-<qos>-pod<uid, "-" as "_">.slice/<runtime>-<id>.scope;
    cgroupfs driver: .../kubepods/<qos>/pod<uid>/<id>. The pod's component is looked for
    anywhere in the path: under a private cgroup namespace the path starts at some ancestor
    ("/../../kubepods-besteffort-pod<uid>.slice/..."), in kind it is below the node
    container's own cgroup and named "kubelet-kubepods-...". The component after it, if any,
    is the container's; a process may sit deeper still (a runtime's "container" sub-cgroup).
    """
    parts = path.split("/")
    for index, part in enumerate(parts):
        if "-pod" in part:
            # A systemd-style name that a runtime using cgroupfs took literally (containerd
            # with SystemdCgroup off under a kubelet with the systemd driver) is one
            # component, "kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>".
            if ":" in part:
                part, _, rest = part.partition(":")
                uid = _systemd_pod_uid(part)
                if uid is not None:
                    return Pod(uid, _container_id(rest.rpartition(":")[2]))
                continue
            uid = _systemd_pod_uid(part)
            if uid is None:
                continue
        elif (
            part.startswith("pod")
            and parts[index - 1] in _CGROUPFS_POD_PARENTS
            and _UID.fullmatch(part, 3)
        ):
            uid = part[3:]
        else:
            continue
        return Pod(uid, _container_id(parts[index + 1]) if index + 1 < len(parts) else None)
    return None


def _systemd_pod_uid(part: str) -> str | None:
    """The uid in a systemd-driver pod slice's name: kubepods[-<qos>]-pod<uid>.slice, maybe
    with a prefix of the kubelet's cgroup root (kind's kubelet-kubepods-...)."""
    if not part.endswith(".slice"):
        return None
    prefix, dash, last = part[: -len(".slice")].rpartition("-")
    if not dash or not last.startswith("pod") or "kubepods" not in prefix.split("-"):
        return None
    uid = last[3:].replace("_", "-")
    return uid if _UID.fullmatch(uid) else None


def _container_id(part: str) -> str | None:
    """The container id in <runtime>-<id>.scope (systemd driver) or <id> / crio-<id>
    (cgroupfs driver); None for anything else, such as crio-conmon-<id>.scope."""
    name = part[: -len(".scope")] if part.endswith(".scope") else part
    prefix, _, container = name.rpartition("-")
    if (
        len(container) != _CONTAINER_ID_LENGTH
        or not _CONTAINER_ID.fullmatch(container)
        or "conmon" in prefix.split("-")
    ):
        return None
    return container


def parse_pod_log_dirs(names: Iterable[str]) -> dict[str, PodName]:
    """{uid: PodName} from the kubelet's pod-log directory names, <namespace>_<pod>_<uid>.

    Neither a namespace (DNS-1123 label) nor a pod name (DNS-1123 subdomain) nor a uid can
    hold "_", so a name is exactly three parts, each checked; anything else in the directory
    (a stray file, a name that does not fit) is not a pod's and is left out, not an error.
    A uid under two different names cannot be told apart: it is left out (its series then
    carry pod_uid alone), rather than given one of the two at random.
    """
    pods: dict[str, PodName] = {}
    ambiguous: set[str] = set()
    for name in names:
        parts = name.split("_")
        if len(parts) != 3:
            continue
        namespace, pod, uid = parts
        if not (
            len(namespace) <= _DNS_LABEL_MAX
            and _DNS_LABEL.fullmatch(namespace)
            and len(pod) <= _DNS_SUBDOMAIN_MAX
            and _DNS_SUBDOMAIN.fullmatch(pod)
            and _UID.fullmatch(uid)
        ):
            continue
        if uid in ambiguous:
            continue
        found = PodName(namespace, pod)
        known = pods.setdefault(uid, found)
        if known != found:
            del pods[uid]
            ambiguous.add(uid)
    return pods


def read_pod_log_dirs(root: str = "/var/log/pods") -> dict[str, PodName]:
    """parse_pod_log_dirs over the directories in `root` (list_pod_log_dirs)."""
    return parse_pod_log_dirs(list_pod_log_dirs(root))


def list_pod_log_dirs(root: str = "/var/log/pods") -> list[str]:
    """The names of the directories in `root`, in the order the directory lists them.

    A missing root is []: the exporter may run outside Kubernetes, or on a node whose
    kubelet logs elsewhere. Any other OSError (permission denied) is the caller's to report.
    Entries are not followed through symlinks: the kubelet makes real directories, and
    os.scandir then answers from the directory listing alone, without a stat per entry.
    """
    try:
        with os.scandir(root) as entries:
            return [entry.name for entry in entries if entry.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []
