"""Budgets as text (kvslim_fx.budget): the one parser of the CLI and every benchmark."""

from __future__ import annotations

import pytest

from kvslim_fx.budget import parse_budget, parse_budgets
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
