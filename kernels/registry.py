"""How the kernels become ``torch.library`` ops, whether or not Triton is installed.

Triton exists only where it has wheels (Linux); macOS and Windows CPU installs have none, and the
library must still import there. Each op module imports its Triton twin only if ``HAS_TRITON``
and falls back to its PyTorch reference otherwise. The import stays at module level (not inside
the op) because ``triton_op`` looks the launched kernels up in the op's globals to key
AOTAutograd's cache on their source.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None

__all__ = ["HAS_TRITON", "kernel_op"]


def kernel_op(name: str, mutates_args: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """``torch.library.triton_op(name, mutates_args=...)``, quiet where Triton is absent.

    Without Triton torch warns, once per op, that it found no Triton kernels in the op: true and
    expected there, so the warning is not shown to users.
    """
    register = torch.library.triton_op(name, mutates_args=mutates_args)
    if HAS_TRITON:
        return register

    def quiet(fn: Callable) -> Callable:
        log = logging.getLogger("torch._library.triton")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            return register(fn)
        finally:
            log.setLevel(level)

    return quiet
