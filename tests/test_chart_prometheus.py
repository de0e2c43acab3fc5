"""The chart's ServiceMonitor and PodMonitor in a real Prometheus: whose labels each series ends
up with once the exporter's series describe pods as well as the node.

helm renders the monitors (ci/monitors-values.yaml: both on, with that file's relabelings and
metricRelabelings); `scrape_config` below turns each into the scrape configuration
prometheus-operator generates for it (OPERATOR_VERSION), the operator's own relabelings first;
the real prometheus binary runs them, in a throwaway network namespace, against a tiny HTTP
server serving a fixed exposition with the node's series (no pod labels) and pods' series
(`namespace`, `pod`, or `pod_uid`); the assertions read Prometheus' /api/v1/query. The
monitors' sampleLimit and labelLimit, as the operator passes them, at and one below the
exposition's own counts.

The one substitution: the operator's kubernetes_sd_configs become static_configs whose target
carries the __meta_kubernetes_* labels Kubernetes' service discovery gives the exporter's pod
(and, for the ServiceMonitor, its Service and endpoint), built from the rendered DaemonSet and
Service. The operator's selection (keep) rules then run on them as they would in a cluster.
"""

from __future__ import annotations

import contextlib
import copy
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from conntrack_exporter import __version__
from tests.test_e2e_prometheus import PROMETHEUS, Prometheus
from tests.test_helm import (
    DROP_EXPORTER_LABELS,
    FULLNAME,
    NAMESPACE,
    container,
    only,
    render_ci,
)

pytestmark = pytest.mark.kernel  # root: a network namespace of its own

# Whose translation of a ServiceMonitor/PodMonitor `scrape_config` follows: prometheus-operator
# v0.93.0, pkg/prometheus/promcfg.go (generateServiceMonitorConfig, generatePodMonitorConfig,
# initRelabelings, generateRunningFilter, generateRelabelConfig,
# appendShardingRelabelingWithAddress), one shard, no scrape class, no enforced namespace label.
OPERATOR_VERSION = "v0.93.0"

# The node the exporter's pod runs on, the node's address (hostNetwork: the pod's too), and
# the pod's name as the DaemonSet would make it.
NODE, HOST_IP = "node-a", "10.0.0.5"
EXPORTER_POD = f"{FULLNAME}-x7k2p"
JOB = "conntrack-exporter"  # jobLabel: the app.kubernetes.io/name label

# The exposition: (metric, its own labels, value). The node's series carry no pod label; a
# pod's carry the pod they describe, one of them in the exporter's own namespace, and one pod
# is known only by its uid.
TEAM_A = {"namespace": "team-a", "pod": "web-1"}
SAME_NAMESPACE = {"namespace": NAMESPACE, "pod": "coredns-7db6d8ff4d-q2x8v"}
BY_UID = {"pod_uid": "0c8f0b0e-5c2d-4f4e-9d6a-2b7f3e1a9c11"}
TCP4 = {"family": "ipv4", "protocol": "tcp"}
EXPOSED: list[tuple[str, dict[str, str], int]] = [
    ("conntrack_entries", {}, 120),
    ("conntrack_entries", TEAM_A, 7),
    ("conntrack_entries", SAME_NAMESPACE, 3),
    ("conntrack_entries", BY_UID, 2),
    ("socket_inuse", TCP4, 5),
    ("socket_inuse", {**TCP4, **TEAM_A}, 2),
    ("conntrack_exporter_build_info", {"version": __version__}, 1),
]
METRICS = sorted({name for name, _, _ in EXPOSED})
# ci/monitors-values.yaml's ServiceMonitor drops this one in its metricRelabelings.
DROPPED_BY_CI = "conntrack_exporter_build_info"


def exposition() -> str:
    lines = []
    for name in dict.fromkeys(name for name, _, _ in EXPOSED):
        lines += [f"# HELP {name} Test series.", f"# TYPE {name} gauge"]
        for metric, labels, value in EXPOSED:
            if metric == name:
                pairs = ",".join(f'{key}="{label}"' for key, label in labels.items())
                lines.append(f"{name}{{{pairs}}} {value}" if pairs else f"{name} {value}")
    return "\n".join(lines) + "\n"


# -- prometheus-operator's translation ---------------------------------------------------------


def sanitize(name: str) -> str:
    """sanitizeLabelName: a Kubernetes label's name as it appears in a meta label."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


RELABEL_KEYS = {
    "sourceLabels": "source_labels",
    "separator": "separator",
    "targetLabel": "target_label",
    "regex": "regex",
    "modulus": "modulus",
    "replacement": "replacement",
    "action": "action",
}


def relabel_config(relabeling: dict[str, Any]) -> dict[str, Any]:
    """generateRelabelConfig: a RelabelConfig of the CRD as a Prometheus relabel_config (its
    empty fields left out, the action lower-cased)."""
    assert set(relabeling) <= set(RELABEL_KEYS), relabeling
    config = {RELABEL_KEYS[key]: value for key, value in relabeling.items() if value}
    if "action" in config:
        config["action"] = config["action"].lower()
    return config


def selector_keeps(prefix: str, match_labels: dict[str, str]) -> list[dict[str, Any]]:
    """The keep rules of a selector's matchLabels (the operator's default "relabel" selector
    mechanism), sorted by key."""
    return [
        {
            "action": "keep",
            "source_labels": [
                f"{prefix}_label_{sanitize(key)}",
                f"{prefix}_labelpresent_{sanitize(key)}",
            ],
            "regex": f"({value});true",
        }
        for key, value in sorted(match_labels.items())
    ]


def to(target: str, *sources: str, **fields: str) -> dict[str, Any]:
    """A rule writing `target` (from `sources`, when given)."""
    rule: dict[str, Any] = {"source_labels": list(sources)} if sources else {}
    return {**rule, "target_label": target, **fields}


def keep(source: str, regex: str) -> dict[str, Any]:
    return {"action": "keep", "source_labels": [source], "regex": regex}


RUNNING_FILTER = {
    "action": "drop",
    "source_labels": ["__meta_kubernetes_pod_phase"],
    "regex": "(Failed|Succeeded)",
}
# One shard: the config reloader writes the shard's number, 0, in place of $(SHARD).
SHARDING = [
    {
        "source_labels": ["__address__", "__tmp_hash"],
        "target_label": "__tmp_hash",
        "regex": "(.+);",
        "replacement": "$1",
        "action": "replace",
    },
    {
        "source_labels": ["__tmp_hash"],
        "target_label": "__tmp_hash",
        "modulus": 1,
        "action": "hashmod",
    },
    {
        "source_labels": ["__tmp_hash", "__tmp_disable_sharding"],
        "regex": "0;|.+;.+",
        "action": "keep",
    },
]
# What this translation knows of a monitor: anything else the chart renders fails the test
# rather than be left out unseen. The spec's per-scrape limits become the scrape
# configuration's (addLimitsToYAML; no enforced limits here).
SPEC_LIMITS = {"sampleLimit": "sample_limit", "labelLimit": "label_limit"}
ENDPOINT_KEYS = {
    "port",
    "path",
    "scheme",
    "interval",
    "scrapeTimeout",
    "honorLabels",
    "relabelings",
    "metricRelabelings",
}


def scrape_config(
    monitor: dict, discovered: dict[str, str], address: str, override_honor_labels: bool = False
) -> dict[str, Any]:
    """The scrape configuration the operator generates for `monitor`, its service discovery
    replaced by one static target at `address` carrying the `discovered` meta labels.
    `override_honor_labels`: the Prometheus resource's overrideHonorLabels."""
    kind, metadata, spec = monitor["kind"], monitor["metadata"], monitor["spec"]
    service = kind == "ServiceMonitor"
    endpoints = "endpoints" if service else "podMetricsEndpoints"
    assert set(spec) - set(SPEC_LIMITS) == {"jobLabel", "namespaceSelector", "selector", endpoints}
    assert set(spec["selector"]) == {"matchLabels"}
    (endpoint,) = spec[endpoints]
    assert set(endpoint) <= ENDPOINT_KEYS, f"not translated here: {set(endpoint) - ENDPOINT_KEYS}"
    port, labels = endpoint["port"], spec["selector"]["matchLabels"]
    job_label = sanitize(spec["jobLabel"])
    relabel = [to("__tmp_prometheus_job_name", "job")]
    if service:
        target = (
            "__meta_kubernetes_endpoint_address_target_kind",
            "__meta_kubernetes_endpoint_address_target_name",
        )
        relabel += selector_keeps("__meta_kubernetes_service", labels)
        relabel += [
            keep("__meta_kubernetes_endpoint_port_name", port),
            to("node", *target, separator=";", regex="Node;(.*)", replacement="${1}"),
            to("pod", *target, separator=";", regex="Pod;(.*)", replacement="${1}"),
            to("namespace", "__meta_kubernetes_namespace"),
            to("service", "__meta_kubernetes_service_name"),
            to("pod", "__meta_kubernetes_pod_name"),
            to("container", "__meta_kubernetes_pod_container_name"),
            RUNNING_FILTER,
            to("job", "__meta_kubernetes_service_name", replacement="${1}"),
            to(
                "job",
                f"__meta_kubernetes_service_label_{job_label}",
                regex="(.+)",
                replacement="${1}",
            ),
        ]
    else:
        relabel.append(RUNNING_FILTER)
        relabel += selector_keeps("__meta_kubernetes_pod", labels)
        relabel += [
            keep("__meta_kubernetes_pod_container_port_name", port),
            to("namespace", "__meta_kubernetes_namespace"),
            to("container", "__meta_kubernetes_pod_container_name"),
            to("pod", "__meta_kubernetes_pod_name"),
            to("job", replacement=f"{metadata['namespace']}/{metadata['name']}"),
            to("job", f"__meta_kubernetes_pod_label_{job_label}", regex="(.+)", replacement="${1}"),
        ]
    relabel.append({"target_label": "endpoint", "replacement": port})
    # The monitor's own relabelings (the chart's), after the operator's, before the sharding.
    relabel += [relabel_config(item) for item in endpoint.get("relabelings", [])]
    relabel += SHARDING
    config: dict[str, Any] = {
        "job_name": f"{'serviceMonitor' if service else 'podMonitor'}/"
        f"{metadata['namespace']}/{metadata['name']}/0",
        "honor_labels": endpoint.get("honorLabels", False) and not override_honor_labels,
        "static_configs": [{"targets": [address], "labels": discovered}],
        "scrape_interval": endpoint["interval"],
        "scrape_timeout": endpoint["scrapeTimeout"],
        "metrics_path": endpoint["path"],
        "scheme": endpoint["scheme"],
        "relabel_configs": relabel,
    }
    config |= {SPEC_LIMITS[key]: spec[key] for key in SPEC_LIMITS if key in spec}
    if endpoint.get("metricRelabelings"):
        config["metric_relabel_configs"] = [
            relabel_config(item) for item in endpoint["metricRelabelings"]
        ]
    return config


def meta_labels(prefix: str, labels: dict[str, str]) -> dict[str, str]:
    found = {f"{prefix}_label_{sanitize(key)}": value for key, value in labels.items()}
    return found | {f"{prefix}_labelpresent_{sanitize(key)}": "true" for key in labels}


def discovered_labels(objects: tuple[dict, ...], kind: str) -> dict[str, str]:
    """The meta labels Kubernetes' service discovery gives the exporter's pod on NODE (role
    pod, for a PodMonitor; role endpoints, for a ServiceMonitor, adds its Service's and
    endpoint's), from the rendered DaemonSet and Service."""
    daemonset = only(objects, "DaemonSet")
    exporter = container(objects)
    (port,) = [item for item in exporter["ports"] if item["name"] == "metrics"]
    labels = {
        "__meta_kubernetes_namespace": NAMESPACE,
        "__meta_kubernetes_pod_name": EXPORTER_POD,
        "__meta_kubernetes_pod_node_name": NODE,
        "__meta_kubernetes_pod_host_ip": HOST_IP,
        "__meta_kubernetes_pod_ip": HOST_IP,
        "__meta_kubernetes_pod_ready": "true",
        "__meta_kubernetes_pod_phase": "Running",
        "__meta_kubernetes_pod_controller_kind": "DaemonSet",
        "__meta_kubernetes_pod_controller_name": daemonset["metadata"]["name"],
        "__meta_kubernetes_pod_container_name": exporter["name"],
        "__meta_kubernetes_pod_container_port_name": port["name"],
        "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
        "__meta_kubernetes_pod_container_port_protocol": port["protocol"],
        **meta_labels("__meta_kubernetes_pod", daemonset["spec"]["template"]["metadata"]["labels"]),
    }
    if kind == "ServiceMonitor":
        service = only(objects, "Service")
        (service_port,) = service["spec"]["ports"]
        labels |= {
            "__meta_kubernetes_service_name": service["metadata"]["name"],
            **meta_labels("__meta_kubernetes_service", service["metadata"]["labels"]),
            "__meta_kubernetes_endpoints_name": service["metadata"]["name"],
            "__meta_kubernetes_endpoint_port_name": service_port["name"],
            "__meta_kubernetes_endpoint_port_protocol": service_port["protocol"],
            "__meta_kubernetes_endpoint_ready": "true",
            "__meta_kubernetes_endpoint_node_name": NODE,
            "__meta_kubernetes_endpoint_address_target_kind": "Pod",
            "__meta_kubernetes_endpoint_address_target_name": EXPORTER_POD,
        }
    return labels


def without_the_labeldrop(monitor: dict) -> dict:
    """The monitor with honorLabels alone: the chart's labeldrop taken out."""
    changed = copy.deepcopy(monitor)
    for endpoint in changed["spec"].get("endpoints", changed["spec"].get("podMetricsEndpoints")):
        endpoint["relabelings"] = [
            item for item in endpoint["relabelings"] if item != DROP_EXPORTER_LABELS
        ]
    return changed


def labeldrop_on_the_series(monitor: dict) -> dict:
    """The monitor with the chart's labeldrop in metricRelabelings instead."""
    changed = without_the_labeldrop(monitor)
    for endpoint in changed["spec"].get("endpoints", changed["spec"].get("podMetricsEndpoints")):
        endpoint["metricRelabelings"] = [
            *endpoint.get("metricRelabelings", []),
            DROP_EXPORTER_LABELS,
        ]
    return changed


def with_limits(monitor: dict, **limits: int) -> dict:
    """The monitor with these per-scrape limits (sampleLimit, labelLimit) on its spec."""
    changed = copy.deepcopy(monitor)
    changed["spec"] |= limits
    return changed


# The exposition's samples, and the most labels one of its series carries through the
# PodMonitor: its own, the target's (job, instance, node) and __name__, which Prometheus counts.
SAMPLES = len(EXPOSED)
MOST_LABELS = max(len(labels) for _, labels, _ in EXPOSED) + len(("job", "instance", "node"))
MOST_LABELS += 1  # __name__


# -- the scraped target and Prometheus ---------------------------------------------------------

# One port per scrape job: each job is its own target, whose series differ by instance.
JOBS = {
    "service-monitor": 19571,
    "pod-monitor": 19572,
    "pod-monitor-override-honor-labels": 19573,
    "service-monitor-honor-labels-alone": 19574,
    "service-monitor-labeldrop-on-the-series": 19575,
    "pod-monitor-at-the-limits": 19576,
    "pod-monitor-over-the-sample-limit": 19577,
    "pod-monitor-over-the-label-limit": 19578,
}
# The jobs whose every scrape fails: over a limit.
FAILING = {"pod-monitor-over-the-sample-limit", "pod-monitor-over-the-label-limit"}


def address(job: str) -> str:
    return f"127.0.0.1:{JOBS[job]}"


class ExpositionHandler(BaseHTTPRequestHandler):
    body = exposition().encode()

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serving(netns, ports: list[int]) -> Iterator[None]:
    """The exposition on each port of 127.0.0.1 in the namespace: the listening sockets are
    made by a thread that joined it, and served from ordinary threads."""
    pool = netns.thread_pool()
    servers = []
    try:
        for port in ports:
            servers.append(
                pool.submit(ThreadingHTTPServer, ("127.0.0.1", port), ExpositionHandler).result()
            )
        threads = [
            threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
            )
            for server in servers
        ]
        for thread in threads:
            thread.start()
        yield
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
        pool.shutdown()


@pytest.fixture
def prometheus(netns, tmp_path) -> Iterator[Prometheus]:
    """Prometheus scraping the exposition through the chart's monitors and the variants."""
    if not Path(PROMETHEUS).exists():
        pytest.skip(f"needs {PROMETHEUS} (make test installs the prometheus package)")
    objects = render_ci("monitors-values.yaml")
    service_monitor, pod_monitor = only(objects, "ServiceMonitor"), only(objects, "PodMonitor")
    on_service = discovered_labels(objects, "ServiceMonitor")
    on_pod = discovered_labels(objects, "PodMonitor")
    configs = {
        "service-monitor": scrape_config(service_monitor, on_service, address("service-monitor")),
        "pod-monitor": scrape_config(pod_monitor, on_pod, address("pod-monitor")),
        "pod-monitor-override-honor-labels": scrape_config(
            pod_monitor,
            on_pod,
            address("pod-monitor-override-honor-labels"),
            override_honor_labels=True,
        ),
        "service-monitor-honor-labels-alone": scrape_config(
            without_the_labeldrop(service_monitor),
            on_service,
            address("service-monitor-honor-labels-alone"),
        ),
        "service-monitor-labeldrop-on-the-series": scrape_config(
            labeldrop_on_the_series(service_monitor),
            on_service,
            address("service-monitor-labeldrop-on-the-series"),
        ),
        "pod-monitor-at-the-limits": scrape_config(
            with_limits(pod_monitor, sampleLimit=SAMPLES, labelLimit=MOST_LABELS),
            on_pod,
            address("pod-monitor-at-the-limits"),
        ),
        "pod-monitor-over-the-sample-limit": scrape_config(
            with_limits(pod_monitor, sampleLimit=SAMPLES - 1),
            on_pod,
            address("pod-monitor-over-the-sample-limit"),
        ),
        "pod-monitor-over-the-label-limit": scrape_config(
            with_limits(pod_monitor, labelLimit=MOST_LABELS - 1),
            on_pod,
            address("pod-monitor-over-the-label-limit"),
        ),
    }
    for job, config in configs.items():
        # Distinct job names (the operator's are per monitor); a scrape every second rather
        # than the monitors' 15-30 s, so that the test does not wait for them: it changes
        # when the target is scraped, not what its series are labelled.
        config["job_name"] = f"{config['job_name']}/{job}"
        config["scrape_interval"] = config["scrape_timeout"] = "1s"
    with serving(netns, list(JOBS.values())):
        config = {"global": {"scrape_interval": "1s"}, "scrape_configs": list(configs.values())}
        server = Prometheus(netns, tmp_path, config)
        try:
            server.wait_until("Prometheus to be ready", server.is_ready)
            server.wait_until(
                "every target to be scraped: up, or down over a limit",
                lambda: all(
                    server.query(f'up{{instance="{address(job)}"}} == 0')
                    if job in FAILING
                    else server.query(f'up{{instance="{address(job)}"}} == 1')
                    and server.query(f'conntrack_entries{{instance="{address(job)}"}}')
                    for job in JOBS
                ),
            )
            yield server
        finally:
            stderr = server.close()
            assert "level=error" not in stderr, stderr


def series(prometheus: Prometheus, job: str) -> list[dict[str, str]]:
    """Every series of the job's target (the exposition's and up), by their labels."""
    names = "|".join([*METRICS, "up"])
    found = prometheus.query(f'{{__name__=~"{names}", instance="{address(job)}"}}')
    return sorted((item["metric"] for item in found), key=lambda labels: sorted(labels.items()))


def expected(target: dict[str, str], dropped: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """The exposition's series, each with the target's labels beside its own, and up."""
    found = [{"__name__": "up", **target}]
    found += [
        {"__name__": name, **target, **labels} for name, labels, _ in EXPOSED if name not in dropped
    ]
    return sorted(found, key=lambda labels: sorted(labels.items()))


def of(found: list[dict[str, str]], name: str, **labels: str) -> list[dict[str, str]]:
    return [
        item
        for item in found
        if item["__name__"] == name and all(item.get(key) == value for key, value in labels.items())
    ]


# -- what a series ends up labelled with -------------------------------------------------------


def test_a_pods_series_names_the_pod_it_describes_and_the_nodes_series_none(prometheus):
    """Through the chart's monitors, as prometheus-operator runs them: every series carries
    job, instance and node (what the rules and dashboards use) and none of the exporter pod's
    own target labels; a pod's series keep their own namespace and pod, also in the
    exporter's own namespace; the node's series get no namespace or pod at all. The same with
    the Prometheus resource's overrideHonorLabels: the labeldrop alone keeps it right."""
    common = {"job": JOB, "node": NODE}
    for job, target, dropped in (
        # ci/monitors-values.yaml: the ServiceMonitor adds host_ip in its relabelings and drops
        # conntrack_exporter_build_info in its metricRelabelings; the PodMonitor does neither.
        ("service-monitor", {**common, "host_ip": HOST_IP}, (DROPPED_BY_CI,)),
        ("pod-monitor", common, ()),
        ("pod-monitor-override-honor-labels", common, ()),
    ):
        found = series(prometheus, job)
        assert found == expected({**target, "instance": address(job)}, dropped), job
        # The same, said plainly.
        entries = of(found, "conntrack_entries")
        (node,) = [item for item in entries if not {"pod", "pod_uid"} & set(item)]
        assert "namespace" not in node, job
        (web,) = of(found, "conntrack_entries", **TEAM_A)
        assert web["namespace"] == "team-a" and web["pod"] == "web-1", job
        (dns,) = of(found, "conntrack_entries", namespace=NAMESPACE)
        assert dns["pod"] == SAME_NAMESPACE["pod"] != EXPORTER_POD, job
        for item in found:
            assert item["node"] == NODE and item["instance"] == address(job), (job, item)
            assert not {"container", "service", "endpoint"} & set(item), (job, item)
            assert item.get("pod") != EXPORTER_POD, (job, item)


def test_without_the_chart_labeldrop_or_with_it_on_the_series_labels_go_wrong(prometheus):
    """Why the labeldrop is on the target: the same exposition through the ServiceMonitor
    with honorLabels alone, and with the labeldrop in metricRelabelings instead."""
    # honorLabels alone: the node's series, and a pod's known only by its uid, say they are
    # the exporter's pod; the pods' series get the exporter's container, service and endpoint
    # beside their own pod.
    found = series(prometheus, "service-monitor-honor-labels-alone")
    exporters = {"namespace": NAMESPACE, "pod": EXPORTER_POD, "container": "exporter"}
    exporters |= {"service": FULLNAME, "endpoint": "metrics"}
    mislabelled = of(found, "conntrack_entries", **exporters)
    assert len(mislabelled) == 2
    assert {item.get("pod_uid") for item in mislabelled} == {None, BY_UID["pod_uid"]}
    (web,) = of(found, "conntrack_entries", **TEAM_A)
    assert web["service"] == FULLNAME and web["container"] == "exporter"
    # On the series: the pods' own namespace and pod go too, and their series fall onto the
    # node's (same labels, one sample kept per scrape): the pods cannot be told apart.
    found = series(prometheus, "service-monitor-labeldrop-on-the-series")
    entries = of(found, "conntrack_entries")
    assert not any("namespace" in item or "pod" in item for item in entries)
    assert len(entries) < sum(1 for name, _, _ in EXPOSED if name == "conntrack_entries")


def test_the_monitors_limits_reach_prometheus_and_fail_the_scrape_past_them(prometheus):
    """sampleLimit and labelLimit as prometheus-operator passes them (sample_limit,
    label_limit): at the exposition's own counts every series arrives; one below, the whole
    scrape fails (up 0, no series at all), which ConntrackExporterDown would report. The
    label count includes __name__ and the target's labels (job, instance, node)."""
    at = "pod-monitor-at-the-limits"
    assert series(prometheus, at) == expected({"job": JOB, "node": NODE, "instance": address(at)})
    for job in sorted(FAILING):
        found = series(prometheus, job)
        assert [item["__name__"] for item in found] == ["up"], job
        assert prometheus.query(f'up{{instance="{address(job)}"}} == 0'), job
