"""The one registration rule shared by token policies and storages (``register_method``,
``register_storage``): a subclass of the base with a ``name``, known by that name from then on."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T", bound=type)


def register(table: dict[str, T], cls: T, base: type, decorator: str) -> T:
    """Put ``cls`` in ``table`` under ``cls.name`` (a later one of the same name replaces the
    earlier); a ``TypeError`` naming ``decorator`` if it is not a named subclass of ``base``."""
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(f"{decorator} takes a subclass of {base.__module__}.{base.__name__}, "
                        f"got {cls!r}")  # fmt: skip
    if not isinstance(getattr(cls, "name", None), str) or not cls.name:
        raise TypeError(f"{cls.__name__} must set a class attribute `name` (a non-empty string)")
    table[cls.name] = cls
    return cls
