"""Triton twins of ``kvslim::select_pair`` and ``kvslim::merge_rows`` (see ``pair_merge.py``).

* ``_select_pair``: one program per ``(batch row, KV head)``. It sorts its head's
  ``(position, slot)`` packed into one int64 (``tl.sort``), keeps the slot order in its own
  scratch row, and reads each slot's position-order successor from it; for the shared selection
  it sums every head's edge costs along that order (a shared selection keeps the heads'
  positions equal), then takes the argmin (ties: lowest position, as ``torch.argmin``).
* ``_merge_rows``: one program per ``(batch, KV head, pair)``; it loads the pair's two rows,
  rotates the source key by the position gap (HF ``rotate_half`` layout), and writes the
  weighted sums to the pair's output row (the cache itself is only read).

Launches go through ``torch.library.wrap_triton`` so the ops stay traceable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["merge_rows_triton", "select_pair_triton"]

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
    pid = tl.program_id(0)
    b, h = pid // H, pid % H
    offs = tl.arange(0, BLOCK)
    in_c = offs < C
    head_pos = pos_ptr + b * sp_b + h * sp_h
    p = tl.load(head_pos + offs * sp_n, mask=in_c, other=0)
    key = ((p + 1) << SLOT_BITS) | offs.to(tl.int64)  # empty slots (-1) sort first
    key = tl.sort(tl.where(in_c, key, 0x7FFFFFFFFFFFFFFF))
    order = order_ptr + pid * BLOCK
    tl.store(order + offs, key & ((1 << SLOT_BITS) - 1))
    tl.debug_barrier()

    idx, nxt, edge, valid = _sorted_edges(
        head_pos, score_ptr + b * ss_b + h * ss_h, order, sp_n, ss_n, offs, C, sink, recent, gamma
    )
    if not PER_HEAD:
        # A shared selection keeps every head's positions equal: this head's order serves all.
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for other in range(H):
            _, _, other_edge, _ = _sorted_edges(
                head_pos, score_ptr + b * ss_b + other * ss_h, order, sp_n, ss_n, offs, C, sink,
                recent, gamma,
            )  # fmt: skip
            total += other_edge
        edge = total / H
    cost = tl.where(valid, edge, float("inf"))
    best = tl.argmin(cost, 0)
    tl.store(first_ptr + pid, _pick(idx, offs, best))
    tl.store(second_ptr + pid, _pick(nxt, offs, best))
    tl.store(ok_ptr + pid, (tl.min(cost, 0) < float("inf")).to(tl.int8))


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
    torch.library.wrap_triton(_select_pair)[(B * H,)](
        pos, score, order, first, second, ok, *pos.stride(), *score.stride(),
        H, C, int(sink), int(recent), float(gamma),
        PER_HEAD=bool(per_head), SLOT_BITS=_SLOT_BITS, BLOCK=BLOCK,
    )  # fmt: skip
    return first, second, ok.bool()


@triton.jit
def _merge_rows(
    k_ptr, v_ptr, src_ptr, dst_ptr, ks_ptr, kd_ptr, vs_ptr, vd_ptr, gap_ptr, freq_ptr,
    ko_ptr, vo_ptr,
    sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
    H, P, D, HALF,
    KEYS: tl.constexpr, ROPE: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)  # (batch, head, pair), pairs fastest; the outputs are contiguous
    bh = pid // P
    b, h = bh // H, bh % H
    i = tl.load(src_ptr + pid)
    j = tl.load(dst_ptr + pid)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    v_row = v_ptr + b * sv_b + h * sv_h
    v1 = tl.load(v_row + i * sv_n + d * sv_d, mask=d_ok, other=0.0).to(tl.float32)
    v2 = tl.load(v_row + j * sv_n + d * sv_d, mask=d_ok, other=0.0).to(tl.float32)
    v_new = tl.load(vs_ptr + pid) * v1 + tl.load(vd_ptr + pid) * v2
    tl.store(vo_ptr + pid * D + d, v_new.to(vo_ptr.dtype.element_ty), mask=d_ok)
    k_row = k_ptr + b * sk_b + h * sk_h
    k2 = tl.load(k_row + j * sk_n + d * sk_d, mask=d_ok, other=0.0)
    if KEYS:
        k1 = tl.load(k_row + i * sk_n + d * sk_d, mask=d_ok, other=0.0).to(tl.float32)
        if ROPE:
            # rotate_half pairs channel c < HALF with c + HALF; channels >= 2 * HALF stay.
            rot = d < 2 * HALF
            low = d < HALF
            partner = tl.where(low, d + HALF, d - HALF)
            k1p = tl.load(k_row + i * sk_n + partner * sk_d, mask=d_ok & rot, other=0.0)
            freq = tl.load(freq_ptr + tl.where(low, d, d - HALF), mask=d_ok & rot, other=0.0)
            angle = tl.load(gap_ptr + pid).to(tl.float32) * freq
            sign = tl.where(low, -1.0, 1.0)
            turned = k1 * tl.cos(angle) + sign * k1p.to(tl.float32) * tl.sin(angle)
            k1 = tl.where(rot, turned, k1)
        k_new = tl.load(ks_ptr + pid) * k1 + tl.load(kd_ptr + pid) * k2.to(tl.float32)
        tl.store(ko_ptr + pid * D + d, k_new.to(ko_ptr.dtype.element_ty), mask=d_ok)
    else:
        tl.store(ko_ptr + pid * D + d, k2, mask=d_ok)


def merge_rows_triton(
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
    """Triton twin of ``merge_rows_reference`` (same arguments, same results)."""
    B, H, _, D = k.shape
    P = src.shape[-1]
    k_rows = torch.empty((B, H, P, D), dtype=k.dtype, device=k.device)
    v_rows = torch.empty((B, H, P, D), dtype=v.dtype, device=v.device)
    if B * H * P == 0:
        return k_rows, v_rows
    keys = key_src is not None
    rope = keys and inv_freq is not None
    freq = inv_freq.float().contiguous() if rope else k.new_zeros(1, dtype=torch.float32)
    weights = [w.float().contiguous() for w in (value_src, value_dst)]
    weights = [*((key_src.float().contiguous(), key_dst.float().contiguous()) if keys
                 else weights), *weights]  # fmt: skip
    torch.library.wrap_triton(_merge_rows)[(B * H * P,)](
        k, v, src.contiguous(), dst.contiguous(), *weights, gap.contiguous(), freq,
        k_rows, v_rows, *k.stride(), *v.stride(),
        H, P, D, rotary_dim // 2 if rope else 0,
        KEYS=keys, ROPE=rope, BLOCK_D=triton.next_power_of_2(D),
    )  # fmt: skip
    return k_rows, v_rows
