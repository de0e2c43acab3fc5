"""Failure isolation: one collector failing never fails the scrape or the other collectors.

The failing collectors here are deliberate stand-ins: the behaviour under test is the
registry's, and a kernel that makes a collector raise on demand cannot be had.
"""

from __future__ import annotations

import calendar
import gzip
import http.client
import logging
import re
import socket
import threading
import time
from typing import ClassVar

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

from conntrack_exporter.config import WebConfig
from conntrack_exporter.registry import (
    Collected,
    CollectorSet,
    CollectorStatus,
    ExporterCollector,
    NoDataError,
)
from conntrack_exporter.server import MetricsServer, landing_page
from tests.collectors import exporter as exporter_of
from tests.metrics import parse_samples, value


class Working:
    name: ClassVar[str] = "working"
    default_enabled: ClassVar[bool] = True

    def collect(self) -> Collected:
        return Collected("procfs", [GaugeMetricFamily("test_value", "A value.", value=42)])

    def close(self) -> None:
        pass


class Raising:
    name: ClassVar[str] = "raising"
    default_enabled: ClassVar[bool] = True

    def __init__(self, error: Exception) -> None:
        self.error = error

    def collect(self) -> Collected:
        raise self.error

    def close(self) -> None:
        pass


def scrape(exporter: ExporterCollector) -> dict:
    return parse_samples(generate_latest(exporter).decode())


def test_failing_collector_reports_success_0_and_others_serve():
    exporter = exporter_of(Raising(RuntimeError("boom")), Working())
    samples = scrape(exporter)
    assert value(samples, "test_value") == 42
    assert value(samples, "conntrack_exporter_collector_success", collector="working") == 1
    assert value(samples, "conntrack_exporter_collector_success", collector="raising") == 0
    assert (
        value(samples, "conntrack_exporter_source_info", collector="working", source="procfs") == 1
    )
    assert ("collector", "raising") not in {
        pair for labels in samples["conntrack_exporter_source_info"] for pair in labels
    }
    assert set(samples["conntrack_exporter_collector_duration_seconds"]) == {
        (("collector", "raising"),),
        (("collector", "working"),),
    }


def test_failures_are_logged_once_per_distinct_error(caplog):
    failing = Raising(OSError(5, "Input/output error"))
    exporter = exporter_of(failing)
    with caplog.at_level(logging.DEBUG, logger="conntrack_exporter.registry"):
        scrape(exporter)
        scrape(exporter)
        failing.error = NoDataError("absent")
        scrape(exporter)
    records = [(r.levelname, r.getMessage(), r.err) for r in caplog.records]
    assert records == [
        ("WARNING", "collector failed", "OSError: [Errno 5] Input/output error"),
        ("DEBUG", "collector failed", "no data: absent"),
    ]


def test_recovery_is_logged(caplog):
    failing = Raising(RuntimeError("x"))
    exporter = exporter_of(failing)
    scrape(exporter)
    recovered = Working()
    recovered.name = "raising"
    exporter.replace(CollectorSet([recovered]))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="conntrack_exporter.registry"):
        samples = scrape(exporter)
    assert value(samples, "conntrack_exporter_collector_success", collector="raising") == 1
    assert [r.getMessage() for r in caplog.records] == ["collector recovered"]


@pytest.fixture
def server():
    exporter = exporter_of(Raising(ValueError("bad bytes")), Working())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    web = WebConfig(listen_address=f"127.0.0.1:{port}", telemetry_path="/metrics")
    srv = MetricsServer(web, exporter)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join()


def get(server: MetricsServer, path: str, method: str = "GET", headers: dict | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    connection.request(method, path, headers=headers or {})
    response = connection.getresponse()
    return response.status, dict(response.getheaders()), response.read()


def test_http_scrape_is_200_while_a_collector_fails(server):
    status, _headers, body = get(server, "/metrics")
    assert status == 200
    samples = parse_samples(body.decode())
    assert value(samples, "test_value") == 42
    assert value(samples, "conntrack_exporter_collector_success", collector="raising") == 0


def test_http_routes(server):
    status, headers, page = get(server, "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert b'<a href="/metrics">' in page
    assert b"<td>raising</td>" in page and b"<td>working</td>" in page
    assert get(server, "/healthz")[::2] == (200, b"ok\n")
    assert get(server, "/nope")[0] == 404
    status, headers, body = get(server, "/metrics", "HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


def collector_rows(page: bytes) -> dict[str, str]:
    """The landing page's collectors table: name -> the rest of its row, tags and all."""
    rows = re.findall(r"<tr><td>([^<]*)</td>(.*?)</tr>", page.decode())
    return dict(rows)


NOT_RUN = (
    '<td colspan="4">not run yet: no scrape of /metrics since the configuration was loaded</td>'
)


def test_the_landing_page_shows_each_collectors_last_run(server):
    """Before any scrape, not run; after one, each collector's outcome, when, its source, and
    for the failing one its error (escaped)."""
    assert collector_rows(get(server, "/")[2]) == {"raising": NOT_RUN, "working": NOT_RUN}
    before = time.time()
    assert get(server, "/metrics")[0] == 200
    after = time.time()
    rows = collector_rows(get(server, "/")[2])
    assert set(rows) == {"raising", "working"}
    cells = {name: re.findall(r"<td>(.*?)</td>", row) for name, row in rows.items()}
    for name in ("raising", "working"):
        when, _status, _source, _error = cells[name]
        stamp = re.match(
            r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC \((\d+) s ago, took [\d.]+ ms\)$", when
        )
        assert stamp is not None, when
        finished = calendar.timegm(time.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S"))
        assert int(before) <= finished <= after
    assert cells["working"][1:] == ["ok", "procfs", ""]
    assert cells["raising"][1:] == [
        '<span class="failed">failed</span>',
        "",
        "ValueError: bad bytes",
    ]


def test_the_landing_page_escapes_what_collectors_say():
    failed = CollectorStatus(False, 0.0, 0.002, None, "no data: <script>alert(1)</script> & more")
    page = landing_page("/m&trics", [("a<b", failed), ("never", None)], now=65.0).decode()
    assert "<script>" not in page
    assert (
        "<tr><td>a&lt;b</td><td>1970-01-01 00:00:00 UTC (65 s ago, took 2.0 ms)</td>"
        '<td><span class="failed">failed</span></td><td></td>'
        "<td>no data: &lt;script&gt;alert(1)&lt;/script&gt; &amp; more</td></tr>"
    ) in page
    assert "no scrape of /m&amp;trics since the configuration was loaded" in page
    assert '<a href="/m&amp;trics">Metrics</a>' in page
    assert landing_page("/metrics", []).count(b"No collector is enabled.") == 1


def test_http_gzip_when_asked(server):
    _status, headers, body = get(server, "/metrics", headers={"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip"
    assert b"test_value 42.0" in gzip.decompress(body)


def test_keep_alive_serves_several_scrapes_on_one_connection(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    for _ in range(3):
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        assert response.status == 200 and b"test_value 42.0" in response.read()
    assert connection.sock is not None  # still the same open socket


# -- the lifecycle: a set of collectors is closed once, after its last use --------------------


class Tracked(Working):
    """Records its close(), and holds a scrape in collect() until `release` is set."""

    def __init__(self, name: str = "tracked", fail_close: bool = False) -> None:
        self.name = name
        self.fail_close = fail_close
        self.closed = 0
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def collect(self) -> Collected:
        self.entered.set()
        assert self.release.wait(10)
        assert not self.closed, "collected after close"
        return super().collect()

    def close(self) -> None:
        self.closed += 1
        if self.fail_close:
            raise OSError(9, "Bad file descriptor")


def test_close_waits_for_the_scrape_in_flight_then_closes_every_collector(caplog):
    slow, broken, other = Tracked("slow"), Tracked("broken", fail_close=True), Tracked("other")
    slow.release.clear()
    old = CollectorSet([slow, broken, other])
    exporter = ExporterCollector(old)
    scrape_thread = threading.Thread(target=scrape, args=(exporter,))
    scrape_thread.start()
    assert slow.entered.wait(10)
    exporter.replace(CollectorSet([Working()]))
    closer = threading.Thread(target=old.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive() and slow.closed == 0  # the scrape still uses the old set
    slow.release.set()
    scrape_thread.join(10)
    closer.join(10)
    assert not closer.is_alive()
    # One collector failing to close leaves none of the others open.
    assert (slow.closed, broken.closed, other.closed) == (1, 1, 1)
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        "closing a collector failed"
    ]
    # The new set serves; the old one, closed, is never collected again.
    assert value(scrape(exporter), "test_value") == 42
    with old.in_use() as collectors:
        assert collectors is None


def test_a_scrape_that_finds_its_set_closed_is_served_by_the_set_that_replaced_it():
    new = CollectorSet([Tracked("new")])

    class ClosedUnderTheScrape(CollectorSet):
        """A reload lands between the scrape's read of the set and its use of it."""

        def in_use(self):
            if exporter.active is self:
                exporter.replace(new)
                self.close()
            return super().in_use()

    exporter = ExporterCollector(ClosedUnderTheScrape([Tracked("old")]))
    samples = scrape(exporter)
    assert list(samples["conntrack_exporter_collector_success"]) == [(("collector", "new"),)]


def test_a_closed_set_that_is_still_the_active_one_serves_no_collector():
    exporter = ExporterCollector(CollectorSet([Tracked("old")]))
    exporter.active.close()
    assert "conntrack_exporter_collector_success" not in scrape(exporter)


# -- families two collectors report under one name -------------------------------------------


class Reporting(Working):
    """Reports the given families."""

    def __init__(self, name: str, *metrics) -> None:
        self.name = name
        self.metrics = list(metrics)

    def collect(self) -> Collected:
        return Collected("procfs", self.metrics)


def gauge(name: str, labels: dict[str, str], value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, f"{name} help", labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def test_a_family_two_collectors_report_is_one_family_with_every_sample():
    host = gauge("socket_inuse", {}, 5)
    pod = gauge("socket_inuse", {"namespace": "team-a", "pod": "web-1"}, 2)
    exporter = exporter_of(Reporting("socket", host), Reporting("pods", pod))
    text = generate_latest(exporter).decode()
    assert text.count("# TYPE socket_inuse gauge") == 1
    assert value(parse_samples(text), "socket_inuse") == 5
    assert value(parse_samples(text), "socket_inuse", namespace="team-a", pod="web-1") == 2
    assert len(host.samples) == 1  # the collector's own family is left as it was


def test_a_family_reported_as_two_types_keeps_the_first_and_says_so(caplog):
    counter = CounterMetricFamily("clash", "a counter", value=1)
    exporter = exporter_of(Reporting("a", counter), Reporting("b", gauge("clash", {}, 9)))
    samples = scrape(exporter)
    assert samples["clash_total"] == {(): 1.0} and "clash" not in samples
    assert [r.getMessage() for r in caplog.records] == [
        "two collectors report a family as two types"
    ]
