"""Missing data is an error: every row a scenario uses is checked for the fields it needs.

A row whose prompt column, reference, choices, answer or id is missing (a JSON key absent, a
CSV cell empty: ``datasets`` reads both as null) or null would otherwise become the text
``"None"`` in a prompt or a reference, and be scored silently wrong. ``row_problems`` names what
is missing; ``build_instances`` refuses such rows with their row numbers and columns, before
the model loads, or skips them when the scenario says ``skip_invalid`` (counted in the stats).
"""

from __future__ import annotations

from typing import Any

# Rows listed in a refusal (the count of all of them is given too).
SHOWN = 5


def row_problems(row: dict[str, Any], needed: dict[str, str]) -> list[str]:
    """What is wrong with ``row``: one phrase per column of ``needed`` (column -> its role:
    ``"prompt"``, ``"reference"``, ``"choices"``, ``"answer"`` or ``"id"``) that is missing,
    null, or (for references and choices) an empty list or a list holding nulls."""
    problems = []
    for column, role in needed.items():
        value = row.get(column)
        if value is None:
            problems.append(f"{column!r} ({role}) is missing or null")
        elif role in ("reference", "choices") and isinstance(value, (list, tuple)):
            if not value:
                problems.append(f"{column!r} ({role}) is an empty list")
            elif any(v is None for v in value):
                problems.append(f"{column!r} ({role}) holds a null")
        elif role == "choices":
            problems.append(f"{column!r} ({role}) is {type(value).__name__}, not a list")
    return problems


class InvalidRowsError(ValueError):
    """Rows of the dataset lack data the scenario needs.

    Args:
        where: The split and source, e.g. ``"split 'test' of 'data.jsonl'"``.
        bad: (row number counted from 1, its problems) of every invalid row.
    """

    def __init__(self, where: str, bad: list[tuple[int, list[str]]]) -> None:
        shown = "\n".join(f"  row {n}: {'; '.join(p)}" for n, p in bad[:SHOWN])
        more = f"\n  ... and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        super().__init__(
            f"{len(bad)} row(s) of {where} lack data the scenario needs (rows counted from 1, "
            f"as lines of a jsonl file):\n{shown}{more}\nFill them in, or pass --skip-invalid "
            "(ScenarioSpec(skip_invalid=True)) to skip such rows; the run's stats count them."
        )
        self.rows = [n for n, _ in bad]
