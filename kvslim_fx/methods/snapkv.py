"""``snapkv`` (Li et al. 2024): select by an observation window's attention, pooled over neighbours.

SnapKV scores the prompt's tokens once, by the attention of its last ``window`` queries, max-pools
the scores over ``kernel`` neighbouring positions (so a token's neighbours survive with it, which
keeps local context), and keeps the top ones plus the window itself. Here prefill is chunked and
the budget holds at every step, so the rule runs whenever the cache overflows:

* score = each token's mean attention from the step's queries that could see it
  (``mass / seen``), max-pooled over ``kernel`` neighbours in position order among the eligible
  tokens (sinks and the window do not lend their scores);
* the ``window`` newest positions (the observation window) and the sinks are never evicted.

Approximations: the observation window is the whole chunk, not its last ``window`` queries (the
attention op sums mass over the step's queries; pass ``chunk_size=window`` for the literal
window); selection repeats at every overflowing chunk instead of once at the end of the prompt,
though a prompt prefilled in one chunk gets the one-shot selection, and so does
``prefill="full"``, scored by the prompt's last ``window`` queries. SnapKV does not compress
during decode; here a decode step applies the same rule with its one query (TOVA with pooling).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import neighbour_max, non_negative, odd_kernel
from .scoring import ScoreMethod, Step


class SnapKV(ScoreMethod):
    """Pooled observation-window attention + the window itself; see the module docstring."""

    name = "snapkv"
    positional = True  # max-pooled over neighbours in position order

    def __init__(
        self,
        budget: int | float | None = None,
        sink: int | None = None,
        window: int = 32,
        kernel: int = 7,
        per_head: bool = True,
    ) -> None:
        super().__init__(budget, sink, recent=non_negative("window", window), per_head=per_head)
        self.kernel = odd_kernel(kernel)
        self.observe = max(self.recent, 1)  # prefill="full": the observation window

    def options(self) -> dict:
        return {
            "budget": self.budget,
            "sink": self.sink,
            "window": self.recent,
            "kernel": self.kernel,
            "per_head": self.per_head,
        }

    def score(self, step: Step) -> Tensor:
        now = torch.where(step.eligible, step.mass / step.seen.clamp_min(1), -torch.inf)
        # Neighbours = adjacent tokens in position order; protected ones lend no score (-inf).
        pooled = neighbour_max(now, self.kernel)
        return torch.where(step.eligible, pooled, 0.0)
