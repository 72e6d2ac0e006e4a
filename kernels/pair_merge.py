"""Pair merges as two registered ops: pick the cheapest adjacent pair; merge rows by weights.

A slot cache is unordered in memory; "adjacent" means adjacent in position order. A merge event
joins disjoint pairs of slots, so it touches two rows per pair: ``O(D)`` per pair, never a
rewrite of the whole cache.

* ``kvslim::select_pair(pos, score, sink, recent, per_head, gamma) -> (first, second, ok)``:
  KVSlimmer's decode pair, the slots with the lowest ``score_i + score_{i+1}`` (position order;
  averaged over the KV heads unless ``per_head``; divided by the reference code's recency factor
  ``exp(j/γ)`` when ``gamma > 0``), outside the sinks and the recent window (:func:`pair_costs`).
  Chunked prefill picks its pairs with ``KVSlimmer``'s ``disjoint_cheapest`` over the same costs.
* ``kvslim::merge_rows(k, v, src, dst, key_src, key_dst, value_src, value_dst, gap, inv_freq,
  rotary_dim) -> (k_rows, v_rows)``: the dense storage's merge. The new rows of the pairs'
  destinations, each the weighted sum of the pair's two rows, the source key first rotated
  forward by the position gap (post-RoPE rows). The weights are the policy's plan (KVSlimmer's
  closed form, WeightedKV's fold); the op knows no method. It reads the cache and writes
  nothing: the storage puts the rows back with an ``index_put_``, which Inductor keeps in place,
  while an op that mutated the cache would be functionalised into a copy of the whole buffer
  before and after it (four buffer copies per layer and step, measured).

The references below are what CPU runs; CUDA runs the Triton twins in ``pair_merge_triton``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import HAS_TRITON, kernel_op
from .run_merge import rope_rotate
from .slots import gather_slots

if HAS_TRITON:
    from .pair_merge_triton import merge_rows_triton, select_pair_triton

__all__ = ["merge_rows", "merge_rows_reference", "pair_costs", "select_pair",
           "select_pair_reference"]  # fmt: skip


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


def merge_rows_reference(
    k: Tensor,
    v: Tensor,
    src: Tensor,
    dst: Tensor,
    key_src: Tensor | None,
    key_dst: Tensor | None,
    value_src: Tensor,
    value_dst: Tensor,
    gap: Tensor,
    inv_freq: Tensor | None,
    rotary_dim: int,
) -> tuple[Tensor, Tensor]:
    """The merged rows of pairs ``src[b, h, p] → dst[b, h, p]``, computed in float32::

        k_rows = key_src · R(gap) k[src] + key_dst · k[dst]   (keys: k[dst] without weights)
        v_rows = value_src · v[src] + value_dst · v[dst]

    ``R(gap)`` rotates the earlier key forward by the position gap (post-RoPE rows; identity
    without ``inv_freq``).

    Args:
        k, v: ``[B, H, R, D]`` rows (read only).
        src, dst: ``[B, H, P]`` int64 rows.
        key_src, key_dst, value_src, value_dst: ``[B, H, P]`` float32 weights (keys: both None
            to leave keys alone).
        gap: ``[B, H, P]`` int64 ``pos[dst] - pos[src]``.
        inv_freq: ``[r/2]`` the layer's RoPE inverse frequencies, or None (no RoPE).
    Returns:
        ``k_rows, v_rows [B, H, P, D]`` in the rows' dtypes.
    """
    k_rows = gather_slots(k, dst)
    if key_src is not None:
        k_src = rope_rotate(gather_slots(k, src).float(), gap, inv_freq, rotary_dim)
        k_rows = (key_src[..., None] * k_src + key_dst[..., None] * k_rows.float()).to(k.dtype)
    v_rows = (
        value_src[..., None] * gather_slots(v, src).float()
        + value_dst[..., None] * gather_slots(v, dst).float()
    )
    return k_rows, v_rows.to(v.dtype)


@kernel_op("kvslim::select_pair")
def select_pair(
    pos: Tensor, score: Tensor, sink: int, recent: int, per_head: bool, gamma: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Registered op: the Triton kernel on CUDA, the reference elsewhere."""
    if pos.is_cuda and HAS_TRITON:
        return select_pair_triton(pos, score, sink, recent, per_head, gamma)
    return select_pair_reference(pos, score, sink, recent, per_head, gamma)


@kernel_op("kvslim::merge_rows")
def merge_rows(
    k: Tensor,
    v: Tensor,
    src: Tensor,
    dst: Tensor,
    key_src: Tensor | None,
    key_dst: Tensor | None,
    value_src: Tensor,
    value_dst: Tensor,
    gap: Tensor,
    inv_freq: Tensor | None,
    rotary_dim: int,
) -> tuple[Tensor, Tensor]:
    """Registered op: the Triton kernel on CUDA, the reference elsewhere."""
    args = (k, v, src, dst, key_src, key_dst, value_src, value_dst, gap, inv_freq, rotary_dim)
    if k.is_cuda and HAS_TRITON:
        return merge_rows_triton(*args)
    return merge_rows_reference(*args)
