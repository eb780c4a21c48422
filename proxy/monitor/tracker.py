"""Streaming histograms of one version's inputs and outputs, in sliding windows, judged for drift.

Everything is a numpy count vector: no row is kept. Rows are binned in bulk (one pass of numpy
calls per flush, whatever the number of features), per-feature bins come from the manifest's
baseline (plus an underflow and an overflow bin), and two sliding windows (`window` and
`long_window` rows) are rings of sub-window count vectors. Each time the short window moves on
a sub-window, every feature and output is scored against the baseline (PSI, KS, JS; chi-square
for class counts) in both windows.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .drift import EPS, chi_square

Array = np.ndarray[Any, Any]
SUBWINDOWS = 10  # a window is a ring of this many sub-windows
FLUSH_ROWS = 256  # rows buffered before they are binned (amortises numpy's per-call cost)
Level = Literal["ok", "warn", "alert"]
Kind = Literal["sudden", "gradual"]

# Layout of the scalar counters at the start of every count vector.
ROWS, OUT_OF_RANGE, N_SCALARS = 0, 1, 2


@dataclass(frozen=True, slots=True)
class Baseline:
    """What the training data looked like, from a manifest: bins and fractions per distribution."""

    names: list[str]  # features, then outputs ("label", "probabilities[k]" or "variable")
    n_features: int
    mins: Array  # [F]
    maxs: Array  # [F]
    width: int  # bins per feature including under/overflow
    fractions: Array  # [F, width] baseline fractions (under/over: 0)
    classes: Array | None  # class values (classification)
    label_fractions: Array | None  # [C]
    prob_edges: Array | None  # [PB+1]
    prob_fractions: Array | None  # [C, PB]
    holdout_accuracy: float | None
    task: str
    nbins: Array  # [F] bins per feature (the manifest's, fewer where quantiles tied)
    boundaries: Array  # all features' bin boundaries on one increasing axis (see Baseline.bin)
    offsets: Array  # [F] index of each feature's first boundary in `boundaries`
    scale: Array  # [F] 1 / (max - min)
    var_edges: Array | None = None  # regression output: its edges, the last nudged up
    var_fractions: Array | None = None  # [B + 2]: underflow 0, its bins, overflow 0

    @classmethod
    def from_manifest(cls, raw: dict[str, Any]) -> Baseline | None:
        base = raw.get("baseline")
        if not isinstance(base, dict) or not base.get("features"):
            return None
        feats = base["features"]
        n = len(feats)
        width = max(len(f["edges"]) - 1 for f in feats) + 2
        fractions = np.zeros((n, width))
        nbins = np.zeros(n, dtype=np.int64)
        mins = np.asarray([f["min"] for f in feats], dtype=np.float64)
        maxs = np.asarray([f["max"] for f in feats], dtype=np.float64)
        spans = np.where(maxs > mins, maxs - mins, 1.0)
        bounds: list[float] = []
        offsets = np.zeros(n, dtype=np.int64)
        for i, f in enumerate(feats):
            edges = np.asarray(f["edges"], dtype=np.float64)
            inner = edges[1:-1]
            fr = np.asarray(f["fractions"], dtype=np.float64)
            fractions[i, 1 : 1 + fr.size] = fr  # underflow 0, bins, overflow (then zero padding)
            nbins[i] = fr.size
            # Feature i lives on [3i + 0.5, 3i + 2.5] of one shared axis: its minimum maps to
            # 3i + 1 and its maximum to 3i + 2 (nudged up, so the maximum itself is in range).
            offsets[i] = len(bounds)
            axis = 3 * i + 1 + (np.concatenate([[mins[i]], inner, [maxs[i]]]) - mins[i]) / spans[i]
            axis[-1] = np.nextafter(axis[-1], np.inf)
            bounds.extend(axis.tolist())
        outs = base.get("outputs", {})
        classes = label_fr = prob_edges = prob_fr = var_edges = var_fr = None
        var = outs.get("variable")
        if isinstance(var, dict) and "label" not in outs:
            var_edges = np.asarray(var["edges"], dtype=np.float64)
            var_edges[-1] = np.nextafter(var_edges[-1], np.inf)  # the maximum itself is in range
            var_fr = np.concatenate([[0.0], np.asarray(var["fractions"], dtype=np.float64), [0.0]])
        if "label" in outs:
            classes = np.asarray(outs["label"]["classes"])
            label_fr = np.asarray(outs["label"]["fractions"], dtype=np.float64)
            prob_edges = np.asarray(outs["probabilities"]["edges"], dtype=np.float64)
            prob_fr = np.asarray(outs["probabilities"]["fractions"], dtype=np.float64)
        holdout = (raw.get("metrics") or {}).get("holdout") or {}
        names = [f["name"] for f in feats]
        if classes is not None and prob_fr is not None:
            names += ["label"] + [f"probabilities[{c}]" for c in classes.tolist()]
        elif var_edges is not None:
            names += ["variable"]
        return cls(
            names=names,
            n_features=n,
            mins=mins,
            maxs=maxs,
            width=width,
            fractions=fractions,
            classes=classes,
            label_fractions=label_fr,
            prob_edges=prob_edges,
            prob_fractions=prob_fr,
            holdout_accuracy=holdout.get("accuracy"),
            task=str(raw.get("task", "classification")),
            nbins=nbins,
            boundaries=np.asarray(bounds),
            offsets=offsets,
            scale=1.0 / spans,
            var_edges=var_edges,
            var_fractions=var_fr,
        )

    def bin(self, x: Array) -> Array:
        """Bin index of every value, [n, F]: 0 underflow, 1..B the feature's bins, B+1 overflow.

        One searchsorted for all features: each feature's values are mapped onto its own stretch
        of a shared axis, where the boundaries of every feature sit in increasing order.
        """
        lanes = 3.0 * np.arange(self.n_features)
        z = (x - self.mins) * self.scale + (lanes + 1.0)
        np.maximum(z, lanes + 0.5, out=z)  # two ufuncs: cheaper than np.clip's wrapper
        np.minimum(z, lanes + 2.5, out=z)
        pos = np.searchsorted(self.boundaries, z.ravel(), side="right").reshape(z.shape)
        local: Array = pos - self.offsets
        return local


class Layout:
    """Offsets of each distribution inside one flat count vector."""

    def __init__(self, b: Baseline) -> None:
        self.features = slice(N_SCALARS, N_SCALARS + b.n_features * b.width)
        end = self.features.stop
        c = 0 if b.classes is None else len(b.classes)
        pb = 0 if b.prob_edges is None else len(b.prob_edges) - 1
        self.labels = slice(end, end + c)
        self.probs = slice(self.labels.stop, self.labels.stop + c * pb)
        self.var_width = 0 if b.var_fractions is None else len(b.var_fractions)
        self.variable = slice(self.probs.stop, self.probs.stop + self.var_width)
        self.size = self.variable.stop
        self.n_classes, self.prob_bins = c, pb
        # every distribution is one row of this width when drift is scored
        self.width = max(b.width, c, pb, self.var_width)


class Window:
    """The last `rows` rows as a ring of SUBWINDOWS count vectors (no rows stored)."""

    def __init__(self, rows: int, size: int, dtype: type = np.int64) -> None:
        self.rows = rows
        self.sub_rows = max(rows // SUBWINDOWS, 1)
        self.ring: deque[Array] = deque(maxlen=SUBWINDOWS)
        self.current: Array = np.zeros(size, dtype=dtype)
        self.total: Array = np.zeros(size, dtype=dtype)  # sum of the ring

    def add(self, counts: Array) -> bool:
        """Fold counts in; True when a sub-window completed (the window moved on)."""
        self.current += counts
        if self.current[ROWS] < self.sub_rows:
            return False
        if len(self.ring) == SUBWINDOWS:
            self.total -= self.ring[0]
        self.ring.append(self.current)
        self.total += self.current
        self.current = np.zeros_like(self.current)
        return True

    @property
    def full(self) -> bool:
        return len(self.ring) == SUBWINDOWS


@dataclass(slots=True)
class Judgement:
    """Drift scores of one window: per distribution (features, then outputs) and statistic."""

    rows: int
    psi: Array
    ks: Array
    js: Array
    chi2_p: float | None


@dataclass(slots=True)
class DriftEvent:
    """A distribution whose level changed (for alerts): fires when it starts and when it clears."""

    name: str
    statistic: str
    window: str
    value: float
    level: Level
    kind: Kind | None


@dataclass
class VersionMonitor:
    """Input and output distributions of one model version, with drift judged against baseline."""

    baseline: Baseline
    window_rows: int
    long_window_rows: int
    psi_warn: float
    psi_alert: float
    duplicate_memory: int = 4096
    layout: Layout = field(init=False)
    short: Window = field(init=False)
    long: Window = field(init=False)
    cumulative: Array = field(init=False)
    pending: list[tuple[Array, dict[str, Array]]] = field(default_factory=list)
    pending_rows: int = 0
    judged: dict[str, Judgement] = field(default_factory=dict)
    levels: dict[tuple[str, str, str], Level] = field(default_factory=dict)
    psi_history: deque[Array] = field(default_factory=lambda: deque(maxlen=SUBWINDOWS + 1))
    _hashes: Array = field(init=False)
    _hash_pos: int = 0
    _long_scores: Judgement | None = None
    _hash_filled: int = 0
    _multipliers: Array = field(init=False)

    def __post_init__(self) -> None:
        self.layout = Layout(self.baseline)
        self.short = Window(self.window_rows, self.layout.size)
        self.long = Window(self.long_window_rows, self.layout.size)
        self.cumulative = np.zeros(self.layout.size, dtype=np.int64)
        self._hashes = np.zeros(self.duplicate_memory, dtype=np.uint64)
        rng = np.random.default_rng(0x6D6C70)  # fixed: hashes must not depend on the run
        self._multipliers = rng.integers(
            1, 2**63, size=self.baseline.n_features, dtype=np.uint64
        ) | np.uint64(1)

    # ---------------------------------------------------------------- recording

    def record(self, x: Array, outputs: dict[str, Array]) -> list[DriftEvent]:
        """Keep a batch (O(1)); bin what is buffered once FLUSH_ROWS rows have gathered."""
        self.pending.append((x, outputs))
        self.pending_rows += x.shape[0]
        if self.pending_rows >= FLUSH_ROWS:
            return self.flush()
        return []

    def flush(self) -> list[DriftEvent]:
        """Bin every buffered row (the step function tests and readers call)."""
        if not self.pending:
            return []
        batches, self.pending, self.pending_rows = self.pending, [], 0
        x = np.concatenate([b[0] for b in batches]) if len(batches) > 1 else batches[0][0]
        outs = {
            k: (
                np.concatenate([b[1][k] for b in batches]) if len(batches) > 1 else batches[0][1][k]
            )
            for k in batches[0][1]
        }
        events: list[DriftEvent] = []
        # Fold in chunks that end exactly where the short window's sub-window ends, so that a
        # window holds exactly `window` rows when it is judged.
        start, n = 0, x.shape[0]
        while start < n:
            end = min(n, start + self.short.sub_rows - int(self.short.current[ROWS]))
            counts = self.count(x[start:end], {k: v[start:end] for k, v in outs.items()})
            self.cumulative += counts
            if self.long.add(counts) and self.long.full:
                self._long_scores = self.scores(self.long.total)  # the long window moves slowly
            if self.short.add(counts):
                events += self.judge()
            start = end
        return events

    def count(self, x: Array, outputs: dict[str, Array]) -> Array:
        b, lay = self.baseline, self.layout
        n, f = x.shape
        counts = np.zeros(lay.size, dtype=np.int64)
        counts[ROWS] = n
        idx = b.bin(x.astype(np.float64, copy=False))
        counts[OUT_OF_RANGE] = int(np.count_nonzero(idx == 0) + np.count_nonzero(idx > b.nbins))
        flat = (
            idx + np.arange(f) * b.width
        ).ravel()  # overflow sits right after each feature's bins
        counts[lay.features] = np.bincount(flat, minlength=f * b.width)
        if b.classes is not None and "label" in outputs and "probabilities" in outputs:
            labels = np.searchsorted(b.classes, outputs["label"].reshape(-1))
            labels = np.clip(labels, 0, lay.n_classes - 1)
            counts[lay.labels] = np.bincount(labels, minlength=lay.n_classes)
            assert b.prob_edges is not None
            probs = outputs["probabilities"].reshape(n, -1)[:, : lay.n_classes]
            pidx = np.clip(
                np.searchsorted(b.prob_edges[1:-1], probs, side="right"), 0, lay.prob_bins - 1
            )
            pflat = (pidx + np.arange(lay.n_classes) * lay.prob_bins).ravel()
            counts[lay.probs] = np.bincount(pflat, minlength=lay.n_classes * lay.prob_bins)
        elif b.var_edges is not None and "variable" in outputs:
            v = outputs["variable"].reshape(n, -1)[:, 0].astype(np.float64, copy=False)
            vidx = np.searchsorted(b.var_edges, v, side="right")
            counts[lay.variable] = np.bincount(vidx, minlength=lay.var_width)
        self._remember_rows(x)
        return counts

    def _remember_rows(self, x: Array) -> None:
        """Keep a 64-bit hash of each of the last `duplicate_memory` rows (vectorised)."""
        bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
        h = (bits * self._multipliers).sum(axis=1, dtype=np.uint64)
        h ^= h >> np.uint64(29)
        n = h.size
        pos = (self._hash_pos + np.arange(n)) % self.duplicate_memory
        self._hashes[pos] = h
        self._hash_filled = min(self._hash_filled + n, self.duplicate_memory)
        self._hash_pos = int((self._hash_pos + n) % self.duplicate_memory)

    @property
    def recent_rows(self) -> int:
        """Rows behind `top_share` (at most `duplicate_memory`)."""
        return self._hash_filled

    def top_share(self) -> float | None:
        """Share of the recent rows taken by the most frequent one (None before any row)."""
        if self._hash_filled == 0:
            return None
        _, counts = np.unique(self._hashes[: self._hash_filled], return_counts=True)
        return float(counts.max()) / self._hash_filled

    # ---------------------------------------------------------------- judging

    def _distributions(self, counts: Array) -> tuple[Array, Array]:
        """(expected fractions, observed counts) for every feature and output, padded to one width."""
        b, lay = self.baseline, self.layout
        w = lay.width
        feats = counts[lay.features].reshape(b.n_features, b.width)
        if w == b.width:
            exp, obs = [b.fractions], [feats]
        else:  # an output has more bins than any feature
            pad = ((0, 0), (0, w - b.width))
            exp, obs = [np.pad(b.fractions, pad)], [np.pad(feats, pad)]
        if b.classes is not None and b.label_fractions is not None and b.prob_fractions is not None:
            lab_e = np.zeros((1, w))
            lab_e[0, : lay.n_classes] = b.label_fractions
            lab_o = np.zeros((1, w), dtype=np.int64)
            lab_o[0, : lay.n_classes] = counts[lay.labels]
            pe = np.zeros((lay.n_classes, w))
            pe[:, : lay.prob_bins] = b.prob_fractions
            po = np.zeros((lay.n_classes, w), dtype=np.int64)
            po[:, : lay.prob_bins] = counts[lay.probs].reshape(lay.n_classes, lay.prob_bins)
            exp += [lab_e, pe]
            obs += [lab_o, po]
        elif b.var_fractions is not None:
            ve = np.zeros((1, w))
            ve[0, : lay.var_width] = b.var_fractions
            vo = np.zeros((1, w), dtype=np.int64)
            vo[0, : lay.var_width] = counts[lay.variable]
            exp.append(ve)
            obs.append(vo)
        return np.vstack(exp), np.vstack(obs)

    def scores(self, counts: Array) -> Judgement:
        expected, observed = self._distributions(counts)
        totals = observed.sum(axis=1, keepdims=True)
        q = np.divide(observed, totals, out=np.zeros(observed.shape), where=totals > 0)
        p_eps, q_eps = np.maximum(expected, EPS), np.maximum(q, EPS)
        psi = np.sum((q_eps - p_eps) * np.log(q_eps / p_eps), axis=1)
        ks = np.max(np.abs(np.cumsum(q, axis=1) - np.cumsum(expected, axis=1)), axis=1)
        m = (expected + q) / 2.0
        with np.errstate(divide="ignore", invalid="ignore"):
            kl_p = np.where(expected > 0, expected * np.log2(expected / m), 0.0).sum(axis=1)
            kl_q = np.where(q > 0, q * np.log2(q / m), 0.0).sum(axis=1)
        js = np.sqrt(np.maximum(0.5 * kl_p + 0.5 * kl_q, 0.0))
        chi2_p = None
        b, lay = self.baseline, self.layout
        if b.label_fractions is not None and counts[lay.labels].sum() > 0:
            chi2_p = chi_square(b.label_fractions, counts[lay.labels])[1]
        return Judgement(int(counts[ROWS]), psi, ks, js, chi2_p)

    def judge(self) -> list[DriftEvent]:
        """Score both windows (when full) and return the distributions whose level changed."""
        events: list[DriftEvent] = []
        short = self.scores(self.short.total) if self.short.full else None
        long = self._long_scores
        if short is not None:
            self.judged["short"] = short
            self.psi_history.append(short.psi.copy())
        if long is not None:
            self.judged["long"] = long
        earlier = self.psi_history[0] if len(self.psi_history) == self.psi_history.maxlen else None
        for i, name in enumerate(self.baseline.names):
            s = None if short is None else float(short.psi[i])
            lg = None if long is None else float(long.psi[i])
            level: Level = "ok"
            kind: Kind | None = None
            value = 0.0
            window = "short"
            if s is not None and s > self.psi_alert:
                level, value = "alert", s
                # Sudden: one window ago this distribution was still near its baseline.
                kind = "sudden" if earlier is None or earlier[i] <= self.psi_warn else "gradual"
            elif lg is not None and lg > self.psi_alert:
                level, value, kind, window = "alert", lg, "gradual", "long"
            elif (s is not None and s > self.psi_warn) or (lg is not None and lg > self.psi_warn):
                level, value = "warn", max(s or 0.0, lg or 0.0)
            key = (name, "psi", "any")
            if self.levels.get(key, "ok") != level:
                self.levels[key] = level
                events.append(DriftEvent(name, "psi", window, value, level, kind))
        return events

    # ---------------------------------------------------------------- reading

    def rates(self) -> dict[str, float | None]:
        """Input anomalies (None until there are rows): the share of values outside the training
        range over the short window, and the most repeated row's share of the last
        `duplicate_memory` rows (a client resending one input)."""
        t = self.short.total if self.short.full else self.cumulative
        rows = int(t[ROWS])
        if rows == 0:
            return {"out_of_range": None, "duplicates": None}
        return {
            "out_of_range": float(t[OUT_OF_RANGE]) / (rows * self.baseline.n_features),
            "duplicates": self.top_share(),
        }

    def histograms(self) -> list[dict[str, Any]]:
        """Per feature: edges, baseline fractions and the short window's fractions (for plots)."""
        b, lay = self.baseline, self.layout
        counts = self.short.total if self.short.full else self.cumulative + self.short.current * 0
        feats = counts[lay.features].reshape(b.n_features, b.width)
        total = feats.sum(axis=1, keepdims=True)
        frac = np.divide(feats, total, out=np.zeros(feats.shape), where=total > 0)
        out = []
        short = self.judged.get("short")
        for i, name in enumerate(b.names[: b.n_features]):
            out.append(
                {
                    "name": name,
                    "baseline": b.fractions[i, : int(b.nbins[i]) + 2].round(5).tolist(),
                    "live": frac[i, : int(b.nbins[i]) + 2].round(5).tolist(),
                    "psi": None if short is None else round(float(short.psi[i]), 5),
                }
            )
        return out
