"""The config schema: one frozen dataclass per table of config.toml, field = TOML key.

A default lives here and nowhere else: parsers read a missing key's default off the dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple


class VersionKey(NamedTuple):
    """One version of one model: the identity every per-version record is kept under."""

    model: str
    version: str

    def __str__(self) -> str:
        return f"{self.model}/{self.version}"


MODES = ("single", "canary", "shadow", "blue_green")


Mode = Literal["single", "canary", "shadow", "blue_green"]


@dataclass(frozen=True, slots=True)
class VersionConfig:
    """One version of a model: a local directory (`path`) or a remote server (`url`)."""

    name: str
    path: Path | None = None
    url: str | None = None
    timeout_ms: float = 1000.0
    baseline: Path | None = None  # url versions: a manifest.json whose baseline they are watched on


@dataclass(frozen=True, slots=True)
class GatesConfig:
    """[models.X.canary] gates: what the canary's recent traffic must show to go on."""

    max_error_rate: float | None = None
    max_p99_ms: float | None = None
    min_agreement: float | None = None
    min_requests: int = 50
    max_psi: float | None = None  # the canary's worst drift (short window, features and outputs)

    @property
    def any(self) -> bool:
        gates = (self.max_error_rate, self.max_p99_ms, self.min_agreement, self.max_psi)
        return any(g is not None for g in gates)


@dataclass(frozen=True, slots=True)
class CanaryConfig:
    """[models.X.canary]: a weighted split, optionally stepped up while the gates hold."""

    weights: dict[str, float]
    steps: tuple[float, ...] = ()
    step_interval_s: float = 60.0
    gates: GatesConfig = field(default_factory=GatesConfig)
    canary: str | None = None  # the version being rolled out, when steps or gates are set


@dataclass(frozen=True, slots=True)
class ShadowConfig:
    """[models.X.shadow]: the primary answers; mirrors get a copy of `sample` of the requests."""

    primary: str
    mirrors: tuple[str, ...]
    sample: float = 1.0
    queue_rows: int = 1024
    timeout_ms: float = 1000.0
    breaker_failures: int = 5
    breaker_pause_s: float = 10.0


@dataclass(frozen=True, slots=True)
class BlueGreenConfig:
    """[models.X.blue_green]"""

    blue: str
    green: str
    active: Literal["blue", "green"]

    @property
    def active_version(self) -> str:
        return self.blue if self.active == "blue" else self.green

    @property
    def standby_version(self) -> str:
        return self.green if self.active == "blue" else self.blue


@dataclass(frozen=True, slots=True)
class DriftConfig:
    """[models.X.drift]"""

    window: int = 2000
    long_window: int = 50000
    psi_warn: float = 0.1
    psi_alert: float = 0.25
    enabled: bool = True
    accuracy_margin: float = 0.05  # concept drift: alert when accuracy < holdout - margin
    min_feedback: int = 100  # labelled rows a window needs before its accuracy is judged
    predictions: int = 100_000  # predictions kept for feedback to join (oldest dropped)
    mae_margin: float = 0.5  # regression: alert when MAE > holdout MAE * (1 + margin)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """[models.X]"""

    name: str
    mode: Mode
    stable: str
    versions: dict[str, VersionConfig]
    sticky_key: str | None = None
    canary: CanaryConfig | None = None
    shadow: ShadowConfig | None = None
    blue_green: BlueGreenConfig | None = None
    drift: DriftConfig = field(default_factory=DriftConfig)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """[server]: where the data plane listens."""

    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    max_body_bytes: int = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """[admin]: the admin API, /metrics and the dashboard."""

    host: str = "127.0.0.1"
    port: int = 8081
    token_env: str = "MLPROXY_ADMIN_TOKEN"


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """[limits]: load shedding."""

    max_inflight: int = 512
    queue_timeout_ms: float = 100.0
    adaptive: bool = True


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    """[batching]: the micro-batcher in front of each local ONNX version."""

    max_batch_size: int = 64
    max_delay_ms: float = 1.0
    inline_max_us: float = 50.0


@dataclass(frozen=True, slots=True)
class AlertsConfig:
    """[alerts]"""

    webhook: str = ""
    overload_lag_ms: float = 100.0  # event-loop lag that, held for overload_for_s, raises overload
    overload_for_s: float = 5.0


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated config file."""

    server: ServerConfig
    admin: AdminConfig
    limits: LimitsConfig
    batching: BatchingConfig
    alerts: AlertsConfig
    models: dict[str, ModelConfig]
    source: str = "config.toml"
    digest: str = ""
