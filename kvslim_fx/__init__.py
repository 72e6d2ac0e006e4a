"""kvslim_fx: compressed KV caches for Hugging Face causal LMs, as a graph rewrite.

The whole public surface::

    model = kvslim_fx.transform(hf_model, method="streaming", budget=2048)
    model = torch.compile(model)                       # optional
    out = kvslim_fx.generate(model, input_ids, max_new_tokens=256)
    kvslim_fx.export(model, "model.pt2"); runner = kvslim_fx.load("model.pt2")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import KVSlimError

if TYPE_CHECKING:
    from .export import export, load
    from .generate import generate
    from .methods import METHODS
    from .transform import transform

__all__ = ["METHODS", "KVSlimError", "export", "generate", "load", "transform"]

# Imported on first use (PEP 562) so that `kvslim-fx --help` does not wait for torch and triton.
_HOMES = {
    "METHODS": ".methods",
    "export": ".export",
    "load": ".export",
    "generate": ".generate",
    "transform": ".transform",
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'kvslim_fx' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name], __name__), name)
