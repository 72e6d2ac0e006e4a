"""KVSlimmer's decode step as two registered ops: pick the cheapest adjacent pair, merge it.

A slot cache is unordered in memory; "adjacent" means adjacent in position order. In decode at
most one slot must be freed per step, so the step needs one pair, and merging it touches two
slots: ``O(C)`` scalar work to choose, ``O(D)`` to merge, instead of rewriting the cache.

* ``kvslim::select_pair(pos, score, sink, recent, per_head, gamma) -> (first, second, ok)``:
  the pair of slots with the lowest ``score_i + score_{i+1}`` (position order; averaged over the
  KV heads unless ``per_head``; times the reference code's recency factor ``exp(-j/γ)`` when
  ``gamma > 0``), outside the sinks and the recent window (:func:`pair_costs`).
* ``kvslim::merge_pair(k, v, logc, pos, hess, score, steps, alpha, out, first, second, do,
  inv_freq, rotary_dim, convex, eps) -> fallback``: where ``do``, slot ``second`` becomes the
  merge and slot ``first`` is emptied (in place). The merged key is the closed-form
  ``k* = (A k₁' + B k₂)/(A + B)``, ``A = h₁ − h₁₂``, ``B = h₂ − h₁₂``,
  ``h₁₂ = α₁α₂‖m₁ + m₂ − 2o‖₂``, with ``k₁'`` the earlier key rotated forward by the position
  gap; the score-weighted mean where the quadratic is not convex (``fallback``). Values merge as
  cardinality-weighted means, cardinalities and scores add, the Hessian proxy propagates as
  ``a²h₁ + b²h₂``; the survivor keeps its position and step count.

The references below are what CPU runs; CUDA runs the Triton twins in ``pair_merge_triton``.
The same arithmetic, for runs of any length, is ``KVSlimmer._merge`` (chunked prefill).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kvslimmer import rope_rotate
from .registry import HAS_TRITON, kernel_op

if HAS_TRITON:
    from .pair_merge_triton import merge_pair_triton, select_pair_triton

__all__ = ["merge_pair", "merge_pair_reference", "pair_costs", "select_pair",
           "select_pair_reference"]  # fmt: skip

# Per-slot buffers a merge rewrites and the value an emptied slot gets.
EMPTY = {"k": 0.0, "v": 0.0, "logc": 0.0, "pos": -1, "hess": 0.0, "score": 0.0, "steps": 0.0}


def pair_costs(
    pos: Tensor, score: Tensor, sink: int, recent: int, per_head: bool, gamma: float = 0.0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The slots in position order and the cost of merging each adjacent pair.

    Args:
        pos: ``[B, H, C]`` int64 slot positions, ``-1`` = empty.
        score: ``[B, H, C]`` float32 selection statistic (mean attention probability).
    Returns:
        ``order [B, H, C]`` (slot of the ``i``-th lowest position, empty slots first), the
        sorted positions and scores, and ``edge [B, H, C - 1]``: ``score_i + score_{i+1}``
        (averaged over heads unless ``per_head``), ``inf`` where the pair may not merge (an
        empty slot, a sink on the left, the right one inside the recent window). ``gamma > 0``
        divides pair ``j`` (``j``-th occupied slot on the left) by ``exp(j/γ)``, the reference
        code's recency factor: later pairs look cheaper.
    """
    order = pos.argsort(dim=-1)
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


def _index(x: Tensor, slot: Tensor) -> Tensor:
    """``slot [B, H]`` as a gather/scatter index into ``x`` along dim 2."""
    if x.dim() == 3:
        return slot[..., None]
    return slot[..., None, None].expand(*slot.shape, 1, x.shape[-1])


def _at(x: Tensor, slot: Tensor) -> Tensor:
    """``x[b, h, slot[b, h]]``: ``[B, H]`` of ``[B, H, N]``, ``[B, H, D]`` of ``[B, H, N, D]``."""
    idx = _index(x, slot)
    return x.gather(2, idx).squeeze(2)


def _put(x: Tensor, slot: Tensor, value: Tensor, where: Tensor) -> None:
    """``x[b, h, slot] = value`` where ``where [B, H]``, in place (``value`` as ``_at`` gives)."""
    B, H = slot.shape
    rows = torch.arange(B, device=slot.device)[:, None].expand(B, H)
    heads = torch.arange(H, device=slot.device)[None, :].expand(B, H)
    keep = where if x.dim() == 3 else where[..., None]
    # index_put_ stays in place on the cache under Inductor; a scatter_ copies the whole buffer.
    x.index_put_((rows, heads, slot), torch.where(keep, value.to(x.dtype), _at(x, slot)))


def merge_pair_reference(
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
    """Merge slot ``first`` into slot ``second`` where ``do``; returns ``fallback [B, H]``.

    Args:
        k, v: ``[B, H, N, D]`` post-RoPE keys and mean values (mutated).
        logc, hess, score, steps: ``[B, H, N]`` float32 slot state (mutated); pos ``[B, H, N]``
            int64 (mutated).
        alpha: ``[B, H, C]`` (``C ≤ N``) the step's mean attention probability per slot.
        out: ``[B, H, D]`` float32 the step's mean-value attention output ``Σ α_j m_j``.
        first, second: ``[B, H]`` int64 slots; ``do [B, H]`` bool.
        inv_freq: ``[r/2]`` the layer's RoPE inverse frequencies, or None (no RoPE).
        convex: clip the closed-form weights to ``[0, 1]`` (``k*`` on the segment between the
            two keys; the paper's ``k*`` may extrapolate where ``h₁₂`` exceeds one ``h``).
    """
    h1, h2 = _at(hess, first), _at(hess, second)
    s1, s2 = _at(score, first), _at(score, second)
    m1, m2 = _at(v, first).float(), _at(v, second).float()
    h12 = _at(alpha, first) * _at(alpha, second) * (m1 + m2 - 2 * out).norm(dim=-1)
    w1, w2 = h1 - h12, h2 - h12
    total = w1 + w2
    # Not convex: a member with h <= 0, h11 h22 <= h12², or a vanishing sum of weights.
    fallback = (h1 <= 0) | (h2 <= 0) | (h1 * h2 <= h12**2)
    fallback |= total <= eps * (h1.abs() + h2.abs())
    s_total = s1 + s2
    by1 = torch.where(s_total > 0, s1 / s_total.clamp_min(1e-30), 0.5)
    by2 = torch.where(s_total > 0, s2 / s_total.clamp_min(1e-30), 0.5)
    denom = torch.where(fallback, 1, total)
    w1 = torch.where(fallback, by1, w1 / denom)
    w2 = torch.where(fallback, by2, w2 / denom)
    if convex:
        w1, w2 = w1.clamp_min(0), w2.clamp_min(0)
        w1, w2 = w1 / (w1 + w2), w2 / (w1 + w2)

    k1, k2 = _at(k, first).float(), _at(k, second).float()
    if inv_freq is not None:
        gap = _at(pos, second) - _at(pos, first)
        k1 = rope_rotate(k1, gap, inv_freq.to(k1.device), rotary_dim)
    c1, c2 = _at(logc, first).exp(), _at(logc, second).exp()
    merged = {
        "k": w1[..., None] * k1 + w2[..., None] * k2,
        "v": (c1[..., None] * m1 + c2[..., None] * m2) / (c1 + c2)[..., None],
        "logc": (c1 + c2).log(),
        "hess": w1**2 * h1 + w2**2 * h2,
        "score": s1 + s2,
    }
    buffers = {"k": k, "v": v, "logc": logc, "pos": pos, "hess": hess, "score": score,
               "steps": steps}  # fmt: skip
    for name, value in merged.items():
        _put(buffers[name], second, value, do)
    for name, buf in buffers.items():
        _put(buf, first, torch.full_like(_at(buf, first), EMPTY[name]), do)
    return fallback & do


@kernel_op("kvslim::select_pair")
def select_pair(
    pos: Tensor, score: Tensor, sink: int, recent: int, per_head: bool, gamma: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Registered op: the Triton kernel on CUDA, the reference elsewhere."""
    if pos.is_cuda and HAS_TRITON:
        return select_pair_triton(pos, score, sink, recent, per_head, gamma)
    return select_pair_reference(pos, score, sink, recent, per_head, gamma)


@kernel_op("kvslim::merge_pair", mutates_args=("k", "v", "logc", "pos", "hess", "score", "steps"))
def merge_pair(
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
        return merge_pair_triton(*args)
    return merge_pair_reference(*args)
