"""Keys before RoPE: the SDPA pass hands the cache un-rotated keys and the storage rotates them
when attention reads them (``storage="dense:pre_rope=true"``).

1. With nothing compressed the model is still the HF model, on every tiny architecture (partial
   rotary, a rope base per layer type, no rotary at all) and with YaRN's attention scaling.
2. Under every policy it keeps the slots the post-RoPE cache keeps and decodes the same logits
   to float32 rounding (the read-time rotation is HF's arithmetic in another order; a KVSlimmer
   merge needs no rotation: the merged slot is rotated at its position when read).
3. A rotation that is not HF's ``apply_rotary_pos_emb`` is refused, naming the architecture.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import transformers.models.llama.modeling_llama as llama
from helpers import hf_logits, hf_model, prefill_and_decode, prompts, transform_reusing_trace
from hypothesis import given, settings
from test_properties import cases, run, tokens
from tiny_models import ARCHS, tiny_model

import kvslim_fx
from kvslim_fx import KVSlimError

POLICIES = ("full", "streaming", "kvslimmer", "weightedkv", "h2o", "tova", "snapkv")
PRE_ROPE = "dense:pre_rope=true"


def _hf_error(hf, model) -> float:
    ids, mask = prompts(3, 60, [0, 9, 41], seed=4)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, position_ids=positions).logits
    got = prefill_and_decode(model, ids, mask)
    return float((got - want)[mask.bool()].abs().max())


@pytest.mark.parametrize("arch", ARCHS)
def test_pre_rope_keys_give_the_hf_model(arch):
    model = transform_reusing_trace(hf_model(arch), "full", chunk_size=16, storage=PRE_ROPE)
    rotary = any(layer.storage.rope is not None for layer in model.layers)
    assert all(layer.storage.pre_rope for layer in model.layers)
    assert rotary == (arch != "gpt2")
    ids, mask = prompts(3, 60, [0, 9, 41], seed=4)
    got = prefill_and_decode(model, ids, mask)
    assert (got - hf_logits(arch, ids, mask))[mask.bool()].abs().max() < 1e-5


def test_pre_rope_keys_take_yarns_attention_scaling():
    hf = tiny_model("llama", rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
        "original_max_position_embeddings": 128,
    })  # fmt: skip
    model = kvslim_fx.transform(hf, "full", chunk_size=16, storage=PRE_ROPE)
    assert model.layers[0].storage.rope.attention_scaling > 1.1
    assert _hf_error(hf, model) < 1e-5


@settings(max_examples=25, deadline=None)
@given(case=cases(POLICIES, "accepted", max_length=120, max_steps=8))
def test_pre_rope_keys_decode_what_post_rope_keys_decode_under_every_policy(case):
    hf = hf_model(case["arch"])
    post, pre = (
        transform_reusing_trace(hf, case["name"], case["budget"], chunk_size=case["chunk"],
                                storage=storage, **case["options"])
        for storage in ("dense", PRE_ROPE)
    )  # fmt: skip
    ids, mask = tokens(case)
    want, got = run(post, case, ids, mask), run(pre, case, ids, mask)
    for a, b in zip(post.layers, pre.layers, strict=True):
        assert torch.equal(a.pos, b.pos)
    assert (got - want).abs().amax(-1)[mask.bool()].max() < 1e-5


def _interleaved_rope(q, k, cos, sin, unsqueeze_dim=1):
    """GPT-J's layout (pairs of adjacent channels), which HF's llama does not use."""
    half = cos.shape[-1] // 2
    cos = cos[..., :half].repeat_interleave(2, -1).unsqueeze(unsqueeze_dim)
    sin = sin[..., :half].repeat_interleave(2, -1).unsqueeze(unsqueeze_dim)

    def turn(x):
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)

    return q * cos + turn(q) * sin, k * cos + turn(k) * sin


def test_a_rotation_that_is_not_hfs_is_refused_naming_the_architecture():
    hf = tiny_model("llama")
    with mock.patch.object(llama, "apply_rotary_pos_emb", _interleaved_rope):
        kvslim_fx.transform(hf, "full")  # post-RoPE keys do not care how they were rotated
        with pytest.raises(KVSlimError, match=r"llama layer 0 .*rotary embedding.*rotate_half"):
            kvslim_fx.transform(hf, "full", storage=PRE_ROPE)


def test_pre_rope_is_a_storage_option_recorded_with_it():
    model = transform_reusing_trace(hf_model("llama"), "h2o", 32, storage="int8:pre_rope=true")
    assert model.layers[0].storage.options() == {"pre_rope": True, "group": 16}
    assert transform_reusing_trace(hf_model("llama"), "h2o", 32).layers[0].storage.options() == {}
    with pytest.raises(KVSlimError, match="pre_rope must be true or false"):
        transform_reusing_trace(hf_model("llama"), "h2o", 32, storage="dense:pre_rope=2")
