"""The socket_ports collector: ephemeral ports in use toward each destination.

Skeleton: filled in by the socket-pools work (issue 4).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from conntrack_exporter.checks import non_negative, positive
from conntrack_exporter.registry import Collected, CollectorContext, NoDataError


@dataclass(frozen=True)
class SocketPortsOptions:
    interval_seconds: float = field(default=30.0, metadata={"check": positive})
    # Sockets read per scan at most; 0 reads them all however many.
    max_sockets: int = field(default=1_000_000, metadata={"check": non_negative})
    # How many destinations to name in socket_ephemeral_ports_used; 0 turns that family off.
    top_k: int = field(default=10, metadata={"check": non_negative})


class SocketPortsCollector:
    name: ClassVar[str] = "socket_ports"
    default_enabled: ClassVar[bool] = True
    options_type: ClassVar[type] = SocketPortsOptions

    def __init__(self, options: SocketPortsOptions, context: CollectorContext) -> None:
        self._options = options

    @property
    def interval(self) -> float:
        return self._options.interval_seconds

    def scan(self) -> None:
        pass

    def collect(self) -> Collected:
        raise NoDataError("not implemented yet")
