"""``weightedkv`` (Yuan et al., ICASSP 2025): drop a key, merge its value into the right neighbour.

Per KV head (the query heads of a group aggregated), each slot accumulates the attention mass
it receives (``acc``) and the number of queries that saw it (``steps``; steps attended, in
decode). Once the cache is full, the slot with the lowest average attention ``ā = acc / steps``
outside the sinks and the ``recent`` newest positions loses its key, and its value is folded into
its right neighbour in position order::

    v_{j+1} ← (ā_j v_j + ā_{j+1} v_{j+1}) / (ā_j + ā_{j+1})

The neighbour keeps its own key, ``acc`` and ``steps``; no cardinality is tracked (paper
Algorithm 1), and keys are never modified. Freeing one slot per step is the paper's rule; a step
that must free ``k`` slots (a chunk of ``k`` tokens) drops the ``k`` lowest at once, and a
maximal run of adjacent dropped slots folds into the first kept slot to its right with weights
``∝ ā`` (convex, every value accounted for; for ``k = 1`` exactly the paper's pair formula).
A chunk's own tokens outside the recent window are candidates too (``scoring``), so a long
prefill chunk holds the budget by folding within itself as well.
Weights of a run whose ``ā`` all vanish fall back to uniform (counted in
``LayerCache.merge_stats[1]``; ``merge_stats[0]`` counts the merged slots). The folding itself is
``scoring``'s (``fold_right``; in decode, ``kvslim::select_one``: an ``O(C)`` argmin and
neighbour search, then one ``O(D)`` row merge by the storage, no sort); this file gives the
score and the weights.

Default ``recent``: half the budget is mergeable, the rest is sinks + recent, as in the paper's
configurations (budget 1024, 4 sinks → 508 recent; 256 → 124), and at least 1: the newest
token has no right neighbour.
"""

from __future__ import annotations

from torch import Tensor

from ..errors import KVSlimError
from .scoring import ScoreMethod, Step


class WeightedKV(ScoreMethod):
    """Evict the least-attended key, merge its value rightwards; see the module docstring."""

    name = "weightedkv"
    combines_rows = True
    accumulators = ("acc", "steps")

    def __init__(
        self,
        budget: int | float | None = None,
        sink: int | None = None,
        recent: int | None = None,
        per_head: bool = True,
    ) -> None:
        super().__init__(budget, sink, recent, per_head)
        if self.recent == 0:
            raise KVSlimError(
                "weightedkv needs recent >= 1: the newest token has no right neighbour"
            )

    def default_recent(self, slots: int) -> int:
        return max(1, slots - slots // 2 - self.sink)

    def score(self, step: Step) -> Tensor:
        return average(step)

    def fold_weight(self, step: Step) -> Tensor:
        return average(step)


def average(step: Step) -> Tensor:
    """``ā = acc / steps``: the historical average attention (0 for a slot never seen)."""
    return step.acc / step.steps.clamp_min(1)
