"""Storage registry: ``storage="name"`` in :func:`kvslim_fx.transform` picks a class from here.

A storage owns how a layer's K/V rows live and are read by attention; a token policy
(``kvslim_fx.methods``) decides what they hold. ``@register_storage`` adds one.
"""

from __future__ import annotations

from ..errors import KVSlimError
from .base import STORAGES, Storage, register_storage
from .dense import Dense

__all__ = ["STORAGES", "Dense", "Storage", "register_storage", "storage_class"]


def storage_class(name: str) -> type[Storage]:
    """The registered class of ``name``; an unknown name lists the known ones."""
    if not isinstance(name, str) or name not in STORAGES:
        known = ", ".join(sorted(STORAGES))
        raise KVSlimError(f"unknown storage {name!r}; choose one of: {known}")
    return STORAGES[name]
