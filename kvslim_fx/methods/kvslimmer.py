"""``kvslimmer`` (Liu et al. 2026): merge adjacent slots with a closed-form key and value sums.

Each step, after attention, the method

1. updates every slot's Hessian proxy ``h_j = α_j (1 − 2α_j) ‖m_j − o‖₂`` (running mean over the
   steps the slot has lived, as the reference smooths over chunks) and its selection statistic
   ``score_j`` (``score="last"``: this step's attention probability, as the reference selects
   from the current chunk; ``"mean"``: its mean over the slot's life), from the step's own
   attention mass: no second pass;
2. if the new tokens do not fit in the empty slots, picks the ``need`` adjacent pairs (in
   position order) with the lowest ``score_j + score_{j+1}``, outside the sinks and the recent
   window, one selection per layer shared by the KV heads (``per_head=True``: per head);
   ``recency=γ > 0`` multiplies pair ``j``'s cost by the reference code's ``exp(−j/γ)``;
3. merges them: ``k* = (A k_m + B k_n) / (A + B)``, ``A = h11 − h12``, ``B = h22 − h12``,
   ``h12 = α_m α_n ‖m_m + m_n − 2o‖₂``, with the earlier key rotated forward by the position gap
   (RoPE-correct, post-RoPE storage); value sums and cardinalities add (no cap); the merged slot
   takes the later position. Where the quadratic is not convex it falls back to the
   score-weighted mean, and counts it (``LayerCache.merge_stats``);
4. writes the new tokens into the freed slots.

A chunk that needs several merges may select touching pairs; such a run of ``r`` selected edges
merges its ``r + 1`` slots at once with the same quadratic summed over the run
(``k* = Σ w_i k_i / Σ w_i``, ``w_i = h_ii − Σ_{selected edges at i} h_e``), which for one pair
is exactly the formula above: every token stays in exactly one slot and the step frees exactly
``need`` slots. In decode (one token per step) only single pairs are ever merged. The arithmetic
is ``kernels/run_merge.py``'s, which decode's ``kvslim::merge_pair`` shares.

Attention counts a merged slot ``min(c, bias_cap)`` times (its ``log c`` bias capped). The paper's
exact bias (``bias_cap=inf``) measured worse than no bias (``bias_cap=1``, the default) on
SmolLM2-135M, and worse than StreamingLLM; the figures are in docs/design.md.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import KVSlimError
from ..kernels.pair_merge import pair_costs
from ..kernels.run_merge import adjacent_coupling, hessian_proxy, merge_runs
from .base import Method, SlotLayout, non_negative, number_at_least, rank

_SLOT_STATE = {
    "hess": (torch.float32, 0.0),  # smoothed Hessian proxy h_jj
    "score": (torch.float32, 0.0),  # the selection statistic (attention probability, see score)
    "steps": (torch.float32, 0.0),  # steps the slot has been attended (the running means' n)
}


# The selection statistic: the slot's mean attention probability over the steps it has lived, or
# that of the last step only (the reference code's choice, and TOVA's rule).
_SCORES = ("mean", "last")

# Rounds of disjoint-pair selection before the rest of a step's merges may chain into runs.
_DISJOINT_ROUNDS = 4


def disjoint_cheapest(edge: Tensor, need: Tensor) -> Tensor:
    """Pick ``need [B, H]`` of the edges ``[B, H, E]`` (``inf`` = not allowed), cheapest first,
    as pairs that share no slot wherever possible.

    Each round takes the cheapest edges that are local minima among the still-free edges (two
    local minima are never adjacent) and blocks their neighbours; after a few rounds, whatever is
    still needed comes from the cheapest remaining edges, which may touch earlier picks and then
    merge as runs. Without this a step that frees many slots (a prefill chunk) chains the
    low-scoring old region into one giant slot: with 512 slots and a 2k prompt, one slot held
    1472 tokens. Ties go to the earlier edge, so ``need = 1`` picks ``edge.argmin``.
    """
    inf = torch.full_like(edge[..., :1], torch.inf)
    sel = torch.zeros_like(edge, dtype=torch.bool)
    free = torch.isfinite(edge)
    left = need[..., None]
    for _ in range(_DISJOINT_ROUNDS):
        c = torch.where(free, edge, torch.inf)
        local = (
            free & (c < torch.cat([inf, c[..., :-1]], -1)) & (c <= torch.cat([c[..., 1:], inf], -1))
        )
        pick = local & (rank(torch.where(local, c, torch.inf)) < left)
        sel |= pick
        left = left - pick.sum(-1, keepdim=True)
        no = torch.zeros_like(pick[..., :1])
        free &= ~(pick | torch.cat([no, pick[..., :-1]], -1) | torch.cat([pick[..., 1:], no], -1))
    rest = torch.where(sel, torch.inf, edge)
    return sel | (torch.isfinite(rest) & (rank(rest) < left))


class KVSlimmer(Method):
    """Asymmetric KV merging with the exact, forward-only Hessian; see the module docstring."""

    name = "kvslimmer"
    default_sink = 32
    needs_rope = True

    def __init__(
        self,
        budget: int | float | None = None,
        sink: int | None = None,
        recent: int = 32,
        per_head: bool = False,
        recency: float = 0.0,
        convex: bool = False,
        bias_cap: float = 1.0,
        score: str = "last",
        eps: float = 1e-6,
    ) -> None:
        super().__init__(budget, sink)
        self.recent = non_negative("recent", recent)
        self.per_head = bool(per_head)
        self.recency = number_at_least(
            "recency", recency, 0, "the reference code's γ = 4096 / ln 512 ≈ 656.8; 0 = off"
        )
        self.convex = bool(convex)
        self.bias_cap = number_at_least(
            "bias_cap", bias_cap, 1,
            "the largest cardinality attention counts; 1 = no cardinality bias, inf = exact",
        )  # fmt: skip
        if score not in _SCORES:
            raise KVSlimError(f"score must be one of {', '.join(_SCORES)}, got {score!r}")
        self.score = score
        self.eps = float(eps)

    def options(self) -> dict:
        return {**super().options(), "recent": self.recent, "per_head": self.per_head,
                "recency": self.recency, "convex": self.convex,
                "bias_cap": self.bias_cap, "score": self.score}  # fmt: skip

    def attention_logc(self, logc: Tensor) -> Tensor:
        # Counting all ``c`` members at the merged key's logit gives the model more of the
        # members' averaged value than it is better off with (measured; see docs/design.md).
        if math.isinf(self.bias_cap):
            return logc
        return logc.clamp_max(math.log(self.bias_cap))

    def layout(self, slots: int, window: int) -> SlotLayout:
        if 0 < window <= slots:
            # A sliding layer whose window fits the budget never needs to compress.
            return SlotLayout(sink=0, ring=window, recent=0, wraps=True)
        return SlotLayout(sink=0, ring=slots, recent=0, wraps=True, merges=True)

    def slot_state(self) -> dict[str, tuple[torch.dtype, float]]:
        return dict(_SLOT_STATE)

    def max_chunk(self, slots: int) -> int:
        # Mergeable edges when full: slots outside the sinks and the recent window, minus one.
        return slots - self.sink - self.recent - 1

    def update(self, cache, k: Tensor, v: Tensor, kv_pos: Tensor, mass: Tensor) -> None:
        C = cache.capacity
        H = k.shape[1]
        real = kv_pos >= 0  # [B, L]
        queries = real.sum(1) * (cache.site.num_q_heads // H)  # query rows behind `mass`
        # Mean attention probability of the cache's slots then the new tokens (trash slot out).
        alpha = torch.cat([mass[..., :C], mass[..., C + 1 :]], dim=2)
        alpha = alpha / queries.clamp_min(1)[:, None, None]  # [B, H, C + L]
        a_old, a_new = alpha[..., :C], alpha[..., C:]
        means = torch.cat([cache.v[:, :, :C], v.to(cache.v.dtype)], dim=2).float()
        out = (alpha[..., None] * means).sum(2, keepdim=True)  # [B, H, 1, D]
        h_now = hessian_proxy(alpha, means, out)

        lived = (cache.pos[:, :, :C] >= 0) & (queries > 0)[:, None, None]
        steps = cache.steps[:, :, :C] + lived
        n = steps.clamp_min(1)
        cache.hess[:, :, :C] += torch.where(lived, (h_now[..., :C] - cache.hess[:, :, :C]) / n, 0)
        if self.score == "last":
            cache.score[:, :, :C] = torch.where(lived, a_old, cache.score[:, :, :C])
        else:
            cache.score[:, :, :C] += torch.where(lived, (a_old - cache.score[:, :, :C]) / n, 0)
        cache.steps[:, :, :C] = steps

        need = (real.sum(1)[:, None] - (cache.pos[:, :, :C] < 0).sum(-1)).clamp_min(0)  # [B, H]
        # Decode frees at most one slot: merging one pair touches two slots, not the cache.
        # (An exported graph's step length is symbolic: it keeps the general path.)
        L = k.shape[2]
        merge = self._merge_pair if isinstance(L, int) and L == 1 else self._merge
        merge(cache, need, a_old, means[:, :, :C], out)
        cache.write_free(
            k, v, kv_pos,
            {"hess": h_now[..., C:], "score": a_new, "steps": real[:, None, :].float()},
        )  # fmt: skip

    def _selection(self, cache) -> tuple:
        """The arguments of ``pair_costs`` / ``kvslim::select_pair`` for ``cache``'s slots."""
        C = cache.capacity
        return (cache.pos[:, :, :C], cache.score[:, :, :C], self.sink, self.recent,
                self.per_head, self.recency)  # fmt: skip

    def _merge_pair(self, cache, need: Tensor, alpha: Tensor, means: Tensor, out: Tensor) -> None:
        """:meth:`_merge` for ``need <= 1`` (decode): two registered ops touch two slots.

        Same arithmetic as a run of two in :meth:`_merge`, so decode is bit-identical to it; the
        freed (earlier) slot is emptied for the new token that :meth:`update` writes next.
        """
        first, second, ok = torch.ops.kvslim.select_pair(*self._selection(cache))
        do = ok & (need > 0)
        rope = cache.rope
        fallback = torch.ops.kvslim.merge_pair(
            cache.k, cache.v, cache.logc, cache.pos, cache.hess, cache.score, cache.steps,
            alpha, out[:, :, 0], first, second, do,
            None if rope is None else rope.inv_freq.to(cache.k.device),
            0 if rope is None else rope.rotary_dim, self.convex, self.eps,
        )  # fmt: skip
        cache.merge_stats[0] += do.sum().double()
        cache.merge_stats[1] += fallback.sum().double()

    def _merge(self, cache, need: Tensor, alpha: Tensor, means: Tensor, out: Tensor) -> None:
        """Free ``need [B, H]`` slots by merging the cheapest adjacent runs (position order)."""
        C = cache.capacity
        order, sp, score, edge = pair_costs(*self._selection(cache))
        joined = disjoint_cheapest(edge, need)  # [B, H, C - 1]

        def sort(x: Tensor) -> Tensor:
            return x.gather(2, order if x.dim() == 3 else order[..., None].expand_as(x))

        m = sort(means)
        rope = cache.rope
        merged = merge_runs(
            sort(cache.k[:, :, :C]).float(), m, sort(cache.logc[:, :, :C]),
            sort(cache.hess[:, :, :C]), score, sp, adjacent_coupling(sort(alpha), m, out), joined,
            None if rope is None else rope.inv_freq, None if rope is None else rope.rotary_dim,
            self.convex, self.eps,
        )  # fmt: skip
        survivor = merged.survivor
        gone = merged.merged & ~survivor

        def store(name: str, new: Tensor, empty: float) -> None:
            buf = getattr(cache, name)[:, :, :C]
            idx = order if new.dim() == 3 else order[..., None].expand_as(new)
            cur = buf.gather(2, idx)
            keep = survivor if new.dim() == 3 else survivor[..., None]
            drop = gone if new.dim() == 3 else gone[..., None]
            val = torch.where(keep, new.to(buf.dtype), torch.where(drop, empty, cur))
            buf.scatter_(2, idx, val)

        store("k", merged.k, 0.0)
        store("v", merged.v, 0.0)
        store("logc", merged.logc, 0.0)
        store("hess", merged.hess, 0.0)
        store("score", merged.score, 0.0)
        store("steps", sort(cache.steps[:, :, :C]), 0.0)
        store("pos", merged.pos, -1)
        cache.merge_stats[0] += survivor.sum().double()
        cache.merge_stats[1] += (survivor & merged.fallback).sum().double()
