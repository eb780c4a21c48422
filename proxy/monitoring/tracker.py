"""Streaming histograms of one version's inputs and outputs, in sliding windows, judged for drift.

Everything is a numpy count vector: no row is kept. Rows are buffered (a list of the batches'
own arrays, at most FLUSH_ROWS or half a window) and then binned in bulk: one pass of numpy
calls for all features and every complete sub-window among them, on the manifest baseline's
bins (baseline.py: plus an underflow and an overflow bin, a value binned exactly as packaging
binned the training rows). Two sliding windows (`window` and `long_window` rows) are rings of
sub-window count vectors. Each time the short window moves on a sub-window, every feature and
output gets its PSI against the baseline in both windows; KS, JS and chi-square are computed
when a reader asks (drift.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from proxy.monitoring.baseline import Baseline
from proxy.monitoring.drift import Judgement

Array = np.ndarray[Any, Any]
SUBWINDOWS = 10  # a window is a ring of this many sub-windows
FLUSH_ROWS = 1024  # rows buffered before they are binned (amortises numpy's per-call cost)
Level = Literal["ok", "warn", "alert"]
Kind = Literal["sudden", "gradual"]
# How a monitor gets its counts (`workers = N`, DESIGN section 7): "local" bins the rows it
# records and judges its windows (one process); "worker" bins rows into `cumulative` only (its
# supervisor pools every worker's and judges); "pooled" records no rows: `advance` is given the
# group's cumulative counts and judges windows made of them.
Role = Literal["local", "worker", "pooled"]

# Layout of the scalar counters at the start of every count vector.
ROWS, OUT_OF_RANGE, N_SCALARS = 0, 1, 2


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
        self.prob_offsets = np.arange(c) * pb  # class k's probability bins start here
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
    role: Role = "local"
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
    _due: int = FLUSH_ROWS  # buffered rows that make `record` bin them (see __post_init__)

    def __post_init__(self) -> None:
        self.layout = Layout(self.baseline)
        # pooled windows are made of shares of an interval's counts (`advance`): fractional
        dtype = np.float64 if self.role == "pooled" else np.int64
        self.short = Window(self.window_rows, self.layout.size, dtype)
        self.long = Window(self.long_window_rows, self.layout.size, dtype)
        self.cumulative = np.zeros(self.layout.size, dtype=np.int64)
        # Bin once FLUSH_ROWS rows wait, or half a window's (a judgement is never later than that)
        self._due = max(1, min(FLUSH_ROWS, self.window_rows // 2))
        self._hashes = np.zeros(self.duplicate_memory, dtype=np.uint64)
        rng = np.random.default_rng(0x6D6C70)  # fixed: hashes must not depend on the run
        self._multipliers = rng.integers(
            1, 2**63, size=self.baseline.n_features, dtype=np.uint64
        ) | np.uint64(1)

    # ---------------------------------------------------------------- recording

    def record(self, x: Array, outputs: dict[str, Array]) -> list[DriftEvent]:
        """Keep a batch (O(1)). Once FLUSH_ROWS rows (or half a window's) are buffered, the
        complete sub-windows among them are binned in one pass and judged in turn."""
        self.pending.append((x, outputs))
        self.pending_rows += x.shape[0]
        if self.pending_rows >= self._due:
            return self._fold(keep_tail=True)
        return []

    def flush(self) -> list[DriftEvent]:
        """Bin every buffered row (the step function tests and readers call)."""
        return self._fold(keep_tail=False)

    def _fold(self, keep_tail: bool) -> list[DriftEvent]:
        if not self.pending:
            return []
        batches = self.pending
        x = np.concatenate([b[0] for b in batches]) if len(batches) > 1 else batches[0][0]
        outs = {
            k: (
                np.concatenate([b[1][k] for b in batches]) if len(batches) > 1 else batches[0][1][k]
            )
            for k in batches[0][1]
        }
        events: list[DriftEvent] = []
        # Fold in chunks that end exactly where the short window's sub-window ends, so that a
        # window holds exactly `window` rows when it is judged. With `keep_tail`, a last chunk
        # that neither completes a sub-window nor reaches FLUSH_ROWS waits for the next batches.
        lengths: list[int] = []
        start, n, filled = 0, x.shape[0], int(self.short.current[ROWS])
        while start < n:
            need = self.short.sub_rows - filled
            end = min(n, start + need)
            if keep_tail and end - start < need and end - start < FLUSH_ROWS:
                break
            lengths.append(end - start)
            filled = 0 if end - start == need else filled + end - start
            start = end
        if lengths:  # every chunk binned in one pass, then folded in turn
            for counts in self.count(x[:start], {k: v[:start] for k, v in outs.items()}, lengths):
                self.cumulative += counts
                if self.role == "worker":
                    continue  # the supervisor judges the pooled counts
                if self.long.add(counts) and self.long.full:
                    self._long_scores = self.scores(self.long.total)  # moves slowly
                if self.short.add(counts):
                    events += self.judge()
        if start < n:
            self.pending = [(x[start:], {k: v[start:] for k, v in outs.items()})]
            self.pending_rows = n - start
        else:
            self.pending, self.pending_rows = [], 0
        return events

    def advance(self, total: Array) -> list[DriftEvent]:
        """A pooled monitor's step: `total` is the group's cumulative counts now (every
        worker's `cumulative`, summed); what they grew by since the last step is folded into
        the windows in shares that end where each sub-window ends, so a window still holds
        `window` rows when it is judged. Rows within one step are taken as alike (their
        order inside the interval is not known). Judges each sub-window that completes."""
        delta = (total - self.cumulative).astype(np.float64)
        if delta[ROWS] < 0 or (delta < 0).any():
            self.cumulative = total.copy()  # a worker started over (not ours to judge twice)
            return []
        self.cumulative = total.copy()
        events: list[DriftEvent] = []
        rows = float(delta[ROWS])
        # A step that holds more than a short window's worth: what the ring would push out
        # again before judging goes to the long window in one share.
        skip = rows - (SUBWINDOWS + 1) * self.short.sub_rows
        if skip > 0:
            share = delta * (skip / rows)
            share[ROWS] = skip
            self.long.add(share)
            delta -= share
            rows -= skip
        while rows > 0:
            need = self.short.sub_rows - float(self.short.current[ROWS])
            take = min(need, rows)
            share = delta * (take / rows)
            share[ROWS] = take
            delta -= share
            delta[ROWS] = rows = rows - take
            if self.long.add(share) and self.long.full:
                self._long_scores = self.scores(self.long.total)
            if self.short.add(share):
                events += self.judge()
        return events

    def count(self, x: Array, outputs: dict[str, Array], lengths: list[int]) -> Array:
        """Count vectors [len(lengths), size] of consecutive chunks of x's rows, in one pass:
        chunk j's bins are offset by j distributions' worth, so one bincount counts them all."""
        b, lay = self.baseline, self.layout
        n, f = x.shape
        k = len(lengths)
        chunk = np.repeat(np.arange(k), lengths)[:, None]  # [n, 1]: each row's chunk
        counts = np.zeros((k, lay.size), dtype=np.int64)
        counts[:, ROWS] = lengths
        span = f * b.width
        feats = np.bincount((b.bin(x) + chunk * span).ravel(), minlength=k * span)
        feats = feats.reshape(k, span)
        counts[:, lay.features] = feats
        counts[:, OUT_OF_RANGE] = feats[:, b.under].sum(axis=1) + feats[:, b.over].sum(axis=1)
        if b.classes is not None and "label" in outputs and "probabilities" in outputs:
            c, pb = lay.n_classes, lay.prob_bins
            # searchsorted gives 0..C: an unknown label above the last class counts as the last
            labels = np.searchsorted(b.classes, outputs["label"].reshape(-1))
            np.minimum(labels, c - 1, out=labels)
            labels += chunk[:, 0] * c
            counts[:, lay.labels] = np.bincount(labels, minlength=k * c).reshape(k, c)
            assert b.prob_inner is not None
            probs = outputs["probabilities"].reshape(n, -1)[:, :c]
            # on the inner edges: 0..PB-1, values outside [0, 1] in the first or last bin
            pidx = np.searchsorted(b.prob_inner, probs, side="right")
            pflat = (pidx + lay.prob_offsets + chunk * (c * pb)).ravel()
            counts[:, lay.probs] = np.bincount(pflat, minlength=k * c * pb).reshape(k, c * pb)
        elif b.var_edges is not None and "variable" in outputs:
            v = outputs["variable"].reshape(n, -1)[:, 0].astype(np.float64, copy=False)
            vidx = np.searchsorted(b.var_edges, v, side="right") + chunk[:, 0] * lay.var_width
            vw = lay.var_width
            counts[:, lay.variable] = np.bincount(vidx, minlength=k * vw).reshape(k, vw)
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
            lab_o = np.zeros((1, w), dtype=counts.dtype)
            lab_o[0, : lay.n_classes] = counts[lay.labels]
            pe = np.zeros((lay.n_classes, w))
            pe[:, : lay.prob_bins] = b.prob_fractions
            po = np.zeros((lay.n_classes, w), dtype=counts.dtype)
            po[:, : lay.prob_bins] = counts[lay.probs].reshape(lay.n_classes, lay.prob_bins)
            exp += [lab_e, pe]
            obs += [lab_o, po]
        elif b.var_fractions is not None:
            ve = np.zeros((1, w))
            ve[0, : lay.var_width] = b.var_fractions
            vo = np.zeros((1, w), dtype=counts.dtype)
            vo[0, : lay.var_width] = counts[lay.variable]
            exp.append(ve)
            obs.append(vo)
        return np.vstack(exp), np.vstack(obs)

    def scores(self, counts: Array) -> Judgement:
        expected, observed = self._distributions(counts)
        b, lay = self.baseline, self.layout
        labels = None if b.label_fractions is None else counts[lay.labels].copy()
        return Judgement(round(counts[ROWS]), expected, observed, b.label_fractions, labels)

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
        counts = self.short.total if self.short.full else self.cumulative
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
