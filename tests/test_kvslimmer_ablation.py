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
    # The first layer's values depend on the token alone: each slot's is the uncompressed
    # model's at its position or, where the pair kept its earlier member, at an earlier one
    # (the prompt's tokens: the decoded ones differ from full's once the cache compresses).
    f, e = full.layers[0], evict.layers[0]
    exact = by_position(f, f.storage.values())
    for (b, h, p), row in by_position(e, e.storage.values()).items():
        if p < int(mask[b].sum()):
            assert min((row - exact[b, h, q]).abs().max() for q in range(p + 1)) < 1e-5
