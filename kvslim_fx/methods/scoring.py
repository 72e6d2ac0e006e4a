"""Score-based eviction, shared by ``h2o``, ``tova``, ``snapkv`` and ``weightedkv``.

These methods differ only in the score that ranks tokens (and, for WeightedKV, in what happens
to a dropped token's value). Each step, after attention, :meth:`ScoreMethod.update` looks at the
cache's ``C`` slots and the step's ``L`` new tokens as one set of ``N = C + L`` entries, in
position order (slots are unordered in memory, so the order comes from sorting positions):

1. Statistics per entry, from the attention op's ``mass`` (summed over the step's queries and
   the query heads of the KV group): ``mass`` itself, ``seen`` (how many of the step's queries
   could see the entry) and, over the entry's lifetime, ``acc`` (mass received) and ``steps``
   (queries that saw it), for the methods that keep them as slot state. A new token starts
   from this step's values; in decode (one token per step) ``steps`` counts steps attended.
2. If the entries outnumber the slots, the ``need`` lowest-scoring *eligible* entries are dropped:
   eligible = a real token that is not a sink (``pos >= sink``) and not among the ``recent``
   newest positions (``pos <= newest - recent``, the step's new tokens included). New tokens
   are candidates too, as in the reference H2O and TOVA code, which evict from the cache after
   appending the new token. So a chunk of any length fits once ``sink + recent <= budget``.
   ``per_head=False`` ranks by the score averaged over the KV heads, one selection per layer.
   On a sliding-window layer (window larger than the budget) a token that has left the window
   is never seen again, so it goes first. Ties go to the oldest entry.
3. :meth:`ScoreMethod.fold` may use the dropped entries (WeightedKV merges their values into
   their right neighbours); eviction methods just forget them.
4. Dropped slots are emptied and the kept new tokens go to the free slots
   (``LayerCache.write_free`` with per-head positions: a dropped new token is never stored).
   ``LayerCache.merge_stats[0]`` counts the dropped tokens (merged ones, for WeightedKV).

Shapes: ``[B, H_kv, N]`` per entry, ``[B, H_kv, N, D]`` for values. Everything is static-shape
tensor code (no host sync), so the update runs inside ``torch.compile(fullgraph=True)``.
Cost: one sort of ``N`` positions and one of ``N`` scores per step, ``O(N)`` statistics; the
step's ``seen`` counts compare ``N`` positions with ``L`` queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import Method, SlotLayout, non_negative

_ACCUMULATORS = {
    "acc": (torch.float32, 0.0),  # attention mass received over the slot's lifetime
    "steps": (torch.float32, 0.0),  # queries that have seen the slot over its lifetime
}


@dataclass(frozen=True)
class Step:
    """One step's entries (cached slots, then new tokens) in position order, ``[B, H_kv, N]``.

    ``acc`` and ``steps`` include this step; for a method that does not keep them as slot state
    they are this step's ``mass`` and ``seen``.
    """

    pos: Tensor  # int64 position, -1 = empty slot or pad (sorted first)
    mass: Tensor  # attention mass received this step
    seen: Tensor  # this step's queries that could see the entry
    acc: Tensor  # mass received over the entry's lifetime
    steps: Tensor  # queries that saw the entry over its lifetime
    eligible: Tensor  # bool: may be dropped (real, not a sink, not recent)


class ScoreMethod(Method):
    """Keep a budget of slots by dropping the lowest :meth:`score`; see the module docstring.

    Subclasses set ``name``, ``score`` and optionally ``accumulators`` (the lifetime statistics
    kept as slot state), ``default_recent``, ``default_per_head`` and ``fold``.
    """

    default_sink = 4
    default_per_head: ClassVar[bool] = True
    accumulators: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        budget: int | float | None = None,
        sink: int | None = None,
        recent: int | None = None,
        per_head: bool | None = None,
    ) -> None:
        super().__init__(budget, sink)
        self.recent = None if recent is None else non_negative("recent", recent)
        self.per_head = self.default_per_head if per_head is None else bool(per_head)

    def options(self) -> dict:
        return {**super().options(), "recent": self.recent, "per_head": self.per_head}

    def default_recent(self, slots: int) -> int:
        """The recent window when the user gives none (a function of the layer's slots)."""
        return 0

    def recent_for(self, slots: int) -> int:
        return self.default_recent(slots) if self.recent is None else self.recent

    def layout(self, slots: int, window: int) -> SlotLayout:
        if 0 < window <= slots:
            # A sliding layer whose window fits the budget never needs to evict.
            return SlotLayout(sink=0, ring=window, recent=0, wraps=True)
        return SlotLayout(sink=0, ring=slots, recent=0, wraps=True, merges=True)

    def slot_state(self) -> dict[str, tuple[torch.dtype, float]]:
        return {name: _ACCUMULATORS[name] for name in self.accumulators}

    def max_chunk(self, slots: int) -> int | None:
        # New tokens are candidates, so any chunk fits once the protected tokens do.
        return None if self.sink + self.recent_for(slots) <= slots else 0

    def score(self, step: Step) -> Tensor:  # pragma: no cover - abstract
        """``[B, H_kv, N]`` importance of each entry (position order); the lowest are dropped."""
        raise NotImplementedError

    def fold(self, cache, v: Tensor, order: Tensor, drop: Tensor, step: Step) -> Tensor:
        """Use the dropped entries before they go; returns the new tokens' values to store.

        ``order [B, H, N]`` sorts the entries (slots, then new tokens) by position; ``drop`` and
        ``step`` are in that order. Eviction forgets the dropped entries.
        """
        return v

    def update(self, cache, k: Tensor, v: Tensor, kv_pos: Tensor, mass: Tensor) -> None:
        C = cache.capacity
        B, H, L, _ = k.shape
        new_pos = kv_pos[:, None, :].expand(B, H, L)
        pos = torch.cat([cache.pos[:, :, :C], new_pos], dim=2)  # [B, H, N]
        mass = torch.cat([mass[..., :C], mass[..., C + 1 :]], dim=2)  # trash slot out
        seen = _seen(pos, kv_pos, cache.site.window)
        lifetime = {"acc": mass, "steps": seen}
        for name in self.accumulators:
            lifetime[name] = lifetime[name] + _pad(getattr(cache, name)[:, :, :C], L)

        order = pos.argsort(dim=-1, stable=True)  # empty slots and pads first
        sp = pos.gather(2, order)
        newest = sp[..., -1:]
        eligible = (sp >= self.sink) & (sp <= newest - self.recent_for(C))
        step = Step(
            sp, mass.gather(2, order), seen.gather(2, order),
            lifetime["acc"].gather(2, order), lifetime["steps"].gather(2, order), eligible,
        )  # fmt: skip
        score = self.score(step)
        if cache.site.window > 0:
            score = torch.where(newest - sp >= cache.site.window, -torch.inf, score)
        if not self.per_head:
            score = score.mean(dim=1, keepdim=True).expand_as(score)
        need = ((pos >= 0).sum(-1, keepdim=True) - C).clamp_min(0)  # [B, H, 1]
        ranked = torch.where(eligible, score, torch.inf).argsort(dim=-1, stable=True)
        rank = torch.empty_like(ranked).scatter_(2, ranked, _arange_like(ranked))
        drop = eligible & (rank < need)

        v = self.fold(cache, v, order, drop, step)
        dropped = torch.zeros_like(drop).scatter_(2, order, drop)  # back to slot order
        gone = dropped[..., :C]
        cache.pos[:, :, :C].masked_fill_(gone, -1)
        for name in self.accumulators:
            getattr(cache, name)[:, :, :C] = torch.where(gone, 0.0, lifetime[name][..., :C])
        cache.merge_stats[0] += drop.sum().double()
        kept_pos = torch.where(dropped[..., C:], -1, new_pos)
        state = {name: lifetime[name][..., C:] for name in self.accumulators}
        cache.write_free(k, v, kept_pos, state)


def _seen(pos: Tensor, q_pos: Tensor, window: int) -> Tensor:
    """How many queries ``q_pos [B, L]`` see each entry ``pos [B, H, N]`` (attend's rule)."""
    q = q_pos[:, None, None, :]
    p = pos[..., None]
    vis = (q >= 0) & (p >= 0) & (p <= q)
    if window > 0:
        vis = vis & (q - p < window)
    return vis.sum(-1).float()


def _pad(x: Tensor, n: int) -> Tensor:
    """``x`` followed by ``n`` zeros along the last dimension."""
    return torch.cat([x, x.new_zeros(*x.shape[:-1], n)], dim=-1)


def _arange_like(x: Tensor) -> Tensor:
    return torch.arange(x.shape[-1], device=x.device).expand_as(x)
