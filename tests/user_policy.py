"""A token policy as a user writes one outside the library: registered, then used by name.

``decayed``: H2O's accumulated attention, halved every ``half_life`` positions of age, so old
heavy hitters fade. The README shows the same policy.
"""

from __future__ import annotations

import torch
from torch import Tensor

import kvslim_fx
from kvslim_fx.methods.scoring import ScoreMethod, Step


@kvslim_fx.register_method
class Decayed(ScoreMethod):
    """Evict the slot with the least decayed attention, outside the sinks and a recent window."""

    name = "decayed"
    accumulators = ("acc",)  # attention received over the slot's lifetime, kept by the cache

    def __init__(self, budget=None, sink=None, recent=None, per_head=None, half_life=64.0) -> None:
        super().__init__(budget, sink, recent, per_head)
        self.half_life = float(half_life)

    def default_recent(self, slots: int) -> int:
        return slots // 4

    def score(self, step: Step) -> Tensor:
        age = (step.pos.amax(dim=-1, keepdim=True) - step.pos).float()
        return step.acc * torch.exp2(-age / self.half_life)

    def options(self) -> dict:
        return {**super().options(), "half_life": self.half_life}
