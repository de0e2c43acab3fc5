#!/usr/bin/env python3
"""Generate the `config` part of the chart's values.schema.json from the exporter's code.

The exporter's configuration is frozen dataclasses: the sections of conntrack_exporter.config
(SECTIONS) and each collector's options_type (conntrack_exporter.collectors.COLLECTORS). A
field's type hint gives its JSON type, a Literal its enum, and its Check the bound the loader
applies, so that the chart keeps no second copy to drift. The rest of values.schema.json (the
chart's own values) is left as it is. Run this after changing a field, and commit both.

    python helm/generate_schema.py            # rewrite properties.config (make schema)
    python helm/generate_schema.py --check    # exit 1 if the committed file differs (tests)

It imports the package: run it with .venv's python (`make schema` does).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parent.parent
# The package beside this script, whichever one the venv has installed: a git worktree may
# share another checkout's venv, whose editable install would point there.
sys.path.insert(0, str(ROOT))

from conntrack_exporter.collectors import COLLECTORS  # noqa: E402
from conntrack_exporter.config import (  # noqa: E402
    DISABLE_DEFAULTS,
    PORT_RANGE,
    SECONDS,
    SECTIONS,
    Check,
    ConfigurableCollector,
)

SCHEMA_FILE = ROOT / "helm" / "conntrack-exporter" / "values.schema.json"

JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}

# Keys the chart sets itself and so refuses in its config value: the address and path come from
# port and telemetryPath (as flags, which would override the file), and the web configuration
# file is the chart's to mount (webConfig).
CHART_SET = {"web": ("listen_address", "telemetry_path", "config_file")}
CONFIG_DESCRIPTION = (
    "the exporter's configuration file (config.example.yml); web.listen_address,"
    " web.telemetry_path and web.config_file are set by port, telemetryPath and webConfig"
)
SECTION_DESCRIPTIONS = {
    "web": "listen_address and telemetry_path are refused (the chart sets them from port and"
    " telemetryPath), and config_file (see webConfig)",
}
# Fields whose default the chart changes: their description says how instead.
FIELD_DESCRIPTIONS = {
    "web.unauthenticated_healthz": "the chart sets true when basic authentication is on,"
    " unless set here",
}
# What a Check's schema cannot say, appended to the description of each field it checks.
CHECK_NOTES: tuple[tuple[Check, str], ...] = (
    (PORT_RANGE, "low at most high, which the exporter checks and this schema cannot"),
    (
        SECONDS,
        "seconds, or a duration as Prometheus writes them (30s, 1m, 1h30m, 500ms); a duration"
        " longer than a day the exporter refuses and this schema cannot",
    ),
)


def config_schema(
    sections: Mapping[str, type] = SECTIONS,
    collectors: Mapping[str, ConfigurableCollector] = COLLECTORS,
) -> dict[str, Any]:
    """The JSON schema of the chart's `config` value: the configuration file's, without the
    keys the chart sets. `sections` and `collectors` are what load_config reads."""
    properties: dict[str, Any] = {
        name: _object(cls, name, CHART_SET.get(name, ()), SECTION_DESCRIPTIONS.get(name))
        for name, cls in sections.items()
    }
    collector_properties: dict[str, Any] = {
        DISABLE_DEFAULTS: {
            "type": "boolean",
            "description": "default false; true: only the collectors enabled here run",
        },
    }
    for name, collector in collectors.items():
        enabled = "default false"
        if collector.default_enabled:
            enabled = "default true (false with disable_defaults)"
        collector_properties[name] = _object(
            collector.options_type,
            f"collectors.{name}",
            extra={"enabled": {"type": "boolean", "description": enabled}},
        )
    properties["collectors"] = _closed(collector_properties)
    return _closed(properties, CONFIG_DESCRIPTION)


def _closed(properties: dict[str, Any], description: str | None = None) -> dict[str, Any]:
    """An object of these properties and no other (the loader refuses unknown keys)."""
    node: dict[str, Any] = {"type": "object", "additionalProperties": False}
    if description:
        node["description"] = description
    node["properties"] = properties
    return node


def _object(
    cls: type,
    path: str,
    skip: tuple[str, ...] = (),
    description: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A dataclass's schema: `extra` properties first (a collector's `enabled`), then its fields
    in their order, but those in `skip`."""
    fields = dataclasses.fields(cls)
    unknown = set(skip) - {f.name for f in fields}
    if unknown:
        raise ValueError(f"{path}: the chart refuses {sorted(unknown)}, which are no fields")
    hints = typing.get_type_hints(cls)
    properties = dict(extra or {})
    for f in fields:
        if f.name not in skip:
            properties[f.name] = _field(f, hints[f.name], f"{path}.{f.name}")
    return _closed(properties, description)


def _field(f: dataclasses.Field[Any], hint: Any, path: str) -> dict[str, Any]:
    node = _type(hint, path)
    check = f.metadata.get("check")
    if check is not None:
        node.update(check.schema)
    description = FIELD_DESCRIPTIONS.get(path) or _describe_default(f, check)
    if not description:
        return node
    # Right after the type, as the rest of the file has it.
    return {"type": node.pop("type"), "description": description, **node}


def _type(hint: Any, path: str) -> dict[str, Any]:
    """The schema of a type the loader reads (config._convert): a scalar, a Literal, a nested
    dataclass, tuple[X, ...] or Mapping[str, X]."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        types = {JSON_TYPES.get(type(choice)) for choice in args}
        if len(types) == 1 and None not in types:
            return {"type": types.pop(), "enum": list(args)}
    elif isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _object(hint, path)
    elif origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return {"type": "array", "items": _type(args[0], f"{path}[]")}
    elif origin is Mapping and args[:1] == (str,):
        return {"type": "object", "additionalProperties": _type(args[1], f"{path}.*")}
    elif hint in JSON_TYPES:
        return {"type": JSON_TYPES[hint]}
    raise TypeError(f"{path}: no JSON schema for {hint!r}")


def _describe_default(f: dataclasses.Field[Any], check: Check | None) -> str | None:
    parts = []
    default = _default_text(f)
    if default is not None:
        parts.append(f"default {default}")
    parts += [note for noted, note in CHECK_NOTES if check is noted]
    return "; ".join(parts) or None


def _default_text(f: dataclasses.Field[Any]) -> str | None:
    """The default as YAML would spell it; None for none, or a nested dataclass (its fields
    say theirs)."""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return None
    if dataclasses.is_dataclass(value):
        return None
    if isinstance(value, str):
        return value or '""'
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 30, not 30.0: the loader takes an integer for a number
    return json.dumps(value)


def render(text: str, config: Mapping[str, Any]) -> str:
    """values.schema.json's text with `config` as properties.config, everything else as is."""
    values_schema = json.loads(text)
    values_schema["properties"]["config"] = config
    return json.dumps(values_schema, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if the file differs"
    )
    parser.add_argument("--schema", type=Path, default=SCHEMA_FILE, help="values.schema.json")
    args = parser.parse_args(argv)
    text = args.schema.read_text()
    expected = render(text, config_schema())
    if args.check:
        if text == expected:
            return 0
        sys.stderr.write(
            f"{args.schema}: properties.config differs from the configuration's dataclasses;"
            " run make schema, then commit the file\n"
        )
        return 1
    if text != expected:
        args.schema.write_text(expected)
        sys.stdout.write(f"updated {args.schema}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
