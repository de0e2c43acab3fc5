"""The HTTP side: landing page, metrics, health, over an event loop and a few worker threads.

Hardened for an exporter reachable by anyone on the node's network: optional TLS and basic
authentication (webconfig.py), deadlines on whole request heads, TLS handshakes and responses,
a cap on open connections, and a short queue of scrapes shared fairly between clients.

One thread runs an asyncio event loop that accepts connections, does TLS handshakes, reads
request heads and writes responses: an idle or slow connection costs a socket and a small
coroutine, not a thread. The work that takes CPU or may block (a collection, encoding a body,
a bcrypt check) goes to a fixed pool of WORKERS threads, so memory is bounded by the pool and
the open sockets whatever the number of clients. A collection at rest is the exception: with no
other request in progress, no more connections open than an HA pair and a probe, and
collections seen to be quick, it runs on the loop's thread, which costs a quarter less CPU than
the hop to a worker and back.

Scrapes share collections (SharedCollections): a scrape that arrives while a collection is under
way waits for it and is served its result, encoded once per format. "Honest" freshness, as
promised here and tested: a scrape is served either by the collection in flight when it
arrived (which started at most one collection's time before it) or by one that starts after
it arrived; never by a collection that had already finished when it arrived. Under a flood the
kernel is read at most once per collection time. (An HA pair's two scrapes, when they coincide
at rest, are collected one after the other on the loop, each at a lone scrape's cost.)

Fairness (`web.max_requests`, the queue): a scrape holds a place from the moment its head is
read until its body is ready. At most max_requests places (503 at once past them), each client
address at most a quarter of them (503 at once past its share), so that one client's many
connections cannot take every place from the real scraper; and work waits at most
QUEUE_WAIT_SECONDS for a worker (first come, first served), then gets 503.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import email.utils
import functools
import html
import http
import logging
import math
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

from conntrack_exporter import __version__
from conntrack_exporter.config import WebConfig, parse_listen_address
from conntrack_exporter.exposition import encode
from conntrack_exporter.registry import CollectorStatus, ExporterCollector
from conntrack_exporter.revision import revision
from conntrack_exporter.webconfig import (
    PLAIN_HTTP,
    WATCH_INTERVAL_SECONDS,
    WebSecurity,
    WebSecuritySource,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# Prometheus keeps scrape connections open; an idle one is dropped after this long.
IDLE_CONNECTION_TIMEOUT_SECONDS = 120
# A response is a few KiB, which the socket buffers take at once: a client that has not taken
# it in this long is not reading.
WRITE_TIMEOUT_SECONDS = 10
# A refused scrape or connection is logged at most this often, with how many since.
REFUSAL_LOG_INTERVAL_SECONDS = 60
# Work (a collection, an encoding, a bcrypt check) that no worker has started this long after
# it was queued is dropped with a 503: well inside Prometheus' default 10 s scrape timeout, so
# the scraper learns of the overload instead of timing out.
QUEUE_WAIT_SECONDS = 5.0
# Threads that run collections, encodings and bcrypt. Collections never overlap (they are
# shared), so two would do; two more keep encodings and password checks from waiting on them.
WORKERS = 4
# At rest a collection runs on the event loop's thread: the hop to a worker and back costs
# ~300 us of CPU a scrape (two wake-ups across CPUs; measured in BENCHMARKS.md), a quarter of
# a scrape. Only while that stalls nothing: no other request in progress, at most
# INLINE_MAX_CONNECTIONS open (an HA pair of scrapers and a probe), and no collection in the
# last SLOW_COLLECTION_HOLDOFF_SECONDS took longer than INLINE_COLLECTION_MAX_SECONDS. The
# connections count because a loop busy collecting reads no other request: "no other request
# in progress" alone would hold under a flood too, and serve it one collection at a time.
INLINE_MAX_CONNECTIONS = 3
INLINE_COLLECTION_MAX_SECONDS = 0.025
SLOW_COLLECTION_HOLDOFF_SECONDS = 300.0
# Each client address may hold at most 1/ADDRESS_SHARE of the queue's places (at least one).
ADDRESS_SHARE = 4
# A request head larger than this, or with more header fields, is refused (431), as http.server
# refuses a line of 64 KiB and more than 100 fields.
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
REALM = "conntrack-exporter"
TEXT = "text/plain; charset=utf-8"
SERVER = f"conntrack-exporter/{__version__}"
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

    What one unshared scrape costs, for the benchmarks; the server shares collections.
    """
    families = list(exporter.collect())
    content_type = _content_type(accept)
    gzipped = "gzip" in accept_encoding
    body = _encoded(families, accept, gzipped)
    return body, content_type, {"Content-Encoding": "gzip"} if gzipped else {}


def _encoded(families: list[Metric], accept: str, gzipped: bool) -> bytes:
    body, _ = encode(_Families(families), accept)
    return _gzip(body) if gzipped else body


def _gzip(body: bytes) -> bytes:
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, GZIP_WBITS, GZIP_MEMLEVEL)
    return compressor.compress(body) + compressor.flush()


class _Families:
    """Collected families, shaped as a collector for the encoder."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


class _RefusalLog:
    """A warning for refusals, at most once a minute, saying how many since the last one."""

    def __init__(self, warning: str, limit: int) -> None:
        self._warning = warning
        self.limit = limit
        self._refused = 0
        self._warned_at = -math.inf

    def refused(self, **extra: object) -> None:
        # Only ever called on the event loop's thread: no lock.
        self._refused += 1
        now = time.monotonic()
        if now - self._warned_at < REFUSAL_LOG_INTERVAL_SECONDS:
            return
        refused, self._refused, self._warned_at = self._refused, 0, now
        log.warning(self._warning, extra={"limit": self.limit, "refused": refused, **extra})


class _Overloaded(Exception):
    """No worker took the work within QUEUE_WAIT_SECONDS."""


class _Queue:
    """The places of the scrape queue (see the module's docstring). Event loop only."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.share = max(1, capacity // ADDRESS_SHARE) if capacity else 0
        self.held = 0
        self._by_address: collections.Counter[str] = collections.Counter()
        self._full = _RefusalLog("refusing scrapes (503): too many in flight", capacity)
        self._greedy = _RefusalLog(
            "refusing scrapes (503): a client address holds its share of the queue", self.share
        )

    def enter(self, address: str) -> bool:
        if self.capacity:
            if self.held >= self.capacity:
                self._full.refused()
                return False
            if self._by_address[address] >= self.share:
                self._greedy.refused(client=address)
                return False
        self.held += 1
        self._by_address[address] += 1
        return True

    def leave(self, address: str) -> None:
        self.held -= 1
        self._by_address[address] -= 1
        if not self._by_address[address]:
            del self._by_address[address]


class _Round:
    """One shared collection: its families once done, and its bodies, one per format."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.done: asyncio.Future[list[Metric]] = loop.create_future()
        self.bodies: dict[tuple[str, bool], asyncio.Future[bytes]] = {}


class SharedCollections:
    """At most one collection at a time, shared by every scrape that arrives while it runs.

    Event loop only. `collections` counts the collections started, `served` the scrapes
    that asked for a body (both for tests and benchmarks).
    """

    def __init__(self, server: MetricsServer) -> None:
        self._server = server
        self.in_flight: _Round | None = None
        self.collections = 0
        self.served = 0
        # From when (time.monotonic) a collection may run on the event loop: only once one
        # has been seen to be quick, and never within the hold-off after a slow one.
        self._inline_after = math.inf

    async def body(self, accept: str, gzipped: bool) -> bytes:
        """A body for a scrape arriving now: the collection in flight's, or a new one's."""
        key = (_content_type(accept), gzipped)
        self.served += 1
        round_ = self.in_flight
        if round_ is None:
            return await self._collect(key, accept)
        families = await asyncio.shield(round_.done)
        body = round_.bodies.get(key)
        if body is None:
            # The first scrape of this round to ask for this format encodes it; later ones of
            # the same format wait for that body.
            body = round_.bodies[key] = asyncio.get_running_loop().create_future()
            try:
                body.set_result(await self._server.in_pool(_encoded, families, accept, gzipped))
            except BaseException as exc:
                _fail(body, exc)
                del round_.bodies[key]
                raise
        return await asyncio.shield(body)

    async def _collect(self, key: tuple[str, bool], accept: str) -> bytes:
        """Run a collection for the scrape that starts it, and for those that join it."""
        round_ = self.in_flight = _Round(asyncio.get_running_loop())
        self.collections += 1
        body = round_.bodies[key] = asyncio.get_running_loop().create_future()
        try:
            if self._at_rest():
                families, encoded = self._run(accept, key[1])
            else:
                # The starting scrape's format is encoded in the same job: one hop to a worker.
                families, encoded = await self._server.in_pool(self._run, accept, key[1])
        except BaseException as exc:
            _fail(round_.done, exc)
            _fail(body, exc)
            raise
        else:
            round_.done.set_result(families)
            body.set_result(encoded)
            return encoded
        finally:
            # From now on a new scrape starts a new collection: none is served a collection
            # that had finished before it arrived.
            self.in_flight = None

    def _at_rest(self) -> bool:
        """Whether a collection may run on the event loop's thread now (see WORKERS)."""
        server = self._server
        return (
            server.queue.held == 1
            and server.open_connections <= INLINE_MAX_CONNECTIONS
            and time.monotonic() >= self._inline_after
        )

    def _run(self, accept: str, gzipped: bool) -> tuple[list[Metric], bytes]:
        started = time.monotonic()
        try:
            families = list(self._server.exporter.collect())
            return families, _encoded(families, accept, gzipped)
        finally:
            # Run by one thread at a time (collections never overlap), read by the loop: a
            # float's assignment is atomic.
            now = time.monotonic()
            if now - started > INLINE_COLLECTION_MAX_SECONDS:
                if self._inline_after <= now:
                    log.debug("collections are slow: running them in worker threads")
                self._inline_after = now + SLOW_COLLECTION_HOLDOFF_SECONDS
            elif self._inline_after == math.inf:
                self._inline_after = now


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    """Pass a failure on to the scrapes waiting on `future`, if any: a cancellation (at
    shutdown) as a cancellation, and retrieved here so that no one waiting logs nothing."""
    if isinstance(exc, asyncio.CancelledError):
        future.cancel()
        return
    future.set_exception(exc)
    future.exception()


@functools.lru_cache(maxsize=64)
def _content_type(accept: str) -> str:
    # Parsing an Accept header costs ~15 us; a server sees a handful of distinct ones.
    return str(choose_encoder(accept)[1])


@functools.lru_cache(maxsize=1)
def _http_date(second: int) -> str:
    # Formatting the Date header costs more than the rest of the response headers together,
    # and it changes once a second.
    return email.utils.formatdate(second, usegmt=True)


class _Request:
    def __init__(self, method: str, target: str, version: str, headers: dict[str, str]):
        self.method = method
        self.path = target.split("?", 1)[0]
        self.line = f"{method} {target} {version}"
        self.headers = headers  # by lower-case name; the first of a repeated header
        connection = headers.get("connection", "").lower()
        if version == "HTTP/1.0":
            self.keep_alive = "keep-alive" in connection
        else:
            self.keep_alive = "close" not in connection
        if headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in headers:
            # We read no request bodies: the connection ends after the answer, so that a body
            # is never taken for the next request.
            self.keep_alive = False


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _parse_head(head: bytes) -> _Request:
    line, _, rest = head.partition(b"\r\n")
    parts = line.decode("latin-1").split()
    if len(parts) != 3:
        raise _BadRequest(400, "bad request line")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise _BadRequest(505, "HTTP version not supported")
    # Parsed here rather than by http.client's email parser, which costs ~75 us a request: a
    # quarter of what a scrape of ours costs with no collectors.
    lines = rest.decode("latin-1").split("\r\n")
    if len(lines) > MAX_HEADERS + 2:  # the head ends in two empty lines
        raise _BadRequest(431, "too many header fields")
    headers: dict[str, str] = {}
    for field in lines:
        if not field:
            continue
        name, colon, value = field.partition(":")
        if not colon or not name or name != name.strip():
            # Obsolete line folding and names with spaces are refused, as RFC 9112 allows.
            raise _BadRequest(400, "bad header field")
        headers.setdefault(name.lower(), value.strip())
    return _Request(method, target, version, headers)


def _response(
    status: int,
    content_type: str,
    body: bytes,
    send_body: bool,
    keep_alive: bool,
    headers: dict[str, str] | None = None,
) -> bytes:
    # One buffer, one write: headers and body written apart, with Nagle on, would leave the
    # body waiting for the client's delayed ACK of the headers (asyncio sets TCP_NODELAY, and
    # we write once anyway).
    lines = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
        f"Server: {SERVER}",
        f"Date: {_http_date(int(time.time()))}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
    ]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if not keep_alive:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + body if send_body else head


class _Protocol(asyncio.StreamReaderProtocol):
    """A connection: counted against max_connections, and its TLS decided as it comes."""

    def __init__(self, server: MetricsServer) -> None:
        self._server = server
        self._refused = False
        self._tls: ssl.SSLContext | None = None
        super().__init__(asyncio.StreamReader(limit=MAX_HEAD_BYTES), self._connected)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._server
        if server.max_connections and server.open_connections >= server.max_connections:
            self._refused = True
            server.refused_connections.refused()
            transport.close()
            return
        server.open_connections += 1
        # The context is the one current when the connection came: a renewed certificate
        # serves new connections, kept-alive ones go on with theirs.
        self._tls = server.security_now().tls
        if self._tls is not None:
            # Nothing may be read before start_tls takes the socket over: the ClientHello read
            # into the plain stream would be lost to the handshake.
            assert isinstance(transport, asyncio.ReadTransport)
            transport.pause_reading()
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._refused:
            super().connection_lost(exc)

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server = self._server
        task = asyncio.current_task()
        assert task is not None
        server.connection_tasks.add(task)
        try:
            await server.serve_connection(reader, writer, self._tls)
        except asyncio.CancelledError:
            # The server is shutting down and has closed the connection. Ended as cancelled,
            # the task would make asyncio's stream callback log an error.
            pass
        finally:
            server.connection_tasks.discard(task)
            server.open_connections -= 1


class MetricsServer:
    """The server: made (and bound) in one thread, served by serve_forever() in another,
    stopped by shutdown() and server_close(), as socketserver's servers are."""

    def __init__(
        self,
        web: WebConfig,
        exporter: ExporterCollector,
        security: WebSecuritySource = PLAIN_HTTP,
    ) -> None:
        host, port = parse_listen_address(web.listen_address)
        dual_stack = not host and socket.has_dualstack_ipv6()
        if dual_stack:
            host = "::"  # an IPv6 socket that takes IPv4 too
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if dual_stack:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            self.socket.bind((host, port))
            # Many scrapers connecting at once must not overflow a short backlog and wait a
            # second for a SYN retransmit.
            self.socket.listen(socket.SOMAXCONN)
            self.socket.setblocking(False)
        except BaseException:
            self.socket.close()
            raise
        self.server_address: tuple[Any, ...] = self.socket.getsockname()
        self.exporter = exporter
        self.telemetry_path = web.telemetry_path
        self.security = security
        self.read_timeout = web.read_timeout_seconds
        self.unauthenticated_healthz = web.unauthenticated_healthz
        self.max_connections = web.max_connections
        self.open_connections = 0
        self.refused_connections = _RefusalLog(
            "refusing connections: too many open", web.max_connections
        )
        self.queue = _Queue(web.max_requests)
        self.shared = SharedCollections(self)
        self.connection_tasks: set[asyncio.Task[None]] = set()
        self._pool = concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="http")
        # Reloads of the web configuration run here, never on the event loop (a load can spend
        # a second in bcrypt).
        self._security_thread = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="web-config"
        )
        self._security_source: WebSecuritySource | None = None
        self._security_cached: WebSecurity = PLAIN_HTTP
        self._security_due = -math.inf
        self._security_refreshing = False
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._shut_down = False
        self._served = threading.Event()
        self._closed = False

    @property
    def bound_address(self) -> str:
        host, port = str(self.server_address[0]), int(self.server_address[1])
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    # --- life cycle ---------------------------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until shutdown(); `poll_interval` is accepted for socketserver's callers."""
        del poll_interval  # the loop wakes on a shutdown at once
        loop = asyncio.new_event_loop()
        try:
            with self._lock:
                if self._shut_down:
                    return
                self._loop = loop
                self._stop = asyncio.Event()
            loop.run_until_complete(self._serve())
        finally:
            with self._lock:
                self._loop = None
            loop.close()
            self._served.set()

    def shutdown(self) -> None:
        """Stop serve_forever() and wait for it to return; open connections are dropped."""
        with self._lock:
            self._shut_down = True
            loop, stop = self._loop, self._stop
            if loop is not None and stop is not None:
                loop.call_soon_threadsafe(stop.set)
        if loop is not None:
            self._served.wait()

    def server_close(self) -> None:
        """Close the listening socket and end the worker threads (after their work)."""
        if self._closed:
            return
        self._closed = True
        self.socket.close()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._security_thread.shutdown(wait=True, cancel_futures=True)

    async def _serve(self) -> None:
        assert self._stop is not None
        loop = asyncio.get_running_loop()
        # A duplicate: asyncio's server closes the socket it serves, and server_close() closes
        # ours, whether or not the loop ever ran.
        listener = await loop.create_server(
            lambda: _Protocol(self), sock=self.socket.dup(), backlog=socket.SOMAXCONN
        )
        try:
            await self._stop.wait()
        finally:
            listener.close()
            tasks = list(self.connection_tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await listener.wait_closed()

    # --- the web configuration, as the event loop sees it -------------------------------------

    def security_now(self) -> WebSecurity:
        """The web configuration for what comes in now, never waiting for a load: a watcher's
        files are checked in a thread of their own, at most once a second, and what that finds
        applies from then on."""
        source = self.security
        if isinstance(source, WebSecurity):
            return source
        if source is not self._security_source:  # a new watcher, from a reload (SIGHUP)
            self._security_source, self._security_cached = source, source.latest()
            self._security_due = -math.inf
        now = time.monotonic()
        if now >= self._security_due and not self._security_refreshing:
            self._security_due = now + WATCH_INTERVAL_SECONDS
            self._security_refreshing = True
            future = self._security_thread.submit(source.current)
            asyncio.wrap_future(future).add_done_callback(
                functools.partial(self._security_loaded, source)
            )
        return self._security_cached

    def _security_loaded(self, source: WebSecuritySource, future: asyncio.Future[Any]) -> None:
        self._security_refreshing = False
        if not future.cancelled() and future.exception() is None and source is self.security:
            self._security_cached = future.result()

    # --- the workers ----------------------------------------------------------------------------

    async def in_pool(self, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` in a worker, first come first served; _Overloaded if no worker
        has started it QUEUE_WAIT_SECONDS after it was queued."""
        work = self._pool.submit(function, *args)
        # Cancels the work only if no worker has started it; one that has, finishes.
        expiry = asyncio.get_running_loop().call_later(QUEUE_WAIT_SECONDS, work.cancel)
        try:
            return await asyncio.wrap_future(work)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if work.cancelled() and not (task and task.cancelling()):
                raise _Overloaded from None
            raise
        finally:
            expiry.cancel()

    # --- a connection ---------------------------------------------------------------------------

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tls: ssl.SSLContext | None
    ) -> None:
        peer = writer.get_extra_info("peername")
        address = str(peer[0]) if peer else "-"
        try:
            if tls is not None:
                # start_tls bounds the whole handshake, not each read.
                await writer.start_tls(tls, ssl_handshake_timeout=self.read_timeout)
            first = True
            while True:
                head = await self._read_head(reader, first)
                first = False
                if head is None:
                    return
                keep_alive = await self._answer(head, address, writer)
                if not keep_alive:
                    return
        except (OSError, ConnectionError, asyncio.IncompleteReadError) as exc:
            # A client that goes away, or fails its handshake, is routine.
            log.debug("connection error", extra={"client": address, "err": exc})
        except TimeoutError:
            log.debug("connection timed out", extra={"client": address})
        except asyncio.CancelledError:
            raise  # shutdown
        except Exception:
            # A bug of ours, worth its traceback.
            log.error("request failed", exc_info=True, extra={"client": address})
        finally:
            # Abort, not close: nothing is left to send, and a TLS close would wait for the
            # client's reply.
            writer.transport.abort()

    async def _read_head(self, reader: asyncio.StreamReader, first: bool) -> bytes | None:
        """A whole request head, read by one deadline; None for a clean end of the connection.

        The first request must come within read_timeout of the connection; a kept-alive
        connection's next one may wait the idle timeout for its first byte, and then its head
        gets read_timeout.
        """
        start = b""
        if not first:
            async with asyncio.timeout(IDLE_CONNECTION_TIMEOUT_SECONDS):
                start = await reader.read(1)
            if not start:
                return None
        async with asyncio.timeout(self.read_timeout):
            try:
                return start + await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if not start and not exc.partial:
                    return None
                raise
            except asyncio.LimitOverrunError:
                return b""  # too large: _answer refuses it

    async def _answer(self, head: bytes, address: str, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; whether the connection goes on."""
        try:
            if not head:
                raise _BadRequest(431, "request header fields too large")
            request = _parse_head(head)
        except _BadRequest as exc:
            await self._write(writer, _response(exc.status, TEXT, f"{exc}\n".encode(), True, False))
            return False
        send_body = request.method != "HEAD"
        headers: dict[str, str]
        if request.method not in ("GET", "HEAD"):
            status, content_type, body, headers = 501, TEXT, b"unsupported method\n", {}
        else:
            status, content_type, body, headers = await self._route(request, address)
        if log.isEnabledFor(logging.DEBUG):
            log.debug('"%s" %d', request.line, status, extra={"client": address})
        data = _response(status, content_type, body, send_body, request.keep_alive, headers)
        await self._write(writer, data)
        return request.keep_alive

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        # Almost always the socket took it all at once: then there is nothing to wait for.
        if writer.transport.get_write_buffer_size():
            async with asyncio.timeout(WRITE_TIMEOUT_SECONDS):
                await writer.drain()

    async def _route(
        self, request: _Request, address: str
    ) -> tuple[int, str, bytes, dict[str, str]]:
        path = request.path
        if path == "/healthz" and self.unauthenticated_healthz:
            return 200, TEXT, b"ok\n", {}
        security = self.security_now()
        if path != self.telemetry_path and security.auth is None:
            return self._page(path)
        # A scrape, or a page behind a password: a place in the queue. The place covers the
        # password check too: a flood of bad credentials is a flood of bcrypt, bounded like a
        # flood of scrapes.
        if not self.queue.enter(address):
            return 503, TEXT, b"too many scrapes in flight\n", {}
        try:
            if security.auth is not None:
                authorization = request.headers.get("authorization")
                if not await self.in_pool(security.auth.check, authorization):
                    # Never the header itself: it carries the password, barely encoded.
                    log.debug("unauthorized request", extra={"client": address})
                    return 401, TEXT, b"unauthorized\n", {"WWW-Authenticate": REALM_HEADER}
            if path != self.telemetry_path:
                return self._page(path)
            accept = request.headers.get("accept", "")
            gzipped = "gzip" in request.headers.get("accept-encoding", "")
            body = await self.shared.body(accept, gzipped)
        except _Overloaded:
            return 503, TEXT, b"too many scrapes waiting\n", {}
        finally:
            self.queue.leave(address)
        headers = {"Content-Encoding": "gzip"} if gzipped else {}
        return 200, _content_type(accept), body, headers

    def _page(self, path: str) -> tuple[int, str, bytes, dict[str, str]]:
        if path == "/":
            # Made on the event loop: it reads what the last collection recorded, no lock.
            page = landing_page(self.telemetry_path, self.exporter.active.statuses())
            return 200, "text/html; charset=utf-8", page, {}
        if path == "/healthz":
            return 200, TEXT, b"ok\n", {}
        return 404, TEXT, b"not found\n", {}


REALM_HEADER = f'Basic realm="{REALM}"'
