"""Every collector the exporter knows: the collector table.

Adding one: write its module (registry.py states the contract), then list its class here.
The annotation makes mypy (`make lint`) check every class against the contract.
"""

from __future__ import annotations

from conntrack_exporter.collectors.conntrack import ConntrackCollector
from conntrack_exporter.collectors.conntrack_table import ConntrackTableCollector
from conntrack_exporter.collectors.pods import PodsCollector
from conntrack_exporter.collectors.socket import SocketCollector
from conntrack_exporter.collectors.socket_ports import SocketPortsCollector
from conntrack_exporter.registry import CollectorClass


def _table(*classes: CollectorClass) -> dict[str, CollectorClass]:
    # A typed parameter list: mypy names the class that breaks the contract, and how.
    return {cls.name: cls for cls in classes}


# In the order the scanner first runs the background ones: the pods' discovery before the
# table scan, which names pods by the addresses the discovery found.
COLLECTORS = _table(
    ConntrackCollector,
    SocketCollector,
    PodsCollector,
    ConntrackTableCollector,
    SocketPortsCollector,
)

__all__ = ["COLLECTORS"]
