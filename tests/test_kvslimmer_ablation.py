"""benchmarks/kvslimmer_ablation.py: its variants keep KVSlimmer's selection and change only what a
selected pair becomes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from helpers import kv_model, prefill_and_decode, prompts

from kvslim_fx import methods

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
OPTIONS = {"chunk_size": 16, "sink": 2, "recent": 4}


@pytest.fixture(scope="module", autouse=True)
def ablation():
    """Register the variants for this module's tests only (the script imports ``quality`` as a
    sibling script does)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(methods, "METHODS", dict(methods.METHODS))
        patch.syspath_prepend(str(BENCHMARKS))
        path = BENCHMARKS / "kvslimmer_ablation.py"
        spec = importlib.util.spec_from_file_location("kvslimmer_ablation", path)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        yield


def by_position(layer, rows: torch.Tensor) -> dict[tuple[int, int, int], torch.Tensor]:
    """``(row, head, position) → row`` of ``rows [B, H, C, D]`` for the layer's occupied slots."""
    pos = layer.pos[:, :, : rows.shape[2]]
    return {(b, h, int(pos[b, h, s])): rows[b, h, s]
            for b, h, s in (pos >= 0).nonzero().tolist()}  # fmt: skip


def assert_first_layer_values_are_whole_tokens(model, full, mask: torch.Tensor) -> None:
    """The first layer's values depend on the token alone: each slot's is the uncompressed
    model's at its position or, where the pair kept its earlier member, at an earlier one (the
    prompt's tokens: the decoded ones differ from full's once the cache compresses)."""
    f, m = full.layers[0], model.layers[0]
    exact = by_position(f, f.storage.values())
    for (b, h, p), row in by_position(m, m.storage.values()).items():
        if p < int(mask[b].sum()):
            assert min((row - exact[b, h, q]).abs().max() for q in range(p + 1)) < 1e-5


def test_evict_keeps_whole_tokens_and_drops_as_many_as_kvslimmer_merges():
    ids, mask = prompts(2, 70, [0, 9], seed=3)
    full = kv_model("llama", "full")
    evict = kv_model("llama", "kvslimmer_evict", 32, **OPTIONS)
    slim = kv_model("llama", "kvslimmer", 32, **OPTIONS)
    for model in (full, evict, slim):
        prefill_and_decode(model, ids, mask, steps=5)
    for e, s in zip(evict.layers, slim.layers, strict=True):
        occupied = e.pos[:, :, :32] >= 0
        assert int(occupied.sum(-1).min()) == 32
        # Nothing merged: every slot is one token.
        assert torch.equal(e.logc[:, :, :32][occupied], torch.zeros(int(occupied.sum())))
        assert e.merge_stats[0] == s.merge_stats[0] > 0  # as many tokens go as KVSlimmer merges
    assert_first_layer_values_are_whole_tokens(evict, full, mask)


@pytest.mark.parametrize(
    ("gate", "same_as"), [(-1.0, "kvslimmer"), (2.0, "kvslimmer_evict_counted")]
)
def test_gate_at_its_ends_is_the_merge_or_the_counted_eviction(gate, same_as):
    ids, mask = prompts(2, 70, [0, 9], seed=4)
    gated = kv_model("llama", "kvslimmer_gate", 32, gate=gate, **OPTIONS)
    other = kv_model("llama", same_as, 32, **OPTIONS)
    for model in (gated, other):
        prefill_and_decode(model, ids, mask, steps=5)
    for g, o in zip(gated.layers, other.layers, strict=True):
        assert torch.equal(g.pos, o.pos) and torch.equal(g.logc, o.logc)
        torch.testing.assert_close(g.storage.keys(), o.storage.keys(), rtol=0, atol=0)
        torch.testing.assert_close(g.storage.values(), o.storage.values(), rtol=0, atol=0)
        assert torch.equal(g.merge_stats, o.merge_stats)


def test_vbest_keeps_a_member_value_but_counts_the_pair():
    ids, mask = prompts(2, 70, [0, 9], seed=5)
    full = kv_model("llama", "full")
    vbest = kv_model("llama", "kvslimmer_vbest", 32, **OPTIONS)
    for model in (full, vbest):
        prefill_and_decode(model, ids, mask, steps=5)
    v = vbest.layers[0]
    occupied = v.pos[:, :, :32] >= 0
    assert float(v.logc[:, :, :32][occupied].max()) > 0  # merged slots count their members
    assert_first_layer_values_are_whole_tokens(vbest, full, mask)  # one member's, unblended
