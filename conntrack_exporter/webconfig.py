"""The web configuration file: TLS and basic authentication, as Prometheus' exporter-toolkit.

The same YAML node_exporter takes with --web.config.file, as far as Python's ssl allows. It is
read into an `ssl.SSLContext` and a `BasicAuth`; every problem (unknown keys, wrong types,
unreadable files, a certificate that does not match its key, a bad hash) is reported at once
with its line, as for the exporter's own configuration. `WebSecurityWatcher` reads it again
when it or a file it names changes, so that a renewed certificate needs no restart.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import logging
import os
import re
import secrets
import ssl
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from conntrack_exporter.config import Check, ConfigError, Validation, read_dataclass

try:
    import bcrypt
except ImportError:  # an optional extra: only basic_auth_users needs it
    bcrypt = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

BCRYPT_INSTALL = "pip install 'conntrack-exporter[bcrypt]'"

# Go's names of the cipher suites exporter-toolkit accepts (crypto/tls CipherSuites(), with the
# RSA key exchange ones Go listed there until 1.22), as OpenSSL names them. Go, and so the
# toolkit, applies the list to TLS 1.2 and below only: the TLS 1.3 suites are accepted and not
# configurable (None).
CIPHER_SUITES: dict[str, str | None] = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_AES_128_GCM_SHA256": None,
    "TLS_AES_256_GCM_SHA384": None,
    "TLS_CHACHA20_POLY1305_SHA256": None,
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
}
TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# The configuration's types are built from the tables, so that a name the tables lack is a
# problem reported by the loader, with its line, like any other wrong value.
if TYPE_CHECKING:  # a Literal built at run time is no type to a static checker
    CipherSuiteName = str
    TLSVersionName = str
else:
    CipherSuiteName = Literal[tuple(CIPHER_SUITES)]
    TLSVersionName = Literal[tuple(TLS_VERSIONS)]

# exporter-toolkit's client_auth_type values Python's ssl can honour. It verifies every
# certificate it asks for, so Go's "ask but do not verify" modes have no equivalent.
CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
UNSUPPORTED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert")

# bcrypt's hash: $2a$, $2b$ or $2y$, a two-digit cost, 22 characters of salt, 31 of hash.
BCRYPT_HASH = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
# Each step doubles the work: at cost 17 one check takes ~6 s here, and an uncached request
# holds a scrape slot that long (cost 31 would take a day). 16 leaves room above the usual 10-12.
MIN_BCRYPT_COST, MAX_BCRYPT_COST = 4, 16
# bcrypt reads at most 72 bytes of a password; the library refuses longer ones instead of
# ignoring the rest as bcrypt always has (and htpasswd, and Go's bcrypt when comparing).
BCRYPT_MAX_PASSWORD = 72
# Successful checks remembered, so that a scraper with the right credentials pays bcrypt
# once, not on every scrape (exporter-toolkit keeps 100 too).
AUTH_CACHE_SIZE = 100


def _client_auth_problem(value: str) -> str | None:
    supported = ", ".join(CLIENT_AUTH)
    if value in CLIENT_AUTH:
        return None
    if value in UNSUPPORTED_CLIENT_AUTH:
        return (
            f"{value} is not supported: Python's ssl verifies every client certificate it "
            f"asks for; use one of {supported}"
        )
    return f"expected one of {supported}, got {value!r}"


@dataclass(frozen=True)
class TLSServerConfig:
    cert_file: str = ""
    key_file: str = ""
    client_auth_type: str = field(
        default="NoClientCert", metadata={"check": Check(_client_auth_problem, {})}
    )
    client_ca_file: str = ""
    min_version: TLSVersionName = "TLS12"
    max_version: TLSVersionName = "TLS13"
    cipher_suites: tuple[CipherSuiteName, ...] = ()
    prefer_server_cipher_suites: bool = True


@dataclass(frozen=True)
class WebConfigFile:
    tls_server_config: TLSServerConfig = TLSServerConfig()
    basic_auth_users: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class WebSecurity:
    """What the web configuration file asks of the server: TLS, credentials, or neither."""

    tls: ssl.SSLContext | None = None
    auth: BasicAuth | None = None

    def current(self) -> WebSecurity:
        """Itself: a fixed configuration, which the server asks as it asks a watcher."""
        return self


PLAIN_HTTP = WebSecurity()


def load_web_config(file: str) -> WebSecurity:
    """Read and check a web configuration file; `ConfigError` lists every problem."""
    model, validation = read_dataclass(WebConfigFile, file)
    return _web_security(model, os.path.dirname(file), validation)


def _web_security(model: WebConfigFile, base: str, validation: Validation) -> WebSecurity:
    tls = None
    if validation.given("tls_server_config"):
        tls = _tls_context(model.tls_server_config, base, validation)
    auth = _basic_auth(model.basic_auth_users, validation)
    validation.raise_problems()
    return WebSecurity(tls, auth)


# --- watching the files ---------------------------------------------------------------------

# exporter-toolkit reads the files again for every connection; stat'ing them at most once a
# second notices a renewal as soon, for a few system calls a second under any load.
WATCH_INTERVAL_SECONDS = 1.0

FileSignature = tuple[int, int, int, int, int] | None


class WebSecurityWatcher:
    """A web configuration file's `WebSecurity`, loaded again when the file or one it names
    (certificate, key, client CA) changes, for the connections and requests that follow.

    A new version with problems is not applied: the running configuration stays, one warning
    lists the problems, and the files are read again only once one of them changes again (a
    renewal that writes the certificate and the key one after the other is taken at the
    second write).
    """

    def __init__(self, file: str, clock: Callable[[], float] = time.monotonic) -> None:
        """Load the file at once; `ConfigError` lists every problem."""
        self.file = file
        self._clock = clock
        self._lock = threading.Lock()
        self._files: tuple[str, ...] = ()
        self._signature: tuple[FileSignature, ...] = ()
        self._security = self._load()
        self._due = clock() + WATCH_INTERVAL_SECONDS

    def latest(self) -> WebSecurity:
        """The configuration loaded last, the files not checked: for the server's event loop,
        which must not wait for a load (it calls current() in a thread of its own)."""
        return self._security

    def current(self) -> WebSecurity:
        """The configuration for a new connection or request, the files checked if due."""
        # Read without the lock: each is replaced whole. A caller that finds a check under way
        # does not wait for it (a reload can spend seconds in bcrypt): the running
        # configuration serves it meanwhile.
        if self._clock() >= self._due and self._lock.acquire(blocking=False):
            try:
                self._check()
            finally:
                self._lock.release()
        return self._security

    def _check(self) -> None:
        now = self._clock()
        if now < self._due:  # another caller checked between our look and the lock
            return
        self._due = now + WATCH_INTERVAL_SECONDS
        if tuple(map(_file_signature, self._files)) == self._signature:
            return
        try:
            self._security = self._load()
        except (ConfigError, OSError) as exc:
            # OSError (ssl.SSLError is one): a file replaced again between its check and its
            # load, which changed its signature too, so the next check tries again.
            problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
            log.warning(
                "web configuration changed but has problems; the running one stays",
                extra={"file": self.file, "problems": "; ".join(problems)},
            )
            return
        log.info(
            "web configuration reloaded",
            extra={
                "file": self.file,
                "tls": self._security.tls is not None,
                "basic_auth": self._security.auth is not None,
            },
        )

    def _load(self) -> WebSecurity:
        # Each file is stat'ed before it is read: a change made during the load then shows at
        # the next check instead of passing for loaded. A file that does not parse names no
        # files, so it alone is watched until it changes.
        self._files, self._signature = (self.file,), (_file_signature(self.file),)
        model, validation = read_dataclass(WebConfigFile, self.file)
        base = os.path.dirname(self.file)
        named = _named_files(model.tls_server_config, base)
        self._files += named
        self._signature += tuple(map(_file_signature, named))
        return _web_security(model, base, validation)


# What the server asks for the configuration of each connection and request.
WebSecuritySource = WebSecurity | WebSecurityWatcher


def _named_files(config: TLSServerConfig, base: str) -> tuple[str, ...]:
    names = (config.cert_file, config.key_file, config.client_ca_file)
    return tuple(os.path.join(base, name) for name in names if name)


def _file_signature(path: str) -> FileSignature:
    # os.stat follows links: a Kubernetes Secret volume's files are links through a `..data`
    # link that an update swaps, so only their targets change. A new inode is a replaced file,
    # a new mode a permission fixed; None, a file missing (or not yet there).
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev, st.st_mode)


# --- TLS ------------------------------------------------------------------------------------

SECTION = "tls_server_config"


def _tls_context(config: TLSServerConfig, base: str, validation: Validation) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _load_certificate(context, config, base, validation)
    _client_certificates(context, config, base, validation)
    _versions(context, config, validation)
    _ciphers(context, config, validation)
    return context


def _load_certificate(
    context: ssl.SSLContext, config: TLSServerConfig, base: str, validation: Validation
) -> None:
    for key in ("cert_file", "key_file"):
        if not getattr(config, key) and f"{SECTION}.{key}" not in validation.failed:
            validation.problem(f"{SECTION}.{key}", "required for TLS")
    cert = _certificates(base, "cert_file", config.cert_file, validation)
    key_path = _readable(base, "key_file", config.key_file, validation)
    if cert is None or key_path is None:
        return
    try:
        # A callback, so that an encrypted key is an error, not a prompt on the terminal.
        context.load_cert_chain(cert, key_path, password=lambda: b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            message = f"{config.key_file} is not the key of {config.cert_file}"
        else:
            message = f"{config.key_file} holds no unencrypted PEM private key"
        validation.problem(f"{SECTION}.key_file", message)


def _client_certificates(
    context: ssl.SSLContext, config: TLSServerConfig, base: str, validation: Validation
) -> None:
    ca = _certificates(base, "client_ca_file", config.client_ca_file, validation)
    if ca is not None:
        context.load_verify_locations(cafile=ca)
    if f"{SECTION}.client_auth_type" in validation.failed:
        return
    mode = CLIENT_AUTH[config.client_auth_type]
    if config.client_ca_file and mode == ssl.CERT_NONE:
        validation.problem(
            f"{SECTION}.client_ca_file",
            "set, but client_auth_type NoClientCert never asks for a certificate",
        )
    elif mode != ssl.CERT_NONE and not config.client_ca_file:
        validation.problem(
            f"{SECTION}.client_auth_type",
            f"{config.client_auth_type} needs client_ca_file, the CA that signs the clients",
        )
    context.verify_mode = mode


def _readable(base: str, key: str, file: str, validation: Validation) -> str | None:
    """The path of a file named by `key`, if it is given and readable."""
    if not file:
        return None
    # As exporter-toolkit: relative to the web configuration file.
    path = os.path.join(base, file)
    try:
        # Checked before opening: OpenSSL would read /dev/zero forever, and opening a FIFO
        # waits for a writer.
        if not stat.S_ISREG(os.stat(path).st_mode):
            validation.problem(f"{SECTION}.{key}", f"{file} is not a regular file")
            return None
        with open(path, "rb"):
            return path
    except OSError as exc:
        validation.problem(f"{SECTION}.{key}", f"cannot read {file}: {exc.strerror}")
        return None


def _certificates(base: str, key: str, file: str, validation: Validation) -> str | None:
    """The path of a PEM certificate file named by `key`, if it is given and good."""
    path = _readable(base, key, file, validation)
    if path is None:
        return None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError:
        validation.problem(f"{SECTION}.{key}", f"{file} holds no PEM certificate")
        return None
    return path


def _versions(context: ssl.SSLContext, config: TLSServerConfig, validation: Validation) -> None:
    low, high = TLS_VERSIONS[config.min_version], TLS_VERSIONS[config.max_version]
    if low > high:
        validation.problem(
            f"{SECTION}.min_version",
            f"{config.min_version} is above max_version {config.max_version}",
        )
        return
    context.minimum_version, context.maximum_version = low, high


def _ciphers(context: ssl.SSLContext, config: TLSServerConfig, validation: Validation) -> None:
    if config.prefer_server_cipher_suites:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    names = [CIPHER_SUITES[name] for name in config.cipher_suites]
    openssl_names = [name for name in names if name is not None]
    if not openssl_names:
        return
    try:
        # In the configured order: with prefer_server_cipher_suites, the server's preference.
        context.set_ciphers(":".join(openssl_names))
        enabled = {cipher["name"] for cipher in context.get_ciphers()}
    except ssl.SSLError:  # not one of them is available
        enabled = set()
    for index, name in enumerate(names):
        if name is not None and name not in enabled:
            validation.problem(
                f"{SECTION}.cipher_suites[{index}]",
                f"{config.cipher_suites[index]} ({name}) is not available in this "
                f"OpenSSL ({ssl.OPENSSL_VERSION})",
            )


# --- basic authentication -------------------------------------------------------------------


def _basic_auth(users: Mapping[str, str], validation: Validation) -> BasicAuth | None:
    if not users:
        return None
    if bcrypt is None:
        validation.problem(
            "basic_auth_users", f"needs the bcrypt package; install it with {BCRYPT_INSTALL}"
        )
        return None
    good = True
    for user, hashed in users.items():
        if not _bcrypt_cost(hashed):
            # The hash is a secret of sorts: say what is wrong, never echo it.
            validation.problem(
                f"basic_auth_users.{user}",
                f"not a bcrypt hash ($2a$, $2b$ or $2y$, cost {MIN_BCRYPT_COST:02} to "
                f"{MAX_BCRYPT_COST}, 60 characters; htpasswd -nBC 10 '' makes one)",
            )
            good = False
    return BasicAuth(users) if good else None


def _bcrypt_cost(hashed: str) -> int | None:
    match = BCRYPT_HASH.fullmatch(hashed)
    if match is None or not MIN_BCRYPT_COST <= int(match.group(1)) <= MAX_BCRYPT_COST:
        return None
    return int(match.group(1))


class BasicAuth:
    """Checks `Authorization: Basic` credentials against bcrypt hashes.

    Constant work whoever asks: an unknown user's password is checked against a dummy hash of
    the highest cost configured, so the time taken does not tell which users exist. bcrypt runs
    one at a time (it takes 50 to 250 ms of CPU by design: a flood of wrong passwords must not
    take every core from the scrapes). Successful checks are remembered, keyed by a keyed hash
    of the user, the password and the stored hash, so a changed password never matches an old
    entry and no password is kept in memory.
    """

    def __init__(self, users: Mapping[str, str]) -> None:
        self._users = [(user.encode(), hashed.encode()) for user, hashed in users.items()]
        cost = max(int(hashed[4:6]) for hashed in users.values())  # checked by _bcrypt_cost
        self._dummy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(cost))
        self._cache_key = secrets.token_bytes(32)
        self._cache: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._cache_lock = threading.Lock()
        self._bcrypt_lock = threading.Lock()

    def check(self, authorization: str | None) -> bool:
        """Whether an Authorization header's value carries a configured user's password."""
        credentials = _basic_credentials(authorization)
        if credentials is None:
            return False
        user, password = credentials
        known, stored = self._stored_hash(user)
        # Fixed-length parts: no two (user, password, hash) triples give the same input.
        parts = b"".join(hashlib.sha256(part).digest() for part in (user, password, stored))
        digest = hmac.digest(self._cache_key, parts, "sha256")
        if known and self._cached(digest):
            return True
        with self._bcrypt_lock:
            matches = bcrypt.checkpw(password[:BCRYPT_MAX_PASSWORD], stored)
        if known and matches:
            self._remember(digest)
            return True
        return False

    def _stored_hash(self, user: bytes) -> tuple[bool, bytes]:
        # Every name compared, each in constant time, so the work does not depend on which
        # user (if any) matches.
        found = None
        for name, hashed in self._users:
            if hmac.compare_digest(name, user):
                found = hashed
        return (True, found) if found is not None else (False, self._dummy)

    def _cached(self, digest: bytes) -> bool:
        with self._cache_lock:
            if digest not in self._cache:
                return False
            self._cache.move_to_end(digest)
            return True

    def _remember(self, digest: bytes) -> None:
        with self._cache_lock:
            self._cache[digest] = None
            if len(self._cache) > AUTH_CACHE_SIZE:
                self._cache.popitem(last=False)


def _basic_credentials(authorization: str | None) -> tuple[bytes, bytes] | None:
    scheme, _, encoded = (authorization or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except ValueError:  # binascii.Error, or a character outside ASCII
        return None
    user, sep, password = decoded.partition(b":")
    return (user, password) if sep else None
