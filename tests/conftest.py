"""Test-wide setup: Triton runs through its interpreter on machines without a GPU."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported (kvslim_fx.kernels imports it).
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, os.cpu_count() or 1))
