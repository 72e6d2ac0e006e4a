r"""KVSlimmer's merge arithmetic: Hessian proxies, and the closed-form merge of runs of slots.

The one PyTorch definition: KVSlimmer's plans take their weights from it on runs of two (every
merge KVSlimmer makes, in prefill and decode), and a storage applies them (the dense one with
``kvslim::merge_rows``). Runs of more slots are defined (and tested) for completeness.

A slot ``j`` holds a post-RoPE key ``k_j``, a *mean* value ``m_j`` and a cardinality ``c_j``.
With logits ``s_j`` and ``α = softmax(s + log c)`` the attention output is ``o = Σ_j α_j m_j``;
its exact derivatives w.r.t. the logits (vectors in value space) are::

    ∂²o/∂s_i²      =  α_i (1 − 2α_i)(m_i − o)
    ∂²o/∂s_i ∂s_j  = −α_i α_j (m_i + m_j − 2o),   i ≠ j

and their norms are the scalar proxies (:func:`hessian_proxy`, :func:`adjacent_coupling`)::

    h_jj = α_j (1 − 2α_j) ‖m_j − o‖₂      (signed: < 0 iff α_j > 1/2)
    h_12 = α_m α_n ‖m_m + m_n − 2o‖₂ ≥ 0

(The released KVSlimmer code uses L1 norms of value sums and a triangle bound on ``h_12``.)

Merging a run of adjacent slots ``1..n`` into one key ``k`` costs, to second order,
``E(k) = Σ_i h_ii ‖k − k_i‖² − 2 Σ_e h_e ⟨k − k_i, k − k_{i+1}⟩`` (``e = (i, i + 1)`` the run's
edges), minimised where ``Σ_i w_i > 0`` by ``k* = Σ_i w_i k_i / Σ_i w_i`` with
``w_i = h_ii − Σ_{e ∋ i} h_e``; for a pair that is ``(A k_1 + B k_2)/(A + B)``,
``A = h11 − h12``, ``B = h22 − h12``. Keys are stored post-RoPE, so each is first rotated forward
to the survivor's (the run's last) position: ``R(p_n)(Σ w_i k_i) = Σ w_i R(p_n − p_i)[R(p_i) k_i]``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["MergedRuns", "adjacent_coupling", "hessian_proxy", "merge_runs", "rope_rotate"]


def hessian_proxy(alpha: Tensor, means: Tensor, out: Tensor) -> Tensor:
    """``h_j = α_j (1 − 2α_j) ‖m_j − o‖₂``: the signed norm of ``∂²o/∂s_j²``.

    Args:
        alpha: ``[B, H_kv, N]`` attention probability of each slot.
        means: ``[B, H_kv, N, D]`` mean values.
        out: ``[B, H_kv, 1, D]`` attention output ``Σ_j α_j m_j``.
    Returns:
        ``[B, H_kv, N]``.
    """
    return alpha * (1 - 2 * alpha) * (means - out).norm(dim=-1)


def adjacent_coupling(alpha: Tensor, means: Tensor, out: Tensor) -> Tensor:
    """``h_e = α_i α_{i+1} ‖m_i + m_{i+1} − 2o‖₂``: the norm of ``∂²o/∂s_i∂s_{i+1}``.

    Args:
        alpha: ``[B, H_kv, N]`` attention probability of each slot, in position order.
        means: ``[B, H_kv, N, D]`` mean values, in the same order.
        out: ``[B, H_kv, 1, D]`` attention output ``Σ_j α_j m_j``.
    Returns:
        ``[B, H_kv, N − 1]``: entry ``i`` couples slots ``i`` and ``i + 1``.
    """
    pair_sum = means[..., :-1, :] + means[..., 1:, :]
    return alpha[..., :-1] * alpha[..., 1:] * (pair_sum - 2 * out).norm(dim=-1)


def rope_rotate(
    x: Tensor, delta: Tensor | int | float, inv_freq: Tensor | None, rotary_dim: int | None = None
) -> Tensor:
    """Rotate ``x`` by the RoPE angle ``delta · inv_freq`` (a pure rotation, no attention scaling).

    HF ``rotate_half`` layout (Llama, NeoX): channel ``i`` pairs with ``i + r/2``; only the first
    ``r = rotary_dim`` channels rotate (partial rotary), the rest are returned unchanged. Angles
    are computed in ``promote(x.dtype, float32)`` exactly like HF for float32 inputs. HF rope
    types with ``attention_scaling != 1`` (YaRN, LongRoPE) scale cos/sin; that factor is *not*
    applied here, so rotating an already-embedded key by a position gap stays a pure rotation.

    Args:
        x: ``[.., D]``.
        delta: ``[..]`` (broadcastable to ``x.shape[:-1]``) positions or gaps, or a number.
        inv_freq: ``[r/2]`` inverse frequencies, or ``None`` for no RoPE (returns ``x``).
        rotary_dim: ``r`` (even, ``≤ D``); defaults to ``2 · len(inv_freq)``.
    Returns:
        ``[.., D]`` in ``x.dtype``.
    """
    if inv_freq is None:
        return x
    half = inv_freq.shape[-1]
    r = 2 * half if rotary_dim is None else rotary_dim
    if r != 2 * half or r > x.shape[-1]:
        raise ValueError(
            f"rotary_dim={r} needs inv_freq of length {r // 2} (got {half}) "
            f"and rotary_dim <= D={x.shape[-1]}"
        )
    cdt = torch.promote_types(x.dtype, torch.float32)
    d = torch.as_tensor(delta, device=x.device).to(cdt)
    ang = d.unsqueeze(-1) * inv_freq.to(device=x.device, dtype=cdt)  # [.., r/2]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., :half].to(cdt), x[..., half:r].to(cdt)
    y = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    if r == x.shape[-1]:
        return y
    return torch.cat((y, x[..., r:].expand(*y.shape[:-1], -1)), dim=-1)


class MergedRuns(NamedTuple):
    """What :func:`merge_runs` gives each slot: the merged state of the run it belongs to.

    ``k``, ``v``: ``[B, H_kv, N, D]``; the rest ``[B, H_kv, N]``. Only the survivors' entries
    are a merge; a slot alone in its run gets itself back up to rounding.
    """

    k: Tensor | None  # closed-form key, in the survivor's RoPE frame (None: no keys given)
    v: Tensor  # cardinality-weighted mean value
    weight: Tensor  # each member's key weight (summing to 1 over a run)
    share: Tensor  # each member's value weight c_i / Σ c (summing to 1 over a run)
    logc: Tensor  # log of the summed cardinalities
    hess: Tensor  # Σ_i w_i² h_i
    score: Tensor  # summed selection statistic
    pos: Tensor  # the run's last position
    fallback: Tensor  # bool: a merged run whose quadratic is not convex (score-weighted key)
    merged: Tensor  # bool: member of a run of two or more slots
    survivor: Tensor  # bool: last member of such a run, where its merge is to be kept


def merge_runs(
    keys: Tensor | None,
    means: Tensor,
    logc: Tensor,
    hess: Tensor,
    score: Tensor,
    pos: Tensor,
    coupling: Tensor,
    joined: Tensor,
    inv_freq: Tensor | None,
    rotary_dim: int | None,
    convex: bool,
    eps: float,
) -> MergedRuns:
    """Merge every run of ``joined`` adjacent slots into its last slot (the survivor).

    Slots are given in position order; a run is a maximal chain of joined edges (a slot with no
    joined edge is a run of one). Per run, with ``w_i = h_i − Σ_{joined e ∋ i} h_e``:

    * ``k* = Σ w_i k_i' / Σ w_i`` (``k_i'`` rotated to the survivor's position), unless the
      quadratic is not convex (a member with ``h_i ≤ 0``, a joined edge with
      ``h_i h_{i+1} ≤ h_e²``, or ``Σ w_i ≤ eps · Σ |h_i|``): then the score-weighted mean, the
      plain mean where the run's scores are all 0 (``fallback``). ``convex``: clip the weights
      at 0 and renormalise, keeping ``k*`` in the members' convex hull;
    * cardinalities, value sums and scores add: ``m* = Σ c_i m_i / Σ c_i``;
    * ``h* = Σ w_i² h_i``; the merged slot takes the run's last position.

    Computes in the dtype of the inputs.

    Args:
        keys: ``[B, H_kv, N, D]`` post-RoPE keys, or None when only the weights are wanted.
        means: ``[B, H_kv, N, D]`` mean values.
        logc, hess, score: ``[B, H_kv, N]`` log cardinality, Hessian proxy, selection statistic.
        pos: ``[B, H_kv, N]`` int64 positions, ascending.
        coupling: ``[B, H_kv, N − 1]`` ``h_e`` of edge ``(i, i + 1)`` (:func:`adjacent_coupling`;
            read only where ``joined``).
        joined: ``[B, H_kv, N − 1]`` bool, the edges to merge across.
        inv_freq, rotary_dim: the layer's RoPE (:func:`rope_rotate`), or ``None`` for no RoPE.
    """
    no = torch.zeros_like(joined[..., :1])
    joined_left = torch.cat([no, joined], dim=-1)  # [B, H, N]: edge (i - 1, i) joined
    joined_right = torch.cat([joined, no], dim=-1)
    run = (~joined_left).long().cumsum(-1) - 1

    def run_total(x: Tensor) -> Tensor:
        """Each slot's sum of ``x`` over its run (``x``: ``[B, H, N]`` or ``[B, H, N, D]``)."""
        idx = run if x.dim() == 3 else run[..., None].expand_as(x)
        return torch.zeros_like(x).scatter_add_(2, idx, x).gather(2, idx)

    members = run_total(torch.ones_like(hess))
    merged = members > 1
    h12 = torch.where(joined, coupling, 0)
    zero = torch.zeros_like(h12[..., :1])
    w = hess - torch.cat([zero, h12], dim=-1) - torch.cat([h12, zero], dim=-1)
    total = run_total(w)
    bad_edge = joined & (hess[..., :-1] * hess[..., 1:] <= h12**2)
    bad = merged & ((hess <= 0) | torch.cat([no, bad_edge], -1) | torch.cat([bad_edge, no], -1))
    fallback = (run_total(bad.to(hess.dtype)) > 0) | (total <= eps * run_total(hess.abs()))
    s_total = run_total(score)
    by_score = torch.where(s_total > 0, score / s_total.clamp_min(1e-30), 1 / members)
    weight = torch.where(fallback, by_score, w / torch.where(fallback, 1, total))
    if convex:
        weight = weight.clamp_min(0)
        weight = weight / run_total(weight)

    last_pos = run_total(torch.where(joined_right, 0, pos))
    k = None
    if keys is not None:
        keys = rope_rotate(keys, last_pos - pos, inv_freq, rotary_dim)
        k = run_total(weight[..., None] * keys)
    card = logc.exp()
    c_total = run_total(card)
    return MergedRuns(
        k=k,
        v=run_total(card[..., None] * means) / c_total[..., None],
        weight=weight,
        share=card / c_total,
        logc=c_total.log(),
        hess=run_total(weight**2 * hess),
        score=s_total,
        pos=last_pos,
        fallback=fallback & merged,
        merged=merged,
        survivor=joined_left & ~joined_right,
    )
