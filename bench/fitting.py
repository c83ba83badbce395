"""Scaling fits on measured times: power-law exponents and crossovers between two curves."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = ["PowerFit", "fit_exponent", "Crossover", "find_crossover"]


@dataclass(frozen=True)
class PowerFit:
    """``t ≈ coef · L^exponent`` fitted by least squares on (log L, log t)."""

    exponent: float
    coef: float
    r2: float
    n: int
    lo: float  # smallest length used
    hi: float  # largest length used

    def predict(self, length: float) -> float:
        return self.coef * float(length) ** self.exponent


def fit_exponent(
    lengths: Sequence[float],
    times: Sequence[float],
    *,
    lo: Optional[float] = None,
    hi: Optional[float] = None,
    min_points: int = 2,
) -> Optional[PowerFit]:
    """Slope of log(time) against log(length) over ``lo ≤ L ≤ hi``; None with fewer than ``min_points``.

    Non-positive or non-finite times are dropped (a skipped or failed point).
    """
    pts = sorted(
        (float(l), float(t))
        for l, t in zip(lengths, times)
        if t is not None and math.isfinite(t) and t > 0 and l > 0
        and (lo is None or l >= lo) and (hi is None or l <= hi)
    )
    if len({l for l, _ in pts}) < max(2, min_points):
        return None
    # ordinary least squares in plain Python (no numpy needed on the GPU machine)
    x = [math.log(l) for l, _ in pts]
    y = [math.log(t) for _, t in pts]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxx = sum((a - mx) ** 2 for a in x)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx
    intercept = my - slope * mx
    ss_res = sum((b - (slope * a + intercept)) ** 2 for a, b in zip(x, y))
    ss_tot = sum((b - my) ** 2 for b in y)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return PowerFit(slope, math.exp(intercept), r2, len(pts), pts[0][0], pts[-1][0])


@dataclass(frozen=True)
class Crossover:
    """Where curve ``b`` (e.g. the linear form) becomes faster than curve ``a`` (e.g. the quadratic form) for good.

    kind:
      "interpolated"  b is slower at ``below`` and faster at every measured length from ``above`` on;
                      ``length`` is where the time ratio crosses 1 (log-log interpolation between the two)
      "below_range"   b is faster at every common length: the crossover is at or below the smallest (``length``)
      "none"          b is not faster at the largest common length: no crossover in the measured range
      "no_data"       no common length
    """

    kind: str
    length: Optional[float]
    below: Optional[float] = None
    above: Optional[float] = None
    n: int = 0  # common lengths compared

    def describe(self) -> str:
        if self.kind == "interpolated":
            return f"≈{self.length:,.0f} (between {self.below:,.0f} and {self.above:,.0f})"
        if self.kind == "below_range":
            return f"≤{self.length:,.0f} (faster at every measured length)"
        if self.kind == "none":
            return "not in measured range"
        return "no common lengths"


def find_crossover(
    lengths_a: Sequence[float], times_a: Sequence[float], lengths_b: Sequence[float], times_b: Sequence[float]
) -> Crossover:
    """The length from which ``b`` stays faster than ``a`` (see :class:`Crossover`)."""
    ta = {float(l): float(t) for l, t in zip(lengths_a, times_a) if t is not None and t > 0}
    tb = {float(l): float(t) for l, t in zip(lengths_b, times_b) if t is not None and t > 0}
    common = sorted(set(ta) & set(tb))
    if not common:
        return Crossover("no_data", None)
    ratio = [tb[l] / ta[l] for l in common]  # < 1: b faster
    if ratio[-1] >= 1.0:
        return Crossover("none", None, n=len(common))
    first = len(common) - 1
    while first > 0 and ratio[first - 1] < 1.0:
        first -= 1
    if first == 0:
        return Crossover("below_range", common[0], n=len(common))
    l0, l1 = common[first - 1], common[first]
    r0, r1 = math.log(ratio[first - 1]), math.log(ratio[first])
    # log r is >= 0 at l0 and < 0 at l1: solve log r = 0 on the line between them (log-log)
    frac = r0 / (r0 - r1) if r0 != r1 else 0.0
    length = math.exp(math.log(l0) + frac * (math.log(l1) - math.log(l0)))
    return Crossover("interpolated", length, l0, l1, n=len(common))
