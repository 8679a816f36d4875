"""The schedule: the order a forward runs its streamed units in, learned from the previous forward, and
what to prefetch after each unit.

Pure Python. The order starts as the plan's and is replaced by the trace of each forward that ran
differently (VACE blocks run interleaved with the main blocks, possibly several times). It wraps
around, so the units after the last one are the first ones of the next forward (CFG runs two
forwards a step): their copies start while the last unit computes.
"""
from __future__ import annotations

from typing import List


class Schedule:
    def __init__(self, num_units: int):
        self.order: List[int] = list(range(num_units))
        self.trace: List[int] = []  # units of the forward running now, in order
        self._pos = 0  # where in ``order`` the forward is

    def begin(self) -> None:
        self.trace.clear()
        self._pos = 0

    def ran(self, index: int) -> None:
        """Unit ``index`` runs now (bounded even if no forward ever ends)."""
        if len(self.trace) < 4 * len(self.order) + 16:
            self.trace.append(index)

    def finish(self) -> bool:
        """End the forward; learn its order. True when the order changed."""
        changed = bool(self.trace) and self.trace != self.order
        if changed:
            self.order = list(self.trace)
        self.begin()
        return changed

    def boundary(self, index: int) -> bool:
        """Without begin/end calls (a forward that bypasses the wrapper, e.g. ComfyUI's CausalWan
        under SamplerARVideo): a new forward starts when the first unit of the learned order comes
        again after a whole order's worth of units ran."""
        return bool(self.trace) and index == self.order[0] and len(self.trace) >= len(self.order)

    def upcoming(self, index: int, want: int) -> List[int]:
        """The next ``want`` distinct units expected after ``index`` (wrapping into the next forward)."""
        order = self.order
        try:
            p = order.index(index, self._pos)
        except ValueError:
            try:
                p = order.index(index)
            except ValueError:
                return []  # not in the learned order yet; the next forward will know it
        self._pos = p + 1
        out: List[int] = []
        n = len(order)
        for j in range(1, n):
            if len(out) >= want:
                break
            v = order[(p + j) % n]
            if v != index and v not in out:
                out.append(v)
        return out
