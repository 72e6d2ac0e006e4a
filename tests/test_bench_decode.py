"""benchmarks/decode.py's pure helpers: rows, budgets, warm-up shapes, roofline and report.

No timing is measured or asserted here; the timings live in the benchmark's results.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from helpers import table_rows

import kvslim_fx

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "decode.py"
_spec = importlib.util.spec_from_file_location("bench_decode", _PATH)
decode = importlib.util.module_from_spec(_spec)
sys.modules["bench_decode"] = decode  # dataclasses look their module up while it loads
_spec.loader.exec_module(decode)


def test_budgets_are_slots_or_fractions_labelled_as_percentages():
    args = decode.parse_args(["--budgets", "2048,0.25,25%,1.0", "--methods", "streaming"])
    assert [r.budget for r in args.row_list[5:]] == [2048, 0.25, 0.25, 1.0]
    assert [r.name for r in args.row_list[5:7]] == [
        "streaming-2048-compile",
        "streaming-25%-compile",
    ]
    for bad in ("0", "1.5", "150%"):
        with pytest.raises(SystemExit):
            decode.parse_args(["--budgets", bad])
    assert decode.budget_label(2048) == "2048"
    assert decode.budget_label(0.25) == "25%"


def test_methods_are_specs_checked_before_any_cell_runs(capsys):
    args = decode.parse_args(["--methods", "kvslimmer:recent=32", "--budgets", "0.25"])
    assert [(r.name, r.method) for r in args.row_list[5:]] == [
        ("kvslimmer:recent=32-25%-compile", "kvslimmer:recent=32")
    ]
    for bad, message in [
        ("kvslimmer:recnt=3", "unexpected keyword argument 'recnt'"),
        ("kvslimmer:recent", "a method option is KEY=VALUE"),
        ("nope", "unknown methods"),
        ("full", "unknown methods"),  # full has its own rows
    ]:
        with pytest.raises(SystemExit):
            decode.parse_args(["--methods", bad])
        assert message in capsys.readouterr().err


def test_rows_cover_hf_full_and_every_method_budget_and_mode():
    rows = decode.all_rows(["streaming", "h2o"], [2048, 0.25], ["compile", "eager"])
    names = [r.name for r in rows]
    assert names[:5] == ["hf-eager", "hf-static-compile", "full-eager", "full-compile", "full-aoti"]
    assert "streaming-2048-compile" in names
    assert "h2o-25%-eager" in names
    assert len(names) == 5 + 2 * 2 * 2
    row = rows[names.index("h2o-25%-eager")]
    assert (row.method, row.mode, row.slots(8192)) == ("h2o", "eager", 2048)
    assert rows[names.index("streaming-2048-compile")].slots(512) == 2048


def test_int8_weight_rows_repeat_every_kvslim_row_with_a_tag():
    rows = decode.all_rows(["streaming"], [2048], ["compile"], weights=("model", "int8"))
    names = [r.name for r in rows]
    assert names == ["hf-eager", "hf-static-compile", "full-eager", "full-compile", "full-aoti",
                     "full-eager-w8", "full-compile-w8", "full-aoti-w8",
                     "streaming-2048-compile", "streaming-2048-compile-w8"]  # fmt: skip
    assert rows[-1].weights == "int8" and rows[-2].weights == "model"
    with pytest.raises(SystemExit):
        decode.parse_args(["--weights", "model,int4"])


@pytest.mark.parametrize("tied", [False, True])
def test_a_transformed_models_weight_bytes_count_int8_weights_as_codes_and_scales(tied):
    hf = decode.tiny_model(512)
    if tied:
        hf.get_output_embeddings().weight = hf.get_input_embeddings().weight
    linears = [m.weight for m in hf.modules() if isinstance(m, torch.nn.Linear)]
    for weights in ("model", "int8"):
        core = kvslim_fx.transform(hf, "full", weights=weights)
        core.reset(batch_size=1, max_length=64)
        state = {id(t) for t, _ in core.state().values()}
        got = decode.model_weights_read_bytes(core, state)
        # The parameters, plus the model's buffers (RoPE's frequencies), which the graph holds.
        want = decode.weights_read_bytes(hf) + sum(
            b.numel() * b.element_size() for b in hf.buffers()
        )
        if weights == "int8":  # each [N, K] float weight read as N·K codes and N scales
            want -= sum(w.numel() * w.element_size() - w.numel() - 4 * w.shape[0] for w in linears)
        assert got == want


def test_row_patterns_select_in_order_and_reject_typos():
    rows = decode.all_rows(["streaming", "kvslimmer"], [2048], ["compile"])
    picked = decode.select_rows(rows, "full-*,hf-eager")
    assert [r.name for r in picked] == ["hf-eager", "full-eager", "full-compile", "full-aoti"]
    assert decode.select_rows(rows, None) == rows
    with pytest.raises(ValueError, match="match no row"):
        decode.select_rows(rows, "hf-eager,stremaing-*")


def test_a_budget_holding_the_whole_sequence_is_skipped():
    row = decode.Row("streaming-2048-compile", "kvslim", "streaming", 2048, "compile")
    assert decode.skip_reason(row, 512, 64) is not None
    assert decode.skip_reason(row, 2048, 64) is None
    assert decode.skip_reason(decode.Row("hf-eager", "hf-eager"), 512, 64) is None


def test_warmup_covers_every_prefill_chunk_length():
    assert decode.warmup_lengths(600, 512) == [512, 88]
    assert decode.warmup_lengths(1024, 512) == [512]
    assert decode.warmup_lengths(64, 512) == [64]


def test_kv_bytes_read_grow_with_the_sequence_up_to_the_capacity():
    # Two layers of 10 bytes per slot: one grows, one holds at most 4 slots.
    layers = [(10, None), (10, 4)]
    # Steps attend over context + t cached tokens and their own: 3, then 4 tokens.
    assert decode.kv_read_bytes(layers, context=2, steps=2) == ((30 + 30) + (40 + 40)) / 2
    assert decode.kv_read_bytes([(10, 4)], context=100, steps=3) == 40


def test_roofline_is_floor_over_measured_time():
    r = decode.roofline(weight_bytes=6e9, kv_bytes=4e9, bandwidth_gbs=100.0, step_s=0.2)
    assert r["floor_s"] == pytest.approx(0.1)
    assert r["roofline"] == pytest.approx(0.5)


def test_weights_read_count_a_tied_embedding_once_and_skip_an_untied_one():
    hf = decode.tiny_model(512)  # untied: the input embedding is only gathered, row by row
    emb = hf.get_input_embeddings().weight
    nbytes = {id(p): p.numel() * p.element_size() for p in hf.parameters()}
    assert decode.weights_read_bytes(hf) == sum(nbytes.values()) - nbytes[id(emb)]
    hf.get_output_embeddings().weight = emb  # tied: the head reads the one matrix whole
    unique = {id(p): p.numel() * p.element_size() for p in hf.parameters()}
    assert len(unique) == len(nbytes) - 1
    assert decode.weights_read_bytes(hf) == sum(unique.values())


def _cell(row: str, tps: float, **extra) -> dict:
    return {
        "row": row,
        "context": 512,
        "batch": 1,
        "status": "ok",
        "tokens_per_s": tps,
        "step_median_s": 1 / tps,
        "prefill_s": 0.5,
        "prefill_min_s": 0.45,
        "prefill_max_s": 0.625,
        "step_min_s": 0.9 / tps,
        "step_max_s": 1.25 / tps,
        "bandwidth_gbs": 1e-6,  # 1000 bytes at 1 kB/s: a 1 s floor
        "peak_mem_bytes": 2**20,
        "cache_bytes": 2**20,
        "full_cache_bytes": 2**22,
        "weight_bytes": 1000,
        "kv_read_bytes": 0.0,
        "recompiles": 0,
        **extra,
    }


def test_report_ratios_and_failed_rows():
    cells = [
        _cell("hf-eager", 10.0),
        _cell("hf-static-compile", 20.0),
        _cell("full-compile", 30.0),
        {
            "row": "snapkv-25%-compile",
            "context": 512,
            "batch": 1,
            "status": "error",
            "error": "KVSlimError: no | room",
        },
        {
            "row": "streaming-2048-compile",
            "context": 512,
            "batch": 1,
            "status": "skipped",
            "reason": "budget 2048 ≥ sequence 576",
        },
        _cell("full-eager", 5.0, batch=8),  # no HF row at batch 8: no ratio
    ]
    decode.add_ratios(cells)
    decode.add_roofline(cells)
    assert cells[2]["vs_hf_eager"] == pytest.approx(3.0)
    assert cells[2]["vs_hf_static"] == pytest.approx(1.5)
    assert cells[5]["vs_hf_eager"] is None
    assert cells[3]["vs_hf_eager"] is None
    assert cells[2]["floor_s"] == pytest.approx(1.0)
    assert cells[2]["roofline"] == pytest.approx(30.0)
    text = decode.table(cells)
    lines = text.splitlines()
    assert len(lines) == 2 + len(cells)
    # Every line has the same number of columns, failed ones included (a | in the error is
    # escaped so it does not open a column).
    assert len({line.count("|") for line in lines}) == 1
    rows = table_rows(text)
    assert rows[3] == ["full-compile", "512", "1", "0.500 (0.450–0.625)", "30.0",
                       "33.33 (30.00–41.67)", "3.00×", "1.50×", "1.0", "1.00", "25.0%", "0.0",
                       "1000.00", "3000%", ""]  # fmt: skip
    assert rows[4] == ["snapkv-25%-compile", "512", "1", *["–"] * 11,
                       "error: KVSlimError: no / room"]  # fmt: skip
    assert rows[5][-1] == "skipped: budget 2048 ≥ sequence 576"
    assert rows[6][6:8] == ["–", "–"]  # batch 8: no HF row to compare with
