"""mlproxy's own counters around a measurement: batches, rows per batch, mirrors, sheds."""

from __future__ import annotations

from typing import Any

MIRROR_COUNTERS = ("sent", "dropped", "yielded", "failed", "compared")


def _version_summary(doc: dict[str, Any], prev: dict[str, Any]) -> dict[str, Any]:
    b = doc.get("batching") or {}
    pb = prev.get("batching") or {}
    batches = (b.get("batches") or 0) - (pb.get("batches") or 0)
    rows = (b.get("batches") or 0) * (b.get("mean_rows") or 0) - (pb.get("batches") or 0) * (
        pb.get("mean_rows") or 0
    )
    mirror = doc.get("mirror") or {}
    pmirror = prev.get("mirror") or {}
    out: dict[str, Any] = {
        "requests": doc["requests"] - prev.get("requests", 0),
        "errors": doc["errors"] - prev.get("errors", 0),
        "batches": batches,
        "mean_rows_per_batch": round(rows / batches, 2) if batches else None,
        "max_rows": b.get("max_rows"),
        "queue_shed": (b.get("shed") or 0) - (pb.get("shed") or 0),
    }
    for k in MIRROR_COUNTERS:
        out[f"mirror_{k}"] = (mirror.get(k) or 0) - (pmirror.get(k) or 0)
    out["mirror_agreement"] = mirror.get("agreement")
    return out


def batching_summary(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any]:
    """Per version: batches, mean rows per batch, mirror counters; `after - before` if given."""
    if after is None:
        return {}
    versions_after = after["models"]["cancer"]["versions"]
    versions_before = before["models"]["cancer"]["versions"] if before else {}
    out: dict[str, Any] = {
        v: _version_summary(doc, versions_before.get(v, {})) for v, doc in versions_after.items()
    }
    out["_shed_503"] = after.get("shed", 0) - (before.get("shed", 0) if before else 0)
    return out


def merge_summaries(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum per-round batching summaries (counters add up; means and maxima are recomputed)."""
    out: dict[str, Any] = {}
    for part in parts:
        for v, s in part.items():
            if v.startswith("_"):
                out[v] = out.get(v, 0) + s
                continue
            acc = out.setdefault(v, {k: 0 for k in s} | {"_rows": 0.0})
            for k, value in s.items():
                if k in ("mean_rows_per_batch", "mirror_agreement"):
                    continue
                if k == "max_rows":
                    acc[k] = max(acc[k] or 0, value or 0)
                else:
                    acc[k] += value or 0
            acc["_rows"] += (s["batches"] or 0) * (s["mean_rows_per_batch"] or 0)
            acc["mirror_agreement"] = s.get("mirror_agreement")
    for v, acc in out.items():
        if not v.startswith("_"):
            rows = acc.pop("_rows")
            acc["mean_rows_per_batch"] = round(rows / acc["batches"], 2) if acc["batches"] else None
    return out


def format_summary(name: str, phase: str, summary: dict[str, Any]) -> list[str]:
    """Markdown list lines, one per version this mode used, and the 503 sheds."""
    lines = []
    for v, s in summary.items():
        if v.startswith("_") or not (s["requests"] or s["batches"] or s["mirror_sent"]):
            continue  # a version this mode does not use
        line = (
            f"- {name} / {v} ({phase}): {s['requests']} requests answered,"
            f" {s['batches']} batches, mean {s['mean_rows_per_batch']} rows/batch"
            f" (max {s['max_rows']}), {s['queue_shed']} shed in queue, {s['errors']} errors"
        )
        if s["mirror_sent"] or s["mirror_dropped"] or s["mirror_yielded"]:
            line += (
                f"; mirror: {s['mirror_sent']} rows sent, {s['mirror_dropped']} dropped,"
                f" {s['mirror_yielded']} yielded to a busy loop,"
                f" {s['mirror_failed']} failed, {s['mirror_compared']} compared,"
                f" agreement {s['mirror_agreement']}"
            )
        lines.append(line)
    lines.append(f"- {name} ({phase}): {summary.get('_shed_503', 0)} requests shed with 503")
    return lines
