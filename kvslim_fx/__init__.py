"""kvslim_fx: compressed KV caches for Hugging Face causal LMs, as a graph rewrite.

The whole public surface::

    model = kvslim_fx.transform(hf_model, method="streaming", budget=2048)
    model = torch.compile(model)                       # optional
    out = kvslim_fx.generate(model, input_ids, max_new_tokens=256)
    kvslim_fx.export(model, "model.pt2"); runner = kvslim_fx.load("model.pt2")

and ``register_method`` / ``register_storage`` for a token policy or a storage of one's own.
"""

from .errors import KVSlimError
from .export import export, load
from .generate import generate
from .methods import METHODS, register_method
from .storage import STORAGES, register_storage
from .transform import transform

__all__ = ["METHODS", "STORAGES", "KVSlimError", "export", "generate", "load", "register_method",
           "register_storage", "transform"]  # fmt: skip
