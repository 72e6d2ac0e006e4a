"""One decode step of score-based eviction on a slot cache: ``kvslim::evict_one``.

A step brings one new token per row. Per ``(row, KV head)`` the op looks at ``N = C + 1``
entries, the cache's ``C`` slots and the new token (entry ``C``; slot ``C`` of the cache tensors
is the trash slot, whose position is never read), and

1. **selects**: if the real entries outnumber the ``C`` slots, the lowest-scoring *eligible*
   entry is dropped: a real token that is not a sink (``pos >= sink``) and not among the
   ``recent`` newest positions (``pos <= newest - recent``). With a sliding ``window``, an entry
   that has left it (``newest - pos >= window``) scores ``-inf``. ``per_head=False`` ranks by
   the score summed over the KV heads (the mean's ranking; sums are exact to reproduce), one
   selection per layer. Ties go to the oldest position, then the lowest entry index;
2. **folds** (when ``weight`` is given; WeightedKV): the dropped entry's value is merged into its
   right neighbour (the real entry with the smallest position above it) as
   ``(w_j v_j + w_r v_r) / (w_j + w_r)``, ``1/2`` each when ``w_j + w_r <= 0`` (the fallback),
   in fp32. A dropped entry without a right neighbour is simply forgotten;
3. **writes** the new token (its folded value, if it received the fold) into the dropped slot,
   or the lowest empty slot when nothing was dropped, or the trash slot (position ``-1``) when
   the new token itself was dropped or is padding (``kv_pos < 0``).

Only the dropped slot, its neighbour and the written slot change: ``O(C)`` scalar reductions
and ``O(D)`` vector work, no sort, no ``O(C·D)`` pass. The caller keeps the per-slot
accumulators; the op returns where the new token went, what was dropped and whether the fold
fell back to uniform weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import HAS_TRITON, kernel_op

if HAS_TRITON:
    from .eviction_triton import evict_one_triton

__all__ = ["evict_one", "evict_one_reference", "head_total"]

_NONE = torch.iinfo(torch.long).max  # position sentinel above every real position


def head_total(score: Tensor) -> Tensor:
    """``score [B, H, N]`` summed over heads in head order, ``[B, 1, N]``.

    A fixed left-to-right order, so the Triton kernel, this reference and the general eviction
    path rank entries with the same float sums.
    """
    total = score[:, :1]
    for h in range(1, score.shape[1]):
        total = total + score[:, h : h + 1]
    return total


def evict_one_reference(
    cache_k: Tensor,
    cache_v: Tensor,
    cache_pos: Tensor,
    k: Tensor,
    v: Tensor,
    kv_pos: Tensor,
    score: Tensor,
    weight: Tensor | None,
    sink: int,
    recent: int,
    window: int = 0,
    per_head: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """PyTorch twin of the Triton kernel (and the CPU implementation); mutates the cache.

    Args:
        cache_k, cache_v: ``[B, H_kv, C + 1, D]`` slot keys and values (slot ``C``: trash).
        cache_pos: ``[B, H_kv, C + 1]`` int64 slot positions, ``-1`` = empty.
        k, v: ``[B, H_kv, 1, D]`` the new token; kv_pos: ``[B, 1]`` int64 its position.
        score: ``[B, H_kv, C + 1]`` float32 per entry (slots, then the new token); lowest goes.
        weight: ``[B, H_kv, C + 1]`` float32 non-negative fold weights, or None (evict only).
        sink, recent, window: non-negative ints (``window = 0``: no sliding window).
    Returns:
        ``slot [B, H_kv]`` int64 where the new token went (``C``: not stored), ``drop [B, H_kv]``
        int64 the dropped entry (``-1``: none, ``C``: the new token) and ``fallback [B, H_kv]``
        bool (the fold used uniform weights).
    """
    B, H, S, _ = cache_k.shape
    C = S - 1
    new_pos = kv_pos[:, None, :].expand(B, H, 1)
    pos = torch.cat([cache_pos[..., :C], new_pos], dim=2)  # [B, H, N]
    newest = pos.amax(dim=-1, keepdim=True)
    eligible = (pos >= sink) & (pos <= newest - recent)  # sink >= 0: never an empty slot
    if not per_head:
        score = head_total(score).expand_as(score)
    if window > 0:
        score = torch.where(newest - pos >= window, -torch.inf, score)
    score = torch.where(eligible, score, torch.inf)
    cand = eligible & (score == score.amin(dim=-1, keepdim=True))
    # Among the lowest, the oldest (argmin: the first entry on equal positions).
    chosen = torch.where(cand, pos, _NONE).argmin(dim=-1)  # [B, H]
    need = (pos >= 0).all(dim=-1)  # C + 1 real entries for C slots
    drop = torch.where(need & cand.any(dim=-1), chosen, -1)

    # Rows touched below are indexed by (row, head, slot) [B, H] triples: index_put_, which
    # Inductor keeps in place on the cache, unlike a scatter_ (a full copy of K and V per step).
    rows = torch.arange(B, device=pos.device)[:, None]
    heads = torch.arange(H, device=pos.device)[None, :]
    new_v = v[:, :, 0].to(cache_v.dtype)  # [B, H, D]
    fallback = torch.zeros_like(drop, dtype=torch.bool)
    if weight is not None:
        j = drop.clamp_min(0)  # [B, H]
        later = pos > pos[rows, heads, j][..., None]
        r = torch.where(later, pos, _NONE).argmin(dim=-1)  # the right neighbour
        folds = (drop >= 0) & later.any(dim=-1)
        w_j, w_r = weight[rows, heads, j], weight[rows, heads, r]
        total = w_j + w_r
        some = total > 0
        safe = torch.where(some, total, 1)
        a = torch.where(some, w_j / safe, 0.5)[..., None]
        b = torch.where(some, w_r / safe, 0.5)[..., None]
        # Slot C is the trash slot in the cache and the new token among the entries.
        there = cache_v[rows, heads, r]
        v_j = torch.where((j == C)[..., None], new_v, cache_v[rows, heads, j])
        v_r = torch.where((r == C)[..., None], new_v, there)
        merged = (a * v_j.float() + b * v_r.float()).to(cache_v.dtype)
        # The neighbour's slot gets the merged value only when it folds into a slot; otherwise
        # it gets back what it holds (a static-shape write).
        into_slot = (folds & (r < C))[..., None]
        cache_v.index_put_((rows, heads, r), torch.where(into_slot, merged, there))
        new_v = torch.where((folds & (r == C))[..., None], merged, new_v)
        fallback = folds & ~some

    slots = torch.arange(C, device=pos.device)
    free = torch.where(cache_pos[..., :C] < 0, slots, C).amin(dim=-1)  # the lowest empty slot
    slot = torch.where(drop >= 0, drop, torch.where(new_pos[..., 0] >= 0, free, C))
    index = (rows, heads, slot)
    cache_k.index_put_(index, k[:, :, 0].to(cache_k.dtype))
    cache_v.index_put_(index, new_v)
    cache_pos.index_put_(index, torch.where(slot < C, new_pos[..., 0], -1))
    return slot, drop, fallback


@kernel_op("kvslim::evict_one", mutates_args=("cache_k", "cache_v", "cache_pos"))
def evict_one(
    cache_k: Tensor,
    cache_v: Tensor,
    cache_pos: Tensor,
    k: Tensor,
    v: Tensor,
    kv_pos: Tensor,
    score: Tensor,
    weight: Tensor | None,
    sink: int,
    recent: int,
    window: int = 0,
    per_head: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Registered op: the Triton kernel on CUDA, the reference elsewhere (same signature)."""
    args = (cache_k, cache_v, cache_pos, k, v, kv_pos, score, weight, sink, recent, window)
    if cache_k.is_cuda and HAS_TRITON:
        return evict_one_triton(*args, per_head=per_head)
    return evict_one_reference(*args, per_head=per_head)
