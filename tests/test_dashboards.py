"""The Grafana dashboards: generated from grafana/dashboards/generate.py, committed as JSON.

Pure tests: the committed JSON is what the generator writes, and every panel is one Grafana can
show (datasource, targets, unit, ids) with queries that filter on the template variables and
name only metrics the exporter exposes (the golden files) or the recording rules.
"""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.dashboards import DASHBOARDS_DIR, generate

ROOT = Path(__file__).resolve().parent.parent
GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
RULES_FILE = ROOT / "grafana" / "rules" / "conntrack-exporter.rules.yml"


FILES = ("conntrack.json", "sockets.json")
UIDS = {
    "conntrack.json": "conntrack-exporter-conntrack",
    "sockets.json": "conntrack-exporter-sockets",
}
CORE = {
    "conntrack.json": {
        "Table utilisation",
        "Entries vs limit",
        "Drops and early drops",
        "Insert failures and clash resolutions",
        "Entries by protocol and state",
        "Top sources",
        "Top destinations",
        "Scan health",
        "Collector status",
    },
    "sockets.json": {
        "Sockets in use",
        "TCP orphans vs limit",
        "TIME_WAIT vs limit",
        "Ephemeral ports: most used toward one destination vs range",
        "Ephemeral ports by destination",
        "File handles vs limit",
        "Listen queue overflows and drops",
        "UDP buffer and memory errors",
    },
}
# Other panels the issue names; they may be empty on some hosts (no SNAT, no tcp_mem).
NAMED = {
    "conntrack.json": {
        "NAT port pools",
        "Hash table",
        # Issue 13: the node's table by pod.
        "Pods filling the table",
        "SNAT ports by pod",
    },
    "sockets.json": {
        "TCP memory vs pressure and limit",
        "TCP memory pressure and aborts",
        "Socket scan health",
        # Issue 12: pods' network namespaces.
        "Pods with the most listen queue overflows",
        "Pods with the most UDP receive buffer errors",
        "Pods with the most sockets in use",
        "Pods with the most conntrack entries",
        "Pod discovery",
    },
}
# Every recording rule the rule file defines: a dashboard may use them, a core panel may not.
RECORDING_RULES = {
    rule["record"]
    for group in yaml.safe_load(RULES_FILE.read_text())["groups"]
    for rule in group["rules"]
    if "record" in rule
}
FILTERS = ('job=~"$job"', 'instance=~"$instance"', 'node=~"$node"')
HOST_MATCHERS = ('pod=""', 'pod_uid=""', 'cgroup=""')
POD_LABELS = ("namespace", "pod", "pod_uid", "cgroup")
# The pods collector's health metrics as issue 12 names them, until its golden file exists
# (written concurrently): read only while no golden file has a conntrack_exporter_pod_* name.
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NAME = re.compile(r"(?<![A-Za-z0-9_:])(?:[a-z_]+:[a-z_]+:[a-z_]+|(?:conntrack|socket)_[a-z_]+)")
_SELECTOR = r'{name}(?![A-Za-z0-9_:])(\{{(?:[^}}"]|"(?:[^"\\]|\\.)*")*\}})?'
_RANGE = re.compile(r"\[([^\]]*)\]")


def golden_metric_names() -> set[str]:
    names = set()
    for path in GOLDEN_DIR.glob("*.prom"):
        for line in path.read_text().splitlines():
            if line.startswith("# TYPE "):
                names.add(line.split()[2])
            elif line and not line.startswith("#"):
                names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def metric_names(expr: str) -> list[str]:
    """Metric and recording-rule names an expression references (label values left out)."""
    return _NAME.findall(_STRING.sub('""', expr))


def selectors(expr: str, name: str) -> list[str]:
    """The `{...}` of every selector of `name` in `expr` ("" where it has none)."""
    return [m.group(1) or "" for m in re.finditer(_SELECTOR.format(name=re.escape(name)), expr)]


def every_query(dashboard: dict) -> list[tuple[str, str]]:
    queries = list(generate.panel_queries(dashboard))
    queries += [
        (f"variable {v['name']}", v["query"])
        for v in dashboard["templating"]["list"]
        if v["type"] == "query"
    ]
    return queries


@pytest.fixture(scope="module", params=FILES)
def dashboard(request) -> tuple[str, dict]:
    name = request.param
    return name, json.loads((DASHBOARDS_DIR / name).read_text())


# --- generated, committed, deterministic ---------------------------------------------------------


@pytest.mark.parametrize("name", FILES)
def test_committed_json_is_the_generators_output(name):
    expected = generate.rendered()[name]
    committed = (DASHBOARDS_DIR / name).read_text()
    assert committed == expected, (
        f"grafana/dashboards/{name} differs from generate.py's output: run make dashboards"
    )


def test_generator_writes_sorted_indented_json_with_a_newline():
    for name, text in generate.rendered().items():
        assert text.endswith("}\n"), name
        assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n", name
    assert generate.rendered() == generate.rendered()


def test_check_names_the_file_that_drifted(tmp_path, capsys):
    assert generate.main(["--output", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)
    assert generate.main(["--check", "--output", str(tmp_path)]) == 0

    drifted = tmp_path / "sockets.json"
    drifted.write_text(drifted.read_text().replace("Sockets in use", "Sockets used", 1))
    capsys.readouterr()
    assert generate.main(["--check", "--output", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "sockets.json" in err and "conntrack.json" not in err

    (tmp_path / "conntrack.json").unlink()
    assert generate.main(["--check", "--output", str(tmp_path)]) == 1
    assert "conntrack.json" in capsys.readouterr().err


# --- dashboard-level ------------------------------------------------------------------------------


def test_uids_are_fixed_and_unique():
    uids = {name: json.loads((DASHBOARDS_DIR / name).read_text())["uid"] for name in FILES}
    assert uids == UIDS
    assert len(set(uids.values())) == len(uids)


def test_title_tags_refresh_time(dashboard):
    _, board = dashboard
    assert board["title"]
    assert "conntrack-exporter" in board["tags"]
    assert re.fullmatch(r"\d+[sm]", board["refresh"])
    assert board["time"]["to"] == "now" and board["time"]["from"].startswith("now-")
    assert "grafana/runbooks.md" in board["description"]


def test_the_dashboards_link_to_each_other(dashboard):
    name, board = dashboard
    other = next(uid for file, uid in UIDS.items() if file != name)
    links = [link for link in board["links"] if link.get("url") == f"/d/{other}"]
    assert links, f"{name} does not link to {other}"
    assert links[0]["includeVars"] and links[0]["keepTime"]


def test_template_variables(dashboard):
    _, board = dashboard
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert list(variables)[:4] == ["datasource", "job", "instance", "node"]

    datasource = variables["datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"

    job = variables["job"]
    assert job["type"] == "query"
    assert job["query"] == "label_values(conntrack_exporter_build_info, job)"

    for label in ("instance", "node"):
        variable = variables[label]
        assert variable["type"] == "query"
        assert variable["query"] == (
            f'label_values(conntrack_exporter_build_info{{job=~"$job"}}, {label})'
        )
        assert variable["multi"] is True
        assert variable["includeAll"] is True
        assert variable["allValue"] == ".*"

    for variable in (job, variables["instance"], variables["node"]):
        assert variable["datasource"] == DATASOURCE
        assert variable["refresh"] in (1, 2)


# --- panels ---------------------------------------------------------------------------------------


def test_every_panel_has_datasource_targets_unit_description(dashboard):
    _, board = dashboard
    panels = list(generate.iter_panels(board))
    assert panels
    for panel in panels:
        title = panel["title"]
        assert title, panel
        assert panel["datasource"] == DATASOURCE, title
        assert panel["fieldConfig"]["defaults"].get("unit"), title
        assert len(panel.get("description", "")) >= 80, title
        targets = panel.get("targets", [])
        assert targets, title
        for target in targets:
            assert target.get("expr", "").strip(), title
            assert target["datasource"] == DATASOURCE, title
        ref_ids = [target["refId"] for target in targets]
        assert all(ref_ids) and len(ref_ids) == len(set(ref_ids)), title


def test_panel_ids_are_unique(dashboard):
    _, board = dashboard
    ids = []
    for panel in board["panels"]:
        ids.append(panel["id"])
        ids.extend(nested["id"] for nested in panel.get("panels", []))
    assert all(isinstance(i, int) and i > 0 for i in ids)
    assert len(ids) == len(set(ids)), ids


def test_panels_fit_the_grid_without_overlapping(dashboard):
    _, board = dashboard
    taken: dict[tuple[int, int], str] = {}
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


def test_core_and_named_panels_exist(dashboard):
    name, board = dashboard
    titles = [panel["title"] for panel in generate.iter_panels(board)]
    assert CORE[name] <= set(titles), CORE[name] - set(titles)
    assert NAMED[name] <= set(titles), NAMED[name] - set(titles)
    assert set(generate.CORE_PANELS[name]) == CORE[name]


def test_core_panels_query_raw_exporter_metrics_only(dashboard):
    name, board = dashboard
    for title, expr in generate.panel_queries(board):
        if title in CORE[name]:
            assert not set(metric_names(expr)) & RECORDING_RULES, (title, expr)


def test_table_utilisation_is_a_ratio_with_thresholds():
    board = generate.load("conntrack.json")
    panel = next(p for p in generate.iter_panels(board) if p["title"] == "Table utilisation")
    defaults = panel["fieldConfig"]["defaults"]
    assert defaults["unit"] == "percentunit"
    steps = [step["value"] for step in defaults["thresholds"]["steps"]]
    assert 0.75 in steps and 0.9 in steps
    (expr,) = [target["expr"] for target in panel["targets"]]
    assert metric_names(expr) == ["conntrack_entries", "conntrack_entries_limit"]


def test_table_full_stat_counts_what_the_table_full_alert_fires_on():
    """Bug 6: the stat showed `drop` only while ConntrackTableFull fires on `drop` or
    `early_drop`, so on-call got the page and saw 0. Its one query sums the rates of every
    counter the alert reads."""
    rules = yaml.safe_load(RULES_FILE.read_text())["groups"]
    (alert,) = [
        rule
        for group in rules
        for rule in group["rules"]
        if rule.get("alert") == "ConntrackTableFull"
    ]
    counters = sorted(set(metric_names(alert["expr"])))
    assert counters == ["conntrack_stat_drop_total", "conntrack_stat_early_drop_total"]
    board = generate.load("conntrack.json")
    panel = next(p for p in generate.iter_panels(board) if p["title"] == generate.TABLE_FULL_STAT)
    assert panel["type"] == "stat"
    (expr,) = [target["expr"] for target in panel["targets"]]
    assert sorted(metric_names(expr)) == counters
    for counter in counters:
        (selector,) = selectors(expr, counter)
        assert f"sum(rate({counter}{selector}[$__rate_interval]))" in expr
    assert " + " in expr
    assert "early_drop" in panel["description"]


# --- queries --------------------------------------------------------------------------------------


def test_every_metric_name_is_exposed_by_the_exporter(dashboard):
    _, board = dashboard
    known = golden_metric_names() | RECORDING_RULES
    assert "conntrack_stat_drop_total" in known and "socket_inuse" in known
    for title, expr in every_query(board):
        names = metric_names(expr)
        assert names, (title, expr)
        unknown = set(names) - known
        assert not unknown, f"{title}: unknown metric {sorted(unknown)} in {expr}"


def test_every_query_filters_on_job_instance_and_node(dashboard):
    _, board = dashboard
    for title, expr in generate.panel_queries(board):
        for name in set(metric_names(expr)):
            for matchers in selectors(expr, name):
                missing = [f for f in FILTERS if f not in matchers]
                assert not missing, f"{title}: {name}{matchers} lacks {missing}"


def test_host_panels_select_the_hosts_series(dashboard):
    """A panel about the node reads the host's series of a metric pods also report: its sums
    and rates do not include the pods."""
    name, board = dashboard
    checked = 0
    for title, expr in generate.panel_queries(board):
        if title in generate.POD_PANELS[name]:
            continue
        for metric in set(metric_names(expr)):
            if not generate.reported_by_pods(metric):
                continue
            for matchers in selectors(expr, metric):
                missing = [m for m in HOST_MATCHERS if m not in matchers]
                assert not missing, f"{title}: {metric}{matchers} lacks {missing}"
                checked += 1
    assert checked


def test_pod_metric_lists_cover_the_pods_collector():
    """Every metric the golden files show with a pod label is either one pods' network
    namespaces report (the generator's sel() then reads the host's series of it) or one of the
    table scan's breakdowns of the host's table by pod (POD_BREAKDOWNS), never both."""
    pod_label = re.compile(r'[{,](?:pod|pod_uid|cgroup)="')
    per_pod = set()
    for path in GOLDEN_DIR.glob("*.prom"):
        for line in path.read_text().splitlines():
            if line and not line.startswith("#") and pod_label.search(line):
                per_pod.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    assert per_pod & generate.POD_BREAKDOWNS  # the golden case of pods on the node was read
    assert golden_metric_names() >= generate.POD_BREAKDOWNS
    assert not {name for name in generate.POD_BREAKDOWNS if generate.reported_by_pods(name)}
    others = per_pod - generate.POD_BREAKDOWNS
    assert others and {name for name in others if not generate.reported_by_pods(name)} == set()


def test_pod_panels_rank_pods_and_leave_the_host_out(dashboard):
    """A top-pods query reads every series of its metric but the host's (`X unless X{pod="",
    ...}`), sums it per pod and keeps the largest."""
    name, board = dashboard
    titles = {title for title, _ in generate.panel_queries(board)}
    assert set(generate.POD_PANELS[name]) <= titles
    ranked = 0
    for title, expr in generate.panel_queries(board):
        if title not in generate.POD_PANELS[name]:
            continue
        for metric in set(metric_names(expr)):
            if not generate.reported_by_pods(metric):
                continue
            found = selectors(expr, metric)
            assert len(found) == 2 and " unless " in expr, (title, expr)
            every, host = found
            assert not any(m in every for m in HOST_MATCHERS), (title, expr)
            assert all(m in host for m in HOST_MATCHERS), (title, expr)
            assert expr.startswith("topk("), (title, expr)
            by = re.search(r"sum by \(([^)]*)\)", expr)
            assert by and set(POD_LABELS) <= {label.strip() for label in by.group(1).split(",")}
            ranked += 1
    assert ranked == (4 if name == "sockets.json" else 0)


# Host and pod series on one node, for the pod panels' queries and a host panel's, evaluated by
# promtool (Grafana's variables substituted as "All" sends them).
_NODE = 'instance="10.0.0.1:9371", job="conntrack-exporter", node="node-a"'
_WEB = 'namespace="default", pod="web-0"'
_UID = 'pod_uid="0b5c6f1e"'
_CGROUP = 'cgroup="/machine.slice/libpod-4f2a.scope"'
_POD_SERIES = [
    # (labels, values every 30 s): the host's series first, at values no pod reaches.
    (f"socket_listen_overflows_total{{{_NODE}}}", "0+300x40"),
    (f"socket_listen_overflows_total{{{_NODE}, {_WEB}}}", "0+30x40"),
    (f"socket_listen_overflows_total{{{_NODE}, {_UID}}}", "0+15x40"),
    (f"socket_listen_overflows_total{{{_NODE}, {_CGROUP}}}", "7x40"),
    (f'socket_udp_receive_buffer_errors_total{{{_NODE}, family="ipv4"}}', "0+300x40"),
    (f'socket_udp_receive_buffer_errors_total{{{_NODE}, {_WEB}, family="ipv4"}}', "0+15x40"),
    (f'socket_udp_receive_buffer_errors_total{{{_NODE}, {_WEB}, family="ipv6"}}', "0+15x40"),
    (f'socket_inuse{{{_NODE}, family="ipv4", protocol="tcp"}}', "1000x40"),
    (f'socket_inuse{{{_NODE}, {_WEB}, family="ipv4", protocol="tcp"}}', "5x40"),
    (f'socket_inuse{{{_NODE}, {_WEB}, family="ipv6", protocol="tcp"}}', "7x40"),
    (f'socket_inuse{{{_NODE}, {_UID}, family="ipv4", protocol="udp"}}', "3x40"),
    (f"conntrack_entries{{{_NODE}}}", "5000x40"),
    (f"conntrack_entries{{{_NODE}, {_CGROUP}}}", "800x40"),
]
_POD_EXPECTED = {
    "Pods with the most listen queue overflows": [(_WEB, 1), (_UID, 0.5), (_CGROUP, 0)],
    "Pods with the most UDP receive buffer errors": [(_WEB, 1)],
    "Pods with the most sockets in use": [(_WEB, 12), (_UID, 3)],
    "Pods with the most conntrack entries": [(_CGROUP, 800)],
}
_VARIABLES = {"$__rate_interval": "1m", "$job": ".*", "$instance": ".*", "$node": ".*"}


def _evaluate(
    tmp_path: Path,
    series: list[tuple[str, str]],
    cases: list[tuple[str, list[tuple[str, float]]]],
) -> None:
    """Run promtool on dashboard queries (Grafana's variables substituted) over input series
    sampled every 30 s: each query's samples at 10m are exactly the expected (labels, value)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found (make test installs it: apt package prometheus)")
    tests = []
    for expr, samples in cases:
        for variable, value in _VARIABLES.items():
            expr = expr.replace(variable, value)
        tests.append(
            {
                "expr": expr,
                "eval_time": "10m",
                "exp_samples": [{"labels": labels, "value": value} for labels, value in samples],
            }
        )
    test_file = tmp_path / "queries.yml"
    test_file.write_text(
        yaml.safe_dump(
            {
                "rule_files": [],
                "evaluation_interval": "1m",
                "tests": [
                    {
                        "interval": "30s",
                        "input_series": [{"series": s, "values": v} for s, v in series],
                        "promql_expr_test": tests,
                    }
                ],
            },
            sort_keys=False,
        )
    )
    result = subprocess.run(
        [promtool, "test", "rules", str(test_file)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_pod_and_host_panels_on_pod_series(tmp_path):
    queries = dict(generate.panel_queries(generate.load("sockets.json")))
    cases = []
    for title, expected in _POD_EXPECTED.items():
        cases.append((queries[title], [(f"{{{_NODE}, {pod}}}", value) for pod, value in expected]))
    # The host's panels: the host's series alone.
    sockets = [q for _, q in generate.panel_queries(generate.load("sockets.json"))]
    in_use = next(q for q in sockets if q.startswith("sum by (family, protocol) (socket_inuse"))
    cases.append((in_use, [('{family="ipv4", protocol="tcp"}', 1000)]))
    overflows = next(q for q in sockets if q.startswith("rate(socket_listen_overflows_total"))
    cases.append((overflows, [(f"{{{_NODE}}}", 10)]))
    entries = next(
        q
        for t, q in generate.panel_queries(generate.load("conntrack.json"))
        if t == "Entries vs limit" and "limit" not in q
    )
    cases.append((entries, [(f"conntrack_entries{{{_NODE}}}", 5000)]))
    _evaluate(tmp_path, _POD_SERIES, cases)


# The host table's entries per pod on two nodes (outbound, inbound), ranked by their sum: a
# Service backend (its entries mostly inbound), a named pod, one known by uid, a container
# outside Kubernetes, fillers, and the two smallest pods, left out of the top 10.
_NODE_B = 'instance="10.0.0.2:9371", job="conntrack-exporter", node="node-b"'
_TABLE_PODS = [
    (_NODE, 'namespace="kube-system", pod="coredns-0"', 20, 900),
    (_NODE, _WEB, 1000, 0),
    (_NODE, _UID, 300, 0),
    (_NODE, _CGROUP, 150, 0),
    *[(_NODE, f'namespace="batch", pod="job-{n}"', 10 * n, 5) for n in range(2, 7)],
    (_NODE_B, 'namespace="batch", pod="job-7"', 70, 0),
    (_NODE, 'namespace="batch", pod="idle"', 5, 5),
    (_NODE_B, 'namespace="batch", pod="job-1"', 10, 0),
]


def test_pods_filling_the_table_ranks_pods_by_both_directions(tmp_path):
    """The panel shows both directions of the TOP_PODS pods with the most entries in all,
    over every selected node."""
    expr = dict(generate.panel_queries(generate.load("conntrack.json")))["Pods filling the table"]
    series, expected = [], []
    for rank, (node, pod, outbound, inbound) in enumerate(_TABLE_PODS):
        for direction, value in (("outbound", outbound), ("inbound", inbound)):
            labels = f'{{{node}, {pod}, direction="{direction}"}}'
            series.append((f"conntrack_table_pod_entries{labels}", f"{value}x40"))
            if rank < generate.TOP_PODS:
                expected.append((f"conntrack_table_pod_entries{labels}", value))
    assert len(expected) == 2 * generate.TOP_PODS < len(series)
    _evaluate(tmp_path, series, [(expr, expected)])


def test_rates_use_the_rate_interval(dashboard):
    _, board = dashboard
    for title, expr in generate.panel_queries(board):
        for window in _RANGE.findall(expr):
            assert window == "$__rate_interval", (title, expr)
        if re.search(r"\b(rate|irate|increase)\(", expr):
            assert "[$__rate_interval]" in expr, (title, expr)


def test_panel_queries_includes_panels_nested_in_rows():
    board = {
        "panels": [
            {"type": "row", "title": "r", "panels": [{"title": "in", "targets": [{"expr": "a"}]}]},
            {"type": "stat", "title": "out", "targets": [{"expr": "b"}, {"expr": ""}]},
        ]
    }
    assert generate.panel_queries(board) == [("in", "a"), ("out", "b")]


def test_query_checks_catch_mistakes():
    """The helpers above fail on what they are meant to catch."""
    assert metric_names('rate(conntrack_stat_drop_totl{job=~"$job"}[5m])') == [
        "conntrack_stat_drop_totl"
    ]
    assert metric_names('x{collector=~"conntrack|socket_ports"}') == []
    assert metric_names("instance:conntrack_entries:ratio > 0.9") == [
        "instance:conntrack_entries:ratio"
    ]
    assert selectors('socket_inuse / socket_inuse_x{a="}"}', "socket_inuse") == [""]
    assert selectors('max(socket_inuse{job=~"$job"})', "socket_inuse") == ['{job=~"$job"}']
