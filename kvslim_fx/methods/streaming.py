"""``streaming`` (StreamingLLM, Xiao et al. 2023): the first ``sink`` tokens and a recent window."""

from __future__ import annotations

from .base import Method, SlotLayout


class Streaming(Method):
    """Keep the ``sink`` first tokens and the most recent ``budget - sink``; evict the oldest.

    Eviction is a ring overwrite and the attention op sees exactly the sinks plus the last
    ``budget - sink`` positions, so chunked prefill equals feeding tokens one at a time.
    """

    name = "streaming"
    default_sink = 4

    def layout(self, slots: int, window: int, layer: int = 0) -> SlotLayout:
        recent = slots - self.sink
        if 0 < window <= recent:
            # The layer's own window is the tighter bound: sinks outside it are never seen anyway.
            return SlotLayout(sink=0, ring=window, recent=0, wraps=True)
        return SlotLayout(sink=self.sink, ring=recent, recent=recent, wraps=True)
