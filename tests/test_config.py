"""Configuration: every kind of error, all of them at once, with their locations."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import pytest

from conntrack_exporter.collectors import COLLECTORS
from conntrack_exporter.config import (
    SECONDS,
    SECTIONS,
    Config,
    ConfigError,
    parse_listen_address,
    read_dataclass,
)
from conntrack_exporter.config import load_config as load_with_table

# As the exporter loads it: with its collector table.
load_config = partial(load_with_table, collectors=COLLECTORS)
DEFAULT_COLLECTORS = [name for name, cls in COLLECTORS.items() if cls.default_enabled]

EXAMPLE = Path(__file__).parent.parent / "config.example.yml"


def problems_of(tmp_path: Path, text: str, flags: dict | None = None) -> list[str]:
    file = tmp_path / "config.yml"
    file.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(str(file), flags)
    return [problem.replace(str(file), "FILE") for problem in caught.value.problems]


def test_example_config_is_the_defaults():
    assert load_config(str(EXAMPLE)) == load_config(None)
    config = load_config(None)
    assert config.web.listen_address == ":9371"
    assert config.web.telemetry_path == "/metrics"
    assert config.enabled_collectors == DEFAULT_COLLECTORS
    assert len(DEFAULT_COLLECTORS) >= 4
    assert config.collectors["conntrack"].options.per_cpu is False


def test_empty_file_means_defaults(tmp_path):
    (tmp_path / "empty.yml").write_text("")
    assert load_config(str(tmp_path / "empty.yml")) == load_config(None) != Config()


@pytest.mark.parametrize(
    ("text", "parsed"),
    [(".inf", "inf"), ("1.0e+300", "1e+300"), ("86401", "86401.0"), ("0", "0.0")],
)
def test_timeouts_and_intervals_must_be_finite_and_at_most_a_day(tmp_path, text, parsed):
    # An infinite or astronomical interval crashed the scanner's wait (OverflowError).
    text = f"collectors:\n  socket_ports:\n    interval_seconds: {text}\n"
    assert problems_of(tmp_path, text) == [
        f"FILE:3: collectors.socket_ports.interval_seconds: must be greater than 0 and at most "
        f"86400 seconds, got {parsed}"
    ]


def seconds_keys() -> list[str]:
    """Every key the SECONDS check guards, in the sections and every collector's options."""
    classes = {**SECTIONS, **{f"collectors.{n}": c.options_type for n, c in COLLECTORS.items()}}
    return [
        f"{path}.{option.name}"
        for path, cls in classes.items()
        for option in dataclasses.fields(cls)
        if option.metadata.get("check") is SECONDS
    ]


def nested(key: str, value: str) -> str:
    """`a.b.c: value` as YAML."""
    *parents, leaf = key.split(".")
    lines = [f"{'  ' * depth}{name}:" for depth, name in enumerate(parents)]
    return "\n".join([*lines, f"{'  ' * len(parents)}{leaf}: {value}"]) + "\n"


def test_every_key_in_seconds_takes_a_duration(tmp_path):
    keys = seconds_keys()
    assert len(keys) >= 7  # web, netlink, and each scanning collector's
    file = tmp_path / "config.yml"
    for key in keys:
        file.write_text(nested(key, "1m30s"))
        config = load_config(str(file))
        section, *rest = key.split(".")
        if section == "collectors":
            name, option = rest
            assert getattr(config.collectors[name].options, option) == 90.0, key
        else:
            assert getattr(getattr(config, section), rest[0]) == 90.0, key


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("30s", 30.0),
        ("1m", 60.0),
        ("1h30m", 5400.0),
        ("500ms", 0.5),
        ("1m30s500ms", 90.5),
        ("1d", 86400.0),
        ("24h", 86400.0),
        ("0h1s", 1.0),
        ("30", 30.0),  # plain numbers, as before
        ("0.25", 0.25),
    ],
)
def test_durations_as_prometheus_writes_them(tmp_path, written, seconds):
    file = tmp_path / "config.yml"
    file.write_text(f"collectors:\n  socket_ports:\n    interval_seconds: {written}\n")
    assert load_config(str(file)).collectors["socket_ports"].options.interval_seconds == seconds


EXPECTED_DURATION = "expected a number of seconds or a duration such as 30s, 1m, 1h30m or 500ms"


@pytest.mark.parametrize(
    ("written", "problem"),
    [
        ("'30'", f"{EXPECTED_DURATION}, got '30'"),  # a string needs its unit
        ("1.5s", f"{EXPECTED_DURATION}, got '1.5s'"),  # whole numbers only, as Prometheus
        ("1s1m", f"{EXPECTED_DURATION}, got '1s1m'"),  # largest first
        ("1h1h", f"{EXPECTED_DURATION}, got '1h1h'"),
        ("30sec", f"{EXPECTED_DURATION}, got '30sec'"),
        ("-1s", f"{EXPECTED_DURATION}, got '-1s'"),
        ("1 m", f"{EXPECTED_DURATION}, got '1 m'"),
        ("''", f"{EXPECTED_DURATION}, got ''"),
        ("true", f"{EXPECTED_DURATION}, got True"),
        ("[30s]", f"{EXPECTED_DURATION}, got ['30s']"),
        ("0s", "must be greater than 0 and at most 86400 seconds, got 0.0 ('0s')"),
        ("2d", "must be greater than 0 and at most 86400 seconds, got 172800.0 ('2d')"),
        ("24h1ms", "must be greater than 0 and at most 86400 seconds, got 86400.001 ('24h1ms')"),
    ],
)
def test_bad_durations_are_located(tmp_path, written, problem):
    text = f"web: {{}}\ncollectors:\n  conntrack_table:\n    interval_seconds: {written}\n"
    assert problems_of(tmp_path, text) == [
        f"FILE:4: collectors.conntrack_table.interval_seconds: {problem}"
    ]


def test_the_exporter_runs_with_durations(tmp_path):
    file = tmp_path / "config.yml"
    file.write_text(
        "web:\n  read_timeout_seconds: 5s\nnetlink:\n  timeout_seconds: 1500ms\n"
        "collectors:\n  disable_defaults: true\n  socket:\n    enabled: true\n"
        "  socket_ports:\n    enabled: true\n    interval_seconds: 1m\n"
        "    scan_timeout_seconds: 1m30s\n"
    )
    result = run_cli("--config.file", str(file), "--once")
    assert result.returncode == 0, result.stderr
    assert 'conntrack_exporter_collector_success{collector="socket_ports"} 1.0' in result.stdout


def test_wrong_type_is_located(tmp_path):
    text = "collectors:\n  conntrack:\n    per_cpu: yes please\n"
    assert problems_of(tmp_path, text) == [
        "FILE:3: collectors.conntrack.per_cpu: expected a boolean, got 'yes please'"
    ]


def test_every_problem_is_listed_at_once(tmp_path):
    text = (
        "web:\n"
        "  listen_address: 9371\n"  # line 2: not a string
        "  telemetry_path: metrics\n"  # line 3: not absolute
        "  tls: true\n"  # line 4: unknown key
        "log:\n"
        "  level: verbose\n"  # line 6: not a choice
        "netlink:\n"
        "  timeout_seconds: -1\n"  # line 8: not positive
        "collectors:\n"
        "  conntrak: {}\n"  # line 10: unknown collector
        "  conntrack:\n"
        "    enabled: 1\n"  # line 12: not a boolean
        "    per_cpu: [true]\n"  # line 13: not a boolean
        "extra: 1\n"  # line 14: unknown top-level key
    )
    # By line, whatever the order they were found in (unknown keys first).
    assert problems_of(tmp_path, text) == [
        "FILE:2: web.listen_address: expected a string, got 9371",
        "FILE:3: web.telemetry_path: must be an absolute path other than / and /healthz, "
        "got 'metrics'",
        "FILE:4: web.tls: unknown key; expected one of listen_address, telemetry_path, "
        "config_file, max_requests, max_connections, read_timeout_seconds, "
        "unauthenticated_healthz",
        "FILE:6: log.level: expected one of debug, info, warn, error, got 'verbose'",
        "FILE:8: netlink.timeout_seconds: must be greater than 0 and at most 86400 seconds, "
        "got -1.0",
        "FILE:10: collectors.conntrak: unknown key; expected one of disable_defaults, "
        + ", ".join(COLLECTORS),
        "FILE:12: collectors.conntrack.enabled: expected a boolean, got 1",
        "FILE:13: collectors.conntrack.per_cpu: expected a boolean, got [True]",
        "FILE:14: extra: unknown key; expected one of web, log, path, netlink, collectors",
    ]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("- a\n- b\n", "FILE:1: expected a mapping at the top level, got a list"),
        ("# a comment\n\n3\n", "FILE:3: expected a mapping at the top level, got 3"),
        ("web: [1]\n", "FILE:1: web: expected a mapping, got a list"),
        ("collectors: 3\n", "FILE:1: collectors: expected a mapping, got 3"),
        (
            "collectors:\n  conntrack: true\n",
            "FILE:2: collectors.conntrack: expected a mapping, got True",
        ),
        (
            "web:\n  listen_address: localhost\n",
            "FILE:2: web.listen_address: expected host:port with a port from 1 to 65535, "
            "got 'localhost'",
        ),
        (
            "web:\n  telemetry_path: /healthz\n",
            "FILE:2: web.telemetry_path: must be an absolute path other than / and /healthz, "
            "got '/healthz'",
        ),
        ("log:\n  format: text\n", "FILE:2: log.format: expected one of logfmt, json, got 'text'"),
    ],
)
def test_each_kind_of_error(tmp_path, text, problem):
    assert problems_of(tmp_path, text) == [problem]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "log:\n  level: a: b\n",
            "FILE:2: not valid YAML: mapping values are not allowed here at column 11",
        ),
        (
            "web:\n  listen_address: ':1'\n   telemetry_path: /m\n",
            "FILE:3: not valid YAML: expected <block end>, but found '<block mapping start>' at "
            "column 4 (while parsing a block mapping at line 2, column 3)",
        ),
        (
            "web:\n  read_timeout_seconds: 5\n log: {}\n",
            "FILE:3: not valid YAML: expected <block end>, but found '<block mapping start>' at "
            "column 2 (while parsing a block mapping at line 1, column 1)",
        ),
        (
            "collectors: {socket: {enabled: true}\n\n",
            "FILE:3: not valid YAML: expected ',' or '}', but got '<stream end>' at column 1 "
            "(while parsing a flow mapping at line 1, column 13)",
        ),
        (
            "log:\n  level: 'debug\n",
            "FILE:3: not valid YAML: found unexpected end of stream at column 1 (while scanning "
            "a quoted scalar at line 2, column 10)",
        ),
        (
            "log:\n\tlevel: debug\n",
            "FILE:2: not valid YAML: found character '\\t' that cannot start any token at column "
            "1 (while scanning for the next token)",
        ),
        (
            "web: {}\nlog: !custom {}\n",
            "FILE:2: not valid YAML: could not determine a constructor for the tag '!custom' at "
            "column 6",
        ),
        (
            "web: {}\nlog:\n  level: de\x01bug\n",
            "FILE:3: not valid YAML: unacceptable character #x0001: special characters are not "
            "allowed",
        ),
    ],
)
def test_yaml_syntax_errors_say_file_and_line(tmp_path, text, problem):
    assert problems_of(tmp_path, text) == [problem]


def test_text_that_is_not_utf8_says_its_line(tmp_path):
    file = tmp_path / "config.yml"
    file.write_bytes(b"web: {}\nlog:\n  level: d\xe9bug\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(file))
    assert caught.value.problems == [f"{file}:3: not UTF-8 text (byte 23)"]  # from 0


def test_cli_exits_2_on_a_yaml_syntax_error_with_its_line(tmp_path):
    file = tmp_path / "bad.yml"
    file.write_text("collectors:\n  socket:\n    enabled: true\n  - pods\n")
    result = run_cli("--config.file", str(file), "--once")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "conntrack-exporter: invalid configuration (1 problem):\n"
        f"  {file}:4: not valid YAML: expected <block end>, but found '-' at column 3 (while "
        "parsing a block mapping at line 2, column 3)\n"
    )


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(str(tmp_path / "missing.yml"))
    assert caught.value.problems == [
        f"{tmp_path}/missing.yml: cannot read: No such file or directory"
    ]


def test_flags_override_the_file(tmp_path):
    file = tmp_path / "config.yml"
    file.write_text("web:\n  listen_address: 127.0.0.1:1000\n  telemetry_path: /m\n")
    config = load_config(str(file), {"web.listen_address": ("--web.listen-address", ":2000")})
    assert config.web.listen_address == ":2000"
    assert config.web.telemetry_path == "/m"


def test_flag_errors_name_the_flag(tmp_path):
    problems = problems_of(
        tmp_path,
        "web:\n  listen_address: ':1'\n",
        {"web.listen_address": ("--web.listen-address", "[::1]")},
    )
    assert problems == [
        "flag --web.listen-address: web.listen_address: expected host:port with a port from "
        "1 to 65535, got '[::1]'"
    ]


def test_disable_defaults_keeps_only_explicit_collectors(tmp_path):
    disabled = load_config(
        None, {"collectors.disable_defaults": ("--collector.disable-defaults", True)}
    )
    assert disabled.enabled_collectors == []
    file = tmp_path / "config.yml"
    file.write_text("collectors:\n  disable_defaults: true\n  conntrack:\n    enabled: true\n")
    assert load_config(str(file)).enabled_collectors == ["conntrack"]
    off = load_config(
        str(file), {"collectors.conntrack.enabled": ("--no-collector.conntrack", False)}
    )
    assert off.enabled_collectors == []


@dataclass(frozen=True)
class Inner:
    names: tuple[str, ...] = ()
    mode: Literal["a", "b"] = "a"


@dataclass(frozen=True)
class Outer:
    """Every shape the loader reads beside scalars: nested, lists, string maps."""

    inner: Inner = Inner()
    users: Mapping[str, str] = field(default_factory=dict)
    count: int = 1


def test_nested_dataclasses_lists_and_maps(tmp_path):
    file = tmp_path / "outer.yml"
    file.write_text("inner:\n  names: [x, y]\n  mode: b\nusers:\n  alice: one\ncount: 2\n")
    value, validation = read_dataclass(Outer, str(file))
    assert value == Outer(Inner(("x", "y"), "b"), {"alice": "one"}, 2)
    assert validation.problems == []
    assert validation.given("inner.mode") and not validation.given("inner.extra")


def test_problems_inside_lists_and_maps_are_located(tmp_path):
    file = tmp_path / "outer.yml"
    file.write_text(
        "inner:\n"
        "  names:\n"
        "    - x\n"
        "    - 3\n"  # 4: not a string
        "  mode: c\n"  # 5: not a choice
        "  extra: 1\n"  # 6: unknown
        "users:\n"
        "  alice: [1]\n"  # 8: not a string
        "  bob: fine\n"
        "  7: x\n"  # 10: not a string key
        "count: two\n"  # 11: not an integer
    )
    value, validation = read_dataclass(Outer, str(file))
    assert [problem.replace(str(file), "FILE") for problem in validation.problems] == [
        "FILE:4: inner.names[1]: expected a string, got 3",
        "FILE:5: inner.mode: expected one of a, b, got 'c'",
        "FILE:6: inner.extra: unknown key; expected one of names, mode",
        "FILE:8: users.alice: expected a string, got [1]",
        "FILE:10: users.7: expected a string key, got 7",
        "FILE:11: count: expected an integer, got 'two'",
    ]
    # A bad entry hides no other: the ones that convert are there for further checks.
    assert value.users == {"bob": "fine"}
    assert validation.failed >= {"inner.names[1]", "users.alice"}
    with pytest.raises(ConfigError):
        validation.raise_problems()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("inner: [1]\n", "FILE:1: inner: expected a mapping, got a list"),
        ("inner:\n  names: x\n", "FILE:2: inner.names: expected a list, got 'x'"),
        ("users: 3\n", "FILE:1: users: expected a mapping, got 3"),
    ],
)
def test_wrong_shapes(tmp_path, text, problem):
    file = tmp_path / "outer.yml"
    file.write_text(text)
    _value, validation = read_dataclass(Outer, str(file))
    assert [p.replace(str(file), "FILE") for p in validation.problems] == [problem]


def test_a_missing_key_is_located_at_its_section(tmp_path):
    file = tmp_path / "outer.yml"
    file.write_text("count: 2\ninner:\n  mode: a\n")
    _value, validation = read_dataclass(Outer, str(file))
    validation.problem("inner.names", "required here")
    validation.problem("users.alice", "required here")
    # The file's own problems (no line) come first.
    assert [p.replace(str(file), "FILE") for p in validation.problems] == [
        "FILE: users.alice: required here",
        "FILE:2: inner.names: required here",
    ]


@pytest.mark.parametrize(
    ("address", "parsed"),
    [(":9371", ("", 9371)), ("127.0.0.1:80", ("127.0.0.1", 80)), ("[::1]:9371", ("::1", 9371))],
)
def test_listen_addresses(address, parsed):
    assert parse_listen_address(address) == parsed


@pytest.mark.parametrize("address", ["9371", ":0", ":65536", "::1:9371", "host:", "host:x"])
def test_bad_listen_addresses(address):
    with pytest.raises(ValueError, match=r"expected host:port|needs brackets"):
        parse_listen_address(address)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "conntrack_exporter", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_exits_2_listing_every_problem(tmp_path):
    file = tmp_path / "bad.yml"
    file.write_text("web:\n  listen_address: 1\nlog:\n  level: loud\n")
    result = run_cli("--config.file", str(file), "--web.telemetry-path", "nope", "--once")
    assert result.returncode == 2
    assert result.stdout == ""
    # The file's by line, then the flags'.
    assert result.stderr == (
        "conntrack-exporter: invalid configuration (3 problems):\n"
        f"  {file}:2: web.listen_address: expected a string, got 1\n"
        f"  {file}:4: log.level: expected one of debug, info, warn, error, got 'loud'\n"
        "  flag --web.telemetry-path: web.telemetry_path: must be an absolute path other "
        "than / and /healthz, got 'nope'\n"
    )


def test_max_requests_flag(tmp_path):
    file = tmp_path / "config.yml"
    file.write_text("web:\n  max_requests: 5\n")
    assert load_config(str(file)).web.max_requests == 5
    flags = {"web.max_requests": ("--web.max-requests", 0)}
    assert load_config(str(file), flags).web.max_requests == 0
    result = run_cli("--web.max-requests", "-1", "--once")
    assert result.returncode == 2
    assert "flag --web.max-requests: web.max_requests: must be 0 or more, got -1" in result.stderr
    assert run_cli("--web.max-requests", "many", "--once").returncode == 2


def test_cli_usage_errors_exit_2():
    result = run_cli("--log.level", "loud")
    assert result.returncode == 2
    assert "invalid choice: 'loud'" in result.stderr


def test_help_explains_every_flag():
    help_text = run_cli("--help").stdout
    for flag in [
        "--web.listen-address",
        "--web.telemetry-path",
        "--config.file",
        "--collector.conntrack",
        "--no-collector.conntrack",
        "--collector.disable-defaults",
        "--log.level",
        "--log.format",
        "--path.procfs",
        "--web.config.file",
        "--web.max-requests",
        "--once",
        "--version",
    ]:
        assert flag in help_text
    assert "(default ':9371')" in help_text


# -- the loader is handed the collector table ----------------------------------------------


@dataclass(frozen=True)
class SampleOptions:
    interval_seconds: float = field(default=5.0, metadata={"check": SECONDS})


class SampleCollector:
    """Only what the loader reads of a collector class."""

    default_enabled = False
    options_type = SampleOptions


def test_the_collector_keys_come_from_the_table_it_is_handed(tmp_path):
    table = {"sample": SampleCollector}
    file = tmp_path / "config.yml"
    file.write_text("collectors:\n  sample:\n    enabled: true\n    interval_seconds: 2\n")
    config = load_with_table(str(file), collectors=table)
    assert config.enabled_collectors == ["sample"]
    assert config.collectors["sample"].options == SampleOptions(2.0)
    file.write_text("collectors:\n  sample:\n    interval_seconds: 0\n  socket: {}\n")
    with pytest.raises(ConfigError) as caught:
        load_with_table(str(file), collectors=table)
    assert [p.replace(str(file), "FILE") for p in caught.value.problems] == [
        "FILE:3: collectors.sample.interval_seconds: must be greater than 0 and at most "
        "86400 seconds, got 0.0",
        "FILE:4: collectors.socket: unknown key; expected one of disable_defaults, sample",
    ]


def test_loading_a_configuration_imports_no_collector_and_no_netlink():
    code = (
        "import sys, conntrack_exporter.config\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('conntrack_exporter'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert loaded == ["conntrack_exporter", "conntrack_exporter.config"]
