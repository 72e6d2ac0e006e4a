"""Triton implementation of ``kvslim::attend`` (see ``attention.py`` for the semantics).

Two kernels over the concatenated key axis ``N = C + L`` (cache slots first, then the step's new
tokens), neither of which ever materialises the concatenation:

* ``_attend_fwd``: FlashAttention-style forward with an online softmax in fp32. One program owns
  a block of the ``M = G * L`` query rows of one ``(batch, KV head)``: the ``G`` query heads
  sharing a KV head are stacked along the row axis (row ``r`` is head ``r // L``, token
  ``r % L``), so each key block is loaded once for the whole group. It also saves the per-row
  log-sum-exp. Decoding one token gives only ``B · H_kv`` such programs (3 for SmolLM2 at batch
  1, on a GPU with 132 SMs), so the keys are split too (flash-decoding, :func:`split_keys`):
  each split writes its partial output and log-sum-exp, and :func:`combine_splits` weighs them
  by ``exp(lse_s − lse)``. 16-bit inputs are multiplied in their dtype with fp32 accumulation
  (``p`` rounded to it before ``p·v``, as FlashAttention); fp32 inputs in true fp32.
* ``_attend_mass``: one program per block of keys; it recomputes the probabilities from the saved
  log-sum-exp and sums them over all rows itself, so the column sums need no atomics and are
  deterministic.

Launches go through ``torch.library.wrap_triton`` so that ``kvslim::attend`` (a ``triton_op``)
stays traceable by ``torch.compile`` / ``torch.export``; on CPU tensors the kernels only run under
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["attend_triton"]


@triton.jit
def _load_rows(
    cache_ptr, scale_ptr, new_ptr, sc_n, sc_d, ss_n, ss_g, sn_n, sn_d, offs_n, offs_d, C, L, D,
    GROUP: tl.constexpr,
):  # fmt: skip
    """Rows ``offs_n`` of ``cat([cache, new])`` of one ``(b, h)`` as fp32 ``[BLOCK_N, BLOCK_D]``.

    ``GROUP > 0``: the cache rows are int8 codes, each ``GROUP`` channels times one scale of
    ``scale_ptr`` (dequantised here, as they are loaded). Zeros past the end.
    """
    n = offs_n[:, None]
    d_ok = offs_d[None, :] < D
    from_cache = tl.load(
        cache_ptr + n * sc_n + offs_d[None, :] * sc_d, mask=(n < C) & d_ok, other=0
    ).to(tl.float32)
    if GROUP > 0:
        group = offs_d[None, :] // GROUP
        scales = tl.load(scale_ptr + n * ss_n + group * ss_g, mask=(n < C) & d_ok, other=0.0)
        from_cache = from_cache * scales.to(tl.float32)
    from_new = tl.load(
        new_ptr + (n - C) * sn_n + offs_d[None, :] * sn_d,
        mask=(n >= C) & (n < C + L) & d_ok,
        other=0.0,
    )
    return tl.where(n < C, from_cache, from_new.to(tl.float32))


@triton.jit
def _key_meta(cpos_ptr, clogc_ptr, qpos_ptr, scp_n, scl_n, sqp_l, offs_n, C, L):
    """Position and logit bias of keys ``offs_n``; ``-1`` past the end makes those invisible."""
    in_cache = offs_n < C
    pos_cache = tl.load(cpos_ptr + offs_n * scp_n, mask=in_cache, other=-1)
    pos_new = tl.load(qpos_ptr + (offs_n - C) * sqp_l, mask=~in_cache & (offs_n < C + L), other=-1)
    bias = tl.load(clogc_ptr + offs_n * scl_n, mask=in_cache, other=0.0).to(tl.float32)
    return tl.where(in_cache, pos_cache, pos_new), bias


@triton.jit
def _scores(q, q_pos, k, k_pos, bias, scale, window, sink, recent, DOT_PRECISION: tl.constexpr):
    """Biased logits ``[BLOCK_M, BLOCK_N]`` in fp32, ``-inf`` where the key is not visible; the
    keys are cast to the queries' dtype for the dot (fp32 accumulation)."""
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * scale + bias[None, :]
    qp = q_pos[:, None]
    kp = k_pos[None, :]
    dist = qp - kp
    vis = (kp >= 0) & (qp >= 0) & (dist >= 0)
    vis = vis & ((window <= 0) | (dist < window))
    vis = vis & ((recent <= 0) | (kp < sink) | (dist < recent))
    return tl.where(vis, s, float("-inf"))


@triton.jit
def _load_queries(
    q_ptr, qpos_ptr, sq_h, sq_l, sq_d, sqp_l, offs_m, offs_d, G, L, D, NATIVE: tl.constexpr
):  # fmt: skip
    """Query rows ``offs_m`` of one KV group (row = head ``r // L``, token ``r % L``) and positions:
    in their own dtype where ``NATIVE`` (16-bit dots), else in fp32.

    Rows past ``G * L`` get position ``-1``: they see nothing and need no further masking.
    """
    row_ok = offs_m < G * L
    g = offs_m // L
    t = offs_m % L
    ptrs = q_ptr + g[:, None] * sq_h + t[:, None] * sq_l + offs_d[None, :] * sq_d
    q = tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    if not NATIVE:
        q = q.to(tl.float32)
    q_pos = tl.load(qpos_ptr + t * sqp_l, mask=row_ok, other=-1)
    return q, q_pos


@triton.jit
def _online(s, m_i, l_i):
    """One online-softmax step over logits ``s``: ``(p, alpha, m, l)``. A row that has seen no
    visible key yet keeps ``m = -inf``; it shifts by 0, so that exp(-inf - -inf) never produces
    NaN (its ``p`` and ``alpha`` are then exactly 0)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _store_rows(
    OUT, LSE, acc, m_i, l_i, split, so_s, so_b, so_h, so_l, so_d, slse_s, b64, h64, offs_m,
    offs_d, H_kv, G, L, D,
):  # fmt: skip
    """Normalise a rows block's output and store it and its log-sum-exp at split ``split`` (rows
    that saw nothing: exactly 0 and ``-inf``)."""
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    g = offs_m // L
    t = offs_m % L
    row_ok = offs_m < G * L
    o_ptrs = (
        OUT + split.to(tl.int64) * so_s + b64 * so_b + (h64 * G + g[:, None]) * so_h
        + t[:, None] * so_l + offs_d[None, :] * so_d
    )  # fmt: skip
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    lse_ptrs = LSE + split.to(tl.int64) * slse_s + (b64 * H_kv + h64) * G * L + offs_m
    tl.store(lse_ptrs, lse, mask=row_ok)


@triton.jit
def _column_mass(
    q_base, qpos_ptr, lse_base, k, k_pos, bias, sq_h, sq_l, sq_d, sqp_l, offs_d, G, L, D, scale,
    window, sink, recent, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, NATIVE: tl.constexpr,
):  # fmt: skip
    """The probability each key of the block ``k`` received, summed over a KV group's query
    rows, from their saved log-sum-exps ``[BLOCK_N]``."""
    col = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, G * L, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        q, q_pos = _load_queries(q_base, qpos_ptr, sq_h, sq_l, sq_d, sqp_l, offs_m, offs_d, G, L, D,
                                 NATIVE)  # fmt: skip
        s = _scores(q, q_pos, k, k_pos, bias, scale, window, sink, recent, DOT_PRECISION)
        lse = tl.load(lse_base + offs_m, mask=offs_m < G * L, other=float("-inf"))
        # Rows that saw nothing have lse = -inf and all logits -inf: shift by 0 so p = 0, not NaN.
        lse = tl.where(lse == float("-inf"), 0.0, lse)
        col += tl.sum(tl.exp(s - lse[:, None]), axis=0)
    return col


@triton.jit
def _attend_fwd(
    Q, K, V, CK, CV, CKS, CVS, CLOGC, CPOS, QPOS, OUT, LSE,
    sq_b, sq_h, sq_l, sq_d,
    sk_b, sk_h, sk_l, sk_d,
    sv_b, sv_h, sv_l, sv_d,
    sck_b, sck_h, sck_n, sck_d,
    scv_b, scv_h, scv_n, scv_d,
    scks_b, scks_h, scks_n, scks_g,
    scvs_b, scvs_h, scvs_n, scvs_g,
    scl_b, scl_h, scl_n,
    scp_b, scp_h, scp_n,
    sqp_b, sqp_l,
    so_s, so_b, so_h, so_l, so_d,
    slse_s, keys_per_split,
    H_kv, G, L, C, D,
    scale, window, sink, recent,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, GROUP: tl.constexpr, NATIVE: tl.constexpr,
):  # fmt: skip
    """Program ``(m, b·H_kv + h, s)``: rows block ``m`` over the keys of split ``s``
    (``[s · keys_per_split, (s + 1) · keys_per_split)``), its output and log-sum-exp written at
    ``OUT + s · so_s``, ``LSE + s · slse_s`` (one split: the final ones)."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // H_kv
    h = tl.program_id(1) % H_kv
    split = tl.program_id(2)
    # 64-bit base offsets: a large cache overflows int32 element offsets.
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    qpos_ptr = QPOS + b64 * sqp_b
    q, q_pos = _load_queries(
        Q + b64 * sq_b + h64 * G * sq_h, qpos_ptr, sq_h, sq_l, sq_d, sqp_l, offs_m, offs_d, G, L, D,
        NATIVE,
    )  # fmt: skip
    k_base = K + b64 * sk_b + h64 * sk_h
    v_base = V + b64 * sv_b + h64 * sv_h
    ck_base = CK + b64 * sck_b + h64 * sck_h
    cv_base = CV + b64 * scv_b + h64 * scv_h
    cks_base = CKS + b64 * scks_b + h64 * scks_h
    cvs_base = CVS + b64 * scvs_b + h64 * scvs_h
    clogc_ptr = CLOGC + b64 * scl_b + h64 * scl_h
    cpos_ptr = CPOS + b64 * scp_b + h64 * scp_h

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = split * keys_per_split
    for start in range(lo, tl.minimum(lo + keys_per_split, C + L), BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = _load_rows(ck_base, cks_base, k_base, sck_n, sck_d, scks_n, scks_g, sk_l, sk_d,
                       offs_n, offs_d, C, L, D, GROUP)  # fmt: skip
        k_pos, bias = _key_meta(cpos_ptr, clogc_ptr, qpos_ptr, scp_n, scl_n, sqp_l, offs_n, C, L)
        s = _scores(q, q_pos, k, k_pos, bias, scale, window, sink, recent, DOT_PRECISION)
        p, alpha, m_i, l_i = _online(s, m_i, l_i)
        v = _load_rows(cv_base, cvs_base, v_base, scv_n, scv_d, scvs_n, scvs_g, sv_l, sv_d,
                       offs_n, offs_d, C, L, D, GROUP)  # fmt: skip
        p_v = tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
        acc = acc * alpha[:, None] + p_v
    _store_rows(OUT, LSE, acc, m_i, l_i, split, so_s, so_b, so_h, so_l, so_d, slse_s, b64, h64,
                offs_m, offs_d, H_kv, G, L, D)  # fmt: skip


@triton.jit
def _attend_mass(
    Q, K, CK, CKS, CLOGC, CPOS, QPOS, LSE, MASS,
    sq_b, sq_h, sq_l, sq_d,
    sk_b, sk_h, sk_l, sk_d,
    sck_b, sck_h, sck_n, sck_d,
    scks_b, scks_h, scks_n, scks_g,
    scl_b, scl_h, scl_n,
    scp_b, scp_h, scp_n,
    sqp_b, sqp_l,
    H_kv, G, L, C, D,
    scale, window, sink, recent,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, GROUP: tl.constexpr, NATIVE: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    b = tl.program_id(1) // H_kv
    h = tl.program_id(1) % H_kv
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    qpos_ptr = QPOS + b64 * sqp_b
    k = _load_rows(
        CK + b64 * sck_b + h64 * sck_h, CKS + b64 * scks_b + h64 * scks_h,
        K + b64 * sk_b + h64 * sk_h, sck_n, sck_d, scks_n, scks_g, sk_l, sk_d, offs_n, offs_d,
        C, L, D, GROUP,
    )  # fmt: skip
    k_pos, bias = _key_meta(
        CPOS + b64 * scp_b + h64 * scp_h, CLOGC + b64 * scl_b + h64 * scl_h, qpos_ptr,
        scp_n, scl_n, sqp_l, offs_n, C, L,
    )  # fmt: skip
    col = _column_mass(
        Q + b64 * sq_b + h64 * G * sq_h, qpos_ptr, LSE + (b64 * H_kv + h64) * G * L, k, k_pos,
        bias, sq_h, sq_l, sq_d, sqp_l, offs_d, G, L, D, scale, window, sink, recent, BLOCK_M,
        BLOCK_N, DOT_PRECISION, NATIVE,
    )  # fmt: skip
    tl.store(MASS + (b64 * H_kv + h64) * (C + L) + offs_n, col, mask=offs_n < C + L)


def _block(n: int, lo: int, hi: int) -> int:
    """Power-of-2 block covering ``n`` clamped to ``[lo, hi]`` (``tl.dot`` needs >= 16)."""
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


# A split reads at least this many key blocks: fewer would spend more on combining the splits
# than the extra programs gain.
MIN_BLOCKS_PER_SPLIT = 4


def _native(*tensors: Tensor) -> bool:
    """Dots in the inputs' own dtype (fp32 accumulation): all of them bf16, or all fp16.

    Not bf16 under the interpreter: triton 3.9's interpreter multiplies bf16 operands as their
    raw 16-bit patterns (``create_dot`` on uint16 storage), so there bf16 takes the fp32 path and
    fp16, whose dots it computes, checks the native one (the same code for both dtypes)."""
    dtype = tensors[0].dtype
    native = (torch.float16,) if _INTERPRETED else (torch.float16, torch.bfloat16)
    return dtype in native and all(t.dtype == dtype for t in tensors)


def split_keys(
    blocks: int, programs: int, device: torch.device, splits: int | None
) -> tuple[int, int]:
    """``(splits, blocks per split)`` for ``blocks`` key blocks and ``programs`` row programs
    (flash-decoding): enough splits for two programs per SM when the rows alone leave the GPU
    idle (decoding one token: ``B · H_kv`` programs), each at least ``MIN_BLOCKS_PER_SPLIT``
    blocks. ``splits`` forces a count (tests; the interpreter has no SMs). One split off CUDA and
    for symbolic shapes (a compiled graph keeps one launch for every length)."""
    if splits is None:
        symbolic = any(isinstance(n, torch.SymInt) for n in (blocks, programs))
        if device.type != "cuda" or symbolic:
            return 1, max(blocks, 1)
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        splits = min(triton.cdiv(2 * sms, max(programs, 1)),
                     triton.cdiv(blocks, MIN_BLOCKS_PER_SPLIT))  # fmt: skip
    per_split = triton.cdiv(max(blocks, 1), max(splits, 1))
    return triton.cdiv(max(blocks, 1), per_split), per_split


def split_outputs(
    q: Tensor, H_kv: int, splits: int
) -> tuple[Tensor, Tensor, tuple[int, ...]]:  # fmt: skip
    """Where the forward kernel writes: with one split the final ``out [B, H_q, L, D]`` (in
    ``q``'s dtype) and ``lse [B, H_kv, G·L]``; with more, fp32 partials ``[S, B, H_q, L, D]`` and
    ``[S, B, H_kv, G·L]`` for :func:`combine_splits`. Also ``out``'s strides, a split's first."""
    B, H_q, L, D = q.shape
    M = H_q // H_kv * L
    if splits == 1:
        out = torch.empty((B, H_q, L, D), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, H_kv, M), dtype=torch.float32, device=q.device)
        return out, lse, (0, *out.stride())
    out = torch.empty((splits, B, H_q, L, D), dtype=torch.float32, device=q.device)
    lse = torch.empty((splits, B, H_kv, M), dtype=torch.float32, device=q.device)
    return out, lse, out.stride()


def combine_splits(part: Tensor, lse: Tensor, G: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The splits' outputs ``part [S, B, H_q, L, D]`` (fp32, each normalised over its keys) and
    log-sum-exps ``lse [S, B, H_kv, G·L]`` → ``out [B, H_q, L, D]`` in ``dtype`` and the total
    log-sum-exp ``[B, H_kv, G·L]``. A split whose keys a row cannot see has ``lse = -inf``
    (weight 0); a row that sees nothing stays 0."""
    total = torch.logsumexp(lse, dim=0)
    weight = torch.exp(lse - torch.where(torch.isfinite(total), total, 0))
    S, B, H_kv, M = lse.shape
    weight = weight.view(S, B, H_kv * G, M // G, 1)
    return (part * weight).sum(0).to(dtype), total


def _config(M: int, N: int, D: int, fp32: bool) -> dict:
    """Launch meta-parameters. Sized to stay near 100 KB of shared memory up to ``D = 256`` (what
    consumer GPUs have): fp32 (non-tensor-core) dots get small tiles and no pipelining."""
    BLOCK_D = _block(D, 16, 1 << 30)
    max_m, max_n = (32, 32) if fp32 else (64, 64 if BLOCK_D <= 128 else 32)
    return {
        "BLOCK_M": _block(M, 16, max_m),
        "BLOCK_N": _block(N, 16, max_n),
        "BLOCK_D": BLOCK_D,
        "DOT_PRECISION": "ieee" if fp32 else "tf32",
        "num_stages": 1 if fp32 else 2,
    }


def attend_triton(
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
    cache_k_scale: Tensor | None = None,
    cache_v_scale: Tensor | None = None,
    splits: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Triton twin of ``attend_reference`` (same arguments, same results).

    Args:
        q: ``[B, H_q, L, D]``; k, v: ``[B, H_kv, L, D]``; cache_k, cache_v: ``[B, H_kv, C, D]``;
        cache_logc: ``[B, H_kv, C]``; cache_pos: ``[B, H_kv, C]`` int; q_pos: ``[B, L]`` int.
        Any strides; fp32, bf16 or fp16 (all bf16 or all fp16: dots in that dtype with fp32
        accumulation, as FlashAttention; else every operand in fp32).
        cache_k_scale, cache_v_scale: with int8 ``cache_k, cache_v``, their scales
        ``[B, H_kv, C, D / group]`` (row ``n``'s channel ``d`` is ``code · scale[n, d // group]``,
        dequantised as it is loaded, then rounded to ``q``'s dtype as the reference does);
        ``None`` for a cache in the model's dtype.
        splits: key splits (:func:`split_keys`; None: chosen from the device).
    Returns:
        ``out [B, H_q, L, D]`` in ``q.dtype`` and ``mass [B, H_kv, C + L]`` float32 (``[0]``
        when ``return_mass`` is false).
    """
    B, H_q, L, D = q.shape
    H_kv, C = k.shape[1], cache_k.shape[2]
    G = H_q // H_kv
    quantised = cache_k_scale is not None
    native = _native(q, k, v, *(() if quantised else (cache_k, cache_v)))
    M, N = G * L, C + L
    meta = _config(M, N, D, not native)
    meta["GROUP"] = D // cache_k_scale.shape[-1] if quantised else 0
    meta["NATIVE"] = native
    # Unquantised: any tensor stands in for the scales (GROUP = 0 never reads them).
    ks = cache_k_scale if quantised else cache_k
    vs = cache_v_scale if quantised else cache_v
    row_blocks = triton.cdiv(M, meta["BLOCK_M"])
    S, per_split = split_keys(triton.cdiv(N, meta["BLOCK_N"]), row_blocks * B * H_kv, q.device,
                              splits)  # fmt: skip
    out, lse, out_strides = split_outputs(q, H_kv, S)
    common = (H_kv, G, L, C, D, float(scale), int(window), int(sink), int(recent))
    if M > 0:
        torch.library.wrap_triton(_attend_fwd)[(row_blocks, B * H_kv, S)](
            q, k, v, cache_k, cache_v, ks, vs, cache_logc, cache_pos, q_pos, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *cache_k.stride(), *cache_v.stride(),
            *ks.stride(), *vs.stride(),
            *cache_logc.stride(), *cache_pos.stride(), *q_pos.stride(), *out_strides,
            B * H_kv * M, per_split * meta["BLOCK_N"], *common, **meta,
        )  # fmt: skip
    if S > 1:
        out, lse = combine_splits(out, lse, G, q.dtype)
    if not return_mass:
        return out, torch.zeros(0, dtype=torch.float32, device=q.device)
    mass = torch.empty((B, H_kv, N), dtype=torch.float32, device=q.device)
    if N == 0:
        return out, mass
    torch.library.wrap_triton(_attend_mass)[(triton.cdiv(N, meta["BLOCK_N"]), B * H_kv)](
        q, k, cache_k, ks, cache_logc, cache_pos, q_pos, lse, mass,
        *q.stride(), *k.stride(), *cache_k.stride(), *ks.stride(),
        *cache_logc.stride(), *cache_pos.stride(), *q_pos.stride(),
        *common, **meta,
    )  # fmt: skip
    return out, mass


_INTERPRETED = type(_attend_fwd).__name__ == "InterpretedFunction"
