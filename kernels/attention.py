"""Cardinality-aware attention over a slot cache plus the step's new tokens: ``kvslim::attend``.

One op serves every method. The queries of a step attend over the union of

* the cache's ``C`` slots (keys post-RoPE, *mean* values, ``log c`` per slot, a position per slot;
  position ``-1`` marks an empty slot), and
* the step's ``L`` new tokens (cardinality 1, positions ``q_pos``; ``-1`` marks a pad),

with visibility decided by positions alone, so causality inside the chunk, left padding, a
layer's sliding window and a StreamingLLM-style sink + recent window are one rule::

    visible(i, j) = pos_j >= 0 and pos_i >= 0 and pos_j <= pos_i
                    and (window == 0 or pos_i - pos_j < window)
                    and (recent == 0 or pos_j < sink or pos_i - pos_j < recent)

Logits get the additive bias ``log c_j`` (cardinality-aware attention: a slot holding ``c`` merged
tokens counts ``c`` times; all ``c = 1`` is plain attention). A query that sees nothing (a pad)
returns zeros, never NaN. Optionally the op returns the attention mass each key received, summed
over the step's queries and the query heads of its KV group (the score-based methods need it).

The op is pure: writing the new tokens into the cache is the caller's job, after attention, so
that a chunk still sees the slots its own tokens are about to replace.

``kvslim::attend_int8`` is the same attention over a cache of int8 codes with a scale per group
of channels (the ``int8`` storage): the Triton kernel dequantises each row as it loads it; the
reference dequantises the cache first (:func:`dequantize_rows`) and runs ``kvslim::attend``'s.

``kvslim::attend_latent`` is the same attention over a cache whose first slots are low-rank
latents shared by the KV heads and whose others are dense rows (``lorc``: all latents, bases
for the batch; ``xkv``: the prompt's tokens as rows of the group's token basis with the layer's
factors per sequence, dense rows after them). Keys are rebuilt from their latents
(``c_K B_Kᵀ``) and, as the dense rows, rotated to their positions (both are stored before
RoPE); latent values are read in the latent space: the
probabilities weight the latents, and ``B_V`` maps the weighted sum to each head
(``Σ_j p_j (c_j B_V) = (Σ_j p_j c_j) B_V``), so values are never rebuilt. That is what the
reference and the Triton kernel (``latent_triton.py``) do; the CPU path rebuilds both first and
runs ``kvslim::attend``'s fused kernel: the rebuild costs ``C · (r_K + r_V) · H_kv·D``
multiply-adds per layer and step, and the whole is still faster than the reference's explicit
probabilities (SmolLM2's shapes at 8k slots, one thread: 2.3x on a 512-token chunk, 1.2x on one
token).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import HAS_TRITON, kernel_op
from .run_merge import rope_rotate

if HAS_TRITON:
    from .attention_triton import attend_triton
    from .latent_triton import attend_latent_triton

__all__ = ["attend", "attend_int8", "attend_latent", "attend_latent_reference", "attend_reference",
           "attend_sdpa", "dequantize_rows", "latent_rows", "window_mass"]  # fmt: skip


def _visible(q_pos: Tensor, k_pos: Tensor, window: int, sink: int, recent: int) -> Tensor:
    """``q_pos [B, 1, 1, L, 1]``, ``k_pos [B, H_kv, 1, 1, N]`` → bool ``[B, H_kv, 1, L, N]``."""
    vis = (k_pos >= 0) & (q_pos >= 0) & (k_pos <= q_pos)
    if window > 0:
        vis = vis & (q_pos - k_pos < window)
    if recent > 0:
        vis = vis & ((k_pos < sink) | (q_pos - k_pos < recent))
    return vis


def attend_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cache_k: Tensor,
    cache_v: Tensor,
    cache_logc: Tensor,
    cache_pos: Tensor,
    q_pos: Tensor,
    scale: float,
    window: int = 0,
    sink: int = 0,
    recent: int = 0,
    return_mass: bool = False,
) -> tuple[Tensor, Tensor]:
    """PyTorch twin of the Triton kernel (and the CPU implementation).

    Args:
        q: ``[B, H_q, L, D]`` queries of the step.
        k, v: ``[B, H_kv, L, D]`` the step's new keys / values (``H_q % H_kv == 0``).
        cache_k, cache_v: ``[B, H_kv, C, D]`` cached keys and mean values.
        cache_logc: ``[B, H_kv, C]`` float32 ``log`` cardinality of each slot.
        cache_pos: ``[B, H_kv, C]`` int64 position of each slot, ``-1`` = empty.
        q_pos: ``[B, L]`` int64 position of each new token, ``-1`` = padding.
    Returns:
        ``out [B, H_q, L, D]`` in ``q.dtype`` and ``mass [B, H_kv, C + L]`` float32
        (``[0]`` when ``return_mass`` is false): cache slots first, then the new tokens.
    """
    B, Hq, L, D = q.shape
    p = _probabilities(q, k, cache_k, cache_logc, cache_pos, q_pos, scale, window, sink, recent)
    vals = torch.cat([cache_v, v], dim=2).float()
    out = torch.einsum("bhgln,bhnd->bhgld", p, vals).reshape(B, Hq, L, D).to(q.dtype)
    mass = p.sum(dim=(2, 3)) if return_mass else q.new_zeros(0, dtype=torch.float32)
    return out, mass


def _probabilities(
    q: Tensor,
    k: Tensor,
    cache_k: Tensor,
    cache_logc: Tensor,
    cache_pos: Tensor,
    q_pos: Tensor,
    scale: float,
    window: int,
    sink: int,
    recent: int,
) -> Tensor:
    """The reference's attention probabilities ``[B, H_kv, G, L, C + L]`` (float32; cache slots
    first, then the new tokens; a query that sees nothing has all zeros)."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    keys = torch.cat([cache_k, k], dim=2).float()  # [B, Hkv, N, D]
    logc = torch.cat([cache_logc.float(), cache_logc.new_zeros(B, Hkv, L)], dim=2)
    k_pos = torch.cat([cache_pos, q_pos[:, None, :].expand(B, Hkv, L)], dim=2)
    qf = q.float().reshape(B, Hkv, Hq // Hkv, L, D)
    s = torch.einsum("bhgld,bhnd->bhgln", qf, keys) * scale + logc[:, :, None, None, :]
    vis = _visible(q_pos[:, None, None, :, None], k_pos[:, :, None, None, :], window, sink, recent)
    s = s.masked_fill(~vis, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    return p / torch.where(denom > 0, denom, torch.ones_like(denom))


def attend_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cache_k: Tensor,
    cache_v: Tensor,
    cache_logc: Tensor,
    cache_pos: Tensor,
    q_pos: Tensor,
    scale: float,
    window: int = 0,
    sink: int = 0,
    recent: int = 0,
    return_mass: bool = False,
) -> tuple[Tensor, Tensor]:
    """:func:`attend_reference` on PyTorch's CPU kernels (what the op runs on CPU).

    The reference materialises the ``[B, H_q, L, C + L]`` probabilities several times and copies
    the cache to append the step's keys; this never does either. The cache and the new tokens
    are attended as two parts joined by their log-sum-exps, and the query heads of a KV group
    fold into the query axis, so keys are never repeated. Without ``mass`` the fused kernel runs
    (~4x faster than the reference at 8k slots). With it, the scores are computed once and give
    the output and the mass together: one read of the keys and one of the values, where the
    fused kernel plus a second score matmul for the mass read the keys twice.
    """
    if not return_mass and _on_real_tensors(q):
        out = _attend_unmasked(q, k, v, cache_k, cache_v, cache_logc, cache_pos, q_pos, scale,
                               window, sink, recent)  # fmt: skip
        if out is not None:
            return out, q.new_zeros(0, dtype=torch.float32)
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    qg = _dense_rows(q, q.dtype).reshape(B, Hkv, G * L, D)
    new_pos = q_pos[:, None, :].expand(B, Hkv, L)
    parts = [
        (cache_k, cache_v, cache_logc.float(), cache_pos),
        (k, v, torch.zeros(B, Hkv, L, device=q.device), new_pos),
    ]
    parts = [p for p in parts if p[0].shape[2] > 0]
    visible, biases = [], []
    for _, _, logc, k_pos in parts:
        vis = _visible(q_pos[:, None, :, None], k_pos[:, :, None, :], window, sink, recent)
        bias = torch.where(vis, logc[:, :, None, :], -torch.inf)  # [B, Hkv, L, N]
        # Each query head of the group uses its KV head's mask: [B, Hkv, G * L, N].
        bias = bias[:, :, None].expand(B, Hkv, G, L, bias.shape[-1])
        visible.append(vis)
        biases.append(bias.reshape(B, Hkv, G * L, -1))
    if return_mass:
        return _attend_scored(qg, parts, biases, scale, q.shape)
    outs, lses = [], []
    for (keys, vals, _, _), bias, vis in zip(parts, biases, visible, strict=True):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qg, _dense_rows(keys, q.dtype), _dense_rows(vals, q.dtype), 0.0, False,
            attn_mask=bias, scale=scale,
        )  # fmt: skip
        outs.append(out.float())
        # A query that sees nothing in a part gets lse 0 from the kernel, not -inf.
        seen = vis.any(-1)[:, :, None].expand(B, Hkv, G, L).reshape(B, Hkv, G * L)
        lses.append(torch.where(seen, lse, -torch.inf))
    lse = torch.stack(lses)  # [parts, B, Hkv, G * L]
    top = lse.amax(0)
    w = torch.exp(lse - torch.where(torch.isfinite(top), top, 0))
    w = w / w.sum(0).clamp_min(1e-30)
    out = (torch.stack(outs) * w[..., None]).sum(0).reshape(B, Hq, L, D).to(q.dtype)
    return out, q.new_zeros(0, dtype=torch.float32)


def _on_real_tensors(q: Tensor) -> bool:
    """Whether this call runs on real tensors, eagerly: not traced by dynamo, export, make_fx
    or under fake tensors (whose values a host read cannot see)."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return (
        type(q) is Tensor
        and not torch.compiler.is_compiling()
        and get_proxy_mode() is None
        and torch._guards.detect_fake_mode() is None
    )


def _attend_unmasked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cache_k: Tensor,
    cache_v: Tensor,
    cache_logc: Tensor,
    cache_pos: Tensor,
    q_pos: Tensor,
    scale: float,
    window: int,
    sink: int,
    recent: int,
) -> Tensor | None:
    """:func:`attend_sdpa`'s output without masks, where the positions allow it; None where
    they do not. Eager calls only: it reads the positions on the host.

    A prompt's chunk without padding after a cache whose occupied slots form a prefix, all of
    them older than the chunk, visible to every query and holding one token each (a ``full``
    cache, or any before its first eviction): then the cache part needs no mask and the new
    part is plain causal attention, so neither builds the ``[B, H, L, C]`` mask, and empty
    slots past the occupied prefix are not read. At 2k tokens in 512-token chunks this halves
    SmolLM2's eager prefill.
    """
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    first = q_pos[:, :1]
    steps = torch.arange(L, device=q_pos.device)
    if bool((first < 0).any()) or not torch.equal(q_pos, first + steps):
        return None  # padding, or a chunk that is not consecutive positions
    span = L - 1  # the longest query-key distance inside the chunk
    if window and span >= window:
        return None
    # Inside the chunk the recent rule hides key j from the newest query only where j is no
    # sink: with no such key the chunk is plain causal (StreamingLLM's sinks + one recent slot
    # prefilling its first tokens, say).
    if recent and bool((first.clamp_min(sink) <= first + span - recent).any()):
        return None
    filled = cache_pos >= 0
    n = int(filled.flatten(0, 1).any(0).nonzero().max()) + 1 if bool(filled.any()) else 0
    if n:
        held = cache_pos[..., :n]
        if not bool(filled[..., :n].all()) or bool(cache_logc[..., :n].ne(0).any()):
            return None  # a hole in the prefix, or merged slots (their log c is a bias)
        newest_q, oldest_k = int(q_pos.max()), int(held.min())
        if int(held.max()) >= int(first.min()):
            return None
        if window and newest_q - oldest_k >= window:
            return None
        if recent and not bool(((held < sink) | (newest_q - held < recent)).all()):
            return None
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    # The chunk: causal over its own keys, each query head with its KV head's keys.
    qh = _dense_rows(q, q.dtype)
    kh, vh = (_dense_rows(x, q.dtype).repeat_interleave(G, dim=1) for x in (k, v))
    out, lse = flash(qh, kh, vh, 0.0, True, scale=scale)
    if not n:
        return out
    # The cache: every query sees every occupied slot; a KV group's query heads fold into rows.
    qg = qh.reshape(B, Hkv, G * L, D)
    keys, vals = (_dense_rows(x[:, :, :n], q.dtype) for x in (cache_k, cache_v))
    out_c, lse_c = flash(qg, keys, vals, 0.0, False, scale=scale)
    lse_c = lse_c.reshape(B, Hq, L)
    top = torch.maximum(lse, lse_c)
    w, w_c = torch.exp(lse - top), torch.exp(lse_c - top)
    mixed = out.float() * w[..., None] + out_c.reshape(B, Hq, L, D).float() * w_c[..., None]
    return (mixed / (w + w_c)[..., None]).to(q.dtype)


def _attend_scored(
    qg: Tensor, parts: list, biases: list[Tensor], scale: float, shape: torch.Size
) -> tuple[Tensor, Tensor]:
    """:func:`attend_sdpa` with the mass: explicit scores ``[B, H_kv, G·L, N]`` per part, one
    softmax over the parts, then the output and the mass from the same probabilities (in
    float32, as the reference: a no-op for a float32 cache)."""
    scores = [
        torch.matmul(qg.float(), keys.float().transpose(-1, -2)) * scale + bias
        for (keys, *_), bias in zip(parts, biases, strict=True)
    ]
    top = torch.stack([s.amax(-1) for s in scores]).amax(0, keepdim=True)[0, ..., None]
    top = torch.where(torch.isfinite(top), top, 0)
    probs = [torch.exp(s - top) for s in scores]
    # Rows that see nothing have total 0: their probabilities and output stay exactly 0.
    total = sum(p.sum(-1, keepdim=True) for p in probs).clamp_min(1e-30)
    probs = [p / total for p in probs]
    out = sum(torch.matmul(p, vals.float()) for p, (_, vals, *_) in zip(probs, parts, strict=True))
    mass = torch.cat([p.sum(2) for p in probs], dim=2)
    return out.reshape(shape).to(qg.dtype), mass


def window_mass(
    q: Tensor,
    q_pos: Tensor,
    cache_k: Tensor,
    cache_logc: Tensor,
    cache_pos: Tensor,
    scale: float,
    window: int = 0,
) -> tuple[Tensor, Tensor]:
    """The attention mass that queries already in the cache put on each cached slot.

    What a question-aware compression scores by (SnapKV's observation window): the last queries
    of a prompt, whose keys are cached too, attend over the cache alone. Plain PyTorch: it runs
    once per prompt, not per step.

    Args:
        q: ``[B, H_q, W, D]`` the queries; ``q_pos [B, W]`` their positions (``-1`` = none).
        cache_k: ``[B, H_kv, C, D]``; ``cache_logc``, ``cache_pos``: ``[B, H_kv, C]``.
    Returns:
        ``mass [B, H_kv, C]`` float32 (summed over the queries and the KV group's query heads)
        and ``seen [B, H_kv, C]``: how many query rows could see each slot.
    """
    B, Hq, W, D = q.shape
    Hkv = cache_k.shape[1]
    G = Hq // Hkv
    s = torch.einsum("bhgwd,bhcd->bhgwc", q.float().reshape(B, Hkv, G, W, D), cache_k.float())
    s = s * scale + cache_logc.float()[:, :, None, None, :]
    vis = _visible(q_pos[:, None, None, :, None], cache_pos[:, :, None, None, :], window, 0, 0)
    s = s.masked_fill(~vis, float("-inf"))
    top = s.amax(dim=-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isfinite(top), top, 0))
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return p.sum(dim=(2, 3)), vis.expand(B, Hkv, G, W, -1).sum(dim=(2, 3)).float()


def _dense_rows(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` in ``dtype`` with unit stride along its last axis (the fused kernel's assumption)."""
    x = x.to(dtype)
    return x if x.stride(-1) == 1 else x.contiguous()


@kernel_op("kvslim::attend")
def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cache_k: Tensor,
    cache_v: Tensor,
    cache_logc: Tensor,
    cache_pos: Tensor,
    q_pos: Tensor,
    scale: float,
    window: int = 0,
    sink: int = 0,
    recent: int = 0,
    return_mass: bool = False,
) -> tuple[Tensor, Tensor]:
    """Registered op: the Triton kernel on CUDA, the reference elsewhere (same signature)."""
    args = (q, k, v, cache_k, cache_v, cache_logc, cache_pos, q_pos, scale, window, sink, recent)
    if q.is_cuda and HAS_TRITON:
        return attend_triton(*args, return_mass=return_mass)
    return _attend_here(args, return_mass)


def _attend_here(args: tuple, return_mass: bool) -> tuple[Tensor, Tensor]:
    """``kvslim::attend`` without Triton: the fused SDPA path on the CPU, else the reference."""
    # With a symbolic step length (an exported package's prefill) the fused kernel's strides
    # make torch.export emit guards no length range satisfies; such graphs use the reference.
    q = args[0]
    if q.device.type == "cpu" and not isinstance(q.shape[2], torch.SymInt):
        return attend_sdpa(*args, return_mass=return_mass)
    return attend_reference(*args, return_mass=return_mass)


def dequantize_rows(codes: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """int8 ``codes [..., D]`` times their scales ``[..., D / group]`` (one per ``group``
    channels), in ``dtype``: torchao's ``dequantize_affine`` for symmetric int8, bit for bit."""
    group = codes.shape[-1] // scale.shape[-1]
    return (codes.float() * scale.float().repeat_interleave(group, dim=-1)).to(dtype)


@kernel_op("kvslim::attend_int8")
def attend_int8(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cache_kq: Tensor,
    cache_k_scale: Tensor,
    cache_vq: Tensor,
    cache_v_scale: Tensor,
    cache_logc: Tensor,
    cache_pos: Tensor,
    q_pos: Tensor,
    scale: float,
    window: int = 0,
    sink: int = 0,
    recent: int = 0,
    return_mass: bool = False,
) -> tuple[Tensor, Tensor]:
    """``kvslim::attend`` over int8 rows ``cache_kq, cache_vq [B, H_kv, C, D]`` and their scales
    ``[B, H_kv, C, D / group]``: dequantised as loaded by the Triton kernel on CUDA; elsewhere
    dequantised first (in ``q``'s dtype), then attended as ``kvslim::attend`` does."""
    if q.is_cuda and HAS_TRITON:
        return attend_triton(
            q, k, v, cache_kq, cache_vq, cache_logc, cache_pos, q_pos, scale, window, sink,
            recent, return_mass=return_mass, cache_k_scale=cache_k_scale,
            cache_v_scale=cache_v_scale,
        )  # fmt: skip
    cache_k = dequantize_rows(cache_kq, cache_k_scale, q.dtype)
    cache_v = dequantize_rows(cache_vq, cache_v_scale, q.dtype)
    args = (q, k, v, cache_k, cache_v, cache_logc, cache_pos, q_pos, scale, window, sink, recent)
    return _attend_here(args, return_mass)


def latent_rows(latent: Tensor, basis: Tensor, num_heads: int) -> Tensor:
    """Latents ``[B, 1, N, r]`` times ``basisᵀ`` (``basis [H·D, r]``, or ``[B, H·D, r]``: one per
    batch row) as rows ``[B, H, N, D]`` (float32)."""
    B, _, N, _ = latent.shape
    flat = latent[:, 0].float() @ basis.float().transpose(-1, -2)  # [B, N, H·D]
    return flat.view(B, N, num_heads, basis.shape[-2] // num_heads).transpose(1, 2)


def _rows_read(
    cache_ck: Tensor,
    basis_k: Tensor,
    cache_k: Tensor,
    cache_pos: Tensor,
    inv_freq: Tensor | None,
    rotary_dim: int,
    attention_scaling: float,
) -> Tensor:
    """Every cached key ``[B, H_kv, C, D]`` (float32) as attention reads it: the latent slots'
    rebuilt, then the dense rows, rotated to ``cache_pos`` (an empty slot as position 0) where
    ``inv_freq`` is given."""
    keys = torch.cat([latent_rows(cache_ck, basis_k, cache_k.shape[1]), cache_k.float()], dim=2)
    if inv_freq is None:
        return keys
    turned = rope_rotate(keys, cache_pos.clamp_min(0), inv_freq, rotary_dim)
    return torch.cat([turned[..., :rotary_dim] * attention_scaling,
                      turned[..., rotary_dim:]], dim=-1)  # fmt: skip


def attend_latent_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cache_ck: Tensor,
    cache_cv: Tensor,
    basis_k: Tensor,
    basis_v: Tensor,
    cache_k: Tensor,
    cache_v: Tensor,
    cache_logc: Tensor,
    cache_pos: Tensor,
    q_pos: Tensor,
    scale: float,
    window: int = 0,
    sink: int = 0,
    recent: int = 0,
    return_mass: bool = False,
    inv_freq: Tensor | None = None,
    rotary_dim: int = 0,
    attention_scaling: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """:func:`attend_reference` over a cache whose first ``C_lat`` slots are latents shared by
    the KV heads and whose other ``C − C_lat`` are dense rows.

    Args:
        cache_ck, cache_cv: ``[B, 1, C_lat, r_k]``, ``[B, 1, C_lat, r_v]`` latents.
        basis_k, basis_v: ``[H_kv·D, r]`` (lorc: one for the batch) or ``[B, H_kv·D, r]`` (xkv:
            a sequence's own factors); a latent slot's row is ``c basisᵀ``.
        cache_k, cache_v: ``[B, H_kv, C − C_lat, D]`` dense rows (keys before RoPE where
            ``inv_freq`` is given, as the latent slots' keys).
        cache_logc, cache_pos: ``[B, H_kv, C]``, latent slots first.
    The new tokens' ``k`` (rotated) and ``v`` are attended as they are. Cached keys are rotated to
    ``cache_pos`` (HF's ``rotate_half`` layout on the first ``rotary_dim`` channels, cos and sin
    times ``attention_scaling``) where ``inv_freq`` is given.
    """
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    keys = _rows_read(cache_ck, basis_k, cache_k, cache_pos, inv_freq, rotary_dim,
                      attention_scaling)  # fmt: skip
    p = _probabilities(q, k, keys, cache_logc, cache_pos, q_pos, scale, window, sink, recent)
    C_lat, C = cache_ck.shape[2], cache_logc.shape[2]
    # Latent values: Σ_j p_j c_j, then each KV head's block of basis_v (per batch row or not).
    weighted = torch.einsum("bhgln,bnr->bhglr", p[..., :C_lat], cache_cv[:, 0].float())
    blocks = basis_v.float().reshape(-1, Hkv, D, basis_v.shape[-1])  # [1 or B, H_kv, D, r_v]
    out = torch.einsum("bhglr,bhdr->bhgld", weighted, blocks.expand(B, -1, -1, -1))
    out = out + torch.einsum("bhgln,bhnd->bhgld", p[..., C_lat:C], cache_v.float())
    out = out + torch.einsum("bhgln,bhnd->bhgld", p[..., C:], v.float())
    mass = p.sum(dim=(2, 3)) if return_mass else q.new_zeros(0, dtype=torch.float32)
    return out.reshape(B, Hq, L, D).to(q.dtype), mass


@kernel_op("kvslim::attend_latent")
def attend_latent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cache_ck: Tensor,
    cache_cv: Tensor,
    basis_k: Tensor,
    basis_v: Tensor,
    cache_k: Tensor,
    cache_v: Tensor,
    cache_logc: Tensor,
    cache_pos: Tensor,
    q_pos: Tensor,
    scale: float,
    window: int = 0,
    sink: int = 0,
    recent: int = 0,
    return_mass: bool = False,
    inv_freq: Tensor | None = None,
    rotary_dim: int = 0,
    attention_scaling: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Registered op (:func:`attend_latent_reference`'s arguments): the Triton kernel on CUDA
    (keys rebuilt and rotated as they are loaded, latent values weighted as latents); elsewhere
    the rows are rebuilt first and attended as ``kvslim::attend`` does (its fused CPU kernel; see
    the module docstring)."""
    args = (q, k, v, cache_ck, cache_cv, basis_k, basis_v, cache_k, cache_v, cache_logc,
            cache_pos, q_pos, scale, window, sink, recent, return_mass, inv_freq, rotary_dim,
            attention_scaling)  # fmt: skip
    if q.is_cuda and HAS_TRITON:
        return attend_latent_triton(*args)
    H_kv = k.shape[1]
    keys = _rows_read(cache_ck, basis_k, cache_k, cache_pos, inv_freq, rotary_dim,
                      attention_scaling).to(q.dtype)  # fmt: skip
    values = torch.cat([latent_rows(cache_cv, basis_v, H_kv).to(q.dtype), cache_v.to(q.dtype)],
                       dim=2)  # fmt: skip
    dense = (q, k, v, keys, values, cache_logc, cache_pos, q_pos, scale, window, sink, recent)
    return _attend_here(dense, return_mass)
