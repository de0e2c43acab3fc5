"""The Prometheus rules in grafana/rules: promtool's checks and unit tests, and what promtool does
not check: annotations, runbook links, test coverage of every alert, and that every metric a
rule reads is one the exporter exposes."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.dashboards import generate

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "grafana" / "rules" / "conntrack-exporter.rules.yml"
RUNBOOKS = ROOT / "grafana" / "runbooks.md"
RULE_TESTS = sorted((ROOT / "tests" / "rules").glob("*.yml"))
GOLDEN = sorted((ROOT / "tests" / "golden").glob("*.prom"))
# The pods collector's health metrics as issue 12 names them, until its golden file exists
# (written concurrently): read only while no golden file has a conntrack_exporter_pod_* sample.

RUNBOOK_BASE = (
    "https://github.com/conntrack-exporter/conntrack-exporter/blob/main/grafana/runbooks.md#"
)
NODE_TEMPLATE = "{{ with $labels.node }}{{ . }}{{ else }}{{ $labels.instance }}{{ end }}"
# A pod alert names the pod by whichever label it has.
POD_TEMPLATE = (
    "{{ with $labels.pod }}pod {{ $labels.namespace }}/{{ . }}{{ else }}"
    "{{ with $labels.pod_uid }}pod uid {{ . }}{{ else }}"
    "container cgroup {{ $labels.cgroup }}{{ end }}{{ end }}"
)
# The host table alerts name the pod on the node holding the most of the table's entries, both
# directions summed, when the table scan names pods (a template query, evaluated when the alert
# fires); no pod holding an entry, nothing.
TOP_POD_ALERTS = {
    "ConntrackTableNearlyFull",
    "ConntrackTableNearlyFullCritical",
    "ConntrackTableFull",
}
TOP_POD_TEMPLATE = (
    '{{- with query (printf "topk(1, sum by (namespace, pod, pod_uid, cgroup) '
    '(conntrack_table_pod_entries{instance=%q, job=%q}) > 0)" $labels.instance $labels.job) }} '
    "{{- $top := first . }} Of the pods on the node, "
    "{{ with $top.Labels.pod }}pod {{ $top.Labels.namespace }}/{{ . }}{{ else }} "
    "{{- with $top.Labels.pod_uid }}pod uid {{ . }}{{ else }} "
    "{{- with $top.Labels.cgroup }}container cgroup {{ . }}{{ end }}{{ end }}{{ end }} "
    "holds the most entries: {{ $top.Value | humanize }} at the last table scan "
    "(conntrack_table_pod_entries).{{ end }}"
)
TOP_POD_SENTENCE = re.compile(r" Of the pods on the node, .+ holds the most entries: ")
TEMPLATE_QUERY = re.compile(r'\bquery \(printf "((?:[^"\\]|\\.)*)"')
# The names the dashboards and the end-to-end test rely on.
CONTRACT_RECORDINGS = {
    "instance:conntrack_entries:ratio",
    "instance:conntrack_nat_port_pool:ratio",
    "instance:socket_ephemeral_ports:ratio",
    "instance:socket_memory:pressure_ratio",
    "instance:socket_tcp_orphans:ratio",
    "instance:socket_tcp_timewait:ratio",
    "instance:socket_file_handles:ratio",
}
# A metric name of ours in an expression: not part of a recording rule's name (colons).
METRIC_NAME = re.compile(r"(?<![\w:])(?:conntrack|socket)_[a-z_]+(?![\w:])")
STRING_LITERAL = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
COUNTER_WINDOW = re.compile(r"\b(?:rate|increase)\([^()\[]*\[(\d+[smh])\]")
PROMTOOL_TIMEOUT = 120
POD_LABELS = ("pod", "pod_uid", "cgroup")
HOST_MATCHERS = tuple(f'{label}=""' for label in POD_LABELS)
POD_SERIES = re.compile(r'\b(?:pod|pod_uid|cgroup)="[^"]+"')
RECORDING_NAME = re.compile(r"(?<![\w:])[a-z_]+:[a-z_]+:[a-z_]+(?![\w:])")


def load_rules() -> list[dict]:
    return yaml.safe_load(RULES.read_text())["groups"]


def rules_of(kind: str) -> list[dict]:
    return [rule for group in load_rules() for rule in group["rules"] if kind in rule]


def alerts() -> list[dict]:
    return rules_of("alert")


def alert_ids() -> list[str]:
    return [f"{rule['alert']}-{rule['labels']['severity']}" for rule in alerts()]


def seconds(duration: str) -> int:
    return int(duration[:-1]) * {"s": 1, "m": 60, "h": 3600}[duration[-1]]


def exported_metrics() -> set[str]:
    """Every sample name in the golden expositions of the collectors."""
    names = set()
    for path in GOLDEN:
        for line in path.read_text().splitlines():
            if line and not line.startswith("#"):
                names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def metrics_in(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(STRING_LITERAL.sub('""', expr)))


def selectors_of(expr: str, name: str) -> list[str]:
    """The `{...}` of every selector of `name` in `expr` ("" where it has none)."""
    pattern = rf"(?<![\w:]){re.escape(name)}(?![\w:])(\{{[^}}]*\}})?"
    return [m.group(1) or "" for m in re.finditer(pattern, STRING_LITERAL.sub('""', expr))]


def is_pod_rule(rule: dict) -> bool:
    return rule.get("alert", "").startswith("Pod") or rule.get("record", "").startswith("pod:")


def pod_metrics_read(rule: dict) -> set[str]:
    """The metrics pods also report that a rule reads, itself or through a recording rule."""
    recorded = {record["record"]: record["expr"] for record in rules_of("record")}
    exprs = [rule["expr"]]
    exprs += [recorded[name] for name in RECORDING_NAME.findall(rule["expr"]) if name in recorded]
    return {name for expr in exprs for name in metrics_in(expr) if generate.reported_by_pods(name)}


def runbook_sections() -> list[str]:
    return re.findall(r"^## (.+?)\s*$", RUNBOOKS.read_text(), flags=re.MULTILINE)


def alert_test_cases() -> list[dict]:
    """Every alert_rule_test item of every promtool test file."""
    cases = []
    for path in RULE_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            cases.extend(test.get("alert_rule_test") or [])
    return cases


def expr_tests() -> list[dict]:
    cases = []
    for path in RULE_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            cases.extend(test.get("promql_expr_test") or [])
    return cases


# -- promtool ---------------------------------------------------------------------------------


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not found (make test installs it: apt package prometheus)")
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [promtool(), *args],
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT,
        cwd=ROOT,
    )


def test_promtool_check_rules_finds_every_rule():
    result = run_promtool("check", "rules", str(RULES))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    expected = sum(len(group["rules"]) for group in load_rules())
    assert re.search(rf"\bSUCCESS: {expected} rules found\b", output), output


def test_promtool_unit_tests_pass():
    assert RULE_TESTS, "no promtool test files in tests/rules"
    result = run_promtool("test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


# -- the rule file ----------------------------------------------------------------------------


def test_groups_and_recording_rule_names():
    groups = {group["name"]: group for group in load_rules()}
    assert set(groups) == {"conntrack-exporter.recording", "conntrack-exporter.alerts"}
    recorded = {rule["record"] for rule in groups["conntrack-exporter.recording"]["rules"]}
    assert recorded >= CONTRACT_RECORDINGS
    assert all("alert" in rule for rule in groups["conntrack-exporter.alerts"]["rules"])


def test_no_alert_name_at_two_severities():
    """Each alert name is one rule: an alert at two severities is two names (X and
    XCritical). A name shared across severities lets an inhibit rule that compares only
    `alertname` and `namespace` (kube-prometheus-stack's default) silence one node's warning
    with another node's critical: the host alerts carry no namespace, and a label absent on
    both sides counts as equal (tests/test_alertmanager.py shows it in a real Alertmanager)."""
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    for rule in alerts():
        if rule["labels"]["severity"] == "critical" and rule["alert"].endswith("Critical"):
            warning = rule["alert"].removesuffix("Critical")
            assert warning in names, warning


@pytest.mark.parametrize("rule", alerts(), ids=alert_ids())
def test_alert_has_severity_and_annotations(rule):
    assert set(rule["labels"]) == {"severity"}
    assert rule["labels"]["severity"] in {"warning", "critical"}
    annotations = rule["annotations"]
    assert set(annotations) == {"summary", "description", "runbook_url"}
    assert annotations["summary"].strip()
    description = annotations["description"]
    assert NODE_TEMPLATE in description, "the description must name the node"
    if not rule["expr"].strip().endswith("== 0"):
        assert "$value" in description, "the description must give the value"
    assert annotations["runbook_url"] == RUNBOOK_BASE + rule["alert"].lower()


@pytest.mark.parametrize("rule", [r for r in alerts() if is_pod_rule(r)], ids=str)
def test_pod_alert_names_the_pod(rule):
    assert POD_TEMPLATE in rule["annotations"]["description"]
    assert "$value" in rule["annotations"]["description"]


@pytest.mark.parametrize("rule", [r for r in alerts() if r["alert"] in TOP_POD_ALERTS], ids=str)
def test_table_alerts_end_with_the_top_pod(rule):
    assert rule["annotations"]["description"].endswith(TOP_POD_TEMPLATE)


def test_template_queries_read_exported_metrics():
    """A query of an annotation's template reads metrics the exporter exposes, like the
    rules' expressions (promtool checks neither the names nor, until it fires, the syntax)."""
    exported = exported_metrics()
    queries = [
        (rule["alert"], query)
        for rule in alerts()
        for text in rule["annotations"].values()
        for query in TEMPLATE_QUERY.findall(text)
    ]
    assert len(queries) >= len(TOP_POD_ALERTS)
    for name, query in queries:
        metrics = metrics_in(query)
        assert metrics and metrics <= exported, (name, query)
        assert not any(generate.reported_by_pods(metric) for metric in metrics), (name, query)


@pytest.mark.parametrize("rule", alerts(), ids=alert_ids())
def test_alert_waits_longer_than_its_counter_window(rule):
    """One burst of a counter keeps rate()/increase() above 0 for one window: `for:` must be
    at least the window, or a single burst fires."""
    pending = seconds(rule.get("for", "0s"))
    assert pending > 0, "every alert needs a `for:` so that a spike does not fire"
    for window in COUNTER_WINDOW.findall(rule["expr"]):
        assert seconds(window) <= pending, (window, rule["for"])


@pytest.mark.parametrize("kind", ["alert", "record"])
def test_expressions_read_only_exported_metrics(kind):
    exported = exported_metrics()
    assert "conntrack_stat_drop_total" in exported  # the golden files were read
    for rule in rules_of(kind):
        unknown = metrics_in(rule["expr"]) - exported
        assert not unknown, f"{rule[kind]}: not exposed by the exporter: {sorted(unknown)}"


def test_host_rules_select_the_hosts_series():
    """Every host rule selects `{pod="", pod_uid="", cgroup=""}` on a metric pods also report,
    so that it stays one series (one alert) per node."""
    host_rules = [
        rule for group in load_rules() for rule in group["rules"] if not is_pod_rule(rule)
    ]
    checked = 0
    for rule in host_rules:
        for name in metrics_in(rule["expr"]):
            if not generate.reported_by_pods(name):
                continue
            for matchers in selectors_of(rule["expr"], name):
                missing = [m for m in HOST_MATCHERS if m not in matchers]
                assert not missing, f"{rule.get('alert') or rule['record']}: {name}{matchers}"
                checked += 1
    assert checked >= 9  # the test found the selectors


def test_pod_rules_leave_the_hosts_series_out():
    """A pod rule reads every series of a metric but the host's: `X unless X{pod="", ...}`,
    the same function of the same window on both sides."""
    pod_rules = [rule for group in load_rules() for rule in group["rules"] if is_pod_rule(rule)]
    assert len(pod_rules) >= 4
    host = "{" + ", ".join(HOST_MATCHERS) + "}"
    for rule in pod_rules:
        name = rule.get("alert") or rule["record"]
        expr = " ".join(rule["expr"].split())
        for metric in metrics_in(expr):
            if not generate.reported_by_pods(metric):
                continue
            bare = re.search(rf"(\w+\()?{metric}(\[\w+\])?\)? unless", expr)
            assert bare, f"{name}: {metric} without `unless` the host's series"
            function, window = bare.group(1) or "", bare.group(2) or ""
            closing = ")" if function else ""
            assert f"unless {function}{metric}{host}{window}{closing}" in expr, name


def test_pod_metric_list_covers_the_pods_collector():
    """Every metric the golden files show with a pod label is in REPORTED_BY_PODS (the host's
    rules must select the host's series on it) or is one of the table scan's breakdowns of
    the host's table by pod (POD_BREAKDOWNS: no pod's namespace reports them)."""
    per_pod = set()
    for path in GOLDEN:
        for line in path.read_text().splitlines():
            if line and not line.startswith("#") and POD_SERIES.search(line):
                per_pod.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    assert per_pod & generate.POD_BREAKDOWNS and per_pod - generate.POD_BREAKDOWNS
    assert exported_metrics() >= generate.POD_BREAKDOWNS
    assert not {name for name in generate.POD_BREAKDOWNS if generate.reported_by_pods(name)}
    others = per_pod - generate.POD_BREAKDOWNS
    assert {name for name in others if not generate.reported_by_pods(name)} == set()


def test_selector_and_pod_metric_helpers():
    expr = 'sum(increase(a_total{pod="", cgroup="}"}[5m])) / a_total / a_totals'
    assert selectors_of(expr, "a_total") == ['{pod="", cgroup=""}', ""]
    assert generate.reported_by_pods("conntrack_stat_insert_failed_total")
    assert generate.reported_by_pods("socket_inuse")
    assert not generate.reported_by_pods("conntrack_entries_limit")
    assert not generate.reported_by_pods("conntrack_stat_total")


def test_metric_name_extraction():
    expr = (
        'label_replace(time() - socket_ports_scan_timestamp_seconds, "collector", '
        '"socket_ports", "", "") or instance:conntrack_entries:ratio > 0.5 and '
        "sum without (cpu) (increase(conntrack_stat_drop_totl[2m]))"
    )
    assert metrics_in(expr) == {"socket_ports_scan_timestamp_seconds", "conntrack_stat_drop_totl"}


# -- runbooks ---------------------------------------------------------------------------------


def test_every_alert_has_a_runbook_section_and_every_section_an_alert():
    sections = runbook_sections()
    assert len(sections) == len(set(sections)), "a runbook section appears twice"
    names = {rule["alert"] for rule in alerts()}
    assert set(sections) == names
    anchors = {section.lower() for section in sections}
    for rule in alerts():
        assert rule["annotations"]["runbook_url"].rsplit("#", 1)[1] in anchors


def heading_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def runbook_anchors() -> set[str]:
    """The anchors of every section and subsection (## and ###) of the runbooks."""
    headings = re.findall(r"^#{2,3} (.+?)\s*$", RUNBOOKS.read_text(), flags=re.MULTILINE)
    return {heading_anchor(heading) for heading in headings}


def runbook_section(name: str) -> str:
    """The text of one alert's section, its subsections included."""
    text = RUNBOOKS.read_text()
    start = text.index(f"\n## {name}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def test_runbook_links_between_sections_resolve():
    anchors = runbook_anchors()
    assert {section.lower() for section in runbook_sections()} <= anchors
    for anchor in re.findall(r"\]\(#([^)]+)\)", RUNBOOKS.read_text()):
        assert anchor in anchors, anchor


def test_table_full_runbooks_link_to_acting_on_one_pod():
    """The runbooks of the alerts that name the top pod say how to act on one pod."""
    anchor = heading_anchor("One pod filling the table")
    assert anchor in runbook_anchors()
    for name in TOP_POD_ALERTS:
        assert f"](#{anchor})" in runbook_section(name), name
    assert heading_anchor("A pod's net-ns (x)") == "a-pods-net-ns-x"


# -- coverage of the promtool tests -----------------------------------------------------------


def test_test_files_load_the_rule_file():
    for path in RULE_TESTS:
        test_file = yaml.safe_load(path.read_text())
        files = [(path.parent / name).resolve() for name in test_file["rule_files"]]
        assert files == [RULES], path


def test_every_alert_fires_and_stays_silent_in_some_test():
    names = {rule["alert"] for rule in alerts()}
    severities = {(rule["alert"], rule["labels"]["severity"]) for rule in alerts()}
    cases = alert_test_cases()
    tested = {case["alertname"] for case in cases}
    assert tested <= names, f"tests of alerts that do not exist: {sorted(tested - names)}"
    silent = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    fired = {
        (case["alertname"], alert["exp_labels"]["severity"])
        for case in cases
        for alert in case.get("exp_alerts") or []
    }
    assert names <= silent, f"never tested silent: {sorted(names - silent)}"
    assert severities <= fired, f"never tested firing: {sorted(severities - fired)}"


def test_host_alerts_are_tested_beside_pod_series():
    """Every host alert on a metric pods also report has a promtool case with pod series beside
    the host's where it stays silent, and one where it fires for the host alone."""
    silent, fired = set(), set()
    for path in RULE_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            series = [item["series"] for item in test.get("input_series") or []]
            if not any(POD_SERIES.search(s) for s in series):
                continue
            for case in test.get("alert_rule_test") or []:
                expected = case.get("exp_alerts") or []
                if not expected:
                    silent.add(case["alertname"])
                elif not any(set(POD_LABELS) & set(a["exp_labels"]) for a in expected):
                    fired.add(case["alertname"])
    host_alerts = {
        rule["alert"] for rule in alerts() if not is_pod_rule(rule) and pod_metrics_read(rule)
    }
    assert len(host_alerts) >= 7, host_alerts
    assert host_alerts <= silent, f"never silent beside pods: {sorted(host_alerts - silent)}"
    assert host_alerts <= fired, f"never fired beside pods: {sorted(host_alerts - fired)}"


def test_pod_alerts_fire_for_each_kind_of_pod():
    """Each pod alert fires in some case for a named pod, a pod known by uid and a container
    outside Kubernetes: every branch of the description's template is rendered."""
    kinds: dict[str, set[str]] = {}
    for case in alert_test_cases():
        for alert in case.get("exp_alerts") or []:
            found = set(POD_LABELS) & set(alert["exp_labels"])
            kinds.setdefault(case["alertname"], set()).update(found)
    for rule in alerts():
        if is_pod_rule(rule):
            assert kinds.get(rule["alert"]) == set(POD_LABELS), rule["alert"]
        else:
            assert not kinds.get(rule["alert"]), rule["alert"]


def test_table_alerts_are_tested_with_and_without_a_top_pod():
    """Each table alert fires in some case beside per-pod series with the top pod named, and
    in another without the sentence (no pod holding an entry, or no per-pod series)."""
    named, unnamed = set(), set()
    for path in RULE_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            series = " ".join(item["series"] for item in test.get("input_series") or [])
            for case in test.get("alert_rule_test") or []:
                for alert in case.get("exp_alerts") or []:
                    description = (alert.get("exp_annotations") or {}).get("description", "")
                    if TOP_POD_SENTENCE.search(" ".join(description.split())):
                        assert "conntrack_table_pod_entries{" in series, case["alertname"]
                        named.add(case["alertname"])
                    elif description:
                        unnamed.add(case["alertname"])
    assert named == TOP_POD_ALERTS
    assert unnamed >= TOP_POD_ALERTS


def test_every_recording_rule_value_is_tested():
    recorded = {rule["record"] for rule in rules_of("record")}
    tested = {case["expr"].strip() for case in expr_tests() if case.get("exp_samples")}
    assert recorded <= tested, f"untested recording rules: {sorted(recorded - tested)}"
