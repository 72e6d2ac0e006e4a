"""Triton kernels with PyTorch reference twins, registered as ``torch.library`` ops.

Knows nothing about models or methods. Importing this package registers every op.
"""

from . import attention  # noqa: F401  (registers kvslim::attend)
