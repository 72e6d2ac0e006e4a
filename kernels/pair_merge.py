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
The merge reference is ``run_merge.merge_runs`` on a run of two: the arithmetic that
``KVSlimmer._merge`` runs over the whole cache (chunked prefill), so decode matches it bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import HAS_TRITON, kernel_op
from .run_merge import adjacent_coupling, merge_runs

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


def _gather(x: Tensor, slots: Tensor) -> Tensor:
    """``x[b, h, slots[b, h]]`` for ``slots [B, H, K]``: ``[B, H, K]`` or ``[B, H, K, D]``."""
    idx = slots if x.dim() == 3 else slots[..., None].expand(*slots.shape, x.shape[-1])
    return x.gather(2, idx)


def _at(x: Tensor, slot: Tensor) -> Tensor:
    """``x[b, h, slot[b, h]]`` for ``slot [B, H]``: ``[B, H]`` or ``[B, H, D]``."""
    return _gather(x, slot[..., None]).squeeze(2)


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

    The two slots, ``first`` the earlier, are one run of :func:`~.run_merge.merge_runs`.

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
    pair = torch.stack([first, second], dim=-1)  # [B, H, 2]
    m = _gather(v, pair).float()
    merged = merge_runs(
        _gather(k, pair).float(), m, _gather(logc, pair), _gather(hess, pair),
        _gather(score, pair), _gather(pos, pair),
        adjacent_coupling(_gather(alpha, pair), m, out[:, :, None]), torch.ones_like(do)[..., None],
        inv_freq, rotary_dim, convex, eps,
    )  # fmt: skip
    buffers = {"k": k, "v": v, "logc": logc, "pos": pos, "hess": hess, "score": score,
               "steps": steps}  # fmt: skip
    for name in ("k", "v", "logc", "hess", "score"):
        _put(buffers[name], second, getattr(merged, name)[:, :, 1], do)
    for name, buf in buffers.items():
        _put(buf, first, torch.full_like(_at(buf, first), EMPTY[name]), do)
    return merged.fallback[:, :, 1] & do


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
