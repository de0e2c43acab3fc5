"""The configuration loader on arbitrary YAML text in a file: only ConfigError may escape.

The input is decoded as UTF-8 (undecodable bytes replaced) and written to a file that
load_config reads, as `--config.file` has it do.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from conntrack_exporter.config import ConfigError, load_config
from fuzz.harness import FIXTURES, ROOT, fuzz

_file: Path | None = None


def seeds() -> Iterator[bytes]:
    yield (ROOT / "config.example.yml").read_bytes()
    yield from (path.read_bytes() for path in sorted(FIXTURES.glob("*.yml")))


def test_one_input(data: bytes) -> None:
    global _file
    if _file is None:  # one file, rewritten for each input
        descriptor, name = tempfile.mkstemp(prefix="cte-fuzz-", suffix=".yml")
        os.close(descriptor)
        _file = Path(name)
    _file.write_text(data.decode("utf-8", "replace"), encoding="utf-8")
    with contextlib.suppress(ConfigError):
        load_config(str(_file))


def main() -> None:
    # YAML's own parser too: its branches lead the fuzzer to the shapes YAML can take.
    fuzz("config", test_one_input, seeds(), covered=("conntrack_exporter", "yaml"))


if __name__ == "__main__":
    main()
