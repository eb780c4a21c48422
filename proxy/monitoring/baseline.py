"""What the training data looked like (a manifest's `baseline`), and binning live values the way
packaging binned the training rows: exactly, a value on an edge in the same bin."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

Array = np.ndarray[Any, Any]


@dataclass(frozen=True, slots=True)
class Baseline:
    """What the training data looked like, from a manifest: bins and fractions per distribution."""

    names: list[str]  # features, then outputs ("label", "probabilities[k]" or "variable")
    n_features: int
    width: int  # bins per feature including under/overflow
    fractions: Array  # [F, width] baseline fractions (under/over: 0)
    classes: Array | None  # class values (classification)
    label_fractions: Array | None  # [C]
    prob_edges: Array | None  # [PB+1]
    prob_fractions: Array | None  # [C, PB]
    nbins: Array  # [F] bins per feature (the manifest's, fewer where quantiles tied)
    keys: Array  # float32 inputs: every feature's boundaries as order keys, one increasing array
    lanes: Array  # [F] uint64: feature i's index in the high half of its keys
    shift: Array  # [F] from a position in `keys` to the feature's slot in a flat count vector
    under: Array  # [F] where each feature's underflow is counted in the flat feature counts
    over: Array  # [F] and its overflow (right after its bins)
    edges64: list[Array]  # other inputs: per feature [min, inner edges, the float after max]
    var_edges: Array | None = None  # regression output: its edges, the last nudged up
    var_fractions: Array | None = None  # [B + 2]: underflow 0, its bins, overflow 0
    prob_inner: Array | None = None  # prob_edges without the first and last

    @classmethod
    def from_manifest(cls, raw: dict[str, Any]) -> Baseline | None:
        base = raw.get("baseline")
        if not isinstance(base, dict) or not base.get("features"):
            return None
        feats = base["features"]
        bounds = _FeatureBounds.of(feats)
        outs = _Outputs.of(base.get("outputs", {}))
        n, width = len(feats), bounds.width
        return cls(
            names=[f["name"] for f in feats] + outs.names(),
            n_features=n,
            width=width,
            fractions=bounds.fractions,
            classes=outs.classes,
            label_fractions=outs.label_fractions,
            prob_edges=outs.prob_edges,
            prob_fractions=outs.prob_fractions,
            nbins=bounds.nbins,
            keys=np.concatenate(bounds.keys),
            lanes=bounds.lanes,
            shift=bounds.offsets - np.arange(n) * width,
            under=np.arange(n) * width,
            over=np.arange(n) * width + bounds.nbins + 1,
            edges64=bounds.edges64,
            var_edges=outs.var_edges,
            var_fractions=outs.var_fractions,
            prob_inner=None if outs.prob_edges is None else outs.prob_edges[1:-1].copy(),
        )

    def bin(self, x: Array) -> Array:
        """Where every value of x [n, F] is counted: feature i's bin j is at i * width + j, with
        j = 0 the underflow, 1..B the feature's bins and B+1 the overflow. Exact: a value on an
        edge is counted where packaging counted the training rows.

        float32 rows (ONNX models' usual input) take one searchsorted for all features: each
        value becomes a uint64 whose high half is its feature and whose low half orders like
        the float, and the boundaries are keyed alike. Other dtypes take one per feature.
        """
        if x.dtype == np.float32:
            k = order_keys(np.ascontiguousarray(x)).astype(np.uint64)
            k |= self.lanes
            pos: Array = np.searchsorted(self.keys, k.ravel(), side="right").reshape(x.shape)
            pos -= self.shift
            return pos
        out = np.empty(x.shape, dtype=np.int64)
        for i, bounds in enumerate(self.edges64):
            col = x[:, i].astype(np.float64, copy=False)
            out[:, i] = np.searchsorted(bounds, col, side="right") + self.under[i]
        return out


@dataclass(frozen=True, slots=True)
class _FeatureBounds:
    """The manifest's features as binning needs them: fractions, and bounds keyed two ways."""

    width: int
    fractions: Array  # [F, width]
    nbins: Array  # [F]
    lanes: Array  # [F] uint64
    keys: list[Array]  # per feature: its float32 boundaries' order keys, in its lane
    offsets: Array  # [F] where each feature's keys start in their concatenation
    edges64: list[Array]

    @classmethod
    def of(cls, feats: list[dict[str, Any]]) -> _FeatureBounds:
        n = len(feats)
        width = max(len(f["edges"]) - 1 for f in feats) + 2
        fractions = np.zeros((n, width))
        nbins = np.zeros(n, dtype=np.int64)
        lanes = np.arange(n, dtype=np.uint64) << np.uint64(32)  # high half of a feature's keys
        keys: list[Array] = []
        edges64: list[Array] = []
        offsets = np.zeros(n, dtype=np.int64)
        for i, f in enumerate(feats):
            edges = np.asarray(f["edges"], dtype=np.float64)
            fr = np.asarray(f["fractions"], dtype=np.float64)
            fractions[i, 1 : 1 + fr.size] = fr  # underflow 0, bins, overflow (then zero padding)
            nbins[i] = fr.size
            # A value v is in bin searchsorted(bounds, v, side="right") of bounds = [min, the
            # inner edges, the float after max]: 0 below min, B + 1 above max (as packaging bins).
            lo, hi = float(f["min"]), float(f["max"])
            bounds = np.concatenate([[lo], edges[1:-1], [np.nextafter(hi, np.inf)]])
            edges64.append(bounds)
            first32 = [f32_at_least(e) for e in bounds[:-1]] + [f32_above(hi)]
            offsets[i] = sum(k.size for k in keys)
            keys.append(
                order_keys(np.array(first32, dtype=np.float32)).astype(np.uint64) | lanes[i]
            )
        return cls(
            width=width,
            fractions=fractions,
            nbins=nbins,
            lanes=lanes,
            keys=keys,
            offsets=offsets,
            edges64=edges64,
        )


@dataclass(frozen=True, slots=True)
class _Outputs:
    """The manifest's output baseline: class labels and probabilities, or a regression variable."""

    classes: Array | None = None
    label_fractions: Array | None = None
    prob_edges: Array | None = None
    prob_fractions: Array | None = None
    var_edges: Array | None = None
    var_fractions: Array | None = None

    @classmethod
    def of(cls, outs: dict[str, Any]) -> _Outputs:
        if "label" in outs:
            return cls(
                classes=np.asarray(outs["label"]["classes"]),
                label_fractions=np.asarray(outs["label"]["fractions"], dtype=np.float64),
                prob_edges=np.asarray(outs["probabilities"]["edges"], dtype=np.float64),
                prob_fractions=np.asarray(outs["probabilities"]["fractions"], dtype=np.float64),
            )
        var = outs.get("variable")
        if not isinstance(var, dict):
            return cls()
        var_edges = np.asarray(var["edges"], dtype=np.float64)
        var_edges[-1] = np.nextafter(var_edges[-1], np.inf)  # the maximum itself is in range
        var_fr = np.concatenate([[0.0], np.asarray(var["fractions"], dtype=np.float64), [0.0]])
        return cls(var_edges=var_edges, var_fractions=var_fr)

    def names(self) -> list[str]:
        """The outputs' distribution names, after the features'."""
        if self.classes is not None and self.prob_fractions is not None:
            return ["label"] + [f"probabilities[{c}]" for c in self.classes.tolist()]
        if self.var_edges is not None:
            return ["variable"]
        return []


SIGN = np.uint32(0x80000000)


def order_keys(v: Array) -> Array:
    """float32 -> uint32 that sorts like the floats (negatives flipped below the positives;
    -0.0 just below +0.0, which `f32_at_least` accounts for)."""
    negative = (v.view(np.int32) >> 31).view(np.uint32)  # all ones where the sign bit is set
    keys: Array = v.view(np.uint32) ^ (negative | SIGN)
    return keys


def f32_at_least(e: float) -> np.float32:
    """The smallest float32 g with g >= e: for every float32 v, v >= e exactly when v >= g."""
    with np.errstate(over="ignore"):
        g = np.float32(e)
    if float(g) < e:
        g = np.nextafter(g, np.float32(np.inf))
    return np.float32(-0.0) if g == 0 else g  # -0.0 >= 0.0 too: the lower of the two keys


def f32_above(e: float) -> np.float32:
    """The smallest float32 g with g > e: for every float32 v, v > e exactly when v >= g."""
    g = f32_at_least(e)
    if float(g) <= e:
        g = np.nextafter(g, np.float32(np.inf))
    return g
