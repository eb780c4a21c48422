"""What the Prometheus collectors read at scrape time: plain snapshots of the live state, built by
http/views.py (so this module and the views need no metrics library)."""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.engine.stats import LatencyHistogram, VersionStats
from proxy.models.backends import BackendKind
from proxy.models.remote import UpstreamHealth
from proxy.monitoring.drift import Judgement


@dataclass(frozen=True, slots=True)
class VersionView:
    """One served version as the exporter sees it."""

    model: str
    version: str
    kind: BackendKind
    weight: float
    stats: VersionStats
    batches: int = 0
    batch_rows: int = 0
    queue_depth: int = 0
    shed: int = 0
    fallbacks: int = 0
    available: bool = True
    upstream: UpstreamHealth | None = None  # a remote version's health


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything exported, read at scrape time."""

    versions: list[VersionView]
    inflight: int
    shed: int
    config_loaded_at: float
    reloads: dict[str, int] = field(default_factory=dict)
    rollouts: dict[str, str] = field(default_factory=dict)
    alerts: int = 0
    config_ok: bool = True
    admission_limit: int = 0
    admission_waiting: int = 0
    refused: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MonitorView:
    """What monitoring knows of one version, as the exporter sees it."""

    model: str
    version: str
    names: list[str]
    short: Judgement | None
    long: Judgement | None
    levels: dict[str, int]  # 0 ok, 1 warn, 2 alert, per feature or output
    out_of_range: float | None
    duplicates: float | None
    accuracy_short: float | None
    accuracy_long: float | None
    holdout_accuracy: float | None
    mae_short: float | None
    mae_long: float | None
    holdout_mae: float | None
    queue_wait: LatencyHistogram | None
    batch_rows: dict[int, int]


@dataclass(frozen=True, slots=True)
class MonitorSnapshot:
    versions: list[MonitorView]
    loop_lag_s: float
    loop_busy: float
    nonfinite: dict[str, int]
    feedback: dict[tuple[str, str], int]
    webhook: dict[str, int]
    open_alerts: dict[str, int]
