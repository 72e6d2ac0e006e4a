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
``LayerCache.merge_stats[1]``; ``merge_stats[0]`` counts the merged slots).

Default ``recent``: half the budget is mergeable, the rest is sinks + recent, as in the paper's
configurations (budget 1024, 4 sinks → 508 recent; 256 → 124), and at least 1: the newest
token has no right neighbour.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import KVSlimError
from .scoring import ScoreMethod, Step


class WeightedKV(ScoreMethod):
    """Evict the least-attended key, merge its value rightwards; see the module docstring."""

    name = "weightedkv"
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

    def fold(self, cache, v: Tensor, order: Tensor, drop: Tensor, step: Step) -> Tensor:
        C = cache.capacity
        values = torch.cat([cache.v[:, :, :C], v.to(cache.v.dtype)], dim=2).float()
        index = order[..., None].expand_as(values)
        merged, fallback = fold_right(values.gather(2, index), average(step), drop)
        merged = torch.empty_like(merged).scatter_(2, index, merged).to(cache.v.dtype)
        cache.v[:, :, :C] = merged[:, :, :C]
        cache.merge_stats[1] += fallback.sum().double()
        return merged[:, :, C:]


def average(step: Step) -> Tensor:
    """``ā = acc / steps``: the historical average attention (0 for a slot never seen)."""
    return step.acc / step.steps.clamp_min(1)


def fold_right(values: Tensor, weight: Tensor, drop: Tensor) -> tuple[Tensor, Tensor]:
    """Fold each run of dropped entries into the first kept entry to its right.

    ``values [B, H, N, D]``, ``weight [B, H, N]`` (non-negative), ``drop [B, H, N]``, all in
    position order; every dropped entry must have a kept entry to its right. Returns the values
    with each receiving entry replaced by ``Σ w_i v_i / Σ w_i`` over its run and itself (uniform
    weights where that sum is 0; other entries unchanged, bit for bit) and the receiving entries
    that used the uniform fallback.
    """
    kept = ~drop
    # Run id = number of kept entries before: a run of dropped entries shares its receiver's id.
    run = kept.long().cumsum(-1) - kept.long()

    def run_total(x: Tensor) -> Tensor:
        idx = run if x.dim() == 3 else run[..., None].expand_as(x)
        return torch.zeros_like(x).scatter_add_(2, idx, x).gather(2, idx)

    members = run_total(torch.ones_like(weight))
    total = run_total(weight)
    receiving = kept & (members > 1)
    fallback = receiving & (total <= 0)
    w = torch.where(total > 0, weight / torch.where(total > 0, total, 1), 1 / members)
    folded = run_total(w[..., None] * values)
    return torch.where(receiving[..., None], folded, values), fallback
