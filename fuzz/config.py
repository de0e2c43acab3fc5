"""The configuration loaders on arbitrary YAML text in a file: only ConfigError may escape.

The input is decoded as UTF-8 (undecodable bytes replaced) and written to a file that each
loader reads, as `--config.file` and `--web.config.file` have it do: the exporter's own
configuration (config.load_config) and the web configuration (webconfig.load_web_config).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from functools import partial

from conntrack_exporter.collectors import COLLECTORS
from conntrack_exporter.config import ConfigError, load_config
from conntrack_exporter.webconfig import load_web_config
from fuzz.harness import FIXTURES, ROOT, fuzz

LOADERS = (partial(load_config, collectors=COLLECTORS), load_web_config)
# The web configuration names files that the loader reads whole; a device or a kernel file
# (/dev/zero, /proc/kmsg) would never end the read. An input that could name one is skipped.
ENDLESS = ("dev", "proc", "sys", "run")
# Every key of the web configuration, its files absent: a start for the fuzzer.
WEB_SEED = b"""\
tls_server_config:
  cert_file: server.crt
  key_file: server.key
  client_auth_type: RequireAndVerifyClientCert
  client_ca_file: ca.crt
  min_version: TLS12
  max_version: TLS13
  cipher_suites: [TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, TLS_AES_128_GCM_SHA256]
  prefer_server_cipher_suites: false
basic_auth_users:
  alice: $2b$04$abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0
"""


def seeds() -> Iterator[bytes]:
    yield (ROOT / "config.example.yml").read_bytes()
    yield from (path.read_bytes() for path in sorted(FIXTURES.glob("*.yml")))
    yield WEB_SEED


def test_one_input(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    if any(word in text for word in ENDLESS):
        return
    # A file per input, removed at once: atheris ends its process with os._exit, which runs
    # no atexit handler, so a file kept for the whole run was left behind every time.
    descriptor, name = tempfile.mkstemp(prefix="cte-fuzz-", suffix=".yml")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
        for load in LOADERS:
            with contextlib.suppress(ConfigError):
                load(name)
    finally:
        os.unlink(name)


def main() -> None:
    # YAML's own parser too: its branches lead the fuzzer to the shapes YAML can take.
    fuzz("config", test_one_input, seeds(), covered=("conntrack_exporter", "yaml"))


if __name__ == "__main__":
    main()
