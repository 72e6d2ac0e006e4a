"""KVSlimmer's merges as two registered ops: pick the cheapest adjacent pair, merge pairs.

A slot cache is unordered in memory; "adjacent" means adjacent in position order. A merge event
joins disjoint pairs of adjacent slots (the merge schedule guarantees disjoint pairs suffice),
so it touches two slots per pair: ``O(D)`` per pair, never a rewrite of the whole cache.

* ``kvslim::select_pair(pos, score, sink, recent, per_head, gamma) -> (first, second, ok)``:
  decode's one pair, the slots with the lowest ``score_i + score_{i+1}`` (position order;
  averaged over the KV heads unless ``per_head``; divided by the reference code's recency factor
  ``exp(j/γ)`` when ``gamma > 0``), outside the sinks and the recent window (:func:`pair_costs`).
  Chunked prefill picks its pairs with ``KVSlimmer``'s ``disjoint_cheapest`` over the same costs.
* ``kvslim::merge_pairs(k, v, logc, pos, hess, score, steps, alpha, out, first, second, do,
  inv_freq, rotary_dim, convex, eps) -> fallback``: for each pair ``p`` where ``do``, slot
  ``second`` becomes the merge and slot ``first`` is emptied (in place). The merged key is the
  closed-form ``k* = (A k₁' + B k₂)/(A + B)``, ``A = h₁ − h₁₂``, ``B = h₂ − h₁₂``,
  ``h₁₂ = α₁α₂‖m₁ + m₂ − 2o‖₂``, with ``k₁'`` the earlier key rotated forward by the position
  gap; the score-weighted mean where the quadratic is not convex (``fallback``). Values merge as
  cardinality-weighted means, cardinalities and scores add, the Hessian proxy propagates as
  ``a²h₁ + b²h₂``; the survivor keeps its position and step count. Decode calls it with one
  pair, prefill with all of a chunk's pairs.

The references below are what CPU runs; CUDA runs the Triton twins in ``pair_merge_triton``.
The merge reference is ``run_merge.merge_runs`` on runs of two.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import HAS_TRITON, kernel_op
from .run_merge import adjacent_coupling, merge_runs

if HAS_TRITON:
    from .pair_merge_triton import merge_pairs_triton, select_pair_triton

__all__ = ["merge_pairs", "merge_pairs_reference", "pair_costs", "select_pair",
           "select_pair_reference"]  # fmt: skip

# Per-slot buffers a merge rewrites and the value an emptied slot gets.
EMPTY = {"k": 0.0, "v": 0.0, "logc": 0.0, "pos": -1, "hess": 0.0, "score": 0.0, "steps": 0.0}


def pair_costs(
    pos: Tensor, score: Tensor, sink: int, recent: int, per_head: bool, gamma: float = 0.0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The slots in position order and the cost of merging each adjacent pair.

    Args:
        pos: ``[B, H, C]`` int64 slot positions, ``-1`` = empty; the same for every head unless
            ``per_head`` (a shared selection keeps them so).
        score: ``[B, H, C]`` float32 selection statistic (mean attention probability).
    Returns:
        ``order [B, H, C]`` (slot of the ``i``-th lowest position, empty slots first), the
        sorted positions and scores, and ``edge [B, H, C - 1]``: ``score_i + score_{i+1}``
        (averaged over heads unless ``per_head``), ``inf`` where the pair may not merge (an
        empty slot, a sink on the left, the right one inside the recent window). ``gamma > 0``
        divides pair ``j`` (``j``-th occupied slot on the left) by ``exp(j/γ)``, the reference
        code's recency factor: later pairs look cheaper.
    """
    # A shared selection (not per_head) keeps every KV head's positions equal: sort one head.
    order = (pos if per_head else pos[:, :1]).argsort(dim=-1).expand_as(pos)
    sp = pos.gather(2, order)
    ss = score.gather(2, order)
    newest = sp[..., -1:]
    valid = (sp[..., :-1] >= sink) & (sp[..., 1:] <= newest - recent)
    edge = ss[..., :-1] + ss[..., 1:]
    if gamma > 0:
        j = torch.arange(edge.shape[-1], device=pos.device) - (sp < 0).sum(-1, keepdim=True)
        edge = edge * torch.exp(-j.float() / gamma)
    if not per_head:
        edge = edge.mean(dim=1, keepdim=True).expand_as(edge)
    return order, sp, ss, torch.where(valid, edge, torch.inf)


def select_pair_reference(
    pos: Tensor, score: Tensor, sink: int, recent: int, per_head: bool, gamma: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """``first, second [B, H]`` int64 slots of the cheapest pair; ``ok [B, H]``: one exists.

    Ties go to the lowest positions. Without a valid pair ``first``/``second`` are arbitrary.
    """
    order, _, _, edge = pair_costs(pos, score, sink, recent, per_head, gamma)
    best = edge.argmin(dim=-1, keepdim=True)  # [B, H, 1]
    ok = torch.isfinite(edge.gather(2, best))
    return order.gather(2, best)[..., 0], order.gather(2, best + 1)[..., 0], ok[..., 0]


def _gather(x: Tensor, slots: Tensor) -> Tensor:
    """``x[b, h, slots[b, h]]`` for ``slots [B, H, K]``: ``[B, H, K]`` or ``[B, H, K, D]``."""
    idx = slots if x.dim() == 3 else slots[..., None].expand(*slots.shape, x.shape[-1])
    return x.gather(2, idx)


def _put(x: Tensor, slots: Tensor, value: Tensor, where: Tensor) -> None:
    """``x[b, h, slots[b, h, p]] = value[b, h, p]`` where ``where``, in place (``slots``,
    ``where``: ``[B, H, P]``; ``value`` as :func:`_gather` gives)."""
    B, H, P = slots.shape
    rows = torch.arange(B, device=slots.device)[:, None, None].expand(B, H, P)
    heads = torch.arange(H, device=slots.device)[None, :, None].expand(B, H, P)
    keep = where if x.dim() == 3 else where[..., None]
    # index_put_ stays in place on the cache under Inductor; a scatter_ copies the whole buffer.
    x.index_put_((rows, heads, slots), torch.where(keep, value.to(x.dtype), _gather(x, slots)))


def merge_pairs_reference(
    k: Tensor,
    v: Tensor,
    logc: Tensor,
    pos: Tensor,
    hess: Tensor,
    score: Tensor,
    steps: Tensor,
    alpha: Tensor,
    out: Tensor,
    first: Tensor,
    second: Tensor,
    do: Tensor,
    inv_freq: Tensor | None,
    rotary_dim: int,
    convex: bool,
    eps: float,
) -> Tensor:
    """Merge slot ``first[b, h, p]`` into slot ``second[b, h, p]`` where ``do``; returns
    ``fallback [B, H, P]``. The pairs of a row and head must be disjoint.

    Each pair, ``first`` the earlier, is one run of two of :func:`~.run_merge.merge_runs`.

    Args:
        k, v: ``[B, H, N, D]`` post-RoPE keys and mean values (mutated).
        logc, hess, score, steps: ``[B, H, N]`` float32 slot state (mutated); pos ``[B, H, N]``
            int64 (mutated).
        alpha: ``[B, H, C]`` (``C ≤ N``) the step's attention probability per slot, as the
            Hessian proxy normalises it.
        out: ``[B, H, D]`` float32 the attention output ``Σ α_j m_j`` that goes with ``alpha``.
        first, second: ``[B, H, P]`` int64 slots; ``do [B, H, P]`` bool.
        inv_freq: ``[r/2]`` the layer's RoPE inverse frequencies, or None (no RoPE).
        convex: clip the closed-form weights to ``[0, 1]`` (``k*`` on the segment between the
            two keys; the paper's ``k*`` may extrapolate where ``h₁₂`` exceeds one ``h``).
    """
    B, H, P = first.shape
    members = torch.stack([first, second], dim=-1).flatten(-2)  # [B, H, 2P]: f0 s0 f1 s1 ...
    m = _gather(v, members).float()
    within = torch.arange(2 * P - 1, device=first.device) % 2 == 0  # edge (f_p, s_p)
    merged = merge_runs(
        _gather(k, members).float(), m, _gather(logc, members), _gather(hess, members),
        _gather(score, members), _gather(pos, members),
        adjacent_coupling(_gather(alpha, members), m, out[:, :, None]),
        within.expand(B, H, -1), inv_freq, rotary_dim, convex, eps,
    )  # fmt: skip
    buffers = {"k": k, "v": v, "logc": logc, "pos": pos, "hess": hess, "score": score,
               "steps": steps}  # fmt: skip
    for name in ("k", "v", "logc", "hess", "score"):
        _put(buffers[name], second, getattr(merged, name)[:, :, 1::2], do)
    for name, buf in buffers.items():
        _put(buf, first, torch.full_like(_gather(buf, first), EMPTY[name]), do)
    return merged.fallback[:, :, 1::2] & do


@kernel_op("kvslim::select_pair")
def select_pair(
    pos: Tensor, score: Tensor, sink: int, recent: int, per_head: bool, gamma: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Registered op: the Triton kernel on CUDA, the reference elsewhere."""
    if pos.is_cuda and HAS_TRITON:
        return select_pair_triton(pos, score, sink, recent, per_head, gamma)
    return select_pair_reference(pos, score, sink, recent, per_head, gamma)


@kernel_op("kvslim::merge_pairs", mutates_args=("k", "v", "logc", "pos", "hess", "score", "steps"))
def merge_pairs(
    k: Tensor,
    v: Tensor,
    logc: Tensor,
    pos: Tensor,
    hess: Tensor,
    score: Tensor,
    steps: Tensor,
    alpha: Tensor,
    out: Tensor,
    first: Tensor,
    second: Tensor,
    do: Tensor,
    inv_freq: Tensor | None,
    rotary_dim: int,
    convex: bool,
    eps: float,
) -> Tensor:
    """Registered op: the Triton kernel on CUDA, the reference elsewhere."""
    args = (k, v, logc, pos, hess, score, steps, alpha, out, first, second, do, inv_freq,
            rotary_dim, convex, eps)  # fmt: skip
    if k.is_cuda and HAS_TRITON:
        return merge_pairs_triton(*args)
    return merge_pairs_reference(*args)
