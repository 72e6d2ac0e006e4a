"""The design card's layering: kvslim_fx → passes → kernels, and what lands in site-packages."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Which kvslim_fx sub-packages each layer may import (besides itself).
ALLOWED = {"kernels": set(), "passes": {"kernels"}}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level >= 2 or module.startswith("kvslim_fx"):
                found.add("kvslim_fx")
            parts = module.split(".")
            if module.startswith("kvslim_fx.") and len(parts) > 1:
                found.add(parts[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("kvslim_fx.")}
            found |= {"kvslim_fx" for a in node.names if a.name == "kvslim_fx"}
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_point_down_only(layer):
    for path in (ROOT / layer).glob("*.py"):
        bad = imported_packages(path) - ALLOWED[layer] - {layer}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}: imports must point down only"


def test_the_library_imports_its_eval_tooling_only_lazily():
    """kvslim_fx.eval sits on top of the library: importing the library (the command line
    included, whose commands import it when they run) loads none of it."""
    code = (
        "import sys, kvslim_fx, kvslim_fx.cli\n"
        "print(sorted(m for m in sys.modules if m.startswith('kvslim_fx.eval')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[]\n"


def test_wheel_installs_passes_kernels_and_eval_inside_kvslim_fx(tmp_path):
    from setuptools import build_meta

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        wheel = build_meta.build_wheel(str(tmp_path))
    finally:
        os.chdir(cwd)
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"kvslim_fx"}
    assert "kvslim_fx/passes/sdpa.py" in names
    assert "kvslim_fx/kernels/attention.py" in names
    assert "kvslim_fx/eval/haystack.py" in names


def test_imports_and_runs_without_triton():
    """macOS / Windows CPU installs have no Triton: the library imports quietly and the ops run."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # `import triton` now raises ImportError
        "import torch, kvslim_fx\n"
        "from kvslim_fx.kernels import attention, registry\n"
        "assert not registry.HAS_TRITON\n"
        "q = torch.randn(1, 2, 3, 4); k = v = torch.randn(1, 1, 3, 4)\n"
        "empty = torch.zeros(1, 1, 1, 4); pos = torch.arange(3)[None]\n"
        "out, _ = torch.ops.kvslim.attend(q, k, v, empty, empty, torch.zeros(1, 1, 1),\n"
        "    torch.full((1, 1, 1), -1), pos, 0.5, 0, 0, 0, False)\n"
        "ref, _ = attention.attend_reference(q, k, v, empty, empty, torch.zeros(1, 1, 1),\n"
        "    torch.full((1, 1, 1), -1), pos, 0.5)\n"
        "torch.testing.assert_close(out, ref)\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ok\n"
    assert done.stderr == "", done.stderr
