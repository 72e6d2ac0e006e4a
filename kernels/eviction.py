"""One decode step of score-based eviction, as a plan: ``kvslim::select_one``.

A step brings one new token per row. Per ``(row, KV head)`` the op looks at ``N = C + 1``
entries, the cache's ``C`` slots and the new token (entry ``C``; slot ``C`` of the cache tensors
is the trash slot, whose position is never read), and decides

1. **what goes**: if the real entries outnumber the ``C`` slots, the lowest-scoring *eligible*
   entry is dropped: a real token that is not a sink (``pos >= sink``) and not among the
   ``recent`` newest positions (``pos <= newest - recent``). With a sliding ``window``, an entry
   that has left it (``newest - pos >= window``) scores ``-inf``. ``per_head=False`` ranks by
   the score summed over the KV heads (the mean's ranking; sums are exact to reproduce), one
   selection per layer. Ties go to the oldest position, then the lowest entry index;
2. **where it folds** (when ``weight`` is given; WeightedKV): into its right neighbour (the real
   entry with the smallest position above it), with weights ``w_j / (w_j + w_r)`` and
   ``w_r / (w_j + w_r)``, ``1/2`` each when ``w_j + w_r <= 0`` (the fallback). A dropped entry
   without a right neighbour is simply forgotten;
3. **where the new token goes**: the dropped slot, or the lowest empty slot when nothing was
   dropped, or the trash slot ``C`` when the new token itself was dropped or is padding.

The op is pure (``O(C)`` scalar reductions, no sort, no ``O(C·D)`` pass): the cache applies the
plan it returns through its storage, which touches the two or three rows that change.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import HAS_TRITON, kernel_op

if HAS_TRITON:
    from .eviction_triton import select_one_triton

__all__ = ["head_total", "select_one", "select_one_reference"]

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


def select_one_reference(
    cache_pos: Tensor,
    kv_pos: Tensor,
    score: Tensor,
    weight: Tensor | None,
    sink: int,
    recent: int,
    window: int = 0,
    per_head: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """PyTorch twin of the Triton kernel (and the CPU implementation). Pure: the cache applies
    the plan it returns.

    Args:
        cache_pos: ``[B, H_kv, C + 1]`` int64 slot positions, ``-1`` = empty (slot ``C``: trash).
        kv_pos: ``[B, 1]`` int64 the new token's position (``-1``: a pad).
        score: ``[B, H_kv, C + 1]`` float32 per entry (slots, then the new token); lowest goes.
        weight: ``[B, H_kv, C + 1]`` float32 non-negative fold weights, or None (evict only).
        sink, recent, window: non-negative ints (``window = 0``: no sliding window).
    Returns:
        ``slot [B, H_kv]`` int64 where the new token goes (``C``: not stored), ``drop`` the
        dropped entry (``-1``: none, ``C``: the new token), ``right`` the entry the dropped
        value folds into (``-1``: no fold), ``w_drop, w_right`` ``[B, H_kv]`` float32 the fold's
        weights (summing to 1) and ``fallback`` bool (the fold used uniform weights).
    """
    B, H, S = cache_pos.shape
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

    right = torch.full_like(drop, -1)
    w_drop = torch.zeros_like(drop, dtype=torch.float32)
    w_right = torch.zeros_like(w_drop)
    fallback = torch.zeros_like(drop, dtype=torch.bool)
    if weight is not None:
        j = drop.clamp_min(0)[..., None]  # [B, H, 1]
        later = pos > pos.gather(2, j)
        r = torch.where(later, pos, _NONE).argmin(dim=-1, keepdim=True)  # the right neighbour
        folds = (drop >= 0) & later.any(dim=-1)
        w_j, w_r = weight.gather(2, j)[..., 0], weight.gather(2, r)[..., 0]
        total = w_j + w_r
        some = total > 0
        safe = torch.where(some, total, 1)
        right = torch.where(folds, r[..., 0], -1)
        w_drop = torch.where(folds, torch.where(some, w_j / safe, 0.5), 0.0)
        w_right = torch.where(folds, torch.where(some, w_r / safe, 0.5), 0.0)
        fallback = folds & ~some

    slots = torch.arange(C, device=pos.device)
    free = torch.where(cache_pos[..., :C] < 0, slots, C).amin(dim=-1)  # the lowest empty slot
    slot = torch.where(drop >= 0, drop, torch.where(new_pos[..., 0] >= 0, free, C))
    return slot, drop, right, w_drop, w_right, fallback


@kernel_op("kvslim::select_one")
def select_one(
    cache_pos: Tensor,
    kv_pos: Tensor,
    score: Tensor,
    weight: Tensor | None,
    sink: int,
    recent: int,
    window: int = 0,
    per_head: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Registered op: the Triton kernel on CUDA, the reference elsewhere (same signature)."""
    args = (cache_pos, kv_pos, score, weight, sink, recent, window)
    if cache_pos.is_cuda and HAS_TRITON:
        return select_one_triton(*args, per_head=per_head)
    return select_one_reference(*args, per_head=per_head)
