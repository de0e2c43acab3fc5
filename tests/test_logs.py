"""Log lines in node_exporter's formats."""

from __future__ import annotations

import io
import json
import logging

import pytest

from conntrack_exporter.logs import setup_logging


@pytest.fixture
def stream():
    out = io.StringIO()
    yield out
    logging.getLogger().handlers.clear()


def test_logfmt_quotes_what_needs_quoting(stream):
    setup_logging("info", "logfmt", stream)
    logging.getLogger("conntrack_exporter.x").warning(
        "collector failed", extra={"collector": "conntrack", "err": 'bad "bytes" here'}
    )
    line = stream.getvalue().rstrip("\n")
    ts, rest = line.split(" ", 1)
    assert ts.startswith("ts=") and ts.endswith("Z")
    assert rest == (
        'level=warn logger=conntrack_exporter.x msg="collector failed" collector=conntrack '
        'err="bad \\"bytes\\" here"'
    )


def test_logfmt_spells_booleans_as_go_does(stream):
    setup_logging("info", "logfmt", stream)
    logging.getLogger("x").info("listening", extra={"tls": True, "basic_auth": False, "n": 1})
    assert stream.getvalue().rstrip("\n").endswith("tls=true basic_auth=false n=1")


def test_json_is_one_object_per_line(stream):
    setup_logging("debug", "json", stream)
    log = logging.getLogger("conntrack_exporter.y")
    log.debug("first", extra={"n": 1})
    log.info("second")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert {k: first[k] for k in ("level", "logger", "msg", "n")} == {
        "level": "debug",
        "logger": "conntrack_exporter.y",
        "msg": "first",
        "n": 1,
    }
    assert second["level"] == "info" and second["msg"] == "second"


def test_level_filters(stream):
    setup_logging("warn", "logfmt", stream)
    logging.getLogger("z").info("hidden")
    logging.getLogger("z").error("shown")
    assert "hidden" not in stream.getvalue() and "msg=shown" in stream.getvalue()
