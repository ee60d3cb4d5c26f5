"""An emulated network link, to see what SAMPa's overlap buys once messages cost time.

On one machine, points and gradients move almost for free; a real cluster pays latency and
bandwidth on every message. A :class:`Link` adds that cost where a worker receives or sends, so
it lands in the measured transfer time. :func:`link_delay_ms` is the same arithmetic without an
object, for code that only predicts what a message would cost (the benchmark's tables).
"""

from __future__ import annotations

import time


def link_delay_ms(nbytes: int, latency_ms: float, gbit_s: float | None) -> float:
    """Milliseconds one message of ``nbytes`` waits on a link with ``latency_ms`` per message
    and a ``gbit_s`` bandwidth cap (None or 0: uncapped): latency + bits / bandwidth."""
    return latency_ms + (nbytes * 8 / (gbit_s * 1e9) * 1e3 if gbit_s else 0.0)


def link_delay(nbytes: int, latency_ms: float, gbit_s: float | None) -> float:
    """Seconds a worker waits for ``nbytes`` on such a link: :func:`link_delay_ms`, except
    that nothing sent (0 bytes) is no message and waits nothing."""
    if not nbytes:
        return 0.0
    return link_delay_ms(nbytes, latency_ms, gbit_s) / 1e3


class Link:
    """An emulated link: each message waits latency + bytes / bandwidth before it counts as
    delivered (applied by the receiving or sending worker, so it lands in the transfer time)."""

    def __init__(self, latency_ms: float, gbit_s: float | None) -> None:
        self.latency_ms = latency_ms
        self.gbit_s = gbit_s

    def delay(self, nbytes: int) -> float:
        """Seconds a message of ``nbytes`` waits (0 for an empty one): :func:`link_delay`."""
        return link_delay(nbytes, self.latency_ms, self.gbit_s)

    def wait(self, nbytes: int) -> None:
        """Sleep for :meth:`delay` of ``nbytes``."""
        d = self.delay(nbytes)
        if d > 0:
            time.sleep(d)


__all__ = ["Link", "link_delay", "link_delay_ms"]
