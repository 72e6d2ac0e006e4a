"""What a compression method (a token policy) is: a budget, a sink, how a layer's slots are laid
out, and which tokens to keep, evict or merge.

A method never touches graphs and never writes a cache. It turns the user's options into a
per-layer :class:`SlotLayout` (the cache's shape and visibility rule) and, for the methods
that compress, the per-slot statistics it keeps and a plan per step (``kvslim_fx.plan``) that
the cache applies through its storage.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..budget import check_budget
from ..errors import KVSlimError
from ..plan import Plan

# Full caches round their capacity up so that repeated generate() calls of similar lengths
# reuse one compiled graph instead of recompiling for every new length.
CAPACITY_QUANTUM = 64


@dataclass(frozen=True)
class SlotLayout:
    """One layer's slots: ``sink`` fixed slots, then a ring of ``ring`` slots.

    Token number ``r`` of a row (its position) lives in slot ``r`` while ``r < sink``, else in
    ``sink + (r - sink) % ring``. ``recent > 0`` limits what a query sees to the sinks plus the
    last ``recent`` positions (StreamingLLM); ``wraps`` says that overwriting the ring is the
    intended eviction, not an overflow. ``merges``: the method's plans store tokens instead
    (compressing to make room), and the attention op reports per-slot mass for them.
    """

    sink: int
    ring: int
    recent: int
    wraps: bool
    merges: bool = False

    @property
    def capacity(self) -> int:
        return self.sink + self.ring


class Method:
    """Base of every method. Subclasses set ``name``, ``default_sink`` and ``layout``.

    A method whose layouts merge (``SlotLayout.merges``) also declares its per-slot statistics
    (``slot_state``) and returns a plan for each step (``plan``), which the cache applies.
    """

    name: ClassVar[str]
    # None: the method picks its sinks per layer from the layer's slots.
    default_sink: ClassVar[int | None] = 0
    needs_rope: ClassVar[bool] = False
    # Whether plans combine rows with weights per KV head (a merge or a fold), not only move,
    # keep or drop them.
    combines_rows: ClassVar[bool] = False
    # How many of the prompt's last queries score a prefill="full" compression (None: the model's
    # prefill_window; never more). A method whose rule names its queries sets it.
    observe: int | None = None

    def __init__(self, budget: int | float | None = None, sink: int | None = None) -> None:
        sink = self.default_sink if sink is None else sink
        self.sink = None if sink is None else non_negative("sink", sink)
        self.budget = self._check_budget(budget)

    def _check_budget(self, budget: int | float | None) -> int | float | None:
        if budget is None:
            return None
        if isinstance(check_budget(budget), int) and budget <= (self.sink or 0):
            raise KVSlimError(
                f"budget={budget} must exceed sink={self.sink} (the budget counts the sink "
                f"slots); raise the budget or lower sink"
            )
        return budget

    def slots(self, prompt_len: int, max_length: int) -> int:
        """Slots per global-attention layer for a sequence of ``max_length`` tokens."""
        if self.budget is None:
            return round_capacity(max_length)
        if isinstance(self.budget, float):
            return max((self.sink or 0) + 1, math.ceil(self.budget * prompt_len))
        return self.budget

    def floor(self, slots: int) -> int:
        """Slots every layer keeps under a layer-adaptive schedule of mean ``slots``: what the
        method protects (its sinks) and one to compress with."""
        return (self.sink or 0) + 1

    def check_layer_budget(self, slots: int, layer: int) -> None:
        """Refuse a layer's share of a budget (a layer-adaptive schedule) that cannot hold the
        sinks and one more slot."""
        if slots <= (self.sink or 0):
            raise KVSlimError(
                f"{self.name}: layer {layer} gets {slots} slots, which must exceed sink="
                f"{self.sink}; raise the budget, lower sink or use another budget_schedule"
            )

    def layout(self, slots: int, window: int, layer: int = 0) -> SlotLayout:  # pragma: no cover
        """Layer ``layer``'s slots for a budget of ``slots`` and the layer's sliding ``window``
        (0: global attention)."""
        raise NotImplementedError

    def slot_state(self) -> dict[str, tuple[torch.dtype, float]]:
        """Extra per-slot state: name → (dtype, value of an empty slot). A policy whose merges
        keep means (``Merge.counts``) declares ``"logc": (torch.float32, 0.0)``, the slots' log
        cardinalities, which attention then reads."""
        return {}

    def max_chunk(self, slots: int) -> int | None:
        """The longest chunk a cache of ``slots`` can take in one step (None: any)."""
        return None

    def attention_logc(self, logc: Tensor) -> Tensor:
        """The log-cardinality bias attention sees (``[B, H_kv, C + 1]``); exact by default."""
        return logc

    def plan(self, cache, k: Tensor, v: Tensor, kv_pos: Tensor, mass: Tensor) -> Plan:
        """What a step of new tokens ``k, v [B, H_kv, L, D]`` at ``kv_pos [B, L]`` does to a
        merging layout's cache (read, never written here); ``mass`` as ``attend``'s."""
        raise NotImplementedError(f"{self.name} does not merge")

    def plan_one(self, cache, k: Tensor, v: Tensor, kv_pos: Tensor, mass: Tensor) -> Plan:
        """:meth:`plan` for a one-token step (decode), where a policy may have a faster rule."""
        return self.plan(cache, k, v, kv_pos, mass)

    def prompt_plans(self, cache, slots: int) -> Iterator[Plan]:
        """Plans that free a cache holding a whole prompt down to ``slots`` occupied slots, scored
        by the prompt's last queries (``cache.window_mass()``); the cache applies each before the
        next is asked for. None by default: a ring layout keeps its sinks and newest tokens when
        the cache is compacted."""
        return iter(())

    def options(self) -> dict:
        """The options that rebuild this method (recorded in exported packages)."""
        return {"budget": self.budget, "sink": self.sink}


def non_negative(name: str, value: int) -> int:
    """``value`` if it is a non-negative int; otherwise the one error every option gets."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise KVSlimError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def number_at_least(name: str, value: float, low: float, meaning: str) -> float:
    """``value`` as a float if it is a real number ``>= low``; else an error saying ``meaning``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= low:
        raise KVSlimError(f"{name} must be a number >= {low:g} ({meaning}), got {value!r}")
    return float(value)


def positive(name: str, value: int) -> int:
    """``value`` if it is a positive int; otherwise the one error every such option gets."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KVSlimError(f"{name} must be a positive integer, got {value!r}")
    return value


def odd_kernel(kernel: int) -> int:
    """``kernel`` if it is a positive odd int (a pooling window centred on its token)."""
    if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
        raise KVSlimError(f"kernel must be a positive odd integer, got {kernel!r}")
    return kernel


def neighbour_max(x: Tensor, kernel: int) -> Tensor:
    """The max of ``x`` over ``kernel`` neighbours centred on each entry of the last axis
    (entries beyond the ends count as ``-inf``): SnapKV's pooling, so that a token's neighbours
    score as high as it does. ``x`` is in position order; ``-inf`` entries lend nothing."""
    # Shifted slices, not max_pool1d: its output-size rule pins a dynamic length in torch.export.
    r, n = kernel // 2, x.shape[-1]
    padded = F.pad(x, (r, r), value=-torch.inf)
    return torch.stack([padded[..., i : i + n] for i in range(kernel)]).amax(0)


def rank(x: Tensor) -> Tensor:
    """Rank of each entry along the last axis (ascending; ties to the earlier entry)."""
    order = x.argsort(dim=-1, stable=True)
    steps = torch.arange(x.shape[-1], device=x.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, steps)


def round_capacity(n: int) -> int:
    """``n`` rounded up to a multiple of :data:`CAPACITY_QUANTUM`."""
    return -(-n // CAPACITY_QUANTUM) * CAPACITY_QUANTUM
