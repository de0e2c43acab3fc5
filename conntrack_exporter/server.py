"""The HTTP side: landing page, metrics, health, over a threaded keep-alive server.

Hardened for an exporter reachable by anyone on the node's network: optional TLS and basic
authentication (webconfig.py), a cap on scrapes in flight (503 past it, at once) and on open
connections, and deadlines on whole request heads, TLS handshakes and responses, so that a
slow or silent client holds one thread for a bounded time and never blocks the accept loop.
"""

from __future__ import annotations

import email.utils
import functools
import html
import io
import logging
import math
import socket
import socketserver
import ssl
import sys
import threading
import time
import zlib
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from conntrack_exporter import __version__
from conntrack_exporter.config import WebConfig, parse_listen_address
from conntrack_exporter.exposition import encode
from conntrack_exporter.registry import CollectorStatus, ExporterCollector
from conntrack_exporter.revision import revision
from conntrack_exporter.webconfig import PLAIN_HTTP, WebSecuritySource

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

log = logging.getLogger(__name__)

# Prometheus keeps scrape connections open; an idle one is dropped after this long.
IDLE_CONNECTION_TIMEOUT_SECONDS = 120
# A response is a few KiB, which the socket buffers take at once: a client that has not taken
# it in this long is not reading.
WRITE_TIMEOUT_SECONDS = 10
# A refused scrape or connection is logged at most this often, with how many since.
REFUSAL_LOG_INTERVAL_SECONDS = 60
REALM = "conntrack-exporter"
TEXT = "text/plain; charset=utf-8"
# A gzip stream (16 + window bits) with an 8 KiB window and a small hash table: 78 KiB of
# compressor state per scrape instead of gzip.compress's 294 KiB, as fast, and as small a
# result for our bodies of a few KiB (the lines that repeat are close together).
GZIP_LEVEL = 1
GZIP_WBITS = 16 + 13
GZIP_MEMLEVEL = 4


def landing_page(
    telemetry_path: str,
    collectors: Sequence[tuple[str, CollectorStatus | None]],
    now: float | None = None,
) -> bytes:
    """The page at /: links, and each enabled collector's last run (as of the last scrape that
    ran it: success, when, how long, the source that served it, the error if it failed)."""
    now = time.time() if now is None else now
    path = html.escape(telemetry_path)
    rows = "".join(_collector_row(name, status, now, path) for name, status in collectors)
    table = (
        "<table><thead><tr><th>collector</th><th>last run</th><th>status</th><th>source</th>"
        f"<th>error</th></tr></thead><tbody>{rows}</tbody></table>"
        if rows
        else "<p>No collector is enabled.</p>"
    )
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>conntrack exporter</title>'
        "<style>th,td{text-align:left;padding:0 1em 0 0;vertical-align:top}"
        ".failed{color:#b00}</style></head><body><h1>conntrack exporter</h1>"
        f"<p>Version {html.escape(__version__)} (revision {html.escape(revision())}). "
        "Connection tracking and socket resource metrics for Prometheus.</p>"
        f'<p><a href="{path}">Metrics</a> &middot; <a href="/healthz">Health</a></p>'
        "<h2>Enabled collectors</h2>"
        f'<p>Each runs on every scrape of <a href="{path}">{path}</a>; as of the last one:</p>'
        f"{table}</body></html>\n"
    ).encode()


def _collector_row(name: str, status: CollectorStatus | None, now: float, path: str) -> str:
    cell = f"<td>{html.escape(name)}</td>"
    if status is None:
        return (
            f'<tr>{cell}<td colspan="4">not run yet: no scrape of {path} since the '
            "configuration was loaded</td></tr>"
        )
    finished = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(status.finished))
    ago = max(0, round(now - status.finished))
    when = f"{finished} ({ago} s ago, took {status.duration * 1000:.1f} ms)"
    outcome = "ok" if status.success else '<span class="failed">failed</span>'
    source = html.escape(status.source or "")
    error = html.escape(status.error or "")
    return f"<tr>{cell}<td>{when}</td><td>{outcome}</td><td>{source}</td><td>{error}</td></tr>"


def metrics_response(
    exporter: ExporterCollector, accept: str, accept_encoding: str
) -> tuple[bytes, str, dict[str, str]]:
    """Collect and encode one scrape: the body, its content type, and extra response headers.

    Kept apart from the handler so that benchmarks can measure exactly what a scrape costs.
    """
    body, content_type = encode(exporter, accept)
    headers = {}
    if "gzip" in accept_encoding:
        body = _gzip(body)
        headers["Content-Encoding"] = "gzip"
    return body, content_type, headers


def _gzip(body: bytes) -> bytes:
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, GZIP_WBITS, GZIP_MEMLEVEL)
    return compressor.compress(body) + compressor.flush()


class _Limit:
    """At most `maximum` holders at once (0: any number). Past it a caller is refused at once,
    never queued, and a warning says so at most once a minute."""

    def __init__(self, maximum: int, warning: str) -> None:
        self.maximum = maximum
        self._slots = threading.BoundedSemaphore(maximum) if maximum else None
        self._warning = warning
        self._lock = threading.Lock()
        self._refused = 0
        self._warned_at = -math.inf

    def try_acquire(self) -> bool:
        if self._slots is None or self._slots.acquire(blocking=False):
            return True
        self._refuse()
        return False

    def release(self) -> None:
        if self._slots is not None:
            self._slots.release()

    def _refuse(self) -> None:
        with self._lock:
            self._refused += 1
            now = time.monotonic()
            if now - self._warned_at < REFUSAL_LOG_INTERVAL_SECONDS:
                return
            refused, self._refused, self._warned_at = self._refused, 0, now
        # `refused`: how many since the last warning.
        log.warning(self._warning, extra={"limit": self.maximum, "refused": refused})


class MetricsServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    # Connections waiting for accept(): many scrapers connecting at once must not overflow
    # socketserver's default of 5 and wait a second for a SYN retransmit.
    request_queue_size = socket.SOMAXCONN

    def __init__(
        self,
        web: WebConfig,
        exporter: ExporterCollector,
        security: WebSecuritySource = PLAIN_HTTP,
    ) -> None:
        host, port = parse_listen_address(web.listen_address)
        self._dual_stack = not host and socket.has_dualstack_ipv6()
        if self._dual_stack:
            host = "::"  # an IPv6 socket that takes IPv4 too (IPV6_V6ONLY off in server_bind)
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.exporter = exporter
        self.telemetry_path = web.telemetry_path
        self.security = security
        self.read_timeout = web.read_timeout_seconds
        self.unauthenticated_healthz = web.unauthenticated_healthz
        self.scrapes = _Limit(web.max_requests, "refusing scrapes (503): too many in flight")
        self.connections = _Limit(web.max_connections, "refusing connections: too many open")
        super().__init__((host, port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, a DNS lookup that can stall start-up.
        if self._dual_stack:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self._host_port()

    def server_activate(self) -> None:
        self.address_family = self.socket.family
        super().server_activate()

    def _host_port(self) -> tuple[str, int]:
        # An AF_INET or AF_INET6 address: (host, port[, flowinfo, scope_id]).
        host, port = self.server_address[:2]
        return str(host), int(port)

    @property
    def bound_address(self) -> str:
        host, port = self._host_port()
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def process_request(self, request: Any, client_address: Any) -> None:
        # In the accept loop: nothing here may wait on the client.
        if not self.connections.try_acquire():
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connections.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        # In the connection's own thread, so that a client that never finishes its TLS
        # handshake holds only that thread, for read_timeout at most, and a reload of the web
        # configuration delays only that connection. The context is the one current when the
        # connection came: a renewed certificate serves new connections, kept-alive ones go on.
        tls = self.security.current().tls
        if tls is None:
            super().finish_request(request, client_address)
            return
        tls_socket = self._handshake(tls, request, client_address)
        if tls_socket is None:
            return
        try:
            super().finish_request(tls_socket, client_address)
        finally:
            self.shutdown_request(tls_socket)

    def _handshake(
        self, tls: ssl.SSLContext, request: socket.socket, client_address: Any
    ) -> ssl.SSLSocket | None:
        # ssl bounds the whole handshake by the socket's timeout, not each read.
        request.settimeout(self.read_timeout)
        try:
            return tls.wrap_socket(request, server_side=True)
        except (OSError, ValueError) as exc:  # ssl.SSLError and TimeoutError are OSErrors
            log.debug("TLS handshake failed", extra={"client": client_address[0], "err": exc})
            return None

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Called from an `except` block. A client that goes away mid-request is routine; any
        # other exception is a bug of ours, worth its traceback (socketserver prints it to
        # stderr, outside the log format).
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            log.debug("connection error", extra={"client": client_address[0], "err": error})
        else:
            log.error("request failed", exc_info=True, extra={"client": client_address[0]})


@functools.lru_cache(maxsize=1)
def _http_date(second: int) -> str:
    # Formatting the Date header costs more than the rest of the response headers together,
    # and it changes once a second.
    return email.utils.formatdate(second, usegmt=True)


class _DeadlineIO(io.RawIOBase):
    """A socket as a raw stream whose reads and writes all end by one deadline.

    A socket's timeout bounds each call: a client sending a byte a second would never trip it.
    Before each call the timeout is set to what is left until the deadline, so the deadline
    bounds a whole request head, or a whole response, however it is split.
    """

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        self.deadline = deadline

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        self._arm()
        return self._sock.recv_into(buffer)

    def write(self, data: ReadableBuffer) -> int:
        self._arm()
        return self._sock.send(data)

    def _arm(self) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed")
        self._sock.settimeout(remaining)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"conntrack-exporter/{__version__}"
    server: MetricsServer
    rfile: io.BufferedReader  # set in setup(): peek() waits for a kept-alive request

    def setup(self) -> None:
        # StreamRequestHandler's set-up, with both directions under deadlines. Headers and
        # body written separately, with Nagle on, leave the body waiting for the client's
        # delayed ACK of the headers: 40 ms per scrape. The response is buffered so that it
        # leaves in one write (handle_one_request flushes it), and sent without Nagle.
        self.connection = self.request
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        # The first request must come within read_timeout of the connection.
        self._stream = _DeadlineIO(self.connection, time.monotonic() + self.server.read_timeout)
        self.rfile = io.BufferedReader(self._stream)
        self.wfile = io.BufferedWriter(self._stream)
        self._requests = 0

    def handle_one_request(self) -> None:
        if self._requests and not self._next_request_started():
            self.close_connection = True
            return
        self._requests += 1
        super().handle_one_request()

    def _next_request_started(self) -> bool:
        """Wait up to the idle timeout for a kept-alive connection's next request; from its
        first byte on, its head gets read_timeout."""
        self._stream.deadline = time.monotonic() + IDLE_CONNECTION_TIMEOUT_SECONDS
        try:
            started = bool(self.rfile.peek(1))
        except OSError:  # idle too long (TimeoutError), or reset
            return False
        self._stream.deadline = time.monotonic() + self.server.read_timeout
        return started

    def send_response(self, code: int, message: str | None = None) -> None:
        # Every response, error pages included, starts here: from now on the writes have
        # their own deadline, whatever the head and the collection took.
        self._stream.deadline = time.monotonic() + WRITE_TIMEOUT_SECONDS
        super().send_response(code, message)

    def date_time_string(self, timestamp: float | None = None) -> str:
        if timestamp is not None:
            return super().date_time_string(timestamp)
        return _http_date(int(time.time()))

    def do_GET(self) -> None:
        self._route(send_body=True)

    def do_HEAD(self) -> None:
        self._route(send_body=False)

    def _route(self, send_body: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz" and self.server.unauthenticated_healthz:
            self._send(200, TEXT, b"ok\n", send_body)
        elif path != self.server.telemetry_path:
            if self._authenticated(send_body):
                self._page(path, send_body)
        elif not self.server.scrapes.try_acquire():
            self._send(503, TEXT, b"too many scrapes in flight\n", send_body)
        else:
            # The slot covers authentication too: a flood of bad credentials is a flood of
            # bcrypt, bounded like a flood of scrapes.
            try:
                if self._authenticated(send_body):
                    self._metrics(send_body)
            finally:
                self.server.scrapes.release()

    def _page(self, path: str, send_body: bool) -> None:
        if path == "/":
            page = landing_page(self.server.telemetry_path, self.server.exporter.active.statuses())
            self._send(200, "text/html; charset=utf-8", page, send_body)
        elif path == "/healthz":
            self._send(200, TEXT, b"ok\n", send_body)
        else:
            self._send(404, TEXT, b"not found\n", send_body)

    def _authenticated(self, send_body: bool) -> bool:
        """Whether the request may go on; if not, it has had its 401."""
        # Each request asks afresh: a changed password applies to kept-alive connections too.
        auth = self.server.security.current().auth
        if auth is None or auth.check(self.headers.get("Authorization")):
            return True
        # Never the header itself: it carries the password, barely encoded.
        log.debug("unauthorized request", extra={"client": self.address_string()})
        headers = {"WWW-Authenticate": f'Basic realm="{REALM}"'}
        self._send(401, TEXT, b"unauthorized\n", send_body, headers)
        return False

    def _metrics(self, send_body: bool) -> None:
        body, content_type, headers = metrics_response(
            self.server.exporter,
            self.headers.get("Accept", ""),
            self.headers.get("Accept-Encoding", ""),
        )
        self._send(200, content_type, body, send_body, headers)

    def _send(
        self,
        status: int,
        content_type: str,
        body: bytes,
        send_body: bool,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug(format % args, extra={"client": self.address_string()})
