"""Drift statistics between binned distributions: PSI, Kolmogorov-Smirnov, Jensen-Shannon, chi-square.

PSI, KS and JS take the expected and the observed fractions (`fractions(counts)`) of one
distribution ([bins]) or of many at once ([distributions, bins], one score per row), so that a
window's every feature and output is scored in one pass of numpy calls.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import chdtrc  # chi-square survival function (scipy: a core dependency)

EPS = 1e-4  # floor for empty bins, so PSI stays finite (a common choice: 0.0001)
Array = np.ndarray[Any, Any]


def fractions(counts: Array) -> Array:
    """Counts -> fractions along the last axis (all zeros where a row has no counts)."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=-1, keepdims=True)
    out: Array = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    return out


def psi(expected: Array, q: Array) -> Array:
    """Population stability index of observed fractions `q` against `expected` fractions
    (empty bins floored at EPS)."""
    p_eps, q_eps = np.maximum(expected, EPS), np.maximum(q, EPS)
    out: Array = np.sum((q_eps - p_eps) * np.log(q_eps / p_eps), axis=-1)
    return out


def ks(expected: Array, q: Array) -> Array:
    """Kolmogorov-Smirnov distance: the largest gap between the two binned CDFs."""
    out: Array = np.max(np.abs(np.cumsum(q, axis=-1) - np.cumsum(expected, axis=-1)), axis=-1)
    return out


def js(expected: Array, q: Array) -> Array:
    """Jensen-Shannon distance (base 2, in [0, 1]) between the binned distributions."""
    p = np.asarray(expected, dtype=np.float64)
    m = (p + q) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(p > 0, p * np.log2(p / m), 0.0).sum(axis=-1)
        kl_q = np.where(q > 0, q * np.log2(q / m), 0.0).sum(axis=-1)
    out: Array = np.sqrt(np.maximum(0.5 * kl_p + 0.5 * kl_q, 0.0))
    return out


def chi_square(expected: Array, actual: Array) -> tuple[float, float]:
    """Chi-square statistic of class counts against expected fractions, and its p-value."""
    obs = np.asarray(actual, dtype=np.float64)
    n = obs.sum()
    exp = np.maximum(np.asarray(expected, dtype=np.float64), EPS) * n
    stat = float(np.sum((obs - exp) ** 2 / exp)) if n else 0.0
    dof = max(len(obs) - 1, 1)
    return stat, float(chdtrc(dof, stat))


class Judgement:
    """Drift scores of one window: per distribution (features, then outputs) and statistic.

    PSI is computed when the window is judged (it drives the alerts); KS, JS and the class
    counts' chi-square p-value are computed the first time a reader asks for them, from the
    fractions kept here: a window is judged every `window / 10` rows, read once per scrape.
    """

    __slots__ = ("_chi", "_chi2_p", "_expected", "_js", "_ks", "_labels", "_q", "psi", "rows")

    def __init__(
        self,
        rows: int,
        expected: Array,
        observed: Array,
        label_fractions: Array | None = None,
        label_counts: Array | None = None,
    ) -> None:
        self.rows = rows
        self._expected, self._q = expected, fractions(observed)
        self.psi = psi(expected, self._q)
        self._labels = (label_fractions, label_counts)
        self._ks: Array | None = None
        self._js: Array | None = None
        self._chi = False
        self._chi2_p: float | None = None

    @property
    def ks(self) -> Array:
        if self._ks is None:
            self._ks = ks(self._expected, self._q)
        return self._ks

    @property
    def js(self) -> Array:
        if self._js is None:
            self._js = js(self._expected, self._q)
        return self._js

    @property
    def chi2_p(self) -> float | None:
        if not self._chi:
            fractions_, counts = self._labels
            if fractions_ is not None and counts is not None and counts.sum() > 0:
                self._chi2_p = chi_square(fractions_, counts)[1]
            self._chi = True
        return self._chi2_p
