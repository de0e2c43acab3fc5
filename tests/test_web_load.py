"""The server under load and under slow clients: caps that refuse at once, deadlines that drop.

The server runs in this process, on loopback, with a stand-in collector: what is under test
is the HTTP side, and a scrape held in flight for as long as a test wants needs a collector
that waits on an Event. Nothing here asserts how long anything took: each test checks what
happened (a 503, a connection closed before its request was complete), with generous client
timeouts only so that a broken server fails the test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

import pytest
from prometheus_client.metrics_core import GaugeMetricFamily

from conntrack_exporter import server as server_module
from conntrack_exporter.config import WebConfig
from conntrack_exporter.registry import Collected
from conntrack_exporter.server import MetricsServer
from conntrack_exporter.webconfig import PLAIN_HTTP, WebSecuritySource
from tests.collectors import exporter

CLIENT_TIMEOUT = 30  # only to fail instead of hanging; no assertion depends on it
REQUEST_HEAD = b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n"


class Gate:
    """A collector whose scrapes wait until the test opens the gate."""

    name: ClassVar[str] = "gate"
    default_enabled: ClassVar[bool] = True

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()

    def collect(self) -> Collected:
        self.entered.set()
        assert self.opened.wait(CLIENT_TIMEOUT)
        return Collected("procfs", [GaugeMetricFamily("test_value", "A value.", value=1)])


class Instant:
    name: ClassVar[str] = "instant"
    default_enabled: ClassVar[bool] = True

    def collect(self) -> Collected:
        return Collected("procfs", [GaugeMetricFamily("test_value", "A value.", value=1)])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running(
    collector: object, security: WebSecuritySource = PLAIN_HTTP, **web: object
) -> Iterator[MetricsServer]:
    """A server of `collector` on a free loopback port, serving in a thread of its own."""
    config = WebConfig(listen_address=f"127.0.0.1:{free_port()}", **web)
    srv = MetricsServer(config, exporter(collector), security)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join()


def get(srv: MetricsServer, path: str = "/metrics") -> int:
    connection = http.client.HTTPConnection(
        "127.0.0.1", srv.server_address[1], timeout=CLIENT_TIMEOUT
    )
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def connect(srv: MetricsServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=CLIENT_TIMEOUT)


def closed_by_server(sock: socket.socket) -> bool:
    """Wait for the server to close a connection that sent nothing it could answer."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def trickle(sock: socket.socket, data: bytes, interval: float) -> tuple[int, bytes]:
    """Send `data` one byte per `interval` until the server closes the connection.

    The pacing is a receive with a timeout, so that a close is seen as soon as it comes.
    Returns how many bytes went out, and whatever came back.
    """
    sock.settimeout(interval)
    for sent in range(len(data)):
        try:
            reply = sock.recv(4096)
        except TimeoutError:
            sock.sendall(data[sent : sent + 1])
            continue
        except ConnectionResetError:
            reply = b""
        return sent, reply
    sock.settimeout(CLIENT_TIMEOUT)
    return len(data), sock.recv(4096)


def test_a_scrape_past_max_requests_gets_503_at_once(caplog):
    gate = Gate()
    with running(gate, max_requests=1) as srv, ThreadPoolExecutor(1) as pool:
        held = pool.submit(get, srv)
        assert gate.entered.wait(CLIENT_TIMEOUT)
        # The one slot is taken: this scrape is refused, not queued behind the held one
        # (queued, it would wait for the gate, which opens only after it returns).
        assert get(srv) == 503
        assert get(srv) == 503
        # Warned once for both: a flood of refusals is not a flood of log lines.
        [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
        assert warning.getMessage() == "refusing scrapes (503): too many in flight"
        assert (warning.limit, warning.refused) == (1, 1)
        # Pages other than the metrics are not scrapes and are not counted.
        assert get(srv, "/healthz") == 200
        assert get(srv, "/") == 200
        gate.opened.set()
        assert held.result(CLIENT_TIMEOUT) == 200
        assert get(srv) == 200  # the slot came back


def test_max_requests_0_means_no_limit():
    gate = Gate()
    with running(gate, max_requests=0) as srv, ThreadPoolExecutor(3) as pool:
        held = [pool.submit(get, srv) for _ in range(3)]
        assert gate.entered.wait(CLIENT_TIMEOUT)
        gate.opened.set()
        assert [future.result(CLIENT_TIMEOUT) for future in held] == [200, 200, 200]


def test_slow_clients_are_dropped_while_scrapes_succeed():
    with running(Instant(), read_timeout_seconds=2) as srv:
        silent = [connect(srv) for _ in range(25)]
        trickling = [connect(srv) for _ in range(25)]
        with ThreadPoolExecutor(len(trickling)) as pool:
            # One byte a second: the whole head would take 37 s.
            trickled = [pool.submit(trickle, sock, REQUEST_HEAD, 1.0) for sock in trickling]
            statuses = [get(srv) for _ in range(20)]
            outcomes = [future.result() for future in trickled]
        assert statuses == [200] * 20
        # Each trickling client was cut off before its head was complete, with no answer:
        # the deadline covers the whole head, not each byte.
        assert all(sent < len(REQUEST_HEAD) and reply == b"" for sent, reply in outcomes)
        assert all(closed_by_server(sock) for sock in silent)
        for sock in silent + trickling:
            sock.close()


def test_an_idle_kept_alive_connection_is_closed(monkeypatch):
    monkeypatch.setattr(server_module, "IDLE_CONNECTION_TIMEOUT_SECONDS", 1)
    with running(Instant(), read_timeout_seconds=60) as srv, connect(srv) as sock:
        sock.sendall(REQUEST_HEAD)
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 200 and response.getheader("Connection") != "close"
        response.read()
        assert closed_by_server(sock)


def test_the_next_request_on_a_kept_alive_connection_has_a_deadline_too():
    with running(Instant(), read_timeout_seconds=2) as srv, connect(srv) as sock:
        sock.sendall(REQUEST_HEAD)
        response = http.client.HTTPResponse(sock)
        response.begin()
        response.read()
        sent, reply = trickle(sock, REQUEST_HEAD, 1.0)
        assert sent < len(REQUEST_HEAD) and reply == b""


def test_connections_past_max_connections_are_closed_at_once():
    with running(Instant(), max_connections=2, read_timeout_seconds=60) as srv:
        held = [connect(srv), connect(srv)]
        with connect(srv) as refused:
            # Closed before this client sent anything: with a thread of its own, it would
            # wait read_timeout (60 s) for a request, longer than this client waits.
            assert closed_by_server(refused)
        held.pop().close()
        # The slot comes back once the server has seen that close; until then a new
        # connection may still be refused.
        for _ in range(200):
            with contextlib.suppress(http.client.HTTPException, OSError):
                assert get(srv) == 200
                break
            time.sleep(0.05)
        else:
            pytest.fail("no connection was served after one was freed")
        held.pop().close()
