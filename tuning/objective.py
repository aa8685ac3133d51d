"""Which guidance scale is best: `fd_clip:min`, `f1:max`, or `precision@recall>=0.5`.

The constrained form maximises (or minimises, for distances) the first metric among the
scales that meet the constraint; if none meets it, the scale closest to meeting it wins and
the choice is marked unsatisfied, so a sweep never ends without an answer.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass

from orchestration.config import ConfigError

METRICS = ("fd_clip", "kid_clip", "precision", "recall", "f1", "clip_score", "r_precision",
           "attr_colour", "attr_shape", "attr_colour_shape")  # attr_*: structured captions
LOWER_IS_BETTER = {"fd_clip", "kid_clip"}
OBJECTIVE_RE = re.compile(
    r"^\s*(?P<metric>\w+)\s*(?::\s*(?P<mode>min|max))?\s*"
    r"(?:@\s*(?P<other>\w+)\s*(?P<op>>=|<=)\s*(?P<bound>[-+0-9.eE]+))?\s*$")
OPS = {">=": operator.ge, "<=": operator.le}


class ObjectiveError(ConfigError):
    pass


@dataclass(frozen=True)
class Objective:
    metric: str
    mode: str  # "min" | "max"
    constraint: tuple[str, str, float] | None = None  # (metric, ">=" | "<=", bound)

    def __str__(self) -> str:
        text = f"{self.metric}:{self.mode}"
        if self.constraint:
            other, op, bound = self.constraint
            text += f"@{other}{op}{bound:g}"
        return text

    def pick(self, rows: list[dict]) -> tuple[int, bool]:
        """(index of the best row, whether the constraint was met)."""
        def finite(row: dict, key: str) -> bool:
            value = row.get(key)
            return value is not None and math.isfinite(value)

        usable = [i for i, row in enumerate(rows) if finite(row, self.metric)]
        if not usable:
            raise ObjectiveError(f"objective {self}: no scale produced a finite {self.metric}")
        sign = 1.0 if self.mode == "min" else -1.0
        satisfied = True
        if self.constraint:
            other, op, bound = self.constraint
            meeting = [i for i in usable if finite(rows[i], other)
                       and OPS[op](rows[i][other], bound)]
            if meeting:
                usable = meeting
            else:  # nobody meets it: the closest to the bound wins, then the objective
                satisfied = False
                usable = [i for i in usable if finite(rows[i], other)]
                if not usable:
                    raise ObjectiveError(f"objective {self}: no scale produced a finite {other}")
                pick_closest = max if op == ">=" else min
                closest = pick_closest(rows[i][other] for i in usable)
                usable = [i for i in usable if rows[i][other] == closest]
        return min(usable, key=lambda i: sign * rows[i][self.metric]), satisfied


def parse_objective(text: str) -> Objective:
    match = OBJECTIVE_RE.match(text or "")
    example = "e.g. fd_clip:min, f1:max or precision@recall>=0.5"
    if not match:
        raise ObjectiveError(f"--objective {text!r}: expected METRIC[:min|max]"
                             f"[@METRIC>=X], {example}")
    metric, other = match.group("metric"), match.group("other")
    for name in filter(None, (metric, other)):
        if name not in METRICS:
            raise ObjectiveError(f"--objective {text!r}: unknown metric {name!r}; use one of "
                                 f"{', '.join(METRICS)}")
    mode = match.group("mode") or ("min" if metric in LOWER_IS_BETTER else "max")
    constraint = None
    if other:
        try:
            bound = float(match.group("bound"))
        except ValueError:
            raise ObjectiveError(f"--objective {text!r}: {match.group('bound')!r} is not a "
                                 "number") from None
        constraint = (other, match.group("op"), bound)
    return Objective(metric, mode, constraint)
