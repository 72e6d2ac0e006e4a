"""Row access by slot: the gather and the in-place write every cache update is made of.

A slot cache is ``[B, H, R]`` (per-slot scalars) or ``[B, H, R, D]`` (rows); slots are picked
per batch row and head, ``slot [B, H, M]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gather_slots", "put_slots", "slot_index"]


def slot_index(slot: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``index_put_`` / advanced-indexing indices of slots ``slot [B, H, M]``."""
    B, H, _ = slot.shape
    rows = torch.arange(B, device=slot.device)[:, None, None]
    heads = torch.arange(H, device=slot.device)[None, :, None]
    return rows, heads, slot


def gather_slots(x: Tensor, slot: Tensor) -> Tensor:
    """``x[b, h, slot[b, h, m]]``: ``[B, H, M]`` or ``[B, H, M, D]``."""
    idx = slot if x.dim() == 3 else slot[..., None].expand(*slot.shape, x.shape[-1])
    return x.gather(2, idx)


def put_slots(x: Tensor, slot: Tensor, value: Tensor, where: Tensor) -> None:
    """``x[b, h, slot[b, h, m]] = value[b, h, m]`` where ``where [B, H, M]``, in place.

    ``index_put_`` stays in place on a cache buffer under Inductor; a ``scatter_`` copies it.
    """
    keep = where if x.dim() == 3 else where[..., None]
    x.index_put_(slot_index(slot), torch.where(keep, value.to(x.dtype), gather_slots(x, slot)))
