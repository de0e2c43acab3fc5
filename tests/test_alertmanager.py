"""Our alerts in a real Alertmanager: inhibit rules stay per node and per pod.

Every alerting rule of grafana/rules becomes an alert (its `alertname` and `labels`, plus the
target labels a scrape gives it: instance, job, node; a pod alert also the pod's labels) for
two nodes and for five pods, posted to Alertmanager's API; its answer says which alerts are
inhibited, and by which (`status.inhibitedBy`).

- Under kube-prometheus-stack's default inhibit rules (a critical silences a warning with the
  same `namespace` and `alertname`) no alert of ours is inhibited: the host alerts carry no
  `namespace` and pods of one namespace share it, so a name at two severities would let a
  critical on one node or pod silence the warning of every other. A control shows that it
  would: the warning and its critical under one shared name are inhibited across nodes.
- With the inhibit rules the runbooks recommend (parsed out of grafana/runbooks.md, so the
  documentation is what runs) a warning is inhibited while its critical fires on the same node
  or pod, and on no other.
- The README's rule that silences node-mixin's NodeHighNumberConntrackEntriesUsed while ours
  fire does so on the same node only (it compares `node`; `instance` differs in its port).

Alertmanager names one source per inhibited alert, the first it finds: where nothing may be
inhibited, every alert of every node and pod fires at once, so that none inhibited means no
pair inhibits; where a warning must be inhibited by its own critical, that critical fires on
some nodes and pods only.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "grafana" / "rules" / "conntrack-exporter.rules.yml"
RUNBOOKS = ROOT / "grafana" / "runbooks.md"
ALERTMANAGER = Path("/usr/bin/prometheus-alertmanager")
START_TIMEOUT = 30.0
SETTLE_TIMEOUT = 15.0
JOB = "conntrack-exporter"

# kube-prometheus-stack's default `alertmanager.config.inhibit_rules` (its values.yaml): a
# critical silences a warning or info alert, and a warning an info alert, of the same
# namespace and alertname; InfoInhibitor silences the info alerts of its namespace; recent
# versions also silence InfoInhibitor itself while anything fires.
KPS_INHIBIT_RULES = [
    {
        "source_matchers": ["severity = critical"],
        "target_matchers": ["severity =~ warning|info"],
        "equal": ["namespace", "alertname"],
    },
    {
        "source_matchers": ["severity = warning"],
        "target_matchers": ["severity = info"],
        "equal": ["namespace", "alertname"],
    },
    {
        "source_matchers": ["alertname = InfoInhibitor"],
        "target_matchers": ["severity = info"],
        "equal": ["namespace"],
    },
    {"target_matchers": ["alertname = InfoInhibitor"]},
]

NODES = {"node-a": "10.0.0.1:9371", "node-b": "10.0.0.2:9371"}
# Five pods: three of one namespace on two nodes, one known by its uid only, one container
# outside Kubernetes known by its cgroup. Each with its node.
PODS = (
    ("node-a", {"namespace": "team-a", "pod": "web-0"}),
    ("node-a", {"namespace": "team-a", "pod": "web-1"}),
    ("node-b", {"namespace": "team-a", "pod": "web-2"}),
    ("node-a", {"pod_uid": "0b5c6f1e-5a43-4c1e-9d1a-2f4c9e7b8a10"}),
    ("node-b", {"cgroup": "/machine.slice/libpod-4f2a9c.scope"}),
)
# Posted after every other alert: InfoInhibitor inhibits the info alert of its namespace under
# kube-prometheus-stack's rules. Once Alertmanager reports it inhibited, its inhibitor has
# taken in every alert posted before (it reads them in order).
SENTINEL_NAMESPACE = "sentinel-of-the-test"
SENTINEL = (
    {"alertname": "InfoInhibitor", "severity": "none", "namespace": SENTINEL_NAMESPACE},
    {"alertname": "SentinelInfo", "severity": "info", "namespace": SENTINEL_NAMESPACE},
)

Labels = dict[str, str]
Subject = tuple[tuple[str, str], ...]
Key = tuple[str, str, Subject]


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def is_pod_alert(rule: dict) -> bool:
    return rule["alert"].startswith("Pod")


def warning_critical_pairs() -> dict[str, str]:
    """{critical: its warning} for every alert at two severities: X and XCritical."""
    severity = {rule["alert"]: rule["labels"]["severity"] for rule in alert_rules()}
    pairs = {
        name: name.removesuffix("Critical")
        for name in severity
        if name.endswith("Critical")
        and severity[name] == "critical"
        and name.removesuffix("Critical") in severity
    }
    assert all(severity[warning] == "warning" for warning in pairs.values()), pairs
    return pairs


def host_labels(node: str, namespace: str | None = None) -> Labels:
    """A node's target labels. `namespace`: as with a scrape that keeps the exporter pod's own
    (the chart's monitors drop it)."""
    labels = {"instance": NODES[node], "job": JOB, "node": node}
    return {**labels, "namespace": namespace} if namespace else labels


def pod_labels(node: str, pod: Labels) -> Labels:
    return {"instance": NODES[node], "job": JOB, "node": node, **pod}


def subject_of(labels: Labels) -> Subject:
    """What an alert is about: every label but its name and severity."""
    return tuple(sorted((k, v) for k, v in labels.items() if k not in {"alertname", "severity"}))


def key(labels: Labels) -> Key:
    return labels["alertname"], labels["severity"], subject_of(labels)


def our_alerts(
    host_namespace: str | None = None, criticals_on: list[Labels] | None = None
) -> list[Labels]:
    """Every alert of the rule file on every node, or every pod, it is about. `criticals_on`:
    the nodes and pods (their target labels) where the criticals of the warning/critical pairs
    fire; everywhere if None."""
    pairs = warning_critical_pairs()
    where = None if criticals_on is None else {subject_of(labels) for labels in criticals_on}
    targets = [(False, host_labels(node, host_namespace)) for node in NODES]
    targets += [(True, pod_labels(node, pod)) for node, pod in PODS]
    alerts = []
    for is_pod, target in targets:
        for rule in alert_rules():
            if is_pod_alert(rule) != is_pod:
                continue
            if rule["alert"] in pairs and where is not None and subject_of(target) not in where:
                continue
            alerts.append({"alertname": rule["alert"], **rule["labels"], **target})
    return alerts


def runbook_inhibit_rules() -> list[dict]:
    """The `inhibit_rules` of the runbooks' one YAML block that has them."""
    blocks = re.findall(r"^( *)```yaml\n(.*?)^\1```", RUNBOOKS.read_text(), re.S | re.M)
    found = [
        yaml.safe_load(textwrap.dedent(body))
        for _, body in blocks
        if re.search(r"^\s*inhibit_rules:", body, re.M)
    ]
    assert len(found) == 1, "one YAML block of inhibit_rules in grafana/runbooks.md"
    return found[0]["inhibit_rules"]


def config(inhibit_rules: list[dict]) -> dict:
    return {
        "route": {"receiver": "null", "group_by": ["namespace"]},
        "receivers": [{"name": "null"}],
        "inhibit_rules": inhibit_rules,
    }


# -- a real Alertmanager ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(url: str, body: object | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read()
    return json.loads(text) if text.strip() else None


class Alertmanager:
    def __init__(self, url: str):
        self.url = url

    def post(self, alerts: list[Labels]) -> None:
        now = datetime.now(UTC)
        body = [
            {
                "labels": labels,
                "startsAt": now.isoformat(),
                "endsAt": (now + timedelta(hours=1)).isoformat(),
            }
            for labels in alerts
        ]
        http(f"{self.url}/api/v2/alerts", body)

    def alerts(self) -> list[dict]:
        answer = http(f"{self.url}/api/v2/alerts")
        assert isinstance(answer, list)
        return answer

    def inhibited(self, alerts: list[Labels]) -> dict[Key, list[Key]]:
        """Post `alerts`, then the sentinel; once the sentinel is inhibited, the alerts of
        `alerts` Alertmanager reports inhibited, each with the alerts that inhibit it."""
        self.post([*alerts, *SENTINEL])
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while True:
            answer = self.alerts()
            sentinel = [a for a in answer if a["labels"]["alertname"] == "SentinelInfo"]
            if sentinel and sentinel[0]["status"]["inhibitedBy"]:
                break
            assert time.monotonic() < deadline, "the sentinel alert was never inhibited"
            time.sleep(0.1)
        ours = [a for a in answer if a["labels"].get("namespace") != SENTINEL_NAMESPACE]
        assert sorted(key(a["labels"]) for a in ours) == sorted(key(a) for a in alerts)
        by_fingerprint = {a["fingerprint"]: key(a["labels"]) for a in answer}
        return {
            key(a["labels"]): [by_fingerprint[fp] for fp in a["status"]["inhibitedBy"]]
            for a in ours
            if a["status"]["inhibitedBy"]
        }


@contextmanager
def alertmanager(tmp_path: Path, inhibit_rules: list[dict]) -> Iterator[Alertmanager]:
    """Alertmanager on a free loopback port, without a cluster, with these inhibit rules."""
    if not ALERTMANAGER.is_file():
        pytest.skip(
            f"{ALERTMANAGER} not found (make test installs it: apt package prometheus-alertmanager)"
        )
    config_file = tmp_path / "alertmanager.yml"
    config_file.write_text(yaml.safe_dump(config(inhibit_rules)))
    log_path = tmp_path / "alertmanager.log"
    port = free_port()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                str(ALERTMANAGER),
                f"--config.file={config_file}",
                f"--storage.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--cluster.listen-address=",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT
        while not ready(url):
            assert process.poll() is None, f"Alertmanager exited: {log_path.read_text()}"
            assert time.monotonic() < deadline, f"Alertmanager not ready: {log_path.read_text()}"
            time.sleep(0.1)
        yield Alertmanager(url)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


# -- the tests --------------------------------------------------------------------------------


def test_the_alerts_cover_every_rule_node_and_pod():
    alerts = our_alerts()
    assert {labels["alertname"] for labels in alerts} == {r["alert"] for r in alert_rules()}
    assert len({key(labels) for labels in alerts}) == len(alerts)
    hosts = [rule for rule in alert_rules() if not is_pod_alert(rule)]
    pods = [rule for rule in alert_rules() if is_pod_alert(rule)]
    assert len(alerts) == len(hosts) * len(NODES) + len(pods) * len(PODS)
    assert warning_critical_pairs() == {
        "ConntrackTableNearlyFullCritical": "ConntrackTableNearlyFull",
        "PodConntrackTableNearlyFullCritical": "PodConntrackTableNearlyFull",
    }


@pytest.mark.parametrize("host_namespace", [None, "monitoring"], ids=["chart", "namespaced"])
def test_kube_prometheus_stack_defaults_inhibit_nothing_across_nodes_or_pods(
    tmp_path, host_namespace
):
    """Every alert of ours on every node and pod at once: none is inhibited, so no critical on
    one node or pod silences an alert on another. `chart`: the host alerts carry no namespace,
    as the chart's monitors scrape them; `namespaced`: they carry one, the same on every node,
    as with a scrape that keeps the exporter pod's own."""
    with alertmanager(tmp_path, KPS_INHIBIT_RULES) as am:
        assert am.inhibited(our_alerts(host_namespace)) == {}


def test_control_one_name_at_two_severities_is_inhibited_across_nodes_and_pods(tmp_path):
    """The test above can fail: with each critical under its warning's name, as these alerts
    once were, firing on node-a and for pod team-a/web-0 only, kube-prometheus-stack's default
    rule silences the warning of node-b, and those of every other pod of team-a, the pod on
    node-b included."""
    pairs = warning_critical_pairs()
    web_0 = pod_labels("node-a", {"namespace": "team-a", "pod": "web-0"})
    alerts = [
        {**labels, "alertname": pairs.get(labels["alertname"], labels["alertname"])}
        for labels in our_alerts(criticals_on=[host_labels("node-a"), web_0])
    ]
    with alertmanager(tmp_path, KPS_INHIBIT_RULES) as am:
        result = am.inhibited(alerts)
    host_critical = key(
        {"alertname": "ConntrackTableNearlyFull", "severity": "critical", **host_labels("node-a")}
    )
    pod_critical = key(
        {"alertname": "PodConntrackTableNearlyFull", "severity": "critical", **web_0}
    )
    expected = {
        key({"alertname": "ConntrackTableNearlyFull", "severity": "warning", **labels}): [
            host_critical
        ]
        for labels in (host_labels("node-a"), host_labels("node-b"))
    }
    expected |= {
        key(
            {
                "alertname": "PodConntrackTableNearlyFull",
                "severity": "warning",
                **pod_labels(node, pod),
            }
        ): [pod_critical]
        for node, pod in PODS
        if pod.get("namespace") == "team-a"
    }
    assert result == expected


@pytest.mark.parametrize("host_namespace", [None, "monitoring"], ids=["chart", "namespaced"])
def test_the_runbooks_inhibit_rules_silence_a_warning_for_its_own_node_or_pod_only(
    tmp_path, host_namespace
):
    """kube-prometheus-stack's defaults and the runbooks' inhibit rules: the criticals fire on
    node-a, for the named pod team-a/web-0 and for the pod known by its uid; each inhibits the
    warning of the same name on its own node or pod, and nothing else: not node-b's, not the
    other pods' of team-a (web-1 on the same node), not the container's on node-b."""
    rules = runbook_inhibit_rules()
    pairs = warning_critical_pairs()
    assert {(rule["source_matchers"][0], rule["target_matchers"][0]) for rule in rules} == {
        (f'alertname="{c}"', f'alertname="{w}"') for c, w in pairs.items()
    }
    critical_on = [
        host_labels("node-a", host_namespace),
        pod_labels("node-a", {"namespace": "team-a", "pod": "web-0"}),
        pod_labels("node-a", {"pod_uid": "0b5c6f1e-5a43-4c1e-9d1a-2f4c9e7b8a10"}),
    ]
    alerts = our_alerts(host_namespace, criticals_on=critical_on)
    with alertmanager(tmp_path, KPS_INHIBIT_RULES + rules) as am:
        result = am.inhibited(alerts)
    expected = {}
    for labels in critical_on:
        for critical, warning in pairs.items():
            if critical.startswith("Pod") == ("pod_uid" in labels or "pod" in labels):
                source = key({"alertname": critical, "severity": "critical", **labels})
                expected[key({"alertname": warning, "severity": "warning", **labels})] = [source]
    assert len(expected) == len(critical_on)
    assert result == expected


def readme_node_mixin_inhibit_rules() -> list[dict]:
    """The README's inhibit rule for node-mixin's NodeHighNumberConntrackEntriesUsed."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^( *)```yaml\n(.*?)^\1```", text, re.S | re.M)
    found = [
        yaml.safe_load(textwrap.dedent(body))
        for _, body in blocks
        if "inhibit_rules:" in body and "NodeHighNumberConntrackEntriesUsed" in body
    ]
    assert len(found) == 1, "one YAML block of inhibit_rules for node-mixin in README.md"
    return found[0]["inhibit_rules"]


def node_mixin_alert(node: str) -> Labels:
    """NodeHighNumberConntrackEntriesUsed as kube-prometheus-stack's node-exporter monitor
    labels it, with the `node` label the README asks for: node_exporter's port in `instance`,
    its own pod and namespace."""
    return {
        "alertname": "NodeHighNumberConntrackEntriesUsed",
        "severity": "warning",
        "instance": NODES[node].replace(":9371", ":9100"),
        "job": "node-exporter",
        "namespace": "monitoring",
        "pod": f"kube-prometheus-stack-prometheus-node-exporter-{node}",
        "container": "node-exporter",
        "endpoint": "http-metrics",
        "service": "kube-prometheus-stack-prometheus-node-exporter",
        "node": node,
    }


@pytest.mark.parametrize("equal", [None, ["instance"]], ids=["readme", "on-instance"])
def test_the_readme_silences_node_mixins_alert_for_the_same_node_only(tmp_path, equal):
    """Ours fire on node-a only, node-mixin's on both nodes. The README's rule (compare
    `node`) silences node-mixin's on node-a, not node-b's; `on-instance`: comparing
    `instance` instead silences nothing (ports 9100 and 9371), as the README says."""
    rules = readme_node_mixin_inhibit_rules()
    assert [rule["equal"] for rule in rules] == [["node"]]
    if equal is not None:
        rules = [{**rule, "equal": equal} for rule in rules]
    table_alerts = {"ConntrackTableNearlyFull", "ConntrackTableNearlyFullCritical"}
    alerts = [
        labels
        for labels in our_alerts()
        if labels["alertname"] not in table_alerts or labels["node"] == "node-a"
    ]
    alerts += [node_mixin_alert("node-a"), node_mixin_alert("node-b")]
    with alertmanager(tmp_path, KPS_INHIBIT_RULES + runbook_inhibit_rules() + rules) as am:
        result = am.inhibited(alerts)
    node_mixin = {k: v for k, v in result.items() if k[0] == "NodeHighNumberConntrackEntriesUsed"}
    if equal is not None:
        assert node_mixin == {}
        return
    assert list(node_mixin) == [key(node_mixin_alert("node-a"))]
    [source] = node_mixin[key(node_mixin_alert("node-a"))]
    assert source[0] in table_alerts and source[2] == subject_of(host_labels("node-a"))
