"""``storage="lorc"``: low-rank latents of the key/value projections (kvslim_fx/storage/lorc.py).

Full rank is the original model; below it, the cache holds the Eckart–Young truncation of each
projection (bias included, as a last row against a constant input); ranks follow the schedule.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    hf_model,
    kv_model,
    prefill_and_decode,
    prompts,
    rms_logit_error,
    transform_reusing_trace,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from kvslim_fx import KVSlimError
from kvslim_fx.storage.lorc import allocate_ranks, progressive_weights

ARCHS = ("llama", "qwen2", "gemma3_text", "mistral", "gpt2")


def _lorc(arch: str, ratio: float, method: str = "full", budget=None, schedule="progressive",
          **options):  # fmt: skip
    return kv_model(arch, method, budget, chunk_size=16,
                    storage=f"lorc:ratio={ratio}:schedule={schedule}", **options)  # fmt: skip


def _calibrated(arch: str, ratio: float, ids, mask=None):
    """A fresh (not cached: calibration changes it) full-cache lorc model fitted on ``ids``."""
    model = transform_reusing_trace(hf_model(arch), "full", chunk_size=16,
                                    storage=f"lorc:ratio={ratio}")  # fmt: skip
    model.calibrate(ids, mask)
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_full_rank_is_the_original_model(arch):
    """Ratio 1 keeps every singular direction: the model's logits within 1e-5 (fp32), prefill in
    chunks and decode, full and streaming (whose budget then covers the sequence)."""
    for method, budget in (("full", None), ("streaming", 64)):
        model = _lorc(arch, 1.0, method, budget)
        assert rms_logit_error(arch, model, steps=5) < 1e-5, method
        for layer in model.layers:
            assert layer.storage.rank_k == layer.storage.width


@settings(max_examples=6, deadline=None)
@given(arch=st.sampled_from(ARCHS), seed=st.integers(0, 2**16))
def test_the_logit_error_shrinks_as_the_rank_grows(arch, seed):
    errors = [rms_logit_error(arch, _lorc(arch, r, schedule="uniform"), seed=seed)
              for r in (0.25, 0.5, 0.75, 1.0)]  # fmt: skip
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_the_cache_holds_the_eckart_young_truncation(arch):
    """Each layer's basis is the top right singular vectors of ``[Wᵀ; bᵀ]``: what it drops is
    exactly the energy of the dropped singular values, and a stored key rebuilds as
    ``[x, 1] M_r`` (``qwen2``: k/v bias inside the factor)."""
    model = _lorc(arch, 0.5)
    for layer in model.layers:
        s = layer.storage
        for proj, basis in ((s.site.key_proj, s.basis_k), (s.site.value_proj, s.basis_v)):
            m = proj.augmented()
            sigma = torch.linalg.svdvals(m)
            r = basis.shape[1]
            vr = basis.double()
            kept = m @ vr @ vr.T
            dropped = float(sigma[r:].pow(2).sum().sqrt())
            assert math.isclose(float((m - kept).norm()), dropped, rel_tol=1e-5, abs_tol=1e-9)
            # A token's key [x, 1] M, stored as a latent and rebuilt, is [x, 1] M_r.
            x = torch.cat([torch.randn(3, m.shape[0] - (proj.bias is not None)),
                           torch.ones(3, int(proj.bias is not None))], dim=1).double()  # fmt: skip
            key = (x @ m).float().view(1, 3, s.site.num_kv_heads, s.site.head_dim).transpose(1, 2)
            latent = s._latent(key, basis, torch.float32)
            rebuilt = s._rebuilt(latent, basis).transpose(1, 2).reshape(3, -1)
            torch.testing.assert_close(rebuilt.double(), x @ kept, atol=1e-4, rtol=1e-4)
        assert proj.bias is not None or arch != "qwen2"


def test_half_the_width_costs_at_most_0_52_of_the_dense_cache():
    """At a real head size (SmolLM2's: 3 KV heads of 64) the latents are half of K and V; the
    per-slot bookkeeping (position and log-cardinality, 12 B per KV head) is the rest. (The tiny
    models' 2 heads of 16 make that bookkeeping 9 % of a dense slot.)"""
    from tiny_models import tiny_model

    hf = tiny_model("llama", hidden_size=192, num_attention_heads=3, num_key_value_heads=3,
                    head_dim=64)  # fmt: skip
    dense = transform_reusing_trace(hf, "streaming", 32, chunk_size=16)
    lorc = transform_reusing_trace(hf, "streaming", 32, chunk_size=16, storage="lorc:ratio=0.5")
    for model in (dense, lorc):
        model.reset(batch_size=2, max_length=64)
    assert lorc.cache_bytes() <= 0.52 * dense.cache_bytes()
    ranks = [(layer.storage.rank_k, layer.storage.rank_v) for layer in lorc.layers]
    width = lorc.layers[0].storage.width
    assert sum(k + v for k, v in ranks) == len(ranks) * width  # half of 2·width per layer
    assert "rank_k=" in repr(lorc)
    assert [(d["rank_k"], d["rank_v"]) for d in lorc.diagnostics()] == ranks
    # key_share moves numbers from keys to values at the same bytes.
    split = transform_reusing_trace(
        hf, "streaming", 32, chunk_size=16, storage="lorc:ratio=0.5:key_share=0.25:schedule=uniform"
    )
    split.reset(batch_size=2, max_length=64)
    assert split.cache_bytes() == lorc.cache_bytes()
    assert [(layer.storage.rank_k, layer.storage.rank_v) for layer in split.layers] == \
        [(width // 4, width - width // 4)] * len(ranks)  # fmt: skip


@pytest.mark.parametrize("prefill", ["bounded", "full"])
def test_score_methods_compose_with_a_shared_selection(prefill):
    """H2O (bounded) and SnapKV (question-aware prefill, which scores the prompt through the
    storage's keys and compacts its rows) with per_head=False over lorc keep the positions they
    keep over dense (full rank) and give the same tokens."""
    import kvslim_fx

    method = "h2o" if prefill == "bounded" else "snapkv"
    ids, mask = prompts(2, 60, pads=[0, 3])
    options = {"per_head": False, "prefill": prefill}
    dense = kv_model("llama", method, 40, chunk_size=16, **options)
    lorc = _lorc("llama", 1.0, method, 40, **options)
    want, got = (kvslim_fx.generate(m, ids, mask, max_new_tokens=8, eos_token_id=[])
                 for m in (dense, lorc))  # fmt: skip
    assert torch.equal(got, want)
    for a, b in zip(dense.layers, lorc.layers, strict=True):
        assert torch.equal(a.pos, b.pos)


@pytest.mark.parametrize(
    ("method", "options", "match"),
    [("kvslimmer", {}, "combines rows"), ("weightedkv", {"per_head": False}, "combines rows"),
     ("h2o", {}, "per_head=False")],
)  # fmt: skip
def test_policies_lorc_cannot_carry_are_refused_by_name(method, options, match):
    with pytest.raises(KVSlimError, match=f"'lorc' cannot carry method '{method}'.*{match}"):
        transform_reusing_trace(hf_model("llama"), method, 24, storage="lorc", **options)


def test_a_projection_it_cannot_read_is_refused_naming_the_layer():
    # GPT-NeoX interleaves q, k and v per head in one projection.
    with pytest.raises(KVSlimError, match=r"gpt_neox layer 0 .*factors the key/value projection"):
        transform_reusing_trace(hf_model("gpt_neox"), "full", storage="lorc")


@pytest.mark.parametrize(
    "options", ["ratio=0", "ratio=1.5", "schedule=steep", "key_share=0", "key_share=1"]
)
def test_bad_options_are_refused(options):
    with pytest.raises(KVSlimError, match=r"lorc: (ratio|schedule|key_share)"):
        transform_reusing_trace(hf_model("llama"), "full", storage=f"lorc:{options}")


@settings(max_examples=200, deadline=None)
@given(
    weights=st.lists(st.floats(1, 2), min_size=1, max_size=12),
    caps=st.data(),
    ratio=st.floats(0.05, 1),
)
def test_ranks_meet_the_total_within_caps_and_follow_the_weights(weights, caps, ratio):
    caps = caps.draw(st.lists(st.integers(1, 64), min_size=len(weights), max_size=len(weights)))
    total = round(ratio * sum(caps))
    ranks = allocate_ranks(weights, total, caps)
    assert sum(ranks) == min(max(total, len(caps)), sum(caps))
    assert all(1 <= r <= c for r, c in zip(ranks, caps, strict=True))
    # A layer of more weight never gets fewer than one of less unless its cap holds it back.
    for i, j in ((i, j) for i in range(len(weights)) for j in range(len(weights))):
        if weights[i] > weights[j] and ranks[i] < caps[i]:
            assert ranks[i] >= ranks[j] - 1


def test_progressive_weights_favour_the_shallow_layers():
    w = progressive_weights([3.0, 2.0, 5.0, 1.5])
    assert w == sorted(w, reverse=True) and w[0] == 2 and w[-1] == 1
    assert progressive_weights([2.0]) == [1.0]


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 2),
    Hkv=st.integers(1, 3),
    G=st.integers(1, 3),
    C=st.integers(1, 12),
    dense=st.integers(0, 4),
    L=st.integers(1, 4),
    r=st.integers(1, 8),
    batched=st.booleans(),
    rope=st.booleans(),
    window=st.sampled_from([0, 6]),
    seed=st.integers(0, 2**16),
)
def test_attend_latent_is_attention_over_the_rebuilt_rows(
    B, Hkv, G, C, dense, L, r, batched, rope, window, seed
):  # fmt: skip
    """The value-absorption identity: weighting the latents and mapping the sum through ``B_V``
    is attention over the rebuilt values; keys are rebuilt, then rotated to their positions, as
    the dense rows after them (xkv's tokens after the prompt; a basis per sequence)."""
    from kvslim_fx.kernels.attention import attend_latent_reference, attend_reference, latent_rows
    from kvslim_fx.kernels.run_merge import rope_rotate

    g = torch.Generator().manual_seed(seed)
    D = 4
    r = min(r, Hkv * D)
    q = torch.randn(B, Hkv * G, L, D, generator=g)
    k, v = torch.randn(2, B, Hkv, L, D, generator=g)
    ck, cv = torch.randn(2, B, 1, C, r, generator=g)
    rows_k, rows_v = torch.randn(2, B, Hkv, dense, D, generator=g)
    shape = (B, Hkv * D, r) if batched else (Hkv * D, r)
    bk, bv = (torch.linalg.qr(torch.randn(*shape, generator=g))[0] for _ in range(2))
    logc = torch.randn(B, Hkv, C + dense, generator=g).abs()
    pos = torch.randperm(C + dense, generator=g).expand(B, Hkv, C + dense).clone()
    pos[:, :, 0] = -1  # an empty slot
    q_pos = torch.arange(C + dense, C + dense + L).expand(B, L).clone()
    q_pos[0, 0] = -1  # a pad
    inv_freq = 10000 ** -(torch.arange(D // 2) / (D // 2)) if rope else None
    keys = torch.cat([latent_rows(ck, bk, Hkv), rows_k], dim=2)
    if rope:
        keys = rope_rotate(keys, pos.clamp_min(0), inv_freq, D) * 1.25
    values = torch.cat([latent_rows(cv, bv, Hkv), rows_v], dim=2)
    args = (logc, pos, q_pos, 0.5, window, 1, 0, True)
    want = attend_reference(q, k, v, keys, values, *args)
    got = attend_latent_reference(q, k, v, ck, cv, bk, bv, rows_k, rows_v, *args, inv_freq,
                                  D if rope else 0, 1.25)  # fmt: skip
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_attend_latent_opcheck():
    g = torch.Generator().manual_seed(0)
    B, Hkv, G, C, dense, L, D, r = 2, 2, 2, 6, 2, 3, 4, 3
    args = (
        torch.randn(B, Hkv * G, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g),
        torch.randn(B, Hkv, L, D, generator=g), torch.randn(B, 1, C, r, generator=g),
        torch.randn(B, 1, C, r, generator=g), torch.randn(Hkv * D, r, generator=g),
        torch.randn(Hkv * D, r, generator=g), torch.randn(B, Hkv, dense, D, generator=g),
        torch.randn(B, Hkv, dense, D, generator=g), torch.zeros(B, Hkv, C + dense),
        torch.arange(C + dense).expand(B, Hkv, C + dense).contiguous(),
        torch.arange(C + dense, C + dense + L).expand(B, L), 0.5, 0, 0, 0, True,
        10000 ** -(torch.arange(D // 2) / (D // 2)), D, 1.0,
    )  # fmt: skip
    torch.library.opcheck(torch.ops.kvslim.attend_latent.default, args)


def _rows(arch: str, ids, mask) -> dict[str, list[torch.Tensor]]:
    """Each layer's keys (before RoPE) and values of the real tokens, ``[N, H_kv·D]`` float64:
    what a dense cache of the whole sequence holds."""
    model = kv_model(arch, "full", chunk_size=16, storage="dense:pre_rope=true")
    prefill_and_decode(model, ids, mask)
    rows = {"k": [], "v": []}
    for layer in model.layers:
        real = layer.pos[:, 0] >= 0  # [B, R]
        for name, t in (("k", layer.storage.keys()), ("v", layer.storage.values())):
            rows[name].append(t.transpose(1, 2)[real].flatten(1).double())
    return rows


@settings(max_examples=4, deadline=None)
@given(arch=st.sampled_from(("llama", "qwen2", "gemma3_text")), seed=st.integers(0, 2**16))
def test_calibrated_bases_are_the_principal_directions_of_the_rows(arch, seed):
    """After ``calibrate``, each basis spans the rank-``r`` subspace with the least squared
    error over the calibration text's rows (padding excluded): the error is the root of the
    dropped eigenvalues of ``Σ rowᵀ row``, and no larger than the weights' basis leaves.
    (Checked on the layers without a sliding window, whose dense cache holds every row.)"""
    ids, mask = prompts(2, 40, pads=[0, 3], seed=seed)
    model, weights = _calibrated(arch, 0.5, ids, mask), _lorc(arch, 0.5)
    rows = _rows(arch, ids, mask)
    for i, (layer, before) in enumerate(zip(model.layers, weights.layers, strict=True)):
        s = layer.storage
        assert s.calibration_tokens == int(mask.sum())
        if s.site.window:
            continue
        for name in ("k", "v"):
            x, basis = rows[name][i], getattr(s, f"basis_{name}").double()
            assert basis.shape == getattr(before.storage, f"basis_{name}").shape
            eig = torch.linalg.eigvalsh(x.T @ x)  # ascending
            best = float(eig[: -basis.shape[1]].clamp_min(0).sum().sqrt())
            err = float((x - x @ basis @ basis.T).norm())
            assert math.isclose(err, best, rel_tol=1e-3, abs_tol=1e-4 * float(x.norm()))
            w = getattr(before.storage, f"basis_{name}").double()
            assert err <= float((x - x @ w @ w.T).norm()) * (1 + 1e-6) + 1e-9


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_calibrated_full_rank_is_the_original_model(arch):
    model = _calibrated(arch, 1.0, *prompts(1, 24, seed=7))
    assert rms_logit_error(arch, model, steps=3) < 1e-5


def test_calibration_restores_the_bases_when_its_pass_fails_and_dense_refuses():
    model = transform_reusing_trace(hf_model("llama"), "full", storage="lorc")
    before = [layer.storage.basis_k.clone() for layer in model.layers]
    with pytest.raises(KVSlimError, match="vocab"):
        model.calibrate(torch.full((1, 8), 10**6))
    for layer, basis in zip(model.layers, before, strict=True):
        assert torch.equal(layer.storage.basis_k, basis)
        assert layer.storage.calibration_tokens == 0
    with pytest.raises(KVSlimError, match="storage 'dense' learns nothing from data"):
        kv_model("llama").calibrate(torch.zeros(1, 4, dtype=torch.long))
