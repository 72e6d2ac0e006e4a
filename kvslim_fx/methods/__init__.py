"""Method registry: ``method="name"`` in :func:`kvslim_fx.transform` picks a class from here."""

from __future__ import annotations

from ..errors import KVSlimError
from .base import Method, SlotLayout
from .full import Full
from .h2o import H2O
from .kvslimmer import KVSlimmer
from .snapkv import SnapKV
from .streaming import Streaming
from .tova import TOVA
from .weightedkv import WeightedKV

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (Full, Streaming, KVSlimmer, WeightedKV, H2O, TOVA, SnapKV)
}

__all__ = ["METHODS", "Method", "SlotLayout", "make_method"]


def make_method(name: str, budget: int | float | None = None, **options) -> Method:
    """Build a method from its registry name and options; an unknown name lists the known ones."""
    if not isinstance(name, str) or name not in METHODS:
        known = ", ".join(sorted(METHODS))
        raise KVSlimError(f"unknown method {name!r}; choose one of: {known}")
    cls = METHODS[name]
    try:
        return cls(budget=budget, **options)
    except TypeError as err:
        raise KVSlimError(f"bad options for method {name!r}: {err}") from None
