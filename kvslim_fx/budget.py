"""Budgets: how many KV slots a method keeps per layer, as a number or as the text of one.

An int is a number of slots (sink slots included); a float in (0, 1] is a fraction of the
prompt, turned into slots once the prompt length is known. Text follows the same rule, and
takes a percentage too::

    parse_budget("2048")   # 2048 slots
    parse_budget("0.25")   # a quarter of the prompt
    parse_budget("25%")    # the same quarter
"""

from __future__ import annotations

from .errors import KVSlimError

Budget = int | float | None
"""``None``: keep everything; an int: slots per layer; a float: a fraction of the prompt."""

_FORMS = "a number of slots (e.g. 2048) or a fraction of the prompt (e.g. 0.25 or 25%)"


def check_budget(budget: object, name: str = "budget") -> int | float:
    """``budget`` itself if it is a number of slots (int >= 1) or a fraction in (0, 1].

    Anything else raises a :class:`KVSlimError` that calls the value ``name``.
    """
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise KVSlimError(
            f"{name} must be a number of slots (int) or a fraction of the prompt in (0, 1], "
            f"got {budget!r}"
        )
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise KVSlimError(
            f"a fractional {name} must lie in (0, 1], got {budget}; pass an int for a "
            "number of slots"
        )
    if isinstance(budget, int) and budget < 1:
        raise KVSlimError(f"{name}={budget} keeps no slot; give at least 1 slot or a fraction")
    return budget


def parse_budget(text: str, name: str = "budget") -> int | float:
    """``text`` as a budget: an integer is slots, a decimal a fraction, ``N%`` a percentage.

    ``"2048"`` → 2048; ``"0.25"`` and ``"25%"`` → 0.25; ``"1.0"`` and ``"100%"`` → 1.0 (the
    whole prompt). Bad text or an out-of-range value raises a :class:`KVSlimError` that names
    the option (``name``, e.g. ``"--budget"``) and the forms it takes.
    """
    text = text.strip()
    try:
        if text.endswith("%"):
            value: int | float = float(text[:-1]) / 100
        elif text.lstrip("+-").isdigit():
            value = int(text)
        else:
            value = float(text)  # nan and inf fail the range check
    except ValueError:
        raise KVSlimError(f"{name} must be {_FORMS}, got {text!r}") from None
    return check_budget(value, name)


def parse_budgets(text: str, name: str = "budgets") -> list[int | float]:
    """Comma-separated budgets, each read by :func:`parse_budget`; at least one."""
    budgets = [parse_budget(part, name) for part in text.split(",") if part.strip()]
    if not budgets:
        raise KVSlimError(f"{name} must be comma-separated budgets, e.g. 2048,0.25; got {text!r}")
    return budgets


SCHEDULES = ("uniform", "pyramid")
# PyramidKV's β: the top layer keeps 1/β of the mean selectable budget (their code's default).
PYRAMID_BETA = 20


def layer_budgets(
    slots: int, layers: int, schedule: str | list[int] | tuple[int, ...], floor: int = 0
) -> list[int]:
    """Slots per layer for a mean of ``slots`` over ``layers`` layers.

    ``"uniform"``: ``slots`` each. ``"pyramid"`` (PyramidKV, Cai et al. 2024): every layer keeps
    ``floor`` slots (what a method protects: sinks, its recent or observation window, as
    PyramidKV keeps its window in every layer), and the rest, ``slots - floor`` on average,
    decreases linearly from the first layer to the last: the last keeps ``1/β`` of it
    (``β = 20``), the first twice the mean minus that, so the total is ``layers · slots``
    (rounding spread by largest remainder). A list gives each layer's slots itself.
    """
    if not isinstance(schedule, str):
        return list(schedule)
    if schedule == "uniform" or layers == 1 or slots <= floor:
        return [slots] * layers
    mean = slots - floor
    top = mean / PYRAMID_BETA
    step = (2 * mean - 2 * top) / (layers - 1)
    shares = [floor + 2 * mean - top - i * step for i in range(layers)]
    budgets = [int(x) for x in shares]
    short = layers * slots - sum(budgets)
    for i in sorted(range(layers), key=lambda i: budgets[i] - shares[i])[:short]:
        budgets[i] += 1
    return budgets


def check_schedule(schedule: object, layers: int | None = None) -> str | tuple[int, ...]:
    """``schedule`` if it is one of :data:`SCHEDULES` or a list of positive slot counts (one per
    layer when ``layers`` is given); otherwise a :class:`KVSlimError` naming the forms."""
    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise KVSlimError(
                f"budget_schedule must be one of {', '.join(SCHEDULES)} or a list of slots per "
                f"layer, got {schedule!r}"
            )
        return schedule
    if not isinstance(schedule, list | tuple) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in schedule
    ):
        raise KVSlimError(
            f"budget_schedule must be one of {', '.join(SCHEDULES)} or a list of positive slot "
            f"counts, one per layer; got {schedule!r}"
        )
    if layers is not None and len(schedule) != layers:
        raise KVSlimError(
            f"budget_schedule lists {len(schedule)} layers but the model has {layers}; give one "
            "slot count per attention layer"
        )
    return tuple(schedule)
