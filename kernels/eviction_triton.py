"""Triton implementation of ``kvslim::select_one`` (see ``eviction.py`` for the semantics).

One program per ``(row, KV head)``. It streams the ``C + 1`` entries (the cache's slots, then the
new token as entry ``C``) in blocks of ``BLOCK_N`` three times, keeping only scalars: once for
the newest position, the real-entry count and the lowest empty slot; once for the argmin of the
score (lexicographic on ``(score, position, entry)``, so blocks combine exactly like the
reference's whole-row reduction); and, when folding, once for the right neighbour of the dropped
entry. It writes nothing but its plan. With ``per_head=False`` every program
sums all heads' scores itself, in head order, so all heads of a row make the same choice without
any communication between programs.

Launches go through ``torch.library.wrap_triton`` so that ``kvslim::select_one`` (a
``triton_op``) stays traceable; on CPU tensors the kernel only runs under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["select_one_triton"]


@triton.jit
def _entry_pos(cpos_ptr, scp_n, offs, C, new_pos):
    """Positions of entries ``offs``: slots below ``C``, the new token at ``C``, ``-1`` beyond."""
    p = tl.load(cpos_ptr + offs * scp_n, mask=offs < C, other=-1)
    return tl.where(offs == C, new_pos, p)


@triton.jit
def _select_one(
    CPOS, KPOS, SCORE, WEIGHT, SLOT, DROP, RIGHT, WDROP, WRIGHT, FALLBACK,
    scp_b, scp_h, scp_n,
    skp_b,
    ss_b, ss_h, ss_n,
    sw_b, sw_h, sw_n,
    H, C, sink, recent, window,
    PER_HEAD: tl.constexpr, FOLD: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    cpos = CPOS + b * scp_b + h * scp_h
    new_pos = tl.load(KPOS + b * skp_b)
    # An int tensor, not the argument: Triton turns an int argument equal to 1 into a constant,
    # which could not be a loop-carried value.
    last = tl.zeros([], tl.int32) + C

    newest = new_pos
    count = (new_pos >= 0).to(tl.int32)
    free = last
    for start in range(0, C, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        p = tl.load(cpos + offs * scp_n, mask=offs < C, other=-1)
        newest = tl.maximum(newest, tl.max(p, 0))
        count += tl.sum((p >= 0).to(tl.int32), 0)
        free = tl.minimum(free, tl.min(tl.where((offs < C) & (p < 0), offs, last), 0))
    above = newest + 1  # a position above every entry's: "none"

    score = SCORE + b * ss_b
    best_s = tl.full([], float("inf"), tl.float32)
    best_p = above
    best_i = last + 1
    for start in range(0, C + 1, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        p = _entry_pos(cpos, scp_n, offs, C, new_pos)
        if PER_HEAD:
            s = tl.load(score + h * ss_h + offs * ss_n, mask=offs <= C, other=0.0)
        else:  # summed in head order, exactly as head_total
            s = tl.load(score + offs * ss_n, mask=offs <= C, other=0.0)
            for hh in range(1, H):
                s += tl.load(score + hh * ss_h + offs * ss_n, mask=offs <= C, other=0.0)
        s = tl.where((newest - p >= window) & (window > 0), float("-inf"), s)
        eligible = (p >= sink) & (p <= newest - recent)  # sink >= 0: never an empty slot
        s = tl.where(eligible, s, float("inf"))
        m = tl.min(s, 0)
        cand = eligible & (s == m)
        mp = tl.min(tl.where(cand, p, above), 0)
        mi = tl.min(tl.where(cand & (p == mp), offs, last + 1), 0)
        better = (mp < above) & ((m < best_s) | ((m == best_s) & (mp < best_p)))
        best_s = tl.where(better, m, best_s)
        best_p = tl.where(better, mp, best_p)
        best_i = tl.where(better, mi, best_i)
    drop = tl.where((count > C) & (best_i <= C), best_i, -1)

    right = tl.zeros([], tl.int32) - 1
    a = tl.zeros([], tl.float32)
    c = tl.zeros([], tl.float32)
    fallback = drop < -1  # False
    if FOLD:
        # Right neighbour: the entry with the smallest position above the dropped one.
        near = above
        nearest = last + 1
        for start in range(0, C + 1, BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            p = _entry_pos(cpos, scp_n, offs, C, new_pos)
            later = p > best_p
            mp = tl.min(tl.where(later, p, above), 0)
            mi = tl.min(tl.where(later & (p == mp), offs, last + 1), 0)
            better = mp < near
            near = tl.where(better, mp, near)
            nearest = tl.where(better, mi, nearest)
        folds = (drop >= 0) & (nearest <= C)
        j = tl.maximum(drop, 0)
        r = tl.minimum(nearest, C)
        weight = WEIGHT + b * sw_b + h * sw_h
        w_j = tl.load(weight + j * sw_n)
        w_r = tl.load(weight + r * sw_n)
        total = w_j + w_r
        safe = tl.where(total > 0, total, 1.0)
        a = tl.where(folds, tl.where(total > 0, tl.math.div_rn(w_j, safe), 0.5), 0.0)
        c = tl.where(folds, tl.where(total > 0, tl.math.div_rn(w_r, safe), 0.5), 0.0)
        right = tl.where(folds, r, -1)
        fallback = folds & (total <= 0)

    slot = tl.where(drop >= 0, drop, tl.where(new_pos >= 0, free, last))
    tl.store(SLOT + pid, slot.to(tl.int64))
    tl.store(DROP + pid, drop.to(tl.int64))
    tl.store(RIGHT + pid, right.to(tl.int64))
    tl.store(WDROP + pid, a)
    tl.store(WRIGHT + pid, c)
    tl.store(FALLBACK + pid, fallback)


def select_one_triton(
    cache_pos: Tensor,
    kv_pos: Tensor,
    score: Tensor,
    weight: Tensor | None,
    sink: int,
    recent: int,
    window: int = 0,
    per_head: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton twin of ``select_one_reference`` (same arguments, same results).

    Args:
        cache_pos: ``[B, H_kv, C + 1]`` int64; kv_pos: ``[B, 1]`` int64; score, weight:
        ``[B, H_kv, C + 1]`` float32 (weight may be None). Any strides.
    Returns:
        ``slot``, ``drop``, ``right`` ``[B, H_kv]`` int64, ``w_drop``, ``w_right`` float32 and
        ``fallback`` bool.
    """
    B, H, S = cache_pos.shape
    C = S - 1
    slot = torch.empty(B, H, dtype=torch.long, device=cache_pos.device)
    drop, right = torch.empty_like(slot), torch.empty_like(slot)
    w_drop = torch.empty(B, H, dtype=torch.float32, device=cache_pos.device)
    w_right = torch.empty_like(w_drop)
    fallback = torch.empty(B, H, dtype=torch.bool, device=cache_pos.device)
    if B * H == 0:
        return slot, drop, right, w_drop, w_right, fallback
    w = score if weight is None else weight  # any float32 [B, H, C + 1] when not folding
    torch.library.wrap_triton(_select_one)[(B * H,)](
        cache_pos, kv_pos, score, w, slot, drop, right, w_drop, w_right, fallback,
        *cache_pos.stride(), kv_pos.stride(0), *score.stride(), *w.stride(),
        H, C, int(sink), int(recent), int(window),
        PER_HEAD=bool(per_head), FOLD=weight is not None,
        BLOCK_N=max(16, min(1024, triton.next_power_of_2(C + 1))),
    )  # fmt: skip
    return slot, drop, right, w_drop, w_right, fallback
