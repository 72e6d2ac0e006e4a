"""Shared test utilities: cached tiny models, padded prompts, HF reference logits."""

from __future__ import annotations

import functools
from unittest import mock

import torch
from tiny_models import PAD_TOKEN_ID, VOCAB_SIZE, tiny_model

import kvslim_fx
from kvslim_fx.methods import METHODS


@functools.cache
def hf_model(arch: str):
    return tiny_model(arch)


@functools.cache
def kv_model(arch: str, method: str = "full", budget=None, chunk_size: int = 64, **options):
    return transform_reusing_trace(hf_model(arch), method, budget, chunk_size=chunk_size, **options)


# HF model → its torch.export trace (see transform_reusing_trace).
_TRACES: dict = {}


def transform_reusing_trace(hf, method: str = "full", budget=None, *, chunk_size: int = 64,
                            **options):  # fmt: skip
    """``kvslim_fx.transform(hf, method, budget, ...)`` with ``hf``'s ``torch.export`` trace reused.

    The trace depends on the HF model alone (not on the method, budget, options or chunk size)
    and is most of ``transform``'s time (seconds), so a property can build a model per drawn
    example. The rest of ``transform`` runs as it does for a user: the method and its checks,
    ``ExportedProgram.module()`` (a fresh deep copy of the graph each call), the rewrite, the
    caches.
    """
    export = torch.export.export

    def traced(model, *args, **kwargs):
        if model not in _TRACES:
            _TRACES[model] = export(model, *args, **kwargs)
        return _TRACES[model]

    with mock.patch.object(torch.export, "export", traced):
        return kvslim_fx.transform(hf, method, budget, chunk_size=chunk_size, **options)


def prompts(batch: int, length: int, pads: list[int] | None = None, seed: int = 0):
    """Random token ids ``[batch, length]`` left-padded by ``pads[b]`` tokens, and their mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB_SIZE, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for b, n in enumerate(pads or [0] * batch):
        mask[b, :n] = 0
    ids[mask == 0] = PAD_TOKEN_ID
    return ids, mask


@torch.no_grad()
def hf_logits(arch: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The original model's logits over a whole (left-padded) sequence, HF position convention."""
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    return hf_model(arch)(ids, attention_mask=mask, position_ids=positions).logits


def prefill_and_decode(model, ids, mask, steps: int = 0) -> torch.Tensor:
    """Prefill ``ids``, end the prompt (as ``generate`` does: a storage's prompt-end hook runs),
    then ``steps`` greedy decode steps; returns every step's logits."""
    model.reset(batch_size=ids.shape[0], max_length=ids.shape[1] + steps)
    with torch.no_grad():
        logits = [model(ids, mask)]
        model.end_prompt()
        for _ in range(steps):
            token = logits[-1][:, -1].argmax(-1, keepdim=True)
            logits.append(model(token, torch.ones_like(token)))
    return torch.cat(logits, dim=1)


def rms_logit_error(arch: str, model, steps: int = 0, seed: int = 0) -> float:
    """RMS logit error of ``model`` against the HF ``arch`` over a padded batch (two prompts of
    40 tokens, one left-padded by 3) and ``steps`` greedy steps, the decoded tokens fed to HF
    too."""
    ids, mask = prompts(2, 40, pads=[0, 3], seed=seed)
    got = prefill_and_decode(model, ids, mask, steps)
    tokens = got[:, ids.shape[1] - 1 : -1].argmax(-1)
    full_ids = torch.cat([ids, tokens], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(tokens)], dim=1)
    want = hf_logits(arch, full_ids, full_mask)
    return float((got - want)[full_mask.bool()].pow(2).mean().sqrt())


def table_rows(markdown: str) -> list[list[str]]:
    """The cells of every markdown table row in ``markdown`` (header included, the alignment
    line left out), stripped of their padding."""
    return [
        [cell.strip() for cell in line.strip()[1:-1].split("|")]
        for line in markdown.splitlines()
        if line.startswith("|") and set(line) - set("|-: ")
    ]


def smallest_budget(name: str, options: dict, length: int) -> int:
    """The smallest budget ``name`` accepts, from its documented rules.

    ``full``: one slot per token of the sequence. Every other budget counts the sinks and must
    exceed them, and a budget that covers the sequence (``length`` tokens) never compresses, so
    it needs nothing more. To compress, score methods also need room for their recent window
    (SnapKV's observation window, 32 by default); KVSlimmer merges at most a quarter of its
    ``budget - sink - recent - 1`` mergeable pairs per step and needs one (sink and recent
    default to a sixteenth of the budget, 1 to 32: 7 slots with the defaults).
    """
    if name == "full":
        return length
    sink = options.get("sink", METHODS[name].default_sink) or 0
    if name == "streaming":
        return sink + 1
    if name == "kvslimmer":

        def protected(b: int, option: str) -> int:
            return options.get(option, min(32, max(1, b // 16)))

        compressing = next(
            b for b in range(sink + 1, 10**4)
            if b - protected(b, "sink") - protected(b, "recent") >= 5
        )  # fmt: skip
    else:
        recent = options.get("window", 32) if name == "snapkv" else options.get("recent", 0)
        compressing = sink + max(1, recent)
    return min(compressing, max(length, sink + 1))


class CountingBackend:
    """Inductor (or, with ``inductor=False``, the graph as dynamo traced it), counting every
    graph dynamo hands it (one per compilation)."""

    def __init__(self, inductor: bool = True) -> None:
        self.graphs = 0
        self.inductor = inductor

    def __call__(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        self.graphs += 1
        return compile_fx(gm, example_inputs) if self.inductor else gm.forward
