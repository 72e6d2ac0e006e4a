"""Score-based eviction, shared by ``h2o``, ``tova``, ``snapkv`` and ``weightedkv``.

These methods differ only in the score that ranks tokens (and, for WeightedKV, in the weights
that fold a dropped token's value into its right neighbour). Each step, after attention,
:meth:`ScoreMethod.plan` looks at the cache's ``C`` slots and the step's ``L`` new tokens as
one set of ``N = C + L`` entries and returns a plan (``kvslim_fx.plan``) for the cache:

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
   ``per_head=False`` ranks by the score summed over the KV heads (``head_total``: the mean's
   ranking), one selection per layer; every head then holds the same positions in the same
   slots. On a sliding-window layer (window larger than the budget) a token that has left the
   window is never seen again, so it goes first. Ties go to the oldest entry.
3. With :meth:`ScoreMethod.fold_weight` (WeightedKV), each run of dropped entries (adjacent in
   position order) is folded into the first kept entry to its right, with weights ``∝`` the
   fold weight (:func:`fold_right`); eviction methods just forget the dropped entries.
4. Dropped slots are emptied and the kept new tokens go to the free slots, lowest first; a
   dropped new token is never stored. ``LayerCache.merge_stats`` counts the dropped tokens
   (merged ones, for WeightedKV) and the folds that fell back to uniform weights.

Two paths compute exactly the same result:

* **decode** (:meth:`ScoreMethod.plan_one`, one new token): at most one entry goes, chosen by
  ``kvslim::select_one`` (``kernels/eviction.py``): an ``O(C)`` argmin over scalars, an ``O(C)``
  reduction for the right neighbour; the plan touches the two or three slots that change. The
  accumulators get ``O(C)`` elementwise updates. Only a score that looks at neighbours in
  position order (``positional``: SnapKV's pooling) sorts the ``C + 1`` positions first.
* **general** (a chunk, or a symbolic chunk length as in a package's general step):
  the entries are sorted by position (slots are unordered in memory), ranked by a second sort,
  and a fold rewrites the cache's values as a whole: ``O(N log N)`` scalars and ``O(N·D)``
  values.

Shapes: ``[B, H_kv, N]`` per entry, ``[B, H_kv, N, D]`` for values. Everything is static-shape
tensor code (no host sync), so planning runs inside ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..kernels.eviction import head_total
from ..plan import Fold, Merge, Plan
from .base import Method, SlotLayout, non_negative, rank

_ACCUMULATORS = {
    "acc": (torch.float32, 0.0),  # attention mass received over the slot's lifetime
    "steps": (torch.float32, 0.0),  # queries that have seen the slot over its lifetime
}


@dataclass(frozen=True)
class Step:
    """One step's entries (cached slots, then new tokens), ``[B, H_kv, N]`` each.

    In position order, except in the decode path of a method whose score is elementwise (not
    ``positional``), which scores the entries in slot order. ``acc`` and ``steps`` include this
    step; for a method that does not keep them as slot state they are this step's ``mass`` and
    ``seen``.
    """

    pos: Tensor  # int64 position, -1 = empty slot or pad
    mass: Tensor  # attention mass received this step
    seen: Tensor  # this step's queries that could see the entry
    acc: Tensor  # mass received over the entry's lifetime
    steps: Tensor  # queries that saw the entry over its lifetime
    eligible: Tensor  # bool: may be dropped (real, not a sink, not recent)


class ScoreMethod(Method):
    """Keep a budget of slots by dropping the lowest :meth:`score`; see the module docstring.

    Subclasses set ``name``, ``score`` and optionally ``accumulators`` (the lifetime statistics
    kept as slot state), ``default_recent``, ``default_per_head``, ``positional`` and
    ``fold_weight``.
    """

    default_sink = 4
    default_per_head: ClassVar[bool] = True
    accumulators: ClassVar[tuple[str, ...]] = ()
    # The score of an entry depends on its neighbours in position order (not elementwise).
    positional: ClassVar[bool] = False

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

    def layout(self, slots: int, window: int, layer: int = 0) -> SlotLayout:
        if 0 < window <= slots:
            # A sliding layer whose window fits the budget never needs to evict.
            return SlotLayout(sink=0, ring=window, recent=0, wraps=True)
        return SlotLayout(sink=0, ring=slots, recent=0, wraps=True, merges=True)

    def slot_state(self) -> dict[str, tuple[torch.dtype, float]]:
        return {name: _ACCUMULATORS[name] for name in self.accumulators}

    def floor(self, slots: int) -> int:
        return self.sink + self.recent_for(slots) + 1

    def max_chunk(self, slots: int) -> int | None:
        # New tokens are candidates, so any chunk fits once the protected tokens do.
        return None if self.sink + self.recent_for(slots) <= slots else 0

    def score(self, step: Step) -> Tensor:  # pragma: no cover - abstract
        """``[B, H_kv, N]`` importance of each entry; the lowest are dropped."""
        raise NotImplementedError

    def fold_weight(self, step: Step) -> Tensor | None:
        """``[B, H_kv, N]`` non-negative weights for folding dropped values rightwards; None:
        dropped entries are forgotten (eviction)."""
        return None

    def _entries(self, cache, k: Tensor, kv_pos: Tensor, mass: Tensor) -> tuple:
        """The step's entries (slots, then new tokens): positions, mass, seen and the lifetime
        statistics including this step, ``[B, H, C + L]`` each."""
        C = cache.capacity
        B, H, L, _ = k.shape
        pos = torch.cat([cache.pos[:, :, :C], kv_pos[:, None, :].expand(B, H, L)], dim=2)
        mass = torch.cat([mass[..., :C], mass[..., C + 1 :]], dim=2)  # trash slot out
        seen = _seen(pos, kv_pos, cache.site.window)
        lifetime = {"acc": mass, "steps": seen}
        for name in self.accumulators:
            lifetime[name] = lifetime[name] + _pad(getattr(cache, name)[:, :, :C], L)
        return pos, mass, seen, lifetime

    def plan(self, cache, k: Tensor, v: Tensor, kv_pos: Tensor, mass: Tensor) -> Plan:
        pos, mass, seen, lifetime = self._entries(cache, k, kv_pos, mass)
        return self._evict(cache, pos, mass, seen, lifetime)

    def plan_one(self, cache, k: Tensor, v: Tensor, kv_pos: Tensor, mass: Tensor) -> Plan:
        """Decode: drop at most one entry, chosen by ``kvslim::select_one``; see the module
        docstring."""
        C = cache.capacity
        pos, mass, seen, lifetime = self._entries(cache, k, kv_pos, mass)
        if self.positional:  # scored in position order, handed to the op in slot order
            order = pos.argsort(dim=-1, stable=True)
            step = self._step(C, pos, mass, seen, lifetime, order)
            score, weight = self.score(step), self.fold_weight(step)
            score = torch.empty_like(score).scatter_(2, order, score)
            if weight is not None:
                weight = torch.empty_like(weight).scatter_(2, order, weight)
        else:
            step = self._step(C, pos, mass, seen, lifetime)
            score, weight = self.score(step), self.fold_weight(step)
        slot, drop, right, w_drop, w_right, fallback = torch.ops.kvslim.select_one(
            cache.pos, kv_pos, score, weight, self.sink, self.recent_for(C), cache.site.window,
            self.per_head,
        )  # fmt: skip
        plan = Plan(
            state={name: lifetime[name][..., :C] for name in self.accumulators},
            slot=slot[..., None],
            new_state={name: lifetime[name][..., C:] for name in self.accumulators},
            events=(drop >= 0).long(),
            fallbacks=fallback,
        )
        if weight is not None:  # the dropped value folds into its right neighbour
            plan.stage = True  # (which may be the new token, row C)
            plan.merge = Merge(
                src=drop.clamp_min(0)[..., None], dst=right.clamp_min(0)[..., None],
                do=(right >= 0)[..., None], value=(w_drop[..., None], w_right[..., None]),
            )  # fmt: skip
        return plan

    def prompt_plans(self, cache, slots: int) -> Iterator[Plan]:
        """Drop the lowest-scoring eligible slots down to ``slots``, this method's score computed
        from the attention of the prompt's last queries that the layer keeps (the "step"; see
        ``Method.observe``); lifetime statistics (H2O's accumulated attention, WeightedKV's
        average) cover the whole prompt."""
        C = cache.capacity
        mass, seen = cache.window_mass()
        lifetime = {"acc": mass, "steps": seen}
        lifetime |= {name: getattr(cache, name)[:, :, :C] for name in self.accumulators}
        yield self._evict(cache, cache.pos[:, :, :C], mass, seen, lifetime, slots)

    def _step(
        self,
        slots: int,
        pos: Tensor,
        mass: Tensor,
        seen: Tensor,
        lifetime: dict[str, Tensor],
        order: Tensor | None = None,
    ) -> Step:
        """The :class:`Step` of the entries (``[B, H, N]`` each), gathered by ``order`` if given."""
        if order is not None:
            pos, mass, seen = (x.gather(2, order) for x in (pos, mass, seen))
            lifetime = {name: x.gather(2, order) for name, x in lifetime.items()}
        newest = pos.amax(dim=-1, keepdim=True)
        eligible = (pos >= self.sink) & (pos <= newest - self.recent_for(slots))
        return Step(pos, mass, seen, lifetime["acc"], lifetime["steps"], eligible)

    def _evict(
        self,
        cache,
        pos: Tensor,
        mass: Tensor,
        seen: Tensor,
        lifetime: dict[str, Tensor],
        slots: int | None = None,
    ) -> Plan:
        """Any chunk: rank every entry in position order; see the module docstring. ``slots``:
        keep that many instead of the capacity (a prompt's end, :meth:`prompt_plans`)."""
        C = cache.capacity
        slots = slots or C
        order = pos.argsort(dim=-1, stable=True)  # empty slots and pads first
        step = self._step(slots, pos, mass, seen, lifetime, order)
        sp = step.pos
        score = self.score(step)
        if not self.per_head:
            score = head_total(score).expand_as(score)
        if cache.site.window > 0:
            score = torch.where(sp[..., -1:] - sp >= cache.site.window, -torch.inf, score)
        need = ((pos >= 0).sum(-1, keepdim=True) - slots).clamp_min(0)  # [B, H, 1]
        drop = step.eligible & (rank(torch.where(step.eligible, score, torch.inf)) < need)
        weight = self.fold_weight(step)
        dropped = torch.zeros_like(drop).scatter_(2, order, drop)  # back to slot order
        return Plan(
            state={name: lifetime[name][..., :C] for name in self.accumulators},
            fold=None if weight is None else Fold(order, drop, weight),
            drop=dropped[..., :C],
            keep=~dropped[..., C:],
            new_state={name: lifetime[name][..., C:] for name in self.accumulators},
            events=drop.sum(-1),
        )


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
