"""The HTTP side: landing page, metrics, health, over a threaded keep-alive server."""

from __future__ import annotations

import email.utils
import functools
import html
import logging
import socket
import socketserver
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from conntrack_exporter import __version__
from conntrack_exporter.config import WebConfig, parse_listen_address
from conntrack_exporter.exposition import encode
from conntrack_exporter.registry import ExporterCollector

log = logging.getLogger(__name__)

# Prometheus keeps scrape connections open; an idle one is dropped after this long.
IDLE_CONNECTION_TIMEOUT_SECONDS = 120
# A gzip stream (16 + window bits) with an 8 KiB window and a small hash table: 78 KiB of
# compressor state per scrape instead of gzip.compress's 294 KiB, as fast, and as small a
# result for our bodies of a few KiB (the lines that repeat are close together).
GZIP_LEVEL = 1
GZIP_WBITS = 16 + 13
GZIP_MEMLEVEL = 4


def landing_page(telemetry_path: str, collectors: list[str]) -> bytes:
    items = "".join(f"<li>{html.escape(name)}</li>" for name in collectors) or "<li>none</li>"
    path = html.escape(telemetry_path)
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>conntrack exporter</title>'
        "</head><body><h1>conntrack exporter</h1>"
        f"<p>Version {html.escape(__version__)}. Connection tracking and socket resource "
        "metrics for Prometheus.</p>"
        f'<p><a href="{path}">Metrics</a> &middot; <a href="/healthz">Health</a></p>'
        f"<h2>Enabled collectors</h2><ul>{items}</ul></body></html>\n"
    ).encode()


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


class MetricsServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, web: WebConfig, exporter: ExporterCollector, page: bytes) -> None:
        host, port = parse_listen_address(web.listen_address)
        self._dual_stack = not host and socket.has_dualstack_ipv6()
        if self._dual_stack:
            host = "::"  # an IPv6 socket that takes IPv4 too (IPV6_V6ONLY off in server_bind)
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.exporter = exporter
        self.telemetry_path = web.telemetry_path
        self.page = page
        super().__init__((host, port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, a DNS lookup that can stall start-up.
        if self._dual_stack:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def server_activate(self) -> None:
        self.address_family = self.socket.family
        super().server_activate()

    @property
    def bound_address(self) -> str:
        host, port = self.server_address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@functools.lru_cache(maxsize=1)
def _http_date(second: int) -> str:
    # Formatting the Date header costs more than the rest of the response headers together,
    # and it changes once a second.
    return email.utils.formatdate(second, usegmt=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"conntrack-exporter/{__version__}"
    timeout = IDLE_CONNECTION_TIMEOUT_SECONDS
    # Headers and body written separately, with Nagle on, leave the body waiting for the
    # client's delayed ACK of the headers: 40 ms per scrape. Buffer the response so that it
    # leaves in one write (handle_one_request flushes it), and send without Nagle.
    wbufsize = -1
    disable_nagle_algorithm = True
    server: MetricsServer

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
        if path == self.server.telemetry_path:
            self._metrics(send_body)
        elif path == "/":
            self._send(200, "text/html; charset=utf-8", self.server.page, send_body)
        elif path == "/healthz":
            self._send(200, "text/plain; charset=utf-8", b"ok\n", send_body)
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found\n", send_body)

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
