"""Our lean encoder must produce exactly what prometheus_client's encoders produce.

exposition.encode() caches HELP/TYPE lines and renders plain samples itself; anything it does
not handle goes to prometheus_client. Compared byte for byte over every Accept header the
negotiation distinguishes, every metric type, awkward HELP and label text, and values around
each formatting boundary, on a first (uncached) and a second (cached) pass.
"""

from __future__ import annotations

import pytest
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    StateSetMetricFamily,
    SummaryMetricFamily,
    UnknownMetricFamily,
)
from prometheus_client.samples import Exemplar

from conntrack_exporter.exposition import encode

ACCEPT_HEADERS = [
    "",
    "*/*",
    "text/plain",
    "text/plain;version=0.0.4",
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",  # what Prometheus 2.x sends
    "application/openmetrics-text",
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8",
    "application/openmetrics-text;version=1.0.0;escaping=dots",
    "application/openmetrics-text;version=1.0.0;escaping=values",
    "application/openmetrics-text;version=2.0.0",
    "text/plain;version=1.0.0;escaping=underscores",
    "text/plain;version=1.0.0;escaping=allow-utf-8",
    "text/plain;version=1.0.0;escaping=dots",
    "application/openmetrics-text;version=0.0.1,text/plain;version=0.0.4;q=0.5",
]
AWKWARD_VALUES = [
    0,
    -0.0,
    1,
    1.5,
    123456789.0,
    1e-9,
    2**53,
    -3.2e10,
    True,
    999999.9,
    1e6,
    1e6 - 1e-10,
    0.000001,
    -1e-9,
    1e-320,
    5e-324,
    -1e300,
    1e300,
    float("inf"),
    2**64,
    -7,
    1234567,
]


def families():
    awkward = GaugeMetricFamily(
        "g_lab", 'Help with \\ backslash\nnewline "quote" and ünïcode', labels=["b", "a"]
    )
    awkward.add_metric(['v"1\\x\ny', "ü"], 1e22)
    awkward.add_metric(["", "z"], float("nan"))
    awkward.add_metric(["p", "q"], float("-inf"))
    created = CounterMetricFamily("c_created", "counter with created", labels=["x"], created=123.0)
    created.add_metric(["1"], 5, created=1.5)
    exemplar = CounterMetricFamily("c_ex", "counter exemplar", labels=["x"])
    exemplar.add_metric(["1"], 5, exemplar=Exemplar({"trace": "abc"}, 1.0, 2.0))
    stamped = GaugeMetricFamily("g_ts", "gauge ts")
    stamped.add_metric([], 3, timestamp=12.5)
    values = GaugeMetricFamily("g_big", "big values", labels=["n"])
    for index, number in enumerate(AWKWARD_VALUES):
        values.add_metric([str(index)], number)
    return [
        awkward,
        created,
        exemplar,
        stamped,
        values,
        GaugeMetricFamily("a:b_c", "colon name", value=1),
        GaugeMetricFamily("g_seconds", "unit", value=0.1, unit="seconds"),
        InfoMetricFamily("i", "info", value={"k": "v"}),
        HistogramMetricFamily("h", "hist", buckets=[("1.0", 1), ("+Inf", 2)], sum_value=3),
        UnknownMetricFamily("u", "unknown", value=7),
        StateSetMetricFamily("s", "stateset", value={"a": True, "b": False}),
        SummaryMetricFamily("sm", "summary", count_value=2, sum_value=3),
        CounterMetricFamily("z", "int counter", value=10),
    ]


class Families:
    def __init__(self, metrics):
        self.metrics = metrics

    def collect(self):
        return iter(self.metrics)


@pytest.mark.parametrize("accept", ACCEPT_HEADERS)
def test_encode_is_byte_for_byte_prometheus_client(accept):
    registry = Families(families())
    encoder, content_type = choose_encoder(accept)
    expected = encoder(registry)
    for _ in range(2):  # the second pass reads the cached header lines
        assert encode(registry, accept) == (expected, content_type)
