"""Reading exposition text back into values, for assertions."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def parse_samples(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{sample name: {sorted label pairs: value}}."""
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


def stat_counters(samples: dict) -> dict[str, float]:
    """conntrack_stat_<name>_total values, keyed by <name>, summed over any cpu label."""
    prefix, suffix = "conntrack_stat_", "_total"
    return {
        name[len(prefix) : -len(suffix)]: sum(series.values())
        for name, series in samples.items()
        if name.startswith(prefix) and name.endswith(suffix)
    }


def sources(samples: dict, collector: str) -> list[str]:
    """The `source` labels conntrack_exporter_source_info gives the collector (one, normally)."""
    return [
        dict(labels)["source"]
        for labels, value_ in samples.get("conntrack_exporter_source_info", {}).items()
        if dict(labels).get("collector") == collector and value_ == 1
    ]


def scan_errors(samples: dict, prefix: str) -> dict[str, float]:
    """`<prefix>_scan_errors_total` by reason."""
    series = samples[f"{prefix}_scan_errors_total"]
    return {dict(labels)["reason"]: count for labels, count in series.items()}


def assert_scan_refused(samples: dict, prefix: str) -> None:
    """No series of the scan's but its errors, which say it was refused, once."""
    families = [name for name in samples if name.startswith(f"{prefix}_")]
    assert families == [f"{prefix}_scan_errors_total"], families
    errors = scan_errors(samples, prefix)
    assert errors.pop("permission") == 1 and set(errors.values()) == {0}, errors
