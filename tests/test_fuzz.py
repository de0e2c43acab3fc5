"""A short, fixed run of every fuzz harness (fuzz/), inside `make test`.

`make fuzz` runs the harnesses coverage-guided with atheris for a million inputs and more; here
each sees its seeds (the captured fixtures), every input a past campaign found a bug with
(fuzz/findings/), and a few hundred derandomized Hypothesis inputs: random bytes and the seeds
with bytes changed and cut. A harness raises only on a finding, so each test here is just
"no finding". Then the harnesses themselves are checked: a planted bug is reported.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzz.config
import fuzz.netlink
import fuzz.procfs
from conntrack_exporter.config import load_config

ROOT = Path(__file__).resolve().parent.parent
FINDINGS = ROOT / "fuzz" / "findings"
HARNESSES: dict[str, ModuleType] = {
    "netlink": fuzz.netlink,
    "procfs": fuzz.procfs,
    "config": fuzz.config,
}
# Inputs per harness: the YAML loader is a hundred times slower than the decoders.
EXAMPLES = {"netlink": 400, "procfs": 400, "config": 100}


def edited(seed: bytes, cut: int, edits: list[tuple[int, int]]) -> bytes:
    data = bytearray(seed[:cut] if cut else seed)
    for position, byte in edits:
        if data:
            data[position % len(data)] = byte
    return bytes(data)


def inputs(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """Random bytes, and seeds cut short and with some bytes changed."""
    return st.one_of(
        st.binary(max_size=512),
        st.builds(
            edited,
            st.sampled_from(seeds),
            st.integers(0, 4096),
            st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=8),
        ),
    )


def findings(name: str) -> list[Path]:
    directory = FINDINGS / name
    return sorted(directory.iterdir()) if directory.is_dir() else []


@pytest.mark.parametrize("name", HARNESSES)
def test_seeds_and_past_findings_find_nothing(name):
    harness = HARNESSES[name]
    seeds = list(harness.seeds())
    assert seeds, "a harness without seeds would start the fuzzer from nothing"
    for data in [*seeds, *(path.read_bytes() for path in findings(name))]:
        harness.test_one_input(data)


def test_past_findings_are_kept():
    # The decoders' two findings: an NLMSG_ERROR with errno INT_MIN (os.strerror overflowed),
    # and an entry whose tuples are IPv4 one way and IPv6 the other (its SNAT pool's label
    # could not be decoded, in the scanner's thread).
    assert [path.name for path in findings("netlink")] == [
        "error-code-int-min",
        "nat-pool-tuples-of-two-families",
    ]


@pytest.mark.parametrize("name", HARNESSES)
def test_a_short_run_finds_nothing(name):
    harness = HARNESSES[name]

    @settings(
        max_examples=EXAMPLES[name],
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(inputs(list(harness.seeds())))
    def run(data: bytes) -> None:
        harness.test_one_input(data)

    run()


# -- the harnesses report what they must ------------------------------------------------------


def a_socket_message() -> bytes:
    return (
        ROOT / "tests" / "fixtures" / "netlink" / "sockdiag_tcp4_listen_unfiltered.bin"
    ).read_bytes()


def test_netlink_harness_reports_an_error_a_decoder_must_not_raise(monkeypatch):
    def planted(buf, msg):
        raise IndexError("planted")

    monkeypatch.setattr(fuzz.netlink, "local_port", planted)
    with pytest.raises(IndexError, match="planted"):
        fuzz.netlink.test_one_input(a_socket_message())


def test_netlink_harness_reports_a_decoder_reading_past_the_datagram(monkeypatch):
    # The socket's buffer holds old bytes past each datagram: a result must not depend on them.
    monkeypatch.setattr(fuzz.netlink, "error_code", lambda buf, msg: bytes(buf[msg.end :][:4]))
    with pytest.raises(AssertionError, match="bytes past the datagram changed a result"):
        fuzz.netlink.test_one_input(a_socket_message())


def test_procfs_harness_reports_an_error_other_than_value_error(monkeypatch):
    monkeypatch.setattr(fuzz.procfs, "PARSERS", (lambda text: {}[text],))
    with pytest.raises(KeyError):
        fuzz.procfs.test_one_input(b"TCP: inuse 1\n")


def test_config_harness_reports_an_error_other_than_config_error(monkeypatch):
    def planted(path):
        raise TypeError("planted")

    monkeypatch.setattr(fuzz.config, "LOADERS", (planted,))
    with pytest.raises(TypeError, match="planted"):
        fuzz.config.test_one_input(b"log: {level: info}\n")


@pytest.mark.parametrize("name", HARNESSES)
def test_the_atheris_entry_point_runs(name, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", f"fuzz.{name}", "-runs=200"],
        cwd=ROOT,
        env={"FUZZ_WORK": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # libFuzzer runs every seed first, then new inputs up to -runs if the seeds were fewer.
    done = re.search(r"^Done (\d+) runs", result.stderr, re.MULTILINE)
    assert done and int(done.group(1)) >= 200, result.stderr
    assert any((tmp_path / name / "corpus").iterdir())


# -- what the config harness found: files the loader cannot read are configuration errors ----


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"log:\n  level: \xff\n", id="not-utf8"),
        pytest.param(b"[" * 2000, id="nested-2000-deep"),
        pytest.param(b"a:\n" + b"".join(b" " * i + b"b:\n" for i in range(1, 1500)), id="deep-map"),
    ],
)
def test_a_config_file_the_loader_cannot_read_is_a_config_error(tmp_path, content):
    path = tmp_path / "config.yml"
    path.write_bytes(content)
    with pytest.raises(fuzz.config.ConfigError):
        load_config(str(path))
