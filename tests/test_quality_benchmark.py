"""benchmarks/quality.py on a tiny model: every task's cells, resuming, older result files."""

from __future__ import annotations

import importlib.util
import json
import shlex
from pathlib import Path

import pytest
from helpers import hf_model, kv_model
from tiny_text import BOOKS, char_tokenizer

from kvslim_fx import evaluate
from kvslim_fx.evaluate import austen_windows

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def quality(monkeypatch):
    """The benchmark module, on the tiny llama, the character tokenizer and a fake corpus."""
    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(evaluate, "austen_text", lambda: dict(BOOKS))
    tiny = (hf_model("llama"), char_tokenizer())
    monkeypatch.setattr(module, "load_default_model", lambda dtype: tiny)
    # The cached transforms of the other tests: transform() itself is the slow part here.
    monkeypatch.setattr(
        module,
        "transform",
        lambda hf, method, budget=None, chunk_size=512: kv_model(
            "llama", method, budget, chunk_size=chunk_size
        ),
    )
    return module


SETTINGS = ["--context", "60", "--continuation", "8", "--windows", "1"]
SETTINGS += ["--lengths", "480", "--depths", "0.5", "--methods", "full,streaming"]


def old_format_cell(quality) -> tuple[str, dict]:
    """A perplexity cell as the benchmark wrote it before the other tasks: no task, no budget."""
    (window,) = austen_windows(char_tokenizer(), 60, 8, 1)
    settings = {"context": 60, "continuation": 8, "dtype": "float32", "seed": 0}
    cell = {
        "nll": [1.0] * 8,
        "perplexity": 12.5,
        "cache_bytes": 1000,
        "full_cache_bytes": 4000,
        "prefill_s": 1.0,
        "decode_s": 1.0,
        "seconds": 2.0,
        "method": "streaming",
        "budget_frac": 0.5,
        "budget_slots": 30,
        "window": 0,
        "window_sha1": quality.digest(window[0]),
        "settings": settings | {"chunk_size": 512, "options": {"budget": 30, "sink": 4}},
        "threads": 1,
    }
    return "streaming|budget=30|context=60|continuation=8|window=0|dtype=float32|seed=0", cell


def test_sweep_writes_every_task_resumes_and_reads_old_cells(quality, tmp_path, monkeypatch):
    out = tmp_path / "q"
    key, old = old_format_cell(quality)
    out.with_suffix(".json").write_text(json.dumps({"cells": {key: old}, "runs": []}))
    argv = [*SETTINGS, "--budgets", "0.5,64", "--out", str(out)]
    assert quality.main(argv) == 0

    cells = json.loads(out.with_suffix(".json").read_text())["cells"]
    assert cells[key] == old  # finished (same window), so not recomputed
    tasks = [quality.cell_task(c) for c in cells.values()]
    # full + streaming at 2 budgets, per task.
    assert sorted(tasks) == ["needle"] * 3 + ["perplexity"] * 3 + ["retrieval"] * 3
    needle = cells["needle|streaming|budget=64|case=needle-480-0.5-0|dtype=float32|seed=0"]
    assert needle["capacity"] == 64 and needle["length"] == 480
    assert needle["cache_bytes"] == kv_model("llama", "streaming", 64, chunk_size=512).cache_bytes()
    half = cells["retrieval|streaming|budget=0.5|case=retrieval-480-0.5-0|dtype=float32|seed=0"]
    assert half["capacity"] == 240  # half of this prompt

    md = out.with_suffix(".md").read_text()
    assert "## Continuation perplexity" in md and "## Needle in a haystack" in md
    assert "| streaming | 30 (0.5) | 1 | 0.0 MiB | 25.0% | 12.500 |" in md  # the old cell
    command = md.split("```bash\n")[1].split("\n```")[0]
    again = quality.parse_args(shlex.split(command)[2:])
    assert (again.tasks, again.methods, again.budgets) == (
        ["perplexity", "needle", "retrieval"], ["full", "streaming"], [0.5, 64])  # fmt: skip
    assert (again.lengths, again.depths, again.context, again.out) == ([480], [0.5], 60, str(out))

    # A rerun computes nothing: every cell is finished.
    def refuse(*args, **kwargs):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(quality, "answer_case", refuse)
    monkeypatch.setattr(quality, "continuation_nll", refuse)
    assert quality.main(argv) == 0
    assert out.with_suffix(".md").read_text() == md


@pytest.mark.parametrize(
    ("text", "parsed"), [("0.125,0.25,1024", [0.125, 0.25, 1024]), ("1", [1]), ("1.0", [1.0])]
)
def test_budgets_are_fractions_with_a_point_and_slots_without(quality, text, parsed):
    budgets = quality.parse_args(["--budgets", text]).budgets
    assert budgets == parsed and [type(b) for b in budgets] == [type(b) for b in parsed]


def test_bad_budgets_and_tasks_are_usage_errors(quality, capsys):
    for argv in (["--budgets", "1.5"], ["--budgets", "x"], ["--tasks", "needle,nope"]):
        with pytest.raises(SystemExit):
            quality.parse_args(argv)
    assert "--tasks are comma-separated" in capsys.readouterr().err
