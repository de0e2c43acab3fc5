"""Configuration: YAML file and command-line flags validated into frozen dataclasses.

Precedence: flags > file > defaults. Every problem is collected before failing, each with
where it came from (`file:line` or the flag), so that one run shows everything to fix.

The loader is handed the collector table (`load_config(..., collectors=COLLECTORS)`): it reads
each collector's `default_enabled` and `options_type` and knows nothing else of them, so that
loading a configuration never imports the netlink stack.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

import yaml

T = TypeVar("T")

# A day: longer timeouts and intervals are mistakes, and infinite ones crash the waits on them.
MAX_SECONDS = 86400.0
# 1 to 65535 as a regular expression, for the JSON schema of a port range.
_PORT = "([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
PORT_RANGE_PATTERN = f"{_PORT}-{_PORT}"


@dataclass(frozen=True)
class Check:
    """A field's value check: `field(metadata={"check": SECONDS})`.

    `problem(value)` says what is wrong, or None. `schema` states the same bound in JSON
    schema, from which the Helm chart's values schema is generated: the two cannot drift.
    `parse`, if set, reads the value as written before its type is checked (a duration's
    "1m30s" into seconds), raising ValueError to say what is wrong.
    """

    problem: Callable[[Any], str | None]
    schema: Mapping[str, Any]
    parse: Callable[[Any], Any] | None = None


# Durations as Prometheus writes them (its model.ParseDuration): whole numbers with units,
# largest first, each at most once: 30s, 1m, 1h30m, 500ms.
DURATION_UNITS = (
    ("y", 365 * 86400_000),
    ("w", 7 * 86400_000),
    ("d", 86400_000),
    ("h", 3600_000),
    ("m", 60_000),
    ("s", 1000),
    ("ms", 1),
)  # in milliseconds
DURATION_PATTERN = "".join(f"([0-9]+{unit})?" for unit, _ in DURATION_UNITS)
_DURATION = re.compile("".join(f"(?:([0-9]+){unit})?" for unit, _ in DURATION_UNITS))


def parse_duration(text: str) -> float:
    """Seconds in a duration ("1h30m" is 5400.0); ValueError if it is none."""
    match = _DURATION.fullmatch(text)
    if not text or match is None:
        raise ValueError(text)
    milliseconds = sum(
        int(count) * unit
        for count, (_, unit) in zip(match.groups(), DURATION_UNITS, strict=True)
        if count
    )
    return milliseconds / 1000


def _parse_seconds(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except ValueError:
            pass
    elif isinstance(value, int | float) and not isinstance(value, bool):
        return value
    raise ValueError(
        f"expected a number of seconds or a duration such as 30s, 1m, 1h30m or 500ms, got {value!r}"
    )


def _seconds(value: float) -> str | None:
    if 0 < value <= MAX_SECONDS:
        return None
    return f"must be greater than 0 and at most {MAX_SECONDS:g} seconds, got {value!r}"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else f"must be 0 or more, got {value!r}"


def _port_range(value: str) -> str | None:
    # The schema's own pattern (no leading zeros, ASCII digits only), then what no pattern
    # can say: low at most high.
    if re.fullmatch(PORT_RANGE_PATTERN, value):
        low, _, high = value.partition("-")
        if int(low) <= int(high):
            return None
    return f"expected a port range like 1024-65535, got {value!r}"


def _absolute_path(value: str) -> str | None:
    return None if value.startswith("/") else f"must be an absolute path, got {value!r}"


def _listen_address(value: str) -> str | None:
    try:
        parse_listen_address(value)
    except ValueError as exc:
        return str(exc)
    return None


def _telemetry_path(value: str) -> str | None:
    if not value.startswith("/") or value in ("/", "/healthz"):
        return f"must be an absolute path other than / and /healthz, got {value!r}"
    return None


# A timeout or an interval: positive and finite, at most a day; a number of seconds or a
# duration. JSON schema applies the bounds to numbers and the patterns to strings: a duration
# with a digit other than 0 (so neither "" nor "0s"); how long it is, it cannot check.
SECONDS = Check(
    _seconds,
    {
        "type": ["number", "string"],
        "exclusiveMinimum": 0,
        "maximum": MAX_SECONDS,
        "pattern": f"^{DURATION_PATTERN}$",
        "allOf": [{"pattern": "[1-9]"}],
    },
    _parse_seconds,
)
NON_NEGATIVE = Check(_non_negative, {"minimum": 0})
# Low-high; that low is at most high, JSON schema cannot say (the loader does).
PORT_RANGE = Check(_port_range, {"pattern": f"^{PORT_RANGE_PATTERN}$"})
ABSOLUTE_PATH = Check(_absolute_path, {"pattern": "^/"})
LISTEN_ADDRESS = Check(_listen_address, {"pattern": ":[0-9]+$"})
TELEMETRY_PATH = Check(_telemetry_path, {"pattern": "^/", "not": {"enum": ["/", "/healthz"]}})


def parse_listen_address(address: str) -> tuple[str, int]:
    """Split `host:port`, `[v6]:port` or `:port` (all interfaces) into host and port."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port with a port from 1 to 65535, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"an IPv6 address needs brackets, as in [::1]:9371, got {address!r}")
    return host, int(port)


@dataclass(frozen=True)
class WebConfig:
    listen_address: str = field(default=":9371", metadata={"check": LISTEN_ADDRESS})
    telemetry_path: str = field(default="/metrics", metadata={"check": TELEMETRY_PATH})
    # exporter-toolkit's web configuration file (TLS, basic authentication); "" for none.
    config_file: str = ""
    # Places in the scrape queue (server.py), a client address at most a quarter; 0: no limit.
    max_requests: int = field(default=40, metadata={"check": NON_NEGATIVE})
    # Open connections at most; 0 for no limit.
    max_connections: int = field(default=512, metadata={"check": NON_NEGATIVE})
    read_timeout_seconds: float = field(default=10.0, metadata={"check": SECONDS})
    unauthenticated_healthz: bool = False


@dataclass(frozen=True)
class LogConfig:
    level: Literal["debug", "info", "warn", "error"] = "info"
    format: Literal["logfmt", "json"] = "logfmt"


@dataclass(frozen=True)
class PathConfig:
    procfs: str = field(default="/proc", metadata={"check": ABSOLUTE_PATH})


@dataclass(frozen=True)
class NetlinkConfig:
    timeout_seconds: float = field(default=2.0, metadata={"check": SECONDS})


class ConfigurableCollector(Protocol):
    """What the loader reads of a collector class (registry.CollectorClass has more)."""

    default_enabled: bool
    options_type: type


@dataclass(frozen=True)
class CollectorConfig:
    enabled: bool
    options: Any


@dataclass(frozen=True)
class Config:
    web: WebConfig = WebConfig()
    log: LogConfig = LogConfig()
    path: PathConfig = PathConfig()
    netlink: NetlinkConfig = NetlinkConfig()
    collectors: Mapping[str, CollectorConfig] = field(default_factory=dict)

    @property
    def enabled_collectors(self) -> list[str]:
        return [name for name, settings in self.collectors.items() if settings.enabled]


SECTIONS = {"web": WebConfig, "log": LogConfig, "path": PathConfig, "netlink": NetlinkConfig}
DISABLE_DEFAULTS = "disable_defaults"


class ConfigError(Exception):
    """The configuration has problems; `problems` lists each with its location."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


_LINE = re.compile(r":([0-9]+)$")


def _order(location: str) -> tuple[int, int]:
    """Where a location sorts: the file's own problems (`file`) first, then by line
    (`file:line`), then the flags' (`flag --name`)."""
    if location.startswith("flag "):
        return (1, 0)
    line = _LINE.search(location)
    return (0, int(line.group(1)) if line else 0)


@dataclass
class Validation:
    """Problems found so far, and where each dotted key came from."""

    locations: dict[str, str]
    source: str
    failed: set[str] = field(default_factory=set)
    _found: list[tuple[str, str]] = field(default_factory=list)  # (location, problem)

    @property
    def problems(self) -> list[str]:
        """Every problem, by line (the flags' last); those of one line in the order found."""
        found = sorted(self._found, key=lambda item: _order(item[0]))
        return [problem for _, problem in found]

    def problem(self, path: str, message: str) -> None:
        where = self._where(path)
        self._found.append((where, f"{where}: {path}: {message}"))
        self.failed.add(path)

    def given(self, path: str) -> bool:
        """Whether the file or a flag set this key."""
        return path in self.locations

    def raise_problems(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)

    def _where(self, path: str) -> str:
        # A key that is missing has no line of its own: name the line of its section.
        while path:
            if path in self.locations:
                return self.locations[path]
            path = path.rpartition(".")[0]
        return self.source


def load_config(
    file: str | None = None,
    flags: Mapping[str, tuple[str, Any]] | None = None,
    collectors: Mapping[str, ConfigurableCollector] | None = None,
) -> Config:
    """Build the configuration from a YAML file and flag values.

    `flags` maps a dotted key (`web.listen_address`) to (flag name, value). `collectors` is
    the collector table (collectors.COLLECTORS): the keys `collectors.NAME.*` it allows.
    """
    data: dict[str, Any] = {}
    locations: dict[str, str] = {}
    if file is not None:
        data, locations = _read_yaml(file)
    for path, (flag, value) in (flags or {}).items():
        _set_path(data, path, value)
        locations[path] = f"flag {flag}"
    validation = Validation(locations, file or "flags")
    config = _build_config(data, collectors or {}, validation)
    validation.raise_problems()
    return config


def read_dataclass(cls: type[T], file: str) -> tuple[T, Validation]:
    """`cls` built from a YAML file whose top level holds its fields, and the problems found.

    Problems are collected, not raised, so that the caller can add the checks that need more
    than one key or the file system, then call `raise_problems()`.
    """
    data, locations = _read_yaml(file)
    validation = Validation(locations, file)
    return _build_dataclass(cls, data, "", validation), validation


def _read_yaml(file: str) -> tuple[dict[str, Any], dict[str, str]]:
    try:
        with open(file, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read: {exc.strerror}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError([f"{file}:{line}: not UTF-8 text (byte {exc.start})"]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
        if data is None:
            return {}, {}
        if not isinstance(data, dict):
            problem = f"expected a mapping at the top level, got {_describe(data)}"
            where = f"{file}:{node.start_mark.line + 1}" if node is not None else file
            raise ConfigError([f"{where}: {problem}"])
        locations: dict[str, str] = {}
        if node is not None:  # None only for an empty document, returned above
            _index_locations(node, "", file, locations)
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_problem(file, text, exc)]) from None
    except RecursionError:
        # PyYAML composes recursively: thousands of nested brackets exhaust the stack.
        raise ConfigError([f"{file}: nested too deeply to read"]) from None
    return data, locations


def _yaml_problem(file: str, text: str, exc: yaml.YAMLError) -> str:
    """A YAML error as `file:line: not valid YAML: what (where on the line, and the context)`,
    as every other problem is located; PyYAML's own text spans lines and names no file."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        message = f"{exc.problem} at column {mark.column + 1}"
        context = exc.context_mark
        if exc.context and context is not None and context.line != mark.line:
            message += f" ({exc.context} at line {context.line + 1}, column {context.column + 1})"
        elif exc.context:
            message += f" ({exc.context})"
        return f"{file}:{mark.line + 1}: not valid YAML: {message}"
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        return (
            f"{file}:{line}: not valid YAML: unacceptable character #x{exc.character:04x}: "
            f"{exc.reason}"
        )
    return f"{file}: not valid YAML: {exc}"


def _index_locations(node: yaml.Node, path: str, file: str, out: dict[str, str]) -> None:
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            out[f"{path}[{index}]"] = f"{file}:{item.start_mark.line + 1}"
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        child = _child(path, key_node.value)
        out[child] = f"{file}:{key_node.start_mark.line + 1}"
        _index_locations(value_node, child, file, out)


def _child(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _set_path(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for key in parents:
        child = data.get(key)
        if not isinstance(child, dict):
            child = data[key] = {}
        data = child
    data[leaf] = value


def _build_config(
    data: dict[str, Any], table: Mapping[str, ConfigurableCollector], validation: Validation
) -> Config:
    _unknown_keys(data, [*SECTIONS, "collectors"], "", validation)
    sections = {
        name: _build_dataclass(cls, data.get(name, {}), name, validation)
        for name, cls in SECTIONS.items()
    }
    collectors = _build_collectors(data.get("collectors", {}), table, validation)
    return Config(**sections, collectors=collectors)


def _build_collectors(
    data: Any, table: Mapping[str, ConfigurableCollector], validation: Validation
) -> dict[str, CollectorConfig]:
    if not _is_mapping(data, "collectors", validation):
        data = {}
    _unknown_keys(data, [DISABLE_DEFAULTS, *table], "collectors", validation)
    disable_defaults = _convert(
        bool, data.get(DISABLE_DEFAULTS, False), f"collectors.{DISABLE_DEFAULTS}", validation
    )
    result = {}
    for name, collector in table.items():
        path = f"collectors.{name}"
        section = data.get(name, {})
        if not _is_mapping(section, path, validation):
            section = {}
        default = collector.default_enabled and not disable_defaults
        enabled = _convert(bool, section.get("enabled", default), f"{path}.enabled", validation)
        options = {key: value for key, value in section.items() if key != "enabled"}
        result[name] = CollectorConfig(
            enabled=bool(enabled),
            options=_build_dataclass(
                collector.options_type, options, path, validation, ("enabled",)
            ),
        )
    return result


def _build_dataclass(
    cls: type, data: Any, path: str, validation: Validation, extra_keys: tuple[str, ...] = ()
) -> Any:
    if not _is_mapping(data, path, validation):
        return cls()
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    _unknown_keys(data, [*(f.name for f in fields), *extra_keys], path, validation)
    values = {}
    for f in fields:
        if f.name not in data:
            continue
        field_path = _child(path, f.name)
        written = data[f.name]
        check = f.metadata.get("check")
        parse = check.parse if check is not None else None
        if parse is not None:
            try:
                written = parse(written)
            except ValueError as exc:
                validation.problem(field_path, str(exc))
                continue
        value = _convert(hints[f.name], written, field_path, validation)
        message = check.problem(value) if check is not None and value is not None else None
        if message and parse is not None and isinstance(data[f.name], str):
            message += f" ({data[f.name]!r})"  # the duration as written
        if message:
            validation.problem(field_path, message)
        elif value is not None:
            values[f.name] = value
    return cls(**values)


def _convert(expected: Any, value: Any, path: str, validation: Validation) -> Any:
    """The value if it has the expected type (an int is a fine float), else None and a problem.

    Besides scalars: a Literal's choices, a nested dataclass (a mapping of its fields), a
    `tuple[X, ...]` (a list) and a `Mapping[str, X]`.
    """
    origin = typing.get_origin(expected)
    if origin is Literal:
        choices = typing.get_args(expected)
        if value in choices:
            return value
        validation.problem(path, f"expected one of {', '.join(map(str, choices))}, got {value!r}")
        return None
    if isinstance(expected, type) and dataclasses.is_dataclass(expected):
        return _build_dataclass(expected, value, path, validation)
    if origin is tuple:
        return _convert_list(typing.get_args(expected)[0], value, path, validation)
    if origin is Mapping:
        return _convert_mapping(typing.get_args(expected)[1], value, path, validation)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    validation.problem(path, f"expected {_TYPE_NAMES[expected]}, got {value!r}")
    return None


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def _convert_list(item_type: Any, value: Any, path: str, validation: Validation) -> Any:
    if not isinstance(value, list):
        validation.problem(path, f"expected a list, got {value!r}")
        return None
    items = [
        _convert(item_type, item, f"{path}[{index}]", validation)
        for index, item in enumerate(value)
    ]
    return None if None in items else tuple(items)


def _convert_mapping(value_type: Any, value: Any, path: str, validation: Validation) -> Any:
    """The entries that convert: each is checked on its own, so that a bad entry hides no
    problem of another (each entry that fails is a problem already)."""
    if not _is_mapping(value, path, validation):
        return None
    result = {}
    for key, item in value.items():
        item_path = _child(path, key)
        if not isinstance(key, str):
            validation.problem(item_path, f"expected a string key, got {key!r}")
            continue
        converted = _convert(value_type, item, item_path, validation)
        if converted is not None:
            result[key] = converted
    return result


def _is_mapping(data: Any, path: str, validation: Validation) -> bool:
    if isinstance(data, dict):
        return True
    validation.problem(path, f"expected a mapping, got {_describe(data)}")
    return False


def _unknown_keys(
    data: Mapping[str, Any], known: list[str], path: str, validation: Validation
) -> None:
    for key in data:
        if key not in known:
            message = f"unknown key; expected one of {', '.join(known)}"
            validation.problem(_child(path, key), message)


def _describe(value: Any) -> str:
    return "a list" if isinstance(value, list) else repr(value)
