"""A plan: what one step does to a layer's cache, decided by a token policy, applied by the cache.

A policy reads the cache (positions, cardinalities, its own statistics, the storage's rows) and
returns a :class:`Plan`: static-shape index and weight tensors, no writes. The cache applies it
(``LayerCache.apply``), the only place that writes buffers, through its storage, so one plan
drives dense rows, int8 rows (dequantise → combine → requantise) or any other storage. Key and
value weights are apart: KVSlimmer merges keys by its closed form and values as cardinality
sums, WeightedKV keeps the receiving key and folds values only.

Shapes: ``C`` slots, ``L`` new tokens, ``[B, H_kv, ·]`` everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class Merge:
    """Disjoint pairs of rows: row ``src`` joins row ``dst`` and is then emptied, ``[B, H, P]``.

    Row ``C`` (the trash row) stands for the step's one new token when the plan ``stages`` it.
    """

    src: Tensor
    dst: Tensor
    do: Tensor  # bool: the pairs that merge
    value: tuple[Tensor, Tensor]  # weights of the src and dst values
    key: tuple[Tensor, Tensor] | None = None  # weights of the keys; None: dst keeps its key
    counts: bool = False  # values are means: cardinalities add, logc[dst] = log(c_src + c_dst)
    state: dict[str, Tensor] = field(default_factory=dict)  # the policy's state at dst [B, H, P]


@dataclass
class Fold:
    """Runs of dropped entries (slots, then new tokens) folded into the next kept entry in
    position order, values only: ``order``, ``drop``, ``weight`` ``[B, H, C + L]`` as
    ``methods.scoring.fold_right`` takes them (a chunk's WeightedKV step)."""

    order: Tensor
    drop: Tensor
    weight: Tensor


@dataclass
class Plan:
    """One step's changes, applied in this order:

    1. ``state``: the policy's per-slot statistics of the ``C`` slots (``[B, H, C]`` each);
    2. ``merge`` of row pairs (with ``stage``: the new token first written to row ``C``), or
       ``fold`` of dropped entries' values into their right neighbours;
    3. ``drop``: slots emptied ``[B, H, C]`` (bool);
    4. the new tokens: to ``slot [B, H, L]`` (``C``: not stored) if given, else every kept one
       (``keep [B, H, L]``, default: the real ones) to the empty slots, lowest first, with
       ``new_state`` (``[B, H, L]`` each);
    5. counters: ``events [B, H]`` tokens merged or dropped, ``fallbacks`` (a count), and the
       most slots one merge ``joined``.
    """

    state: dict[str, Tensor] = field(default_factory=dict)
    merge: Merge | None = None
    stage: bool = False
    fold: Fold | None = None
    drop: Tensor | None = None
    slot: Tensor | None = None
    keep: Tensor | None = None
    new_state: dict[str, Tensor] = field(default_factory=dict)
    events: Tensor | None = None
    fallbacks: Tensor | None = None
    joined: Tensor | int = 0
