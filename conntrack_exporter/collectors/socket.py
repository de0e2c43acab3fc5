"""The socket collector: every kernel socket pool beside its limit, from procfs.

Skeleton: filled in by the socket-pools work (issue 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from conntrack_exporter.registry import Collected, CollectorContext, NoDataError


@dataclass(frozen=True)
class SocketOptions:
    pass


class SocketCollector:
    name: ClassVar[str] = "socket"
    default_enabled: ClassVar[bool] = True
    options_type: ClassVar[type] = SocketOptions

    def __init__(self, options: SocketOptions, context: CollectorContext) -> None:
        self._procfs = context.procfs

    def collect(self) -> Collected:
        raise NoDataError("not implemented yet")
