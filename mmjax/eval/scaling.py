"""Scaling laws: fit `L(x) = (c / x) ** alpha` to small runs and extrapolate.

    fit = fit_power_law(params, losses)      # x: parameters, tokens or compute
    fit.alpha, fit.c, fit.predict(1e8), fit.r2

The fit is a least-squares line in log space: `log L = alpha * log c - alpha * log x`, so the
slope is `-alpha` and the intercept `alpha * log c` (Kaplan et al. 2020 write the same law as
`L(N) = (N_c / N) ** alpha_N`). Pure numpy: no JAX needed to analyse a sweep.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from mmjax.errors import InputError


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    """`L(x) = (c / x) ** alpha`, fitted on `n` points with log-space coefficient `r2`."""

    c: float
    alpha: float
    r2: float
    n: int

    def predict(self, x: float | np.ndarray) -> float | np.ndarray:
        return (self.c / np.asarray(x, np.float64)) ** self.alpha

    def describe(self, x_name: str = "x") -> str:
        return f"L({x_name}) = ({self.c:.4g} / {x_name}) ^ {self.alpha:.4f}  (R^2 {self.r2:.4f}, {self.n} runs)"


def fit_power_law(x: Sequence[float], loss: Sequence[float]) -> PowerLawFit:
    """Least-squares fit of `log loss = alpha * (log c - log x)`; x and loss must be positive."""
    x = np.asarray(x, np.float64)
    y = np.asarray(loss, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise InputError(f"fit_power_law: x and loss must be 1-D of equal length, got {x.shape} and {y.shape}")
    if len(x) < 2 or len(np.unique(x)) < 2:
        raise InputError(f"fit_power_law: needs at least 2 distinct x values, got {x.tolist()}")
    if (x <= 0).any() or (y <= 0).any() or not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise InputError("fit_power_law: x and loss must be finite and positive")
    lx, ly = np.log(x), np.log(y)
    slope, intercept = np.polyfit(lx, ly, 1)
    alpha = -float(slope)
    if abs(alpha) < 1e-12:
        raise InputError("fit_power_law: the loss does not change with x (alpha = 0); no power law")
    try:
        c = math.exp(intercept / alpha)
    except OverflowError:
        raise InputError(f"fit_power_law: the fitted scale overflows (alpha {alpha:.3g} is "
                         "too close to 0 for these losses); no usable power law") from None
    pred = intercept + slope * lx
    ss_res = float(np.sum((ly - pred) ** 2))
    ss_tot = float(np.sum((ly - ly.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return PowerLawFit(c=c, alpha=alpha, r2=r2, n=len(x))
