"""Test-wide setup: Triton runs through its interpreter on machines without a GPU, Inductor's
C++ is compiled without optimisation or SIMD loops, and the benchmarks' shared module imports as
``common``, as it does when they run as scripts."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch._inductor.config
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

if not torch.cuda.is_available():
    # Must be set before triton is first imported (kvslim_fx.kernels imports it).
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The cores are shared by the pytest-xdist workers (scripts/test runs two).
torch.set_num_threads(
    max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1)))
)

# The compile and export tests check what Inductor generates (one graph, no recompiles, the
# eager tokens), not how well a C++ compiler optimises it: -O0 instead of -O3 takes about a
# third off each compiled model and package on 2 cores. Benchmarks compile with the defaults.
os.environ.setdefault("TORCHINDUCTOR_DEBUG_COMPILE", "1")
# Likewise scalar loops instead of SIMD ones: choosing a vector tiling (sympy over the symbolic
# chunk length) was a quarter of compiling KVSlimmer's tiny model.
torch._inductor.config.cpp.simdlen = 1

# Property tests draw fresh examples on every run; a failure prints the blob that replays it
# (@reproduce_failure) besides the falsifying example, and no draw has a deadline (the first call
# of a model builds it). Another profile can be chosen with --hypothesis-profile.
settings.register_profile("kvslim", print_blob=True, deadline=None)
settings.load_profile("kvslim")
