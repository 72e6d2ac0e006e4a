"""Storage registry: ``storage="name"`` in :func:`kvslim_fx.transform` picks a class from here.

A storage owns how a layer's K/V rows live and are read by attention; a token policy
(``kvslim_fx.methods``) decides what they hold. ``@register_storage`` adds one.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import KVSlimError
from ..methods import parse_option
from ..passes.rope import RopeFacts
from ..passes.sdpa import AttentionSite
from .base import STORAGES, Storage, register_storage
from .dense import Dense
from .int8 import Int8

__all__ = ["STORAGES", "Dense", "Int8", "Storage", "make_storage", "register_storage",
           "storage_class"]  # fmt: skip


def storage_class(name: str) -> type[Storage]:
    """The registered class of ``name``; an unknown name lists the known ones."""
    if not isinstance(name, str) or name not in STORAGES:
        known = ", ".join(sorted(STORAGES))
        raise KVSlimError(f"unknown storage {name!r}; choose one of: {known}")
    return STORAGES[name]


def make_storage(spec: str) -> Callable[[AttentionSite, RopeFacts | None], Storage]:
    """``"int8:group=16"`` → a function that builds that storage for one layer.

    The name is checked now; the options when a layer is built (they may depend on its shape).
    """
    if not isinstance(spec, str):
        raise KVSlimError(f"storage must be a name such as 'dense' or 'int8', got {spec!r}")
    name, *texts = spec.split(":")
    cls = storage_class(name)
    options = dict(parse_option(t) for t in texts)

    def build(site: AttentionSite, rope: RopeFacts | None) -> Storage:
        try:
            return cls(site, rope, **options)
        except TypeError as err:
            raise KVSlimError(f"bad options for storage {name!r}: {err}") from None

    return build
