"""``h2o`` (Heavy-Hitter Oracle, Zhang et al. 2023): keep the heavy hitters and a recent window.

Score: the attention mass a token has received over its lifetime in the cache (``acc``), summed
over every query that saw it and the query heads of its KV group, as the reference
``H2OKVCache`` accumulates it. When the cache overflows, the lowest-``acc`` tokens outside the
sinks and the ``recent`` newest positions are evicted, per KV head. Default ``recent =
budget // 2`` (H2O's half heavy, half recent split; the sinks come out of the heavy half).
"""

from __future__ import annotations

from torch import Tensor

from .scoring import ScoreMethod, Step


class H2O(ScoreMethod):
    """Evict the token with the least accumulated attention; see the module docstring."""

    name = "h2o"
    accumulators = ("acc",)

    def default_recent(self, slots: int) -> int:
        return min(slots // 2, slots - self.sink)

    def score(self, step: Step) -> Tensor:
        return step.acc
