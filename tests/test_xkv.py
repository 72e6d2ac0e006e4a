"""``storage="xkv"``: the prompt's keys and values factored across a group of layers
(kvslim_fx/storage/xkv.py).

At full rank the factors rebuild the prompt exactly (the original model within 1e-5); below
it, each group's rows are the Eckart–Young truncation of the concatenated layers, and the cache
holds the factors, not the rows.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import CountingBackend, kv_model, prefill_and_decode, prompts, rms_logit_error
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import tiny_model

import kvslim_fx
from kvslim_fx import KVSlimError

ARCHS = ("llama", "qwen2", "gemma3_text", "mistral")
PROMPT, STEPS = 40, 4


def _xkv(arch: str, method: str = "full", budget=None, **options):
    spec = ":".join(["xkv", *(f"{k}={v}" for k, v in options.items())])
    return kv_model(arch, method, budget, chunk_size=16, storage=spec)


@pytest.mark.parametrize("arch", ARCHS)
def test_full_rank_is_the_original_model(arch):
    """Ranks at the group's width rebuild the prompt's rows exactly; the padded row's leading
    run (37 slots) is factored, the rest and the decoded tokens stay dense. Sliding-window layers
    stay dense (the tiny mistral: every layer)."""
    model = _xkv(arch, group=2, rank_k=64, rank_v=64)  # tiny models: 2 KV heads of 16
    assert rms_logit_error(arch, model, STEPS) < 1e-5
    for layer in model.layers:
        s = layer.storage
        assert s.tokens == (0 if s.site.window else PROMPT - 3)
        assert s.diagnostics()["key_error"] < 1e-6
    assert any(layer.storage.tokens for layer in model.layers) == (arch != "mistral")


def _prompt_rows(arch: str, ids, mask) -> list[dict[str, torch.Tensor] | None]:
    """Each global layer's keys (before RoPE) and values of the prompt's first 37 slots,
    ``[B, 37, H_kv·D]``: what a dense cache holds (None for a sliding-window layer's ring)."""
    model = kv_model(arch, "full", chunk_size=16, storage="dense:pre_rope=true")
    model.reset(batch_size=ids.shape[0], max_length=ids.shape[1])
    with torch.no_grad():
        model(ids, mask)
    rows = []
    for layer in model.layers:
        B, H, _, D = layer.storage.k.shape
        if layer.site.window:
            rows.append(None)
            continue
        rows.append({n: getattr(layer.storage, n)[:, :, : PROMPT - 3].transpose(1, 2)
                     .reshape(B, PROMPT - 3, H * D) for n in "kv"})  # fmt: skip
    return rows


@settings(max_examples=8, deadline=None)
@given(
    arch=st.sampled_from(["llama", "qwen2", "gemma3_text"]),
    group=st.integers(1, 3),
    rank=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_each_group_holds_its_eckart_young_truncation(arch, group, rank, seed):
    """What the factors drop from a group's concatenated rows is exactly the energy of its
    dropped singular values, and the reported error is that fraction."""
    ids, mask = prompts(2, PROMPT, pads=[0, 3], seed=seed)
    rows = _prompt_rows(arch, ids, mask)
    model = _xkv(arch, group=group, rank_k=rank, rank_v=rank)
    prefill_and_decode(model, ids, mask)
    groups: dict[int, list[int]] = {}
    for i, layer in enumerate(model.layers):
        if layer.storage.shared is not None:
            groups.setdefault(id(layer.storage.shared), []).append(i)
    assert groups and all(len(m) <= group for m in groups.values())
    for members in groups.values():
        for name, read in (("k", "keys"), ("v", "values")):
            want = torch.cat([rows[i][name] for i in members], dim=-1).double()
            got = torch.cat([
                getattr(model.layers[i].storage, read)()[:, :, : PROMPT - 3]
                .transpose(1, 2).reshape(want.shape[0], PROMPT - 3, -1) for i in members
            ], dim=-1).double()  # fmt: skip
            sigma = torch.linalg.svdvals(want)  # [B, min(T, width)]
            dropped = sigma[:, rank:].pow(2).sum(-1)
            assert torch.allclose((want - got).pow(2).sum((-1, -2)), dropped, rtol=1e-3,
                                  atol=1e-6 * float(sigma.pow(2).sum()))  # fmt: skip
            fraction = float((dropped / sigma.pow(2).sum(-1)).sqrt().max())
            error = model.layers[members[0]].storage.errors[name]
            # Energies (squares) to the energy check's tolerance: fp32 factoring leaves ~1e-7 of
            # the total energy, which is a large part of a small dropped fraction's square root.
            assert math.isclose(error**2, fraction**2, rel_tol=1e-3, abs_tol=1e-6)


def test_the_cache_holds_the_factors_not_the_rows():
    """After the prompt a group's bytes are ``T·(r_k + r_v)`` for its token bases plus
    ``H_kv·D·(r_k + r_v)`` per layer, and the dense rows left are the slots after the prompt."""
    model = _xkv("llama", group=2, rank_k=6, rank_v=10)
    ids, mask = prompts(1, PROMPT, seed=1)
    prefill_and_decode(model, ids, mask)
    elem = 4
    layers = model.layers
    s = layers[0].storage
    width = s.width
    capacity = layers[0].capacity
    groups = math.ceil(len(layers) / 2)
    bookkeeping = sum(
        sum(getattr(layer, n)[:, :, :1].numel() * getattr(layer, n).element_size()
            for n in layer.slot_state) * layer.capacity for layer in layers
    )  # fmt: skip
    dense_rows = len(layers) * (capacity - PROMPT) * 2 * width * elem
    factors = len(layers) * width * (6 + 10) * elem
    bases = groups * PROMPT * (6 + 10) * elem
    assert model.cache_bytes() == bases + factors + dense_rows + bookkeeping
    assert all(layer.storage.k.shape[2] == capacity + 1 - PROMPT for layer in layers)


def test_the_cache_is_near_the_formula_and_4x_below_dense_at_8x():
    """At the default ratio (1/8, the reference's 8× setting) with the default model's attention
    shape (3 KV heads of 64), a 2,048-token prompt and 64 decoded slots: the cache is within
    10 % of the factors' formula plus the dense decoded rows (the rest is the int32 position per
    slot and head), and at least 4× below a dense cache of the same sequence. (The default model
    at a 4,096-token prompt, 30 layers: +4.3 % and 5.3×; G = 1: +5.0 % and 6.1×.)"""
    T, steps, L, group = 2048, 64, 4, 4
    hf = tiny_model("llama", hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                    head_dim=64, num_hidden_layers=L, intermediate_size=64,
                    max_position_embeddings=4096)  # fmt: skip
    model = kvslim_fx.transform(hf, storage=f"xkv:group={group}", chunk_size=512)
    ids, mask = prompts(1, T, seed=2)
    model.reset(batch_size=1, max_length=T + steps)
    with torch.no_grad():
        model(ids, mask)
    model.end_prompt()
    s = model.layers[0].storage
    ranks, width = s.rank_k + s.rank_v, s.width  # width = H_kv · D = 192
    formula = math.ceil(L / group) * T * ranks + L * width * ranks + L * steps * 2 * width
    assert model.cache_bytes() <= 1.1 * 4 * formula
    assert model.full_cache_bytes(T + steps) >= 4 * model.cache_bytes()


def test_ranks_follow_the_ratio_and_the_key_share():
    model = _xkv("llama", group=4, ratio=0.125, key_share=0.4)
    s = model.layers[0].storage  # width 32: 2 · 4 · 32 / 8 = 32 numbers per token
    assert (s.rank_k, s.rank_v) == (13, 19)
    assert "rank_k=13" in repr(model)


def test_the_logit_error_shrinks_as_the_rank_grows():
    errors = [rms_logit_error("llama", _xkv("llama", group=2, rank_k=r, rank_v=r), STEPS)
              for r in (4, 16, 64)]  # fmt: skip
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-5, errors


def test_a_policy_that_drops_slots_is_refused_by_name():
    with pytest.raises(KVSlimError, match="'xkv' cannot carry method 'streaming'"):
        _xkv("llama", "streaming", 32)


@pytest.mark.parametrize(
    "options",
    ["group=0", "ratio=0", "ratio=1.5", "key_share=1", "rank_k=0", "pre_rope=false"],
)
def test_bad_options_are_refused(options):
    with pytest.raises(KVSlimError, match="xkv"):
        kv_model("llama", "full", chunk_size=16, storage=f"xkv:{options}")


@pytest.mark.slow
def test_compiled_decode_equals_eager_without_recompiles():
    """The factoring runs eagerly between the prompt and decoding (``generate`` calls
    ``end_prompt``); the decode graph reads the factors and the dense rows after them, and a
    second prompt of the same length compiles nothing new."""
    model = _xkv("llama", "full", 120, group=2, rank_k=8, rank_v=8)
    ids, mask = prompts(2, 64, [0, 9], seed=6)
    eager = kvslim_fx.generate(model, ids, mask, max_new_tokens=20, eos_token_id=[])
    assert model.layers[0].storage.tokens == 64 - 9
    torch._dynamo.reset()
    backend = CountingBackend()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    kvslim_fx.generate(compiled, ids, mask, max_new_tokens=2, eos_token_id=[])
    warm = backend.graphs
    got = kvslim_fx.generate(compiled, ids, mask, max_new_tokens=20, eos_token_id=[])
    assert backend.graphs == warm, "decode recompiled after warm-up"
    assert torch.equal(got, eager)


def test_export_refuses_it_by_name(tmp_path):
    with pytest.raises(KVSlimError, match="storage 'xkv' re-encodes the cache"):
        kvslim_fx.export(_xkv("llama"), tmp_path / "m.pt2")
