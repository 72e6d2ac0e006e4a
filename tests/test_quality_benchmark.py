"""benchmarks/quality.py on a tiny model: every task's cells, resuming, older result files, and
the kvpress peer's rows merged into its tables on the same windows and cases."""

from __future__ import annotations

import importlib.util
import json
import math
import shlex
from pathlib import Path

import pandas as pd
import pytest
from helpers import hf_model, kv_model, table_rows
from tiny_text import BOOKS, char_tokenizer

from kvslim_fx.eval.perplexity import austen_windows, continuation_nll

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def quality(monkeypatch):
    """The benchmark module, on the tiny llama, the character tokenizer and a fake corpus."""
    module = load_script("quality")
    monkeypatch.setattr("kvslim_fx.eval.perplexity.austen_text", lambda: dict(BOOKS))
    tiny = (hf_model("llama"), char_tokenizer())
    monkeypatch.setattr(module, "load_default_model", lambda dtype: tiny)
    # The cached transforms of the other tests: transform() itself is the slow part here.
    monkeypatch.setattr(
        module,
        "transform",
        lambda hf, method, budget=None, chunk_size=512, **options: kv_model(
            "llama", method, budget, chunk_size=chunk_size, **options
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
        "window_sha1": quality.token_digest(window[0].tolist()),
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
    assert has_row(md, "streaming", "30 (0.5)", "1", "0.0 MiB", "25.0%", "12.500")  # the old cell
    head, *rows = table_rows(md.split("## Summary")[1].split("## ")[0])
    assert head == ["method"] + [
        f"{t} {b}" for t in ("ppl", "needle", "retrieval") for b in ("uncompressed", "0.5", "64")
    ]
    (row,) = [row for row in rows if row[0] == "streaming"]
    assert row[1:3] == ["", "12.50"]  # no uncompressed column for a method
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

    # The peer's tasks file holds exactly these windows and cases: same ids, same token ids.
    tasks_path = tmp_path / "tasks.json"
    assert quality.main([*argv, "--write-cases", str(tasks_path)]) == 0
    peer = load_script("kvpress_peer")
    tasks = peer.load_tasks(tasks_path)
    ours = {(f"window-{c['window']}", c["window_sha1"]) for c in cells.values() if "window" in c}
    ours |= {(c["id"], c["prompt_sha1"]) for c in cells.values() if "prompt_sha1" in c}
    theirs = {(item["id"], peer.tokens_digest(t, item)) for t in quality.TASKS for item in tasks[t]}
    assert theirs == ours and len(theirs) == 3

    # Peer rows on those items, beside OUT: the rerun merges them into every table.
    rows = [
        peer_row("tova", 0.5, t, item["id"], peer.tokens_digest(t, item), length=item.get("length"))
        for t in quality.TASKS
        for item in tasks[t]
    ]
    out.with_name("kvpress.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    assert quality.main(argv) == 0
    md = out.with_suffix(".md").read_text()
    # A row per task, and one in the summary.
    assert [row[0] for row in table_rows(md)].count("kvpress:tova") == 3 + 1
    assert "--presses tova --budgets 0.5 --dtype float32 --out " in md


def has_row(md: str, *cells: str) -> bool:
    """Whether a markdown table row of ``md`` starts with ``cells``."""
    return any(row[: len(cells)] == list(cells) for row in table_rows(md))


def peer_row(press: str, budget: float, task: str, id_: str, sha: str, **fields) -> dict:
    """A row as benchmarks/kvpress_peer.py writes it (the fields quality.py reads)."""
    row = {
        "press": press,
        "budget_fraction": budget,
        "task": task,
        "id": id_,
        "tokens_sha1": sha,
        "dtype": "float32",
        "cache_bytes": 2**20,
        "cache_bytes_end": 1.25 * 2**20,
        "full_cache_bytes": 4 * 2**20,
        "cache_slots": 15,
        "prefill_s": 1.0,
        "decode_s": 2.0,
        "threads": 1,
    }
    if task == "perplexity":
        row["nll"] = [math.log(fields.pop("ppl", 10.0))] * 2
    else:
        row["correct"] = fields.pop("correct", True)
    return row | fields


def fake_results() -> dict:
    """Two perplexity windows and two needle cases of full and streaming, as quality.py keeps
    them."""
    common = {"cache_bytes": 2**20, "full_cache_bytes": 4 * 2**20, "seconds": 3.0, "threads": 1}
    cells = {}
    for method, slots in (("full", None), ("streaming", 15)):
        for window, ppl in ((0, 10.0), (1, 12.0)):
            cells[f"{method}|ppl|{window}"] = common | {
                "task": "perplexity",
                "method": method,
                "budget": "all" if slots is None else "0.25",
                "budget_slots": slots,
                "budget_frac": None if slots is None else 0.25,
                "window": window,
                "window_sha1": f"w{window}",
                "perplexity": ppl,
                "prefill_s": 1.0,
                "decode_s": 2.0,
                "settings": {"context": 60, "continuation": 8, "dtype": "float32", "seed": 0},
            }
        for length in (480, 960):
            cells[f"{method}|needle|{length}"] = common | {
                "task": "needle",
                "id": f"needle-{length}-0.5-0",
                "prompt_sha1": f"n{length}",
                "method": method,
                "budget": "all" if slots is None else "0.25",
                "length": length,
                "depth": 0.5,
                "sample": 0,
                "correct": True,
                "settings": {"dtype": "float32", "seed": 0},
            }
    return {"cells": cells, "runs": []}


def test_peer_rows_cover_only_the_tables_windows_and_cases(quality, tmp_path):
    argv = ["--context", "60", "--continuation", "8", "--windows", "2"]
    args = quality.parse_args([*argv, "--lengths", "480,960", "--depths", "0.5"])
    args.out = str(tmp_path / "q")
    undigested = peer_row("knorm", 0.25, "perplexity", "window-0", "w0")
    del undigested["tokens_sha1"]
    rows = [
        peer_row("none", 1.0, "perplexity", "window-0", "w0", ppl=10.0),
        peer_row("none", 1.0, "perplexity", "window-1", "w1", ppl=12.0),
        peer_row("tova", 0.25, "perplexity", "window-0", "w0", ppl=11.0),
        # Same id, other tokens (a tasks file of other settings): not this table's window.
        peer_row("tova", 0.25, "perplexity", "window-1", "other", ppl=99.0),
        # Another dtype, a window the table lacks, a row from before the digest: all left out.
        peer_row("tova", 0.25, "perplexity", "window-1", "w1", ppl=99.0, dtype="bfloat16"),
        peer_row("snapkv", 0.25, "perplexity", "window-2", "w2"),
        undigested,
        peer_row("tova", 0.25, "needle", "needle-480-0.5-0", "n480", length=480, correct=True),
        peer_row("tova", 0.25, "needle", "needle-960-0.5-0", "n960", length=960, correct=False),
    ]
    meta = {"kvpress": "0.5.5", "tasks": "t.json", "threads": 1, "compression": "NOTE."}
    peer = {"meta": meta, "rows": rows, "path": "peer.json"}
    tables = quality.build_tables(fake_results(), args, peer)

    ppl = tables["perplexity"].set_index("method")
    assert list(ppl.index) == ["full", "streaming", "kvpress:none", "kvpress:tova"]
    assert ppl.per_window["kvpress:none"] == pytest.approx([10.0, 12.0])
    assert ppl.delta_vs_full["kvpress:none"] == pytest.approx(0.0)  # the same model
    tova = ppl.loc["kvpress:tova"]
    assert (tova.windows, tova.complete) == (1, False)
    assert tova.quality == pytest.approx(11.0) and tova.delta_vs_full == pytest.approx(1.0)
    needle = tables["needle"].set_index("method").loc["kvpress:tova"]
    assert (needle.cases, needle.quality, needle[480], needle[960]) == (2, 0.5, 1.0, 0.0)

    md = quality.markdown(args, tables, peer)
    assert has_row(md, "kvpress:tova", "15 (0.25)", "1 of 2", "1.0 MiB → 1.2", "25.0%", "11.000",
                   "+1.000")  # fmt: skip
    assert has_row(md, "kvpress:none", "15 (1)", "2", "1.0 MiB → 1.2", "25.0%", "11.000", "+0.000")
    assert has_row(md, "kvpress:tova", "0.25", "2", "1.0 MiB → 1.2", "25.0%", "50.0%", "100%", "0%",
                   "3.0")  # fmt: skip
    assert "kvpress 0.5.5" in md and "NOTE." in md and "K and V only" in md
    # The three commands: the cases (main venv), the peer (its venv), the merging rerun.
    steps = md.split("```bash\n")[2].split("\n```")[0].splitlines()
    assert steps[0].startswith(".venv/bin/python benchmarks/quality.py --tasks perplexity,needle")
    assert (
        steps[0].endswith(" --write-cases t.json")
        and steps[2] + " --write-cases t.json" == steps[0]
    )
    assert steps[1] == (
        ".venv-kvpress/bin/python benchmarks/kvpress_peer.py --tasks t.json --presses none,tova "
        "--budgets 0.25 --dtype float32 --threads 1 --out peer.json"
    )
    assert quality.parse_args(shlex.split(steps[0])[2:]).write_cases == "t.json"
    assert quality.plot(tables, tmp_path / "q.png")  # the partial kvpress:tova row stays off


def test_method_options_make_their_own_rows(quality, tmp_path):
    """``streaming:sink=2`` is a row of its own, computed with that option, beside ``streaming``."""
    out = tmp_path / "q"
    argv = ["--context", "60", "--continuation", "8", "--windows", "1", "--tasks", "perplexity"]
    argv += ["--methods", "streaming,streaming:sink=2", "--budgets", "16", "--out", str(out)]
    assert quality.main(argv) == 0
    cells = json.loads(out.with_suffix(".json").read_text())["cells"].values()
    sinks = {c["method"]: c["settings"]["options"]["sink"] for c in cells}
    assert sinks == {"streaming": 4, "streaming:sink=2": 2}
    (window,) = austen_windows(char_tokenizer(), 60, 8, 1)
    nll = continuation_nll(kv_model("llama", "streaming", 16, chunk_size=512, sink=2), window, 60)
    (cell,) = [c for c in cells if c["method"] == "streaming:sink=2"]
    assert cell["nll"] == [round(float(x), 6) for x in nll]
    md = out.with_suffix(".md").read_text()
    assert has_row(md, "streaming", "16") and has_row(md, "streaming:sink=2", "16")
    assert "--methods streaming,streaming:sink=2 " in md
    with pytest.raises(SystemExit):
        quality.parse_args(["--methods", "streaming:sink=-1"])


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


def test_perplexity_table_pairs_each_method_with_streaming_and_shows_the_largest_slots(
    quality, tmp_path
):
    out = tmp_path / "q"
    argv = ["--context", "60", "--continuation", "8", "--windows", "3", "--tasks", "perplexity"]
    argv += ["--methods", "streaming,kvslimmer", "--budgets", "24", "--out", str(out)]
    assert quality.main(argv) == 0
    cells = json.loads(out.with_suffix(".json").read_text())["cells"].values()
    ppl = {(c["method"], c["window"]): c["perplexity"] for c in cells}
    diffs = pd.Series([math.log(ppl["kvslimmer", w] / ppl["streaming", w]) for w in range(3)])
    mean, low, high = quality.paired_interval(diffs)
    assert low <= mean <= high and mean == pytest.approx(diffs.mean())
    # 60 tokens in 24 slots: after the prompt some slot holds several tokens.
    slim = [c["diagnostics"] for c in cells if c["method"] == "kvslimmer"]
    largest = max(layer["largest_slot"] for d in slim for layer in d["prompt"])  # over windows
    assert largest > 1 and all(len(d[when]) == 2 for d in slim for when in ("prompt", "end"))
    head, *rows = table_rows(out.with_suffix(".md").read_text().split("## Continuation")[1])
    by_method = {row[0]: dict(zip(head, row, strict=True)) for row in rows}
    low, mean, high = (100 * math.expm1(x) for x in (low, mean, high))
    ci = f"{mean:+.2f}% [{low:+.2f}, {high:+.2f}]"
    assert by_method["kvslimmer"]["vs streaming (95 % CI)"] == ci
    assert by_method["streaming"]["vs streaming (95 % CI)"] == "+0.00% [+0.00, +0.00]"
    assert by_method["kvslimmer"]["largest slot (p99): prompt → end"].startswith(f"{largest:.0f} (")


def test_paired_interval_is_the_bootstrap_of_the_mean(quality):
    assert quality.paired_interval(pd.Series([0.5, 0.5, 0.5])) == (0.5, 0.5, 0.5)
    assert quality.paired_interval(pd.Series([1.0])) is None  # one window: no interval
    mean, low, high = quality.paired_interval(pd.Series([0.0, 1.0, 2.0, 3.0]))
    assert mean == 1.5 and 0.0 <= low < 1.5 < high <= 3.0


def test_a_spec_may_carry_transform_options(quality, tmp_path):
    """``tova:prefill=full`` is a row of its own, computed with a question-aware prefill."""
    out = tmp_path / "q"
    argv = ["--context", "60", "--continuation", "8", "--windows", "1", "--tasks", "perplexity"]
    argv += ["--methods", "tova,tova:prefill=full", "--budgets", "24", "--out", str(out)]
    assert quality.main(argv) == 0
    cells = {
        c["method"]: c for c in json.loads(out.with_suffix(".json").read_text())["cells"].values()
    }
    assert cells["tova:prefill=full"]["peak_cache_bytes"] > cells["tova"]["peak_cache_bytes"]
    assert cells["tova:prefill=full"]["cache_bytes"] == cells["tova"]["cache_bytes"]


def test_equal_bytes_pairs_each_row_with_the_nearest_bytes_within_ten_percent(quality):
    def rows(*specs):
        return pd.DataFrame(
            [{"method": m, "budget": b, "cache_bytes": n, "full_cache_bytes": 1000,
              "per_window": w, "quality": q, "complete": True} for m, b, n, w, q in specs]
        )  # fmt: skip

    ppl = rows(
        ("full:storage=xkv", "all", 240, [10.0, 20.0, 30.0], None),
        ("full:storage=int8", "all", 500, [10.0, 20.0, 30.0], None),
        ("streaming", "0.2", 200, [11.0, 21.0, 33.0], None),
        ("streaming", "0.25", 250, [12.0, 22.0, 31.0], None),
    )
    needle = rows(("full:storage=xkv", "all", 0, None, 1.0), ("streaming", "0.25", 0, None, 0.5))
    text = quality.equal_bytes_table({"perplexity": ppl, "needle": needle}, ["streaming"])
    head, *body = table_rows(text)
    by_method = {row[0]: dict(zip(head, row, strict=True)) for row in body}
    assert set(by_method) == {"full:storage=xkv", "full:storage=int8"}
    xkv = by_method["full:storage=xkv"]
    assert xkv["streaming at"] == "0.25 (25.0%)"  # 250 is nearer to 240 than 200
    diffs = pd.Series([math.log(a / b) for a, b in zip([10, 20, 30], [12, 22, 31], strict=True)])
    mean, low, high = (100 * math.expm1(x) for x in quality.paired_interval(diffs))
    assert xkv["ppl vs streaming (95 % CI)"] == f"{mean:+.2f}% [{low:+.2f}, {high:+.2f}]"
    assert xkv["needle: vs streaming"] == "100% / 50%"
    assert by_method["full:storage=int8"]["streaming at"] == ""  # 500 is 2× 250: no match
