"""KVSlimmer's merge arithmetic (``kvslim_fx.kernels.run_merge``): properties of the production
functions that ``KVSlimmer`` and ``kvslim::merge_pairs`` call.

Exactness checks run in float64; the attention-level check uses ``attend_reference``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvslim_fx.kernels.attention import attend_reference
from kvslim_fx.kernels.run_merge import (
    MergedRuns,
    adjacent_coupling,
    hessian_proxy,
    merge_runs,
    rope_rotate,
)

from kvslim_fx.methods.kvslimmer import KVSlimmer

F64 = torch.float64
EPS = 1e-6
BATCH = (2, 2)  # [B, H_kv]
seeds = st.integers(0, 2**31 - 1)
# "convex": positive h with weak couplings, so most runs take the closed form; "any": most fall
# back (h of either sign, strong couplings).
regimes = st.sampled_from(["convex", "any"])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inv_freq(rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=F64) / rotary_dim)


def _slots(g: torch.Generator, N: int, D: int, regime: str, zero_scores: float = 0.0) -> dict:
    """Random state of ``N`` slots in position order, as ``merge_runs`` takes it."""
    if regime == "convex":
        hess = 0.1 + torch.rand(*BATCH, N, generator=g, dtype=F64)
        coupling = 0.1 * torch.rand(*BATCH, N - 1, generator=g, dtype=F64)
    else:
        hess = 2 * torch.rand(*BATCH, N, generator=g, dtype=F64) - 0.5
        coupling = torch.rand(*BATCH, N - 1, generator=g, dtype=F64)
    score = torch.rand(*BATCH, N, generator=g, dtype=F64)
    score[torch.rand(*BATCH, N, generator=g) < zero_scores] = 0
    return {
        "keys": torch.randn(*BATCH, N, D, generator=g, dtype=F64),
        "means": torch.randn(*BATCH, N, D, generator=g, dtype=F64),
        "logc": torch.randint(1, 6, (*BATCH, N), generator=g).to(F64).log(),
        "hess": hess,
        "score": score,
        "pos": torch.randint(1, 600, (*BATCH, N), generator=g).cumsum(-1),
        "coupling": coupling,
    }


def _joined(g: torch.Generator, N: int, p: float) -> torch.Tensor:
    return torch.rand(*BATCH, N - 1, generator=g) < p


def _merge(slots: dict, joined: torch.Tensor, inv_freq=None, rotary_dim=None, convex=False):
    return merge_runs(**slots, joined=joined, inv_freq=inv_freq, rotary_dim=rotary_dim,
                      convex=convex, eps=EPS)  # fmt: skip


def _runs(joined: torch.Tensor) -> list[tuple[int, int, list[int]]]:
    """``(b, h, members)`` of every run of two or more slots."""
    runs = []
    for b, h in [(b, h) for b in range(BATCH[0]) for h in range(BATCH[1])]:
        run = [0]
        for i, edge in enumerate(joined[b, h].tolist(), start=1):
            if not edge:
                runs += [(b, h, run)] if len(run) > 1 else []
                run = []
            run.append(i)
        runs += [(b, h, run)] if len(run) > 1 else []
    return runs


def _weights(slots: dict, joined: torch.Tensor, convex: bool = False) -> MergedRuns:
    """The merge with one-hot keys: slot ``j``'s merged key is its run's weight vector."""
    N = slots["hess"].shape[-1]
    one_hot = torch.eye(N, dtype=F64).expand(*BATCH, N, N)
    return _merge({**slots, "keys": one_hot}, joined, convex=convex)


# ------------------------------------------------------------------------------------------------
# The Hessian proxies are the exact second derivatives of the attention output
# ------------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(seed=seeds, N=st.integers(2, 6), D=st.integers(1, 4))
def test_hessian_proxies_are_the_norms_of_the_autograd_hessian(seed: int, N: int, D: int) -> None:
    g = _gen(seed)
    s = 2 * torch.randn(N, generator=g, dtype=F64)
    logc = torch.randint(1, 6, (N,), generator=g).to(F64).log()
    means = torch.randn(N, D, generator=g, dtype=F64)

    def output(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x + logc, dim=-1) @ means  # [D]

    hess = torch.stack(
        [torch.autograd.functional.hessian(lambda x, d=d: output(x)[d], s) for d in range(D)], -1
    )  # [N, N, D]
    alpha, out = torch.softmax(s + logc, dim=-1), output(s)
    proxy = hessian_proxy(alpha[None, None], means[None, None], out[None, None, None])[0, 0]
    coupling = adjacent_coupling(alpha[None, None], means[None, None], out[None, None, None])[0, 0]
    i = torch.arange(N)
    # ∂²o/∂s_j² points along m_j − o; the proxy is its norm, signed by 1 − 2α_j.
    dev = means - out
    unit = dev / dev.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(hess[i, i], proxy[:, None] * unit, rtol=1e-9, atol=1e-11)
    # ∂²o/∂s_i∂s_{i+1} points along −(m_i + m_{i+1} − 2o): the coupling enters E with a minus.
    pair = means[:-1] + means[1:] - 2 * out
    unit = pair / pair.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(
        hess[i[:-1], i[1:]], -coupling[:, None] * unit, rtol=1e-9, atol=1e-11
    )


# ------------------------------------------------------------------------------------------------
# The closed-form key, its weights and the fallback
# ------------------------------------------------------------------------------------------------


def _energy(x: torch.Tensor, keys: torch.Tensor, hess: torch.Tensor, h12: torch.Tensor):
    """``E(x) = Σ_i h_i ‖x − k_i‖² − 2 Σ_e h_e ⟨x − k_i, x − k_{i+1}⟩`` of one run."""
    d = x[..., None, :] - keys  # [.., n, D]
    edges = (d[..., :-1, :] * d[..., 1:, :]).sum(-1)
    return (hess * (d**2).sum(-1)).sum(-1) - 2 * (h12 * edges).sum(-1)


@settings(max_examples=500, deadline=None)
@given(seed=seeds, N=st.integers(2, 6), D=st.integers(1, 5), regime=regimes)
def test_the_merged_key_minimises_the_run_energy_unless_it_falls_back(seed, N, D, regime):
    g = _gen(seed)
    slots = _slots(g, N, D, regime)
    merged = _merge(slots, torch.ones(*BATCH, N - 1, dtype=torch.bool))
    h, h12, keys = slots["hess"], slots["coupling"], slots["keys"]
    w_sum = h.sum(-1) - 2 * h12.sum(-1)
    # Falls back exactly where a member or an edge's 2×2 form is not positive definite, or the
    # energy's curvature 2 Σ w_i is negligible.
    not_convex = (h <= 0).any(-1) | (h[..., :-1] * h[..., 1:] <= h12**2).any(-1)
    assert torch.equal(merged.fallback[..., -1], not_convex | (w_sum <= EPS * h.abs().sum(-1)))
    assert merged.survivor[..., -1].all() and not merged.survivor[..., :-1].any()
    for b, hd in (~merged.fallback[..., -1]).nonzero().tolist():
        k_star = merged.k[b, hd, -1].clone().requires_grad_()
        e_star = _energy(k_star, keys[b, hd], h[b, hd], h12[b, hd])
        (grad,) = torch.autograd.grad(e_star, k_star)
        size = h[b, hd].abs().sum() * (k_star.norm() + keys[b, hd].norm(dim=-1).max())
        assert grad.norm() <= 1e-8 * size
        scale = (keys[b, hd] - k_star.detach()).norm(dim=-1).max() + 1
        for r in (1e-3, 1e-1, 1.0, 10.0):
            moved = k_star.detach() + r * scale * torch.randn(16, D, generator=g, dtype=F64)
            e = _energy(moved, keys[b, hd], h[b, hd], h12[b, hd])
            assert torch.all(e >= e_star.detach() - 1e-9 * (1 + e_star.abs().detach()))


@settings(max_examples=500, deadline=None)
@given(
    seed=seeds,
    N=st.integers(2, 10),
    p=st.sampled_from([0.3, 0.7, 1.0]),
    regime=regimes,
    zero_scores=st.sampled_from([0.0, 0.5, 1.0]),
    convex=st.booleans(),
)
def test_weights_sum_to_one_and_fall_back_to_the_scores(seed, N, p, regime, zero_scores, convex):
    g = _gen(seed)
    slots = _slots(g, N, 1, regime, zero_scores)
    joined = _joined(g, N, p)
    merged = _weights(slots, joined, convex)
    for b, h, run in _runs(joined):
        j = run[-1]
        w = merged.k[b, h, j]
        assert merged.survivor[b, h, j] and merged.merged[b, h, run].all()
        torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=F64), rtol=0, atol=1e-9)
        assert torch.all(w[[i for i in range(N) if i not in run]] == 0)
        if convex:
            assert torch.all(w >= 0)
        if merged.fallback[b, h, j]:
            s = slots["score"][b, h, run]
            by_score = s / s.sum() if s.sum() > 0 else torch.full_like(s, 1 / len(run))
            torch.testing.assert_close(w[run], by_score, rtol=1e-12, atol=1e-15)
    assert not merged.fallback[~merged.merged].any()


@settings(max_examples=100, deadline=None)
@given(seed=seeds, h=st.floats(1e-6, 10.0), D=st.integers(1, 5))
def test_equal_uncoupled_slots_merge_to_the_midpoint(seed: int, h: float, D: int) -> None:
    slots = _slots(_gen(seed), 2, D, "convex")
    slots["hess"] = torch.full((*BATCH, 2), h, dtype=F64)
    slots["coupling"] = torch.zeros(*BATCH, 1, dtype=F64)
    merged = _merge(slots, torch.ones(*BATCH, 1, dtype=torch.bool))
    assert not merged.fallback.any()
    torch.testing.assert_close(merged.k[..., 1, :], slots["keys"].mean(-2))


@settings(max_examples=500, deadline=None)
@given(seed=seeds, N=st.integers(2, 10), p=st.sampled_from([0.3, 0.7, 1.0]), regime=regimes,
       convex=st.booleans())  # fmt: skip
def test_the_hessian_proxy_propagates_as_squared_weights(seed, N, p, regime, convex) -> None:
    g = _gen(seed)
    slots = _slots(g, N, 1, regime, zero_scores=0.3)
    joined = _joined(g, N, p)
    merged = _weights(slots, joined, convex)
    for b, h, run in _runs(joined):
        w = merged.k[b, h, run[-1], run]
        want = (w**2 * slots["hess"][b, h, run]).sum()
        torch.testing.assert_close(merged.hess[b, h, run[-1]], want, rtol=1e-12, atol=1e-15)


@settings(max_examples=500, deadline=None)
@given(seed=seeds, N=st.integers(2, 10), D=st.integers(1, 4), p=st.sampled_from([0.3, 0.7]),
       regime=regimes)  # fmt: skip
def test_each_run_merges_to_the_closed_form_on_its_own(seed, N, D, p, regime) -> None:
    """``w_i = h_i − Σ_{joined e ∋ i} h_e``, ``k* = Σ w_i k_i / Σ w_i``; runs do not interact."""
    g = _gen(seed)
    slots = _slots(g, N, D, regime, zero_scores=0.3)
    joined = _joined(g, N, p)
    merged = _merge(slots, joined)
    for b, h, run in _runs(joined):
        j = run[-1]
        if not merged.fallback[b, h, j]:
            h12 = slots["coupling"][b, h, run[:-1]]
            w = slots["hess"][b, h, run].clone()
            w[:-1] -= h12
            w[1:] -= h12
            want = (w[:, None] * slots["keys"][b, h, run]).sum(0) / w.sum()
            torch.testing.assert_close(merged.k[b, h, j], want, rtol=1e-9, atol=1e-9)
        alone = {n: t[b : b + 1, h : h + 1, run] for n, t in slots.items() if n != "coupling"}
        alone["coupling"] = slots["coupling"][b : b + 1, h : h + 1, run[:-1]]
        one = merge_runs(**alone, joined=torch.ones(1, 1, len(run) - 1, dtype=torch.bool),
                         inv_freq=None, rotary_dim=None, convex=False, eps=EPS)  # fmt: skip
        for name in ("k", "v", "logc", "hess", "score", "pos", "fallback"):
            got, want = getattr(merged, name)[b, h, j], getattr(one, name)[0, 0, -1]
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)


# ------------------------------------------------------------------------------------------------
# Values and cardinalities
# ------------------------------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(seed=seeds, N=st.integers(2, 8), D=st.integers(1, 4), regime=regimes)
def test_values_and_cardinalities_add_associatively(seed: int, N: int, D: int, regime) -> None:
    g = _gen(seed)
    slots = _slots(g, N, D, regime)
    at_once = _merge(slots, torch.ones(*BATCH, N - 1, dtype=torch.bool))
    c, means = slots["logc"].exp(), slots["means"]
    torch.testing.assert_close(at_once.logc[..., -1].exp(), c.sum(-1))
    want = (c[..., None] * means).sum(-2) / c.sum(-1)[..., None]
    torch.testing.assert_close(at_once.v[..., -1, :], want)
    torch.testing.assert_close(at_once.score[..., -1], slots["score"].sum(-1))
    assert torch.equal(at_once.pos[..., -1], slots["pos"][..., -1])
    # Pair by pair, left to right: each merge's survivor is the next pair's first slot.
    fields = {"keys": "k", "means": "v", "logc": "logc", "hess": "hess", "score": "score",
              "pos": "pos"}  # fmt: skip
    one = {n: slots[n][:, :, :1] for n in fields}
    for i in range(1, N):
        pair = {n: torch.cat([one[n], slots[n][:, :, i : i + 1]], 2) for n in fields}
        step = merge_runs(**pair, coupling=slots["coupling"][..., i - 1 : i],
                          joined=torch.ones(*BATCH, 1, dtype=torch.bool), inv_freq=None,
                          rotary_dim=None, convex=False, eps=EPS)  # fmt: skip
        one = {n: getattr(step, f)[:, :, 1:] for n, f in fields.items()}
    torch.testing.assert_close(one["logc"], at_once.logc[..., -1:])
    torch.testing.assert_close(one["means"], at_once.v[..., -1:, :])
    torch.testing.assert_close(one["score"], at_once.score[..., -1:])


# ------------------------------------------------------------------------------------------------
# Lossless merge through the attention op
# ------------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    seed=seeds,
    C=st.integers(2, 9),
    Hkv=st.integers(1, 2),
    G=st.integers(1, 3),
    D=st.sampled_from([4, 8]),
    r=st.integers(1, 3),
    regime=regimes,
)
def test_merging_equal_logit_slots_is_lossless_under_the_exact_bias(seed, C, Hkv, G, D, r, regime):
    """With ``bias_cap=inf`` attention counts a merged slot ``c`` times at its key's logit, so
    merging slots whose keys give every query the same logit leaves the output unchanged,
    whatever the weights. (A finite cap, the default 5, counts at most that many: not lossless.)

    The merge runs in float64: extrapolating weights (up to ``1 / eps``) would cost float32
    the digits this compares.
    """
    g = _gen(seed)
    r = min(r, C - 1)
    j = int(torch.randint(0, C - r, (1,), generator=g))
    q = torch.randn(1, Hkv * G, 1, D, generator=g)
    k_new, v_new = torch.randn(2, 1, Hkv, 1, D, generator=g)
    cache_k = torch.randn(1, Hkv, C, D, generator=g)
    cache_k[:, :, j : j + r + 1] = cache_k[:, :, j : j + 1]  # identical keys ⇒ identical logits
    cache_v = torch.randn(1, Hkv, C, D, generator=g)
    logc = torch.randint(1, 6, (1, Hkv, C), generator=g).float().log()
    pos = torch.arange(C).expand(1, Hkv, C).contiguous()
    q_pos = torch.tensor([[C + 3]])
    exact = KVSlimmer(bias_cap=math.inf).attention_logc

    def attend(k, v, logc, pos):
        return attend_reference(q, k_new, v_new, k, v, exact(logc), pos, q_pos, 1 / math.sqrt(D),
                                return_mass=True)  # fmt: skip

    before, mass_before = attend(cache_k, cache_v, logc, pos)
    joined = torch.zeros(1, Hkv, C - 1, dtype=torch.bool)
    joined[..., j : j + r] = True
    state = _slots(g, C, D, regime, zero_scores=0.3)
    merged = merge_runs(
        cache_k.double(), cache_v.double(), logc.double(), state["hess"][:1, :Hkv],
        state["score"][:1, :Hkv], pos, state["coupling"][:1, :Hkv], joined, None, None, False, EPS,
    )  # fmt: skip
    keep, gone = merged.survivor, merged.merged & ~merged.survivor
    after, mass_after = attend(
        torch.where(keep[..., None], merged.k.float(), cache_k),
        torch.where(keep[..., None], merged.v.float(), cache_v),
        torch.where(keep, merged.logc.float(), logc),
        torch.where(gone, -1, pos),
    )
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)
    run_mass = mass_before[..., j : j + r + 1].sum(-1)
    torch.testing.assert_close(mass_after[..., j + r], run_mass, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# RoPE
# ------------------------------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(
    seed=seeds,
    N=st.integers(2, 6),
    rd=st.sampled_from([2, 4, 8]),
    extra=st.sampled_from([0, 4]),
    p=st.sampled_from([0.5, 1.0]),
    regime=regimes,
)
def test_post_rope_merge_is_the_pre_rope_merge_rotated(seed, N, rd, extra, p, regime) -> None:
    g = _gen(seed)
    slots = _slots(g, N, rd + extra, regime, zero_scores=0.3)
    slots["pos"] = slots["pos"] + torch.randint(0, 10000, (), generator=g)
    joined = _joined(g, N, p)
    inv = _inv_freq(rd)
    pre = _merge(slots, joined)
    stored = rope_rotate(slots["keys"], slots["pos"], inv, rd)
    post = _merge({**slots, "keys": stored}, joined, inv, rd)
    keep = post.survivor
    want = rope_rotate(pre.k, pre.pos, inv, rd)
    torch.testing.assert_close(post.k[keep], want[keep], atol=1e-9, rtol=1e-9)
    for name in ("v", "logc", "hess", "score", "pos", "fallback"):
        assert torch.equal(getattr(post, name), getattr(pre, name)), name


@settings(max_examples=100, deadline=None)
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


@settings(max_examples=100, deadline=None)
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


@settings(max_examples=100, deadline=None)
@given(seed=seeds, rd=st.sampled_from([2, 4, 8]), extra=st.sampled_from([0, 2, 4]))
def test_rope_is_complex_multiplication(seed: int, rd: int, extra: int) -> None:
    g = _gen(seed)
    x = torch.randn(3, rd + extra, generator=g, dtype=F64)
    delta = torch.randint(-5000, 5000, (3,), generator=g)
    inv = _inv_freq(rd)
    rot = torch.polar(torch.ones(3, rd // 2, dtype=F64), delta[:, None].double() * inv)
    # rotate_half: (x[i], x[i + rd/2]) is one complex number
    z = torch.complex(x[:, : rd // 2], x[:, rd // 2 : rd]) * rot
    torch.testing.assert_close(
        rope_rotate(x, delta, inv, rd), torch.cat([z.real, z.imag, x[:, rd:]], -1)
    )


@settings(max_examples=100, deadline=None)
@given(
    seed=seeds,
    rd=st.sampled_from([2, 4, 8]),
    extra=st.sampled_from([0, 4]),
    p=st.integers(-20000, 20000),
    q=st.integers(-20000, 20000),
)
def test_rope_composition_and_inverse(seed, rd, extra, p, q) -> None:
    g = _gen(seed)
    x = torch.randn(2, 3, rd + extra, generator=g, dtype=F64)
    inv = _inv_freq(rd)

    def rot(y, d):
        return rope_rotate(y, d, inv, rd)

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
