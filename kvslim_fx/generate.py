"""``generate``: chunked prefill, then one token per step, with Hugging Face ``generate`` semantics.

Works on anything that has the model protocol: a :class:`~kvslim_fx.model.KVSlimModel`, its
``torch.compile`` wrapper, or a runner loaded from an AOTInductor package. Each call starts
from an empty cache sized for ``prompt + max_new_tokens``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import KVSlimError
from .model import check_shapes, check_vocab


def _core(model):
    """The object that owns the cache (unwraps ``torch.compile``)."""
    return getattr(model, "_orig_mod", model)


@torch.no_grad()
def generate(
    model,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Generate up to ``max_new_tokens`` after ``input_ids [B, P]`` (left-padded for B > 1).

    Returns ``sequences [B, P + n]``, ``n <= max_new_tokens``; rows that produced an EOS are
    padded with ``pad_token_id`` until every row has finished. EOS and pad ids default to the
    model's generation config, as in HF (pad falls back to the first EOS id).
    """
    core = _core(model)
    check_shapes(input_ids, None)
    if attention_mask is not None and (
        not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape
    ):
        got = f"a {type(attention_mask).__name__}"
        if isinstance(attention_mask, Tensor):
            got = f"shape {tuple(attention_mask.shape)}"
        raise KVSlimError(
            f"attention_mask has {got} but input_ids {tuple(input_ids.shape)}: generate takes "
            "the prompt's mask, one entry per token (1 = token, 0 = padding)"
        )
    # The model checks its ids too, but not once compiled: the prompt is checked here.
    check_vocab(input_ids, getattr(core, "vocab_size", None))
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 0
    ):
        raise KVSlimError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise KVSlimError(f"temperature must be > 0 when sampling, got {temperature}")
    B, P = input_ids.shape
    if eos_token_id is None:
        eos_token_id = getattr(core, "eos_token_id", None)
    if pad_token_id is None:
        pad_token_id = getattr(core, "pad_token_id", None)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    eos = torch.tensor(
        [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int)
        else list(eos_token_id),
        dtype=torch.long, device=input_ids.device,
    )  # fmt: skip
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if eos.numel() else 0)

    core.reset(batch_size=B, max_length=P + max_new_tokens, prompt_len=P)
    chunk = core.chunk_size
    for i in range(0, P, chunk):
        # Contiguous chunks: a column slice has the prompt's row stride, on which a compiled
        # model's guards would recompile for every new prompt length at batch > 1.
        ids = input_ids[:, i : i + chunk].contiguous()
        # Only the prompt's last logits are read: the head runs on one position per chunk.
        logits = model(ids, attention_mask[:, i : i + chunk].contiguous(), logits_to_keep=1)
    core.end_prompt()
    sequences = [input_ids]
    unfinished = torch.ones(B, dtype=torch.bool, device=input_ids.device)
    step_mask = torch.ones(B, 1, dtype=attention_mask.dtype, device=input_ids.device)
    for step in range(max_new_tokens):
        scores = logits[:, -1, :].float()
        token = (
            _sample(scores, temperature, top_k, top_p, generator)
            if do_sample
            else scores.argmax(-1)
        )
        token = torch.where(unfinished, token, pad)
        sequences.append(token[:, None])
        if eos.numel():
            unfinished &= ~torch.isin(token, eos)
            if not bool(unfinished.any()):
                break
        if step + 1 < max_new_tokens:
            logits = model(token[:, None], step_mask)
    return torch.cat(sequences, dim=1)


def _sample(
    scores: Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> Tensor:
    """HF's order: temperature, then top-k, then top-p (nucleus), then a multinomial draw."""
    scores = scores / temperature
    if top_k is not None and 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= 1 - top_p
        drop_sorted[:, -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
