"""Triton implementation of ``kvslim::attend_latent`` (see ``attention.py`` for the semantics).

The cache's first ``C_lat`` slots are latents shared by the KV heads (``c_K [C_lat, r_k]``,
``c_V [C_lat, r_v]``) with bases ``B_K [H_kv·D, r_k]``, ``B_V [H_kv·D, r_v]`` (lorc: one for
the batch; xkv: one per sequence), the other ``C − C_lat`` are dense rows (xkv's tokens after
the prompt), all keys before RoPE. As ``attention_triton``'s kernels, one program owns a block
of the ``G · L`` query rows of one ``(batch, KV head)`` and a split of the cache's slots, and

* latent keys are rebuilt as they are loaded: ``k = c_K B_hᵀ`` for the head's ``D`` rows of
  ``B_K``, accumulated over blocks of the rank so the tiles stay small at large ranks. RoPE is
  two such dots: HF's ``rotate_half(k)`` is ``c_K`` times the same rows of ``B_K`` permuted
  (channel ``i`` takes ``i ± r/2``) and signed, so ``k cos + rotate_half(k) sin`` needs no
  shuffle of the rebuilt tile; a dense row is loaded twice, at its channels and at the permuted
  ones. cos and sin come from the slots' positions and ``inv_freq`` in fp32, as HF's;
* latent values stay latent: the online softmax weights the latent rows into
  ``acc [rows, r_v]``, and the head's rows of ``B_V`` map it to ``D`` once, after the latent
  slots (``Σ p c B_hᵀ = (Σ p c) B_hᵀ``); ``r_v`` is padded to a power of two and held whole per
  program: fine up to a few hundred (SmolLM2 at ratio 0.5: 96), a register limit beyond;
* then the dense rows and, in the last split, the step's new tokens (already rotated).

Every KV head's program reads the same latents: ``H_kv`` reads of ``(r_k + r_v)`` numbers per
slot, against ``2 · D`` per head for a dense cache. The programs of one batch row run together,
so after the first read the latents come from L2 (SmolLM2 at 8k slots: 3 MB per layer in bf16);
that this holds on a real GPU is not yet measured (none was lent).

The ``mass`` kernel recomputes the probabilities from the saved log-sum-exp, one program per
block of cache slots or of new tokens, as ``_attend_mass`` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .attention_triton import (
    _block,
    _column_mass,
    _config,
    _load_queries,
    _native,
    _online,
    _scores,
    _store_rows,
    combine_splits,
    split_keys,
    split_outputs,
)

__all__ = ["attend_latent_triton"]


@triton.jit
def _rotate(k, k_half, pos, offs_d, FREQ, rotary_dim, attention_scaling):
    """``k cos + rotate_half(k) sin`` on the first ``rotary_dim`` channels (times
    ``attention_scaling``) at positions ``pos`` (clamped at 0); ``k_half`` is ``rotate_half(k)``
    before its sign."""
    half = rotary_dim // 2
    turns = offs_d < rotary_dim
    sign = tl.where(offs_d < half, -1.0, 1.0)
    freq = tl.load(FREQ + offs_d % tl.maximum(half, 1), mask=turns, other=0.0)
    angle = tl.maximum(pos, 0).to(tl.float32)[:, None] * freq.to(tl.float32)[None, :]
    cos = tl.where(turns[None, :], tl.cos(angle) * attention_scaling, 1.0)
    sin = tl.where(turns[None, :], tl.sin(angle) * attention_scaling, 0.0)
    return k * cos + (k_half * sign[None, :]) * sin


@triton.jit
def _partner(offs_d, rotary_dim):
    """The channel ``rotate_half`` brings to each channel (``i ± r/2``)."""
    half = rotary_dim // 2
    return tl.where(offs_d < half, offs_d + half, offs_d - half)


@triton.jit
def _latent_keys(
    CK, BK, FREQ, sck_n, sck_r, sbk_d, sbk_r, offs_n, pos, offs_d, C_LAT, D, R, rotary_dim,
    attention_scaling, ROPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Keys of latent slots ``offs_n`` (zeros from ``C_LAT`` on) ``[BLOCK_N, BLOCK_D]`` fp32:
    latents ``CK`` (one batch row) times the head's basis rows ``BK`` (``[D, R]``), rotated."""
    n_ok = offs_n[:, None] < C_LAT
    d_ok = offs_d[:, None] < D
    partner = _partner(offs_d, rotary_dim)
    turns = offs_d[:, None] < rotary_dim
    k = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    k_half = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r[None, :] < R
        lat = tl.load(CK + offs_n[:, None] * sck_n + offs_r[None, :] * sck_r,
                      mask=n_ok & r_ok, other=0.0).to(tl.float32)  # fmt: skip
        rows = tl.load(BK + offs_d[:, None] * sbk_d + offs_r[None, :] * sbk_r,
                       mask=d_ok & r_ok, other=0.0).to(tl.float32)  # fmt: skip
        k += tl.dot(lat, tl.trans(rows), input_precision=DOT_PRECISION)
        if ROPE:
            swapped = tl.load(BK + partner[:, None] * sbk_d + offs_r[None, :] * sbk_r,
                              mask=turns & d_ok & r_ok, other=0.0)  # fmt: skip
            swapped = swapped.to(tl.float32)
            k_half += tl.dot(lat, tl.trans(swapped), input_precision=DOT_PRECISION)
    if ROPE:
        k = _rotate(k, k_half, pos, offs_d, FREQ, rotary_dim, attention_scaling)
    return k


@triton.jit
def _dense_keys(
    KD, skd_n, skd_d, offs_n, pos, offs_d, C_LAT, C, D, FREQ, rotary_dim, attention_scaling,
    ROPE: tl.constexpr,
):  # fmt: skip
    """Keys of dense slots ``offs_n`` (rows ``offs_n − C_LAT``; zeros outside ``[C_LAT, C)``)
    ``[BLOCK_N, BLOCK_D]`` fp32, rotated."""
    row = offs_n[:, None] - C_LAT
    ok = (offs_n[:, None] >= C_LAT) & (offs_n[:, None] < C)
    k = tl.load(KD + row * skd_n + offs_d[None, :] * skd_d, mask=ok & (offs_d[None, :] < D),
                other=0.0).to(tl.float32)  # fmt: skip
    if ROPE:
        partner = _partner(offs_d, rotary_dim)
        turns = offs_d[None, :] < rotary_dim
        k_half = tl.load(KD + row * skd_n + partner[None, :] * skd_d, mask=ok & turns,
                         other=0.0).to(tl.float32)  # fmt: skip
        k = _rotate(k, k_half, pos, offs_d, FREQ, rotary_dim, attention_scaling)
    return k


@triton.jit
def _rows(X, sx_n, sx_d, offs_n, offs_d, first, end, D):
    """Rows ``offs_n − first`` of ``X`` for ``offs_n`` in ``[first, end)`` (zeros elsewhere),
    ``[BLOCK_N, BLOCK_D]`` fp32."""
    ok = (offs_n[:, None] >= first) & (offs_n[:, None] < end) & (offs_d[None, :] < D)
    rows = tl.load(X + (offs_n[:, None] - first) * sx_n + offs_d[None, :] * sx_d, mask=ok,
                   other=0.0)  # fmt: skip
    return rows.to(tl.float32)


@triton.jit
def _attend_latent_fwd(
    Q, K, V, CK, CV, BK, BV, KD, VD, FREQ, CLOGC, CPOS, QPOS, OUT, LSE,
    sq_b, sq_h, sq_l, sq_d,
    sk_b, sk_h, sk_l, sk_d,
    sv_b, sv_h, sv_l, sv_d,
    sck_b, sck_n, sck_r,
    scv_b, scv_n, scv_r,
    sbk_b, sbk_d, sbk_r,
    sbv_b, sbv_d, sbv_r,
    skd_b, skd_h, skd_n, skd_d,
    svd_b, svd_h, svd_n, svd_d,
    scl_b, scl_h, scl_n,
    scp_b, scp_h, scp_n,
    sqp_b, sqp_l,
    so_s, so_b, so_h, so_l, so_d,
    slse_s, keys_per_split,
    H_kv, G, L, C_LAT, C, D, R_K, R_V, rotary_dim,
    scale, window, sink, recent, attention_scaling,
    ROPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_RV: tl.constexpr, DOT_PRECISION: tl.constexpr,
    NATIVE: tl.constexpr,
):  # fmt: skip
    """Program ``(m, b·H_kv + h, s)``: rows block ``m`` over the cache slots of split ``s``
    (``keys_per_split`` each: latent ones, then dense ones); the last split also reads the step's
    new tokens."""
    pid_m = tl.program_id(0)
    b64 = (tl.program_id(1) // H_kv).to(tl.int64)
    h64 = (tl.program_id(1) % H_kv).to(tl.int64)
    split = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_rv = tl.arange(0, BLOCK_RV)
    qpos_ptr = QPOS + b64 * sqp_b
    q, q_pos = _load_queries(
        Q + b64 * sq_b + h64 * G * sq_h, qpos_ptr, sq_h, sq_l, sq_d, sqp_l, offs_m, offs_d, G, L, D,
        NATIVE,
    )  # fmt: skip
    ck_base = CK + b64 * sck_b
    cv_base = CV + b64 * scv_b
    bk_base = BK + b64 * sbk_b + h64 * D * sbk_d
    clogc_ptr = CLOGC + b64 * scl_b + h64 * scl_h
    cpos_ptr = CPOS + b64 * scp_b + h64 * scp_h
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, C)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_latent = tl.zeros([BLOCK_M, BLOCK_RV], tl.float32)
    for start in range(lo, tl.minimum(hi, C_LAT), BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        pos = tl.load(cpos_ptr + offs_n * scp_n, mask=offs_n < C_LAT, other=-1)
        bias = tl.load(clogc_ptr + offs_n * scl_n, mask=offs_n < C_LAT, other=0.0).to(tl.float32)
        k = _latent_keys(ck_base, bk_base, FREQ, sck_n, sck_r, sbk_d, sbk_r, offs_n, pos, offs_d,
                         C_LAT, D, R_K, rotary_dim, attention_scaling, ROPE, BLOCK_N, BLOCK_D,
                         BLOCK_R, DOT_PRECISION)  # fmt: skip
        s = _scores(q, q_pos, k, pos, bias, scale, window, sink, recent, DOT_PRECISION)
        p, alpha, m_i, l_i = _online(s, m_i, l_i)
        lat_ok = (offs_n[:, None] < C_LAT) & (offs_rv[None, :] < R_V)
        lat = tl.load(cv_base + offs_n[:, None] * scv_n + offs_rv[None, :] * scv_r, mask=lat_ok,
                      other=0.0)  # fmt: skip
        if not NATIVE:
            lat = lat.to(tl.float32)
        p_lat = tl.dot(p.to(lat.dtype), lat, input_precision=DOT_PRECISION)
        acc_latent = acc_latent * alpha[:, None] + p_lat
    # The head's rows of B_V map the weighted latents to values: [BLOCK_D, BLOCK_RV].
    bv = tl.load(BV + b64 * sbv_b + (h64 * D + offs_d[:, None]) * sbv_d + offs_rv[None, :] * sbv_r,
                 mask=(offs_d[:, None] < D) & (offs_rv[None, :] < R_V), other=0.0)  # fmt: skip
    acc = tl.dot(acc_latent, tl.trans(bv.to(tl.float32)), input_precision=DOT_PRECISION)

    kd_base = KD + b64 * skd_b + h64 * skd_h
    vd_base = VD + b64 * svd_b + h64 * svd_h
    for start in range(tl.maximum(lo, C_LAT), hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        in_split = offs_n < hi
        pos = tl.load(cpos_ptr + offs_n * scp_n, mask=in_split, other=-1)
        bias = tl.load(clogc_ptr + offs_n * scl_n, mask=in_split, other=0.0).to(tl.float32)
        k = _dense_keys(kd_base, skd_n, skd_d, offs_n, pos, offs_d, C_LAT, hi, D, FREQ,
                        rotary_dim, attention_scaling, ROPE)  # fmt: skip
        s = _scores(q, q_pos, k, pos, bias, scale, window, sink, recent, DOT_PRECISION)
        p, alpha, m_i, l_i = _online(s, m_i, l_i)
        v = _rows(vd_base, svd_n, svd_d, offs_n, offs_d, C_LAT, hi, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype),
                                            input_precision=DOT_PRECISION)  # fmt: skip

    k_base = K + b64 * sk_b + h64 * sk_h
    v_base = V + b64 * sv_b + h64 * sv_h
    new_tokens = tl.where(split == tl.num_programs(2) - 1, L, 0)
    for start in range(0, new_tokens, BLOCK_N):
        offs_t = start + tl.arange(0, BLOCK_N)
        pos = tl.load(qpos_ptr + offs_t * sqp_l, mask=offs_t < L, other=-1)
        k = _rows(k_base, sk_l, sk_d, offs_t, offs_d, 0, L, D)
        s = _scores(q, q_pos, k, pos, tl.zeros([BLOCK_N], tl.float32), scale, window, sink,
                    recent, DOT_PRECISION)  # fmt: skip
        p, alpha, m_i, l_i = _online(s, m_i, l_i)
        v = _rows(v_base, sv_l, sv_d, offs_t, offs_d, 0, L, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype),
                                            input_precision=DOT_PRECISION)  # fmt: skip

    _store_rows(OUT, LSE, acc, m_i, l_i, split, so_s, so_b, so_h, so_l, so_d, slse_s, b64, h64,
                offs_m, offs_d, H_kv, G, L, D)  # fmt: skip


@triton.jit
def _attend_latent_mass(
    Q, K, CK, BK, KD, FREQ, CLOGC, CPOS, QPOS, LSE, MASS,
    sq_b, sq_h, sq_l, sq_d,
    sk_b, sk_h, sk_l, sk_d,
    sck_b, sck_n, sck_r,
    sbk_b, sbk_d, sbk_r,
    skd_b, skd_h, skd_n, skd_d,
    scl_b, scl_h, scl_n,
    scp_b, scp_h, scp_n,
    sqp_b, sqp_l,
    H_kv, G, L, C_LAT, C, D, R_K, rotary_dim,
    scale, window, sink, recent, attention_scaling,
    ROPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr, NATIVE: tl.constexpr,
):  # fmt: skip
    """Programs ``< cdiv(C, BLOCK_N)`` sum the mass of a block of cache slots (latent or dense);
    the rest, of a block of the step's new tokens (``mass`` columns ``C + t``)."""
    pid_n = tl.program_id(0)
    b64 = (tl.program_id(1) // H_kv).to(tl.int64)
    h64 = (tl.program_id(1) % H_kv).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    qpos_ptr = QPOS + b64 * sqp_b
    cache_blocks = tl.cdiv(C, BLOCK_N)
    if pid_n < cache_blocks:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        k_pos = tl.load(CPOS + b64 * scp_b + h64 * scp_h + offs_n * scp_n, mask=offs_n < C,
                        other=-1)  # fmt: skip
        bias = tl.load(CLOGC + b64 * scl_b + h64 * scl_h + offs_n * scl_n, mask=offs_n < C,
                       other=0.0).to(tl.float32)  # fmt: skip
        latent = _latent_keys(CK + b64 * sck_b, BK + b64 * sbk_b + h64 * D * sbk_d, FREQ, sck_n,
                              sck_r, sbk_d, sbk_r, offs_n, k_pos, offs_d, C_LAT, D, R_K,
                              rotary_dim, attention_scaling, ROPE, BLOCK_N, BLOCK_D, BLOCK_R,
                              DOT_PRECISION)  # fmt: skip
        dense = _dense_keys(KD + b64 * skd_b + h64 * skd_h, skd_n, skd_d, offs_n, k_pos, offs_d,
                            C_LAT, C, D, FREQ, rotary_dim, attention_scaling, ROPE)  # fmt: skip
        k = tl.where(offs_n[:, None] < C_LAT, latent, dense)
        column, n_cols = offs_n, C
    else:
        offs_t = (pid_n - cache_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        k_pos = tl.load(qpos_ptr + offs_t * sqp_l, mask=offs_t < L, other=-1)
        bias = tl.zeros([BLOCK_N], tl.float32)
        k = _rows(K + b64 * sk_b + h64 * sk_h, sk_l, sk_d, offs_t, offs_d, 0, L, D)
        column, n_cols = C + offs_t, C + L
    col = _column_mass(
        Q + b64 * sq_b + h64 * G * sq_h, qpos_ptr, LSE + (b64 * H_kv + h64) * G * L, k, k_pos,
        bias, sq_h, sq_l, sq_d, sqp_l, offs_d, G, L, D, scale, window, sink, recent, BLOCK_M,
        BLOCK_N, DOT_PRECISION, NATIVE,
    )  # fmt: skip
    tl.store(MASS + (b64 * H_kv + h64) * (C + L) + column, col, mask=column < n_cols)


def _batched(basis: Tensor) -> tuple[int, int, int]:
    """Strides ``(batch, row, rank)`` of a ``[H_kv·D, r]`` (batch stride 0) or
    ``[B, H_kv·D, r]`` basis."""
    return (0, *basis.stride()) if basis.dim() == 2 else basis.stride()


def attend_latent_triton(
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
    splits: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Triton twin of ``attend_latent_reference`` (same arguments, same results).

    Args:
        q: ``[B, H_q, L, D]``; k, v: ``[B, H_kv, L, D]`` (k rotated); cache_ck
        ``[B, 1, C_lat, r_k]``, cache_cv ``[B, 1, C_lat, r_v]``; basis_k ``[H_kv·D, r_k]`` or
        ``[B, H_kv·D, r_k]``, basis_v likewise; cache_k, cache_v ``[B, H_kv, C − C_lat, D]``;
        cache_logc, cache_pos ``[B, H_kv, C]``; q_pos ``[B, L]``; inv_freq ``[rotary_dim / 2]``
        or None (no RoPE). Any strides; fp32, bf16 or fp16 (as ``attend_triton``).
        splits: splits of the cache slots (``split_keys``; None: chosen from the device).
    Returns:
        ``out [B, H_q, L, D]`` in ``q.dtype`` and ``mass [B, H_kv, C + L]`` float32 (``[0]``
        when ``return_mass`` is false).
    """
    B, H_q, L, D = q.shape
    H_kv, C_lat, C = k.shape[1], cache_ck.shape[2], cache_logc.shape[2]
    R_K, R_V = basis_k.shape[-1], basis_v.shape[-1]
    G = H_q // H_kv
    native = _native(q, k, v, cache_ck, cache_cv, cache_k, cache_v)
    M = G * L
    meta = _config(M, max(C, L), D, not native)
    meta["BLOCK_R"] = _block(R_K, 16, 64)
    meta["BLOCK_RV"] = _block(R_V, 16, 1 << 30)
    meta["NATIVE"] = native
    rope = inv_freq is not None
    # Without RoPE any tensor stands in for the frequencies (ROPE = False never reads them).
    freq = inv_freq.to(device=q.device, dtype=torch.float32) if rope else q
    row_blocks = triton.cdiv(M, meta["BLOCK_M"])
    S, per_split = split_keys(triton.cdiv(C, meta["BLOCK_N"]), row_blocks * B * H_kv, q.device,
                              splits)  # fmt: skip
    out, lse, out_strides = split_outputs(q, H_kv, S)
    latents = (cache_ck[:, 0], cache_cv[:, 0])  # [B, C_lat, r]
    common = (float(scale), int(window), int(sink), int(recent), float(attention_scaling))
    if M > 0:
        torch.library.wrap_triton(_attend_latent_fwd)[(row_blocks, B * H_kv, S)](
            q, k, v, *latents, basis_k, basis_v, cache_k, cache_v, freq, cache_logc, cache_pos,
            q_pos, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *latents[0].stride(), *latents[1].stride(),
            *_batched(basis_k), *_batched(basis_v), *cache_k.stride(), *cache_v.stride(),
            *cache_logc.stride(), *cache_pos.stride(), *q_pos.stride(), *out_strides,
            B * H_kv * M, per_split * meta["BLOCK_N"],
            H_kv, G, L, C_lat, C, D, R_K, R_V, int(rotary_dim), *common, ROPE=rope, **meta,
        )  # fmt: skip
    if S > 1:
        out, lse = combine_splits(out, lse, G, q.dtype)
    if not return_mass:
        return out, torch.zeros(0, dtype=torch.float32, device=q.device)
    mass = torch.empty((B, H_kv, C + L), dtype=torch.float32, device=q.device)
    blocks = triton.cdiv(C, meta["BLOCK_N"]) + triton.cdiv(L, meta["BLOCK_N"])
    if blocks == 0:
        return out, mass
    del meta["BLOCK_RV"]
    torch.library.wrap_triton(_attend_latent_mass)[(blocks, B * H_kv)](
        q, k, latents[0], basis_k, cache_k, freq, cache_logc, cache_pos, q_pos, lse, mass,
        *q.stride(), *k.stride(), *latents[0].stride(), *_batched(basis_k), *cache_k.stride(),
        *cache_logc.stride(), *cache_pos.stride(), *q_pos.stride(),
        H_kv, G, L, C_lat, C, D, R_K, int(rotary_dim), *common, ROPE=rope, **meta,
    )  # fmt: skip
    return out, mass
