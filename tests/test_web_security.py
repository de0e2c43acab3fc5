"""The web configuration file (--web.config.file): its loader, with real certificates, and the
credential checker.

A CA, a server certificate and client certificates are made with the openssl CLI for the
session. The checks of one credential call the checker in-process, counting bcrypt calls
instead of timing them.
"""

from __future__ import annotations

import base64
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest

from conntrack_exporter.config import ConfigError
from conntrack_exporter.webconfig import CIPHER_SUITES, BasicAuth, load_web_config

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


def _ca(directory: Path, name: str) -> None:
    _openssl(
        directory, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
        "-subj", f"/CN={name}",
    )  # fmt: skip


def _signed(directory: Path, name: str, ca: str, extensions: str) -> None:
    _key_and_request(directory, name, f"/CN={name}")
    (directory / f"{name}.ext").write_text(extensions + "\n")
    _openssl(
        directory, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey",
        f"{ca}.key", "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
        "-extfile", f"{name}.ext",
    )  # fmt: skip


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """ca signs server and client; other-ca signs stranger, a client the exporter must refuse."""
    directory = tmp_path_factory.mktemp("pki")
    _ca(directory, "ca")
    _ca(directory, "other-ca")
    _signed(
        directory, "server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "extendedKeyUsage=serverAuth",
    )  # fmt: skip
    _signed(directory, "client", "ca", "extendedKeyUsage=clientAuth")
    _signed(directory, "stranger", "other-ca", "extendedKeyUsage=clientAuth")
    (directory / "garbage.pem").write_text("not a certificate\n")
    return Pki(directory)


def bcrypt_hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(COST)).decode()


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


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
        ("basic_auth_users: [alice]\n", "FILE:1: basic_auth_users: expected a mapping, got a list"),
        ("basic_auth_users:\n  alice: '$2b$03$" + "a" * 53 + "'\n",
         "FILE:2: basic_auth_users.alice: not a bcrypt hash ($2a$, $2b$ or $2y$, cost 04 to 31, "
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
