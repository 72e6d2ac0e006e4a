"""Public registration: a policy or a storage of one's own, by name, like the built-in ones.

The policy is ``tests/user_policy.py`` (written as a user would, outside the library); compile
and export run it in ``test_compile.py`` and ``test_export.py``.
"""

from __future__ import annotations

import pytest
import torch
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


class Tally(torch.nn.Module):
    """A group's state: tokens its layers stored, and that count when the prompt ended."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("stored", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("at_prompt_end", torch.zeros(0, dtype=torch.long), persistent=False)


class Grouped(Dense):
    """Dense rows; each pair of layers shares a :class:`Tally` of the tokens they stored."""

    name = "test-grouped"

    def __init__(self, site, rope=None, **base) -> None:
        super().__init__(site, rope, **base)
        self.shared_state(site.layer // 2, Tally)

    def allocate(self, batch, rows, dtype, device) -> None:
        super().allocate(batch, rows, dtype, device)
        for name in ("stored", "at_prompt_end"):
            setattr(self.shared, name, torch.zeros(batch, dtype=torch.long, device=device))

    def write(self, slot, k, v) -> None:
        super().write(slot, k, v)
        if k is not None:  # a new token's first write (the trash row takes padding)
            trash = self.k.shape[2] - 1
            self.shared.stored += (slot[:, 0] < trash).sum(-1)


class MarksThePrompt(Grouped):
    name = "test-grouped-hook"

    def end_prompt(self) -> None:
        self.shared.at_prompt_end.copy_(self.shared.stored)


def test_layers_of_a_group_share_state_that_compile_and_packages_carry(tmp_path):
    """gemma3_text's three layers make two groups; ``full`` stores every real token once per
    layer. The shared tally is one buffer in ``state()`` and in ``cache_bytes()``; the prompt-end
    hook runs once the prompt is in; compile and a package decode the same tokens."""
    for cls in (Grouped, MarksThePrompt):
        kvslim_fx.register_storage(cls)
    try:
        ids, mask = prompts(2, 30, [0, 6], seed=5)
        models = {name: kv_model("gemma3_text", "full", None, chunk_size=16, storage=name)
                  for name in ("dense", "test-grouped", "test-grouped-hook")}  # fmt: skip
        want = kvslim_fx.generate(models["dense"], ids, mask, max_new_tokens=6)
        model = models["test-grouped-hook"]
        tallies = {id(layer.storage.shared): layer.storage.shared for layer in model.layers}
        assert len(tallies) == 2
        for compiled in (False, True):
            run = torch.compile(model) if compiled else model
            assert torch.equal(kvslim_fx.generate(run, ids, mask, max_new_tokens=6), want)
            fed = mask.sum(-1) + 5  # the last new token is never fed
            assert [t.stored.tolist() for t in tallies.values()] == [(2 * fed).tolist(),
                                                                    fed.tolist()]  # fmt: skip
            prompt = mask.sum(-1)
            assert [t.at_prompt_end.tolist() for t in tallies.values()] == [
                (2 * prompt).tolist(), prompt.tolist()]  # fmt: skip
        state = model.state()
        assert sum(name.endswith("shared.stored") for name in state) == 2
        dense_bytes = models["dense"].cache_bytes()
        assert model.cache_bytes() == dense_bytes + 2 * 2 * 2 * 8  # two tallies of two [B] int64
        with pytest.raises(KVSlimError, match="'test-grouped-hook' re-encodes the cache"):
            kvslim_fx.export(model, tmp_path / "hook.pt2", batch_size=2, max_length=64)
        grouped = models["test-grouped"]
        path = kvslim_fx.export(grouped, tmp_path / "grouped.pt2", batch_size=2, max_length=64)
        runner = kvslim_fx.load(path)
        assert torch.equal(runner.generate(ids, mask, max_new_tokens=6), want)
        assert sum(name.endswith("shared.stored") for name in runner.state) == 2
    finally:
        for cls in (Grouped, MarksThePrompt):
            del kvslim_fx.STORAGES[cls.name]
