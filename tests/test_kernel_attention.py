"""``kvslim::attend``: the Triton kernel against the PyTorch reference, the reference against SDPA.

Without CUDA the Triton kernels only run under the Triton interpreter, which is chosen when the
``@triton.jit`` decorators run, i.e. when ``kvslim_fx.kernels`` is first imported. The variable is
set here before that import; if another module imported ``kvslim_fx`` first without it, the Triton
tests skip rather than fail (the conftest should set it for the whole session).
"""

import math
import os
from functools import partial

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from kvslim_fx.kernels import attention_triton
from kvslim_fx.kernels.attention import (
    _attend_unmasked,
    _visible,
    attend_latent_reference,
    attend_reference,
    attend_sdpa,
    dequantize_rows,
)
from kvslim_fx.kernels.attention_triton import attend_triton
from kvslim_fx.kernels.latent_triton import attend_latent_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_INTERPRETED = type(attention_triton._attend_fwd).__name__ == "InterpretedFunction"
needs_triton = pytest.mark.skipif(
    DEVICE == "cpu" and not _INTERPRETED,
    reason="no CUDA and kvslim_fx.kernels was imported before TRITON_INTERPRET=1 was set",
)


def _op(*args, **kwargs):
    return torch.ops.kvslim.attend(*args, **kwargs)


# The registered op runs the reference on CPU and the Triton kernel on CUDA.
IMPLS = [pytest.param(_op, id="op"), pytest.param(attend_triton, id="triton", marks=needs_triton)]


def _make_inputs(
    B: int,
    H_kv: int,
    G: int,
    L: int,
    C: int,
    D: int,
    seed: int,
    dtype: torch.dtype = torch.float32,
    noncontig: bool = False,
) -> tuple:
    """Random ``attend`` inputs (no scalars): left-padded rows, empty slots, ``log c >= 0``."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:  # views are taken after this, so they survive .to()
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    if noncontig:  # the layouts models produce: [B, L, H, D] transposed, slices of bigger buffers
        q = randn(B, L, H_kv * G, D).transpose(1, 2)
        k = randn(B, L, H_kv, D).transpose(1, 2)
        v = randn(B, L, H_kv, 2 * D).transpose(1, 2)[..., ::2]
        cache_k = randn(B, H_kv, C + 3, D)[:, :, 1 : C + 1]
        cache_v = randn(B, C, H_kv, D).transpose(1, 2)
        cache_logc = (2 * torch.rand(B, C, H_kv, generator=gen)).to(DEVICE).transpose(1, 2)
    else:
        q, k, v = randn(B, H_kv * G, L, D), randn(B, H_kv, L, D), randn(B, H_kv, L, D)
        cache_k, cache_v = randn(B, H_kv, C, D), randn(B, H_kv, C, D)
        cache_logc = (2 * torch.rand(B, H_kv, C, generator=gen)).to(DEVICE)
    # Per row: some left pads (possibly all of them), then consecutive positions from `start`.
    pads = torch.randint(0, L + 1, (B,), generator=gen)
    starts = torch.randint(0, 25, (B,), generator=gen)
    t = torch.arange(L)
    q_pos = torch.where(t < pads[:, None], -1, starts[:, None] + t - pads[:, None]).to(DEVICE)
    # Slot positions anywhere in [0, start + L) (the rule must not care), ~30% empty slots.
    cache_pos = (torch.rand(B, H_kv, C, generator=gen) * (starts[:, None, None] + L)).long()
    cache_pos[torch.rand(B, H_kv, C, generator=gen) < 0.3] = -1
    cache_pos = cache_pos.to(DEVICE)
    if noncontig:
        cache_pos = cache_pos.transpose(1, 2).contiguous().transpose(1, 2)
        q_pos = q_pos.t().contiguous().t()
    return q, k, v, cache_k, cache_v, cache_logc, cache_pos, q_pos


def _assert_valid_mass(mass: torch.Tensor, q_pos: torch.Tensor, G: int) -> None:
    """Each non-pad query distributes exactly 1 over the keys, for each of the G heads."""
    expected = G * (q_pos >= 0).sum(dim=1, dtype=torch.float32)  # [B]
    torch.testing.assert_close(mass.sum(dim=-1), expected[:, None].expand(mass.shape[:2]))


@needs_triton
@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3),
    H_kv=st.integers(1, 3),
    G=st.integers(1, 3),
    L=st.integers(1, 9),
    C=st.integers(0, 20),
    D=st.sampled_from([4, 8, 12, 16]),
    window=st.sampled_from([0, 0, 1, 2, 3, 6]),
    sink=st.integers(0, 4),
    recent=st.sampled_from([0, 0, 1, 2, 4, 8]),
    scale=st.floats(0.1, 1.0),
    noncontig=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_triton_matches_reference(
    B, H_kv, G, L, C, D, window, sink, recent, scale, noncontig, seed
):
    args = _make_inputs(B, H_kv, G, L, C, D, seed, noncontig=noncontig)
    want_out, want_mass = attend_reference(*args, scale, window, sink, recent, return_mass=True)
    out, mass = attend_triton(*args, scale, window, sink, recent, return_mass=True)
    assert out.shape == (B, H_kv * G, L, D) and out.dtype == torch.float32
    assert mass.shape == (B, H_kv, C + L) and mass.dtype == torch.float32
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mass, want_mass, atol=1e-5, rtol=1e-5)
    _assert_valid_mass(mass, args[-1], G)

    out2, no_mass = attend_triton(*args, scale, window, sink, recent, return_mass=False)
    assert no_mass.shape == (0,) and no_mass.dtype == torch.float32
    torch.testing.assert_close(out2, out, atol=0, rtol=0)


# Per dtype: the kernel's 16-bit dots round p to the input dtype before p·v (FlashAttention's
# choice); the reference multiplies in fp32. fp32 must match to rounding.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}


@needs_triton
@settings(max_examples=30, deadline=None)
@given(
    B=st.integers(1, 2),
    H_kv=st.integers(1, 3),
    G=st.integers(1, 3),
    L=st.sampled_from([1, 1, 2, 5]),
    C=st.integers(0, 90),
    D=st.sampled_from([8, 16]),
    window=st.sampled_from([0, 0, 5]),
    recent=st.sampled_from([0, 0, 6]),
    splits=st.integers(1, 6),
    dtype=st.sampled_from(list(TOLERANCE)),
    seed=st.integers(0, 2**31 - 1),
)
def test_split_kv_matches_reference(B, H_kv, G, L, C, D, window, recent, splits, dtype, seed):
    """Split-KV (flash-decoding): each split's partial output and log-sum-exp, combined, equal
    the reference; lengths off the block, an empty cache, all-padding rows, rows that see nothing
    in some splits, fp32 / bf16 / fp16 with native 16-bit dots."""
    args = _make_inputs(B, H_kv, G, L, C, D, seed, dtype=dtype)
    want, want_mass = attend_reference(*args, D**-0.5, window, 1, recent, return_mass=True)
    out, mass = attend_triton(*args, D**-0.5, window, 1, recent, True, splits=splits)
    one, _ = attend_triton(*args, D**-0.5, window, 1, recent, True, splits=1)
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), want.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(out.float(), one.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(mass, want_mass, atol=tol, rtol=tol)
    _assert_valid_mass(mass, args[-1], G)


def test_split_count_follows_the_rows_and_the_blocks():
    """Off CUDA one split; a forced count never leaves a split empty."""
    from kvslim_fx.kernels.attention_triton import split_keys

    assert split_keys(64, 3, torch.device("cpu"), None) == (1, 64)
    assert split_keys(0, 3, torch.device("cpu"), None) == (1, 1)
    for blocks in range(1, 40):
        for forced in range(1, 12):
            n, per = split_keys(blocks, 3, torch.device("cpu"), forced)
            assert n <= forced and (n - 1) * per < blocks <= n * per


@needs_triton
@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 2),
    H_kv=st.integers(1, 3),
    G=st.integers(1, 3),
    L=st.integers(1, 6),
    C=st.integers(0, 20),
    groups=st.sampled_from([(4, 1), (8, 2), (16, 4), (16, 1)]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    recent=st.sampled_from([0, 2]),
    noncontig=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_triton_dequantises_int8_rows_as_the_reference(
    B, H_kv, G, L, C, groups, dtype, recent, noncontig, seed
):
    """``kvslim::attend_int8``: the kernel, which dequantises each row as it loads it, equals
    the reference over the rows dequantised first (16-bit models: 16-bit scales)."""
    D, per_row = groups
    q, k, v, cache_k, cache_v, logc, pos, q_pos = _make_inputs(
        B, H_kv, G, L, C, D, seed, dtype=dtype, noncontig=noncontig
    )
    gen = torch.Generator().manual_seed(seed)
    scale_dtype = torch.float32 if dtype == torch.float32 else dtype

    def int8(rows):
        codes = torch.randint(-128, 128, rows.shape, generator=gen, dtype=torch.int8)
        scales = torch.rand(*rows.shape[:-1], per_row, generator=gen) / 50
        return codes.to(DEVICE), scales.to(DEVICE, scale_dtype)

    (kq, ks), (vq, vs) = int8(cache_k), int8(cache_v)
    args = (q, k, v, kq, ks, vq, vs, logc, pos, q_pos, D**-0.5, 0, 1, recent)
    dense = (q, k, v, dequantize_rows(kq, ks, dtype), dequantize_rows(vq, vs, dtype), logc, pos,
             q_pos, D**-0.5, 0, 1, recent)  # fmt: skip
    want, want_mass = attend_reference(*dense, return_mass=True)
    out, mass = attend_triton(*dense[:3], kq, vq, *dense[5:], return_mass=True,
                              cache_k_scale=ks, cache_v_scale=vs)  # fmt: skip
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), want.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(mass, want_mass, atol=tol, rtol=tol)
    # The op: the kernel on CUDA, the dequantise-then-attend reference elsewhere.
    op_out, op_mass = torch.ops.kvslim.attend_int8(*args, True)
    torch.testing.assert_close(op_out.float(), want.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(op_mass, want_mass, atol=tol, rtol=tol)


def _latent_inputs(B, H_kv, G, L, C, C_lat, D, r_k, r_v, rotary_dim, batched, seed, dtype,
                   noncontig) -> tuple:  # fmt: skip
    """``attend_latent`` tensors: ``C_lat`` latent slots ``[B, 1, C_lat, r]`` (slices of bigger
    buffers when ``noncontig``), bases ``[(B,) H_kv·D, r]`` scaled so rebuilt rows are O(1), the
    other ``C − C_lat`` slots dense rows, ``inv_freq``."""
    q, k, v, cache_k, cache_v, logc, pos, q_pos = _make_inputs(B, H_kv, G, L, C, D, seed, dtype,
                                                               noncontig)  # fmt: skip
    gen = torch.Generator().manual_seed(seed + 1)
    pad = 2 if noncontig else 0
    ck = torch.randn(B, 1, C_lat + pad, r_k + pad, generator=gen)[:, :, pad:, :r_k]
    cv = torch.randn(B, 1, C_lat, r_v + pad, generator=gen)[..., pad:]
    batch = (B,) if batched else ()
    bk = torch.randn(*batch, H_kv * D, r_k, generator=gen) / r_k**0.5
    bv = torch.randn(*batch, r_v, H_kv * D, generator=gen).transpose(-1, -2) / r_v**0.5
    if not noncontig:
        bv = bv.contiguous()
    inv_freq = 10000 ** -(torch.arange(rotary_dim // 2) / max(rotary_dim // 2, 1))
    tensors = [ck.to(DEVICE, dtype), cv.to(DEVICE, dtype), bk.to(DEVICE), bv.to(DEVICE),
               cache_k[:, :, C_lat:], cache_v[:, :, C_lat:]]  # fmt: skip
    return (q, k, v, *tensors, logc, pos, q_pos), inv_freq.to(DEVICE) if rotary_dim else None


@needs_triton
@settings(max_examples=30, deadline=None)
@given(
    B=st.integers(1, 2),
    H_kv=st.integers(1, 3),
    G=st.integers(1, 3),
    L=st.integers(1, 6),
    C=st.sampled_from([0, 1, 7, 16, 33]),
    dense=st.sampled_from([0, 0, 1, 5, 20]),
    D=st.sampled_from([8, 16, 32]),
    ranks=st.tuples(st.floats(0.01, 1), st.floats(0.01, 1)),
    batched=st.booleans(),
    rope=st.sampled_from(["none", "full", "partial"]),
    window=st.sampled_from([0, 0, 3]),
    sink=st.integers(0, 2),
    recent=st.sampled_from([0, 0, 4]),
    dtype=st.sampled_from(list(TOLERANCE)),
    splits=st.integers(1, 3),
    noncontig=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_triton_latent_matches_reference(
    B, H_kv, G, L, C, dense, D, ranks, batched, rope, window, sink, recent, dtype, splits,
    noncontig, seed,
):  # fmt: skip
    """``kvslim::attend_latent``'s kernel (latent keys rebuilt and rotated as loaded, latent
    values weighted as latents, then dense rows rotated as loaded) equals the reference: cache
    lengths off the block, an empty cache, all-padding rows, ranks past the kernel's rank block
    (64), a basis per sequence (xkv) or one (lorc), partial rotary, 16-bit latents, splits
    across the latent/dense boundary. The op (rows rebuilt, then ``kvslim::attend``'s CPU path)
    equals it too."""
    r_k, r_v = (max(1, round(f * H_kv * D)) for f in ranks)
    rotary_dim = {"none": 0, "full": D, "partial": D // 2}[rope]
    tensors, inv_freq = _latent_inputs(B, H_kv, G, L, C + dense, C, D, r_k, r_v, rotary_dim,
                                       batched, seed, dtype, noncontig)  # fmt: skip
    args = (*tensors, D**-0.5, window, sink, recent, True, inv_freq, rotary_dim, 1.2)
    want, want_mass = attend_latent_reference(*args)
    tol = TOLERANCE[dtype]
    outs = {}
    for impl in (partial(attend_latent_triton, splits=splits), torch.ops.kvslim.attend_latent):
        outs[impl], mass = impl(*args)
        assert outs[impl].dtype == dtype and mass.shape == (B, H_kv, C + dense + L)
        torch.testing.assert_close(outs[impl].float(), want.float(), atol=tol, rtol=tol)
        torch.testing.assert_close(mass, want_mass, atol=tol, rtol=tol)
    _assert_valid_mass(want_mass, tensors[-1], G)
    out, no_mass = attend_latent_triton(*args[:16], False, *args[17:], splits=splits)
    assert no_mass.shape == (0,)
    torch.testing.assert_close(out, next(iter(outs.values())), atol=0, rtol=0)


@pytest.mark.skipif(DEVICE != "cpu", reason="PyTorch's fused CPU attention path")
@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3),
    H_kv=st.integers(1, 3),
    G=st.integers(1, 3),
    L=st.integers(1, 9),
    C=st.integers(0, 20),
    D=st.sampled_from([4, 8, 16]),
    window=st.sampled_from([0, 0, 1, 2, 3, 6]),
    sink=st.integers(0, 4),
    recent=st.sampled_from([0, 0, 1, 2, 4, 8]),
    noncontig=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_sdpa_path_matches_reference(B, H_kv, G, L, C, D, window, sink, recent, noncontig, seed):
    """The CPU path equals the reference, pads and an empty cache included."""
    args = _make_inputs(B, H_kv, G, L, C, D, seed, noncontig=noncontig)
    want, want_mass = attend_reference(*args, 0.4, window, sink, recent, return_mass=True)
    out, mass = attend_sdpa(*args, 0.4, window, sink, recent, return_mass=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mass, want_mass, atol=1e-5, rtol=1e-5)
    _assert_valid_mass(mass, args[-1], G)
    # Without the mass the fused kernel runs (with it, explicit scores): the same to rounding.
    op_out, no_mass = torch.ops.kvslim.attend(*args, 0.4, window, sink, recent, False)
    assert no_mass.shape == (0,)
    torch.testing.assert_close(op_out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(DEVICE != "cpu", reason="PyTorch's fused CPU attention path")
@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 3),
    H_kv=st.integers(1, 3),
    G=st.integers(1, 3),
    L=st.integers(1, 9),
    n=st.integers(0, 12),
    empty=st.integers(0, 5),
    window=st.sampled_from([0, 0, 4, 30]),
    sink=st.integers(0, 4),
    recent=st.sampled_from([0, 0, 4, 30]),
    merged=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
# StreamingLLM's 4 sinks + 4 recent slots prefilling its first 5 tokens: every key a sink or recent.
@example(B=1, H_kv=1, G=1, L=5, n=0, empty=2, window=0, sink=4, recent=4, merged=False, seed=0)
def test_a_prompt_chunk_after_an_occupied_prefix_skips_the_masks(
    B, H_kv, G, L, n, empty, window, sink, recent, merged, seed
):
    """Eager prefill's fast path: a chunk without pads after ``n`` occupied slots (one token
    each, all older) attends without masks exactly where every causal key is visible; it equals
    the reference."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v, cache_k, cache_v, _, _, _ = _make_inputs(B, H_kv, G, L, n + empty, 8, seed)
    start = n + int(torch.randint(0, 4, (), generator=gen))
    q_pos = (start + torch.arange(L)).expand(B, L).contiguous()
    cache_pos = torch.full((B, H_kv, n + empty), -1)
    cache_pos[..., :n] = torch.randperm(start, generator=gen)[:n].sort().values
    logc = torch.zeros(B, H_kv, n + empty)
    if merged and n:
        logc[..., 0] = 1.0  # a merged slot: its log c is a bias, so the masks stay
    args = (q, k, v, cache_k, cache_v, logc, cache_pos, q_pos, 0.4, window, sink, recent)
    want, _ = attend_reference(*args)
    fast = _attend_unmasked(*args)
    # Every causal pair visible (the reference's own rule), and no slot's log c a bias.
    keys = torch.cat([cache_pos[..., :n], q_pos[:, None].expand(B, H_kv, L)], dim=2)
    causal = keys[:, :, None, :] <= q_pos[:, None, :, None]
    vis = _visible(q_pos[:, None, :, None], keys[:, :, None, :], window, sink, recent)
    sees_all = torch.equal(vis, causal) and not (merged and n)
    # Exactly then (a sink inside the chunk stays visible under the recent rule).
    assert (fast is not None) == sees_all
    if fast is not None:
        torch.testing.assert_close(fast, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attend_sdpa(*args)[0], want, atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", [0, 1])
def test_triton_half_precision(dtype, seed):
    B, H_kv, G, L, C, D = 2, 2, 2, 6, 13, 12
    args = _make_inputs(B, H_kv, G, L, C, D, seed, dtype=dtype, noncontig=bool(seed))
    want_out, want_mass = attend_reference(*args, D**-0.5, 4, 1, 0, return_mass=True)
    out, mass = attend_triton(*args, D**-0.5, 4, 1, 0, return_mass=True)
    assert out.dtype == dtype and mass.dtype == torch.float32
    # The reference upcasts the same 16-bit inputs, so only the final rounding of out differs.
    torch.testing.assert_close(out.float(), want_out.float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(mass, want_mass, atol=1e-3, rtol=1e-3)


def _empty_cache(B: int, H_kv: int, D: int) -> tuple:
    return (
        torch.zeros(B, H_kv, 0, D, device=DEVICE),
        torch.zeros(B, H_kv, 0, D, device=DEVICE),
        torch.zeros(B, H_kv, 0, device=DEVICE),
        torch.zeros(B, H_kv, 0, dtype=torch.long, device=DEVICE),
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_cache_is_causal_sdpa(impl):
    B, H_kv, G, L, D = 2, 2, 3, 7, 8
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H_kv * G, L, D, generator=gen).to(DEVICE)
    k = torch.randn(B, H_kv, L, D, generator=gen).to(DEVICE)
    v = torch.randn(B, H_kv, L, D, generator=gen).to(DEVICE)
    q_pos = torch.arange(L, device=DEVICE).expand(B, L)
    scale = D**-0.5
    out, mass = impl(q, k, v, *_empty_cache(B, H_kv, D), q_pos, scale, 0, 0, 0, True)
    want = F.scaled_dot_product_attention(
        q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), is_causal=True, scale=scale
    )
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    _assert_valid_mass(mass, q_pos, G)
    # Only the last query sees the last key: its mass is that query's weight summed over G heads.
    assert (mass[..., -1] > 0).all() and (mass[..., -1] < G).all()


def _prefix_case(P: int, L: int, seed: int = 0):
    """A sequence of ``P + L`` tokens: the first ``P`` in the cache (shuffled, with 3 empty slots
    of garbage), the last ``L`` new. Returns the ``attend`` inputs and the full ``q, k, v``."""
    B, H_kv, G, D = 2, 2, 2, 12
    gen = torch.Generator().manual_seed(seed)
    q_full = torch.randn(B, H_kv * G, P + L, D, generator=gen)
    k_full = torch.randn(B, H_kv, P + L, D, generator=gen)
    v_full = torch.randn(B, H_kv, P + L, D, generator=gen)
    # Slot order must not matter (only positions do): permute, then append empty garbage slots.
    perm = torch.randperm(P, generator=gen)
    garbage = torch.randn(B, H_kv, 3, D, generator=gen)
    cache_k = torch.cat([k_full[:, :, perm], garbage], dim=2)
    cache_v = torch.cat([v_full[:, :, perm], garbage], dim=2)
    cache_pos = torch.cat([perm, torch.full((3,), -1)]).expand(B, H_kv, P + 3)
    cache_logc = torch.zeros(B, H_kv, P + 3)
    q_pos = torch.arange(P, P + L).expand(B, L)
    args = [q_full[:, :, P:], k_full[:, :, P:], v_full[:, :, P:]]
    args += [cache_k, cache_v, cache_logc, cache_pos, q_pos]
    full = (q_full[:, :, P:], k_full.repeat_interleave(G, 1), v_full.repeat_interleave(G, 1))
    return [a.to(DEVICE) for a in args], [f.to(DEVICE) for f in full], G


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("window", "sink", "recent"),
    [(0, 0, 0), (3, 0, 0), (0, 2, 3), (5, 1, 2)],
    ids=["causal", "window3", "sink2_recent3", "window5_sink1_recent2"],
)
def test_prefix_cache_matches_sdpa_with_mask(impl, window, sink, recent):
    P, L = 9, 5
    args, (q, k, v), G = _prefix_case(P, L)
    i = torch.arange(P, P + L, device=DEVICE)[:, None]  # query positions
    j = torch.arange(P + L, device=DEVICE)[None, :]  # key positions
    mask = j <= i
    if window:
        mask &= i - j < window
    if recent:
        mask &= (j < sink) | (i - j < recent)
    scale = 0.3
    out, mass = impl(*args, scale, window, sink, recent, True)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    # Mass of a key = its softmax weights summed over queries and the G heads of its group.
    weights = torch.softmax((q @ k.transpose(-1, -2) * scale).masked_fill(~mask, -math.inf), -1)
    per_pos = weights.unflatten(1, (-1, G)).sum(dim=(2, 3))  # [B, H_kv, P + L] by position
    cache_pos = args[6]
    slot_mass = torch.where(
        cache_pos >= 0, per_pos.gather(2, cache_pos.clamp(min=0)), torch.zeros_like(mass[..., :1])
    )
    torch.testing.assert_close(mass[..., : P + 3], slot_mass, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mass[..., P + 3 :], per_pos[..., P:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", [pytest.param(attend_reference, id="reference"), *IMPLS])
def test_cardinality_slot_equals_its_merged_tokens(impl):
    """One slot with ``log c = log 2``, key ``k`` and mean value ``(v1 + v2) / 2`` behaves exactly
    like two ``c = 1`` slots ``(k, v1)`` and ``(k, v2)``, and receives their summed mass."""
    B, H_kv, G, L, C, D = 1, 2, 2, 3, 4, 8
    args = list(_make_inputs(B, H_kv, G, L, C, D, seed=3))
    q, k, v, cache_k, cache_v, _, _, _ = args
    cache_pos = torch.tensor([0, 1, 2, 3], device=DEVICE).expand(B, H_kv, C)
    q_pos = torch.arange(4, 4 + L, device=DEVICE).expand(B, L)
    # Split: slots 1 and 2 share a key (and, say, position 1) and keep their own values.
    split_k = cache_k.clone()
    split_k[:, :, 2] = split_k[:, :, 1]
    split_pos = cache_pos.clone()
    split_pos[..., 2] = 1
    logc_1 = torch.zeros(B, H_kv, C, device=DEVICE)  # c = 1 everywhere
    split = impl(q, k, v, split_k, cache_v, logc_1, split_pos, q_pos, 0.4, 0, 0, 0, True)
    # Merged: slot 1 holds both (log c = log 2, mean value); slot 2 is empty and full of garbage.
    merged_v = cache_v.clone()
    merged_v[:, :, 1] = (cache_v[:, :, 1] + cache_v[:, :, 2]) / 2
    merged_v[:, :, 2] = 1e3
    logc = logc_1.clone()
    logc[..., 1] = math.log(2)
    merged_pos = cache_pos.clone()
    merged_pos[..., 2] = -1
    merged = impl(q, k, v, split_k, merged_v, logc, merged_pos, q_pos, 0.4, 0, 0, 0, True)
    torch.testing.assert_close(merged[0], split[0], atol=1e-5, rtol=1e-5)
    split_mass, merged_mass = split[1], merged[1]
    torch.testing.assert_close(merged_mass[..., 1], split_mass[..., 1] + split_mass[..., 2])
    assert (merged_mass[..., 2] == 0).all()
    keep = [0, 3, 4, 5, 6]
    torch.testing.assert_close(merged_mass[..., keep], split_mass[..., keep])


@pytest.mark.parametrize("impl", [pytest.param(attend_reference, id="reference"), *IMPLS])
def test_fully_masked_rows_are_zero(impl):
    B, H_kv, G, L, C, D = 2, 2, 2, 5, 6, 8
    args = list(_make_inputs(B, H_kv, G, L, C, D, seed=7))
    q_pos = torch.tensor([[-1] * L, [-1, -1, 0, 1, 2]], device=DEVICE)
    args[-1] = q_pos
    args[-2] = torch.full((B, H_kv, C), -1, device=DEVICE)  # every slot empty too
    args[1] = args[1].clone()
    args[1][:, :, :2] *= 1e4  # huge keys at pad tokens must not leak into anyone's softmax
    out, mass = impl(*args, 0.5, 0, 0, 0, True)
    assert torch.isfinite(out).all() and torch.isfinite(mass).all()
    assert (out[0] == 0).all() and (out[1, :, :2] == 0).all()
    assert (out[1, :, 2:].abs().sum(-1) > 0).all()
    assert (mass[0] == 0).all() and (mass[1, :, : C + 2] == 0).all()
    _assert_valid_mass(mass, q_pos, G)


def _opcheck_args(C: int, return_mass: bool, window: int = 0):
    args = _make_inputs(2, 2, 2, 3, C, 8, seed=C)
    return (*args, 0.35, window, 1, 2 if window else 0, return_mass)


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(_opcheck_args(5, False), id="cache"),
        pytest.param(_opcheck_args(5, True, window=3), id="cache_mass_window"),
        pytest.param(_opcheck_args(0, True), id="empty_cache_mass"),
    ],
)
def test_opcheck(args):
    torch.library.opcheck(torch.ops.kvslim.attend.default, args)


def test_opcheck_int8():
    q, k, v, cache_k, cache_v, logc, pos, q_pos = _make_inputs(2, 2, 2, 3, 5, 8, seed=3)
    codes = [torch.randint(-128, 128, x.shape, dtype=torch.int8, device=DEVICE)
             for x in (cache_k, cache_v)]  # fmt: skip
    scales = [torch.rand(*x.shape[:-1], 2, device=DEVICE) / 50 for x in (cache_k, cache_v)]
    args = (q, k, v, codes[0], scales[0], codes[1], scales[1], logc, pos, q_pos, 0.35, 3, 1, 2,
            True)  # fmt: skip
    torch.library.opcheck(torch.ops.kvslim.attend_int8.default, args)
