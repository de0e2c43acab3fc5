"""Certificates, keys and web configurations that change on disk take effect without a restart.

As exporter-toolkit, which re-reads them for every connection: a cert-manager renewal, a
Kubernetes Secret update or a new basic_auth_users password applies to the connections (and
requests) that follow. Checked on the real exporter with real certificates, told apart by their
serial numbers; a bad replacement must keep the running configuration. The throttle and the
warning's once-only are checked in-process, against an injected clock.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import http.client
import logging
import os
import shutil
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conntrack_exporter import cli, webconfig
from conntrack_exporter.webconfig import PLAIN_HTTP, WebSecurityWatcher
from tests.test_web_security import (
    CLIENT_TIMEOUT,
    PASSWORD,
    SERVER_EXTENSIONS,
    Exporter,
    Pki,
    bcrypt_hash,
    client_tls,
    exporter,
    make_ca,
    make_signed,
    write,
)

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")

# Long enough for a loaded machine; a test waits only as long as the exporter needs.
DEADLINE_SECONDS = 30
# Past two of the watcher's one-second checks: time for it to (wrongly) warn or reload again.
SEVERAL_CHECKS_SECONDS = 3
WARNING = "web configuration changed but has problems"
RELOADED = "web configuration reloaded"
NEW_PASSWORD = "renewed-staple-4d19"


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """ca signs one, two and three: server certificates for localhost, each its own serial."""
    directory = tmp_path_factory.mktemp("renewals")
    make_ca(directory, "ca")
    for name in ("one", "two", "three"):
        make_signed(directory, name, "ca", SERVER_EXTENSIONS)
    pki = Pki(directory)
    assert len({serial(pki[f"{name}.crt"]) for name in ("one", "two", "three")}) == 3
    return pki


def serial(cert_file: str) -> str:
    """A certificate's serial number, spelt as `getpeercert()` spells it."""
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-serial", "-in", cert_file],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.strip().removeprefix("serial=")


def replace(source: str | Path, target: Path) -> None:
    """Replace a file in one rename, as a careful writer does: never seen half-written."""
    partial = target.with_name(target.name + ".partial")
    shutil.copy(source, partial)
    os.replace(partial, target)


def install(certs: Pki, name: str, directory: Path) -> None:
    """Make `name`'s certificate and key server.crt and server.key, each replaced in one
    rename, one after the other (the files are copied first, leaving the renames microseconds
    apart: a check seldom falls between them)."""
    for suffix in ("crt", "key"):
        shutil.copy(certs[f"{name}.{suffix}"], directory / f"server.{suffix}.partial")
    for suffix in ("crt", "key"):
        os.replace(directory / f"server.{suffix}.partial", directory / f"server.{suffix}")


class SecretVolume:
    """A directory laid out as the kubelet lays out a Secret volume: tls.crt and tls.key are
    links through `..data`, a link to a hidden directory of this version's files, which an
    update replaces in one rename before deleting the old directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir()
        self._versions = 0

    def update(self, certs: Pki, name: str) -> None:
        self._versions += 1
        version = self.root / f"..version-{self._versions}"
        version.mkdir()
        shutil.copy(certs[f"{name}.crt"], version / "tls.crt")
        shutil.copy(certs[f"{name}.key"], version / "tls.key")
        link = self.root / "..data_tmp"
        link.symlink_to(version.name)
        os.replace(link, self.root / "..data")
        for file in ("tls.crt", "tls.key"):
            if not (self.root / file).is_symlink():
                (self.root / file).symlink_to(f"..data/{file}")
        shutil.rmtree(self.root / f"..version-{self._versions - 1}", ignore_errors=True)


def https(running: Exporter, certs: Pki) -> http.client.HTTPSConnection:
    connection = http.client.HTTPSConnection(
        "localhost", running.port, timeout=CLIENT_TIMEOUT, context=client_tls(certs)
    )
    connection.connect()
    return connection


def get(connection: http.client.HTTPConnection, user: str = "", password: str = "") -> int:
    """The status of one GET /metrics on an open connection, which stays open."""
    headers = {}
    if user:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    connection.request("GET", "/metrics", headers=headers)
    response = connection.getresponse()
    response.read()
    return response.status


def served_serial(running: Exporter, certs: Pki) -> str:
    """The serial number of the certificate a new connection gets, after a full request."""
    with contextlib.closing(https(running, certs)) as connection:
        assert get(connection) == 200
        return connection.sock.getpeercert()["serialNumber"]


def eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.1)


def log_lines(running: Exporter, text: str) -> list[str]:
    return [line for line in running.log.read_text().splitlines() if text in line]


PLAIN_FILES = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
NEXT_FILES = "tls_server_config:\n  cert_file: next.crt\n  key_file: next.key\n"
SECRET_VOLUME = "tls_server_config:\n  cert_file: tls/tls.crt\n  key_file: tls/tls.key\n"


# --- the real exporter ----------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["files replaced by rename", "kubernetes secret volume"])
def test_a_new_connection_gets_the_renewed_certificate(certs, tmp_path, layout):
    if layout == "kubernetes secret volume":
        volume = SecretVolume(tmp_path / "tls")
        volume.update(certs, "one")
        web_config, renew = SECRET_VOLUME, lambda: volume.update(certs, "two")
    else:
        install(certs, "one", tmp_path)
        web_config, renew = PLAIN_FILES, lambda: install(certs, "two", tmp_path)
    with exporter(tmp_path, web_config) as running:
        assert served_serial(running, certs) == serial(certs["one.crt"])
        renew()
        new = serial(certs["two.crt"])
        eventually(lambda: served_serial(running, certs) == new, "the new certificate served")
        assert len(log_lines(running, RELOADED)) == 1
        if layout == "kubernetes secret volume":  # both files changed at once
            assert log_lines(running, WARNING) == []
        assert running.process.poll() is None  # no restart


def test_a_kept_alive_connection_goes_on_with_the_old_certificate(certs, tmp_path):
    install(certs, "one", tmp_path)
    with (
        exporter(tmp_path, PLAIN_FILES) as running,
        contextlib.closing(https(running, certs)) as kept,
    ):
        assert get(kept) == 200
        old_socket = kept.sock
        install(certs, "two", tmp_path)
        new = serial(certs["two.crt"])
        eventually(lambda: served_serial(running, certs) == new, "the new certificate served")
        for _ in range(3):
            assert get(kept) == 200
        # The same connection, not a reconnection: its handshake's certificate is the old one.
        assert kept.sock is old_socket
        assert kept.sock.getpeercert()["serialNumber"] == serial(certs["one.crt"])


def users(password: str) -> str:
    return f"basic_auth_users:\n  alice: '{bcrypt_hash(password)}'\n"


def test_a_changed_password_applies_to_the_next_request(certs, tmp_path):
    install(certs, "one", tmp_path)
    web_config = PLAIN_FILES + users(PASSWORD)
    with (
        exporter(tmp_path, web_config) as running,
        contextlib.closing(https(running, certs)) as kept,
    ):
        assert get(kept, "alice", PASSWORD) == 200
        replace(
            write(tmp_path, "new-web.yml", PLAIN_FILES + users(NEW_PASSWORD)),
            tmp_path / "web.yml",
        )

        def new_password_works() -> bool:
            with contextlib.closing(https(running, certs)) as connection:
                return get(connection, "alice", NEW_PASSWORD) == 200

        eventually(new_password_works, "the new password accepted")
        # Each request asks afresh, on a connection opened before the change too.
        assert get(kept, "alice", PASSWORD) == 401
        assert get(kept, "alice", NEW_PASSWORD) == 200


def break_the_key_pair(certs: Pki, directory: Path) -> None:
    # A renewal half done: the new certificate, and still the old key.
    replace(certs["two.crt"], directory / "server.crt")


def half_write_the_certificate(certs: Pki, directory: Path) -> None:
    # As a writer that stopped halfway would leave it (renamed into place, so that the check
    # never sees the whole file either).
    text = Path(certs["two.crt"]).read_text()
    replace(write(directory, "half.crt", text[: len(text) // 2]), directory / "server.crt")


def break_the_yaml(certs: Pki, directory: Path) -> None:
    replace(write(directory, "new-web.yml", "tls_server_config: [\n"), directory / "web.yml")


@pytest.mark.parametrize(
    ("breakage", "problem"),
    [
        (break_the_key_pair, "server.key is not the key of server.crt"),
        (half_write_the_certificate, "server.crt holds no PEM certificate"),
        (break_the_yaml, "not valid YAML"),
    ],
    ids=["certificate without its key", "half-written certificate", "bad YAML"],
)
def test_a_broken_change_keeps_the_old_certificate_and_warns_once(
    certs, tmp_path, breakage, problem
):
    install(certs, "one", tmp_path)
    old, new = serial(certs["one.crt"]), serial(certs["two.crt"])
    with exporter(tmp_path, PLAIN_FILES) as running:
        breakage(certs, tmp_path)
        eventually(
            lambda: served_serial(running, certs) == old and bool(log_lines(running, WARNING)),
            "a warning",
        )
        # New connections for several checks: all still served, none warns again.
        deadline = time.monotonic() + SEVERAL_CHECKS_SECONDS
        while time.monotonic() < deadline:
            assert served_serial(running, certs) == old
            time.sleep(0.1)
        [warning] = log_lines(running, WARNING)
        assert "level=warn" in warning and problem in warning
        assert log_lines(running, RELOADED) == []

        # Fixed in one step, so that it is one reload: a web configuration naming a good pair.
        shutil.copy(certs["two.crt"], tmp_path / "next.crt")
        shutil.copy(certs["two.key"], tmp_path / "next.key")
        replace(write(tmp_path, "new-web.yml", NEXT_FILES), tmp_path / "web.yml")
        eventually(lambda: served_serial(running, certs) == new, "the fixed pair served")
        assert len(log_lines(running, RELOADED)) == 1
        assert len(log_lines(running, WARNING)) == 1


def test_sighup_reads_the_web_config_again_even_if_it_looks_unchanged(certs, tmp_path):
    install(certs, "one", tmp_path)
    with exporter(tmp_path, PLAIN_FILES + users(PASSWORD)) as running:
        web = tmp_path / "web.yml"
        before = web.stat()
        # The same size, inode and times: a change only a full re-read finds.
        web.write_text(PLAIN_FILES + users(NEW_PASSWORD))
        os.utime(web, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert web.stat().st_size == before.st_size
        deadline = time.monotonic() + SEVERAL_CHECKS_SECONDS
        while time.monotonic() < deadline:
            assert running.request("/metrics", "alice", PASSWORD, client_tls(certs))[0] == 200
            time.sleep(0.1)

        running.process.send_signal(signal.SIGHUP)
        eventually(lambda: log_lines(running, 'msg="configuration reloaded"'), "the reload")
        assert running.request("/metrics", "alice", PASSWORD, client_tls(certs))[0] == 401
        assert running.request("/metrics", "alice", NEW_PASSWORD, client_tls(certs))[0] == 200


# --- the watcher, in-process ----------------------------------------------------------------


class Clock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingStat:
    """os.stat, with the paths it was asked for."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[str] = []
        self._real = os.stat
        monkeypatch.setattr(os, "stat", self)

    def __call__(self, path: str, *args: object, **kwargs: object) -> os.stat_result:
        self.paths.append(str(path))
        return self._real(path, *args, **kwargs)


def handshake_serial(context: ssl.SSLContext, certs: Pki) -> str:
    """The serial number of the certificate `context` serves, from a handshake in memory."""
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_tls(certs).wrap_bio(client_in, client_out, server_hostname="localhost")
    server = context.wrap_bio(server_in, server_out, server_side=True)
    done: set[object] = set()
    for _ in range(10):
        for end, outgoing, incoming in (
            (client, client_out, server_in),
            (server, server_out, client_in),
        ):
            with contextlib.suppress(ssl.SSLWantReadError):
                end.do_handshake()
                done.add(end)
            incoming.write(outgoing.read())
        if len(done) == 2:
            return client.getpeercert()["serialNumber"]
    raise AssertionError("the handshake did not finish")


def watching(certs: Pki, directory: Path) -> tuple[WebSecurityWatcher, Clock]:
    """A watcher of a web configuration serving certificate one, on a clock of the test's."""
    install(certs, "one", directory)
    clock = Clock()
    return WebSecurityWatcher(str(write(directory, "web.yml", PLAIN_FILES)), clock), clock


class RacingLock:
    """The watcher's lock, with another caller's whole `current()` run, in another thread,
    just before the next acquire: between the first caller's look at the clock and its lock."""

    def __init__(self, watcher: WebSecurityWatcher) -> None:
        self._lock = watcher._lock
        self._rival: Callable[[], object] | None = watcher.current

    def acquire(self, blocking: bool = True) -> bool:
        rival, self._rival = self._rival, None
        if rival is not None:
            thread = threading.Thread(target=rival)
            thread.start()
            thread.join()
        return self._lock.acquire(blocking)

    def release(self) -> None:
        self._lock.release()


def test_the_files_are_stated_at_most_once_a_second(certs, tmp_path, monkeypatch):
    watcher, clock = watching(certs, tmp_path)
    stats = CountingStat(monkeypatch)
    for _ in range(1000):
        watcher.current()
    assert stats.paths == []  # the files were stat'ed as they were loaded

    clock.now += webconfig.WATCH_INTERVAL_SECONDS
    # The worst interleaving, two connections due at once: between them, one round of stats.
    monkeypatch.setattr(watcher, "_lock", RacingLock(watcher))
    for _ in range(1000):
        watcher.current()
    files = [str(tmp_path / name) for name in ("web.yml", "server.crt", "server.key")]
    assert sorted(stats.paths) == sorted(files)

    clock.now += webconfig.WATCH_INTERVAL_SECONDS * 0.99
    for _ in range(1000):
        watcher.current()
    assert len(stats.paths) == 3


def test_without_a_web_config_file_nothing_is_stated(monkeypatch):
    _config, security = cli._load(None, {})
    stats = CountingStat(monkeypatch)
    for _ in range(100):
        assert security.current() is PLAIN_HTTP
    assert stats.paths == []


class CountingReads:
    """webconfig's reads of the web configuration file."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        self._real = webconfig.read_dataclass
        monkeypatch.setattr(webconfig, "read_dataclass", self)

    def __call__(self, *args: object) -> object:
        self.count += 1
        return self._real(*args)


def test_a_broken_change_is_read_again_only_once_a_file_changes(
    certs, tmp_path, caplog, monkeypatch
):
    caplog.set_level(logging.INFO, logger=webconfig.__name__)
    watcher, clock = watching(certs, tmp_path)
    running = watcher.current()
    reads = CountingReads(monkeypatch)
    break_the_key_pair(certs, tmp_path)
    for _ in range(5):
        clock.now += webconfig.WATCH_INTERVAL_SECONDS
        assert watcher.current() is running
    assert reads.count == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [WARNING + "; the running one stays"]
    assert "server.key is not the key of server.crt" in warnings[0].problems

    replace(certs["two.key"], tmp_path / "server.key")  # the renewal's second step
    clock.now += webconfig.WATCH_INTERVAL_SECONDS
    assert handshake_serial(watcher.current().tls, certs) == serial(certs["two.crt"])
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [RELOADED]


def test_a_file_named_only_by_the_broken_version_is_watched(certs, tmp_path):
    watcher, clock = watching(certs, tmp_path)
    # The new version names a certificate that is not there yet.
    replace(write(tmp_path, "new-web.yml", NEXT_FILES), tmp_path / "web.yml")
    clock.now += webconfig.WATCH_INTERVAL_SECONDS
    assert handshake_serial(watcher.current().tls, certs) == serial(certs["one.crt"])

    shutil.copy(certs["three.key"], tmp_path / "next.key")
    shutil.copy(certs["three.crt"], tmp_path / "next.crt")
    clock.now += webconfig.WATCH_INTERVAL_SECONDS
    assert handshake_serial(watcher.current().tls, certs) == serial(certs["three.crt"])


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_reloads_leave_no_file_open_and_no_thread(certs, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=webconfig.__name__)
    watcher, clock = watching(certs, tmp_path)
    gc.collect()  # earlier tests' garbage must not close its files during this one
    fds, threads = open_fds(), threading.active_count()
    for name in ("two", "three", "one") * 3:
        install(certs, name, tmp_path)
        clock.now += webconfig.WATCH_INTERVAL_SECONDS
        assert handshake_serial(watcher.current().tls, certs) == serial(certs[f"{name}.crt"])
        half_write_the_certificate(certs, tmp_path)  # and a failed reload each time
        clock.now += webconfig.WATCH_INTERVAL_SECONDS
        watcher.current()
    assert len([r for r in caplog.records if r.getMessage() == RELOADED]) == 9
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 9
    assert open_fds() == fds
    assert threading.active_count() == threads
