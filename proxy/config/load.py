"""config.toml -> a validated, frozen Config; every error names its key and the rule it broke."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from typing import Any

from proxy.config.model import parse_model
from proxy.config.schema import (
    AdminConfig,
    AlertsConfig,
    BatchingConfig,
    Config,
    LimitsConfig,
    ModelConfig,
    ServerConfig,
)
from proxy.config.tables import TableReader, port_key, positive_key
from proxy.errors import ConfigError


def parse_config(
    data: dict[str, Any], *, base_dir: Path, source: str = "config.toml", digest: str = ""
) -> Config:
    """Validate a parsed TOML document; raise ConfigError listing every problem found."""
    errors: list[str] = []
    root = TableReader(data, "", errors)
    server = _parse_server(TableReader(root.table_of("server") or {}, "server", errors))
    admin = _parse_admin(TableReader(root.table_of("admin") or {}, "admin", errors))
    limits = _parse_limits(TableReader(root.table_of("limits") or {}, "limits", errors))
    batching = _parse_batching(TableReader(root.table_of("batching") or {}, "batching", errors))
    alerts = _parse_alerts(TableReader(root.table_of("alerts") or {}, "alerts", errors))
    models_raw = root.table_of("models")
    models: dict[str, ModelConfig] = {}
    if models_raw is None or not isinstance(models_raw, dict) or not models_raw:
        errors.append("models: at least one [models.<name>] table is required")
    else:
        for name, table in models_raw.items():
            model = parse_model(name, table, base_dir, errors)
            if model is not None:
                models[name] = model
    for extra in root.table:
        errors.append(
            f"{extra}: unknown section (known: server, admin, limits, batching, alerts, models)"
        )
    if errors:
        raise ConfigError(errors, source)
    return Config(
        server=server,
        admin=admin,
        limits=limits,
        batching=batching,
        alerts=alerts,
        models=models,
        source=source,
        digest=digest,
    )


def inactive_settings(config: Config) -> list[str]:
    """Settings the config accepts whose feature is not built yet, one `file:key: what happens`
    line each, for `mlproxy check` and `mlproxy serve` to warn with.

    The keys are contract (later steps build them), so they load; but a value that asks for the
    feature must not pass in silence. `workers = 1` is what runs anyway.
    """
    where = config.source
    found = []
    workers = config.server.workers
    if workers != 1:
        asked = "0 (one per core)" if workers == 0 else str(workers)
        found.append(
            f"{where}:server.workers: {asked} is accepted and not active yet;"
            " this release serves with one process"
        )
    return found


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; ConfigError names the file, key and reason."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f" cannot read file: {exc.strerror or exc}"], str(path)) from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError([f" not UTF-8 text: {exc}"], str(path)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f" invalid TOML: {exc}"], str(path)) from exc
    return parse_config(
        data,
        base_dir=path.resolve().parent,
        source=str(path),
        digest=hashlib.sha256(raw).hexdigest(),
    )


def _parse_server(r: TableReader) -> ServerConfig:
    d = ServerConfig()
    server = ServerConfig(
        host=r.get("host", "a string", d.host),
        port=port_key(r, "port", d.port),
        workers=positive_key(r, "workers", "an integer", d.workers, allow_zero=True),
        max_body_bytes=positive_key(r, "max_body_bytes", "an integer", d.max_body_bytes),
    )
    r.done()
    return server


def _parse_admin(r: TableReader) -> AdminConfig:
    d = AdminConfig()
    admin = AdminConfig(
        host=r.get("host", "a string", d.host),
        port=port_key(r, "port", d.port),
        token_env=r.get("token_env", "a string", d.token_env),
    )
    r.done()
    return admin


def _parse_limits(r: TableReader) -> LimitsConfig:
    d = LimitsConfig()
    limits = LimitsConfig(
        max_inflight=positive_key(r, "max_inflight", "an integer", d.max_inflight),
        queue_timeout_ms=positive_key(r, "queue_timeout_ms", "a number", d.queue_timeout_ms),
        adaptive=r.get("adaptive", "a boolean", d.adaptive),
        header_timeout_s=positive_key(r, "header_timeout_s", "a number", d.header_timeout_s),
        body_timeout_s=positive_key(r, "body_timeout_s", "a number", d.body_timeout_s),
        keepalive_timeout_s=positive_key(
            r, "keepalive_timeout_s", "a number", d.keepalive_timeout_s
        ),
        max_connections=positive_key(r, "max_connections", "an integer", d.max_connections),
    )
    r.done()
    return limits


def _parse_batching(r: TableReader) -> BatchingConfig:
    d = BatchingConfig()
    batching = BatchingConfig(
        max_batch_size=positive_key(r, "max_batch_size", "an integer", d.max_batch_size),
        max_delay_ms=positive_key(r, "max_delay_ms", "a number", d.max_delay_ms, allow_zero=True),
        inline_max_us=positive_key(
            r, "inline_max_us", "a number", d.inline_max_us, allow_zero=True
        ),
    )
    r.done()
    return batching


def _parse_alerts(r: TableReader) -> AlertsConfig:
    d = AlertsConfig()
    alerts = AlertsConfig(
        webhook=r.get("webhook", "a string", d.webhook),
        overload_lag_ms=positive_key(r, "overload_lag_ms", "a number", d.overload_lag_ms),
        overload_for_s=positive_key(
            r, "overload_for_s", "a number", d.overload_for_s, allow_zero=True
        ),
    )
    if alerts.webhook and not alerts.webhook.startswith(("http://", "https://")):
        r.error(f"must be an http(s) URL or empty, not {alerts.webhook!r}", "webhook")
    r.done()
    return alerts
