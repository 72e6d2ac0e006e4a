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
  ``value="attention"``: that key and the members' attention-weighted value);
- ``kvslimmer_vbest``: the closed-form key with the better-scored member's value (cardinalities
  add): the key merge without the value blend;
- ``kvslimmer_gate:gate=τ``: a pair merges only where its members' values are alike (cosine
  ``>= τ``) and keeps its better-scored member whole otherwise (cardinalities still add, as a
  merge's do): ``τ = 1`` is ``kvslimmer_evict_counted``, ``τ = -1`` is ``kvslimmer``.

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
    """KVSlimmer whose merged pair takes the better-scored member's key (``best_key``), value
    (``best_value``) or both (``keep_best``); ``counted``: a kept member's slot still counts both
    members' tokens."""

    best_key: ClassVar[bool] = False
    best_value: ClassVar[bool] = False
    keep_best: ClassVar[bool] = False
    counted: ClassVar[bool] = False

    def _merge_plan(self, plan, cache, first, second, do, score, alpha, out) -> None:
        super()._merge_plan(plan, cache, first, second, do, score, alpha, out)
        s_first, s_second = score.gather(2, first), score.gather(2, second)
        keep_first = (s_first > s_second).float()  # ties keep the later member, as a merge does
        best = (keep_first, 1 - keep_first)
        keep = self._keeps_best(cache, first, second)  # [B, H, P] the pairs that do not merge

        def pick(merged: tuple) -> tuple:
            return tuple(torch.where(keep, b, m) for b, m in zip(best, merged, strict=True))

        if self.best_key or self.keep_best:
            plan.merge.key = pick(plan.merge.key)
            plan.fallbacks = plan.fallbacks & ~keep  # the closed form's fallback does not apply
        if self.best_value or self.keep_best:
            plan.merge.value = pick(plan.merge.value)
        if self.keep_best and not self.counted:  # every slot keeps one token: no cardinality
            plan.merge.counts = False
            plan.merge.state = {"score": torch.maximum(s_first, s_second)}

    def _keeps_best(self, cache, first: Tensor, second: Tensor) -> Tensor:
        """``[B, H, P]`` bool: the pairs ``(first, second)`` that keep their better member."""
        return torch.ones_like(first, dtype=torch.bool)


@register_method
class Gate(_PairRule):
    """Merge alike pairs (value cosine ``>= gate``), keep the better member of the others."""

    name = "kvslimmer_gate"
    keep_best = True
    counted = True

    def __init__(self, *args, gate: float = 0.5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = float(gate)

    def options(self) -> dict:
        return {**super().options(), "gate": self.gate}

    def _keeps_best(self, cache, first: Tensor, second: Tensor) -> Tensor:
        values = cache.storage.values()
        at = lambda i: values.gather(2, i[..., None].expand(*i.shape, values.shape[-1])).float()  # noqa: E731
        return torch.nn.functional.cosine_similarity(at(first), at(second), dim=-1) < self.gate


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


@register_method
class BestValue(_PairRule):
    name = "kvslimmer_vbest"
    best_value = True


if __name__ == "__main__":
    quality.SCRIPT = "benchmarks/kvslimmer_ablation.py"
    sys.exit(quality.main(sys.argv[1:]))
