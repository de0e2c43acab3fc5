"""The pods collector: every pod's network namespace, under the host metrics' own names.

Most of a Kubernetes node's sockets live in pods' network namespaces, where the kernel keeps
counters of their own that the host's /proc/net never shows: a web pod's listen overflows,
CoreDNS's UDP receive-buffer drops, a sidecar's own conntrack table. This collector finds
every network namespace other than the exporter's own through the procfs root (netns.py: any
uid, no setns), names the pod each belongs to (pod_identity.py: /proc/PID/cgroup and the
kubelet's /var/log/pods), and reports its counters as the socket and conntrack collectors
report the host's, labelled `namespace` and `pod` (`pod_uid` when the name is unknown,
`cgroup` for a namespace outside Kubernetes). The registry serves the two as one family.

Discovery runs in the background scanner every `interval_seconds` (a stat per process, and a
read of one cgroup file per new namespace); scrapes read each namespace's six files on fds
held open (netns.NamespaceFiles): ~100 us of kernel time per namespace. A namespace whose
processes are gone is closed at the next discovery: an open fd would keep it alive.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.samples import Sample

from conntrack_exporter.collectors.conntrack import ENTRIES, RETIRED_COUNTERS, counter_family
from conntrack_exporter.collectors.socket import (
    ALLOCATED,
    INUSE,
    TIMEWAIT,
    NamespaceLabels,
    counter_samples,
    inuse_samples,
)
from conntrack_exporter.config import ABSOLUTE_PATH, NON_NEGATIVE, SECONDS
from conntrack_exporter.counters import WrappingCounters
from conntrack_exporter.families import Family
from conntrack_exporter.netlink.ctnetlink import CpuStats
from conntrack_exporter.netns import (
    ADDRESS_FILES,
    Namespace,
    NamespaceFiles,
    NamespaceTable,
    NetnsKey,
    discover,
)
from conntrack_exporter.netns import namespace_key as key_of
from conntrack_exporter.pod_addresses import address_keys, index_addresses
from conntrack_exporter.pod_identity import (
    Cgroup,
    Pod,
    PodName,
    identify,
    list_pod_log_dirs,
    parse_pod_log_dirs,
)
from conntrack_exporter.procfs import (
    parse_nf_conntrack_entries,
    parse_nf_conntrack_stat,
    parse_sockstat,
)
from conntrack_exporter.registry import Collected, CollectorContext, NoDataError

log = logging.getLogger(__name__)

ERROR_REASONS = ("procfs", "pod_logs", "parse")
FIB_TRIE, IF_INET6 = ADDRESS_FILES


@dataclass(frozen=True)
class PodsOptions:
    # Seconds between discoveries: a new pod appears, and a gone one disappears, within one.
    interval_seconds: float = field(default=15.0, metadata={"check": SECONDS})
    # Namespaces reported at most (the oldest, by their lowest pid); 0 for no bound. Those
    # past it are counted in conntrack_exporter_pod_namespaces_skipped and logged.
    max_namespaces: int = field(default=1000, metadata={"check": NON_NEGATIVE})
    # Kubernetes namespaces whose pods are reported (empty: every one), and those left out.
    include_namespaces: tuple[str, ...] = ()
    exclude_namespaces: tuple[str, ...] = ()
    # The kubelet's per-pod log directories, <namespace>_<pod>_<uid>: the pods' names.
    pod_logs_path: str = field(default="/var/log/pods", metadata={"check": ABSOLUTE_PATH})


class Target(NamedTuple):
    """A namespace to report, and the labels that say whose it is."""

    namespace: Namespace
    labels: dict[str, str]
    # The same, merged with each socket sample's own labels: made when the namespace is
    # first reported, kept from pass to pass while its labels stay the same.
    sample_labels: NamespaceLabels


class Discovery(NamedTuple):
    """What a discovery pass published, for scrapes to serve."""

    targets: list[Target]
    skipped: int
    duration: float
    finished_at: float


class PodsCollector:
    name: ClassVar[str] = "pods"
    # On: it needs no privilege, and costs ~0.2 ms a scrape per namespace found.
    default_enabled: ClassVar[bool] = True
    options_type: ClassVar[type] = PodsOptions

    def __init__(self, options: PodsOptions, context: CollectorContext) -> None:
        self._options = options
        self._procfs = context.procfs
        self._table = NamespaceTable(context.procfs)
        self._addresses = context.pod_addresses
        # A pod's counters, by namespace and labels, kept across reloads (see counters.py).
        self._counters: dict[tuple[object, ...], WrappingCounters] = context.lasting.get(
            f"pods.counters:{context.procfs.root}", dict
        )
        self._lock = threading.Lock()  # the table, between discovery and scrapes
        self._discovery: Discovery | None = None
        self._errors = dict.fromkeys(ERROR_REASONS, 0)
        self._logged: set[str] = set()
        # The last conntrack stat file found all zeros: every namespace that never used
        # conntrack has the very same text, parsed once instead of at every read.
        self._idle_conntrack: str | None = None
        # Discovery's own, between passes: the pod of each namespace held open, by its key
        # and its first process, whose cgroup named the pod (its cgroup file is not read
        # again while both stay); the pod-log directories' names and what they name.
        self._pod_of: dict[tuple[NetnsKey, int], Pod] = {}
        self._log_dirs: tuple[list[str], dict[str, PodName]] = ([], {})

    @property
    def interval(self) -> float:
        return self._options.interval_seconds

    # -- discovery, in the scanner's thread ---------------------------------------------

    def scan(self, stop: threading.Event | None = None) -> None:
        started = time.monotonic()
        try:
            own = key_of(self._procfs, "self")
            namespaces = discover(self._procfs, exclude=own)
        except OSError as exc:
            self._count("procfs", f"cannot list the namespaces in {self._procfs.root}: {exc}")
            return
        names = self._pod_names()
        last = self._discovery
        previous = {t.namespace.key: t for t in last.targets} if last is not None else {}
        targets = []
        pod_of: dict[tuple[NetnsKey, int], Pod] = {}
        for namespace in namespaces:
            first = (namespace.key, namespace.pids[0])
            pod = self._pod_of.get(first)
            if pod is not None:
                identity: Pod | Cgroup | None = pod
                pod_of[first] = pod
            else:
                identity, by_first = self._identity(namespace)
                if by_first and isinstance(identity, Pod):
                    pod_of[first] = identity
            labels = self._labels(identity, names)
            if labels is None:
                continue
            known = previous.get(namespace.key)
            if known is not None and known.labels == labels:
                targets.append(Target(namespace, known.labels, known.sample_labels))
            else:
                targets.append(Target(namespace, labels, NamespaceLabels(labels)))
        targets = _one_per_pod(targets, previous)
        bound = self._options.max_namespaces
        skipped = max(0, len(targets) - bound) if bound else 0
        if skipped:
            self._count_once("skipped", f"{skipped} network namespaces past max_namespaces")
        kept = targets[: len(targets) - skipped]
        with self._lock:
            self._table.update(target.namespace for target in kept)
            files = self._table.files
            opened = [target for target in kept if target.namespace.key in files]
            self._forget_counters(opened)
            self._discovery = Discovery(opened, skipped, time.monotonic() - started, time.time())
            # Only namespaces our fds hold: their keys cannot name another namespace meanwhile.
            self._pod_of = {first: pod for first, pod in pod_of.items() if first[0] in files}
        # Outside the lock: only this thread closes the files (at the next pass), and
        # scrapes read other fds.
        self._addresses.publish(index_addresses(self._pod_addresses(opened, files)))

    def _pod_addresses(
        self, targets: list[Target], files: dict[NetnsKey, NamespaceFiles]
    ) -> Iterator[tuple[dict[str, str], frozenset[int]]]:
        """Each Kubernetes pod's labels and addresses, read again at every pass: a pod's
        namespace has its processes before its CNI gives it an address."""
        for target in targets:
            if "cgroup" in target.labels:
                continue  # not a pod: its addresses name nothing
            namespace = files[target.namespace.key]
            try:
                keys = address_keys(namespace.read(FIB_TRIE), namespace.read(IF_INET6))
            except ValueError as exc:
                self._count("parse", f"{target.labels}: {exc}")
                keys = frozenset()
            yield target.labels, keys

    def _pod_names(self) -> dict[str, PodName]:
        try:
            listing = list_pod_log_dirs(self._options.pod_logs_path)
        except OSError as exc:
            self._count("pod_logs", f"cannot read {self._options.pod_logs_path}: {exc}")
            return {}
        # Parsed again only when the directory lists other names than at the last pass.
        if listing != self._log_dirs[0]:
            self._log_dirs = (listing, parse_pod_log_dirs(listing))
        return self._log_dirs[1]

    def _labels(
        self, identity: Pod | Cgroup | None, names: dict[str, PodName]
    ) -> dict[str, str] | None:
        """Whose a namespace is, as labels; None when the options leave it out."""
        if isinstance(identity, Pod):
            name = names.get(identity.uid)
            if name is None:
                labels = {"pod_uid": identity.uid}
            else:
                labels = {"namespace": name.namespace, "pod": name.pod}
        else:
            labels = {"cgroup": identity.path if identity is not None else "/"}
        return labels if self._wanted(labels.get("namespace")) else None

    def _identity(self, namespace: Namespace) -> tuple[Pod | Cgroup | None, bool]:
        """The pod of the first process that names one; else the first process's cgroup.
        And whether that is the namespace's first process's own."""
        first: Pod | Cgroup | None = None
        for pid in namespace.pids:
            try:
                text = self._procfs.read_text(f"{pid}/cgroup")
                identity = identify(text, f"/proc/{pid}/cgroup")
            except FileNotFoundError:
                continue  # exited since the pass listed it
            except (OSError, ValueError) as exc:
                self._count("parse", str(exc))
                continue
            if isinstance(identity, Pod):
                return identity, pid == namespace.pids[0]
            first = first or identity
        return first, False

    def _wanted(self, kubernetes_namespace: str | None) -> bool:
        include, exclude = self._options.include_namespaces, self._options.exclude_namespaces
        if include and kubernetes_namespace not in include:
            return False
        return kubernetes_namespace not in exclude

    def _forget_counters(self, targets: Iterable[Target]) -> None:
        # The keys of namespaces with conntrack counters only: most have none.
        counted = {key[0] for key in self._counters}
        live = {_counter_key(target) for target in targets if target.namespace.key in counted}
        for key in [key for key in self._counters if key not in live]:
            del self._counters[key]

    def _count(self, reason: str, message: str) -> None:
        self._errors[reason] += 1
        self._count_once(reason, message)

    def _count_once(self, what: str, message: str) -> None:
        # Once per kind until a clean pass: the counter says how often it recurs.
        if what not in self._logged:
            self._logged.add(what)
            log.warning("pod discovery: %s", message, extra={"reason": what})

    # -- scrape -------------------------------------------------------------------------

    def collect(self) -> Collected:
        with self._lock:
            discovery = self._discovery
            if discovery is None:
                raise NoDataError("no pod discovery has finished yet", [self._errors_family()])
            samples: defaultdict[Family, list[Sample]] = defaultdict(list)
            for target in discovery.targets:
                files = self._table.files.get(target.namespace.key)
                if files is not None:
                    self._namespace_samples(target, files, samples)
        metrics = [family.build(values) for family, values in samples.items() if values]
        return Collected("procfs", [*metrics, *self._health_families(discovery)])

    def _namespace_samples(
        self, target: Target, files: NamespaceFiles, out: defaultdict[Family, list[Sample]]
    ) -> None:
        labels = target.labels
        try:
            texts = files.read_all()
            sockstat = parse_sockstat(texts.sockstat or "", "sockstat")
            text6 = texts.sockstat6
            sockstat6 = None if text6 is None else parse_sockstat(text6, "sockstat6")
            counters = counter_samples(
                (texts.netstat, "netstat"),
                (texts.snmp, "snmp"),
                (texts.snmp6, "snmp6"),
                target.sample_labels,
            )
            conntrack = self._conntrack_samples(target, texts.nf_conntrack)
        except ValueError as exc:  # this namespace's files; the others are served
            self._errors["parse"] += 1
            self._count_once("parse", f"{labels}: {exc}")
            return
        out[INUSE].extend(inuse_samples(sockstat, sockstat6, target.sample_labels))
        for family, line, key in ((ALLOCATED, "sockets", "used"), (TIMEWAIT, "TCP", "tw")):
            value = sockstat.get(line, {}).get(key)
            if value is not None:
                out[family].append(family.sample(labels, value))
        for family, values in counters:
            out[family].extend(values)
        for family, values in conntrack:
            out[family].extend(values)

    def _conntrack_samples(
        self, target: Target, text: str | None
    ) -> list[tuple[Family, list[Sample]]]:
        """The namespace's own conntrack table, where anything in it uses conntrack (the file
        is all zeros otherwise, and absent without CONFIG_NF_CONNTRACK_PROCFS)."""
        if text is None or text == self._idle_conntrack:
            return []
        entries = parse_nf_conntrack_entries(text)
        rows = parse_nf_conntrack_stat(text)
        if not entries and not any(any(row.values()) for row in rows):
            self._idle_conntrack = text
            return []
        counters = self._counters.setdefault(_counter_key(target), WrappingCounters())
        with counters.lock:
            totals = counters.update(CpuStats(cpu, row) for cpu, row in enumerate(rows))
        summed: dict[str, int] = {}
        for row in totals:
            for name, value in row.counters.items():
                summed[name] = summed.get(name, 0) + value
        labels = target.labels
        out = [(ENTRIES, [ENTRIES.sample(labels, entries)])]
        for name in sorted(summed.keys() - RETIRED_COUNTERS):
            family = counter_family(name)
            out.append((family, [family.sample(labels, summed[name])]))
        return out

    def _health_families(self, discovery: Discovery) -> list[Metric]:
        return [
            GaugeMetricFamily(
                "conntrack_exporter_pod_namespaces",
                "Network namespaces of pods (and other containers) the pods collector reports.",
                value=len(discovery.targets),
            ),
            GaugeMetricFamily(
                "conntrack_exporter_pod_namespaces_skipped",
                "Network namespaces not reported because collectors.pods.max_namespaces were.",
                value=discovery.skipped,
            ),
            GaugeMetricFamily(
                "conntrack_exporter_pod_discovery_duration_seconds",
                "How long the last discovery of the pods' network namespaces took.",
                value=discovery.duration,
            ),
            GaugeMetricFamily(
                "conntrack_exporter_pod_discovery_timestamp_seconds",
                "When the last discovery of the pods' network namespaces finished (Unix time).",
                value=discovery.finished_at,
            ),
            GaugeMetricFamily(
                "conntrack_exporter_pod_discovery_interval_seconds",
                "The configured seconds between discoveries (collectors.pods.interval_seconds).",
                value=self._options.interval_seconds,
            ),
            self._errors_family(),
        ]

    def _errors_family(self) -> Metric:
        errors = CounterMetricFamily(
            "conntrack_exporter_pod_discovery_errors",
            "Pod discovery and per-pod reads that failed, by reason: procfs (the namespaces "
            "could not be listed), pod_logs (the pods' names could not be read), parse.",
            labels=["reason"],
        )
        for reason, count in self._errors.items():
            errors.add_metric([reason], count)
        return errors

    def close(self) -> None:
        with self._lock:
            self._table.close()


def _one_per_pod(targets: list[Target], previous: dict[NetnsKey, Target]) -> list[Target]:
    """One namespace per set of labels: two would make duplicate series. A pod has two for a
    moment while its sandbox is recreated: the one reported already stays until it is gone
    (its counters go on), else the first found."""
    chosen: dict[tuple[tuple[str, str], ...], Target] = {}
    for target in targets:
        labels = tuple(sorted(target.labels.items()))
        if labels not in chosen or target.namespace.key in previous:
            chosen[labels] = target
    if len(chosen) < len(targets):
        log.debug("pod discovery: %d namespaces share a pod's labels", len(targets) - len(chosen))
    kept = {id(target) for target in chosen.values()}
    return [target for target in targets if id(target) in kept]


def _counter_key(target: Target) -> tuple[object, ...]:
    # The key alone could name a new namespace after the old one died; with its labels it
    # is one pod's.
    return (target.namespace.key, *sorted(target.labels.items()))
