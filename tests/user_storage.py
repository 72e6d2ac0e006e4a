"""A storage as a user writes one outside the library, with state shared by a group of layers.

``tally``: dense rows, and each pair of layers shares a :class:`Tally` of the tokens they stored
(what a cross-layer storage such as xKV keeps per group, in miniature); ``tally-hook`` also
copies the tally when the prompt ends (the prompt-end hook). ``full`` stores each real token
once per layer, so a group of two layers counts every fed token twice.
"""

from __future__ import annotations

import torch

import kvslim_fx
from kvslim_fx.storage import Dense


class Tally(torch.nn.Module):
    """A group's state: tokens its layers stored ``[B]``, and that count when the prompt ended."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("stored", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("at_prompt_end", torch.zeros(0, dtype=torch.long), persistent=False)


@kvslim_fx.register_storage
class Grouped(Dense):
    """Dense rows; layers ``2i`` and ``2i + 1`` share a :class:`Tally`."""

    name = "tally"

    def __init__(self, site, rope=None, **base) -> None:
        super().__init__(site, rope, **base)
        self.shared_state(site.layer // 2, Tally)

    def allocate(self, batch, rows, dtype, device) -> None:
        super().allocate(batch, rows, dtype, device)
        for name in ("stored", "at_prompt_end"):
            setattr(self.shared, name, torch.zeros(batch, dtype=torch.long, device=device))

    def write(self, slot, k, v) -> None:
        super().write(slot, k, v)
        if k is not None:  # a new token's first write (the trash row takes padding)
            trash = self.k.shape[2] - 1
            self.shared.stored += (slot[:, 0] < trash).sum(-1)


@kvslim_fx.register_storage
class MarksThePrompt(Grouped):
    name = "tally-hook"

    def end_prompt(self, pos) -> None:
        self.shared.at_prompt_end.copy_(self.shared.stored)
