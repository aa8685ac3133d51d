"""Search spaces from the command line: `--space clip.batch_size=choice(32,64)`.

Specs: `choice(a,b,...)`, `grid(a,b,...)` (every value, in order), `uniform(lo,hi)`,
`loguniform(lo,hi)`, `randint(lo,hi)` (hi exclusive). Keys are dotted config keys, checked
against the config before any trial starts, so a typo fails in one line and not in a trial.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from pydantic import ValidationError
from ray import tune
from ray.tune.search.sample import Integer

from orchestration.config import Config, ConfigError

SPEC_RE = re.compile(r"^\s*(\w+)\s*\((.*)\)\s*$")
KINDS = ("choice", "grid", "uniform", "loguniform", "randint")


class SearchSpaceError(ConfigError):
    """A search-space spec a user can fix, phrased as one line."""


def parse_value(text: str) -> Any:
    """`1e-5` is a float here (YAML 1.1 would read it as a string), `true` a bool."""
    text = text.strip()
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_spec(spec: str, *, key: str = "") -> Any:
    """One spec -> a Tune domain (or grid_search dict)."""
    where = f"--space {key}={spec}" if key else f"search space {spec!r}"
    match = SPEC_RE.match(spec)
    if not match:
        raise SearchSpaceError(f"{where}: expected one of {', '.join(KINDS)}, e.g. "
                               "loguniform(1e-5,1e-3) or choice(32,64)")
    kind, body = match.group(1), match.group(2)
    if kind not in KINDS:
        raise SearchSpaceError(f"{where}: unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    values = [parse_value(part) for part in body.split(",")] if body.strip() else []
    if kind in ("choice", "grid"):
        if not values:
            raise SearchSpaceError(f"{where}: {kind} needs at least one value")
        return tune.choice(values) if kind == "choice" else tune.grid_search(values)
    if len(values) != 2 or not all(_is_number(v) for v in values):
        raise SearchSpaceError(f"{where}: {kind} takes two numbers (low, high)")
    low, high = values
    if not low < high:
        raise SearchSpaceError(f"{where}: low must be below high")
    if kind == "loguniform":
        if low <= 0:
            raise SearchSpaceError(f"{where}: loguniform needs a positive low bound")
        return tune.loguniform(low, high)
    if kind == "randint":
        if not all(isinstance(v, int) for v in values):
            raise SearchSpaceError(f"{where}: randint takes two integers")
        return tune.randint(low, high)
    return tune.uniform(low, high)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_space(items: list[str] | None) -> dict[str, Any]:
    """`KEY=SPEC` strings -> {dotted key: domain}."""
    space: dict[str, Any] = {}
    for item in items or []:
        key, sep, spec = item.partition("=")
        key = key.strip()
        if not sep or not key or not all(key.split(".")):
            raise SearchSpaceError(f"--space {item!r}: expected KEY=SPEC, e.g. "
                                   "clip.batch_size=choice(32,64)")
        space[key] = parse_spec(spec, key=key)
    return space


def candidate_values(domain: Any) -> list:
    """Values the domain can produce (all categories, or the range ends), for validation."""
    if isinstance(domain, dict) and "grid_search" in domain:
        return list(domain["grid_search"])
    if hasattr(domain, "categories"):
        return list(domain.categories)
    if isinstance(domain, Integer):
        return [domain.lower, domain.upper - 1]
    if hasattr(domain, "lower"):
        return [domain.lower, domain.upper]
    return [domain]


def _has_key(raw: dict, key: str) -> bool:
    parts, node = key.split("."), raw
    for index, part in enumerate(parts):
        if not isinstance(node, dict):
            return False
        if part not in node:
            # a stage's `overrides` are free-form preset settings (e.g. clip.overrides.width)
            return index == len(parts) - 1 and index > 0 and parts[index - 1] == "overrides"
        node = node[part]
    return True


def apply_params(config: Config, params: dict[str, Any]) -> Config:
    """A copy of `config` with dotted-key values set and validated."""
    raw = config.model_dump(mode="json")
    for key, value in params.items():
        if not _has_key(raw, key):
            raise SearchSpaceError(f"--space {key}: no such config key (see configs/tiny.yaml)")
        node = raw
        for part in key.split(".")[:-1]:
            node = node[part]
        node[key.split(".")[-1]] = value
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        raise SearchSpaceError(f"search space gives an invalid config: {loc}: {msg} "
                               f"(got {first.get('input')!r})") from None


def check_space(config: Config, space: dict[str, Any]) -> None:
    """Fail before the sweep if a key does not exist or one of its values cannot validate."""
    for key, domain in space.items():
        for value in candidate_values(domain):
            apply_params(config, {key: value})


def describe(domain: Any) -> str:
    """A domain in the spec syntax it was written in, for logs and MLflow."""
    if isinstance(domain, dict) and "grid_search" in domain:
        return f"grid({', '.join(map(str, domain['grid_search']))})"
    if hasattr(domain, "categories"):
        return f"choice({', '.join(map(str, domain.categories))})"
    if isinstance(domain, Integer):
        return f"randint({domain.lower}, {domain.upper})"
    if hasattr(domain, "lower"):
        kind = "loguniform" if "LogUniform" in type(domain.sampler).__name__ else "uniform"
        return f"{kind}({domain.lower:g}, {domain.upper:g})"
    return repr(domain)
