"""Rotary facts: each layer's inverse frequencies and rotary width, and where keys are rotated.

Keys are cached post-RoPE by default; merging two keys at different positions first rotates the
earlier one forward by the position gap, which needs the layer's own ``inv_freq`` (Gemma3 has one
per layer type) and the rotated width (partial rotary: Phi-3, GPT-NeoX). A storage that keeps
keys *before* RoPE (low-rank factors are only shared across positions before the rotation)
rotates them when attention reads them, with the same facts plus the rope type's
``attention_scaling``; :func:`unrotated` finds the un-rotated key node in the exported graph.
Models without rotary embeddings (GPT-2's learned positions) get ``None``: their keys carry no
position to correct.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn

__all__ = ["RopeFacts", "UnsupportedRope", "rope_facts", "unrotated"]

# inv_freq of these rope types depends on the sequence length, so a stored key's rotation
# cannot be continued by a fixed angle per position.
_LENGTH_DEPENDENT = {"dynamic", "longrope"}


class UnsupportedRope(ValueError):
    """The model's rotary embedding cannot be re-applied by a fixed rotation per position."""


@dataclass(frozen=True)
class RopeFacts:
    """``inv_freq [rotary_dim / 2]`` (float32, on the model's device); HF ``rotate_half`` layout.
    ``attention_scaling`` multiplies the rotated channels' cos and sin (1 but for YaRN-like
    types): it matters to keys rotated at read time, never to a rotation by a gap."""

    inv_freq: Tensor
    rotary_dim: int
    attention_scaling: float = 1.0


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
        scaling = getattr(rotary, f"{layer_type}_attention_scaling", None)
        scaling = getattr(rotary, "attention_scaling", 1.0) if scaling is None else scaling
        facts.append(RopeFacts(inv_freq, 2 * inv_freq.numel(), float(scaling)))
    return facts


_aten = torch.ops.aten
# Casts and copies HF code may put around the rotation (identities on the values).
_PASS_THROUGH = {_aten.clone.default, _aten.contiguous.default, _aten.to.dtype,
                 _aten._to_copy.default}  # fmt: skip


def _call(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target == target


def _last_dim(node: fx.Node, dim) -> bool:
    return dim in (-1, len(node.meta["val"].shape) - 1)


def _slice_of(node) -> tuple[fx.Node, int, int] | None:
    """``slice(x, last dim, start, end)`` → ``(x, start, end)``."""
    if not _call(node, _aten.slice.Tensor):
        return None
    x, dim, start, end, step = (*node.args, *(0, None, None, 1)[len(node.args) - 1 :])
    return (x, start or 0, end) if step == 1 and _last_dim(node, dim) else None


def _cat_pair(node) -> tuple[fx.Node, fx.Node] | None:
    """``cat([a, b], last dim)`` → ``(a, b)``."""
    if not _call(node, _aten.cat.default) or len(node.args[0]) != 2:
        return None
    return tuple(node.args[0]) if _last_dim(node, (*node.args, 0)[1]) else None


def _rotate_half_of(node) -> fx.Node | None:
    """HF's ``rotate_half(x) = cat(-x[..., h:], x[..., :h])`` → ``x``."""
    parts = _cat_pair(node)
    if parts is None:
        return None
    neg, first = parts
    if not _call(neg, _aten.neg.default):
        return None
    upper, lower = _slice_of(neg.args[0]), _slice_of(first)
    if upper is None or lower is None or upper[0] is not lower[0] or lower[1] != 0:
        return None
    return upper[0] if upper[1] == lower[2] else None


def _embedded(node) -> fx.Node | None:
    """``x·cos + rotate_half(x)·sin`` (either order of every product and of the sum) → ``x``."""
    if not _call(node, _aten.add.Tensor) or not all(_call(a, _aten.mul.Tensor) for a in node.args):
        return None
    for plain, rotated in (node.args, node.args[::-1]):
        for r in rotated.args:
            x = _rotate_half_of(r)
            if x is not None and x in plain.args:
                return x
    return None


def unrotated(key: fx.Node) -> fx.Node | None:
    """The key before the rotary embedding, from the rotated key node ``key`` ``[B, H, L, D]``
    of an exported HF graph (``apply_rotary_pos_emb``, partial rotary included); ``None`` where
    the pattern is not there."""
    while key.op == "call_function" and key.target in _PASS_THROUGH:
        key = key.args[0]
    x = _embedded(key)
    if x is not None:
        return x
    # Partial rotary: cat(embed(x[..., :r]), x[..., r:]).
    parts = _cat_pair(key)
    if parts is None:
        return None
    rot, rest = parts
    inner, rest = _embedded(rot), _slice_of(rest)
    head = _slice_of(inner) if inner is not None else None
    if head is None or rest is None or head[0] is not rest[0] or head[1] != 0:
        return None
    return head[0] if head[2] == rest[1] else None
