"""``kvslimmer`` (Liu et al. 2026): merge adjacent slots into a closed-form key and a mean value.

Each step, after attention, the method

1. updates every cached slot's selection statistic from the step's own attention mass (no
   second pass): ``score_j = p_j · c_j / min(c_j, bias_cap)`` (``p_j``: the slot's mean
   attention probability per query; every member of a merged slot counts), the last step's
   (``score="last"``, as the reference selects from the current chunk) or its running mean
   (``"mean"``). New tokens get theirs at their first step in the cache;
2. if the new tokens do not fit in the empty slots, picks that many disjoint adjacent pairs (in
   position order) with the lowest ``score_j + score_{j+1}``, outside the sinks (a sixteenth of
   the slots) and the recent window (half of them: :meth:`KVSlimmer.recent_for`), one selection
   per layer shared by the KV heads (``per_head=True``: per head);
   ``recency=ρ > 1`` divides pair ``j``'s cost by the reference's ``exp(j/γ)``, ``γ = slots /
   ln ρ``. The model's chunk limit (:meth:`KVSlimmer.max_chunk`) keeps every step within
   ``merge_fraction`` of the mergeable pairs, so disjoint pairs always suffice and no slot more
   than doubles in one step;
3. merges each pair: ``k* = (A k_m + B k_n) / (A + B)``,
   ``A = h11 − h12``, ``B = h22 − h12``, with the step's Hessian proxies of the output
   restricted to the non-sink slots, ``α`` renormalised over them as the reference does
   (:func:`middle_output`): ``h_j = α_j (1 − 2α_j) ‖m_j − o‖₂`` and
   ``h12 = α_m α_n ‖m_m + m_n − 2o‖₂``. They are computed for the chosen pairs only: per step
   that is one product ``α·V`` for ``o`` and ``O(D)`` per pair, not a pass over every slot's
   value (a running mean per slot would need one each step, and measured no better). The earlier key
   rotated forward by the position gap (RoPE-correct, post-RoPE storage); cardinalities add
   (no cap) and the value is the members' mean weighted by their statistic (``value=
   "attention"``, the default: attention counts the slot at most ``bias_cap`` times, not
   once per token, so the mean its members' attention weights stands for their output) or
   by their tokens (``"cardinality"``: the paper's value sums); the merged slot takes the
   later position. Where the quadratic is not convex it falls back to the score-weighted
   mean, and counts it
   (``LayerCache.merge_stats``). The weights are ``kernels/run_merge.py``'s ``merge_runs``
   on runs of two; the storage combines the rows (``kvslim::merge_rows`` for ``dense``);
4. puts the new tokens into the freed slots.

All of it is a plan (``kvslim_fx.plan``) that the cache applies; the policy writes nothing.

Attention counts a merged slot ``min(c, bias_cap)`` times (its ``log c`` bias capped at
``log 5`` by default). On SmolLM2-135M, with attention-weighted values, a cap of 5 measured
better than none (``bias_cap=1``) at 2k and level at 8k, and level with the paper's exact bias
(``bias_cap=inf``) at both, whose largest slots are a third larger; the paper's value sums
(``value="cardinality"``) measured worse. The figures are in docs/design.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from ..errors import KVSlimError
from ..kernels.pair_merge import pair_costs
from ..kernels.run_merge import adjacent_coupling, hessian_proxy, merge_runs
from ..plan import Merge, Plan
from .base import (
    Method,
    SlotLayout,
    neighbour_max,
    non_negative,
    number_at_least,
    odd_kernel,
    positive,
    rank,
)

_SLOT_STATE = {
    "logc": (torch.float32, 0.0),  # log cardinality: tokens merged into the slot (values are means)
    "score": (torch.float32, 0.0),  # the selection statistic (attention probability, see score)
    "steps": (torch.float32, 0.0),  # steps the slot has been attended (the running means' n)
}


# The selection statistic: the slot's mean attention probability over the steps it has lived, or
# that of the last step only (the reference code's choice, and TOVA's rule).
_SCORES = ("mean", "last")

# A merged pair's value: the members' mean weighted by their attention (the selection statistic,
# every member counted), or by their tokens (the paper's value sums with cardinalities).
_VALUES = ("attention", "cardinality")


def _sixteenth(slots: int) -> int:
    """A sixteenth of ``slots``, at least 1 and at most 32 (the reference's sinks at 2k slots)."""
    return min(32, max(1, slots // 16))


def middle_output(prob: Tensor, middle: Tensor, means: Tensor) -> tuple[Tensor, Tensor]:
    """The attention restricted to the ``middle`` (non-sink) slots and renormalised over them,
    as the reference code normalises its Hessian proxy, and the output it gives.

    Args:
        prob: ``[B, H_kv, C]`` attention probability of each slot (mean over the step's queries).
        middle: ``[B, H_kv, C]`` bool, the occupied slots outside the sinks.
        means: ``[B, H_kv, C, D]`` the slots' mean values (the cache's dtype).
    Returns:
        ``alpha [B, H_kv, C]`` (zero outside ``middle``, summing to 1 over it) and the restricted
        output ``o = Σ α_j m_j`` ``[B, H_kv, 1, D]`` (at least float32; the product runs in the
        values' dtype, so a 16-bit cache is read as it is, not copied to float32).
    """
    alpha = torch.where(middle, prob, 0)
    alpha = alpha / alpha.sum(-1, keepdim=True).clamp_min(1e-30)
    out = torch.matmul(alpha.to(means.dtype)[..., None, :], means)
    return alpha, out.to(torch.promote_types(means.dtype, torch.float32))


def _alternate_below(edge: Tensor, t: Tensor) -> Tensor:
    """Every other edge, from the first, of each run of consecutive edges costing ``<= t``."""
    cheap = (edge <= t[..., None]) & torch.isfinite(edge)
    idx = torch.arange(edge.shape[-1], device=edge.device).expand_as(edge)
    last_break = torch.where(cheap, -1, idx).cummax(-1).values
    return cheap & ((idx - last_break) % 2 == 1)


def disjoint_cheapest(edge: Tensor, need: Tensor) -> Tensor:
    """Pick ``need [B, H]`` of the edges ``[B, H, E]`` (``inf`` = not allowed) as cheap pairs
    that share no slot.

    For a threshold ``t``, every other edge of each run of edges costing at most ``t`` gives
    disjoint pairs; their number only grows with ``t`` (by at most one per added edge), so a
    binary search over the sorted costs finds the smallest ``t`` that gives ``need`` of them
    (the cheapest ones are kept if ties give more). The allowed edges form one run (positions
    between the sinks and the recent window), so ``ceil(E / 2)`` disjoint pairs exist for ``E``
    of them, enough whenever ``need`` is at most half, which the merge schedule guarantees; more
    than that is never picked (fewer than ``need`` come back). Ties go to the earlier edge, so
    ``need = 1`` picks ``edge.argmin``.
    """
    costs = edge.sort(-1).values
    lo = torch.zeros_like(need)
    hi = torch.isfinite(edge).sum(-1).clamp_min(1) - 1
    for _ in range(max(1, edge.shape[-1]).bit_length()):
        mid = (lo + hi) // 2
        enough = _alternate_below(edge, costs.gather(-1, mid[..., None])[..., 0]).sum(-1) >= need
        hi = torch.where(enough, mid, hi)
        lo = torch.where(enough, lo, mid + 1)
    picks = _alternate_below(edge, costs.gather(-1, lo.clamp_max(hi)[..., None])[..., 0])
    return picks & (rank(torch.where(picks, edge, torch.inf)) < need[..., None])


class KVSlimmer(Method):
    """Asymmetric KV merging with the exact, forward-only Hessian; see the module docstring."""

    name = "kvslimmer"
    combines_rows = True
    default_sink = None  # scaled to the slots: see sink_for
    needs_rope = True

    def __init__(
        self,
        budget: int | float | None = None,
        sink: int | None = None,
        recent: int | None = None,
        per_head: bool = False,
        recency: float = 0.0,
        convex: bool = False,
        bias_cap: float = 5.0,
        score: str = "last",
        value: str = "attention",
        merge_fraction: float = 0.25,
        observe: int = 1,
        kernel: int = 7,
        eps: float = 1e-6,
    ) -> None:
        super().__init__(budget, sink)
        self.recent = None if recent is None else non_negative("recent", recent)
        self.per_head = bool(per_head)
        self.recency = number_at_least(
            "recency", recency, 0,
            "the recency factor exp(j/γ) at the budget's last pair; the reference's is about "
            "22.6; 0 = off",
        )  # fmt: skip
        self.convex = bool(convex)
        self.bias_cap = number_at_least(
            "bias_cap", bias_cap, 1,
            "the largest cardinality attention counts; 1 = no cardinality bias, inf = exact",
        )  # fmt: skip
        if score not in _SCORES:
            raise KVSlimError(f"score must be one of {', '.join(_SCORES)}, got {score!r}")
        self.score = score
        if value not in _VALUES:
            raise KVSlimError(f"value must be one of {', '.join(_VALUES)}, got {value!r}")
        self.value = value
        if (
            isinstance(merge_fraction, bool)
            or not isinstance(merge_fraction, int | float)
            or not (0 < merge_fraction <= 0.5)
        ):
            raise KVSlimError(
                f"merge_fraction must lie in (0, 0.5] (the largest share of the mergeable pairs "
                f"one step may merge, so that they can all be disjoint), got {merge_fraction!r}"
            )
        self.merge_fraction = float(merge_fraction)
        self.observe = positive("observe", observe)
        self.kernel = odd_kernel(kernel)
        self.eps = float(eps)

    def options(self) -> dict:
        return {**super().options(), "recent": self.recent, "per_head": self.per_head,
                "recency": self.recency, "convex": self.convex, "bias_cap": self.bias_cap,
                "score": self.score, "value": self.value, "merge_fraction": self.merge_fraction,
                "observe": self.observe, "kernel": self.kernel}  # fmt: skip

    def sink_for(self, slots: int) -> int:
        """Sink slots of a ``slots``-slot layer: the option, or 1/16 of the slots (1 to 32)."""
        return _sixteenth(slots) if self.sink is None else self.sink

    def recent_for(self, slots: int, rounds: bool = False) -> int:
        """Protected recent slots: the option, or by default half the slots (H2O's split) while
        the prompt is read chunk by chunk and in decode, where nothing has yet asked about the
        newest text and only recency protects it, and 1/16 of them (1 to 32) in a
        ``prefill="full"`` compression's ``rounds``, where the question's attention decides
        what is kept. The default leaves the 4 mergeable pairs one merge needs (:meth:`floor`).
        """
        if self.recent is not None:
            return self.recent
        if rounds:
            return _sixteenth(slots)
        return max(1, min(slots // 2, slots - self.sink_for(slots) - 5))

    def attention_logc(self, logc: Tensor) -> Tensor:
        # A cap of 5 measured level with counting all ``c`` members (the exact bias) and keeps
        # the largest slots smaller (docs/design.md, Measurements).
        if math.isinf(self.bias_cap):
            return logc
        return logc.clamp_max(math.log(self.bias_cap))

    def layout(self, slots: int, window: int, layer: int = 0) -> SlotLayout:
        if 0 < window <= slots:
            # A sliding layer whose window fits the budget never needs to compress.
            return SlotLayout(sink=0, ring=window, recent=0, wraps=True)
        return SlotLayout(sink=0, ring=slots, recent=0, wraps=True, merges=True)

    def slot_state(self) -> dict[str, tuple[torch.dtype, float]]:
        return dict(_SLOT_STATE)

    def floor(self, slots: int) -> int:
        # The sinks, the recent window and the 4 mergeable pairs one merge needs (max_chunk).
        return self.sink_for(slots) + self.recent_for(slots) + 5

    def max_chunk(self, slots: int) -> int:
        # A full cache has `edges` mergeable pairs; a step merges as many as it adds tokens, so
        # the chunk limit keeps every merge event within `merge_fraction` of them.
        edges = slots - self.sink_for(slots) - self.recent_for(slots) - 1
        return math.floor(self.merge_fraction * edges)

    def plan(self, cache, k: Tensor, v: Tensor, kv_pos: Tensor, mass: Tensor) -> Plan:
        return self._plan(cache, kv_pos, mass, one=False)

    def plan_one(self, cache, k: Tensor, v: Tensor, kv_pos: Tensor, mass: Tensor) -> Plan:
        # Decode frees at most one slot: merging one pair touches two slots, not the cache.
        return self._plan(cache, kv_pos, mass, one=True)

    def _plan(self, cache, kv_pos: Tensor, mass: Tensor, one: bool) -> Plan:
        C = cache.capacity
        H = cache.site.num_kv_heads
        count = (kv_pos >= 0).sum(1)[:, None, None]  # [B, 1, 1] real queries of the step
        # Mean attention probability per query of each cached slot (all of the step's queries
        # see it). A new token gets its first statistics at its first step in the cache, as in
        # the reference, where a chunk's tokens are first scored by the next chunk's queries.
        prob = mass[..., :C] / (count * (cache.site.num_q_heads // H)).clamp_min(1)
        logc, pos = cache.logc[:, :, :C], cache.pos[:, :, :C]
        # The selection statistic counts every member of a merged slot, whatever the bias the
        # attention uses, so that a slot of many tokens is as costly to merge as they are.
        score_now = prob * (logc - self.attention_logc(logc)).exp()

        lived = (pos >= 0) & (count > 0)
        steps = cache.steps[:, :, :C] + lived
        score = cache.score[:, :, :C]
        if self.score == "last":
            score = torch.where(lived, score_now, score)
        else:
            score = score + torch.where(lived, (score_now - score) / steps.clamp_min(1), 0)
        plan = Plan(state={"score": score, "steps": steps})
        if C > 1:  # a one-slot cache has no pair (and then always holds the whole sequence)
            need = (count[..., 0] - (pos < 0).sum(-1)).clamp_min(0)  # [B, H]
            select = self._pair if one else self._pairs
            first, second, do = select(pos, score, need, C)
            means = cache.storage.values()[:, :, :C]
            alpha, out = middle_output(prob, pos >= self.sink_for(C), means)
            self._merge_plan(plan, cache, first, second, do, score, alpha, out)
        return plan

    def _selection(self, pos: Tensor, score: Tensor, slots: int, rounds: bool = False) -> tuple:
        """The arguments of ``pair_costs`` / ``kvslim::select_pair`` for slots at ``pos`` with
        the statistic ``score`` (``[B, H, C]``), and the sinks, recent window (of a full
        prefill's ``rounds`` or not) and recency of a ``slots`` budget."""
        # The reference's recency factor exp(j/γ) reaches `recency` at the budget's last pair.
        gamma = slots / math.log(self.recency) if self.recency > 1 else 0.0
        recent = self.recent_for(slots, rounds)
        return pos, score, self.sink_for(slots), recent, self.per_head, gamma

    def prompt_plans(self, cache, slots: int) -> Iterator[Plan]:
        """Merge a cache holding the whole prompt down to ``slots``, in rounds: each round scores
        the slots by the prompt's last ``observe`` queries' attention over the merged cache
        (:meth:`prompt_score`) and merges at most ``merge_fraction`` of the mergeable pairs
        (disjoint ones), so no slot more than doubles per round."""
        C = cache.capacity
        while True:
            pos = cache.pos[:, :, :C]
            excess = ((pos >= 0).sum(-1) - slots).clamp_min(0)  # [B, H]
            if not bool(excess.any()):
                return
            mass, seen = cache.window_mass()
            prob = mass / seen.clamp_min(1)
            score = self.prompt_score(prob, pos, slots)
            means = cache.storage.values()[:, :, :C]
            alpha, out = middle_output(prob, pos >= self.sink_for(slots), means)
            costs = pair_costs(*self._selection(pos, score, slots, rounds=True))
            edges = torch.isfinite(costs[3]).sum(-1)
            if not bool((edges > 0).all()):
                raise KVSlimError(
                    f"{self.name}: {slots} slots leave no pair to merge; raise the budget"
                )
            rule = (self.merge_fraction * edges).floor().long().clamp_min(1)
            plan = Plan(state={"score": score})
            first, second, do = self._disjoint(costs, torch.minimum(excess, rule))
            self._merge_plan(plan, cache, first, second, do, score, alpha, out)
            yield plan

    def prompt_score(self, prob: Tensor, pos: Tensor, slots: int) -> Tensor:
        """The selection statistic of a ``prefill="full"`` round, ``[B, H, C]``: each slot's
        attention probability ``prob`` (per query) max-pooled over ``kernel`` neighbours in
        position order, as SnapKV pools, among the slots outside the sinks and the recent
        window of a ``slots`` budget (they lend nothing and score 0).

        Pooling keeps a retrieved span whole (a pass key's digits are copied one after the
        other, though the question attends mostly to the first). No cardinality factor, unlike
        decode's statistic: the rounds already bound a slot to ``2^rounds`` tokens, and the
        factor made the haystack's merged slots as costly as the needle's singletons (measured
        in docs/design.md).
        """
        order = pos.argsort(dim=-1)
        sp = pos.gather(2, order)
        recent = self.recent_for(slots, rounds=True)
        lend = (sp >= self.sink_for(slots)) & (sp <= sp[..., -1:] - recent)
        pooled = neighbour_max(torch.where(lend, prob.gather(2, order), -torch.inf), self.kernel)
        return torch.empty_like(prob).scatter_(2, order, torch.where(lend, pooled, 0.0))

    def _pair(self, pos: Tensor, score: Tensor, need: Tensor, slots: int) -> tuple:
        """:meth:`_pairs` for ``need <= 1`` (decode): ``kvslim::select_pair`` picks the pair
        without the threshold search (``O(C log C)`` scalars)."""
        first, second, ok = torch.ops.kvslim.select_pair(*self._selection(pos, score, slots))
        return first[..., None], second[..., None], (ok & (need > 0))[..., None]

    def _pairs(self, pos: Tensor, score: Tensor, need: Tensor, slots: int) -> tuple:
        """The cheapest disjoint adjacent pairs (position order) that free ``need [B, H]`` slots
        of a step: ``first, second, do`` ``[B, H, P]``, ``P = C // 2``; ``slots``: the budget
        whose sinks and recent window are protected."""
        return self._disjoint(pair_costs(*self._selection(pos, score, slots)), need)

    def _disjoint(self, costs: tuple, need: Tensor) -> tuple:
        """:meth:`_pairs` given ``costs = pair_costs(*self._selection(...))``."""
        order, _, _, edge = costs
        C = order.shape[-1]
        joined = disjoint_cheapest(edge, need)  # [B, H, C - 1]
        if not torch.compiler.is_compiling() and bool((joined.sum(-1) < need).any()):
            # The chunk limit (max_chunk) makes this impossible; a token must never be lost.
            raise KVSlimError(
                f"{self.name}: a step needed more disjoint pairs than the cache has; "
                "this is a bug, please report it with the budget and chunk size"
            )
        # The selected edges first (disjoint: at most C // 2 of them), in position order.
        edges = (~joined).long().argsort(dim=-1, stable=True)[..., : C // 2]
        return order.gather(2, edges), order.gather(2, edges + 1), joined.gather(2, edges)

    def _merge_plan(
        self,
        plan: Plan,
        cache,
        first: Tensor,
        second: Tensor,
        do: Tensor,
        score: Tensor,
        alpha: Tensor,
        out: Tensor,
    ) -> None:
        """Add the merge of slot ``first`` into ``second`` where ``do`` (``[B, H, P]``, disjoint
        pairs) to ``plan``: the closed-form key weights and cardinality shares of
        :func:`~kvslim_fx.kernels.run_merge.merge_runs` on runs of two, given the slots'
        ``score`` and restricted attention ``alpha`` (``[B, H, C]``) and its output
        ``out [B, H, 1, D]``; the pairs' Hessian proxies are computed here, for them alone."""
        B, H, P = first.shape
        members = torch.stack([first, second], dim=-1).flatten(-2)  # [B, H, 2P]: f0 s0 f1 s1 ..
        at = lambda x: x.gather(2, members)  # noqa: E731
        idx = members[..., None].expand(*members.shape, out.shape[-1])
        means = cache.storage.values().gather(2, idx).float()
        within = torch.arange(2 * P - 1, device=first.device) % 2 == 0  # edge (f_p, s_p)
        a = at(alpha)
        merged = merge_runs(
            None, means, at(cache.logc), hessian_proxy(a, means, out), at(score), at(cache.pos),
            adjacent_coupling(a, means, out), within.expand(B, H, -1), None, None, self.convex,
            self.eps,
        )  # fmt: skip
        value = (merged.share[..., 0::2], merged.share[..., 1::2])  # the members' token shares
        if self.value == "attention":
            # Attention counts the merged slot at most bias_cap times, not once per token, so
            # the value that stands for the pair's output is the members' attention-weighted
            # mean (measured better than the token-weighted one: docs/design.md, Measurements).
            s = at(score)
            total = s[..., 0::2] + s[..., 1::2]
            w = torch.where(total > 0, s[..., 0::2] / total.clamp_min(1e-30), value[0])
            value = (w, torch.where(total > 0, 1 - w, value[1]))
        plan.merge = Merge(
            src=first, dst=second, do=do, counts=True,
            key=(merged.weight[..., 0::2], merged.weight[..., 1::2]),
            value=value,
            state={"score": merged.score[..., 1::2]},
        )  # fmt: skip
        count = do.sum(-1)
        plan.events = count
        plan.joined = 2 * (count > 0).long()
        plan.fallbacks = merged.fallback[..., 1::2] & do
