"""Storage registry: ``storage="name"`` in :func:`kvslim_fx.transform` picks a class from here.

A storage owns how a layer's K/V rows live and are read by attention; a token policy
(``kvslim_fx.methods``) decides what they hold. ``@register_storage`` adds one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import KVSlimError
from ..methods import parse_option
from ..passes.rope import RopeFacts
from ..passes.sdpa import AttentionSite
from .base import STORAGES, Storage, register_storage
from .dense import Dense
from .int8 import Int8
from .lorc import LoRC
from .xkv import XKV

__all__ = ["STORAGES", "XKV", "Dense", "Int8", "LoRC", "Storage", "StorageSpec", "make_storage",
           "register_storage", "storage_class"]  # fmt: skip


def storage_class(name: str) -> type[Storage]:
    """The registered class of ``name``; an unknown name lists the known ones."""
    if not isinstance(name, str) or name not in STORAGES:
        known = ", ".join(sorted(STORAGES))
        raise KVSlimError(f"unknown storage {name!r}; choose one of: {known}")
    return STORAGES[name]


@dataclass(frozen=True)
class StorageSpec:
    """A registered storage and its options; called with a layer's site and rotary facts, it
    builds that layer's storage."""

    cls: type[Storage]
    options: dict[str, Any]
    # The modules the layers of one transformed model share (Storage.shared_state).
    groups: dict = field(default_factory=dict)

    @property
    def pre_rope(self) -> bool:
        """Whether the layers get their keys before the rotary embedding."""
        return self.options.get("pre_rope", self.cls.pre_rope_default) is True

    def __call__(self, site: AttentionSite, rope: RopeFacts | None) -> Storage:
        try:
            return self.cls(site, rope, groups=self.groups, **self.options)
        except TypeError as err:
            raise KVSlimError(f"bad options for storage {self.cls.name!r}: {err}") from None


def make_storage(spec: str) -> StorageSpec:
    """``"int8:group=16"`` → what builds that storage for each layer.

    The name is checked now; the options when a layer is built (they may depend on its shape).
    """
    if not isinstance(spec, str):
        raise KVSlimError(f"storage must be a name such as 'dense' or 'int8', got {spec!r}")
    name, *texts = spec.split(":")
    return StorageSpec(storage_class(name), dict(parse_option(t) for t in texts))
