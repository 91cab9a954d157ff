"""Checking a config dataclass's fields on construction and from JSON: errors that name the
field, the bad value and what is allowed."""

from __future__ import annotations

from typing import Any


def require(condition: bool, field_name: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ValueError(f"Invalid {field_name}={value!r}: {allowed}.")


def fields_of(cls: type, data: Any) -> dict[str, Any]:
    """``data`` as keyword arguments of the dataclass ``cls``: a dict of its fields only."""
    name, known = cls.__name__, set(cls.__dataclass_fields__)
    require(isinstance(data, dict), name, data, f"give a dict of {name} fields")
    unknown = set(data) - known
    require(not unknown, name, sorted(unknown), f"allowed keys are {sorted(known)}")
    return dict(data)
