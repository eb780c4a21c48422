"""The config schema: one frozen dataclass per table of config.toml, field = TOML key.

A default lives here and nowhere else: parsers read a missing key's default off the dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple


class VersionKey(NamedTuple):
    """One version of one model: the identity every per-version record is kept under."""

    # The model's name, the X of [models.X].
    model: str
    # The version's name, the V of [models.X.versions.V].
    version: str

    def __str__(self) -> str:
        return f"{self.model}/{self.version}"


MODES = ("single", "canary", "shadow", "blue_green")


Mode = Literal["single", "canary", "shadow", "blue_green"]


@dataclass(frozen=True, slots=True, kw_only=True)
class VersionConfig:
    """[models.X.versions.V]: one version of a model, a local directory (`path`) or a remote
    server (`url`); usually written inline: `v1 = { path = "models/cancer/v1" }`.
    """

    # (derived) The version's name: the key V under [models.X.versions].
    name: str
    # A local version: the directory holding model.onnx and manifest.json, relative to the
    # config file's directory. Exactly one of `path` and `url` is given.
    path: Path | None = None
    # A remote version: an Open Inference Protocol server's model URL,
    # http(s)://host:port/v2/models/<name> (a trailing / is dropped). Exactly one of `path`
    # and `url` is given.
    url: str | None = None
    # Remote versions: an inference call that takes longer fails (504, or the stable version
    # answers instead). Must be > 0.
    timeout_ms: float = 1000.0
    # Remote (`url`) versions only: a manifest.json as `mlproxy package` writes it, relative to
    # the config file's directory; the version is then watched for drift and concept drift on
    # its baseline like a local one (checked at load: readable JSON whose baseline.features is as
    # long as the remote model's input).
    baseline: Path | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class GatesConfig:
    """[models.X.canary.gates]: what the canary's traffic since its step began must show to go
    on; usually written inline: `gates = { max_error_rate = 0.01, max_p99_ms = 25 }`. Any gate
    that fails rolls the canary back to 0% at once; with gates but no steps, the split stays put
    and the gates only guard it.
    """

    # Fail when the canary's errors / requests is above this fraction (0..1). Unset: not judged.
    max_error_rate: float | None = None
    # Fail when the canary's p99 latency (ms) is above this (> 0). Unset: not judged.
    max_p99_ms: float | None = None
    # Fail when the canary's labels agree with the stable version's on less than this fraction
    # (0..1) of compared rows. Setting it mirrors every request the canary answers to the stable
    # version (in the background, like shadow traffic) to compare their answers; it waits for
    # `min_requests` compared answers. Unset: not judged.
    min_agreement: float | None = None
    # Requests the canary must have answered in the current step (and compared answers, for
    # `min_agreement`) before any gate is judged; until then the rollout waits, it never passes
    # by default. Must be > 0.
    min_requests: int = 50
    # Fail when the canary's most drifted feature or output (PSI over its short drift window)
    # is above this (> 0); waits until that window is full. Needs a local canary with a baseline
    # in its manifest and drift.enabled (checked at load). Unset: not judged.
    max_psi: float | None = None

    @property
    def any(self) -> bool:
        gates = (self.max_error_rate, self.max_p99_ms, self.min_agreement, self.max_psi)
        return any(g is not None for g in gates)


@dataclass(frozen=True, slots=True, kw_only=True)
class CanaryConfig:
    """[models.X.canary]: a weighted split, optionally stepped up while the gates hold.

    A progressive (`steps`) or gated canary splits between `stable` and exactly one other
    version (checked).
    """

    # Required. Relative weight per version, e.g. { v1 = 90, v2 = 10 }: non-negative numbers,
    # normalised to shares; 0 is allowed, at least one must be > 0; each names a version.
    weights: dict[str, float]
    # Progressive rollout: the canary's percentage at each step, increasing, each in (0, 100],
    # e.g. [25, 50, 100]. Once the last step has held its gates, the canary is promoted to 100%.
    # Empty: the split stays as `weights` say.
    steps: tuple[float, ...] = ()
    # How long (s) each step must hold its gates before the next. Needs `steps`; must be > 0.
    step_interval_s: float = 60.0
    # The rollout's gates (a table, see [models.X.canary.gates]).
    gates: GatesConfig = field(default_factory=GatesConfig)
    # (derived) The version being rolled out (the one that is not stable), when steps or gates
    # are set; None for a plain split.
    canary: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ShadowConfig:
    """[models.X.shadow]: the primary answers; mirrors get a copy of `sample` of the requests.

    A mirror never slows or breaks the primary's answer: its rows wait in a bounded queue and
    run in the background, and its answers are only compared with the primary's.
    """

    # Required. The version that answers.
    primary: str
    # Required. Versions that get a copy of the requests; not the primary, none twice.
    mirrors: tuple[str, ...]
    # Fraction (0..1) of requests mirrored.
    sample: float = 1.0
    # Rows waiting for a mirror at most; more are dropped and counted. Must be > 0.
    queue_rows: int = 1024
    # A remote mirror's batch slower than this fails (counted). A local mirror has no timeout:
    # it runs on an idle-priority thread and sheds rows from its full queue instead. Must be > 0.
    timeout_ms: float = 1000.0
    # Failed mirror batches in a row that pause the mirror (its circuit breaker). Must be > 0.
    breaker_failures: int = 5
    # How long (s) a paused mirror drops all its rows before it is tried again. Must be >= 0.
    breaker_pause_s: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class BlueGreenConfig:
    """[models.X.blue_green]: two loaded, warm versions, one of them live."""

    # Required. One of the two versions.
    blue: str
    # Required. The other version (not the same as `blue`).
    green: str
    # "blue" or "green": which of the two serves; the other stays loaded and warm.
    active: Literal["blue", "green"] = "blue"

    @property
    def active_version(self) -> str:
        return self.blue if self.active == "blue" else self.green

    @property
    def standby_version(self) -> str:
        return self.green if self.active == "blue" else self.blue


@dataclass(frozen=True, slots=True, kw_only=True)
class DriftConfig:
    """[models.X.drift]: how a model's versions are watched for data and concept drift."""

    # Rows in the short sliding window (sudden change): inputs and outputs against the baseline,
    # and accuracy on fed-back labels. Must be >= 10.
    window: int = 2000
    # Rows in the long sliding window (gradual change). Must be >= `window`.
    long_window: int = 50000
    # A feature or output whose PSI (in either window) is above this is at level warn (> 0).
    psi_warn: float = 0.1
    # A PSI above this raises a drift alert (must be >= `psi_warn`).
    psi_alert: float = 0.25
    # false turns off histograms, drift, input anomalies and the prediction store for the model
    # (feedback is then refused with 400).
    enabled: bool = True
    # Concept drift: a concept_drift alert fires when the short window's accuracy on fed-back
    # labels falls below the manifest's holdout accuracy minus this (>= 0).
    accuracy_margin: float = 0.05
    # Labelled rows a window needs before its accuracy (or MAE) is judged (> 0).
    min_feedback: int = 100
    # Predictions kept per model for feedback to join (oldest dropped, counted) (> 0).
    predictions: int = 100_000
    # Concept drift of a regression model: the alert fires when its short-window MAE on fed-back
    # values exceeds the manifest's holdout MAE x (1 + this) (>= 0).
    mae_margin: float = 0.5


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    """[models.X]: one model, served at /v2/models/X/infer.

    Every version it lists is loaded, checked and warmed at start whatever the mode, so that
    switching mode is a one-line edit; all versions must take the same input (checked at load).
    """

    # (derived) The model's name: the key X of [models.X]; letters, digits, '-', '_' and '.'.
    name: str
    # "single", "canary", "shadow" or "blue_green": which strategy is in force; its table must
    # exist, the others may stay in the file.
    mode: Mode = "single"
    # Required. The proven version: it serves in single mode, and canary rollback and fallback
    # send traffic back to it.
    stable: str
    # Required. The model's versions, at least one (a table of [models.X.versions.V] tables).
    versions: dict[str, VersionConfig]
    # A request header (case-insensitive): in a canary split, the same value always gets the
    # same version (weighted rendezvous hashing). Unset: each request is drawn at random.
    sticky_key: str | None = None
    # The canary table (see [models.X.canary]); needed when mode = "canary".
    canary: CanaryConfig | None = None
    # The shadow table (see [models.X.shadow]); needed when mode = "shadow".
    shadow: ShadowConfig | None = None
    # The blue-green table (see [models.X.blue_green]); needed when mode = "blue_green".
    blue_green: BlueGreenConfig | None = None
    # Monitoring settings (see [models.X.drift]); all keys have defaults.
    drift: DriftConfig = field(default_factory=DriftConfig)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """[server]: where the data plane listens. A reload cannot change it: restart."""

    # The data plane's address.
    host: str = "127.0.0.1"
    # The data plane's port (0..65535).
    port: int = 8080
    # Processes sharing the port (0: one per usable CPU; >= 0). Other values than 1 run a
    # supervisor and N workers only with MLPROXY_PREVIEW_WORKERS=1 set (a preview, see
    # docs/scaling.md); without it they are accepted, warned about, and served by one process.
    workers: int = 1
    # Larger request bodies get 413 (checked on Content-Length and while reading a chunked
    # body). Must be > 0.
    max_body_bytes: int = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminConfig:
    """[admin]: the admin API, /metrics and the dashboard, on their own port. A reload cannot
    change it: restart.
    """

    # The admin plane's address. With no token set, POST /admin/* is refused (403) unless this
    # is a loopback address.
    host: str = "127.0.0.1"
    # The admin plane's port (0..65535).
    port: int = 8081
    # The environment variable holding the admin token: when it is set, every POST /admin/*
    # needs "Authorization: Bearer <token>" (401 otherwise).
    token_env: str = "MLPROXY_ADMIN_TOKEN"


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsConfig:
    """[limits]: admission (load shedding), timeouts and connection limits, per process."""

    # Requests admitted at once (the adaptive limit's ceiling); past it a request waits, before
    # its body is decoded, for a slot, and is shed with 503 + Retry-After once it waited
    # queue_timeout_ms. Must be > 0.
    max_inflight: int = 512
    # A request that waited this long (ms) since it arrived (parsed off its connection) for an
    # admission slot, or for a model run, is shed with 503. Must be > 0.
    queue_timeout_ms: float = 100.0
    # Adapt the admission limit to the event loop's lag (cut x0.8 while the loop runs more than
    # 1 ms late under open-loop load, grow by sqrt(limit) while used), between 64 (one full
    # micro-batch) and max_inflight; max_inflight while clients are held (closed loop); false:
    # the limit is max_inflight.
    adaptive: bool = True
    # A connection that started a request's headers and did not finish them in this long (s) is
    # answered 408 and closed. Must be > 0.
    header_timeout_s: float = 10.0
    # A request whose body did not all arrive in this long (s) after its headers is answered
    # 408, its admission slot freed, and its connection closed. Must be > 0.
    body_timeout_s: float = 10.0
    # An idle keep-alive connection is closed after this long (s). Must be > 0.
    keepalive_timeout_s: float = 75.0
    # Open client connections at most; a connection past it is answered 503 and closed at
    # once. Must be > 0.
    max_connections: int = 10000


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchingConfig:
    """[batching]: the micro-batcher in front of each local ONNX version."""

    # Most rows in one onnxruntime run. Must be > 0.
    max_batch_size: int = 64
    # A run in flight longer than this (ms) lets queued requests start a second, concurrent
    # run instead of waiting for it. Must be >= 0.
    max_delay_ms: float = 1.0
    # Runs whose measured cost is below this (us) stay on the event loop (no thread hand-off);
    # with fewer than 2 usable CPUs, runs up to 1 ms do. 0: every run goes to a thread.
    inline_max_us: float = 50.0


@dataclass(frozen=True, slots=True, kw_only=True)
class AlertsConfig:
    """[alerts]: where alerts go, and when overload is one."""

    # An http(s) URL that receives every alert as JSON (POST; a bounded queue of 1000, 5
    # attempts backing off 0.5, 1, 2, 4 s; never blocks serving). Empty: the log and
    # GET /admin/alerts only.
    webhook: str = ""
    # The overload alert fires when event-loop lag above this (ms), or a model queue wait over
    # half of limits.queue_timeout_ms, holds for `overload_for_s`. Must be > 0.
    overload_lag_ms: float = 100.0
    # How long (s) the overload condition must hold before the alert fires. Must be >= 0.
    overload_for_s: float = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole validated config file."""

    # (derived) The [server] table.
    server: ServerConfig
    # (derived) The [admin] table.
    admin: AdminConfig
    # (derived) The [limits] table.
    limits: LimitsConfig
    # (derived) The [batching] table.
    batching: BatchingConfig
    # (derived) The [alerts] table.
    alerts: AlertsConfig
    # (derived) Every [models.X] table, by model name (at least one is required).
    models: dict[str, ModelConfig]
    # (derived) The file the config was read from (errors name it).
    source: str = "config.toml"
    # (derived) The sha256 of the file's bytes: GET /admin/status and the audit log show it.
    digest: str = ""
