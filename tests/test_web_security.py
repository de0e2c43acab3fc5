"""TLS and basic authentication (--web.config.file) on the real exporter, with real certificates.

A CA, a server certificate and client certificates are made with the openssl CLI for the
session; the exporter runs as a subprocess on loopback with no collectors (what is under test
is the HTTP side) and is reached with Python's own TLS client. The checks of one credential
need no subprocess: they call the checker in-process, counting bcrypt calls instead of
timing them.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest

from conntrack_exporter import webconfig
from conntrack_exporter.config import ConfigError
from conntrack_exporter.webconfig import CIPHER_SUITES, BasicAuth, load_web_config
from tests.test_web_load import closed_by_server, free_port, trickle

CLIENT_TIMEOUT = 30  # only to fail instead of hanging; no assertion depends on it
# Cheap hashes for the tests; the cost changes the time, not the behaviour.
COST = 4
PASSWORD = "correct-horse-7f3a"
WRONG_PASSWORD = "wrong-battery-91c2"

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


# --- certificates ---------------------------------------------------------------------------


@dataclass
class Pki:
    dir: Path

    def __getitem__(self, name: str) -> str:
        return str(self.dir / name)


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)


def _key_and_request(directory: Path, name: str, subject: str) -> None:
    _openssl(
        directory, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject,
    )  # fmt: skip


def make_ca(directory: Path, name: str) -> None:
    _openssl(
        directory, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
        "-subj", f"/CN={name}",
    )  # fmt: skip


def make_signed(directory: Path, name: str, ca: str, extensions: str) -> None:
    _key_and_request(directory, name, f"/CN={name}")
    (directory / f"{name}.ext").write_text(extensions + "\n")
    _openssl(
        directory, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey",
        f"{ca}.key", "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
        "-extfile", f"{name}.ext",
    )  # fmt: skip


# What a client connecting to https://localhost or https://127.0.0.1 verifies.
SERVER_EXTENSIONS = "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """ca signs server and client; other-ca signs stranger, a client the exporter must refuse."""
    directory = tmp_path_factory.mktemp("pki")
    make_ca(directory, "ca")
    make_ca(directory, "other-ca")
    make_signed(directory, "server", "ca", SERVER_EXTENSIONS)
    make_signed(directory, "client", "ca", "extendedKeyUsage=clientAuth")
    make_signed(directory, "stranger", "other-ca", "extendedKeyUsage=clientAuth")
    (directory / "garbage.pem").write_text("not a certificate\n")
    return Pki(directory)


def bcrypt_hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(COST)).decode()


# --- the exporter, as a subprocess ----------------------------------------------------------


@dataclass
class Exporter:
    port: int
    log: Path
    process: subprocess.Popen

    def request(
        self,
        path: str = "/metrics",
        user: str | None = None,
        password: str = "",
        tls: ssl.SSLContext | None = None,
    ) -> tuple[int, dict[str, str]]:
        """The status and headers of one GET; exceptions from a refused connection pass."""
        if tls is None:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=CLIENT_TIMEOUT)
        else:
            connection = http.client.HTTPSConnection(
                "localhost", self.port, timeout=CLIENT_TIMEOUT, context=tls
            )
        headers = {}
        if user is not None:
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        try:
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            response.read()
            return response.status, dict(response.getheaders())
        finally:
            connection.close()


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


@contextlib.contextmanager
def exporter(tmp_path: Path, web_config: str, config: str = "") -> Iterator[Exporter]:
    """The exporter with a web configuration file (and an exporter configuration file)."""
    port = free_port()
    log = tmp_path / "exporter.log"
    args = [
        sys.executable, "-m", "conntrack_exporter", "--collector.disable-defaults",
        "--log.level", "debug", "--web.listen-address", f"127.0.0.1:{port}",
        "--web.config.file", str(write(tmp_path, "web.yml", web_config)),
        "--config.file", str(write(tmp_path, "config.yml", config)),
    ]  # fmt: skip
    # The log goes to a file, not a pipe that nobody reads while requests fill it.
    with open(log, "w") as stderr:
        process = subprocess.Popen(args, stderr=stderr)
    try:
        _wait_listening(process, log)
        yield Exporter(port, log, process)
    finally:
        process.terminate()
        process.wait(CLIENT_TIMEOUT)


def _wait_listening(process: subprocess.Popen, log: Path) -> None:
    for _ in range(600):
        if "msg=listening" in log.read_text():
            return
        if process.poll() is not None:
            pytest.fail(f"the exporter exited ({process.returncode}):\n{log.read_text()}")
        time.sleep(0.05)
    pytest.fail(f"the exporter did not start listening:\n{log.read_text()}")


def client_tls(pki: Pki, cert: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki["ca.crt"])
    if cert is not None:
        context.load_cert_chain(pki[f"{cert}.crt"], pki[f"{cert}.key"])
    return context


def tls_config(pki: Pki, extra: str = "") -> str:
    return (
        f"tls_server_config:\n  cert_file: {pki['server.crt']}\n"
        f"  key_file: {pki['server.key']}\n{extra}"
    )


REFUSED = (ssl.SSLError, ConnectionError, http.client.HTTPException)


# --- TLS ------------------------------------------------------------------------------------


def test_https_with_the_ca_and_not_plain_http(pki, tmp_path):
    with exporter(tmp_path, tls_config(pki)) as running:
        assert running.request(tls=client_tls(pki))[0] == 200
        assert running.request("/healthz", tls=client_tls(pki))[0] == 200
        with pytest.raises(REFUSED):
            running.request()
        # A failed handshake cost nothing but its own connection.
        assert running.request(tls=client_tls(pki))[0] == 200


def test_require_and_verify_client_cert(pki, tmp_path):
    extra = f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {pki['ca.crt']}\n"
    with exporter(tmp_path, tls_config(pki, extra)) as running:
        assert running.request(tls=client_tls(pki, "client"))[0] == 200
        with pytest.raises(REFUSED):
            running.request(tls=client_tls(pki))
        with pytest.raises(REFUSED):
            running.request(tls=client_tls(pki, "stranger"))


def test_verify_client_cert_if_given(pki, tmp_path):
    extra = f"  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: {pki['ca.crt']}\n"
    with exporter(tmp_path, tls_config(pki, extra)) as running:
        assert running.request(tls=client_tls(pki))[0] == 200
        assert running.request(tls=client_tls(pki, "client"))[0] == 200
        with pytest.raises(REFUSED):
            running.request(tls=client_tls(pki, "stranger"))


def test_tls_versions_and_cipher_suites_apply(pki, tmp_path):
    extra = (
        "  max_version: TLS12\n  cipher_suites: [TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256]\n"
    )
    with exporter(tmp_path, tls_config(pki, extra)) as running:
        tls = client_tls(pki)
        connection = http.client.HTTPSConnection(
            "localhost", running.port, timeout=CLIENT_TIMEOUT, context=tls
        )
        connection.connect()
        assert connection.sock.version() == "TLSv1.2"
        assert connection.sock.cipher()[0] == "ECDHE-ECDSA-CHACHA20-POLY1305"
        connection.close()
        only_tls13 = client_tls(pki)
        only_tls13.minimum_version = ssl.TLSVersion.TLSv1_3
        with pytest.raises(REFUSED):
            running.request(tls=only_tls13)


def connect(running: Exporter) -> socket.socket:
    return socket.create_connection(("127.0.0.1", running.port), CLIENT_TIMEOUT)


def test_a_silent_client_does_not_hold_the_accept_loop(pki, tmp_path):
    # The handshake may take longer than this client waits for its answer.
    config = f"web:\n  read_timeout_seconds: {CLIENT_TIMEOUT * 2}\n"
    with exporter(tmp_path, tls_config(pki), config) as running, connect(running):
        # Were the handshake in the accept loop, this request would wait for it.
        assert running.request(tls=client_tls(pki))[0] == 200


def client_hello(pki: Pki) -> bytes:
    """The first flight of a real TLS client."""
    outgoing = ssl.MemoryBIO()
    client = client_tls(pki).wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def test_a_silent_or_slow_handshake_is_dropped(pki, tmp_path):
    config = "web:\n  read_timeout_seconds: 2\n"
    with exporter(tmp_path, tls_config(pki), config) as running:
        with connect(running) as silent:
            assert closed_by_server(silent)
        with connect(running) as slow:
            # One byte a second: the whole ClientHello would take minutes. The deadline
            # covers the whole handshake, not each read.
            hello = client_hello(pki)
            sent, reply = trickle(slow, hello, 1.0)
            assert sent < len(hello) and reply == b""


def test_cipher_names_are_openssls_own_mapping():
    # `openssl ciphers -stdname` prints each suite's IANA name (Go's) beside OpenSSL's.
    listing = subprocess.run(
        ["openssl", "ciphers", "-stdname", "ALL"], capture_output=True, text=True, check=True
    ).stdout
    openssl = {fields[0]: fields[2] for fields in map(str.split, listing.splitlines())}
    for go_name, openssl_name in CIPHER_SUITES.items():
        if openssl_name is None:  # TLS 1.3: the same name on both sides
            assert openssl[go_name] == go_name
        else:
            assert openssl[go_name] == openssl_name


# --- basic authentication -------------------------------------------------------------------


def auth_config(pki: Pki) -> str:
    return tls_config(pki) + f"basic_auth_users:\n  alice: '{bcrypt_hash(PASSWORD)}'\n"


@pytest.mark.parametrize(
    ("user", "password"),
    [(None, ""), ("alice", WRONG_PASSWORD), ("mallory", PASSWORD), ("alice", "")],
    ids=["no credentials", "wrong password", "unknown user", "empty password"],
)
def test_wrong_credentials_get_401(pki, tmp_path, user, password):
    with exporter(tmp_path, auth_config(pki)) as running:
        for path in ("/metrics", "/", "/healthz", "/nope"):
            status, headers = running.request(path, user, password, client_tls(pki))
            assert status == 401, path
            assert headers["WWW-Authenticate"] == 'Basic realm="conntrack-exporter"'


def test_right_credentials_get_200(pki, tmp_path):
    with exporter(tmp_path, auth_config(pki)) as running:
        for path, status in [("/metrics", 200), ("/", 200), ("/healthz", 200), ("/nope", 404)]:
            assert running.request(path, "alice", PASSWORD, client_tls(pki))[0] == status


def test_healthz_without_credentials_when_configured(pki, tmp_path):
    config = "web:\n  unauthenticated_healthz: true\n"
    with exporter(tmp_path, auth_config(pki), config) as running:
        assert running.request("/healthz", tls=client_tls(pki))[0] == 200
        assert running.request("/metrics", tls=client_tls(pki))[0] == 401
        assert running.request("/", tls=client_tls(pki))[0] == 401


def test_passwords_never_reach_the_log(pki, tmp_path):
    with exporter(tmp_path, auth_config(pki)) as running:
        for password in (PASSWORD, WRONG_PASSWORD):
            running.request("/metrics", "alice", password, client_tls(pki))
            running.request("/metrics", password, password, client_tls(pki))
        log = running.log.read_text()
    assert "GET /metrics" in log  # the requests were logged, at debug
    for password in (PASSWORD, WRONG_PASSWORD):
        assert password not in log
        assert base64.b64encode(f"alice:{password}".encode()).decode() not in log
    assert "Authorization" not in log and "Basic " not in log


class CountingCheckpw:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.hashes: list[bytes] = []
        self._real = bcrypt.checkpw
        monkeypatch.setattr(bcrypt, "checkpw", self)

    def __call__(self, password: bytes, hashed: bytes) -> bool:
        self.hashes.append(hashed)
        return self._real(password, hashed)


def authorization(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_an_unknown_user_costs_the_same_bcrypt_as_a_wrong_password(monkeypatch):
    stored = bcrypt_hash(PASSWORD)
    auth = BasicAuth({"alice": stored, "bob": bcrypt.hashpw(b"x", bcrypt.gensalt(5)).decode()})
    calls = CountingCheckpw(monkeypatch)

    assert not auth.check(authorization("alice", WRONG_PASSWORD))
    assert not auth.check(authorization("mallory", PASSWORD))
    assert not auth.check(authorization("mallory", PASSWORD))  # failures are not remembered
    wrong, unknown, again = calls.hashes
    assert wrong == stored.encode()
    # One bcrypt each, the unknown user's against a hash of the highest cost configured.
    assert unknown == again and unknown[:7] == b"$2b$05$" and unknown != wrong


def test_right_credentials_pay_bcrypt_once(monkeypatch):
    auth = BasicAuth({"alice": bcrypt_hash(PASSWORD)})
    calls = CountingCheckpw(monkeypatch)
    for _ in range(3):
        assert auth.check(authorization("alice", PASSWORD))
    assert len(calls.hashes) == 1
    # A cached success does not let another password through.
    assert not auth.check(authorization("alice", WRONG_PASSWORD))
    assert len(calls.hashes) == 2


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer abc", "Basic", "Basic !!!", "Basic " + base64.b64encode(b"alice").decode()],
)
def test_malformed_authorization_is_refused_without_bcrypt(monkeypatch, header):
    auth = BasicAuth({"alice": bcrypt_hash(PASSWORD)})
    calls = CountingCheckpw(monkeypatch)
    assert not auth.check(header)
    assert calls.hashes == []


def test_passwords_past_72_bytes_are_cut_as_bcrypt_does():
    long = "p" * 72
    auth = BasicAuth({"alice": bcrypt_hash(long)})
    assert auth.check(authorization("alice", long + "ignored"))


# --- a bad web configuration ----------------------------------------------------------------


def run_cli(*args: str, preamble: str = "") -> subprocess.CompletedProcess:
    code = f"import sys; {preamble}from conntrack_exporter.cli import main; sys.exit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60
    )


def test_a_bad_web_config_exits_2_listing_every_problem_with_its_line(pki, tmp_path):
    missing = tmp_path / "missing.pem"
    web = write(
        tmp_path,
        "web.yml",
        "tls_server_config:\n"
        f"  cert_file: {pki['server.crt']}\n"
        f"  key_file: {pki['client.key']}\n"  # 3: not the server's key
        "  client_auth_type: RequestClientCert\n"  # 4: not possible with Python's ssl
        f"  client_ca_file: {missing}\n"  # 5: unreadable
        "  min_version: TLS1.2\n"  # 6: not a version
        "  cipher_suites: [TLS_RSA_WITH_RC4_128_SHA]\n"  # 7: not accepted
        "  curve_preferences: [X25519]\n"  # 8: not supported
        "basic_auth_users:\n"
        "  alice: $2y$10$tooshort\n"  # 10: not a bcrypt hash
        "  bob: [1]\n"  # 11: not a string
        "rate_limit: {}\n",  # 12: not supported
    )
    result = run_cli("--web.config.file", str(web), "--once")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "conntrack-exporter: invalid configuration (9 problems):",
        f"  {web}:3: tls_server_config.key_file: {pki['client.key']} is not the key of "
        f"{pki['server.crt']}",
        f"  {web}:4: tls_server_config.client_auth_type: RequestClientCert is not supported: "
        "Python's ssl verifies every client certificate it asks for; use one of "
        "NoClientCert, VerifyClientCertIfGiven, RequireAndVerifyClientCert",
        f"  {web}:5: tls_server_config.client_ca_file: cannot read {missing}: "
        "No such file or directory",
        f"  {web}:6: tls_server_config.min_version: expected one of TLS10, TLS11, TLS12, "
        "TLS13, got 'TLS1.2'",
        f"  {web}:7: tls_server_config.cipher_suites[0]: expected one of "
        + ", ".join(CIPHER_SUITES)
        + ", got 'TLS_RSA_WITH_RC4_128_SHA'",
        f"  {web}:8: tls_server_config.curve_preferences: unknown key; expected one of "
        "cert_file, key_file, client_auth_type, client_ca_file, min_version, max_version, "
        "cipher_suites, prefer_server_cipher_suites",
        f"  {web}:10: basic_auth_users.alice: not a bcrypt hash ($2a$, $2b$ or $2y$, cost 04 "
        "to 16, 60 characters; htpasswd -nBC 10 '' makes one)",
        f"  {web}:11: basic_auth_users.bob: expected a string, got [1]",
        f"  {web}:12: rate_limit: unknown key; expected one of tls_server_config, basic_auth_users",
    ]


def test_relative_files_are_read_beside_the_web_config(pki, tmp_path, monkeypatch):
    for name in ("server.crt", "server.key", "ca.crt"):
        shutil.copy(pki[name], tmp_path / name)
    web = write(
        tmp_path,
        "web.yml",
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n",
    )
    monkeypatch.chdir("/")  # nothing relative to the working directory
    security = load_web_config(str(web))
    assert security.tls is not None and security.tls.verify_mode == ssl.CERT_REQUIRED
    assert security.auth is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("tls_server_config:\n  key_file: server.key\n", "FILE:1: tls_server_config.cert_file: "
         "required for TLS"),
        ("tls_server_config:\n  cert_file: garbage.pem\n  key_file: server.key\n",
         "FILE:2: tls_server_config.cert_file: garbage.pem holds no PEM certificate"),
        ("tls_server_config:\n  cert_file: server.crt\n  key_file: garbage.pem\n",
         "FILE:3: tls_server_config.key_file: garbage.pem holds no unencrypted PEM private key"),
        ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
         "  client_ca_file: ca.crt\n", "FILE:4: tls_server_config.client_ca_file: set, but "
         "client_auth_type NoClientCert never asks for a certificate"),
        ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
         "  client_auth_type: RequireAndVerifyClientCert\n", "FILE:4: "
         "tls_server_config.client_auth_type: RequireAndVerifyClientCert needs client_ca_file, "
         "the CA that signs the clients"),
        ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
         "  client_auth_type: Always\n", "FILE:4: tls_server_config.client_auth_type: expected "
         "one of NoClientCert, VerifyClientCertIfGiven, RequireAndVerifyClientCert, got 'Always'"),
        ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
         "  min_version: TLS13\n  max_version: TLS12\n", "FILE:4: tls_server_config.min_version: "
         "TLS13 is above max_version TLS12"),
        # A device or a FIFO would hang the start-up (OpenSSL reads /dev/zero forever).
        ("tls_server_config:\n  cert_file: /dev/zero\n  key_file: server.key\n",
         "FILE:2: tls_server_config.cert_file: /dev/zero is not a regular file"),
        ("basic_auth_users: [alice]\n", "FILE:1: basic_auth_users: expected a mapping, got a list"),
        ("basic_auth_users:\n  alice: '$2b$03$" + "a" * 53 + "'\n",
         "FILE:2: basic_auth_users.alice: not a bcrypt hash ($2a$, $2b$ or $2y$, cost 04 to 16, "
         "60 characters; htpasswd -nBC 10 '' makes one)"),
        # Cost 17 takes seconds a check, 31 a day: refused, not a stalled start-up.
        ("basic_auth_users:\n  alice: '$2b$17$" + "a" * 53 + "'\n",
         "FILE:2: basic_auth_users.alice: not a bcrypt hash ($2a$, $2b$ or $2y$, cost 04 to 16, "
         "60 characters; htpasswd -nBC 10 '' makes one)"),
    ],
)  # fmt: skip
def test_each_kind_of_web_config_problem(pki, tmp_path, text, problem):
    for name in ("server.crt", "server.key", "ca.crt", "garbage.pem"):
        shutil.copy(pki[name], tmp_path / name)
    web = write(tmp_path, "web.yml", text)
    with pytest.raises(ConfigError) as caught:
        load_web_config(str(web))
    assert [p.replace(str(web), "FILE") for p in caught.value.problems] == [problem]


def test_unreadable_web_config(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_web_config(str(tmp_path / "nope.yml"))
    assert caught.value.problems == [f"{tmp_path}/nope.yml: cannot read: No such file or directory"]


def test_users_without_bcrypt_installed_exit_2_saying_how_to_install_it(tmp_path):
    web = write(tmp_path, "web.yml", f"basic_auth_users:\n  alice: '{bcrypt_hash(PASSWORD)}'\n")
    # None in sys.modules makes `import bcrypt` raise ImportError, as if it were not installed.
    result = run_cli(
        "--web.config.file", str(web), "--once", preamble="sys.modules['bcrypt'] = None; "
    )
    assert result.returncode == 2
    assert result.stderr == (
        "conntrack-exporter: invalid configuration (1 problem):\n"
        f"  {web}:1: basic_auth_users: needs the bcrypt package; install it with "
        f"{webconfig.BCRYPT_INSTALL}\n"
    )
