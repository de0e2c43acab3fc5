"""Running totals of the kernel's 32-bit per-CPU conntrack counters, so that a wrap is no reset.

The kernel keeps each conntrack counter per CPU as an `unsigned int` (struct ip_conntrack_stat)
that wraps at 2^32. Exported as they are, a wrap makes a counter fall by nearly 2^32, which
Prometheus reads as a reset: rate() and increase() then count the whole remaining value as new
events. Here each CPU's change since the last reading, taken modulo 2^32, is added to a total
that Python's ints never wrap. Pure: no I/O, no clock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from conntrack_exporter.netlink.ctnetlink import CpuStats

U32 = 1 << 32


class WrappingCounters:
    """Per CPU and counter: the last raw reading and a running total that only grows.

    A (CPU, counter) seen for the first time contributes its raw value. At start-up that makes
    the totals the kernel's own sum, as `conntrack -S` and node_exporter show it, so a restart
    carries on where the last run left off unless a CPU wrapped during it (then Prometheus sees
    one counter reset). A CPU first seen later is counted as the kernel's sum would count it:
    the kernel allocates the counters zeroed with the network namespace, so its raw value is
    its events since then, the same origin as every other CPU's raw value at our start.

    Between two readings a counter is assumed to advance by less than 2^32 (at a 15 s scrape
    interval, 286 million events a second on one CPU). A CPU whose row disappears keeps its
    total, and continues from its last raw value if the row comes back.

    update() itself is not thread-safe: the caller holds `lock` from taking a reading to
    accounting it, so that readings are accounted in the order they were taken. An older
    reading applied after a newer one would look like a wrap of nearly 2^32.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._last: dict[int, dict[str, int]] = {}
        self._totals: dict[int, dict[str, int]] = {}

    def update(self, rows: Iterable[CpuStats]) -> list[CpuStats]:
        """Account one reading of raw rows; return every CPU seen so far with its totals.

        Only the counters this reading has are returned (a counter absent from the reading
        stays absent from the exposition), and a CPU missing from this reading is returned all
        the same with its totals unchanged, so that the per-CPU series still add up to the sum.
        """
        present: set[str] = set()
        for cpu, counters in rows:
            last = self._last.setdefault(cpu, {})
            totals = self._totals.setdefault(cpu, {})
            for name, raw in counters.items():
                previous = last.get(name)
                advance = raw if previous is None else (raw - previous) % U32
                totals[name] = totals.get(name, 0) + advance
                last[name] = raw
            present.update(counters)
        result = []
        for cpu, totals in sorted(self._totals.items()):
            kept = {name: total for name, total in totals.items() if name in present}
            if kept:
                result.append(CpuStats(cpu, kept))
        return result

    def cpus(self) -> list[int]:
        """The CPU numbers seen so far, ascending."""
        return sorted(self._totals)
