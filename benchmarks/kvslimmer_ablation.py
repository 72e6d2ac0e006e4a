"""KVSlimmer ablations: which part of its merge costs quality (docs/design.md, Measurements).

Every variant keeps KVSlimmer's selection (the same disjoint adjacent pairs, chosen by the same
statistic, on the same schedule) and changes only what a selected pair becomes:

- ``kvslimmer_evict``: the pair keeps its better-scored member whole, key and value, and the
  other is dropped: the selection without the merge (every slot holds one token, so the
  statistic has no cardinality factor);
- ``kvslimmer_evict_counted``: the same, but the kept slot counts both members' tokens, as a
  merge does, so the statistic (attention × cardinality) and hence the selection evolve as
  KVSlimmer's: the merge's arithmetic without the merge;
- ``kvslimmer_kbest``: the better-scored member's key instead of the closed form (with
  ``value="attention"``: that key and the members' attention-weighted value).

The variants register as methods, so the arguments are those of ``benchmarks/quality.py``::

    python benchmarks/kvslimmer_ablation.py --tasks perplexity --methods kvslimmer_evict \\
        --budgets 0.25 --context 2048 --continuation 128 --windows 12 --dtype float32 \\
        --seed 0 --chunk-size 512 --threads 1 --out benchmarks/results/kvslimmer-2k
"""

from __future__ import annotations

import sys
from typing import ClassVar

import quality
import torch

from kvslim_fx.methods import register_method
from kvslim_fx.methods.kvslimmer import KVSlimmer


class _PairRule(KVSlimmer):
    """KVSlimmer whose merged pair takes the better-scored member's key (``best_key``) or key and
    value (``keep_best``); ``counted``: that slot still counts both members' tokens."""

    best_key: ClassVar[bool] = False
    keep_best: ClassVar[bool] = False
    counted: ClassVar[bool] = False

    def _merge_plan(self, plan, cache, first, second, do, score, alpha, out) -> None:
        super()._merge_plan(plan, cache, first, second, do, score, alpha, out)
        s_first, s_second = score.gather(2, first), score.gather(2, second)
        keep_first = (s_first > s_second).float()  # ties keep the later member, as a merge does
        best = (keep_first, 1 - keep_first)
        if self.best_key or self.keep_best:
            plan.merge.key = best
            plan.fallbacks = torch.zeros_like(do)  # the closed form's fallback no longer applies
        if self.keep_best:
            plan.merge.value = best
            if not self.counted:  # every slot keeps one token: no cardinality to add
                plan.merge.counts = False
                plan.merge.state = {"score": torch.maximum(s_first, s_second)}


@register_method
class Evict(_PairRule):
    name = "kvslimmer_evict"
    keep_best = True


@register_method
class EvictCounted(Evict):
    name = "kvslimmer_evict_counted"
    counted = True


@register_method
class BestKey(_PairRule):
    name = "kvslimmer_kbest"
    best_key = True


if __name__ == "__main__":
    quality.SCRIPT = "benchmarks/kvslimmer_ablation.py"
    sys.exit(quality.main(sys.argv[1:]))
