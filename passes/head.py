"""Split the output head off the graph, so a prompt's chunk can skip the logits nobody reads.

HF models compute logits for every position unless told ``logits_to_keep``; the exported graph
has them for every position. Reading a prompt only needs the last one: at 2k tokens on SmolLM2
the head over every position is 2 × 29 GFLOP per 512-token chunk and a 96 MiB logits tensor.
:func:`split_head` cuts the graph at the head's input (the final hidden states, after any slice
HF puts there): the graph then returns the hidden states in the logits' place, and the returned
module maps hidden states ``[B, L, d]`` to logits ``[B, L, V]`` (the head's linear, and whatever
follows it, e.g. a soft cap), so the caller slices the positions it wants first.
"""

from __future__ import annotations

import torch
from torch import fx

from .int8_linear import linear_int8

__all__ = ["split_head"]

_LINEARS = {torch.ops.aten.linear.default, linear_int8}


def split_head(gm: fx.GraphModule, index: int) -> fx.GraphModule | None:
    """Move the nodes between the final hidden states and output ``index`` (the logits) into a
    new module of one input, and make ``gm`` return those hidden states at ``index``.

    None (``gm`` unchanged) when the logits do not come from one linear of one activation input.
    """
    output = next(n for n in gm.graph.nodes if n.op == "output")
    results = list(output.args[0])
    logits = results[index]
    linear = _head_linear(logits)
    if linear is None:
        return None
    hidden = linear.args[0]
    tail = _between(hidden, logits)
    if tail is None:
        return None
    head = fx.Graph()
    env = {hidden: head.placeholder("hidden")}
    for node in gm.graph.nodes:  # in order: inputs before users
        if node in tail:
            for arg in node.all_input_nodes:
                if arg not in env:  # a constant of the head (its weight)
                    env[arg] = head.node_copy(arg, env.__getitem__)
            env[node] = head.node_copy(node, env.__getitem__)
    head.output(env[logits])
    module = fx.GraphModule(gm, head, class_name="Head")
    results[index] = hidden
    output.args = (tuple(results),)
    for node in reversed(list(gm.graph.nodes)):
        if node in tail or (node.op == "get_attr" and not node.users):
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return module


def _head_linear(logits: fx.Node) -> fx.Node | None:
    """The linear the logits come from, following its activation (first) argument back."""
    node = logits
    while isinstance(node, fx.Node) and node.op == "call_function":
        if node.target in _LINEARS:
            return node
        moving = [a for a in node.all_input_nodes if a.op != "get_attr"]
        if len(moving) != 1:
            return None
        node = moving[0]
    return None


def _between(hidden: fx.Node, logits: fx.Node) -> set[fx.Node] | None:
    """The nodes on the way from ``hidden`` (excluded) to ``logits`` (included), or None when one
    of them reads anything but those nodes and constants or is used outside the way."""
    tail, todo = set(), [logits]
    while todo:
        node = todo.pop()
        if node in tail:
            continue
        if node.op != "call_function":
            return None
        tail.add(node)
        for arg in node.all_input_nodes:
            if arg is not hidden and arg.op != "get_attr":
                todo.append(arg)
    if any(user.op != "output" and user not in tail for n in tail for user in n.users):
        return None
    return tail
