#!/usr/bin/env python3
"""Generate conntrack_exporter's Grafana dashboards: conntrack.json and sockets.json.

    python grafana/dashboards/generate.py           # rewrite both files next to this script
    python grafana/dashboards/generate.py --check   # exit 1, naming the file, if one differs

The dashboards are built with grafana-foundation-sdk (pinned in the `test` extra of
pyproject.toml) and written as deterministic JSON: sorted keys, 2-space indent, a final newline.

Every query filters on the `job`, `instance` and `node` template variables and reads raw exporter
metrics, so the dashboards work without the recording rules loaded. On a metric that pods'
network namespaces also report (REPORTED_BY_PODS) a query reads the host's series only, unless
it says otherwise. `panel_queries()` lists every
query with its panel's title (the end-to-end test runs them against a real Prometheus); import
this file by path, e.g. with importlib.util.spec_from_file_location.
"""

import argparse
import json
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import (
    bargauge,
    prometheus,
    stat,
    statetimeline,
    table,
    timeseries,
)
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_models
from grafana_foundation_sdk.models import dashboard as dashboard_models
from grafana_foundation_sdk.models import prometheus as prometheus_models

HERE = Path(__file__).resolve().parent

CONNTRACK_UID = "conntrack-exporter-conntrack"
SOCKETS_UID = "conntrack-exporter-sockets"
TAG = "conntrack-exporter"
RUNBOOKS = "grafana/runbooks.md"
# The stat of what ConntrackTableFull fires on: drop and early_drop, summed.
TABLE_FULL_STAT = "Drops and evictions, table full"

# The panels an end-to-end test expects to return data from a Prometheus scraping the exporter:
# they query raw exporter metrics only. Keyed by the dashboard's file name.
CORE_PANELS: dict[str, tuple[str, ...]] = {
    "conntrack.json": (
        "Table utilisation",
        "Entries vs limit",
        "Drops and early drops",
        "Insert failures and clash resolutions",
        "Entries by protocol and state",
        "Top sources",
        "Top destinations",
        "Scan health",
        "Collector status",
    ),
    "sockets.json": (
        "Sockets in use",
        "TCP orphans vs limit",
        "TIME_WAIT vs limit",
        "Ephemeral ports: most used toward one destination vs range",
        "Ephemeral ports by destination",
        "File handles vs limit",
        "Listen queue overflows and drops",
        "UDP buffer and memory errors",
    ),
}

# The panels about pods' network namespaces (the `pods` collector): the top pods by a metric, and
# the collector's health. Empty when the collector is off or the node runs no pods.
POD_PANELS: dict[str, tuple[str, ...]] = {
    "conntrack.json": (),
    "sockets.json": (
        "Pods with the most listen queue overflows",
        "Pods with the most UDP receive buffer errors",
        "Pods with the most sockets in use",
        "Pods with the most conntrack entries",
        "Pod discovery",
    ),
}

DATASOURCE = dashboard_models.DataSourceRef(type_val="prometheus", uid="${datasource}")
SELECTOR = 'job=~"$job", instance=~"$instance", node=~"$node"'

# The `pods` collector reports these for every pod's network namespace under the host's names,
# with `namespace` and `pod`, or `pod_uid` (name unknown), or `cgroup` (outside Kubernetes). The
# host's series carry none of those labels (an absent label matches "").
REPORTED_BY_PODS = frozenset(
    {
        "conntrack_entries",
        "socket_inuse",
        "socket_allocated",
        "socket_tcp_timewait",
        "socket_listen_overflows_total",
        "socket_listen_drops_total",
        "socket_tcp_memory_pressures_total",
        "socket_tcp_aborts_on_memory_total",
        "socket_tcp_timewait_overflows_total",
        "socket_udp_receive_buffer_errors_total",
        "socket_udp_send_buffer_errors_total",
        "socket_udp_in_errors_total",
        "socket_udp_memory_errors_total",
    }
)
HOST = 'pod="", pod_uid="", cgroup=""'
# The table scan's families that break the host's table down by pod (the `conntrack_table`
# collector names the pods on this node that the `pods` collector found): host series, with a
# pod's labels where an address is the pod's. No pod's namespace reports them: sel() adds no
# HOST matchers, and a pod's labels on them are the host table's entries of that pod.
POD_BREAKDOWNS = frozenset(
    {
        "conntrack_table_pod_entries",
        "conntrack_table_top_source_entries",
        "conntrack_table_top_destination_entries",
        "conntrack_nat_port_pool_pod_used",
    }
)
# The labels that name a pod, and how a legend shows whichever it has.
POD_LABELS = "namespace, pod, pod_uid, cgroup"
POD_LEGEND = "{{namespace}} {{pod}}{{pod_uid}}{{cgroup}} ({{instance}})"
TOP_PODS = 10
GRID_WIDTH = 24

# Thresholds of every "used over limit" ratio: warn at 75 %, critical at 90 %.
WARN_RATIO = 0.75
CRITICAL_RATIO = 0.9


# --- PromQL helpers ------------------------------------------------------------------------------


def reported_by_pods(metric: str) -> bool:
    """Whether pods' network namespaces report `metric` too (every conntrack_stat_*_total)."""
    return (
        metric in REPORTED_BY_PODS
        or re.fullmatch(r"conntrack_stat_[a-z_]+_total", metric) is not None
    )


def _selector(metric: str, matchers: str = "") -> str:
    extra = f", {matchers}" if matchers else ""
    return f"{metric}{{{SELECTOR}{extra}}}"


def sel(metric: str, matchers: str = "") -> str:
    """`metric{job=~"$job", instance=~"$instance", node=~"$node"[, matchers]}`, and the host's
    series only (HOST) when pods report the metric too."""
    if reported_by_pods(metric):
        matchers = f"{matchers}, {HOST}" if matchers else HOST
    return _selector(metric, matchers)


def pods(metric: str) -> str:
    """The pods' series of a metric pods report: every series but the host's."""
    assert reported_by_pods(metric), metric
    return f"{_selector(metric)} unless {sel(metric)}"


def pods_rate(metric: str) -> str:
    """rate() of the pods' series of a counter: every series but the host's."""
    assert reported_by_pods(metric), metric
    return f"{rate_of(_selector(metric))} unless {rate(metric)}"


def top_pods(expr: str) -> str:
    """The TOP_PODS pods with the largest values of `expr` summed per pod."""
    return f"topk({TOP_PODS}, sum by (job, instance, node, {POD_LABELS}) ({expr}))"


def top_pods_by_direction(metric: str) -> str:
    """Every direction's series of the TOP_PODS pods with the most of `metric`, all directions
    summed: the pods ranked by their total, each shown split."""
    assert metric in POD_BREAKDOWNS, metric
    every = f"job, instance, node, {POD_LABELS}"
    return f"{sel(metric)} and on ({every}) topk({TOP_PODS}, sum by ({every}) ({sel(metric)}))"


def over(used: str, limit: str, matchers: str = "") -> str:
    """`used / limit`, both selected the same way (one-to-one on every label)."""
    return f"{sel(used, matchers)} / {sel(limit, matchers)}"


def rate_of(selector: str) -> str:
    return f"rate({selector}[$__rate_interval])"


def rate(metric: str, matchers: str = "") -> str:
    """rate() of a counter over Grafana's $__rate_interval."""
    return rate_of(sel(metric, matchers))


def per_instance_rate(metric: str) -> str:
    """A counter's rate per exporter, summing the `cpu` label away when `per_cpu` is on."""
    return f"sum by (job, instance, node) ({rate(metric)})"


def sort_desc(expr: str) -> str:
    return f"sort_desc({expr})"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    instant: bool = False
    table: bool = False


# --- panel helpers -------------------------------------------------------------------------------

PanelBuilder = Any  # every grafana_foundation_sdk panel builder (they share no base class)


def _target(query: Query, ref_id: str) -> prometheus.Dataquery:
    target = (
        prometheus.Dataquery()
        .expr(query.expr)
        .ref_id(ref_id)
        .datasource(DATASOURCE)
        .editor_mode(prometheus_models.QueryEditorMode.CODE)
    )
    if query.legend:
        target.legend_format(query.legend)
    if query.instant:
        target.instant()
    else:
        target.range()
    if query.table:
        target.format(prometheus_models.PromQueryFormat.TABLE)
    return target


def _describe(
    panel: PanelBuilder, title: str, description: str, unit: str, queries: Sequence[Query]
) -> PanelBuilder:
    """What every panel has: title, description, unit, datasource, one target per query."""
    panel.title(title).description(description).unit(unit).datasource(DATASOURCE)
    for index, query in enumerate(queries):
        panel.with_target(_target(query, chr(ord("A") + index)))
    return panel


def _steps(*steps: tuple[float, str], base: str = "green") -> dashboard_builders.ThresholdsConfig:
    return (
        dashboard_builders.ThresholdsConfig()
        .mode(dashboard_models.ThresholdsMode.ABSOLUTE)
        .steps(
            [dashboard_models.Threshold(value=None, color=base)]
            + [dashboard_models.Threshold(value=value, color=color) for value, color in steps]
        )
    )


def _ratio_steps() -> dashboard_builders.ThresholdsConfig:
    return _steps((WARN_RATIO, "orange"), (CRITICAL_RATIO, "red"))


def _any_steps() -> dashboard_builders.ThresholdsConfig:
    """Green at 0, red at anything above: for counters that should never move."""
    return _steps((1e-9, "red"))


def _last() -> common_builders.ReduceDataOptions:
    """Reduce each series to its last non-null value (stats and bar gauges)."""
    return common_builders.ReduceDataOptions().values(False).calcs(["lastNotNull"])


def _legend() -> common_builders.VizLegendOptions:
    return (
        common_builders.VizLegendOptions()
        .display_mode(common_models.LegendDisplayMode.TABLE)
        .placement(common_models.LegendPlacement.BOTTOM)
        .show_legend(True)
        .calcs(["lastNotNull", "max"])
    )


def _dashed(ref_id: str) -> tuple[str, list[dashboard_models.DynamicConfigValue]]:
    """Override properties that draw a query's series dashed: limits and thresholds."""
    return ref_id, [
        dashboard_models.DynamicConfigValue(
            id_val="custom.lineStyle", value={"dash": [10, 10], "fill": "dash"}
        ),
        dashboard_models.DynamicConfigValue(id_val="custom.fillOpacity", value=0),
    ]


def _right_axis(unit: str) -> list[dashboard_models.DynamicConfigValue]:
    return [
        dashboard_models.DynamicConfigValue(id_val="unit", value=unit),
        dashboard_models.DynamicConfigValue(id_val="custom.axisPlacement", value="right"),
    ]


def ts(
    title: str,
    description: str,
    unit: str,
    queries: Sequence[Query],
    *,
    limits: Sequence[str] = (),
    ratio: bool = False,
    stacked: bool = False,
    no_value: str = "",
) -> timeseries.Panel:
    """A time series; `limits` are the refIds drawn dashed; `ratio` adds the 75/90 % lines."""
    panel = _describe(timeseries.Panel(), title, description, unit, queries)
    panel.legend(_legend()).fill_opacity(10).line_width(1).min(0)
    if ratio:
        panel.max(1).thresholds(_ratio_steps()).thresholds_style(
            common_builders.GraphThresholdsStyleConfig().mode(
                common_models.GraphThresholdsStyleMode.DASHED
            )
        )
    if stacked:
        panel.fill_opacity(40).stacking(
            common_builders.StackingConfig().mode(common_models.StackingMode.NORMAL)
        )
    for ref_id in limits:
        panel.override_by_query(*_dashed(ref_id))
    if no_value:
        panel.no_value(no_value)
    return panel


def stat_panel(
    title: str,
    description: str,
    unit: str,
    query: Query,
    thresholds: dashboard_builders.ThresholdsConfig,
    no_value: str,
) -> stat.Panel:
    panel = _describe(stat.Panel(), title, description, unit, [query])
    return (
        panel.thresholds(thresholds)
        .reduce_options(_last())
        .color_mode(common_models.BigValueColorMode.BACKGROUND)
        .graph_mode(common_models.BigValueGraphMode.AREA)
        .no_value(no_value)
    )


def ratio_bars(
    title: str, description: str, queries: Sequence[Query], no_value: str
) -> bargauge.Panel:
    """Horizontal bars of used-over-limit ratios, 0 to 100 %, coloured at 75 and 90 %."""
    panel = _describe(bargauge.Panel(), title, description, "percentunit", queries)
    return (
        panel.min(0)
        .max(1)
        .thresholds(_ratio_steps())
        .display_mode(common_models.BarGaugeDisplayMode.GRADIENT)
        .orientation(common_models.VizOrientation.HORIZONTAL)
        .reduce_options(_last())
        .no_value(no_value)
    )


def top_table(
    title: str, description: str, query: Query, value_name: str, no_value: str
) -> table.Panel:
    """An instant table of a top-K family: one row per labelled series, largest first."""
    panel = _describe(table.Panel(), title, description, "short", [query])
    organize = dashboard_models.DataTransformerConfig(
        id_val="organize",
        options={
            "excludeByName": {"Time": True, "__name__": True, "job": True},
            "renameByName": {"Value": value_name},
        },
    )
    return (
        panel.with_transformation(organize)
        .sort_by([common_builders.TableSortByFieldState().display_name(value_name).desc(True)])
        .no_value(no_value)
    )


def collector_status(collectors: Sequence[str]) -> statetimeline.Panel:
    names = "|".join(collectors)
    panel = _describe(
        statetimeline.Panel(),
        "Collector status",
        "Whether each collector's last run succeeded (conntrack_exporter_collector_success). "
        "Failed means its metrics are missing or stale: a source the kernel lacks (no "
        "conntrack module, no IPv6), a missing privilege (the table scan needs CAP_NET_ADMIN) "
        "or a collector error; the exporter's log says which.",
        "short",
        [
            Query(
                sel("conntrack_exporter_collector_success", f'collector=~"{names}"'),
                "{{instance}} {{collector}}",
            )
        ],
    )
    mapping = dashboard_models.ValueMap(
        options={
            "0": dashboard_models.ValueMappingResult(text="failed", color="red", index=0),
            "1": dashboard_models.ValueMappingResult(text="ok", color="green", index=1),
        }
    )
    return (
        panel.mappings([mapping])
        .thresholds(_steps((1, "green"), base="red"))
        .show_value(common_models.VisibilityMode.NEVER)
        .merge_values(True)
        .no_value("no exporter found")
    )


# --- layout --------------------------------------------------------------------------------------


class Layout:
    """Places rows and panels on Grafana's 24-column grid, left to right, and numbers them."""

    def __init__(self, builder: dashboard_builders.Dashboard) -> None:
        self.builder = builder
        self.next_id = 1
        self.x = 0
        self.y = 0
        self.line_height = 0

    def _newline(self) -> None:
        self.y += self.line_height
        self.x = 0
        self.line_height = 0

    def row(self, title: str) -> None:
        if self.x:
            self._newline()
        grid = dashboard_models.GridPos(h=1, w=GRID_WIDTH, x=0, y=self.y)
        row = dashboard_builders.Row(title).id(self.next_id).grid_pos(grid)
        self.builder.with_row(row)
        self.next_id += 1
        self.y += 1

    def panel(self, panel: PanelBuilder, width: int, height: int) -> None:
        if self.x + width > GRID_WIDTH:
            self._newline()
        grid = dashboard_models.GridPos(h=height, w=width, x=self.x, y=self.y)
        self.builder.with_panel(panel.id(self.next_id).grid_pos(grid))
        self.next_id += 1
        self.x += width
        self.line_height = max(self.line_height, height)


# --- the dashboards ------------------------------------------------------------------------------


def _variables() -> list[Any]:
    def label_values(name: str, label: str, query: str) -> dashboard_builders.QueryVariable:
        return (
            dashboard_builders.QueryVariable(name)
            .label(label)
            .query(query)
            .datasource(DATASOURCE)
            .refresh(dashboard_models.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dashboard_models.VariableSort.ALPHABETICAL_ASC)
        )

    def multi(variable: dashboard_builders.QueryVariable) -> dashboard_builders.QueryVariable:
        every = dashboard_models.VariableOption(selected=True, text="All", value="$__all")
        return variable.multi(True).include_all(True).all_value(".*").current(every)

    return [
        dashboard_builders.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        label_values("job", "Job", "label_values(conntrack_exporter_build_info, job)"),
        multi(
            label_values(
                "instance",
                "Instance",
                'label_values(conntrack_exporter_build_info{job=~"$job"}, instance)',
            )
        ),
        # A `node` label comes from relabelling (Kubernetes); "All" (.*) also matches series
        # that have none.
        multi(
            label_values(
                "node", "Node", 'label_values(conntrack_exporter_build_info{job=~"$job"}, node)'
            )
        ),
    ]


def _dashboard(
    uid: str, title: str, description: str, other: tuple[str, str]
) -> dashboard_builders.Dashboard:
    other_title, other_uid = other
    builtin = (
        dashboard_builders.AnnotationQuery()
        .name("Annotations & Alerts")
        .datasource(dashboard_models.DataSourceRef(type_val="grafana", uid="-- Grafana --"))
        .enable(True)
        .hide(True)
        .icon_color("rgba(0, 211, 255, 1)")
        .type("dashboard")
        .built_in(1)
    )
    return (
        dashboard_builders.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags([TAG])
        .editable()
        .tooltip(dashboard_models.DashboardCursorSync.CROSSHAIR)
        .time("now-6h", "now")
        .refresh("30s")
        .timezone("browser")
        .annotation(builtin)
        .variables(_variables())
        .link(
            dashboard_builders.DashboardLink(other_title)
            .type(dashboard_models.DashboardLinkType.LINK)
            .url(f"/d/{other_uid}")
            .icon("dashboard")
            .tooltip(f"Open the {other_title} dashboard for the same nodes and time range")
            .include_vars(True)
            .keep_time(True)
        )
    )


def conntrack_dashboard() -> dict[str, Any]:
    """The conntrack table dashboard, as the JSON object Grafana imports."""
    builder = _dashboard(
        CONNTRACK_UID,
        "Conntrack table",
        "How close each node's connection-tracking table is to full, what fills it, and whether "
        "packets are already being dropped. Near-full pools and what to do: " + RUNBOOKS + ".",
        ("Socket pools", SOCKETS_UID),
    )
    layout = Layout(builder)
    utilisation = over("conntrack_entries", "conntrack_entries_limit")
    nat_ratio = (
        f"{sel('conntrack_nat_port_pool_used')} / on(instance, job, protocol) group_left "
        f"{sel('conntrack_nat_port_pool_size')}"
    )

    layout.row("Overview")
    layout.panel(
        stat_panel(
            "Fullest table",
            "conntrack_entries / conntrack_entries_limit on the fullest selected node. At 100 % "
            "the kernel drops new connections ('nf_conntrack: table full, dropping packet'); "
            "past 75 % raise nf_conntrack_max or find what fills the table (" + RUNBOOKS + ").",
            "percentunit",
            Query(f"max({utilisation})"),
            _ratio_steps(),
            "no conntrack data",
        ),
        6,
        4,
    )
    layout.panel(
        stat_panel(
            "Fullest SNAT port pool",
            "Source ports SNAT/masquerade took toward one destination from one translated "
            "address, over the ports it may use, on the fullest pool. Near 100 % new connections "
            "to that destination fail to get a port and insert_failed rises (" + RUNBOOKS + "). "
            "Empty when no SNAT entries exist.",
            "percentunit",
            Query(f"max({nat_ratio})"),
            _ratio_steps(),
            "no SNAT entries",
        ),
        6,
        4,
    )
    layout.panel(
        stat_panel(
            TABLE_FULL_STAT,
            "Packets dropped because the table was full and no entry could be evicted "
            "(conntrack_stat_drop_total) plus entries evicted to make room "
            "(conntrack_stat_early_drop_total), per second, over the selected nodes: the two "
            "counters ConntrackTableFull fires on. Anything above 0 means the table is full now; "
            "'Drops and early drops' below splits them.",
            "ops",
            Query(
                f"sum({rate('conntrack_stat_drop_total')})"
                f" + sum({rate('conntrack_stat_early_drop_total')})"
            ),
            _any_steps(),
            "no conntrack data",
        ),
        6,
        4,
    )
    layout.panel(
        stat_panel(
            "Insert failures",
            "Entries per second that failed to insert (conntrack_stat_insert_failed_total), "
            "over the selected nodes. Above 0 is the conntrack race behind 5-second DNS stalls "
            "on Kubernetes, or a full SNAT port pool.",
            "ops",
            Query(f"sum({rate('conntrack_stat_insert_failed_total')})"),
            _any_steps(),
            "no conntrack data",
        ),
        6,
        4,
    )

    layout.row("Table fill")
    layout.panel(
        ts(
            "Table utilisation",
            "conntrack_entries / conntrack_entries_limit per node. The dashed lines are 75 % and "
            "90 %; at 100 % the kernel drops packets of new connections. conntrack_entries "
            "counts the node's own network namespace, the limit is global; pods' own tables "
            "are in the Socket pools dashboard's Pods row. What to do: " + RUNBOOKS + ".",
            "percentunit",
            [Query(utilisation, "{{instance}}")],
            ratio=True,
            no_value="no conntrack data",
        ),
        12,
        8,
    )
    layout.panel(
        ts(
            "Entries vs limit",
            "Entries in the conntrack table (conntrack_entries) and the most the kernel allows "
            "(conntrack_entries_limit, nf_conntrack_max, dashed). Entries meeting the limit "
            "means new connections are dropped.",
            "short",
            [
                Query(sel("conntrack_entries"), "{{instance}} entries"),
                Query(sel("conntrack_entries_limit"), "{{instance}} limit"),
            ],
            limits=["B"],
        ),
        12,
        8,
    )
    layout.panel(
        ts(
            "Drops and early drops",
            "drop: packets dropped because the table was full and nothing could be evicted. "
            "early_drop: entries evicted to make room. Either above 0 means the table is full; "
            "drop above 0 means connections are failing.",
            "ops",
            [
                Query(per_instance_rate("conntrack_stat_drop_total"), "{{instance}} drop"),
                Query(
                    per_instance_rate("conntrack_stat_early_drop_total"), "{{instance}} early_drop"
                ),
            ],
        ),
        12,
        8,
    )
    layout.panel(
        ts(
            "Insert failures and clash resolutions",
            "insert_failed: entries that lost an insert race and were dropped, the signature "
            "of the 5-second DNS stalls on Kubernetes nodes (or of an exhausted SNAT port "
            "pool). clash_resolve: races the kernel resolved by reusing the existing entry, "
            "harmless by themselves. insert_failed above 0 is bad.",
            "ops",
            [
                Query(
                    per_instance_rate("conntrack_stat_insert_failed_total"),
                    "{{instance}} insert_failed",
                ),
                Query(
                    per_instance_rate("conntrack_stat_clash_resolve_total"),
                    "{{instance}} clash_resolve",
                ),
            ],
        ),
        12,
        8,
    )

    layout.row("What fills the table")
    layout.panel(
        ts(
            "Entries by protocol and state",
            "Entries by family, protocol and TCP state from the last background table scan "
            "(conntrack_table_entries), summed over the selected nodes. A growing state shows "
            "what fills the table: many time_wait or close entries point to short-lived "
            "connections, many unreplied UDP entries to DNS or scans. Empty when the table "
            "scan is off or lacks CAP_NET_ADMIN.",
            "short",
            [
                Query(
                    f"sum by (family, protocol, state) ({sel('conntrack_table_entries')})",
                    "{{family}} {{protocol}} {{state}}",
                )
            ],
            stacked=True,
            no_value="no table scan",
        ),
        12,
        9,
    )
    layout.panel(
        ts(
            "Entries by status",
            "Entries with a status bit from the last table scan (conntrack_table_status_entries):"
            " assured, unreplied, src_nat, dst_nat, offload. Many unreplied entries fill the "
            "table with flows that never got an answer; src_nat entries use SNAT port pools.",
            "short",
            [
                Query(
                    f"sum by (status) ({sel('conntrack_table_status_entries')})",
                    "{{status}}",
                )
            ],
            no_value="no table scan",
        ),
        12,
        9,
    )
    layout.panel(
        ts(
            "Pods filling the table",
            f"Entries of the node's table per pod on the node, for the {TOP_PODS} pods holding "
            "the most (both directions summed) over the selected nodes, each split by direction "
            "(conntrack_table_pod_entries, from the last table scan, scaled when it sampled): "
            "outbound, the pod's own connections (the pod's address is the original source); "
            "inbound, connections to it through a Service (DNAT'd to the pod). One pod holding a "
            "large share of the limit is what fills the table: its connection churn, its "
            "timeouts, NOTRACK, its owners (" + RUNBOOKS + "). A pod is named by namespace and "
            "pod, by pod_uid when the exporter could not learn the name, or by cgroup outside "
            "Kubernetes. Empty when the table scan or the pods collector is off; pods with "
            "hostNetwork count as the node. A pod's own table, where it has one, is in the "
            "Socket pools dashboard's Pods row.",
            "short",
            [
                Query(
                    top_pods_by_direction("conntrack_table_pod_entries"),
                    POD_LEGEND + " {{direction}}",
                )
            ],
            no_value="no pod entries",
        ),
        24,
        9,
    )
    layout.panel(
        top_table(
            "Top sources",
            "The original-direction source addresses holding the most entries, per node, from "
            "the last table scan (conntrack_table_top_source_entries, top K). One address "
            "holding a large share of the limit is what fills the table. An address of a pod "
            "on that node also has the pod's namespace and pod (or pod_uid, or cgroup).",
            Query(sort_desc(sel("conntrack_table_top_source_entries")), instant=True, table=True),
            "entries",
            "no table scan",
        ),
        12,
        9,
    )
    layout.panel(
        top_table(
            "Top destinations",
            "The destinations (address, protocol, port) with the most entries, per node, from "
            "the last table scan (conntrack_table_top_destination_entries, top K). A large "
            "count toward one service, e.g. DNS on port 53, shows who fills the table. An "
            "address of a pod on that node also has the pod's namespace and pod (or pod_uid, "
            "or cgroup).",
            Query(
                sort_desc(sel("conntrack_table_top_destination_entries")), instant=True, table=True
            ),
            "entries",
            "no table scan",
        ),
        12,
        9,
    )
    nat = ratio_bars(
        "NAT port pools",
        "Source ports SNAT/masquerade took toward one destination from one translated address "
        "(conntrack_nat_port_pool_used), over the ports it may pick "
        "(conntrack_nat_port_pool_size), for the fullest pools. Near 100 % new connections to "
        "that destination fail to find a free source port and insert_failed rises: spread "
        "the traffic over more SNAT addresses or destinations (" + RUNBOOKS + "). Empty when the "
        "node does no SNAT.",
        [
            Query(
                sort_desc(nat_ratio),
                "{{instance}} {{nat_address}} to {{destination}}:{{port}}/{{protocol}}",
                instant=True,
            )
        ],
        "no SNAT entries",
    )
    layout.panel(nat, 12, 8)
    layout.panel(
        top_table(
            "SNAT ports by pod",
            "Source ports each pod's outbound connections took from a SNAT pool of the panel on "
            "the left (conntrack_nat_port_pool_pod_used: per pool, the pods taking the most, "
            "top K), to compare with the pool's size (conntrack_nat_port_pool_size). A pod "
            "taking most of a nearly full pool is the client that should reuse its "
            "connections (" + RUNBOOKS + "). Empty when "
            "the node does no SNAT of its pods' traffic or the pods collector is off.",
            Query(sort_desc(sel("conntrack_nat_port_pool_pod_used")), instant=True, table=True),
            "ports",
            "no SNAT of pods",
        ),
        12,
        8,
    )
    layout.panel(
        ts(
            "Hash table",
            "Buckets of the conntrack hash table (conntrack_buckets, nf_conntrack_buckets) and "
            "entries per bucket (right axis). Every lookup walks a bucket's chain: several "
            "entries per bucket on average slow every packet; raise nf_conntrack_buckets "
            "(the module's hashsize) along with nf_conntrack_max.",
            "short",
            [
                Query(sel("conntrack_buckets"), "{{instance}} buckets"),
                Query(
                    over("conntrack_entries", "conntrack_buckets"),
                    "{{instance}} entries per bucket",
                ),
            ],
        ).override_by_query("B", _right_axis("short")),
        24,
        8,
    )

    layout.row("Exporter")
    scan = ts(
        "Scan health",
        "The background table scan: age of its last result (time() - "
        "conntrack_table_scan_timestamp_seconds), how long it took, the share of the table it "
        "read (sample ratio, right axis; below 100 % counts are scaled from a sample) and "
        "failed scans per second by reason. An age well above the scan interval (30 s) or "
        "errors above 0 mean the table panels are stale.",
        "s",
        [
            Query(f"time() - {sel('conntrack_table_scan_timestamp_seconds')}", "{{instance}} age"),
            Query(sel("conntrack_table_scan_duration_seconds"), "{{instance}} duration"),
            Query(sel("conntrack_table_scan_sample_ratio"), "{{instance}} sample ratio"),
            Query(rate("conntrack_table_scan_errors_total"), "{{instance}} errors {{reason}}"),
        ],
        no_value="no table scan",
    )
    scan.override_by_query("C", _right_axis("percentunit"))
    scan.override_by_query("D", [dashboard_models.DynamicConfigValue(id_val="unit", value="ops")])
    layout.panel(scan, 12, 8)
    layout.panel(collector_status(["conntrack", "conntrack_table"]), 12, 8)
    return _to_json(builder)


def sockets_dashboard() -> dict[str, Any]:
    """The socket pools dashboard, as the JSON object Grafana imports."""
    builder = _dashboard(
        SOCKETS_UID,
        "Socket pools",
        "Every kernel socket pool next to its limit (sockets, TCP and UDP memory, orphans, "
        "TIME_WAIT, file handles, ephemeral ports) and the counters that say a pool ran out. "
        "A pool near its limit means new connections or datagrams are about to fail: "
        + RUNBOOKS
        + ".",
        ("Conntrack table", CONNTRACK_UID),
    )
    layout = Layout(builder)
    ports_ratio = (
        f"{sel('socket_ephemeral_ports_used_max')} / ignoring(protocol) group_left "
        f"{sel('socket_ephemeral_ports_range_size')}"
    )

    def memory_ratio(protocol: str) -> str:
        matcher = f'protocol="{protocol}"'
        return over("socket_memory_bytes", "socket_memory_pressure_bytes", matcher)

    layout.row("Overview")
    pools = ratio_bars(
        "Fullest pools",
        "Each pool used over its limit on the fullest selected node. Ephemeral ports: the most "
        "ports held toward one destination over the port range (at 100 % connect() fails with "
        "EADDRNOTAVAIL). TCP/UDP memory: over the pressure threshold (past 100 % the kernel "
        "shrinks buffers, at the hard limit allocations fail). TIME_WAIT and orphans: past "
        "their limit the kernel destroys or resets them. File handles: at 100 % open() and "
        "socket() fail with ENFILE. Memory and orphan limits exist only in the host's network "
        "namespace. What to do: " + RUNBOOKS + ".",
        [
            Query(f"max({ports_ratio})", "ephemeral ports toward one destination", instant=True),
            Query(f"max({memory_ratio('tcp')})", "TCP memory / pressure", instant=True),
            Query(f"max({memory_ratio('udp')})", "UDP memory / pressure", instant=True),
            Query(
                f"max({over('socket_tcp_timewait', 'socket_tcp_timewait_limit')})",
                "TIME_WAIT",
                instant=True,
            ),
            Query(
                f"max({over('socket_tcp_orphans', 'socket_tcp_orphans_limit')})",
                "TCP orphans",
                instant=True,
            ),
            Query(
                f"max({over('socket_file_handles_allocated', 'socket_file_handles_limit')})",
                "file handles",
                instant=True,
            ),
        ],
        "no socket data",
    )
    layout.panel(pools, 16, 8)
    layout.panel(collector_status(["socket", "socket_ports", "pods"]), 8, 8)

    layout.row("Sockets and memory")
    layout.panel(
        ts(
            "Sockets in use",
            "Sockets holding an address or port by family and protocol (socket_inuse) and "
            "sockets of every family allocated (socket_allocated), summed over the selected "
            "nodes' own network namespaces (pods: the Pods row). Steady growth without more "
            "traffic points to a socket leak; every socket holds memory and a file handle.",
            "short",
            [
                Query(
                    f"sum by (family, protocol) ({sel('socket_inuse')})",
                    "{{family}} {{protocol}} in use",
                ),
                Query(f"sum({sel('socket_allocated')})", "allocated (every family)"),
            ],
            no_value="no socket data",
        ),
        8,
        8,
    )
    for protocol in ("tcp", "udp"):
        name = protocol.upper()
        matcher = f'protocol="{protocol}"'
        layout.panel(
            ts(
                f"{name} memory vs pressure and limit",
                f"Memory charged to {name} socket buffers on the host (socket_memory_bytes) with "
                f"{protocol}_mem's thresholds (dashed): min, pressure (above it the kernel "
                "shrinks buffers and throttles senders) and limit (at it allocations fail and "
                "packets drop). The thresholds exist only in the host's network namespace, so "
                "they are absent when the exporter runs in another. " + RUNBOOKS + ".",
                "bytes",
                [
                    Query(sel("socket_memory_bytes", matcher), "{{instance}} used"),
                    Query(sel("socket_memory_min_bytes", matcher), "{{instance}} min"),
                    Query(sel("socket_memory_pressure_bytes", matcher), "{{instance}} pressure"),
                    Query(sel("socket_memory_limit_bytes", matcher), "{{instance}} limit"),
                ],
                limits=["B", "C", "D"],
                no_value="no socket data",
            ),
            8,
            8,
        )

    layout.row("TCP pools")
    layout.panel(
        ts(
            "TCP orphans vs limit",
            "TCP sockets closed by their process but not finished (socket_tcp_orphans, host-wide)"
            " and tcp_max_orphans (dashed; only in the host's network namespace). Past the limit"
            " the kernel resets orphans at once ('too many orphaned sockets') and peers see "
            "resets. " + RUNBOOKS + ".",
            "short",
            [
                Query(sel("socket_tcp_orphans"), "{{instance}} orphans"),
                Query(sel("socket_tcp_orphans_limit"), "{{instance}} limit"),
            ],
            limits=["B"],
        ),
        12,
        8,
    )
    layout.panel(
        ts(
            "TIME_WAIT vs limit",
            "TCP sockets in TIME_WAIT (socket_tcp_timewait) and tcp_max_tw_buckets (dashed). "
            "At the limit new TIME_WAIT sockets are destroyed at once (TCP: time wait bucket "
            "table overflow), which risks stray segments reaching new connections; a high "
            "count also holds ephemeral ports. " + RUNBOOKS + ".",
            "short",
            [
                Query(sel("socket_tcp_timewait"), "{{instance}} TIME_WAIT"),
                Query(sel("socket_tcp_timewait_limit"), "{{instance}} limit"),
            ],
            limits=["B"],
        ),
        12,
        8,
    )
    layout.panel(
        ts(
            "File handles vs limit",
            "File handles allocated on the host over fs.file-max "
            "(socket_file_handles_allocated / socket_file_handles_limit). Every socket holds "
            "one; at 100 % open(), socket() and accept() fail with ENFILE. " + RUNBOOKS + ".",
            "percentunit",
            [
                Query(
                    over("socket_file_handles_allocated", "socket_file_handles_limit"),
                    "{{instance}}",
                )
            ],
            ratio=True,
            no_value="no socket data",
        ),
        12,
        8,
    )
    layout.panel(
        ts(
            "TCP memory pressure and aborts",
            "Times TCP entered memory pressure (socket_tcp_memory_pressures_total), connections"
            " reset for lack of memory or too many orphans (socket_tcp_aborts_on_memory_total)"
            " and TIME_WAIT sockets not kept at tcp_max_tw_buckets "
            "(socket_tcp_timewait_overflows_total), per second. Anything above 0 means a TCP "
            "pool ran out.",
            "ops",
            [
                Query(rate("socket_tcp_memory_pressures_total"), "{{instance}} memory pressure"),
                Query(rate("socket_tcp_aborts_on_memory_total"), "{{instance}} aborts on memory"),
                Query(
                    rate("socket_tcp_timewait_overflows_total"), "{{instance}} TIME_WAIT overflow"
                ),
            ],
        ),
        12,
        8,
    )

    layout.row("Ephemeral ports")
    layout.panel(
        ts(
            "Ephemeral ports: most used toward one destination vs range",
            "The most local ephemeral ports sockets hold toward any one destination, per "
            "protocol (socket_ephemeral_ports_used_max, from the background socket scan), and "
            "the ports ip_local_port_range offers (socket_ephemeral_ports_range_size, dashed). "
            "Near the range, connect() to that destination fails with EADDRNOTAVAIL; TIME_WAIT "
            "sockets hold their port for 60 s. " + RUNBOOKS + ".",
            "short",
            [
                Query(
                    sel("socket_ephemeral_ports_used_max"),
                    "{{instance}} {{protocol}} most toward one destination",
                ),
                Query(sel("socket_ephemeral_ports_range_size"), "{{instance}} range"),
            ],
            limits=["B"],
            no_value="no socket scan",
        ),
        12,
        9,
    )
    layout.panel(
        top_table(
            "Ephemeral ports by destination",
            "Ephemeral ports held toward each destination (remote address and port) for the "
            "destinations holding the most, per node (socket_ephemeral_ports_used, top K). An "
            "empty destination is unconnected UDP or bound-only TCP. A count near the port "
            "range (panel on the left) is the destination connect() will fail to.",
            Query(sort_desc(sel("socket_ephemeral_ports_used")), instant=True, table=True),
            "ports",
            "no ephemeral ports in use",
        ),
        12,
        9,
    )

    layout.row("Exhaustion counters")
    layout.panel(
        ts(
            "Listen queue overflows and drops",
            "Connections that completed the handshake while a listener's accept queue was full "
            "(socket_listen_overflows_total) and connections dropped at a listener for any "
            "reason (socket_listen_drops_total), per second. Above 0 means a server accepts too "
            "slowly or its backlog (listen(), net.core.somaxconn) is too small: clients see "
            "timeouts and retransmitted SYNs. The node's own network namespace; pods: the "
            "Pods row.",
            "ops",
            [
                Query(rate("socket_listen_overflows_total"), "{{instance}} overflows"),
                Query(rate("socket_listen_drops_total"), "{{instance}} drops"),
            ],
        ),
        12,
        8,
    )
    layout.panel(
        ts(
            "UDP buffer and memory errors",
            "UDP datagrams per second, by family: dropped for a full receive buffer, not sent "
            "for a full send buffer, received but not delivered (in errors, which include the "
            "buffer and memory errors) and dropped because udp_mem ran out. Above 0 means "
            "datagrams are lost: a reader too slow or rmem/wmem too small. The node's own "
            "network namespace; pods: the Pods row.",
            "ops",
            [
                Query(
                    rate("socket_udp_receive_buffer_errors_total"),
                    "{{instance}} {{family}} receive buffer",
                ),
                Query(
                    rate("socket_udp_send_buffer_errors_total"),
                    "{{instance}} {{family}} send buffer",
                ),
                Query(rate("socket_udp_in_errors_total"), "{{instance}} {{family}} in errors"),
                Query(rate("socket_udp_memory_errors_total"), "{{instance}} {{family}} memory"),
            ],
        ),
        12,
        8,
    )

    layout.row("Pods")
    pod_note = (
        f" The {TOP_PODS} highest at each moment, over the selected nodes, named by namespace "
        "and pod, by pod_uid when the exporter could not learn the name, or by cgroup for a "
        "container outside Kubernetes. Empty when the pods collector is off."
    )
    layout.panel(
        ts(
            "Pods with the most listen queue overflows",
            "Connections that completed the handshake while a listener's accept queue in the "
            "pod was full, per second (socket_listen_overflows_total of the pod's network "
            "namespace). Above 0 means a server in the pod accepts too slowly (overloaded, "
            "CPU-throttled) or its backlog (listen(), the pod's net.core.somaxconn) is too "
            "small: its clients see timeouts and retransmitted SYNs. " + RUNBOOKS + "." + pod_note,
            "ops",
            [Query(top_pods(pods_rate("socket_listen_overflows_total")), POD_LEGEND)],
            no_value="no pod overflows",
        ),
        12,
        8,
    )
    layout.panel(
        ts(
            "Pods with the most UDP receive buffer errors",
            "UDP datagrams per second dropped because a socket's receive buffer in the pod was "
            "full (socket_udp_receive_buffer_errors_total of the pod's network namespace, IPv4 "
            "and IPv6 summed). Above 0 means the pod reads too slowly for its traffic or its "
            "buffers (SO_RCVBUF, capped by the node's net.core.rmem_max) are too small. "
            + RUNBOOKS
            + "."
            + pod_note,
            "ops",
            [Query(top_pods(pods_rate("socket_udp_receive_buffer_errors_total")), POD_LEGEND)],
            no_value="no pod UDP drops",
        ),
        12,
        8,
    )
    layout.panel(
        ts(
            "Pods with the most sockets in use",
            "Sockets holding an address or port in the pod's network namespace, every family "
            "and protocol summed (socket_inuse). Steady growth without more traffic points to "
            "a socket leak in the pod; every socket holds memory and a file handle on the node."
            + pod_note,
            "short",
            [Query(top_pods(pods("socket_inuse")), POD_LEGEND)],
            no_value="no pod data",
        ),
        12,
        8,
    )
    layout.panel(
        ts(
            "Pods with the most conntrack entries",
            "Entries in the pod's own conntrack table (conntrack_entries of its network "
            "namespace; only where a rule there uses conntrack, e.g. a service mesh's "
            "redirection). Each namespace may fill up to the node's nf_conntrack_max on its own "
            "(Conntrack table dashboard); at it the pod's new connections are dropped. "
            + RUNBOOKS
            + "."
            + pod_note,
            "short",
            [Query(top_pods(pods("conntrack_entries")), POD_LEGEND)],
            no_value="no pod conntrack tables",
        ),
        12,
        8,
    )
    discovery = ts(
        "Pod discovery",
        "The pods collector: network namespaces it reports (conntrack_exporter_pod_namespaces) "
        "and those past collectors.pods.max_namespaces it leaves out (skipped: the pod panels "
        "above and the pod alerts cannot see them), how long its last discovery took and how "
        "old it is (right axis), and failed discoveries per second by reason. Skipped above 0 "
        "or errors above 0 mean the pod panels are incomplete. " + RUNBOOKS + ".",
        "short",
        [
            Query(sel("conntrack_exporter_pod_namespaces"), "{{instance}} namespaces"),
            Query(sel("conntrack_exporter_pod_namespaces_skipped"), "{{instance}} skipped"),
            Query(
                sel("conntrack_exporter_pod_discovery_duration_seconds"), "{{instance}} duration"
            ),
            Query(
                f"time() - {sel('conntrack_exporter_pod_discovery_timestamp_seconds')}",
                "{{instance}} age",
            ),
            Query(
                rate("conntrack_exporter_pod_discovery_errors_total"),
                "{{instance}} errors {{reason}}",
            ),
        ],
        no_value="no pods collector",
    )
    discovery.override_by_query("C", _right_axis("s"))
    discovery.override_by_query("D", _right_axis("s"))
    discovery.override_by_query(
        "E", [dashboard_models.DynamicConfigValue(id_val="unit", value="ops")]
    )
    layout.panel(discovery, 24, 8)

    layout.row("Exporter")
    scan = ts(
        "Socket scan health",
        "The background socket scan behind the ephemeral-port panels: age of its last result "
        "(time() - socket_ports_scan_timestamp_seconds), how long it took, sockets read "
        "(right axis), whether it read every socket (socket_ports_scan_complete, 0 when "
        "max_sockets stopped it: counts are then lower bounds) and failed scans per second by "
        "reason. An age well above the scan interval (30 s) or errors above 0 mean the port "
        "panels are stale.",
        "s",
        [
            Query(f"time() - {sel('socket_ports_scan_timestamp_seconds')}", "{{instance}} age"),
            Query(sel("socket_ports_scan_duration_seconds"), "{{instance}} duration"),
            Query(sel("socket_ports_scan_sockets"), "{{instance}} sockets read"),
            Query(sel("socket_ports_scan_complete"), "{{instance}} complete"),
            Query(rate("socket_ports_scan_errors_total"), "{{instance}} errors {{reason}}"),
        ],
        no_value="no socket scan",
    )
    scan.override_by_query("C", _right_axis("short"))
    scan.override_by_query("D", [dashboard_models.DynamicConfigValue(id_val="unit", value="bool")])
    scan.override_by_query("E", [dashboard_models.DynamicConfigValue(id_val="unit", value="ops")])
    layout.panel(scan, 24, 8)
    return _to_json(builder)


def _to_json(builder: dashboard_builders.Dashboard) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(json.dumps(builder.build(), cls=JSONEncoder))
    return result


# --- files, check, queries -----------------------------------------------------------------------

DASHBOARDS = {"conntrack.json": conntrack_dashboard, "sockets.json": sockets_dashboard}


def render(dashboard: Mapping[str, Any]) -> str:
    """The file text of a dashboard: sorted keys, 2-space indent, a final newline."""
    return json.dumps(dashboard, indent=2, sort_keys=True) + "\n"


def rendered() -> dict[str, str]:
    """Every dashboard's file name and the text this generator writes for it."""
    return {name: render(build()) for name, build in DASHBOARDS.items()}


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Every panel that is not a row, panels nested in collapsed rows included."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def panel_queries(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) of every query of every panel, in dashboard order."""
    return [
        (panel["title"], target["expr"])
        for panel in iter_panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def load(name: str, directory: Path = HERE) -> dict[str, Any]:
    """A committed dashboard (e.g. "conntrack.json") as a JSON object."""
    result: dict[str, Any] = json.loads((directory / name).read_text())
    return result


def stale(directory: Path = HERE) -> list[Path]:
    """Committed files that differ from what the generator would write."""
    return [
        directory / name
        for name, text in rendered().items()
        if not (directory / name).is_file() or (directory / name).read_text() != text
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if a committed dashboard differs from the generator's",
    )
    parser.add_argument("--output", type=Path, default=HERE, help="directory of the JSON files")
    args = parser.parse_args(argv)
    if args.check:
        differing = stale(args.output)
        for path in differing:
            sys.stderr.write(f"{path}: differs from generate.py's output; run make dashboards\n")
        return 1 if differing else 0
    for name, text in rendered().items():
        path = args.output / name
        path.write_text(text)
        sys.stdout.write(f"wrote {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
