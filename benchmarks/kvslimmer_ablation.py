"""KVSlimmer ablations: which part of its merge costs quality (docs/design.md, Merging methods).

Every variant keeps KVSlimmer's selection (the same disjoint adjacent pairs, chosen by the same
statistic, on the same schedule) and changes only what a selected pair becomes:

- ``kvslimmer_evict``: the pair keeps its better-scored member whole, key and value, and the
  other is dropped: the selection without the merge;
- ``kvslimmer_attv``: the closed-form key; the value is the members' attention-weighted mean
  (weights: the selection statistic, every member counted) instead of the cardinality mean;
- ``kvslimmer_kbest_attv``: the better-scored member's key and the attention-weighted value.

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
from torch import Tensor

from kvslim_fx.methods import register_method
from kvslim_fx.methods.kvslimmer import KVSlimmer


class _PairRule(KVSlimmer):
    """KVSlimmer with another key rule (``"closed_form"`` or ``"best"``: the better-scored
    member's) and value rule (``"cardinality"``, ``"attention"`` or ``"best"``)."""

    key_rule: ClassVar[str] = "closed_form"
    value_rule: ClassVar[str] = "cardinality"

    def _merge_plan(self, plan, cache, first, second, do, score, alpha, out) -> None:
        super()._merge_plan(plan, cache, first, second, do, score, alpha, out)
        s_first, s_second = score.gather(2, first), score.gather(2, second)
        keep_first = (s_first > s_second).float()  # ties keep the later member, as a merge does
        best = (keep_first, 1 - keep_first)
        if self.key_rule == "best":
            plan.merge.key = best
        if self.value_rule == "best":
            plan.merge.value = best
            # Nothing merges, so every slot keeps one token: no cardinality to add.
            plan.merge.counts = False
            plan.merge.state = {"score": torch.maximum(s_first, s_second)}
            plan.fallbacks = torch.zeros_like(do)
        elif self.value_rule == "attention":
            total = s_first + s_second
            w: Tensor = torch.where(total > 0, s_first / total.clamp_min(1e-30), 0.5)
            plan.merge.value = (w, 1 - w)


@register_method
class Evict(_PairRule):
    name = "kvslimmer_evict"
    key_rule = "best"
    value_rule = "best"


@register_method
class AttentionValue(_PairRule):
    name = "kvslimmer_attv"
    value_rule = "attention"


@register_method
class BestKeyAttentionValue(_PairRule):
    name = "kvslimmer_kbest_attv"
    key_rule = "best"
    value_rule = "attention"


if __name__ == "__main__":
    quality.SCRIPT = "benchmarks/kvslimmer_ablation.py"
    sys.exit(quality.main(sys.argv[1:]))
