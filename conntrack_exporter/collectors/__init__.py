"""Every collector the exporter knows. Adding one: write its module, list its class here."""

from __future__ import annotations

from conntrack_exporter.collectors.conntrack import ConntrackCollector

COLLECTORS = {collector.name: collector for collector in (ConntrackCollector,)}

__all__ = ["COLLECTORS"]
