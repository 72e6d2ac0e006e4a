"""Int8 weight-only linears: the graph's ``linear`` nodes read int8 weights and a scale per row.

A weight arrives as int8 in one of two ways, both through torchao's ``Int8WeightOnlyConfig``
(symmetric, one scale per output row):

* the user ran ``torchao.quantization.quantize_(model, Int8WeightOnlyConfig())`` before
  ``transform``: the traced graph holds torchao ``Int8Tensor`` weights;
* ``transform(..., weights="int8")``: this pass quantizes the graph's own linear weights, so the
  user's model keeps its floating-point weights.

Either way each such ``aten.linear`` node becomes :func:`linear_int8` over two plain buffers
(``<linear>.weight_codes`` int8 ``[N, K]``, ``<linear>.weight_scale`` ``[N]``). Why not leave
torchao's ``Int8Tensor`` in the graph: its weight-only linear casts the whole weight to the
activation dtype and calls ``mm``, and Inductor fuses that into an int8 kernel only for bf16
activations; for fp32 a compiled decode step writes and re-reads a float copy of every weight
(SmolLM2 on one CPU thread: 166 ms a step against 44 ms with fp32 weights). Weights torchao
holds some other way (per group, with activation quantization, a zero point) stay as they are.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import sys
from collections.abc import Iterator
from operator import attrgetter
from types import ModuleType

import torch
from torch import Tensor, fx, nn

__all__ = ["GEMV_ROWS", "int8_placeholders", "linear_int8", "quantize_linears"]

LINEAR = torch.ops.aten.linear.default
# Up to this many rows (batch × tokens) a step reads the int8 weight once, as a reduction.
GEMV_ROWS = 8


def linear_int8(x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ (codes · scale[:, None])ᵀ + bias``.

    ``x [..., K]``, ``codes`` int8 ``[N, K]``, ``scale [N]`` and ``bias [N]`` in ``x``'s dtype.
    A compiled decode step (a few rows, a static shape) sums ``x · codes`` over ``K`` in one
    reduction, which Inductor fuses with the cast, so each weight costs one byte of reading;
    longer inputs (prefill chunks, eager calls) cast the codes once and use a matmul, whose
    cost the chunk's rows amortise.
    """
    rows = math.prod(x.shape[:-1])  # a SymInt when the length is symbolic: no guard on it
    if torch.compiler.is_compiling() and isinstance(rows, int) and rows <= GEMV_ROWS:
        out = (x.unsqueeze(-2) * codes.to(x.dtype)).sum(-1)
    else:
        out = x @ codes.t().to(x.dtype)
    out = out * scale
    return out if bias is None else out + bias


@contextlib.contextmanager
def int8_placeholders(model: nn.Module) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
    """While the model is traced, stand a zero-stride float placeholder in for each linear weight
    torchao holds as per-row int8, so the graph gets a plain ``linear`` node (tracing through the
    tensor subclass would inline its cast-then-``mm``); yields ``{weight name: (codes, scale)}``
    for :func:`quantize_linears` and puts the weights back after."""
    found: dict[str, tuple[Tensor, Tensor]] = {}
    swapped: list[tuple[nn.Module, Tensor]] = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and (rows := int8_rows(weight)) is not None:
            found[f"{name}.weight" if name else "weight"] = rows
            swapped.append((module, weight))
            stand_in = torch.zeros((), dtype=weight.dtype, device=weight.device)
            module.weight = nn.Parameter(stand_in.expand(weight.shape), requires_grad=False)
    try:
        yield found
    finally:
        for module, weight in swapped:
            module.weight = weight


def quantize_linears(
    gm: fx.GraphModule, int8: dict[str, tuple[Tensor, Tensor]], quantize: bool
) -> int:
    """Rewrite into :func:`linear_int8` every linear whose weight is in ``int8`` (by name, from
    :func:`int8_placeholders`) or, with ``quantize``, every floating-point one (quantized now
    through torchao); returns how many were rewritten.

    The weight's old attribute is dropped when nothing else reads it; a weight tied to the
    input embedding (SmolLM2's head) stays floating-point for the embedding's lookups.
    """
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not LINEAR:
            continue
        weight_node = node.args[1]
        if weight_node.op != "get_attr":
            continue
        rows = int8.get(weight_node.target)
        if rows is None and quantize:
            rows = quantize_rows(attrgetter(weight_node.target)(gm))
        if rows is None:
            continue
        codes, scale = rows
        owner_name, _, leaf = weight_node.target.rpartition(".")
        owner = gm.get_submodule(owner_name)
        owner.register_buffer(f"{leaf}_codes", codes)
        owner.register_buffer(f"{leaf}_scale", scale.to(node.args[0].meta["val"].dtype))
        prefix = f"{owner_name}." if owner_name else ""
        with gm.graph.inserting_before(node):
            codes_node = gm.graph.get_attr(f"{prefix}{leaf}_codes")
            scale_node = gm.graph.get_attr(f"{prefix}{leaf}_scale")
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            new = gm.graph.call_function(linear_int8, (node.args[0], codes_node, scale_node, bias))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        if not weight_node.users:
            gm.graph.erase_node(weight_node)
            if not any(n.op == "get_attr" and n.target == weight_node.target
                       for n in gm.graph.nodes):  # fmt: skip
                delattr(owner, leaf)
        rewritten += 1
    gm.graph.lint()
    gm.recompile()
    return rewritten


def int8_rows(weight: Tensor | None) -> tuple[Tensor, Tensor] | None:
    """``(codes [N, K] int8, scale [N])`` of a torchao weight quantized per row, symmetric and
    weight-only; None for anything else."""
    data = getattr(weight, "qdata", None)
    if data is None or data.dtype != torch.int8 or data.dim() != 2:
        return None
    per_row = list(getattr(weight, "block_size", [])) == [1, weight.shape[-1]]
    zero = getattr(weight, "zero_point", None)
    plain = (zero is None or not zero.any()) and all(
        getattr(weight, name, None) is None for name in ("act_quant_kwargs", "act_pre_scale")
    )
    return (data.detach(), weight.scale.detach().reshape(-1)) if per_row and plain else None


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor] | None:
    """A floating-point ``[N, K]`` weight quantized by torchao's ``Int8WeightOnlyConfig``."""
    if weight.dim() != 2 or not weight.is_floating_point():
        return None
    quantization = import_torchao("quantization")
    # torchao quantizes nn.Linear modules; a throwaway one holds the graph's weight.
    holder = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    holder.weight = nn.Parameter(weight.detach(), requires_grad=False)
    quantization.quantize_(holder, quantization.Int8WeightOnlyConfig(set_inductor_config=False))
    return int8_rows(holder.weight)


def import_torchao(module: str) -> ModuleType:
    """``torchao.<module>``, imported without torchao's log lines about CUDA-only extensions
    (which a CPU build cannot load and nothing here uses). Importing torchao takes seconds, so
    callers import it on first use."""
    name = f"torchao.{module}"
    if name in sys.modules:
        return sys.modules[name]
    quiet = [logging.getLogger(logger) for logger in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        return importlib.import_module(name)
    finally:
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)
