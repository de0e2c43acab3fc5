"""Every collector the exporter knows. Adding one: write its module, list its class here."""

from __future__ import annotations

from conntrack_exporter.collectors.conntrack import ConntrackCollector
from conntrack_exporter.collectors.conntrack_table import ConntrackTableCollector
from conntrack_exporter.collectors.socket import SocketCollector
from conntrack_exporter.collectors.socket_ports import SocketPortsCollector

COLLECTORS = {
    collector.name: collector
    for collector in (
        ConntrackCollector,
        ConntrackTableCollector,
        SocketCollector,
        SocketPortsCollector,
    )
}

__all__ = ["COLLECTORS"]
