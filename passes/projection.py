"""The linear map behind a layer's keys or values: the weight rows that produce them.

A storage that compresses the cache through the projection weights (LoRC: a truncated SVD of
the key and value maps) needs, per layer, the affine map ``x ↦ x Wᵀ + b`` whose output the
cache receives (``[B, H_kv, L, D]``, keys before RoPE). :func:`projection_of` walks back from
that node through the reshapes HF puts after the projection (``view``, ``transpose``), a slice
or split of a fused projection (Phi-3's ``qkv_proj``, GPT-2's ``c_attn``), casts, and a
per-head norm applied after the projection (Gemma3, Qwen3, OLMo2 normalise keys), to the
``linear`` / ``addmm`` node (or an int8 :func:`~.int8_linear.linear_int8`: its weight
dequantized), and returns the rows of its weight (and bias) that produce the cached tensor's
``H_kv · D`` channels in the cache's order.

A norm between the projection and the cache is not linear: the map then describes the keys up
to each head's scale and the norm's weight, and :attr:`Projection.exact` is False.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import Tensor, fx

from .int8_linear import linear_int8

__all__ = ["Projection", "projection_of"]

_aten = torch.ops.aten
# Reshapes between the projection's [B, L, H·D] output and the cache's [B, H, L, D] input.
_LAYOUT = {_aten.view.default, _aten._unsafe_view.default, _aten.reshape.default,
           _aten.transpose.int, _aten.permute.default}  # fmt: skip
_CASTS = {_aten.clone.default, _aten.contiguous.default, _aten.to.dtype, _aten._to_copy.default,
          _aten.type_as.default}  # fmt: skip
# Elementwise ops of a norm applied after the projection (x · rsqrt(mean(x²) + eps) · w).
_NORM = {_aten.mul.Tensor, _aten.div.Tensor, _aten.add.Tensor}


@dataclass(frozen=True)
class Projection:
    """``y = x Wᵀ + b``: ``weight [H_kv · D, d_in]``, ``bias [H_kv · D]`` or None, rows in the
    cache's channel order (head-major). ``exact``: the cache receives ``y`` itself (no norm in
    between)."""

    weight: Tensor
    bias: Tensor | None
    exact: bool

    def augmented(self) -> Tensor:
        """``[d_in (+ 1), H_kv · D]``: ``Wᵀ`` with ``bᵀ`` as a last row, the matrix ``[x, 1]``
        multiplies; its right singular vectors span the outputs (in float64)."""
        w = self.weight.detach().double().T
        if self.bias is None:
            return w
        return torch.cat([w, self.bias.detach().double()[None]], dim=0)


def _call(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _constant(node: fx.Node, memo: dict) -> bool:
    """Whether ``node`` depends on nothing but parameters and constants (a norm's weight)."""
    if node not in memo:
        inputs = node.all_input_nodes
        memo[node] = node.op == "get_attr" or (
            node.op == "call_function" and all(_constant(n, memo) for n in inputs)
        )
    return memo[node]


def _attr(gm: fx.GraphModule, node) -> Tensor:
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        raise ValueError(f"{node} is not a parameter of the graph")
    return operator.attrgetter(node.target)(gm)


def projection_of(gm: fx.GraphModule, node: fx.Node) -> Projection:
    """The projection whose output ``node`` (``[B, H_kv, L, D]``) is; ``ValueError`` naming where
    the walk stopped if there is none."""
    width = node.meta["val"].shape[1] * node.meta["val"].shape[-1]
    offset, end = 0, None  # the channels of the current node the cache receives, [offset, end)
    exact, memo, cur = True, {}, node
    while True:
        if _call(cur, _LAYOUT | _CASTS):
            cur = cur.args[0]
        elif _call(cur, _NORM):
            # Follow the activations: the input of the node's own shape that is not a constant
            # (a norm's weight is constant; its rsqrt(mean(x²)) factor is one column wide).
            shape = cur.meta["val"].shape
            moving = [a for a in cur.args if isinstance(a, fx.Node) and not _constant(a, memo)
                      and a.meta["val"].shape == shape]  # fmt: skip
            if len(moving) != 1:
                break
            exact, cur = False, moving[0]
        elif _call(cur, {_aten.slice.Tensor}) and _last_dim(cur, cur.args[1]):
            start, stop = (*cur.args, 0, None)[2:4]
            offset, end = _within(offset, end, start, stop)
            cur = cur.args[0]
        elif (isinstance(cur, fx.Node) and cur.target is operator.getitem
              and _call(cur.args[0], {_aten.split.Tensor})
              and _last_dim(cur.args[0].args[0], (*cur.args[0].args, 0)[2])):  # fmt: skip
            size, i = cur.args[0].args[1], cur.args[1]
            offset, end = _within(offset, end, i * size, (i + 1) * size)
            cur = cur.args[0].args[0]
        elif _call(cur, {_aten.linear.default}):
            weight = _attr(gm, cur.args[1])
            bias = _attr(gm, cur.args[2]) if len(cur.args) > 2 and cur.args[2] is not None else None
            return _rows(weight, bias, offset, end, width, exact)
        elif _call(cur, {linear_int8}):  # int8 weights: the map is the dequantized one
            codes, scale = _attr(gm, cur.args[1]), _attr(gm, cur.args[2])
            bias = _attr(gm, cur.args[3]) if cur.args[3] is not None else None
            return _rows(codes.to(scale.dtype) * scale[:, None], bias, offset, end, width, exact)
        elif _call(cur, {_aten.addmm.default}):  # GPT-2's Conv1D: bias + x @ W, W [d_in, out]
            weight, bias = _attr(gm, cur.args[2]).T, _attr(gm, cur.args[0])
            return _rows(weight, bias, offset, end, width, exact)
        else:
            break
    raise ValueError(
        f"{node.name} does not come from a linear projection (the walk stopped at "
        f"{cur.name} = {cur.format_node()})"
    )


def _within(lo: int, hi: int | None, start: int, stop: int | None) -> tuple[int, int | None]:
    """Channels ``[lo, hi)`` of ``x[..., start:stop]`` as channels of ``x``."""
    return start + lo, (stop if hi is None else start + hi)


def _last_dim(node: fx.Node, dim) -> bool:
    return dim in (-1, len(node.meta["val"].shape) - 1)


def _rows(
    weight: Tensor, bias: Tensor | None, start: int, end: int | None, width: int, exact: bool
) -> Projection:
    weight, bias = weight[start:end], None if bias is None else bias[start:end]
    if weight.shape[0] != width:
        raise ValueError(f"the projection has {weight.shape[0]} output channels, the cache {width}")
    return Projection(weight, bias, exact)
