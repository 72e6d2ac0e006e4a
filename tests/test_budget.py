"""Budgets (kvslim_fx.budget): the one parser of the CLI and every benchmark, and how a budget
spreads over the layers."""

from __future__ import annotations

import itertools

import pytest
from helpers import kv_model, prefill_and_decode, prompts
from hypothesis import given
from hypothesis import strategies as st

from kvslim_fx.budget import PYRAMID_BETA, layer_budgets, parse_budget, parse_budgets
from kvslim_fx.errors import KVSlimError


@pytest.mark.parametrize(
    ("text", "budget"),
    [
        ("2048", 2048),
        (" 64 ", 64),
        ("1", 1),
        ("0.25", 0.25),
        ("1.0", 1.0),  # a fraction: the whole prompt
        ("25%", 0.25),
        ("100%", 1.0),
        ("12.5%", 0.125),
    ],
)
def test_integers_are_slots_decimals_and_percentages_fractions(text, budget):
    parsed = parse_budget(text)
    assert parsed == budget and type(parsed) is type(budget)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("abc", r"--budget must be a number of slots \(e.g. 2048\) or a fraction .*got 'abc'"),
        ("", "--budget must be a number of slots"),
        ("x%", "--budget must be a number of slots"),
        ("0", "--budget=0 keeps no slot"),
        ("-3", "--budget=-3 keeps no slot"),
        ("1.5", r"a fractional --budget must lie in \(0, 1\], got 1.5; pass an int"),
        ("1e3", r"a fractional --budget must lie in \(0, 1\]"),
        ("150%", r"a fractional --budget must lie in \(0, 1\], got 1.5"),
        ("0%", r"a fractional --budget must lie in \(0, 1\], got 0.0"),
        ("nan", r"a fractional --budget must lie in \(0, 1\]"),
        ("inf", r"a fractional --budget must lie in \(0, 1\]"),
    ],
)
def test_bad_text_names_the_option_and_the_fix(text, message):
    with pytest.raises(KVSlimError, match=message):
        parse_budget(text, "--budget")


def test_lists_are_comma_separated_and_not_empty():
    assert parse_budgets("0.125, 25%,1024,") == [0.125, 0.25, 1024]
    with pytest.raises(KVSlimError, match="--budgets must be comma-separated budgets"):
        parse_budgets(" , ", "--budgets")
    with pytest.raises(KVSlimError, match="a fractional --budgets must lie"):
        parse_budgets("0.25,2.5", "--budgets")


# --- Layer-adaptive budgets ---------------------------------------------------------------------


@given(
    slots=st.integers(1, 5000),
    layers=st.integers(1, 64),
    floor=st.integers(0, 80),
)
def test_a_pyramid_keeps_the_total_and_decreases_from_the_floor_up(slots, layers, floor):
    budgets = layer_budgets(slots, layers, "pyramid", floor)
    assert len(budgets) == layers and sum(budgets) == layers * slots  # the same total, exactly
    assert all(a >= b for a, b in itertools.pairwise(budgets))  # lower layers more
    if slots > floor and layers > 1:
        assert min(budgets) >= floor  # every layer keeps what its method protects
        mean = slots - floor  # PyramidKV: the top keeps 1/β of the mean selectable part
        assert abs(budgets[-1] - (floor + mean / PYRAMID_BETA)) <= 1
        assert abs(budgets[0] - (floor + 2 * mean - mean / PYRAMID_BETA)) <= 1


def test_a_model_holds_each_layers_share():
    """Explicit per-layer slots and a pyramid: each layer's capacity and, after a long prompt,
    its occupancy are its share; the uniform budget's total is kept."""
    ids, mask = prompts(2, 90, [0, 7], seed=3)
    for schedule, budget in (((40, 20), None), ("pyramid", 30)):
        model = kv_model("llama", "h2o", budget, chunk_size=16, budget_schedule=schedule)
        prefill_and_decode(model, ids, mask, steps=5)
        shares = [layer.capacity for layer in model.layers]
        assert shares == model.layer_slots
        assert sum(shares) == 60  # (40, 20); the pyramid's 2 × 30
        assert shares[0] > shares[1]
        for layer in model.layers:
            assert int((layer.pos[:, :, : layer.capacity] >= 0).sum(-1).min()) == layer.capacity


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ("steep", "budget_schedule must be one of uniform, pyramid"),
        ((40, 0), "a list of positive slot counts"),
        ((40, 20, 10), "lists 3 layers but the model has 2"),
    ],
)
def test_bad_schedules_are_refused(schedule, message):
    with pytest.raises(KVSlimError, match=message):
        kv_model("llama", "h2o", 30, budget_schedule=schedule)


def test_a_layer_share_below_the_sinks_is_refused():
    model = kv_model("llama", "h2o", None, budget_schedule=(40, 3))
    with pytest.raises(KVSlimError, match="layer 1 gets 3 slots, which must exceed sink=4"):
        model.reset(batch_size=1, max_length=100)
