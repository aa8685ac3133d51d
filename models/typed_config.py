"""Flat dataclass configs that round-trip through plain JSON dicts with strict key checking."""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Any, TypeVar

T = TypeVar("T")


def config_field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def check_known_keys(cls, keys, *, what: str) -> None:
    valid = config_field_names(cls)
    for key in keys:
        if key not in valid:
            raise ValueError(f"unknown {what} key {key!r}; valid keys: {sorted(valid)}")


def config_from_dict(cls: type[T], values: dict[str, Any], *, what: str) -> T:
    """Build `cls` from a dict, rejecting keys it does not define (typos fail loudly)."""
    check_known_keys(cls, values, what=what)
    return cls(**values)


def config_to_dict(config) -> dict[str, Any]:
    """A JSON-able dict: enums become their values, tuples become lists."""
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, Enum):
            value = value.value
        elif isinstance(value, tuple):
            value = list(value)
        out[field.name] = value
    return out
