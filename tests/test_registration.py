"""Public registration: a policy or a storage of one's own, by name, like the built-in ones.

The policy is ``tests/user_policy.py``, the storages ``tests/user_storage.py`` (written as a user
would, outside the library); compile and export run them in ``test_compile.py`` and
``test_export.py``.
"""

from __future__ import annotations

import pytest
import torch
import user_storage  # noqa: F401  (registers a user's own storages, tally and tally-hook)
from helpers import kv_model, prefill_and_decode, prompts
from user_policy import Decayed

import kvslim_fx
from kvslim_fx import KVSlimError
from kvslim_fx.methods import Method, make_method
from kvslim_fx.storage import Dense, Storage


def test_a_registered_policy_is_known_by_name():
    assert kvslim_fx.METHODS["decayed"] is Decayed
    policy = make_method("decayed", 40, half_life=8)
    assert policy.options() == {"budget": 40, "sink": 4, "recent": None, "per_head": True,
                                "half_life": 8.0}  # fmt: skip
    with pytest.raises(KVSlimError, match="decayed"):  # listed among the known ones
        make_method("no-such-policy")


def test_without_decay_the_policy_is_h2o():
    """A half-life far beyond the sequence leaves H2O's score: the same logits, bit for bit."""
    ids, mask = prompts(2, 60, [0, 7], seed=3)
    mine = kv_model("llama", "decayed", 32, chunk_size=16, recent=8, half_life=1e30)
    h2o = kv_model("llama", "h2o", 32, chunk_size=16, recent=8)
    got = prefill_and_decode(mine, ids, mask, steps=12)
    assert torch.equal(got, prefill_and_decode(h2o, ids, mask, steps=12))
    assert mine.layers[0].merge_stats[0] > 0
    # With decay the choice differs: old tokens fade.
    fading = kv_model("llama", "decayed", 32, chunk_size=16, recent=8, half_life=2)
    assert not torch.equal(prefill_and_decode(fading, ids, mask, steps=12), got)


def test_registration_refuses_what_is_not_a_policy_or_a_storage():
    with pytest.raises(TypeError, match="subclass"):
        kvslim_fx.register_method(int)
    with pytest.raises(TypeError, match="name"):
        kvslim_fx.register_method(type("Nameless", (Method,), {}))
    with pytest.raises(TypeError, match="subclass"):
        kvslim_fx.register_storage(Method)
    with pytest.raises(TypeError, match="name"):
        kvslim_fx.register_storage(type("Nameless", (Storage,), {}))


def test_a_registered_storage_is_used_by_name():
    """A storage subclass registered under a new name holds the cache: results unchanged."""

    @kvslim_fx.register_storage
    class Mine(Dense):
        name = "test-dense-copy"

    try:
        ids, mask = prompts(2, 50, [0, 5], seed=4)
        mine = kv_model("llama", "weightedkv", 24, chunk_size=16, storage="test-dense-copy")
        dense = kv_model("llama", "weightedkv", 24, chunk_size=16)
        assert all(type(layer.storage) is Mine for layer in mine.layers)
        got = prefill_and_decode(mine, ids, mask, steps=8)
        assert torch.equal(got, prefill_and_decode(dense, ids, mask, steps=8))
    finally:
        del kvslim_fx.STORAGES["test-dense-copy"]
    with pytest.raises(KVSlimError, match=r"unknown storage 'test-dense-copy'.*dense"):
        kv_model("llama", "weightedkv", 24, storage="test-dense-copy")


def test_layers_of_a_group_share_state_that_compile_carries(tmp_path):
    """tests/user_storage.py: llama's two layers make one group; ``full`` stores every real
    token once per layer. The shared tally is one buffer in ``state()`` and in
    ``cache_bytes()``; the prompt-end hook runs once the prompt is in, eagerly and compiled;
    export refuses the hook by name (test_export.py packages the hookless ``tally``)."""
    ids, mask = prompts(2, 30, [0, 6], seed=5)
    dense = kv_model("llama", "full", None, chunk_size=16)
    model = kv_model("llama", "full", None, chunk_size=16, storage="tally-hook")
    want = kvslim_fx.generate(dense, ids, mask, max_new_tokens=6)
    (tally,) = {id(layer.storage.shared): layer.storage.shared for layer in model.layers}.values()
    for run in (model, torch.compile(model, fullgraph=True)):
        assert torch.equal(kvslim_fx.generate(run, ids, mask, max_new_tokens=6), want)
        fed = mask.sum(-1) + 5  # the last new token is never fed
        assert torch.equal(tally.stored, 2 * fed)
        assert torch.equal(tally.at_prompt_end, 2 * mask.sum(-1))
    assert sum(name.endswith("shared.stored") for name in model.state()) == 1
    assert model.cache_bytes() == dense.cache_bytes() + 2 * 2 * 8  # one tally: two [B] int64
    with pytest.raises(KVSlimError, match="'tally-hook' re-encodes the cache"):
        kvslim_fx.export(model, tmp_path / "hook.pt2", batch_size=2, max_length=64)
