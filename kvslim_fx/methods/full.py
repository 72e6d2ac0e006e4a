"""``full``: keep every token. Lossless; the reference every other method is measured against."""

from __future__ import annotations

from .base import Method, SlotLayout


class Full(Method):
    """Capacity = the longest sequence (or ``budget`` slots, if given); nothing is evicted."""

    name = "full"

    def layout(self, slots: int, window: int, layer: int = 0) -> SlotLayout:
        if 0 < window < slots:
            # A sliding-window layer never looks further back than its window: a ring of that size.
            return SlotLayout(sink=0, ring=window, recent=0, wraps=True)
        return SlotLayout(sink=0, ring=slots, recent=0, wraps=False)
