"""Triton twins of ``kvslim::select_pair`` and ``kvslim::merge_pairs`` (see ``pair_merge.py``).

* ``_select_pair``: one program per batch row. Per KV head it sorts ``(position, slot)`` packed
  into one int64 (``tl.sort``), keeps the slot order in a scratch row, and reads each slot's
  position-order successor from it; the edge costs of all heads are summed for the shared
  selection, then each head takes its argmin (ties: lowest position, as ``torch.argmin``).
* ``_merge_pair``: one program per ``(batch, KV head, pair)``; it loads the pair's two rows,
  rotates the earlier key by the position gap (HF ``rotate_half`` layout), combines them as
  ``run_merge.merge_runs`` does a run of two, and writes the two slots, all masked by ``do``
  (a row's pairs are disjoint, so no two programs write one slot).

Launches go through ``torch.library.wrap_triton`` so the ops stay traceable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["merge_pairs_triton", "select_pair_triton"]

_SLOT_BITS = 24  # slots per layer < 2**24; positions < 2**39 fit beside them in an int64


@triton.jit
def _sorted_edges(pos_ptr, score_ptr, order_ptr, sp_n, ss_n, offs, C, sink, recent, gamma):
    """One head's slots in position order (``idx``), their successors and edge costs."""
    in_c = offs < C
    has_next = offs + 1 < C
    idx = tl.load(order_ptr + offs, mask=in_c, other=0)
    nxt = tl.load(order_ptr + offs + 1, mask=has_next, other=0)
    p = tl.load(pos_ptr + idx * sp_n, mask=in_c, other=-1)
    p_next = tl.load(pos_ptr + nxt * sp_n, mask=has_next, other=-1)
    newest = tl.max(p, 0)
    valid = has_next & (p >= sink) & (p_next <= newest - recent)
    edge = tl.load(score_ptr + idx * ss_n, mask=in_c, other=0.0) + tl.load(
        score_ptr + nxt * ss_n, mask=has_next, other=0.0
    )
    if gamma > 0:
        empty = tl.sum((in_c & (p < 0)).to(tl.int32), 0)
        edge = edge * tl.exp(-(offs - empty).to(tl.float32) / gamma)
    return idx, nxt, edge, valid


@triton.jit
def _pick(values, offs, at):
    """``values[at]`` of a register block."""
    return tl.sum(tl.where(offs == at, values, 0), 0)


@triton.jit
def _select_pair(
    pos_ptr, score_ptr, order_ptr, first_ptr, second_ptr, ok_ptr,
    sp_b, sp_h, sp_n, ss_b, ss_h, ss_n,
    H, C, sink, recent, gamma,
    PER_HEAD: tl.constexpr, SLOT_BITS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    in_c = offs < C
    for h in range(H):
        p = tl.load(pos_ptr + b * sp_b + h * sp_h + offs * sp_n, mask=in_c, other=0)
        key = ((p + 1) << SLOT_BITS) | offs.to(tl.int64)  # empty slots (-1) sort first
        key = tl.sort(tl.where(in_c, key, 0x7FFFFFFFFFFFFFFF))
        tl.store(order_ptr + (b * H + h) * BLOCK + offs, key & ((1 << SLOT_BITS) - 1))
    tl.debug_barrier()

    total = tl.zeros([BLOCK], dtype=tl.float32)
    if not PER_HEAD:
        for h in range(H):
            _, _, edge, _ = _sorted_edges(
                pos_ptr + b * sp_b + h * sp_h, score_ptr + b * ss_b + h * ss_h,
                order_ptr + (b * H + h) * BLOCK, sp_n, ss_n, offs, C, sink, recent, gamma,
            )  # fmt: skip
            total += edge
        total = total / H
    for h in range(H):
        idx, nxt, edge, valid = _sorted_edges(
            pos_ptr + b * sp_b + h * sp_h, score_ptr + b * ss_b + h * ss_h,
            order_ptr + (b * H + h) * BLOCK, sp_n, ss_n, offs, C, sink, recent, gamma,
        )  # fmt: skip
        cost = tl.where(valid, edge if PER_HEAD else total, float("inf"))
        best = tl.argmin(cost, 0)
        tl.store(first_ptr + b * H + h, _pick(idx, offs, best))
        tl.store(second_ptr + b * H + h, _pick(nxt, offs, best))
        tl.store(ok_ptr + b * H + h, (tl.min(cost, 0) < float("inf")).to(tl.int8))


def select_pair_triton(
    pos: Tensor, score: Tensor, sink: int, recent: int, per_head: bool, gamma: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton twin of ``select_pair_reference`` (same arguments, same results)."""
    B, H, C = pos.shape
    BLOCK = triton.next_power_of_2(max(C, 2))
    order = torch.empty((B, H, BLOCK), dtype=torch.int64, device=pos.device)
    first = torch.empty((B, H), dtype=torch.int64, device=pos.device)
    second = torch.empty_like(first)
    ok = torch.empty((B, H), dtype=torch.int8, device=pos.device)
    torch.library.wrap_triton(_select_pair)[(B,)](
        pos, score, order, first, second, ok, *pos.stride(), *score.stride(),
        H, C, int(sink), int(recent), float(gamma),
        PER_HEAD=bool(per_head), SLOT_BITS=_SLOT_BITS, BLOCK=BLOCK,
    )  # fmt: skip
    return first, second, ok.bool()


@triton.jit
def _merge_pair(
    k_ptr, v_ptr, logc_ptr, pos_ptr, hess_ptr, score_ptr, steps_ptr, alpha_ptr, out_ptr,
    first_ptr, second_ptr, do_ptr, freq_ptr, fallback_ptr,
    sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
    ss_b, ss_h, ss_n, sa_b, sa_h, sa_n, so_b, so_h, so_d,
    H, P, D, HALF, eps,
    ROPE: tl.constexpr, CONVEX: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)  # (batch, head, pair), pairs fastest
    bh = pid // P
    b, h = bh // H, bh % H
    i = tl.load(first_ptr + pid)
    j = tl.load(second_ptr + pid)
    do = tl.load(do_ptr + pid) != 0
    # The [B, H, N] slot-state tensors share one layout (they are allocated together).
    s1 = b * ss_b + h * ss_h + i * ss_n
    s2 = b * ss_b + h * ss_h + j * ss_n
    h1, h2 = tl.load(hess_ptr + s1), tl.load(hess_ptr + s2)
    sc1, sc2 = tl.load(score_ptr + s1), tl.load(score_ptr + s2)
    c1, c2 = tl.exp(tl.load(logc_ptr + s1)), tl.exp(tl.load(logc_ptr + s2))
    p1, p2 = tl.load(pos_ptr + s1), tl.load(pos_ptr + s2)
    a1 = tl.load(alpha_ptr + b * sa_b + h * sa_h + i * sa_n)
    a2 = tl.load(alpha_ptr + b * sa_b + h * sa_h + j * sa_n)

    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    v_row = v_ptr + b * sv_b + h * sv_h
    m1 = tl.load(v_row + i * sv_n + d * sv_d, mask=d_ok, other=0.0).to(tl.float32)
    m2 = tl.load(v_row + j * sv_n + d * sv_d, mask=d_ok, other=0.0).to(tl.float32)
    o = tl.load(out_ptr + b * so_b + h * so_h + d * so_d, mask=d_ok, other=0.0)
    dev = m1 + m2 - 2 * o
    h12 = a1 * a2 * tl.sqrt(tl.sum(dev * dev, 0))
    w1, w2 = h1 - h12, h2 - h12
    total = w1 + w2
    fallback = (h1 <= 0) | (h2 <= 0) | (h1 * h2 <= h12 * h12)
    fallback |= total <= eps * (tl.abs(h1) + tl.abs(h2))
    s_total = sc1 + sc2
    by1 = tl.where(s_total > 0, sc1 / tl.maximum(s_total, 1e-30), 0.5)
    by2 = tl.where(s_total > 0, sc2 / tl.maximum(s_total, 1e-30), 0.5)
    denom = tl.where(fallback, 1.0, total)
    w1 = tl.where(fallback, by1, w1 / denom)
    w2 = tl.where(fallback, by2, w2 / denom)
    if CONVEX:
        w1, w2 = tl.maximum(w1, 0.0), tl.maximum(w2, 0.0)
        w1, w2 = w1 / (w1 + w2), w2 / (w1 + w2)

    k_row = k_ptr + b * sk_b + h * sk_h
    k1 = tl.load(k_row + i * sk_n + d * sk_d, mask=d_ok, other=0.0).to(tl.float32)
    k2 = tl.load(k_row + j * sk_n + d * sk_d, mask=d_ok, other=0.0).to(tl.float32)
    if ROPE:
        # rotate_half pairs channel c < HALF with c + HALF; channels >= 2 * HALF do not rotate.
        rot = d < 2 * HALF
        low = d < HALF
        partner = tl.where(low, d + HALF, d - HALF)
        k1p = tl.load(k_row + i * sk_n + partner * sk_d, mask=d_ok & rot, other=0.0)
        freq = tl.load(freq_ptr + tl.where(low, d, d - HALF), mask=d_ok & rot, other=0.0)
        angle = (p2 - p1).to(tl.float32) * freq
        sign = tl.where(low, -1.0, 1.0)
        turned = k1 * tl.cos(angle) + sign * k1p.to(tl.float32) * tl.sin(angle)
        k1 = tl.where(rot, turned, k1)

    if do:
        k_new = (w1 * k1 + w2 * k2).to(k_ptr.dtype.element_ty)
        v_new = ((c1 * m1 + c2 * m2) / (c1 + c2)).to(v_ptr.dtype.element_ty)
        tl.store(k_row + j * sk_n + d * sk_d, k_new, mask=d_ok)
        tl.store(v_row + j * sv_n + d * sv_d, v_new, mask=d_ok)
        tl.store(logc_ptr + s2, tl.log(c1 + c2))
        tl.store(hess_ptr + s2, w1 * w1 * h1 + w2 * w2 * h2)
        tl.store(score_ptr + s2, s_total)

        zeros = tl.zeros([BLOCK_D], dtype=tl.float32)
        tl.store(k_row + i * sk_n + d * sk_d, zeros.to(k_ptr.dtype.element_ty), mask=d_ok)
        tl.store(v_row + i * sv_n + d * sv_d, zeros.to(v_ptr.dtype.element_ty), mask=d_ok)
        tl.store(logc_ptr + s1, 0.0)
        tl.store(hess_ptr + s1, 0.0)
        tl.store(score_ptr + s1, 0.0)
        tl.store(steps_ptr + s1, 0.0)
        tl.store(pos_ptr + s1, -1)
    tl.store(fallback_ptr + pid, (fallback & do).to(tl.int8))


def merge_pairs_triton(
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
    """Triton twin of ``merge_pairs_reference`` (same arguments, same results)."""
    B, H, _, D = k.shape
    P = first.shape[-1]
    strides = {t.stride() for t in (logc, pos, hess, score, steps)}
    if len(strides) != 1:
        raise ValueError("merge_pairs_triton needs logc, pos, hess, score, steps in one layout")
    out = out.float()
    rope = inv_freq is not None
    freq = inv_freq.float().contiguous() if rope else k.new_zeros(1, dtype=torch.float32)
    fallback = torch.empty((B, H, P), dtype=torch.int8, device=k.device)
    torch.library.wrap_triton(_merge_pair)[(B * H * P,)](
        k, v, logc, pos, hess, score, steps, alpha, out,
        first.contiguous(), second.contiguous(), do.to(torch.int8).contiguous(), freq, fallback,
        *k.stride(), *v.stride(), *logc.stride(), *alpha.stride(), *out.stride(),
        H, P, D, rotary_dim // 2 if rope else 0, float(eps),
        ROPE=rope, CONVEX=bool(convex), BLOCK_D=triton.next_power_of_2(D),
    )  # fmt: skip
    return fallback.bool()
