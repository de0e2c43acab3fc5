"""End to end: a real Prometheus scrapes the real exporter, loads our rules and answers our
dashboards' queries; then the table overflows for real and the table-full alert fires.

Everything runs inside one throwaway network namespace with real conntrack: the exporter,
Prometheus on loopback, UDP flows and held TCP connections. The test talks to Prometheus' HTTP
API from a thread that joined the namespace.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from tests.dashboards import generate

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).parent.parent
RULES = ROOT / "grafana" / "rules" / "conntrack-exporter.rules.yml"
PROMETHEUS = "/usr/bin/prometheus"
EXPORTER_PORT = 19471
PROMETHEUS_PORT = 19490
HELD_CONNECTIONS = 40
# Metrics that exist only when the exporter runs in the host's network namespace (the sysctls
# behind them are not in any other): a core panel's query of them may be empty here.
HOST_ONLY_METRICS = (
    "socket_tcp_orphans_limit",
    "socket_memory_min_bytes",
    "socket_memory_pressure_bytes",
    "socket_memory_limit_bytes",
)
# Grafana's variables as a query with every option "All" would send them.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "${job}": ".*",
    "${instance}": ".*",
    "${node}": ".*",
    "$job": ".*",
    "$instance": ".*",
    "$node": ".*",
}


def rule_groups() -> list[dict]:
    return yaml.safe_load(RULES.read_text())["groups"]


def every_rule() -> list[dict]:
    return [rule for group in rule_groups() for rule in group["rules"]]


def dashboard_queries(name: str) -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables substituted) for every target."""
    return [
        (title, substitute(expr)) for title, expr in generate.panel_queries(generate.load(name))
    ]


def substitute(expr: str) -> str:
    # Longest first, so that "$__rate_interval" is not taken for "$__range"'s prefix.
    for variable in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(variable, GRAFANA_VARIABLES[variable])
    return expr


def exporter_config(rules: Path) -> dict:
    """Prometheus' configuration: the exporter scraped and the rules evaluated every second."""
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [
            {
                "job_name": "conntrack-exporter",
                "static_configs": [
                    {"targets": [f"127.0.0.1:{EXPORTER_PORT}"], "labels": {"node": "e2e-node"}}
                ],
            }
        ],
    }


class Prometheus:
    """A real Prometheus in the namespace with the configuration given, and its HTTP API
    seen from inside the namespace."""

    def __init__(self, netns, workdir: Path, config: dict) -> None:
        config_file = workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        self.process = subprocess.Popen(
            [
                *("ip", "netns", "exec", netns.name, PROMETHEUS),
                f"--config.file={config_file}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._pool = netns.thread_pool()

    def close(self) -> str:
        self._pool.shutdown()
        self.process.terminate()
        try:
            _, stderr = self.process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, stderr = self.process.communicate()
        return stderr

    def get(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{PROMETHEUS_PORT}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        return self._pool.submit(_get_json, url).result(timeout=30)

    def is_ready(self) -> bool:
        """Whether Prometheus serves queries: until it has started (the TSDB opened, the
        rules loaded) its API answers 503, which is no Prometheus error JSON."""
        url = f"http://127.0.0.1:{PROMETHEUS_PORT}/-/ready"
        return self._pool.submit(_status, url).result(timeout=30) == 200

    def query(self, expr: str) -> list[dict]:
        """The result vector of an instant query; any PromQL or evaluation error fails."""
        answer = self.get("/api/v1/query", query=expr)
        assert answer["status"] == "success", f"{expr}: {answer}"
        return answer["data"]["result"]

    def wait_until(self, what: str, ready: Callable[[], object], timeout: float = 60) -> object:
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = ready()
            except OSError:  # not listening yet
                result = None
            if result:
                return result
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited: {self.process.stderr.read()}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(0.5)


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _get_json(url: str) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:  # 400/422 carry Prometheus' own error JSON
        return json.load(error)


@pytest.fixture
def stack(netns, tmp_path) -> Iterator[tuple]:
    """The exporter and Prometheus running in the namespace, with real traffic."""
    if not Path(PROMETHEUS).exists():
        pytest.skip(f"needs {PROMETHEUS} (make test installs the prometheus package)")
    # Scrapes and API calls stay out of the table: the overflow test needs an exact count.
    netns.untrack_tcp_port(EXPORTER_PORT)
    netns.untrack_tcp_port(PROMETHEUS_PORT)
    config = tmp_path / "exporter.yml"
    config.write_text(
        "collectors:\n"
        "  conntrack_table: {interval_seconds: 1}\n"
        "  socket_ports: {interval_seconds: 1}\n"
    )
    exporter = netns.popen_exporter(
        f"--web.listen-address=127.0.0.1:{EXPORTER_PORT}", f"--config.file={config}"
    )
    # A copy of the rules with every `for:` at 0s, so an alert fires at its first evaluation.
    rules = tmp_path / "rules.yml"
    groups = rule_groups()
    for group in groups:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "0s"
    rules.write_text(yaml.safe_dump({"groups": groups}))
    prometheus = Prometheus(netns, tmp_path, exporter_config(rules))
    try:
        netns.udp_flows(50)
        holder = netns.hold_tcp_connections(HELD_CONNECTIONS)
        try:
            yield netns, prometheus
        finally:
            holder.kill()
            holder.wait()
    finally:
        stderr = prometheus.close()
        exporter.terminate()
        exporter.communicate(timeout=10)
        assert "level=error" not in stderr, stderr


def wait_for_data(prometheus: Prometheus) -> None:
    """Until the target is up, both background scans have been scraped, and every rule has
    been evaluated after enough samples for a rate()."""
    prometheus.wait_until("Prometheus to be ready", prometheus.is_ready)
    prometheus.wait_until(
        "the exporter to be scraped",
        lambda: (
            prometheus.query('up{job="conntrack-exporter"} == 1')
            and prometheus.query("conntrack_table_scan_timestamp_seconds")
            and prometheus.query("socket_ports_scan_timestamp_seconds")
        ),
    )
    time.sleep(5)  # rate() over 1m needs two samples; several rule evaluations go by


def test_rules_and_dashboard_queries_evaluate_on_real_data(stack):
    _, prometheus = stack
    wait_for_data(prometheus)

    # Every rule of the file is loaded, evaluated, and healthy.
    loaded = prometheus.get("/api/v1/rules")["data"]["groups"]
    rules = [rule for group in loaded for rule in group["rules"]]
    assert len(rules) == len(every_rule())
    unhealthy = [(rule["name"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"]
    assert not unhealthy

    # Every alert and recording expression, as an instant query.
    for rule in every_rule():
        prometheus.query(rule["expr"])

    # Every dashboard query parses and evaluates; the core panels' queries have data.
    for name, core in generate.CORE_PANELS.items():
        queries = dashboard_queries(name)
        assert set(core) <= {title for title, _ in queries}, f"{name}: core panels missing"
        empty_core = [
            (title, expr)
            for title, expr in queries
            if not prometheus.query(expr)
            and title in core
            and not any(metric in expr for metric in HOST_ONLY_METRICS)
        ]
        assert not empty_core, f"{name}: core panel queries without data: {empty_core}"

    # The recording rules agree with the exporter's own numbers.
    ratio = prometheus.query("instance:conntrack_entries:ratio")
    # The host's series: the pods collector reports the other namespaces' tables beside it.
    entries = prometheus.query('conntrack_entries{pod="", pod_uid="", cgroup=""}')
    limit = prometheus.query("conntrack_entries_limit")
    assert len(ratio) == len(entries) == 1 and ratio[0]["metric"]["node"] == "e2e-node"
    assert float(ratio[0]["value"][1]) == pytest.approx(
        float(entries[0]["value"][1]) / float(limit[0]["value"][1])
    )


def test_table_full_alert_fires_when_the_table_overflows(stack):
    netns, prometheus = stack
    wait_for_data(prometheus)
    firing = firing_alerts(prometheus)
    assert "ConntrackTableFull" not in firing, firing

    before = netns.conntrack_stats()
    with netns.table_full():
        netns.udp_flows(25, first_port=30000)
        firing = prometheus.wait_until(
            "ConntrackTableFull to fire",
            lambda: "ConntrackTableFull" in firing_alerts(prometheus) and firing_alerts(prometheus),
            timeout=30,
        )
        after = netns.conntrack_stats()

    # The kernel's own count: each of the 25 datagrams met a full table, and was either dropped
    # or made room by evicting an unreplied entry (the stack's UDP flows are such entries, so
    # the split between the two varies from run to run; the alert fires on either).
    full_table_events = sum(after[name] - before[name] for name in ("drop", "early_drop"))
    assert full_table_events >= 25
    alert = firing["ConntrackTableFull"]
    assert alert["labels"]["severity"] == "critical"
    assert alert["labels"]["node"] == "e2e-node"
    assert "e2e-node" in alert["annotations"]["description"]
    assert alert["annotations"]["runbook_url"].endswith("#conntracktablefull")


def firing_alerts(prometheus: Prometheus) -> dict[str, dict]:
    alerts = prometheus.get("/api/v1/alerts")["data"]["alerts"]
    return {alert["labels"]["alertname"]: alert for alert in alerts if alert["state"] == "firing"}
