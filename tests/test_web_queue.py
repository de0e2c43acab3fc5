"""Shared collections, the fair queue, and what the event-loop server holds open.

As in test_web_load.py, the server runs in this process on loopback with stand-in collectors,
and nothing asserts how long anything took: a collection is held open on an Event for as long
as a test needs, and each test checks what each scrape got.
"""

from __future__ import annotations

import gzip
import http.client
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

import pytest
from prometheus_client.metrics_core import GaugeMetricFamily

from conntrack_exporter import server as server_module
from conntrack_exporter.registry import Collected
from conntrack_exporter.server import MetricsServer
from conntrack_exporter.webconfig import WebSecurity
from tests.test_web_load import CLIENT_TIMEOUT, closed_by_server, connect, running

OPENMETRICS = "application/openmetrics-text;version=1.0.0"


class CountingGate:
    """A collector whose every collection waits for the gate, and reports its own number."""

    name: ClassVar[str] = "gate"
    default_enabled: ClassVar[bool] = True

    def __init__(self) -> None:
        self.calls = 0
        self.entered = threading.Event()
        self.opened = threading.Event()

    def collect(self) -> Collected:
        self.calls += 1
        self.entered.set()
        assert self.opened.wait(CLIENT_TIMEOUT)
        family = GaugeMetricFamily("test_collection", "Which collection.", value=self.calls)
        return Collected("procfs", [family])


class HeldAuth:
    """Credentials checked in a worker, held there until the test releases them."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def check(self, authorization: str | None) -> bool:
        self.entered.set()
        assert self.release.wait(CLIENT_TIMEOUT)
        return True


def scrape(
    srv: MetricsServer, source: str = "127.0.0.1", **headers: str
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection(
        "127.0.0.1", srv.server_address[1], timeout=CLIENT_TIMEOUT, source_address=(source, 0)
    )
    try:
        connection.request(
            "GET", "/metrics", headers={k.replace("_", "-"): v for k, v in headers.items()}
        )
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def eventually(condition: Callable[[], bool], what: str) -> None:
    """Wait for something the server does on its own thread; the deadline only ends a hang."""
    deadline = time.monotonic() + CLIENT_TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.01)


# --- shared collections ---------------------------------------------------------------------


def test_scrapes_that_arrive_during_a_collection_share_it_in_their_own_formats():
    gate = CountingGate()
    with running(gate, max_requests=0) as srv, ThreadPoolExecutor(3) as pool:
        plain = pool.submit(scrape, srv)
        assert gate.entered.wait(CLIENT_TIMEOUT)
        zipped = pool.submit(scrape, srv, Accept_Encoding="gzip")
        openmetrics = pool.submit(scrape, srv, Accept=OPENMETRICS)
        # All three are waiting on the one collection before it may finish.
        eventually(lambda: srv.shared.served == 3, "three scrapes waiting")
        gate.opened.set()
        (s1, h1, b1), (s2, h2, b2), (s3, h3, b3) = (
            f.result(CLIENT_TIMEOUT) for f in (plain, zipped, openmetrics)
        )
    assert (s1, s2, s3) == (200, 200, 200)
    assert gate.calls == 1 and srv.shared.collections == 1
    assert b"test_collection 1.0\n" in b1
    assert h2["Content-Encoding"] == "gzip" and gzip.decompress(b2) == b1
    assert h3["Content-Type"].startswith("application/openmetrics-text")
    assert b"test_collection 1.0\n" in b3 and b3.endswith(b"# EOF\n")
    assert "Content-Encoding" not in h1


def test_a_scrape_after_a_collection_finished_gets_a_new_one_never_the_old_result():
    gate = CountingGate()
    gate.opened.set()
    with running(gate) as srv:
        first = scrape(srv)[2]
        second = scrape(srv)[2]
    assert b"test_collection 1.0\n" in first and b"test_collection 2.0\n" in second
    assert gate.calls == 2 and srv.shared.collections == 2


def test_a_scrape_waiting_on_a_collection_holds_no_worker():
    # One worker, held by the collection: the waiting scrapes are coroutines, not threads.
    gate = CountingGate()
    with (
        pytest.MonkeyPatch.context() as patch,
        ThreadPoolExecutor(20) as pool,
    ):
        patch.setattr(server_module, "WORKERS", 1)
        with running(gate, max_requests=0) as srv:
            held = [pool.submit(scrape, srv) for _ in range(20)]
            eventually(lambda: srv.shared.served == 20, "twenty scrapes waiting")
            gate.opened.set()
            results = [future.result(CLIENT_TIMEOUT) for future in held]
    assert {status for status, _, _ in results} == {200}
    assert len({body for _, _, body in results}) == 1 and gate.calls == 1


# --- where a collection runs -------------------------------------------------------------------


class ThreadRecorder:
    """A collector that records the thread running each collection; the calls numbered in
    `slow` (from 1) sleep `slow_seconds` first, the others return at once."""

    name: ClassVar[str] = "threads"
    default_enabled: ClassVar[bool] = True

    def __init__(self, slow: tuple[int, ...] = (), slow_seconds: float = 0.0) -> None:
        self.threads: list[str] = []
        self.slow = slow
        self.slow_seconds = slow_seconds

    def collect(self) -> Collected:
        self.threads.append(threading.current_thread().name)
        if len(self.threads) in self.slow:
            time.sleep(self.slow_seconds)
        family = GaugeMetricFamily("test_collection", "Which collection.", value=len(self.threads))
        return Collected("procfs", [family])

    def places(self) -> list[str]:
        """Where each collection ran: a worker of the pool, or the event loop's own thread."""
        return ["worker" if name.startswith("http") else "loop" for name in self.threads]


@pytest.fixture
def no_collection_slow(monkeypatch):
    """Only the tests' own sleeps make a collection slow: a pause of the whole test process (a
    full garbage collection in a large suite takes tens of milliseconds) must not count as one
    and send the rest to the workers for the hold-off."""
    monkeypatch.setattr(server_module, "INLINE_COLLECTION_MAX_SECONDS", CLIENT_TIMEOUT)


@pytest.mark.usefixtures("no_collection_slow")
def test_at_rest_a_collection_runs_on_the_event_loop_once_one_was_seen_to_be_quick():
    recorder = ThreadRecorder()
    with running(recorder) as srv:
        bodies = [scrape(srv)[2] for _ in range(3)]
    # The `running` server's loop runs in a thread of its own (serve_forever), not a worker.
    assert recorder.places() == ["worker", "loop", "loop"]
    assert all("serve_forever" in name for name in recorder.threads[1:])
    for number, body in enumerate(bodies, 1):
        assert b"test_collection %d.0\n" % number in body


@pytest.mark.parametrize(("holdoff", "after"), [(300.0, "worker"), (0.0, "loop")])
def test_a_slow_collection_sends_the_next_ones_to_the_workers_for_the_hold_off(
    monkeypatch, holdoff, after
):
    monkeypatch.setattr(server_module, "INLINE_COLLECTION_MAX_SECONDS", 0.2)
    monkeypatch.setattr(server_module, "SLOW_COLLECTION_HOLDOFF_SECONDS", holdoff)
    recorder = ThreadRecorder(slow=(2,), slow_seconds=0.5)
    with running(recorder) as srv:
        assert [scrape(srv)[0] for _ in range(4)] == [200] * 4
    # The second, on the loop, was slow: the third and fourth go to workers until the
    # hold-off has passed (at once with no hold-off).
    assert recorder.places() == ["worker", "loop", after, after]


@pytest.mark.usefixtures("no_collection_slow")
def test_with_more_connections_open_than_a_scraper_pair_and_a_probe_collections_go_to_workers():
    # A loop busy collecting reads no other connection's request, so "no other request in
    # progress" would hold under a flood too: the open connections are what tell.
    recorder = ThreadRecorder()
    limit = server_module.INLINE_MAX_CONNECTIONS
    with running(recorder) as srv:
        assert scrape(srv)[0] == 200
        idle = [connect(srv) for _ in range(limit - 1)]
        try:
            # With the scrape's own connection: at the limit, then one past it.
            eventually(lambda: srv.open_connections == limit - 1, "the idle connections counted")
            assert scrape(srv)[0] == 200
            idle.append(connect(srv))
            eventually(lambda: srv.open_connections == limit, "one more idle connection counted")
            assert scrape(srv)[0] == 200
        finally:
            for sock in idle:
                sock.close()
        eventually(lambda: srv.open_connections == 0, "the idle connections closed")
        assert scrape(srv)[0] == 200
    assert recorder.places() == ["worker", "loop", "worker", "loop"]


class ThirdCheckHeld:
    """Credentials accepted at once, but for the third check, held until released."""

    def __init__(self) -> None:
        self.checks = 0
        self.entered = threading.Event()
        self.release = threading.Event()

    def check(self, authorization: str | None) -> bool:
        self.checks += 1
        if self.checks == 3:
            self.entered.set()
            assert self.release.wait(CLIENT_TIMEOUT)
        return True


@pytest.mark.usefixtures("no_collection_slow")
def test_a_collection_goes_to_a_worker_while_another_request_is_in_progress():
    recorder = ThreadRecorder()
    auth = ThirdCheckHeld()
    security = WebSecurity(auth=auth)  # type: ignore[arg-type]
    with running(recorder, security) as srv, ThreadPoolExecutor(1) as pool:
        assert [scrape(srv, Authorization="Basic eDp5")[0] for _ in range(2)] == [200, 200]
        held = pool.submit(scrape, srv, Authorization="Basic eDp5")
        assert auth.entered.wait(CLIENT_TIMEOUT)
        # The held scrape keeps its place in the queue while its password is checked: this
        # one's collection must not stall the loop it needs.
        assert scrape(srv, Authorization="Basic eDp5")[0] == 200
        auth.release.set()
        assert held.result(CLIENT_TIMEOUT)[0] == 200
    assert recorder.places() == ["worker", "loop", "worker", "loop"]


# --- the fair queue ---------------------------------------------------------------------------


def test_a_client_address_cannot_take_every_place_in_the_queue(caplog):
    gate = CountingGate()
    # 8 places, 2 a client address.
    with running(gate, max_requests=8) as srv, ThreadPoolExecutor(3) as pool:
        held = [pool.submit(scrape, srv) for _ in range(2)]
        eventually(lambda: srv.queue.held == 2, "the flooder's two places taken")
        # The flooder's third scrape is refused at once; another address still gets in.
        assert scrape(srv)[0] == 503
        other = pool.submit(scrape, srv, "127.0.0.2")
        eventually(lambda: srv.queue.held == 3, "the other address queued")
        gate.opened.set()
        assert [f.result(CLIENT_TIMEOUT)[0] for f in [*held, other]] == [200, 200, 200]
    [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert warning.getMessage() == (
        "refusing scrapes (503): a client address holds its share of the queue"
    )
    assert (warning.limit, warning.refused, warning.client) == (2, 1, "127.0.0.1")
    assert srv.queue.held == 0


def test_work_no_worker_starts_in_time_gets_503(monkeypatch):
    monkeypatch.setattr(server_module, "WORKERS", 1)
    monkeypatch.setattr(server_module, "QUEUE_WAIT_SECONDS", 0.2)
    auth = HeldAuth()
    gate = CountingGate()
    gate.opened.set()
    security = WebSecurity(auth=auth)  # type: ignore[arg-type]
    with running(gate, security) as srv, ThreadPoolExecutor(1) as pool:
        first = pool.submit(scrape, srv, Authorization="Basic eDp5")
        assert auth.entered.wait(CLIENT_TIMEOUT)
        # The one worker is checking the first scrape's password: this one's check waits in
        # the queue, is dropped, and the scrape is answered 503, not held.
        assert scrape(srv, Authorization="Basic eDp5")[0] == 503
        auth.release.set()
        assert first.result(CLIENT_TIMEOUT)[0] == 200
        assert scrape(srv, Authorization="Basic eDp5")[0] == 200
        assert srv.queue.held == 0


# --- what the server holds ----------------------------------------------------------------------


def test_idle_connections_hold_no_thread_and_everything_is_released_at_the_end():
    gate = CountingGate()
    gate.opened.set()
    fds, threads = set(os.listdir("/proc/self/fd")), threading.active_count()
    with running(gate, read_timeout_seconds=60, max_connections=200) as srv:
        idle = [connect(srv) for _ in range(100)]
        assert scrape(srv)[0] == 200
        eventually(lambda: srv.open_connections == 100, "the idle connections accepted")
        # The serving thread, the workers, the web-configuration thread (unused here): none
        # per connection.
        assert threading.active_count() <= threads + 1 + server_module.WORKERS
        for sock in idle:
            sock.close()
    assert threading.active_count() == threads
    assert set(os.listdir("/proc/self/fd")) == fds


def test_open_connections_are_dropped_at_shutdown_quietly(caplog):
    gate = CountingGate()
    gate.opened.set()
    with running(gate, read_timeout_seconds=60) as srv:
        sock = connect(srv)
        kept = connect(srv)
        kept.sendall(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        response = http.client.HTTPResponse(kept)
        response.begin()
        assert response.status == 200 and response.read()
        eventually(lambda: srv.open_connections == 2, "the connections accepted")
    for conn in (sock, kept):
        with conn:
            assert closed_by_server(conn)
    # A shutdown is no error: nothing logged at ERROR (asyncio's "exception in callback").
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []


# --- request heads ----------------------------------------------------------------------------


def raw(srv: MetricsServer, head: bytes) -> http.client.HTTPResponse:
    sock = connect(srv)
    sock.sendall(head)
    response = http.client.HTTPResponse(sock)
    response.begin()
    response.read()
    sock.close()
    return response


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /metrics\r\n\r\n", 400),
        (b"GET /metrics HTTP/2.0\r\n\r\n", 505),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nno colon\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431),
        (b"GET /metrics HTTP/1.1\r\nX-A: " + b"b" * 70_000 + b"\r\n\r\n", 431),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 501),
    ],
)
def test_bad_request_heads_get_their_status_and_the_connection_ends(head, status):
    with running(CountingGate()) as srv:
        response = raw(srv, head)
    assert response.status == status
    assert response.getheader("Connection") == "close" or status == 501


def test_header_names_are_case_insensitive_and_http_1_0_closes_unless_asked():
    gate = CountingGate()
    gate.opened.set()
    with running(gate) as srv:
        response = raw(srv, b"GET /metrics HTTP/1.0\r\naccept-ENCODING: gzip\r\n\r\n")
        assert response.status == 200 and response.getheader("Content-Encoding") == "gzip"
        assert response.getheader("Connection") == "close"
        response = raw(srv, b"GET /metrics HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
        assert response.status == 200 and response.getheader("Connection") is None
