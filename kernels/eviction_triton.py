"""Triton implementation of ``kvslim::evict_one`` (see ``eviction.py`` for the semantics).

One program per ``(row, KV head)``. It streams the ``C + 1`` entries (the cache's slots, then the
new token as entry ``C``) in blocks of ``BLOCK_N`` three times, keeping only scalars: once for
the newest position, the real-entry count and the lowest empty slot; once for the argmin of the
score (lexicographic on ``(score, position, entry)``, so blocks combine exactly like the
reference's whole-row reduction); and, when folding, once for the right neighbour of the dropped
entry. Then it touches two or three rows of ``D`` values. With ``per_head=False`` every program
sums all heads' scores itself, in head order, so all heads of a row make the same choice without
any communication between programs.

Launches go through ``torch.library.wrap_triton`` so that ``kvslim::evict_one`` (a
``triton_op``) stays traceable; on CPU tensors the kernel only runs under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["evict_one_triton"]


@triton.jit
def _entry_pos(cpos_ptr, scp_n, offs, C, new_pos):
    """Positions of entries ``offs``: slots below ``C``, the new token at ``C``, ``-1`` beyond."""
    p = tl.load(cpos_ptr + offs * scp_n, mask=offs < C, other=-1)
    return tl.where(offs == C, new_pos, p)


@triton.jit
def _evict_one(
    CK, CV, CPOS, K, V, KPOS, SCORE, WEIGHT, SLOT, DROP, FALLBACK,
    sck_b, sck_h, sck_n, sck_d,
    scv_b, scv_h, scv_n, scv_d,
    scp_b, scp_h, scp_n,
    sk_b, sk_h, sk_d,
    sv_b, sv_h, sv_d,
    skp_b,
    ss_b, ss_h, ss_n,
    sw_b, sw_h, sw_n,
    H, C, D, sink, recent, window,
    PER_HEAD: tl.constexpr, FOLD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
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

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    cv = CV + b * scv_b + h * scv_h
    new_v = tl.load(V + b * sv_b + h * sv_h + offs_d * sv_d, mask=d_ok, other=0.0)
    new_v = new_v.to(CV.dtype.element_ty)
    fallback = drop < -1  # False
    if FOLD:
        # Right neighbour: the entry with the smallest position above the dropped one.
        near = above
        right = last + 1
        for start in range(0, C + 1, BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            p = _entry_pos(cpos, scp_n, offs, C, new_pos)
            later = p > best_p
            mp = tl.min(tl.where(later, p, above), 0)
            mi = tl.min(tl.where(later & (p == mp), offs, last + 1), 0)
            better = mp < near
            near = tl.where(better, mp, near)
            right = tl.where(better, mi, right)
        folds = (drop >= 0) & (right <= C)
        j = tl.maximum(drop, 0)
        r = tl.minimum(right, C)
        weight = WEIGHT + b * sw_b + h * sw_h
        w_j = tl.load(weight + j * sw_n)
        w_r = tl.load(weight + r * sw_n)
        total = w_j + w_r
        safe = tl.where(total > 0, total, 1.0)
        a = tl.where(total > 0, tl.math.div_rn(w_j, safe), 0.5)
        c = tl.where(total > 0, tl.math.div_rn(w_r, safe), 0.5)
        # Rows j, r <= C are in bounds (row C is the trash slot) and stand for the new token
        # when equal to C; the neighbour's row gets back what it holds unless it folds, which
        # keeps every mask a vector one.
        there = tl.load(cv + r * scv_n + offs_d * scv_d, mask=d_ok, other=0.0)
        v_j = tl.load(cv + j * scv_n + offs_d * scv_d, mask=d_ok, other=0.0)
        v_j = tl.where(j == C, new_v, v_j).to(tl.float32)
        v_r = tl.where(r == C, new_v, there).to(tl.float32)
        merged = (a * v_j + c * v_r).to(CV.dtype.element_ty)
        tl.store(
            cv + r * scv_n + offs_d * scv_d, tl.where(folds & (r < C), merged, there), mask=d_ok
        )
        new_v = tl.where(folds & (r == C), merged, new_v)
        fallback = folds & (total <= 0)

    slot = tl.where(drop >= 0, drop, tl.where(new_pos >= 0, free, last))
    k_new = tl.load(K + b * sk_b + h * sk_h + offs_d * sk_d, mask=d_ok, other=0.0)
    ck = CK + b * sck_b + h * sck_h
    tl.store(ck + slot * sck_n + offs_d * sck_d, k_new.to(CK.dtype.element_ty), mask=d_ok)
    tl.store(cv + slot * scv_n + offs_d * scv_d, new_v, mask=d_ok)
    tl.store(cpos + slot * scp_n, tl.where(slot < C, new_pos, -1))
    tl.store(SLOT + pid, slot.to(tl.int64))
    tl.store(DROP + pid, drop.to(tl.int64))
    tl.store(FALLBACK + pid, fallback)


def evict_one_triton(
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
    """Triton twin of ``evict_one_reference`` (same arguments, same results, same mutations).

    Args:
        cache_k, cache_v: ``[B, H_kv, C + 1, D]``; cache_pos: ``[B, H_kv, C + 1]`` int64;
        k, v: ``[B, H_kv, 1, D]``; kv_pos: ``[B, 1]`` int64; score, weight: ``[B, H_kv, C + 1]``
        float32 (weight may be None). Any strides.
    Returns:
        ``slot``, ``drop`` ``[B, H_kv]`` int64 and ``fallback`` ``[B, H_kv]`` bool.
    """
    B, H, S, D = cache_k.shape
    C = S - 1
    slot = torch.empty(B, H, dtype=torch.long, device=cache_k.device)
    drop = torch.empty_like(slot)
    fallback = torch.empty(B, H, dtype=torch.bool, device=cache_k.device)
    if B * H == 0:
        return slot, drop, fallback
    w = score if weight is None else weight  # any float32 [B, H, C + 1] when not folding
    torch.library.wrap_triton(_evict_one)[(B * H,)](
        cache_k, cache_v, cache_pos, k, v, kv_pos, score, w, slot, drop, fallback,
        *cache_k.stride(), *cache_v.stride(), *cache_pos.stride(),
        k.stride(0), k.stride(1), k.stride(3), v.stride(0), v.stride(1), v.stride(3),
        kv_pos.stride(0), *score.stride(), *w.stride(),
        H, C, D, int(sink), int(recent), int(window),
        PER_HEAD=bool(per_head), FOLD=weight is not None,
        BLOCK_N=max(16, min(1024, triton.next_power_of_2(C + 1))),
        BLOCK_D=max(16, triton.next_power_of_2(D)),
    )  # fmt: skip
    return slot, drop, fallback
