"""Method registry: ``method="name"`` in :func:`kvslim_fx.transform` picks a class from here."""

from __future__ import annotations

import contextlib
from typing import Any

from ..errors import KVSlimError
from ..registry import register
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

__all__ = ["METHODS", "Method", "SlotLayout", "make_method", "parse_option", "parse_spec",
           "register_method"]  # fmt: skip


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``method="<cls.name>"`` available to ``transform``, the command
    line and the benchmarks (a later registration of the same name replaces the earlier)."""
    return register(METHODS, cls, Method, "register_method")


def make_method(name: str, budget: int | float | None = None, **options) -> Method:
    """Build a method from its registry name and options; an unknown name lists the known ones."""
    cls = _method_class(name)
    try:
        return cls(budget=budget, **options)
    except TypeError as err:
        raise KVSlimError(f"bad options for method {name!r}: {err}") from None


def parse_option(text: str) -> tuple[str, Any]:
    """``"KEY=VALUE"`` → ``(key, value)``, the value as a bool, int, float or string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise KVSlimError(f"a method option is KEY=VALUE (e.g. recent=64), got {text!r}")
    if value.lower() in ("true", "false"):
        return key, value.lower() == "true"
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return key, kind(value)
    return key, value


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"kvslimmer:bias_cap=1:recent=64"`` → ``("kvslimmer", {"bias_cap": 1, "recent": 64})``.

    How benchmarks name a method with non-default options (a table row per spec).
    """
    name, *options = spec.split(":")
    _method_class(name)
    return name, dict(parse_option(o) for o in options)


def _method_class(name: str) -> type[Method]:
    """The registered class of ``name``; an unknown name lists the known ones."""
    if not isinstance(name, str) or name not in METHODS:
        known = ", ".join(sorted(METHODS))
        raise KVSlimError(f"unknown method {name!r}; choose one of: {known}")
    return METHODS[name]
