"""Metric families whose fixed parts are checked once, for collectors that build them on every
scrape.

prometheus_client's constructors validate the name and build label dicts on every call, about
1.5 us a family, and its Sample's own __new__ is Python code that fills in the defaults; a
scrape builds dozens of families that are the same every time but for their values.
"""

from __future__ import annotations

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.samples import Sample

_new_metric = Metric.__new__
_new_tuple = tuple.__new__
# The fields after name, labels and value (timestamp, exemplar, ...: as many as this
# prometheus_client has), at their defaults.
_SAMPLE_DEFAULTS = tuple(Sample._field_defaults[name] for name in Sample._fields[3:])
NO_LABELS: dict[str, str] = {}


class Family:
    """A metric family's fixed parts, checked once; a fresh family per scrape costs a copy.

    Label dicts are shared between scrapes: nothing downstream writes to a sample.
    """

    def __init__(self, template: Metric) -> None:
        self._fields = template.__dict__
        # CounterMetricFamily drops "_total" from the family name; its samples carry it.
        self.sample_name = template.name + ("_total" if template.type == "counter" else "")

    def build(self, samples: list[Sample]) -> Metric:
        metric = _new_metric(Metric)
        metric.__dict__.update(self._fields)
        metric.samples = samples
        return metric

    def build_one(self, value: float) -> Metric:
        """The family with one unlabelled sample: build([sample(...)]) in one call."""
        return self.build([self.sample(NO_LABELS, value)])

    def sample(self, labels: dict[str, str], value: float) -> Sample:
        # Sample(name, labels, value), made by tuple.__new__.
        return _new_tuple(Sample, (self.sample_name, labels, value, *_SAMPLE_DEFAULTS))


def gauge(name: str, documentation: str) -> Family:
    return Family(GaugeMetricFamily(name, documentation))


def counter(name: str, documentation: str) -> Family:
    return Family(CounterMetricFamily(name, documentation))
