"""Triton kernels with PyTorch reference twins, registered as ``torch.library`` ops.

Knows nothing about models or methods. Importing this package registers every op.
"""

from . import attention, eviction, pair_merge  # noqa: F401  (register every kvslim:: op)
