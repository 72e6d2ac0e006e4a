"""KVSlimmer merge math (``kvslim_fx.kernels.kvslimmer``): property tests of the reference twins.

Exactness checks run in float64; the attention-level check uses ``attend_reference`` (float32).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvslim_fx.kernels.attention import attend_reference
from kvslim_fx.kernels.kvslimmer import (
    adjacent_pair_coupling,
    attention_output_hessian,
    deviation_norm,
    hessian_proxy,
    merge_hessian,
    merge_keys,
    merge_post_rope,
    merge_values,
    merge_values_logc,
    merge_weights,
    pair_coupling,
    pair_coupling_bound,
    rope_rotate,
)

F64 = torch.float64
SETTINGS = settings(max_examples=50, deadline=None)
seeds = st.integers(0, 2**31 - 1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inv_freq(rotary_dim: int, base: float = 10000.0, dtype=F64) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=dtype) / rotary_dim)


def _lma_slots(g: torch.Generator, shape: tuple[int, ...], T: int, D: int):
    """Random logits, cardinalities and mean values; returns s, logc, mean, alpha, out."""
    s = 2 * torch.randn(*shape, T, generator=g, dtype=F64)
    c = torch.randint(1, 6, (*shape, T), generator=g).to(F64)
    mean = torch.randn(*shape, T, D, generator=g, dtype=F64)
    alpha = torch.softmax(s + c.log(), dim=-1)
    out = (alpha.unsqueeze(-1) * mean).sum(-2)
    return s, c.log(), mean, alpha, out


# ------------------------------------------------------------------------------------------------
# Exact derivatives of the LMA output w.r.t. the logits
# ------------------------------------------------------------------------------------------------


@SETTINGS
@given(seed=seeds, T=st.integers(2, 6), D=st.integers(1, 4))
def test_hessian_matches_autograd(seed: int, T: int, D: int) -> None:
    g = _gen(seed)
    s, logc, mean, alpha, out = _lma_slots(g, (), T, D)

    def o_of_s(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x + logc, dim=-1) @ mean  # [D]

    # value-sum form of LMA gives the same output
    c = logc.exp()
    o_sum = (s.exp()[:, None] * (c[:, None] * mean)).sum(0) / (c * s.exp()).sum()
    torch.testing.assert_close(o_sum, out, rtol=1e-12, atol=1e-12)

    jac = torch.autograd.functional.jacobian(o_of_s, s)  # [D, T]
    torch.testing.assert_close(jac.T, alpha[:, None] * (mean - out), rtol=1e-10, atol=1e-12)

    def grad_fn(x: torch.Tensor) -> torch.Tensor:
        return torch.autograd.functional.jacobian(o_of_s, x, create_graph=True)

    hess = torch.autograd.functional.jacobian(grad_fn, s).permute(1, 2, 0)  # [T, T, D]
    analytic = attention_output_hessian(alpha, mean, out)
    torch.testing.assert_close(analytic, hess, rtol=1e-9, atol=1e-11)

    # explicit vector forms
    i = torch.arange(T)
    diag = alpha[:, None] * (1 - 2 * alpha[:, None]) * (mean - out)
    torch.testing.assert_close(hess[i, i], diag, rtol=1e-9, atol=1e-11)
    for m, n in [(0, 1), (0, T - 1)]:
        if m != n:
            off = -alpha[m] * alpha[n] * (mean[m] + mean[n] - 2 * out)
            torch.testing.assert_close(hess[m, n], off, rtol=1e-9, atol=1e-11)

    # scalar proxies are the (signed) norms of those vectors
    norms_diag = torch.linalg.vector_norm(hess[i, i], dim=-1)
    torch.testing.assert_close(
        hessian_proxy(alpha, mean, out),
        torch.sign(1 - 2 * alpha) * norms_diag,
        atol=1e-11,
        rtol=1e-9,
    )
    norms_adj = torch.linalg.vector_norm(hess[i[:-1], i[1:]], dim=-1)
    h12 = adjacent_pair_coupling(alpha, mean, out)
    torch.testing.assert_close(h12, norms_adj, atol=1e-11, rtol=1e-9)
    norm_far = torch.linalg.vector_norm(hess[0, T - 1])
    torch.testing.assert_close(
        pair_coupling(alpha[0], alpha[-1], mean[0], mean[-1], out), norm_far, atol=1e-11, rtol=1e-9
    )
    # released-code bound is an upper bound of the exact coupling
    dev = deviation_norm(mean, out)
    bound = pair_coupling_bound(alpha[:-1], alpha[1:], dev[:-1], dev[1:])
    assert torch.all(bound >= h12 - 1e-12)
    # L1 variant
    torch.testing.assert_close(
        hessian_proxy(alpha, mean, out, p=1),
        alpha * (1 - 2 * alpha) * (mean - out).abs().sum(-1),
    )


@SETTINGS
@given(seed=seeds, T=st.integers(2, 5), D=st.integers(1, 3))
def test_hessian_batched(seed: int, T: int, D: int) -> None:
    g = _gen(seed)
    _, _, mean, alpha, out = _lma_slots(g, (2, 3), T, D)
    full = attention_output_hessian(alpha, mean, out)
    hp = hessian_proxy(alpha, mean, out)
    h12 = adjacent_pair_coupling(alpha, mean, out)
    assert full.shape == (2, 3, T, T, D) and hp.shape == (2, 3, T) and h12.shape == (2, 3, T - 1)
    for b in range(2):
        for h in range(3):
            one = attention_output_hessian(alpha[b, h], mean[b, h], out[b, h])
            torch.testing.assert_close(full[b, h], one)
            torch.testing.assert_close(hp[b, h], hessian_proxy(alpha[b, h], mean[b, h], out[b, h]))


# ------------------------------------------------------------------------------------------------
# Closed-form merged key and fallback
# ------------------------------------------------------------------------------------------------


def _energy(k, k_m, k_n, h11, h22, h12):
    return (
        h11 * ((k - k_m) ** 2).sum(-1)
        - 2 * h12 * ((k - k_m) * (k - k_n)).sum(-1)
        + h22 * ((k - k_n) ** 2).sum(-1)
    )


hvals = st.floats(-1.0, 1.0, allow_nan=False)
masses = st.one_of(st.just(0.0), st.floats(0.0, 1.0, allow_nan=False))


@SETTINGS
@given(
    seed=seeds,
    h11=hvals,
    h22=hvals,
    h12=st.floats(0.0, 1.0),
    mass_m=masses,
    mass_n=masses,
    D=st.integers(1, 5),
)
def test_merge_weights_minimise_energy(seed, h11, h22, h12, mass_m, mass_n, D) -> None:
    t = lambda x: torch.tensor(x, dtype=F64)  # noqa: E731
    eps = 1e-6
    a, b, fb = merge_weights(t(h11), t(h22), t(h12), t(mass_m), t(mass_n), eps=eps)
    assert a.shape == b.shape == fb.shape == () and fb.dtype == torch.bool
    assert abs(a.item() + b.item() - 1.0) <= 1e-12 * max(1.0, abs(a.item()), abs(b.item()))

    pd = h11 > 0 and h11 * h22 > h12 * h12
    den = h11 + h22 - 2 * h12
    if not pd:
        assert fb.item()
    elif den > 10 * eps * (h11 + h22):
        assert not fb.item()

    if fb.item():
        msum = mass_m + mass_n
        exp_a = mass_m / msum if msum > 0 else 0.5
        assert a.item() == pytest.approx(exp_a, abs=1e-15)
        return

    assert den > 0  # positive definite ⇒ E convex in k
    g = _gen(seed)
    k_m, k_n = torch.randn(2, D, generator=g, dtype=F64)
    k_star = merge_keys(k_m, k_n, a, b)
    e_star = _energy(k_star, k_m, k_n, h11, h22, h12)
    scale = torch.linalg.vector_norm(k_m - k_n) + 1
    for r in (1e-3, 1e-1, 1.0, 10.0):
        pert = k_star + r * scale * torch.randn(16, D, generator=g, dtype=F64)
        e = _energy(pert, k_m, k_n, h11, h22, h12)
        assert torch.all(e >= e_star - 1e-9 * (1 + e_star.abs()))
    if h11 - h12 >= 0 and h22 - h12 >= 0:  # k* on the segment
        assert -1e-12 <= a.item() <= 1 + 1e-12


@SETTINGS
@given(seed=seeds, N=st.integers(1, 40))
def test_merge_weights_vectorised(seed: int, N: int) -> None:
    g = _gen(seed)
    h11, h22 = torch.rand(2, N, generator=g, dtype=F64) * 2 - 0.5
    h12 = torch.rand(N, generator=g, dtype=F64)
    mm, mn = torch.rand(2, N, generator=g, dtype=F64)
    mm[::3] = 0
    mn[::4] = 0
    a, b, fb = merge_weights(h11, h22, h12, mm, mn)
    for i in range(N):
        ai, bi, fi = merge_weights(h11[i], h22[i], h12[i], mm[i], mn[i])
        assert ai.item() == a[i].item() and bi.item() == b[i].item() and fi.item() == fb[i].item()
    nonpd = ~((h11 > 0) & (h11 * h22 > h12**2))
    assert torch.all(fb[nonpd])


@SETTINGS
@given(seed=seeds, h=st.floats(1e-6, 10.0), D=st.integers(1, 5))
def test_midpoint_when_uncoupled_and_equal(seed: int, h: float, D: int) -> None:
    hh = torch.tensor(h, dtype=F64)
    a, b, fb = merge_weights(hh, hh, torch.zeros((), dtype=F64), hh, 2 * hh)
    assert not fb.item() and a.item() == 0.5 and b.item() == 0.5
    k_m, k_n = torch.randn(2, D, generator=_gen(seed), dtype=F64)
    torch.testing.assert_close(merge_keys(k_m, k_n, a, b), (k_m + k_n) / 2)


# ------------------------------------------------------------------------------------------------
# Values, cardinalities, Hessian propagation
# ------------------------------------------------------------------------------------------------


@SETTINGS
@given(seed=seeds, D=st.integers(1, 6))
def test_merge_values_cardinality(seed: int, D: int) -> None:
    g = _gen(seed)
    mean_m, mean_n = torch.randn(2, 3, D, generator=g, dtype=F64)
    c_m = torch.randint(1, 9, (3,), generator=g).to(F64)
    c_n = torch.rand(3, generator=g, dtype=F64) * 5 + 0.5
    mean, c = merge_values(mean_m, c_m, mean_n, c_n)
    torch.testing.assert_close(c, c_m + c_n)
    vsum = c_m[:, None] * mean_m + c_n[:, None] * mean_n
    torch.testing.assert_close(mean, vsum / c[:, None])
    mean_l, logc = merge_values_logc(mean_m, c_m.log(), mean_n, c_n.log())
    torch.testing.assert_close(logc.exp(), c)
    torch.testing.assert_close(mean_l, mean)
    # associativity of value sums: ((m, n), r) == (m, (n, r))
    mean_r = torch.randn(3, D, generator=g, dtype=F64)
    c_r = torch.ones(3, dtype=F64)
    left = merge_values(*merge_values(mean_m, c_m, mean_n, c_n), mean_r, c_r)
    right = merge_values(mean_m, c_m, *merge_values(mean_n, c_n, mean_r, c_r))
    torch.testing.assert_close(left[0], right[0])
    torch.testing.assert_close(left[1], right[1])
    # integer cardinalities are accepted
    mean_i, _ = merge_values(mean_m, c_m.long(), mean_n, torch.ones(3, dtype=torch.long))
    torch.testing.assert_close(mean_i, (c_m[:, None] * mean_m + mean_n) / (c_m[:, None] + 1))


@SETTINGS
@given(seed=seeds)
def test_merge_hessian(seed: int) -> None:
    h_m, h_n, a = torch.randn(3, 7, generator=_gen(seed), dtype=F64)
    b = 1 - a
    torch.testing.assert_close(merge_hessian(h_m, h_n, a, b), a**2 * h_m + b**2 * h_n)
    one, zero = torch.ones(7, dtype=F64), torch.zeros(7, dtype=F64)
    torch.testing.assert_close(merge_hessian(h_m, h_n, one, zero), h_m)


# ------------------------------------------------------------------------------------------------
# Lossless merge through the attention op
# ------------------------------------------------------------------------------------------------


@SETTINGS
@given(
    seed=seeds,
    C=st.integers(2, 9),
    Hkv=st.integers(1, 2),
    G=st.integers(1, 3),
    D=st.sampled_from([4, 8]),
    a=st.floats(-3.0, 4.0),
)
def test_merge_of_equal_logit_slots_is_lossless(seed, C, Hkv, G, D, a) -> None:
    g = _gen(seed)
    j = int(torch.randint(0, C - 1, (1,), generator=g))
    q = torch.randn(1, Hkv * G, 1, D, generator=g)
    k_new, v_new = torch.randn(2, 1, Hkv, 1, D, generator=g)
    cache_k = torch.randn(1, Hkv, C, D, generator=g)
    cache_k[:, :, j + 1] = cache_k[:, :, j]  # identical post-RoPE keys ⇒ identical logits
    cache_v = torch.randn(1, Hkv, C, D, generator=g)
    c = torch.randint(1, 6, (1, Hkv, C), generator=g).float()
    pos = torch.arange(C).expand(1, Hkv, C).contiguous()
    q_pos = torch.tensor([[C + 3]])
    scale = 1 / math.sqrt(D)
    before, mass_b = attend_reference(
        q, k_new, v_new, cache_k, cache_v, c.log(), pos, q_pos, scale, return_mass=True
    )

    ad = torch.full((1, Hkv), a, dtype=F64)
    k64, v64, c64 = cache_k.double(), cache_v.double(), c.double()
    k_star = merge_keys(k64[:, :, j], k64[:, :, j + 1], ad, 1 - ad)
    v_star, c_star = merge_values(v64[:, :, j], c64[:, :, j], v64[:, :, j + 1], c64[:, :, j + 1])
    keep = [i for i in range(C) if i != j + 1]
    mk, mv, mc, mp = (x[:, :, keep].clone() for x in (k64, v64, c64, pos))
    mk[:, :, j], mv[:, :, j], mc[:, :, j] = k_star, v_star, c_star
    mp[:, :, j] = pos[:, :, j + 1]  # merged slot takes the later position
    after, mass_a = attend_reference(
        q,
        k_new,
        v_new,
        mk.float(),
        mv.float(),
        mc.log().float(),
        mp,
        q_pos,
        scale,
        return_mass=True,
    )
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)
    merged_mass = mass_b[:, :, j] + mass_b[:, :, j + 1]
    torch.testing.assert_close(mass_a[:, :, j], merged_mass, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# RoPE
# ------------------------------------------------------------------------------------------------


@SETTINGS
@given(seed=seeds, head_dim=st.sampled_from([4, 8, 16, 64]), theta=st.sampled_from([1e4, 5e5]))
def test_rope_matches_hf_llama(seed: int, head_dim: int, theta: float) -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(
        hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim, rope_theta=theta
    )
    emb = LlamaRotaryEmbedding(cfg)
    g = _gen(seed)
    x = torch.randn(2, 3, 5, head_dim, generator=g)  # [B, H, S, D]
    pos = torch.randint(0, 32768, (2, 5), generator=g)
    cos, sin = emb(x, pos)
    ref, _ = apply_rotary_pos_emb(x, x, cos, sin)
    got = rope_rotate(x, pos[:, None, :], emb.inv_freq, head_dim)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    # the float64 path agrees with HF up to HF's float32 angle rounding
    got64 = rope_rotate(x.double(), pos[:, None, :], emb.inv_freq)
    torch.testing.assert_close(got64.float(), ref, atol=2e-2, rtol=0)


@SETTINGS
@given(seed=seeds, head_dim=st.sampled_from([8, 16, 32]), pct=st.sampled_from([0.25, 0.5]))
def test_rope_partial_matches_hf_gpt_neox(seed: int, head_dim: int, pct: float) -> None:
    from transformers import GPTNeoXConfig
    from transformers.models.gpt_neox.modeling_gpt_neox import (
        GPTNeoXRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    cfg = GPTNeoXConfig(hidden_size=2 * head_dim, num_attention_heads=2, rotary_pct=pct)
    emb = GPTNeoXRotaryEmbedding(cfg)
    rd = int(head_dim * pct)
    assert emb.inv_freq.shape == (rd // 2,)
    g = _gen(seed)
    x = torch.randn(1, 2, 4, head_dim, generator=g)
    pos = torch.randint(0, 4096, (1, 4), generator=g)
    cos, sin = emb(x, pos)
    ref, _ = apply_rotary_pos_emb(x, x, cos, sin)
    got = rope_rotate(x, pos[:, None, :], emb.inv_freq, rd)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(got[..., rd:], x[..., rd:])


@SETTINGS
@given(seed=seeds, rd=st.sampled_from([2, 4, 8]), extra=st.sampled_from([0, 2, 4]))
def test_rope_layouts_match_complex_multiplication(seed: int, rd: int, extra: int) -> None:
    g = _gen(seed)
    x = torch.randn(3, rd + extra, generator=g, dtype=F64)
    delta = torch.randint(-5000, 5000, (3,), generator=g)
    inv = _inv_freq(rd)
    rot = torch.polar(torch.ones(3, rd // 2, dtype=F64), delta[:, None].double() * inv)
    # interleaved: (x[2i], x[2i+1]) is one complex number
    z = torch.complex(x[:, 0:rd:2], x[:, 1:rd:2]) * rot
    exp_inter = torch.cat([torch.stack([z.real, z.imag], -1).flatten(-2), x[:, rd:]], -1)
    torch.testing.assert_close(rope_rotate(x, delta, inv, rd, interleaved=True), exp_inter)
    # rotate_half: (x[i], x[i + rd/2]) is one complex number
    z = torch.complex(x[:, : rd // 2], x[:, rd // 2 : rd]) * rot
    exp_half = torch.cat([z.real, z.imag, x[:, rd:]], -1)
    torch.testing.assert_close(rope_rotate(x, delta, inv, rd), exp_half)


@SETTINGS
@given(
    seed=seeds,
    rd=st.sampled_from([2, 4, 8]),
    extra=st.sampled_from([0, 4]),
    interleaved=st.booleans(),
    p=st.integers(-20000, 20000),
    q=st.integers(-20000, 20000),
)
def test_rope_composition_and_inverse(seed, rd, extra, interleaved, p, q) -> None:
    g = _gen(seed)
    x = torch.randn(2, 3, rd + extra, generator=g, dtype=F64)
    inv = _inv_freq(rd)

    def rot(y, d):
        return rope_rotate(y, d, inv, rd, interleaved)

    torch.testing.assert_close(rot(rot(x, p), q), rot(x, p + q), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(rot(rot(x, p), -p), x, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(rot(x, 0), x)
    y = rot(x, torch.tensor([p, q]).view(2, 1))  # per-row deltas broadcast over [2, 3]
    torch.testing.assert_close(y[0], rot(x[0], p))
    torch.testing.assert_close(y[1], rot(x[1], float(q)))
    torch.testing.assert_close(
        torch.linalg.vector_norm(y, dim=-1), torch.linalg.vector_norm(x, dim=-1)
    )
    assert torch.equal(y[..., rd:], x[..., rd:])
    assert rope_rotate(x, p, None) is x
    with pytest.raises(ValueError):
        rope_rotate(x, p, inv, rd + 2)


@SETTINGS
@given(
    seed=seeds,
    rd=st.sampled_from([4, 8]),
    extra=st.sampled_from([0, 4]),
    interleaved=st.booleans(),
)
def test_post_rope_merge_equals_pre_rope_merge(seed, rd, extra, interleaved) -> None:
    g = _gen(seed)
    N, D = 6, rd + extra
    k_m, k_n = torch.randn(2, N, D, generator=g, dtype=F64)
    p_m = torch.randint(0, 10000, (N,), generator=g)
    p_n = p_m + torch.randint(1, 600, (N,), generator=g)
    a = torch.randn(N, generator=g, dtype=F64)
    b = 1 - a
    inv = _inv_freq(rd)

    def rot(y, d):
        return rope_rotate(y, d, inv, rd, interleaved)

    expected = rot(merge_keys(k_m, k_n, a, b), p_n)
    got = merge_post_rope(rot(k_m, p_m), p_m, rot(k_n, p_n), p_n, a, b, inv, rd, interleaved)
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9)
    # logits of a query at any later position agree with the pre-RoPE merge
    qv = torch.randn(N, D, generator=g, dtype=F64)
    p_q = p_n + 7
    logit_pre = (rot(qv, p_q) * rot(merge_keys(k_m, k_n, a, b), p_n)).sum(-1)
    torch.testing.assert_close((rot(qv, p_q) * got).sum(-1), logit_pre, atol=1e-9, rtol=1e-9)
    # no RoPE: plain key merge
    torch.testing.assert_close(
        merge_post_rope(k_m, p_m, k_n, p_n, a, b, None), merge_keys(k_m, k_n, a, b)
    )
