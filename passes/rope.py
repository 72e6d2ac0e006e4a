"""Rotary facts a merge needs: each layer's inverse frequencies and rotary width.

Keys are cached post-RoPE; merging two keys at different positions first rotates the earlier one
forward by the position gap, which needs the layer's own ``inv_freq`` (Gemma3 has one per layer
type) and the rotated width (partial rotary: Phi-3, GPT-NeoX). Models without rotary embeddings
(GPT-2's learned positions) get ``None``: their keys carry no position to correct.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

__all__ = ["RopeFacts", "UnsupportedRope", "rope_facts"]

# inv_freq of these rope types depends on the sequence length, so a stored key's rotation
# cannot be continued by a fixed angle per position.
_LENGTH_DEPENDENT = {"dynamic", "longrope"}


class UnsupportedRope(ValueError):
    """The model's rotary embedding cannot be re-applied by a fixed rotation per position."""


@dataclass(frozen=True)
class RopeFacts:
    """``inv_freq [rotary_dim / 2]`` (float32, on the model's device); HF ``rotate_half`` layout."""

    inv_freq: Tensor
    rotary_dim: int


def _rotary_module(model: nn.Module) -> nn.Module | None:
    found = [
        m
        for m in model.modules()
        if any("inv_freq" in n for n, _ in m.named_buffers(recurse=False))
    ]
    if len(found) > 1:
        raise UnsupportedRope(f"{len(found)} rotary embedding modules; expected one")
    return found[0] if found else None


def rope_facts(model: nn.Module, num_layers: int) -> list[RopeFacts | None]:
    """One entry per layer, from the HF model's rotary embedding module."""
    rotary = _rotary_module(model)
    if rotary is None:
        return [None] * num_layers
    arch = getattr(model.config, "model_type", type(model).__name__)
    types = getattr(model.config, "layer_types", None) or ["full_attention"] * num_layers
    rope_type = getattr(rotary, "rope_type", "default")
    buffers = dict(rotary.named_buffers(recurse=False))
    facts = []
    for layer_type in types:
        kind = rope_type.get(layer_type, "default") if isinstance(rope_type, dict) else rope_type
        if kind in _LENGTH_DEPENDENT:
            raise UnsupportedRope(
                f"{arch}: rope type {kind!r} changes its frequencies with the sequence length"
            )
        inv_freq = buffers.get(f"{layer_type}_inv_freq", buffers.get("inv_freq"))
        if inv_freq is None:
            raise UnsupportedRope(f"{arch}: no inv_freq for layer type {layer_type!r}")
        inv_freq = inv_freq.detach().float().clone()
        facts.append(RopeFacts(inv_freq=inv_freq, rotary_dim=2 * inv_freq.numel()))
    return facts
