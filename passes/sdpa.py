"""Find every SDPA node of an exported HF model and swap in a cached-attention module.

The exported graph (``torch.export`` with ``use_cache=False``) computes attention as one
``aten.scaled_dot_product_attention`` per layer, with keys/values repeated to the query-head count
for grouped-query attention (``unsqueeze → expand → reshape``) and the model's own mask as the
fourth argument. This pass replaces each SDPA node by a ``call_module`` of a module built by the
caller, fed with the query, the *un-repeated* keys/values ``[B, H_kv, L, D]`` and a new graph
input ``kv_positions [B, L]``. Causality, padding and sliding windows become the module's job,
so the model's mask computation is dead code and is removed. With ``pre_rope`` the keys are taken
from before the rotary embedding (the module then rotates them at their positions).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import fx, nn

from .projection import Projection, projection_of
from .rope import unrotated

__all__ = ["AttentionSite", "GraphRewriteError", "layer_windows", "replace_sdpa"]

SDPA = torch.ops.aten.scaled_dot_product_attention.default
POSITIONS_INPUT = "kv_positions"

# Ops that may stand between the un-repeated K/V and the SDPA argument (HF's repeat_kv).
_REPEAT_CHAIN = {
    torch.ops.aten.reshape.default,
    torch.ops.aten.view.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.expand.default,
    torch.ops.aten.clone.default,
    torch.ops.aten.contiguous.default,
    torch.ops.aten.unsqueeze.default,
}


class GraphRewriteError(ValueError):
    """The exported graph has a shape this pass does not understand."""


@dataclass(frozen=True)
class AttentionSite:
    """What the pass learned about one attention layer."""

    layer: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    window: int  # sliding window in tokens (0 = global attention)
    # The maps behind the cached keys (before RoPE where the cache takes them so) and values,
    # where the caller asked for them (a storage that factors the projection weights).
    key_proj: Projection | None = field(default=None, compare=False, repr=False)
    value_proj: Projection | None = field(default=None, compare=False, repr=False)


def layer_windows(config, num_layers: int) -> list[int]:
    """Each layer's sliding window from an HF config (0 = global)."""
    window = getattr(config, "sliding_window", None) or 0
    types = getattr(config, "layer_types", None)
    if types is not None:
        return [window if t == "sliding_attention" else 0 for t in types]
    if window and getattr(config, "use_sliding_window", True):
        return [window] * num_layers
    return [0] * num_layers


def _shape(node: fx.Node) -> tuple:
    val = node.meta.get("val")
    if val is None:
        raise GraphRewriteError(f"node {node.name} carries no shape metadata")
    return tuple(val.shape)


def _unrepeat(node: fx.Node, num_kv_heads: int, where: str) -> fx.Node:
    """Walk HF's ``repeat_kv`` chain back from an SDPA key/value argument to ``[B, H_kv, L, D]``."""
    cur = node
    while not (len(_shape(cur)) == 4 and _shape(cur)[1] == num_kv_heads):
        if cur.op != "call_function" or cur.target not in _REPEAT_CHAIN:
            break
        cur = cur.args[0]
    if len(_shape(cur)) != 4 or _shape(cur)[1] != num_kv_heads:
        raise GraphRewriteError(
            f"{where}: cannot trace the key/value argument {node.name} back to {num_kv_heads} "
            f"KV heads (stopped at {cur.name} = {cur.format_node()})"
        )
    return cur


def replace_sdpa(
    gm: fx.GraphModule,
    config,
    make_module: Callable[[AttentionSite], nn.Module],
    pre_rope: bool = False,
    projections: bool = False,
) -> list[AttentionSite]:
    """Replace every SDPA node of ``gm`` in place; returns one :class:`AttentionSite` per layer.

    ``gm`` must be ``ExportedProgram.module()`` of an HF causal LM. Afterwards it is called with
    its tensor inputs positionally (unused ones removed), followed by ``kv_positions [B, L]``
    (int64, ``-1`` = pad), and returns a flat tuple of its outputs. ``pre_rope``: the modules
    get the keys before HF's ``apply_rotary_pos_emb`` (an error where it cannot be found);
    ``projections``: each site carries the linear maps behind the cached keys and values
    (:func:`~kvslim_fx.passes.projection.projection_of`; an error where there is none).
    """
    arch = getattr(config, "model_type", type(config).__name__)
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == SDPA]
    num_layers = getattr(config, "num_hidden_layers", len(nodes))
    if not nodes:
        raise GraphRewriteError(
            f"{arch}: the exported graph has no aten.scaled_dot_product_attention node; "
            "the model must run its attention through SDPA"
        )
    if len(nodes) != num_layers:
        raise GraphRewriteError(
            f"{arch}: found {len(nodes)} SDPA nodes for {num_layers} layers; "
            "one attention per layer is required"
        )
    windows = layer_windows(config, num_layers)

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with gm.graph.inserting_after(placeholders[-1]):
        positions = gm.graph.placeholder(POSITIONS_INPUT)
    positions.meta["val"] = None

    sites = []
    for layer, node in enumerate(nodes):
        where = f"{arch} layer {layer} ({node.name})"
        q, k, v = node.args[:3]
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        mask_val = mask.meta.get("val") if isinstance(mask, fx.Node) else None
        if mask_val is not None and mask_val.dtype != torch.bool:
            raise GraphRewriteError(
                f"{where}: the attention mask is {mask_val.dtype}, an additive bias "
                "(ALiBi or similar); only boolean causal/padding/window masks are supported"
            )
        dropout = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
        if dropout:
            raise GraphRewriteError(f"{where}: dropout_p={dropout}; call model.eval() first")
        _, hq, _, d = _shape(q)
        hkv = getattr(config, "num_key_value_heads", None) or hq
        if hq % hkv:
            raise GraphRewriteError(f"{where}: {hq} query heads do not group into {hkv} KV heads")
        scale = node.kwargs.get("scale")
        site = AttentionSite(
            layer=layer,
            num_q_heads=hq,
            num_kv_heads=hkv,
            head_dim=d,
            scale=float(scale) if scale is not None else 1.0 / math.sqrt(d),
            window=windows[layer],
        )
        k_src = _unrepeat(k, hkv, where)
        if pre_rope:
            before = unrotated(k_src)
            if before is None:
                raise GraphRewriteError(
                    f"{where}: keys before the rotary embedding were asked for, but the rotation "
                    f"of {k_src.name} = {k_src.format_node()} is not HF's apply_rotary_pos_emb "
                    "(x·cos + rotate_half(x)·sin); choose a storage that keeps rotated keys"
                )
            k_src = before
        v_src = _unrepeat(v, hkv, where)
        if projections:
            try:
                site = replace(site, key_proj=projection_of(gm, k_src),
                               value_proj=projection_of(gm, v_src))  # fmt: skip
            except ValueError as err:
                raise GraphRewriteError(
                    f"{where}: the storage factors the key/value projection weights, but {err}"
                ) from None
        name = f"kvslim_attention_{layer}"
        gm.add_submodule(name, make_module(site))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (q, k_src, v_src, positions))
        new.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        sites.append(site)

    # Positional calling convention: ep.module()'s pytree codegen and its input-spec check would
    # reject the new input. Inputs nothing reads (e.g. ``use_cache``) are dropped.
    gm.graph._codegen = fx.graph.CodeGen()
    gm._forward_pre_hooks.clear()
    for node in list(gm.graph.nodes):
        # export's input guards (shape checks of the original signature); the model checks lengths.
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    for node in list(gm.graph.nodes):
        if node.op == "placeholder" and not node.users and node is not positions:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return sites
