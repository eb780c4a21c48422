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


def parse_config(data: dict[str, Any], *, base_dir: Path, source: str = "config.toml") -> Config:
    """Validate a parsed TOML document; raise ConfigError listing every problem found."""
    errors: list[str] = []
    root = TableReader(data, "", errors)
    server = _parse_server(TableReader(root.table_of("server") or {}, "server", errors))
    admin = _parse_admin(TableReader(root.table_of("admin") or {}, "admin", errors))
    limits = _parse_limits(TableReader(root.table_of("limits") or {}, "limits", errors))
    batching = _parse_batching(TableReader(root.table_of("batching") or {}, "batching", errors))
    alerts_r = TableReader(root.table_of("alerts") or {}, "alerts", errors)
    alerts = AlertsConfig(
        webhook=alerts_r.get("webhook", "a string", ""),
        overload_lag_ms=positive_key(
            alerts_r, "overload_lag_ms", "a number", AlertsConfig().overload_lag_ms
        ),
        overload_for_s=positive_key(
            alerts_r, "overload_for_s", "a number", AlertsConfig().overload_for_s, allow_zero=True
        ),
    )
    if alerts.webhook and not alerts.webhook.startswith(("http://", "https://")):
        alerts_r.error(f"must be an http(s) URL or empty, not {alerts.webhook!r}", "webhook")
    alerts_r.done()
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
    return Config(server, admin, limits, batching, alerts, models, source=source)


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
    config = parse_config(data, base_dir=path.resolve().parent, source=str(path))
    object.__setattr__(config, "digest", hashlib.sha256(raw).hexdigest())
    return config


def _parse_server(r: TableReader) -> ServerConfig:
    d = ServerConfig()
    host = r.get("host", "a string", d.host)
    port = port_key(r, "port", d.port)
    workers = positive_key(r, "workers", "an integer", d.workers, allow_zero=True)
    max_body = positive_key(r, "max_body_bytes", "an integer", d.max_body_bytes)
    r.done()
    return ServerConfig(host, port, workers, max_body)


def _parse_admin(r: TableReader) -> AdminConfig:
    d = AdminConfig()
    host = r.get("host", "a string", d.host)
    port = port_key(r, "port", d.port)
    token_env = r.get("token_env", "a string", d.token_env)
    r.done()
    return AdminConfig(host, port, token_env)


def _parse_limits(r: TableReader) -> LimitsConfig:
    d = LimitsConfig()
    max_inflight = positive_key(r, "max_inflight", "an integer", d.max_inflight)
    queue_timeout = positive_key(r, "queue_timeout_ms", "a number", d.queue_timeout_ms)
    adaptive = r.get("adaptive", "a boolean", d.adaptive)
    r.done()
    return LimitsConfig(max_inflight, queue_timeout, adaptive)


def _parse_batching(r: TableReader) -> BatchingConfig:
    d = BatchingConfig()
    size = positive_key(r, "max_batch_size", "an integer", d.max_batch_size)
    delay = positive_key(r, "max_delay_ms", "a number", d.max_delay_ms, allow_zero=True)
    inline = positive_key(r, "inline_max_us", "a number", d.inline_max_us, allow_zero=True)
    r.done()
    return BatchingConfig(size, delay, inline)
