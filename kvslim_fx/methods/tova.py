"""``tova`` (Token Omission Via Attention, Oren et al. 2024): drop what the newest query ignores.

Score: the attention the step's newest query gives each token, averaged over the layer's heads
(the reference ``TOVACache`` averages over heads and selects once per layer:
``per_head=False``; ranked by the sum over heads, which orders like the mean). The new token
itself is a candidate, and no recent window protects anything by default (``recent=0``; the
sinks are kept).

Approximation: the attention op reports mass summed over the step's queries, so for a chunk of
``L > 1`` tokens the score is each token's mean attention over the chunk's queries that could
see it (``mass / seen``). In decode (one token per step) that is exactly the newest query's,
and so is a ``prefill="full"`` prompt's one compression (the prompt's last query only: averaged
over more of the prompt's last queries, the score lost the pass key of the needle test).
"""

from __future__ import annotations

from torch import Tensor

from .scoring import ScoreMethod, Step


class TOVA(ScoreMethod):
    """Evict the token with the lowest attention from the newest query; see the module docstring."""

    name = "tova"
    default_per_head = False
    observe = 1  # prefill="full": the newest query is TOVA's

    def score(self, step: Step) -> Tensor:
        return step.mass / step.seen.clamp_min(1)
