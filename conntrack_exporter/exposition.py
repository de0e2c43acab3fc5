"""The scrape body: our metric families in the format the scraper asked for.

prometheus_client escapes every HELP string one character at a time on every scrape, which
costs more than reading the kernel does. The HELP, TYPE and UNIT lines of a family never change
between scrapes, so they are rendered once, by prometheus_client itself, and reused; sample
lines are rendered here by the same rules. Any family this module would not render exactly as
prometheus_client does (exemplars, timestamps, native histograms, `_created` samples, names
outside the legacy character set) is rendered by prometheus_client, and so is every format
this module does not know, so the output is byte for byte prometheus_client's.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Literal, Protocol

from prometheus_client.exposition import choose_encoder
from prometheus_client.exposition import generate_latest as text_generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.utils import floatToGoString, parse_version

# prometheus_client leaves names in the legacy character set alone under these escaping
# schemes; "dots" and "values" rewrite every name, so those go to prometheus_client whole.
_NAME_PRESERVING_ESCAPINGS = frozenset({openmetrics.UNDERSCORES, openmetrics.ALLOWUTF8})
# No colon: prometheus_client renders OpenMetrics sample names with the label-name rules.
_is_plain_name = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*").fullmatch
# Only the families of a fixed set of collectors pass through here; the cap guards against a
# collector that puts changing text into HELP.
_MAX_CACHED_HEADERS = 1024
# Label sets seen recently. Top-K families bring new addresses as the top changes: the cap
# bounds memory, and clearing it only costs a scrape the rendering it did before the cache.
_MAX_CACHED_PREFIXES = 8192
_EOF = "# EOF\n"


class SupportsCollect(Protocol):
    def collect(self) -> Iterable[Metric]: ...


Encoder = Callable[[SupportsCollect], bytes]
Format = Literal["text", "openmetrics"]


class _Families:
    """A registry-shaped wrapper, to hand prometheus_client's encoders some families."""

    def __init__(self, *metrics: Metric) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self._metrics)


# (content type, name, type, HELP, unit) -> the family's header lines; None when the family's
# name needs prometheus_client's escaping. Dict reads and writes are atomic under the GIL, and a
# race only renders the same header twice.
_headers: dict[tuple[str, str, str, str, str], str | None] = {}
# (sample name, label items) -> "name{labels} "; None when a label name needs the library.
_prefixes: dict[tuple[str, tuple[tuple[str, str], ...]], str | None] = {}


def encode(collector: SupportsCollect, accept: str) -> tuple[bytes, str]:
    """Collect once and encode for the Accept header: the body and its content type."""
    encoder, content_type = choose_encoder(accept)
    fmt = _lean_format(encoder)
    if fmt is None:
        return encoder(collector), content_type
    out: list[str] = []
    for metric in collector.collect():
        header = _header(encoder, content_type, metric, fmt)
        lines = None if header is None else _sample_lines(metric)
        if header is None or lines is None:
            out.append(_render(encoder, metric, fmt))
        else:
            out.append(header)
            out += lines
    if fmt == "openmetrics":
        out.append(_EOF)
    return "".join(out).encode(), content_type


def _lean_format(encoder: Encoder) -> Format | None:
    """The format this module renders for the encoder, or None to leave it to the library.

    choose_encoder returns its encoders bare or as functools.partial with keyword options.
    """
    function = getattr(encoder, "func", encoder)
    options = getattr(encoder, "keywords", {})
    if options.get("escaping", openmetrics.UNDERSCORES) not in _NAME_PRESERVING_ESCAPINGS:
        return None
    if function is text_generate_latest:
        return "text"
    # OpenMetrics 2.0 is still moving in prometheus_client: leave it to the library.
    version = parse_version(options.get("version", "1.0.0"))
    if function is openmetrics.generate_latest and version < (2,):
        return "openmetrics"
    return None


def _header(encoder: Encoder, content_type: str, metric: Metric, fmt: Format) -> str | None:
    key = (content_type, metric.name, metric.type, metric.documentation, metric.unit)
    try:
        return _headers[key]
    except KeyError:
        pass
    header = None
    if _is_plain_name(metric.name):
        bare = copy.copy(metric)
        bare.samples = []
        header = _render(encoder, bare, fmt)
    if len(_headers) >= _MAX_CACHED_HEADERS:
        _headers.clear()
    _headers[key] = header
    return header


def _render(encoder: Encoder, metric: Metric, fmt: Format) -> str:
    """One family as prometheus_client renders it, without the OpenMetrics end marker."""
    text = encoder(_Families(metric)).decode()
    return text.removesuffix(_EOF) if fmt == "openmetrics" else text


def _sample_lines(metric: Metric) -> list[str] | None:
    """The family's sample lines, or None unless every one is `name{labels} value` and nothing
    else, which both formats render alike."""
    if metric.type == "counter":
        expected = metric.name + "_total"
    elif metric.type == "gauge":
        expected = metric.name
    else:
        return None
    lines = []
    # Unpacked rather than read by attribute: the scrape's hottest loop. Samples have grown a
    # sixth field (native_histogram) over prometheus_client's versions; `rest` takes any more.
    for name, labels, value, timestamp, exemplar, *rest in metric.samples:
        if (
            name != expected
            or value is None
            or timestamp is not None
            or exemplar is not None
            or rest.count(None) != len(rest)
        ):
            return None
        if not labels:
            lines.append(f"{name} {_format_value(value)}\n")
            continue
        prefix = _prefix(name, labels)
        if prefix is None:
            return None
        lines.append(f"{prefix}{_format_value(value)}\n")
    return lines


def _prefix(name: str, labels: dict[str, str]) -> str | None:
    """`name{labels} ` for a labelled sample, or None when a label name needs the library.

    Label sets repeat from scrape to scrape (a CPU, a protocol, a top-K address): escaping and
    joining them once, not per sample per scrape, halves the cost of a labelled sample.
    """
    key = (name, tuple(labels.items()))
    try:
        return _prefixes[key]
    except KeyError:
        pass
    prefix = None
    if all(_is_plain_name(label) for label in labels):
        pairs = ",".join(f'{label}="{_escape(labels[label])}"' for label in sorted(labels))
        prefix = f"{name}{{{pairs}}} "
    if len(_prefixes) >= _MAX_CACHED_PREFIXES:
        _prefixes.clear()
    _prefixes[key] = prefix
    return prefix


def _format_value(value: float) -> str:
    number = float(value)
    # floatToGoString returns repr() for every value but infinities, NaN and positive values of
    # 1e6 or more (Go's exponent form); skip its checks for the common case.
    if -math.inf < number < 1e6:
        return repr(number)
    return floatToGoString(number)


def _escape(value: str) -> str:
    # The same replacements, in the same order, as prometheus_client's label value escaping.
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
