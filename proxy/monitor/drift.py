"""Drift statistics between binned distributions: PSI, Kolmogorov-Smirnov, Jensen-Shannon, chi-square."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import chdtrc  # chi-square survival function; scipy comes with scikit-learn

EPS = 1e-4  # floor for empty bins, so PSI stays finite (a common choice: 0.0001)
Array = np.ndarray[Any, Any]


def _fractions(counts: Array) -> Array:
    total = counts.sum()
    return counts / total if total > 0 else np.zeros_like(counts, dtype=np.float64)


def psi(expected: Array, actual: Array) -> float:
    """Population stability index of `actual` counts against `expected` fractions."""
    p = np.maximum(np.asarray(expected, dtype=np.float64), EPS)
    q = np.maximum(_fractions(np.asarray(actual, dtype=np.float64)), EPS)
    return float(np.sum((q - p) * np.log(q / p)))


def ks(expected: Array, actual: Array) -> float:
    """Kolmogorov-Smirnov distance: the largest gap between the two binned CDFs."""
    p = np.cumsum(np.asarray(expected, dtype=np.float64))
    q = np.cumsum(_fractions(np.asarray(actual, dtype=np.float64)))
    return float(np.max(np.abs(q - p)))


def js(expected: Array, actual: Array) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between the binned distributions."""
    p = np.asarray(expected, dtype=np.float64)
    q = _fractions(np.asarray(actual, dtype=np.float64))
    m = (p + q) / 2.0

    def kl(a: Array) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return float(np.sqrt(max(0.5 * kl(p) + 0.5 * kl(q), 0.0)))


def chi_square(expected: Array, actual: Array) -> tuple[float, float]:
    """Chi-square statistic of class counts against expected fractions, and its p-value."""
    obs = np.asarray(actual, dtype=np.float64)
    n = obs.sum()
    exp = np.maximum(np.asarray(expected, dtype=np.float64), EPS) * n
    stat = float(np.sum((obs - exp) ** 2 / exp)) if n else 0.0
    dof = max(len(obs) - 1, 1)
    return stat, float(chdtrc(dof, stat))


def scores(expected: Array, actual: Array) -> dict[str, float]:
    """PSI, KS and JS of one binned distribution."""
    return {"psi": psi(expected, actual), "ks": ks(expected, actual), "js": js(expected, actual)}
